//! `kiln generate`: continue prompts (greedy or sampling, HF semantics).

use super::*;
use crate::data::chat::{Chat, ChatTemplate, Message};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Hugging Face model directory, or a Hub model id `owner/name[@revision]` (downloaded into
    /// the HF cache).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory (a Kiln LoRA checkpoint, or PEFT's save_pretrained),
    /// merged into the model's weights as they load.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// One prompt; its completion is printed (streamed when stdout is a terminal). With
    /// `--chat`, the user's message.
    #[arg(long, conflicts_with = "input", required_unless_present = "input")]
    pub prompt: Option<String>,
    /// JSON lines, each {"prompt": "..."} or {"ids": [...]}; with `--chat`, each
    /// {"messages": [{"role", "content"}, ...]}.
    #[arg(long, requires = "output")]
    pub input: Option<PathBuf>,
    /// Conversations: the messages rendered with the model's chat template and its prompt for
    /// the assistant's turn, generation ending at the template's end-of-turn token.
    #[arg(long)]
    pub chat: bool,
    /// With `--chat --prompt`: a system message before the user's.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// JSON lines written here: prompt, completion, ids, finish_reason.
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    pub max_new_tokens: usize,
    #[arg(long)]
    pub max_length: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub min_length: usize,
    #[arg(long, default_value_t = 0)]
    pub min_new_tokens: usize,
    /// Sample instead of greedy decoding.
    #[arg(long)]
    pub do_sample: bool,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the completion contains this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep the last tokens of prompts longer than the model's context instead of failing.
    #[arg(long)]
    pub truncate_left: bool,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[command(flatten)]
    pub quantize: super::QuantizeArgs,
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub(super) fn generate(mut args: GenerateArgs) -> Result<()> {
    use crate::generate::{generate, GenerationParams};
    use std::io::{IsTerminal, Write};
    args.model = model_dir(&args.model)?;
    let dtype = model::parse_dtype(&args.dtype)?;
    let device = ops::parse_device(&args.device)?;
    let model = model::load_model_quantized(
        &args.model,
        args.adapter.as_deref(),
        dtype,
        &device,
        args.quantize.quantization()?,
    )?;
    let tokenizer = adapter_or_model_tokenizer(
        &args.model,
        args.adapter.as_deref(),
        model.config().vocab_size(),
    )?;
    let params = GenerationParams {
        max_new_tokens: args.max_new_tokens,
        max_length: args.max_length,
        min_length: args.min_length,
        min_new_tokens: args.min_new_tokens,
        do_sample: args.do_sample,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        stop: args.stop,
        truncate_left: args.truncate_left,
        stop_token_ids: Vec::new(),
    };
    params.validate()?;
    let mut params = params;
    let chat = match args.chat {
        true => {
            let tokenizer = tokenizer.as_ref().with_context(|| {
                format!(
                    "{}: --chat needs the model's tokenizer",
                    args.model.display()
                )
            })?;
            let chat = Chat::of(tokenizer).with_context(|| args.model.display().to_string())?;
            params.stop_token_ids.extend(chat.stop_token_ids);
            Some(chat.template)
        }
        false => None,
    };
    let need_tokenizer = || {
        tokenizer.as_ref().with_context(|| {
            format!(
                "{}: text prompts need a tokenizer in the model directory",
                args.model.display()
            )
        })
    };
    if let Some(prompt) = &args.prompt {
        let text = match &chat {
            Some(template) => {
                let mut messages = Vec::new();
                if let Some(system) = &args.system {
                    messages.push(Message {
                        role: "system".into(),
                        content: system.clone(),
                    });
                }
                messages.push(Message {
                    role: "user".into(),
                    content: prompt.clone(),
                });
                template.render(&messages, true)?
            }
            None => prompt.clone(),
        };
        let ids = need_tokenizer()?.encode(&text)?;
        let streaming = std::io::stdout().is_terminal();
        let tok = need_tokenizer()?;
        let mut so_far: Vec<u32> = Vec::new();
        let mut printed = 0usize;
        let mut stdout = std::io::stdout();
        let out = generate(&model, Some(tok), &[ids], &params, &mut |_, token| {
            if streaming {
                so_far.push(token);
                // Decode the whole completion each time: a multi-byte character can span tokens.
                if let Ok(text) = tok.decode(&so_far, true) {
                    if text.len() > printed && text.is_char_boundary(printed) {
                        let _ = write!(stdout, "{}", &text[printed..]);
                        let _ = stdout.flush();
                        printed = text.len();
                    }
                }
            }
        })?;
        if streaming {
            println!();
        } else {
            println!("{}", out[0].text);
        }
        return Ok(());
    }
    let input = args
        .input
        .as_ref()
        .expect("clap requires --input without --prompt");
    let output = args
        .output
        .as_ref()
        .expect("clap requires --output with --input");
    let prompts = read_prompts(input, tokenizer.as_ref(), chat.as_ref())?;
    let mut rows = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(args.batch_size.max(1)) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|(_, ids)| ids.clone()).collect();
        let generated = generate(&model, tokenizer.as_ref(), &ids, &params, &mut |_, _| {})?;
        for ((prompt, _), g) in chunk.iter().zip(generated) {
            let mut row = serde_json::json!({
                "prompt": prompt["prompt"],
                "completion": g.text,
                "ids": g.ids,
                "finish_reason": g.finish_reason,
            });
            if chat.is_some() {
                row["messages"] = prompt["messages"].clone();
                row.as_object_mut().expect("an object").remove("prompt");
            }
            rows.push(row);
        }
    }
    crate::eval::score::write_jsonl(output, &rows)?;
    println!(
        "generated {} completions -> {}",
        rows.len(),
        output.display()
    );
    Ok(())
}

/// Prompt lines `{"prompt": ...}` or `{"ids": [...]}` (with a chat template, `{"messages":
/// [...]}`), with errors naming the line.
fn read_prompts(
    path: &Path,
    tokenizer: Option<&TextTokenizer>,
    chat: Option<&ChatTemplate>,
) -> Result<Vec<(serde_json::Value, Vec<u32>)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the prompts", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let value: serde_json::Value = serde_json::from_str(line).with_context(|| {
            format!(
                "{}: expected {{\"prompt\": \"...\"}} or {{\"ids\": [...]}}",
                at()
            )
        })?;
        if let (Some(template), Some(tokenizer)) = (chat, tokenizer) {
            let row = value.as_object().cloned().unwrap_or_default();
            let messages = crate::data::chat::messages_of(&row, &at())?;
            let text = template.render(&messages, true).with_context(at)?;
            prompts.push((value, tokenizer.encode(&text)?));
            continue;
        }
        let ids = match (&value["prompt"], &value["ids"]) {
            (serde_json::Value::String(p), serde_json::Value::Null) => tokenizer
                .with_context(|| {
                    format!(
                        "{}: a text prompt needs a tokenizer in the model directory",
                        at()
                    )
                })?
                .encode(p)?,
            (serde_json::Value::Null, serde_json::Value::Array(ids)) => ids
                .iter()
                .map(|v| v.as_u64().map(|id| id as u32))
                .collect::<Option<Vec<u32>>>()
                .with_context(|| format!("{}: \"ids\" must be a list of token ids", at()))?,
            _ => anyhow::bail!(
                "{}: give exactly one of \"prompt\" (text) and \"ids\"",
                at()
            ),
        };
        prompts.push((value, ids));
    }
    Ok(prompts)
}
