//! `kiln download`: a Hub model or dataset into the Hugging Face cache, for offline use.

use super::*;

#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// `owner/name`, or `owner/name@revision` (a branch, tag or commit).
    pub repo: String,
    /// A dataset repo (default: a model: its config, weights and tokenizer files).
    #[arg(long)]
    pub dataset: bool,
    /// With --dataset: only the files under this folder of the repo (a subset, e.g. `mnli`).
    #[arg(long, requires = "dataset")]
    pub subset: Option<String>,
}

pub(super) fn download(args: DownloadArgs) -> Result<()> {
    let (repo, revision) = hub_spec(&args.repo);
    crate::hub::validate_repo_id(repo)
        .with_context(|| format!("{}: expected owner/name[@revision]", args.repo))?;
    if !args.dataset {
        let dir = crate::hub::resolve_model(repo, revision)?;
        println!("{}", dir.display());
        return Ok(());
    }
    let config = crate::hub::HubConfig::from_env();
    let prefix = args.subset.as_deref().unwrap_or("");
    let files = crate::hub::list_dataset_files(&config, repo, revision, prefix)?;
    anyhow::ensure!(
        !files.is_empty(),
        "dataset {repo}: no files under {:?}",
        if prefix.is_empty() { "/" } else { prefix }
    );
    let mut snapshot = None;
    for file in &files {
        let path = crate::hub::resolve_dataset_file(&config, repo, revision, file)?;
        // The snapshot directory: the file's path with its repo path taken off.
        snapshot = path
            .ancestors()
            .nth(Path::new(file).components().count())
            .map(Path::to_path_buf);
    }
    println!(
        "{} ({} files)",
        snapshot.unwrap_or_default().display(),
        files.len()
    );
    Ok(())
}
