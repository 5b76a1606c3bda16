//! `kiln merge`: a LoRA adapter merged into its base model, written as a HF model directory.

use super::*;

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The base model's Hugging Face directory.
    #[arg(long)]
    pub base: PathBuf,
    /// The PEFT LoRA adapter directory (a Kiln LoRA checkpoint, or PEFT's save_pretrained).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where the merged model directory goes (created; must not hold a model already).
    #[arg(long)]
    pub out: PathBuf,
}

pub(super) fn merge(args: MergeArgs) -> Result<()> {
    anyhow::ensure!(
        !args.out.join("config.json").exists(),
        "--out {}: already holds a model (config.json); choose an empty directory",
        args.out.display()
    );
    let files = model::merge_adapter(&args.base, &args.adapter, &args.out)?;
    println!(
        "merged {} into {}: wrote {} to {}",
        args.adapter.display(),
        args.base.display(),
        files.join(", "),
        args.out.display()
    );
    Ok(())
}
