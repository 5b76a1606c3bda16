//! `kiln init`: a randomly initialised model (GPT-J, GPT-2 or GPT-NeoX) as a Hugging Face model
//! directory.

use super::*;

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Model shape.
    #[arg(long, value_enum)]
    pub preset: Preset,
    /// Output directory (created; existing model files in it are overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokenizer directory to copy into the model (tokenizer.json, or vocab.json + merges.txt).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Override the preset's vocabulary size (embedding rows).
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// dtype of the written weights.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// Largest shard in bytes before the weights are split with an index (HF's default: 5 GB).
    #[arg(long, default_value_t = model::DEFAULT_MAX_SHARD_BYTES)]
    pub max_shard_bytes: usize,
}

pub(super) fn init(args: InitArgs) -> Result<()> {
    let dtype = model::parse_dtype(&args.dtype)?;
    let mut config = args.preset.config();
    if let Some(vocab_size) = args.vocab_size {
        config.set_vocab_size(vocab_size);
    }
    let tokenizer = args
        .tokenizer
        .as_deref()
        .map(TextTokenizer::from_dir)
        .transpose()?;
    if let Some(tok) = &tokenizer {
        tok.check_fits(config.vocab_size(), &args.out)?;
        config.set_eos_and_bos(tok.eos_id());
    }
    let mut files = model::init::write_random_model(
        &args.out,
        &config,
        args.seed,
        dtype,
        args.max_shard_bytes,
    )?;
    if let Some(tok) = &tokenizer {
        files.extend(tok.save_to(&args.out)?);
    }
    println!(
        "wrote {} ({:?} preset, seed {}, {} parameters): {}",
        args.out.display(),
        args.preset,
        args.seed,
        parameter_count(&config),
        files.join(", ")
    );
    Ok(())
}

pub(super) fn parameter_count(config: &model::Config) -> usize {
    model::parameter_shapes(config)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}
