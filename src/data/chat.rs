//! Conversations: rows of `messages` (`[{role, content}]`, the OpenAI / Hugging Face chat format)
//! or ShareGPT's `conversations` (`[{from, value}]`), rendered with a chat template exactly as
//! transformers' `apply_chat_template` renders it (Jinja, through minijinja), with the spans of
//! text that are the assistant's: what `loss_on: assistant` trains.
//!
//! The assistant spans come from the template's `{% generation %}` blocks, as transformers'
//! `return_assistant_tokens_mask` takes them; a template without them has each assistant turn
//! found by rendering the conversation up to it with and without the turn.

use std::ops::Range;

use anyhow::{bail, Context, Result};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use super::source::Row;

/// Marks the start and end of a `{% generation %}` block in the rendered text (private-use
/// code points, refused in the messages themselves).
const GENERATION_START: char = '\u{E000}';
const GENERATION_END: char = '\u{E001}';

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The roles a conversation may use.
const ROLES: &[&str] = &["system", "user", "assistant"];

/// The conversation of a row: its `messages`, or its ShareGPT `conversations` with `from`
/// mapped onto roles (`human` → user, `gpt` → assistant, `system` → system). `at` names the
/// row in errors.
pub fn messages_of(row: &Row, at: &str) -> Result<Vec<Message>> {
    let (column, list) = match (row.get("messages"), row.get("conversations")) {
        (Some(list), _) => ("messages", list),
        (None, Some(list)) => ("conversations", list),
        (None, None) => bail!(
            "{at}: no `messages` (a list of {{role, content}}) or `conversations` (ShareGPT's \
             list of {{from, value}}) column"
        ),
    };
    messages_in(list, column, at)
}

/// The conversation in `list`, the value of column `column` (`messages`, ShareGPT's
/// `conversations`, or a preference pair's `prompt` / `chosen` / `rejected`, which take
/// `messages`' `{role, content}` turns). `at` names the row in errors.
pub fn messages_in(list: &serde_json::Value, column: &str, at: &str) -> Result<Vec<Message>> {
    let turns = list
        .as_array()
        .with_context(|| format!("{at}: `{column}` is {}, expected a list", kind(list)))?;
    if turns.is_empty() {
        bail!("{at}: `{column}` is an empty list");
    }
    let mut messages = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter().enumerate() {
        let field = |name: &str| -> Result<String> {
            match turn.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(other) => bail!(
                    "{at}: {column}[{i}].{name} is {}, expected a string",
                    kind(other)
                ),
                None => bail!("{at}: {column}[{i}] has no `{name}`"),
            }
        };
        let (role, content) = match column {
            "conversations" => {
                let from = field("from")?;
                let role = match from.as_str() {
                    "human" | "user" => "user",
                    "gpt" | "assistant" | "chatgpt" | "bard" | "bing" => "assistant",
                    "system" => "system",
                    other => bail!(
                        "{at}: conversations[{i}].from is {other:?}; expected human, gpt or \
                         system (ShareGPT's roles)"
                    ),
                };
                (role.to_string(), field("value")?)
            }
            _ => (field("role")?, field("content")?),
        };
        if !ROLES.contains(&role.as_str()) {
            bail!(
                "{at}: {column}[{i}].role is {role:?}; expected one of {}",
                ROLES.join(", ")
            );
        }
        if content.contains([GENERATION_START, GENERATION_END]) {
            bail!("{at}: {column}[{i}] contains U+E000/U+E001, which Kiln reserves");
        }
        messages.push(Message { role, content });
    }
    Ok(messages)
}

fn kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Chat formats for models that ship without a template (the GPT-J family), with the special
/// tokens each needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatPreset {
    /// OpenAI's ChatML: `<|im_start|>role\ncontent<|im_end|>\n`.
    Chatml,
    /// OpenAssistant's Pythia fine-tunes: `<|prompter|>…<|endoftext|><|assistant|>…<|endoftext|>`.
    Openassistant,
    /// Databricks Dolly v2's instruction format, `### Instruction:` / `### Response:` / `### End`.
    Dolly,
}

impl ChatPreset {
    pub const ALL: [ChatPreset; 3] = [Self::Chatml, Self::Openassistant, Self::Dolly];

    pub fn name(self) -> &'static str {
        match self {
            Self::Chatml => "chatml",
            Self::Openassistant => "openassistant",
            Self::Dolly => "dolly",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The template, in the Jinja dialect of Hugging Face's chat templates, with its assistant
    /// turns (their end-of-turn token included) in `{% generation %}` blocks.
    pub fn template(self) -> &'static str {
        match self {
            Self::Chatml => concat!(
                "{%- for message in messages %}",
                "{{- '<|im_start|>' + message['role'] + '\\n' }}",
                "{%- if message['role'] == 'assistant' %}",
                "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}",
                "{{- '\\n' }}",
                "{%- else %}",
                "{{- message['content'] + '<|im_end|>' + '\\n' }}",
                "{%- endif %}",
                "{%- endfor %}",
                "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
            ),
            Self::Openassistant => concat!(
                "{%- for message in messages %}",
                "{%- if message['role'] == 'system' %}",
                "{{- '<|system|>' + message['content'] + eos_token }}",
                "{%- elif message['role'] == 'user' %}",
                "{{- '<|prompter|>' + message['content'] + eos_token }}",
                "{%- else %}",
                "{{- '<|assistant|>' }}",
                "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}",
                "{%- endif %}",
                "{%- endfor %}",
                "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}",
            ),
            Self::Dolly => concat!(
                "{%- if messages[0]['role'] == 'system' %}",
                "{{- messages[0]['content'] + '\\n\\n' }}",
                "{%- else %}",
                "{{- 'Below is an instruction that describes a task. Write a response that ",
                "appropriately completes the request.\\n\\n' }}",
                "{%- endif %}",
                "{%- for message in messages %}",
                "{%- if message['role'] == 'user' %}",
                "{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}",
                "{%- elif message['role'] == 'assistant' %}",
                "{{- '### Response:\\n' }}",
                "{%- generation %}{{- message['content'] + '\\n\\n### End' }}{%- endgeneration %}",
                "{{- '\\n\\n' }}",
                "{%- endif %}",
                "{%- endfor %}",
                "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}",
            ),
        }
    }

    /// The tokens the format adds to the vocabulary, as special tokens.
    pub fn special_tokens(self) -> &'static [&'static str] {
        match self {
            Self::Chatml => &["<|im_start|>", "<|im_end|>"],
            Self::Openassistant => &["<|system|>", "<|prompter|>", "<|assistant|>"],
            Self::Dolly => &["### End", "### Instruction:", "### Response:"],
        }
    }

    /// The token that ends an assistant turn (generation stops at it); `None`: the eos token.
    pub fn end_of_turn(self) -> Option<&'static str> {
        match self {
            Self::Chatml => Some("<|im_end|>"),
            Self::Openassistant => None,
            Self::Dolly => Some("### End"),
        }
    }
}

/// Gives `tokenizer` the chat template the recipe's conversations use (`data.chat_template`: a
/// preset, whose special tokens it adds; inline Jinja; or a `.jinja` file relative to the
/// recipe), or checks that it has one of its own; a recipe without conversations leaves it as
/// it is. Returns the preset used, if any.
pub fn apply_recipe_template(
    recipe: &crate::recipe::Recipe,
    recipe_dir: &std::path::Path,
    tokenizer: &mut crate::tokenizer::TextTokenizer,
) -> Result<Option<ChatPreset>> {
    let chat = (recipe.data.train.iter())
        .chain(&recipe.data.eval)
        .any(|d| d.template.is_chat());
    // Preference pairs may be conversations or text: a template only when the recipe names one
    // (the tokenizer's own serves conversational pairs otherwise).
    let pairs_template = recipe.objective.is_preference() && recipe.data.chat_template.is_some();
    if !chat && !pairs_template {
        return Ok(None);
    }
    let mut preset = None;
    let source = match recipe.data.chat_template.as_deref() {
        Some(name) if ChatPreset::from_name(name).is_some() => {
            let p = ChatPreset::from_name(name).expect("matched");
            tokenizer.add_special_tokens(p.special_tokens())?;
            preset = Some(p);
            p.template().to_string()
        }
        Some(jinja) if jinja.contains("{%") || jinja.contains("{{") => jinja.to_string(),
        Some(file) => {
            let path = recipe_dir.join(file);
            std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "data.chat_template: {file:?} is not a preset ({}), not a Jinja template, and \
                     {} cannot be read",
                    ChatPreset::ALL.map(ChatPreset::name).join(", "),
                    path.display()
                )
            })?
        }
        None => match tokenizer.chat_template() {
            Some(own) => own.to_string(),
            None => bail!(
                "data.chat_template: the conversations need a chat template and the tokenizer \
                 ({}) has none: set a preset ({}), a Jinja template or a .jinja file",
                tokenizer.source().display(),
                ChatPreset::ALL.map(ChatPreset::name).join(", ")
            ),
        },
    };
    ChatTemplate::new(&source, tokenizer.template_tokens()).context("data.chat_template")?;
    tokenizer.set_chat_template(&source);
    Ok(preset)
}

pub use crate::tokenizer::TemplateTokens;

/// A conversation rendered: the text, and the byte ranges of it that are the assistant's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedChat {
    pub text: String,
    pub assistant: Vec<Range<usize>>,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    has_generation: bool,
    tokens: TemplateTokens,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

impl Clone for ChatTemplate {
    fn clone(&self) -> Self {
        Self::new(&self.source, self.tokens.clone()).expect("compiled once already")
    }
}

impl ChatTemplate {
    /// Compiles `source` as transformers does (`trim_blocks`, `lstrip_blocks`, loop controls,
    /// Python's string and dict methods, `raise_exception`, `tojson`, `strftime_now`), with the
    /// `{% generation %}` blocks transformers' assistant mask reads.
    pub fn new(source: &str, tokens: TemplateTokens) -> Result<Self> {
        let (rewritten, has_generation) = mark_generation_blocks(source);
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", rewritten)
            .map_err(|e| anyhow::anyhow!("the chat template does not compile: {e:#}"))?;
        Ok(Self {
            env,
            source: source.to_string(),
            has_generation,
            tokens,
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template marks its assistant turns with `{% generation %}`.
    pub fn has_generation_blocks(&self) -> bool {
        self.has_generation
    }

    /// The text `apply_chat_template(messages, add_generation_prompt=…, tokenize=False)` gives,
    /// and the `{% generation %}` blocks in it.
    fn render_marked(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<Range<usize>>)> {
        if let Some(i) =
            (messages.iter()).position(|m| m.content.contains([GENERATION_START, GENERATION_END]))
        {
            bail!("messages[{i}] contains U+E000/U+E001, which Kiln reserves");
        }
        let template = self.env.get_template("chat").expect("added in new");
        let context = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.tokens.bos_token.clone().unwrap_or_default(),
            eos_token => self.tokens.eos_token.clone().unwrap_or_default(),
            pad_token => self.tokens.pad_token.clone().unwrap_or_default(),
            unk_token => self.tokens.unk_token.clone().unwrap_or_default(),
        };
        let marked = template
            .render(context)
            .map_err(|e| anyhow::anyhow!("rendering the chat template: {e:#}"))?;
        let mut text = String::with_capacity(marked.len());
        let mut blocks = Vec::new();
        let mut open = None;
        for c in marked.chars() {
            match c {
                GENERATION_START => open = Some(text.len()),
                GENERATION_END => {
                    if let Some(start) = open.take() {
                        blocks.push(start..text.len());
                    }
                }
                c => text.push(c),
            }
        }
        Ok((text, blocks))
    }

    /// The text of `messages` (with the assistant's prompt after them when
    /// `add_generation_prompt`), as transformers renders it.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        Ok(self.render_marked(messages, add_generation_prompt)?.0)
    }

    /// The conversation rendered, with its assistant spans: the `{% generation %}` blocks when
    /// the template has them (as transformers reads them), else each assistant turn as what
    /// rendering the conversation up to it adds to rendering it up to the turn before with the
    /// assistant's prompt.
    pub fn render_with_assistant(&self, messages: &[Message]) -> Result<RenderedChat> {
        let (text, blocks) = self.render_marked(messages, false)?;
        if self.has_generation {
            // As transformers: whatever the blocks hold, however many there are.
            return Ok(RenderedChat {
                text,
                assistant: blocks,
            });
        }
        let turns: Vec<usize> = (messages.iter().enumerate())
            .filter(|(_, m)| m.role == "assistant")
            .map(|(i, _)| i)
            .collect();
        let mut assistant = Vec::with_capacity(turns.len());
        for turn in turns {
            let before = self.render(&messages[..turn], true)?;
            let through = self.render(&messages[..=turn], false)?;
            if !(through.starts_with(&before) && text.starts_with(&through)) {
                bail!(
                    "the chat template does not render conversations incrementally (the text up \
                     to assistant turn {turn} is not a prefix of the whole), so the assistant's \
                     tokens cannot be found; add {{% generation %}} blocks to the template"
                );
            }
            let start = before.len();
            assistant.push(start..through.len());
        }
        Ok(RenderedChat { text, assistant })
    }
}

impl ChatTemplate {
    /// The tokenizer's chat template, compiled.
    pub fn of(tokenizer: &crate::tokenizer::TextTokenizer) -> Result<Self> {
        let source = tokenizer.chat_template().with_context(|| {
            format!(
                "the tokenizer ({}) has no chat template: set data.chat_template to a preset \
                 (chatml, openassistant, dolly), a Jinja template or a .jinja file",
                tokenizer.source().display()
            )
        })?;
        Self::new(source, tokenizer.template_tokens())
    }

    /// The token that ends the assistant's turns: the first special token after the content
    /// of a rendered assistant turn (ChatML's `<|im_end|>`, Dolly's `### End`), or eos when the
    /// turn ends with it; `None` when the turn ends with plain text.
    pub fn end_of_turn(&self, tokenizer: &crate::tokenizer::TextTokenizer) -> Result<Option<u32>> {
        const PROBE: &str = "Kiln probe reply";
        let probe = [
            Message {
                role: "user".into(),
                content: "Kiln probe".into(),
            },
            Message {
                role: "assistant".into(),
                content: PROBE.into(),
            },
        ];
        let rendered = self.render_with_assistant(&probe)?;
        let Some(span) = rendered.assistant.first() else {
            return Ok(None);
        };
        let turn = &rendered.text[span.clone()];
        let after = turn
            .find(PROBE)
            .map_or(turn, |at| &turn[at + PROBE.len()..]);
        let ids = tokenizer.encode(after)?;
        let added = tokenizer.inner().get_added_tokens_decoder();
        Ok(ids
            .into_iter()
            .find(|id| *id == tokenizer.eos_id() || added.get(id).is_some_and(|t| t.special)))
    }
}

/// What chatting with a model needs: its template, and the tokens that end the assistant's
/// turn besides eos (generation stops at them).
pub struct Chat {
    pub template: ChatTemplate,
    pub stop_token_ids: Vec<u32>,
}

impl Chat {
    pub fn of(tokenizer: &crate::tokenizer::TextTokenizer) -> Result<Self> {
        let template = ChatTemplate::of(tokenizer)?;
        let stop_token_ids = template.end_of_turn(tokenizer)?.into_iter().collect();
        Ok(Self {
            template,
            stop_token_ids,
        })
    }
}

/// `source` with each `{% generation %}` / `{% endgeneration %}` replaced by a self-contained
/// `{% if true %}MARKER{% endif %}` with the original tag's whitespace control on its outer
/// tags, so that `trim_blocks` and `lstrip_blocks` act on it as on the original; and whether
/// there were any.
fn mark_generation_blocks(source: &str) -> (String, bool) {
    let tag = regex::Regex::new(r"\{%(-?)\s*(end)?generation\s*(-?)%\}").expect("valid regex");
    let mut found = false;
    let out = tag.replace_all(source, |m: &regex::Captures| {
        found = true;
        let (strip_before, strip_after) = (&m[1], &m[3]);
        let marker = match m.get(2) {
            Some(_) => GENERATION_END,
            None => GENERATION_START,
        };
        format!("{{%{strip_before} if true %}}{{{{ '{marker}' }}}}{{% endif {strip_after}%}}")
    });
    (out.into_owned(), found)
}

/// Python's `json.dumps` as transformers' `tojson` calls it (`ensure_ascii=False`, `", "` and
/// `": "` separators, or `indent`), keys in the order the template's value has them.
fn tojson(value: Value, args: minijinja::value::Rest<Value>) -> Result<Value, Error> {
    // `tojson(4)` or `tojson(indent=4)`; Python's other keywords at their defaults.
    let mut indent = None;
    for arg in args.iter() {
        match arg.kind() {
            minijinja::value::ValueKind::Number => indent = arg.as_usize(),
            minijinja::value::ValueKind::None => {}
            minijinja::value::ValueKind::Map => {
                for key in arg.try_iter()? {
                    let value = arg.get_item(&key)?;
                    match key.as_str() {
                        Some("indent") => indent = value.as_usize(),
                        Some("ensure_ascii") if !value.is_true() => {}
                        Some("sort_keys") if !value.is_true() => {}
                        _ => {
                            return Err(Error::new(
                                ErrorKind::InvalidOperation,
                                format!("tojson: {key}={value} is not supported (indent is)"),
                            ))
                        }
                    }
                }
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: unexpected argument {arg}"),
                ))
            }
        }
    }
    let mut out = String::new();
    write_python_json(&value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_python_json(
    value: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> Result<(), Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    let json_string = |s: &str| serde_json::to_string(s).expect("a string serialises");
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => match (is_float(value), value.as_i64()) {
            (false, Some(n)) => out.push_str(&n.to_string()),
            _ => out.push_str(&python_float(&value.to_string())),
        },
        ValueKind::String => out.push_str(&json_string(value.as_str().unwrap_or_default())),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map | ValueKind::Plain => {
            let keys: Vec<Value> = value.try_iter()?.collect();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&json_string(&key.to_string()));
                out.push_str(": ");
                write_python_json(&value.get_item(key)?, indent, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => out.push_str(&json_string(&value.to_string())),
    }
    Ok(())
}

fn is_float(value: &Value) -> bool {
    serde_json::to_value(value).is_ok_and(|v| v.is_f64())
}

/// A float as Python's `repr` (and `json.dumps`) writes it: `1.0`, `0.5`, `1e-05`, `1e+16`,
/// `Infinity`, `NaN`.
fn python_float(text: &str) -> String {
    let Ok(x) = text.parse::<f64>() else {
        return text.to_string();
    };
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let exponent = if x == 0.0 {
        0
    } else {
        x.abs().log10().floor() as i32
    };
    if (-4..16).contains(&exponent) {
        return match x.fract() == 0.0 {
            true => format!("{x:.1}"),
            false => format!("{x}"),
        };
    }
    // Rust's shortest `1e-5` in Python's spelling `1e-05`.
    let scientific = format!("{x:e}");
    let (mantissa, exp) = scientific.split_once('e').expect("`{:e}` has an exponent");
    let exp: i32 = exp.parse().expect("an integer exponent");
    let sign = if exp < 0 { '-' } else { '+' };
    format!("{mantissa}e{sign}{:02}", exp.abs())
}

/// The current UTC time formatted with the strftime codes chat templates use (`%d`, `%m`,
/// `%Y`, `%b`, `%B`, `%H`, `%M`, `%S`, `%%`).
fn strftime_now(format: String) -> String {
    let now = std::time::SystemTime::now();
    let stamp = humantime::format_rfc3339_seconds(now).to_string();
    let (year, month, day) = (&stamp[0..4], &stamp[5..7], &stamp[8..10]);
    let (hour, minute, second) = (&stamp[11..13], &stamp[14..16], &stamp[17..19]);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month_name = MONTHS[month.parse::<usize>().unwrap_or(1).clamp(1, 12) - 1];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(day),
            Some('m') => out.push_str(month),
            Some('Y') => out.push_str(year),
            Some('y') => out.push_str(&year[2..]),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('H') => out.push_str(hour),
            Some('M') => out.push_str(minute),
            Some('S') => out.push_str(second),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(turns: &[(&str, &str)]) -> Vec<Message> {
        turns
            .iter()
            .map(|(role, content)| Message {
                role: role.to_string(),
                content: content.to_string(),
            })
            .collect()
    }

    fn tokens() -> TemplateTokens {
        TemplateTokens {
            eos_token: Some("<|endoftext|>".into()),
            bos_token: Some("<|endoftext|>".into()),
            ..TemplateTokens::default()
        }
    }

    #[test]
    fn chatml_renders_with_its_assistant_spans() {
        let template = ChatTemplate::new(ChatPreset::Chatml.template(), tokens()).unwrap();
        let messages = chat(&[("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")]);
        let rendered = template.render_with_assistant(&messages).unwrap();
        assert_eq!(
            rendered.text,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n\
             <|im_start|>user\nBye<|im_end|>\n"
        );
        let span = rendered.assistant[0].clone();
        assert_eq!(&rendered.text[span], "Hello!<|im_end|>");
        assert_eq!(
            template.render(&messages[..1], true).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_template_without_generation_blocks_finds_the_turns_by_prefixes() {
        let source = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}\
                      {% if add_generation_prompt %}assistant: {% endif %}";
        let template = ChatTemplate::new(source, tokens()).unwrap();
        assert!(!template.has_generation_blocks());
        let messages = chat(&[
            ("user", "2+2?"),
            ("assistant", "4"),
            ("user", "3+3?"),
            ("assistant", "6"),
        ]);
        let rendered = template.render_with_assistant(&messages).unwrap();
        let spans: Vec<&str> = (rendered.assistant.iter())
            .map(|span| &rendered.text[span.clone()])
            .collect();
        assert_eq!(spans, ["4\n", "6\n"]);
    }

    #[test]
    fn generation_tags_keep_the_whitespace_rules_of_the_original() {
        // trim_blocks after `{% generation %}`, lstrip_blocks before `{% endgeneration %}`.
        let source = "{% for m in messages %}{% if m.role == 'assistant' %}A:{% generation %}\n\
                      {{ m.content }}\n    {% endgeneration %}|{% else %}U:{{ m.content }}|{% endif %}{% endfor %}";
        let template = ChatTemplate::new(source, tokens()).unwrap();
        let rendered = template
            .render_with_assistant(&chat(&[("user", "q"), ("assistant", "a")]))
            .unwrap();
        assert_eq!(rendered.text, "U:q|A:a\n|");
        let span = &rendered.assistant[0];
        assert_eq!(&rendered.text[span.clone()], "a\n");
    }

    #[test]
    fn python_methods_tojson_and_raise_exception_work_as_in_transformers() {
        let source = "{{ messages[0].content.strip().upper() }} {{ messages[0] | tojson }}\
                      {% if messages | length > 1 %}{{ raise_exception('one only') }}{% endif %}";
        let template = ChatTemplate::new(source, tokens()).unwrap();
        let one = chat(&[("user", "  hé  ")]);
        assert_eq!(
            template.render(&one, false).unwrap(),
            "HÉ {\"role\": \"user\", \"content\": \"  hé  \"}"
        );
        let err = template
            .render(&chat(&[("user", "a"), ("user", "b")]), false)
            .unwrap_err();
        assert!(format!("{err:#}").contains("one only"), "{err:#}");
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let template = ChatTemplate::new(
            "{{ {'a': [1, 2.0, 1e-5, 1e16], 'b': none} | tojson }}|{{ {'x': 1} | tojson(indent=2) }}",
            tokens(),
        )
        .unwrap();
        assert_eq!(
            template.render(&chat(&[("user", "x")]), false).unwrap(),
            "{\"a\": [1, 2.0, 1e-05, 1e+16], \"b\": null}|{\n  \"x\": 1\n}"
        );
    }

    #[test]
    fn generation_blocks_keep_lstrip_blocks_for_the_tags_inside_them() {
        let source = "{% for m in messages %}{% generation %}\n  {% if true %}{{ m.content }}{% endif %}{% endgeneration %}{% endfor %}";
        let template = ChatTemplate::new(source, tokens()).unwrap();
        let rendered = template
            .render_with_assistant(&chat(&[("assistant", "a")]))
            .unwrap();
        assert_eq!(rendered.text, "a");
        assert_eq!(rendered.assistant.len(), 1);
        assert_eq!(rendered.assistant[0], 0..1);
    }

    #[test]
    fn sharegpt_rows_map_onto_roles_and_bad_rows_say_where() {
        let row: Row = serde_json::from_str(
            r#"{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}"#,
        )
        .unwrap();
        let messages = messages_of(&row, "chat.jsonl line 1").unwrap();
        let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant"]);
        let bad: Row =
            serde_json::from_str(r#"{"messages": [{"role": "robot", "content": "x"}]}"#).unwrap();
        assert_eq!(
            messages_of(&bad, "chat.jsonl line 7").unwrap_err().to_string(),
            "chat.jsonl line 7: messages[0].role is \"robot\"; expected one of system, user, assistant"
        );
        let missing: Row = serde_json::from_str(r#"{"messages": [{"role": "user"}]}"#).unwrap();
        assert_eq!(
            messages_of(&missing, "at").unwrap_err().to_string(),
            "at: messages[0] has no `content`"
        );
    }
}
