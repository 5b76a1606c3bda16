//! The request bodies of the three APIs, read into what the scheduler runs, with errors that
//! name the field.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::generate::GenerationParams;
use crate::recipe::template::{Piece, Template};
use crate::recipe::TemplateSpec;
use crate::tokenizer::TextTokenizer;

/// A request the server cannot take: the HTTP status and what to say.
#[derive(Debug)]
pub struct BadRequest(pub String);

pub type Parsed<T> = Result<T, BadRequest>;

/// `T` from `value`, an error naming the field (`parameters.top_k`) when a type is wrong.
pub fn from_value<T: DeserializeOwned>(value: Value, at: &str) -> Parsed<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = match (at.is_empty(), path.as_str()) {
            (true, ".") => "the body".to_string(),
            (true, _) => path,
            (false, ".") => at.to_string(),
            (false, _) => format!("{at}.{path}"),
        };
        BadRequest(format!("{field}: {}", e.into_inner()))
    })
}

/// The body as JSON: an error with the line and column when it is not.
pub fn json_body(bytes: &[u8]) -> Parsed<Value> {
    serde_json::from_slice(bytes).map_err(|e| BadRequest(format!("malformed JSON body: {e}")))
}

/// HF generate's parameters (KServe `parameters`), `stop` also as one string.
pub fn generation_params(value: Option<Value>, at: &str) -> Parsed<GenerationParams> {
    let mut value = value.unwrap_or(Value::Object(Map::new()));
    if let Some(Value::String(stop)) = value.get("stop").cloned() {
        value["stop"] = Value::Array(vec![Value::String(stop)]);
    }
    let params: GenerationParams = from_value(value, at)?;
    params
        .validate()
        .map_err(|e| BadRequest(format!("{at}: {e:#}")))?;
    Ok(params)
}

/// KServe v1 `:predict`: `{"instances": [...], "parameters": {...}}`, each instance a string or
/// `{"prompt": "..."}` / `{"text": "..."}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    pub instances: Vec<Value>,
    #[serde(default)]
    pub parameters: Option<Value>,
}

pub fn instance_texts(instances: &[Value]) -> Parsed<Vec<String>> {
    if instances.is_empty() {
        return Err(BadRequest(
            "instances: empty; give at least one prompt".into(),
        ));
    }
    instances
        .iter()
        .enumerate()
        .map(|(i, instance)| match instance {
            Value::String(text) => Ok(text.clone()),
            Value::Object(fields) => match (fields.get("prompt"), fields.get("text")) {
                (Some(Value::String(text)), None) | (None, Some(Value::String(text))) => {
                    Ok(text.clone())
                }
                _ => Err(BadRequest(format!(
                    "instances[{i}]: expected a string, or an object with a string \"prompt\" (or \"text\")"
                ))),
            },
            other => Err(BadRequest(format!(
                "instances[{i}]: expected a string or an object, got {}",
                kind(other)
            ))),
        })
        .collect()
}

/// Open Inference Protocol (KServe v2) `infer`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferRequest {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
    pub inputs: Vec<InferInput>,
    #[serde(default)]
    pub outputs: Option<Vec<Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default)]
    pub parameters: Option<Value>,
    pub data: Vec<Value>,
}

/// The prompts of an infer request: its one BYTES input `text_input`.
pub fn infer_texts(request: &InferRequest) -> Parsed<Vec<String>> {
    let [input] = request.inputs.as_slice() else {
        return Err(BadRequest(format!(
            "inputs: expected exactly one input, text_input, got {}",
            request.inputs.len()
        )));
    };
    if input.name != "text_input" {
        return Err(BadRequest(format!(
            "inputs[0].name: expected \"text_input\", got {:?}",
            input.name
        )));
    }
    if input.datatype != "BYTES" {
        return Err(BadRequest(format!(
            "inputs[0].datatype: expected \"BYTES\", got {:?}",
            input.datatype
        )));
    }
    // Checked: a client's shape can multiply past i64 (and wrap to the data's length).
    let elements = input
        .shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(u64::try_from(d).ok()?));
    if elements != Some(input.data.len() as u64) {
        return Err(BadRequest(format!(
            "inputs[0].shape: {:?} does not hold the {} elements of data",
            input.shape,
            input.data.len()
        )));
    }
    if input.data.is_empty() {
        return Err(BadRequest(
            "inputs[0].data: empty; give at least one prompt".into(),
        ));
    }
    input
        .data
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(BadRequest(format!(
                "inputs[0].data[{i}]: expected a string, got {}",
                kind(other)
            ))),
        })
        .collect()
}

/// OpenAI's `POST /v1/completions`. Fields that would change the answer in ways Kiln does not
/// implement (n, best_of, echo, logprobs, penalties, suffix, logit_bias) are accepted only at
/// their neutral values, so a client never silently gets something else than it asked for.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    /// A string, a list of strings, a list of token ids, or a list of such lists: see
    /// [`CompletionRequest::prompts`].
    pub prompt: Value,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Not OpenAI's, but vLLM's and TGI's.
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub best_of: Option<usize>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub logprobs: Option<Value>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub logit_bias: Option<Map<String, Value>>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub stream_options: Option<Value>,
}

fn default_max_tokens() -> usize {
    16
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The prompts of a completion request: texts, or token ids as they are.
pub enum Prompts {
    Texts(Vec<String>),
    Tokens(Vec<Vec<u32>>),
}

impl Prompts {
    pub fn len(&self) -> usize {
        match self {
            Prompts::Texts(texts) => texts.len(),
            Prompts::Tokens(rows) => rows.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The most tokens `logprobs: N` may ask for at each position (vLLM's limit; OpenAI's was 5).
pub const MAX_LOGPROBS: u64 = 20;

impl CompletionRequest {
    /// `prompt` as OpenAI takes it: a string, a list of strings, a list of token ids (one
    /// prompt), or a list of lists of token ids (lm-evaluation-harness sends these).
    pub fn prompts(&self) -> Parsed<Prompts> {
        let expected = "prompt: expected a string, a list of strings, a list of token ids or a \
                        list of lists of token ids";
        let ids = |values: &[Value]| -> Option<Vec<u32>> {
            values
                .iter()
                .map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok()))
                .collect()
        };
        let prompts = match &self.prompt {
            Value::String(text) => Prompts::Texts(vec![text.clone()]),
            Value::Array(items) if items.is_empty() => {
                return Err(BadRequest("prompt: empty; give at least one".into()))
            }
            Value::Array(items) => match &items[0] {
                Value::String(_) => Prompts::Texts(
                    items
                        .iter()
                        .enumerate()
                        .map(|(i, item)| match item {
                            Value::String(text) => Ok(text.clone()),
                            _ => Err(BadRequest(format!(
                                "prompt[{i}]: expected a string, as prompt[0] is"
                            ))),
                        })
                        .collect::<Parsed<_>>()?,
                ),
                Value::Number(_) => Prompts::Tokens(vec![ids(items).ok_or_else(|| {
                    BadRequest(
                        "prompt: expected token ids (integers from 0), as prompt[0] is".into(),
                    )
                })?]),
                Value::Array(_) => Prompts::Tokens(
                    items
                        .iter()
                        .enumerate()
                        .map(|(i, item)| {
                            item.as_array().and_then(|row| ids(row)).ok_or_else(|| {
                                BadRequest(format!(
                                    "prompt[{i}]: expected a list of token ids (integers from 0)"
                                ))
                            })
                        })
                        .collect::<Parsed<_>>()?,
                ),
                _ => return Err(BadRequest(expected.into())),
            },
            _ => return Err(BadRequest(expected.into())),
        };
        Ok(prompts)
    }

    /// `logprobs: N`, the most likely tokens to list at each position, when asked for.
    pub fn logprobs(&self) -> Parsed<Option<usize>> {
        match &self.logprobs {
            None | Some(Value::Null) => Ok(None),
            Some(value) => match value.as_u64().filter(|&n| n <= MAX_LOGPROBS) {
                Some(n) => Ok(Some(n as usize)),
                None => Err(BadRequest(format!(
                    "logprobs: expected an integer from 0 to {MAX_LOGPROBS} (or null), got {value}"
                ))),
            },
        }
    }

    /// The generation parameters, OpenAI's defaults included (temperature 1, so sampling, with a
    /// fresh seed unless one is given).
    pub fn params(&self) -> Parsed<GenerationParams> {
        let unsupported = [
            ("n", self.n.is_some_and(|n| n != 1)),
            ("best_of", self.best_of.is_some_and(|n| n != 1)),
            (
                "presence_penalty",
                self.presence_penalty.is_some_and(|p| p != 0.0),
            ),
            (
                "frequency_penalty",
                self.frequency_penalty.is_some_and(|p| p != 0.0),
            ),
            (
                "logit_bias",
                self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()),
            ),
            ("suffix", self.suffix.is_some()),
        ];
        if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
            return Err(BadRequest(format!(
                "{field}: not supported by kiln serve (leave it out or at its default)"
            )));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        let params = GenerationParams {
            max_new_tokens: self.max_tokens,
            do_sample: temperature > 0.0,
            temperature: if temperature > 0.0 { temperature } else { 1.0 },
            top_k: self.top_k,
            top_p: self.top_p.filter(|&p| p < 1.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            seed: self.seed.unwrap_or_else(rand::random),
            stop: self
                .stop
                .as_ref()
                .map(|s| match s {
                    OneOrMany::One(s) => vec![s.clone()],
                    OneOrMany::Many(v) => v.clone(),
                })
                .unwrap_or_default(),
            ..Default::default()
        };
        if temperature < 0.0 || !temperature.is_finite() {
            return Err(BadRequest(format!(
                "temperature: must be >= 0, got {temperature}"
            )));
        }
        params
            .validate()
            .map_err(|e| BadRequest(format!("{e:#}")))?;
        Ok(params)
    }
}

/// OpenAI's `POST /v1/chat/completions`: the messages are rendered with the model's chat
/// template; sampling takes the same fields, with the same neutral-value rule, as completions.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Value,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// OpenAI's newer name for `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub logit_bias: Option<Map<String, Value>>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub stream_options: Option<Value>,
}

/// Chat's default reply budget, when neither `max_tokens` nor `max_completion_tokens` is given.
pub const CHAT_MAX_TOKENS: usize = 256;

impl ChatRequest {
    /// The conversation: `{role, content}` objects, the content a string or a list of text
    /// parts (`[{"type": "text", "text": ...}]`), as OpenAI takes them.
    pub fn messages(&self) -> Parsed<Vec<crate::data::chat::Message>> {
        let items = match &self.messages {
            Value::Array(items) if !items.is_empty() => items,
            Value::Array(_) => return Err(BadRequest("messages: empty; give at least one".into())),
            _ => {
                return Err(BadRequest(
                    "messages: expected a list of {role, content}".into(),
                ))
            }
        };
        let mut messages = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let role = item["role"].as_str().ok_or_else(|| {
                BadRequest(format!(
                    "messages[{i}].role: expected system, user or assistant"
                ))
            })?;
            if !["system", "user", "assistant", "developer"].contains(&role) {
                return Err(BadRequest(format!(
                    "messages[{i}].role: {role:?} is not supported (expected system, user or \
                     assistant)"
                )));
            }
            let content = match &item["content"] {
                Value::String(text) => text.clone(),
                Value::Array(parts) => parts
                    .iter()
                    .enumerate()
                    .map(
                        |(j, part)| match (part["type"].as_str(), part["text"].as_str()) {
                            (Some("text"), Some(text)) => Ok(text),
                            _ => Err(BadRequest(format!(
                            "messages[{i}].content[{j}]: only text parts ({{\"type\": \"text\", \
                             \"text\": ...}}) are supported"
                        ))),
                        },
                    )
                    .collect::<Parsed<Vec<&str>>>()?
                    .concat(),
                _ => {
                    return Err(BadRequest(format!(
                        "messages[{i}].content: expected a string or a list of text parts"
                    )))
                }
            };
            // OpenAI's `developer` role is the system prompt of newer models.
            let role = if role == "developer" { "system" } else { role };
            messages.push(crate::data::chat::Message {
                role: role.to_string(),
                content,
            });
        }
        Ok(messages)
    }

    /// The generation parameters, as a completion request with the same fields gets them.
    pub fn params(&self) -> Parsed<GenerationParams> {
        if self.logprobs == Some(true) {
            return Err(BadRequest(
                "logprobs: not supported for chat completions (use /v1/completions)".into(),
            ));
        }
        let stop = self.stop.as_ref().map(|s| match s {
            OneOrMany::One(s) => OneOrMany::One(s.clone()),
            OneOrMany::Many(v) => OneOrMany::Many(v.clone()),
        });
        CompletionRequest {
            model: self.model.clone(),
            prompt: Value::Null,
            max_tokens: (self.max_completion_tokens)
                .or(self.max_tokens)
                .unwrap_or(CHAT_MAX_TOKENS),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            stream: self.stream,
            stop,
            seed: self.seed,
            n: self.n,
            best_of: None,
            echo: None,
            logprobs: None,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.clone(),
            suffix: None,
            user: self.user.clone(),
            stream_options: self.stream_options.clone(),
        }
        .params()
    }
}

/// `:classify`: `{"instances": [{"premise": ..., "hypothesis": ...}], "parameters":
/// {"template": "mnli" | {"prompt": ..., "target": ...}, "labels": [...]}}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    pub instances: Vec<Map<String, Value>>,
    #[serde(default)]
    pub parameters: ClassifyParams,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ClassifyParams {
    /// A preset name or `{prompt, target}`; the target may use only `{label}`. Default: mnli.
    #[serde(default)]
    pub template: Option<TemplateSpec>,
    /// The label words, in the order probabilities are given. Default: the preset's.
    #[serde(default)]
    pub labels: Option<Vec<String>>,
}

/// A classification request made concrete: prompts, the candidate continuations, label words.
pub struct Classification {
    pub prompts: Vec<Vec<u32>>,
    pub candidates: Vec<Vec<u32>>,
    pub labels: Vec<String>,
}

pub fn classification(
    request: ClassifyRequest,
    tokenizer: &TextTokenizer,
) -> Parsed<Classification> {
    let spec = request
        .parameters
        .template
        .unwrap_or(TemplateSpec::Preset("mnli".into()));
    let template = Template::from_spec(&spec)
        .map_err(|e| BadRequest(format!("parameters.template: {e:#}")))?;
    let labels = match (request.parameters.labels, template.preset()) {
        (Some(labels), _) => labels,
        (None, Some(preset)) => preset
            .default_label_map()
            .map(|m: BTreeMap<String, String>| m.into_values().collect())
            .ok_or_else(|| {
                BadRequest(format!(
                    "parameters.labels: the {preset:?} template has no label words; give them"
                ))
            })?,
        (None, None) => {
            return Err(BadRequest(
                "parameters.labels: a custom template needs its label words".into(),
            ))
        }
    };
    if labels.len() < 2 {
        return Err(BadRequest(
            "parameters.labels: give at least two label words".into(),
        ));
    }
    if let Some(Piece::Field(f)) = template
        .target
        .iter()
        .find(|p| matches!(p, Piece::Field(f) if f != "label"))
    {
        return Err(BadRequest(format!(
            "parameters.template: the target may use only {{label}}, not {{{f}}}"
        )));
    }
    if !template
        .target
        .iter()
        .any(|p| matches!(p, Piece::Field(f) if f == "label"))
    {
        return Err(BadRequest(
            "parameters.template: the target must contain {label}".into(),
        ));
    }
    if request.instances.is_empty() {
        return Err(BadRequest("instances: empty; give at least one".into()));
    }
    let encode = |text: &str, at: &str| {
        tokenizer
            .encode(text)
            .map_err(|e| BadRequest(format!("{at}: {e:#}")))
    };
    let candidates = labels
        .iter()
        .map(|label| {
            let mut fields = Map::new();
            fields.insert("label".into(), Value::String(label.clone()));
            let text = render(&template.target, &fields).expect("only {label} is used");
            encode(&text, "parameters.labels")
        })
        .collect::<Parsed<Vec<_>>>()?;
    let prompts = request
        .instances
        .iter()
        .enumerate()
        .map(|(i, fields)| {
            let at = format!("instances[{i}]");
            let text = render(&template.prompt, fields).map_err(|field| {
                BadRequest(format!(
                    "{at}: no string field {field:?} (the template reads {})",
                    template.fields().join(", ")
                ))
            })?;
            encode(&text, &at)
        })
        .collect::<Parsed<Vec<_>>>()?;
    Ok(Classification {
        prompts,
        candidates,
        labels,
    })
}

/// The template's text with the fields filled in; `Err(field)` names a missing one.
fn render(pieces: &[Piece], fields: &Map<String, Value>) -> Result<String, String> {
    let mut text = String::new();
    for piece in pieces {
        match piece {
            Piece::Text(t) => text.push_str(t),
            Piece::Field(f) => match fields.get(f) {
                Some(Value::String(s)) => text.push_str(s),
                Some(Value::Number(n)) => text.push_str(&n.to_string()),
                Some(Value::Bool(b)) => text.push_str(&b.to_string()),
                _ => return Err(f.clone()),
            },
        }
    }
    Ok(text)
}

pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Softmax of summed log-likelihoods: the label probabilities.
pub fn probabilities(scores: &[f32]) -> Vec<f64> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = scores.iter().map(|&s| (s as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_types_name_the_field() {
        let err = generation_params(Some(serde_json::json!({"top_k": "five"})), "parameters")
            .err()
            .unwrap();
        assert!(
            err.0.starts_with("parameters.top_k: invalid type"),
            "{}",
            err.0
        );
        let err = generation_params(Some(serde_json::json!({"topk": 5})), "parameters")
            .err()
            .unwrap();
        assert!(err.0.contains("unknown field `topk`"), "{}", err.0);
        let err = generation_params(Some(serde_json::json!({"top_p": 1.5})), "parameters")
            .err()
            .unwrap();
        assert!(err.0.contains("top_p must be in (0, 1]"), "{}", err.0);
        let params =
            generation_params(Some(serde_json::json!({"stop": "\n"})), "parameters").unwrap();
        assert_eq!(params.stop, vec!["\n".to_string()]);
    }

    #[test]
    fn probabilities_sum_to_one_and_keep_the_order() {
        let p = probabilities(&[-1.0, -3.0, -2.0]);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(p[0] > p[2] && p[2] > p[1]);
    }
}
