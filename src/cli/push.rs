//! `kiln push`: upload a model directory to the Hugging Face Hub.

use super::*;

#[derive(Debug, Args)]
pub struct PushArgs {
    /// Directory to upload; it is only read.
    pub checkpoint_dir: PathBuf,
    /// Target repo, `owner/name`; created if it does not exist.
    #[arg(long)]
    pub repo: String,
    /// Branch to commit to.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Create the repo private (an existing repo keeps its visibility).
    #[arg(long)]
    pub private: bool,
    /// Commit message.
    #[arg(long, default_value = "Upload with kiln")]
    pub message: String,
    /// Hub URL; defaults to HF_ENDPOINT, else https://huggingface.co.
    #[arg(long)]
    pub endpoint: Option<String>,
}

pub(super) fn push(args: PushArgs) -> Result<()> {
    let mut config = crate::hub::HubConfig::from_env();
    if let Some(endpoint) = &args.endpoint {
        config.endpoint = endpoint.trim_end_matches('/').to_string();
    }
    let options = crate::hub::PushOptions {
        revision: args.revision,
        private: args.private,
        message: args.message,
        ..crate::hub::PushOptions::new(&args.repo)
    };
    let report = crate::hub::push_folder(&config, &args.checkpoint_dir, &options)?;
    match &report.commit_oid {
        Some(oid) => println!(
            "pushed {} to {}@{}: commit {oid}, {} files ({} LFS objects, {} bytes uploaded), {} unchanged{}",
            args.checkpoint_dir.display(),
            options.repo,
            options.revision,
            report.committed_files.len(),
            report.lfs_objects_uploaded,
            report.lfs_bytes_uploaded,
            report.unchanged_files.len(),
            report.commit_url.as_deref().map(|u| format!(": {u}")).unwrap_or_default()
        ),
        None => println!(
            "{} is already on {}@{}: nothing to commit",
            args.checkpoint_dir.display(),
            options.repo,
            options.revision
        ),
    }
    Ok(())
}
