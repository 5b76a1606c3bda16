//! `kiln score`: per-token log-probabilities of texts or token ids.

use super::*;

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// Hugging Face model directory, or a Hub model id `owner/name[@revision]` (downloaded into
    /// the HF cache).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory (a Kiln LoRA checkpoint, or PEFT's save_pretrained),
    /// merged into the model's weights as they load.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSON lines, each {"text": ...} or {"ids": [...]}.
    #[arg(long)]
    pub input: PathBuf,
    /// JSON lines written here, each {"ids", "logprobs", "total"}, in input order.
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[command(flatten)]
    pub quantize: super::QuantizeArgs,
    /// Compute dtype: fp32, fp16 or bf16.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub(super) fn score(mut args: ScoreArgs) -> Result<()> {
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
    let config = model.config().clone();
    let tokenizer = model_tokenizer(&args.model, config.vocab_size())?;
    let rows = crate::eval::score::read_score_inputs(
        &args.input,
        tokenizer.as_ref(),
        config.vocab_size(),
        config.max_positions(),
    )?;
    let scored = crate::eval::score::score_rows(&model, &rows, None, args.batch_size)
        .context("scoring failed")?;
    crate::eval::score::write_jsonl(&args.output, &scored)?;
    let tokens: usize = scored.iter().map(|r| r.ids.len()).sum();
    let total: f64 = scored.iter().map(|r| r.total as f64).sum();
    let predicted = tokens - scored.len();
    println!(
        "scored {} rows ({tokens} tokens) -> {}; mean log-prob {:.4}, perplexity {:.3}",
        scored.len(),
        args.output.display(),
        total / predicted.max(1) as f64,
        (-total / predicted.max(1) as f64).exp()
    );
    Ok(())
}
