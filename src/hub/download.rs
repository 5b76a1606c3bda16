//! Downloads into the Hugging Face cache layout shared with the official client:
//! `{cache}/models--owner--name/refs/{revision}` holds the commit hash,
//! `blobs/{etag}` the file contents (named by git sha1, or sha256 for LFS files) and
//! `snapshots/{commit}/{path}` relative symlinks to the blobs.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use super::http::{self, encode_component, encode_path, HubHttpError};
use super::{validate_repo_id, HubConfig, RepoType};

/// Files worth having next to the weights when present.
const MODEL_EXTRA_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

/// A model directory for `spec`: an existing local directory as is, otherwise a Hub repo id
/// downloaded (config, weights, tokenizer files) into the cache configured by the environment.
/// `revision` is a branch, tag or commit (default `main`).
pub fn resolve_model(spec: &str, revision: Option<&str>) -> Result<PathBuf> {
    resolve_model_with(&HubConfig::from_env(), spec, revision)
}

/// [`resolve_model`] with an explicit configuration.
pub fn resolve_model_with(
    config: &HubConfig,
    spec: &str,
    revision: Option<&str>,
) -> Result<PathBuf> {
    let local = Path::new(spec);
    if local.is_dir() {
        if let Some(rev) = revision {
            tracing::warn!("{spec} is a local directory; revision {rev} is ignored");
        }
        return Ok(local.to_path_buf());
    }
    validate_repo_id(spec).with_context(|| {
        format!("model `{spec}` is neither an existing directory nor a Hub repo id")
    })?;
    let repo = CachedRepo::new(config, RepoType::Model, spec, revision.unwrap_or("main"))?;
    if config.offline {
        return cached_model(&repo);
    }
    let (commit, files) = match repo.remote_commit() {
        Ok(found) => found,
        // Like the official client: when the Hub cannot be reached at all, a complete cached
        // snapshot of the revision will do.
        Err(e) if is_unreachable(&e) => match cached_model(&repo) {
            Ok(dir) => {
                tracing::warn!("{e:#}; using the cached snapshot {}", dir.display());
                return Ok(dir);
            }
            Err(_) => return Err(e),
        },
        Err(e) => return Err(e),
    };
    for path in model_files_to_fetch(&repo, &commit, &files)? {
        repo.fetch(&commit, &path)?;
    }
    Ok(repo.snapshot_dir(&commit))
}

/// A tokenizer directory for `spec`: a local directory as is, otherwise only the tokenizer files
/// of a Hub model repo (not its weights), downloaded into the cache.
pub fn resolve_tokenizer(spec: &str, revision: Option<&str>) -> Result<PathBuf> {
    resolve_without_weights(spec, revision, "tokenizer", &MODEL_EXTRA_FILES[1..])
}

/// What `kiln recipe check` needs of a Hub model, without its weights: `config.json` and the
/// tokenizer files, downloaded into the cache (a local directory as is).
pub fn resolve_model_metadata(spec: &str, revision: Option<&str>) -> Result<PathBuf> {
    let mut wanted = vec!["config.json"];
    wanted.extend(&MODEL_EXTRA_FILES[1..]);
    resolve_without_weights(spec, revision, "model", &wanted)
}

/// The files of `wanted` that a Hub model repo has (the tokenizer's at least), fetched into the
/// cache, or the cached snapshot where the Hub cannot be reached; `what` names `spec` in errors.
fn resolve_without_weights(
    spec: &str,
    revision: Option<&str>,
    what: &str,
    wanted: &[&str],
) -> Result<PathBuf> {
    let config = HubConfig::from_env();
    let local = Path::new(spec);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    validate_repo_id(spec).with_context(|| {
        format!("{what} `{spec}` is neither an existing directory nor a Hub repo id")
    })?;
    let repo = CachedRepo::new(&config, RepoType::Model, spec, revision.unwrap_or("main"))?;
    let complete = |dir: &Path| {
        wanted
            .iter()
            .filter(|f| !MODEL_EXTRA_FILES.contains(f))
            .all(|f| dir.join(f).is_file())
            && (dir.join("tokenizer.json").is_file()
                || (dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file()))
    };
    let cached = || -> Result<PathBuf> {
        let dir = repo.snapshot_dir(&repo.cached_commit()?);
        if !complete(&dir) {
            bail!(
                "{} has no {what} files in the cache at {} (the Hub is needed to fetch them)",
                repo.describe(),
                dir.display()
            );
        }
        Ok(dir)
    };
    if config.offline {
        return cached();
    }
    let (commit, files) = match repo.remote_commit() {
        Ok(found) => found,
        Err(e) if is_unreachable(&e) => return cached().map_err(|c| e.context(c)),
        Err(e) => return Err(e),
    };
    let present: Vec<&String> = files
        .iter()
        .filter(|f| wanted.contains(&f.as_str()))
        .collect();
    for path in &present {
        repo.fetch(&commit, path)?;
    }
    let dir = repo.snapshot_dir(&commit);
    if !complete(&dir) {
        let required: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|f| !MODEL_EXTRA_FILES.contains(f))
            .chain(["tokenizer.json (or vocab.json + merges.txt)"])
            .collect();
        bail!(
            "Hub repo {} (revision {}) lacks what a {what} needs ({}); its files: {}",
            repo.id,
            repo.revision,
            required.join(", "),
            files.join(", ")
        );
    }
    Ok(dir)
}

/// The cached snapshot of a model, complete (config, weights, every shard) or an error naming
/// what is missing and where.
fn cached_model(repo: &CachedRepo) -> Result<PathBuf> {
    let commit = repo.cached_commit()?;
    let dir = repo.snapshot_dir(&commit);
    let missing = missing_model_files(&dir)?;
    if !missing.is_empty() {
        bail!(
            "{} is incomplete in the cache at {}: missing {} (the Hub is needed to complete it)",
            repo.describe(),
            dir.display(),
            missing.join(", ")
        );
    }
    Ok(dir)
}

/// No answer from the Hub at all (as opposed to an answer saying no).
fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<HubHttpError>())
        .any(|h| h.status.is_none())
}

/// Which files make a loadable model, given the repo's file list; shard names come from the
/// index, which is fetched for that.
fn model_files_to_fetch(repo: &CachedRepo, commit: &str, files: &[String]) -> Result<Vec<String>> {
    let has = |name: &str| files.iter().any(|f| f == name);
    if !has("config.json") {
        bail!(
            "Hub repo {} (revision {}) has no config.json, so it is not a transformers model; its files: {}",
            repo.id,
            repo.revision,
            files.join(", ")
        );
    }
    let mut wanted = vec!["config.json".to_string()];
    let weight_choices = [
        ("model.safetensors", false),
        ("model.safetensors.index.json", true),
        ("pytorch_model.bin", false),
        ("pytorch_model.bin.index.json", true),
    ];
    let Some(&(weights, is_index)) = weight_choices.iter().find(|(name, _)| has(name)) else {
        bail!(
            "Hub repo {} (revision {}) has no model.safetensors, pytorch_model.bin or a sharded index of them; its files: {}",
            repo.id,
            repo.revision,
            files.join(", ")
        );
    };
    wanted.push(weights.to_string());
    if is_index {
        let index = repo.fetch(commit, weights)?;
        wanted.extend(index_shards(&index)?);
    }
    wanted.extend(
        MODEL_EXTRA_FILES
            .iter()
            .filter(|f| has(f))
            .map(|f| f.to_string()),
    );
    Ok(wanted)
}

/// The distinct shard files named by a `*.index.json` weight map.
fn index_shards(index: &Path) -> Result<Vec<String>> {
    let text = fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| anyhow!("{}: no `weight_map` object", index.display()))?;
    let mut shards = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            anyhow!(
                "{}: weight_map[{tensor}] is not a file name",
                index.display()
            )
        })?;
        if file.contains("..") || file.starts_with('/') {
            bail!("{}: shard name `{file}` leaves the repo", index.display());
        }
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
    }
    shards.sort();
    Ok(shards)
}

/// Files a cached model snapshot lacks (config, weights, index shards).
fn missing_model_files(dir: &Path) -> Result<Vec<String>> {
    if !dir.join("config.json").is_file() {
        return Ok(vec!["config.json".into()]);
    }
    for weights in ["model.safetensors", "pytorch_model.bin"] {
        if dir.join(weights).is_file() {
            return Ok(vec![]);
        }
        let index = format!("{weights}.index.json");
        if dir.join(&index).is_file() {
            return Ok(index_shards(&dir.join(&index))?
                .into_iter()
                .filter(|s| !dir.join(s).is_file())
                .collect());
        }
    }
    Ok(vec![
        "model.safetensors (or pytorch_model.bin, or a sharded index)".into(),
    ])
}

/// One file of a dataset repo (`path` inside the repo), downloaded into the cache if needed.
pub fn resolve_dataset_file(
    config: &HubConfig,
    repo: &str,
    revision: Option<&str>,
    path: &str,
) -> Result<PathBuf> {
    let repo = CachedRepo::new(config, RepoType::Dataset, repo, revision.unwrap_or("main"))?;
    let commit = if config.offline {
        repo.cached_commit()?
    } else {
        repo.remote_commit()?.0
    };
    repo.fetch(&commit, path)
}

/// Paths of the files under `prefix` (a folder inside the repo, `""` for all) of a dataset repo,
/// sorted. Offline, the files present in the cached snapshot are listed.
/// For example `nyu-mll/glue`, prefix `mnli`, lists the MNLI parquet files of every split.
pub fn list_dataset_files(
    config: &HubConfig,
    repo: &str,
    revision: Option<&str>,
    prefix: &str,
) -> Result<Vec<String>> {
    let repo = CachedRepo::new(config, RepoType::Dataset, repo, revision.unwrap_or("main"))?;
    let prefix = prefix.trim_matches('/');
    if config.offline {
        let commit = repo.cached_commit()?;
        let root = repo.snapshot_dir(&commit);
        let mut files = Vec::new();
        collect_files(&root, &root.join(prefix), &mut files)?;
        files.sort();
        return Ok(files);
    }
    let (commit, _) = repo.remote_commit()?;
    repo.list_tree(&commit, prefix)
}

/// The parquet files of one split of one config (subset) of a dataset repo, downloaded and sorted
/// by shard: the layout the Hub's parquet conversion uses, `{subset}/{split}-00000-of-00001.parquet`.
/// For example `nyu-mll/glue`, subset `mnli`, split `validation_mismatched`.
pub fn resolve_parquet_split(
    config: &HubConfig,
    repo: &str,
    revision: Option<&str>,
    subset: &str,
    split: &str,
) -> Result<Vec<PathBuf>> {
    let files = list_dataset_files(config, repo, revision, subset)?;
    let parquet: Vec<&String> = files.iter().filter(|f| f.ends_with(".parquet")).collect();
    let shards: Vec<&String> = parquet
        .iter()
        .copied()
        .filter(|f| {
            let name = f.rsplit('/').next().unwrap_or(f);
            name == format!("{split}.parquet") || name.starts_with(&format!("{split}-"))
        })
        .collect();
    if shards.is_empty() {
        let mut splits: Vec<&str> = parquet
            .iter()
            .map(|f| {
                let name = f.rsplit('/').next().unwrap_or(f);
                name.split_once('-')
                    .map(|(s, _)| s)
                    .unwrap_or(name.trim_end_matches(".parquet"))
            })
            .collect();
        splits.dedup();
        bail!(
            "dataset {repo} (revision {}) has no parquet files for split `{split}` under `{subset}/`; splits there: {}",
            revision.unwrap_or("main"),
            if splits.is_empty() { "none".to_string() } else { splits.join(", ") }
        );
    }
    shards
        .into_iter()
        .map(|f| resolve_dataset_file(config, repo, revision, f))
        .collect()
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

/// A repo at a revision, as seen through the cache.
struct CachedRepo<'a> {
    config: &'a HubConfig,
    agent: ureq::Agent,
    kind: RepoType,
    id: &'a str,
    revision: &'a str,
    dir: PathBuf,
}

impl<'a> CachedRepo<'a> {
    fn new(config: &'a HubConfig, kind: RepoType, id: &'a str, revision: &'a str) -> Result<Self> {
        validate_repo_id(id)?;
        // The revision names a file under refs/: it must not climb out of the cache.
        if revision.is_empty()
            || revision.starts_with('/')
            || revision
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            bail!("`{revision}` is not a revision (a branch, tag or commit of {id})");
        }
        let dir = config
            .cache_dir
            .join(format!("{}s--{}", kind.name(), id.replace('/', "--")));
        Ok(CachedRepo {
            config,
            agent: http::agent(),
            kind,
            id,
            revision,
            dir,
        })
    }

    fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    fn describe(&self) -> String {
        format!(
            "{} {} (revision {})",
            self.kind.name(),
            self.id,
            self.revision
        )
    }

    /// The commit the cache associates with the revision, without touching the network.
    fn cached_commit(&self) -> Result<String> {
        let reason = if self.config.offline {
            "HF_HUB_OFFLINE is set and"
        } else {
            "the Hub cannot be reached and"
        };
        if is_commit_hash(self.revision) && self.snapshot_dir(self.revision).is_dir() {
            return Ok(self.revision.to_string());
        }
        let ref_path = self.dir.join("refs").join(self.revision);
        let commit = fs::read_to_string(&ref_path)
            .ok()
            .map(|c| c.trim().to_string());
        match commit {
            Some(c) if is_commit_hash(&c) && self.snapshot_dir(&c).is_dir() => Ok(c),
            _ => bail!(
                "{reason} {} is not in the cache at {} (looked for {}); \
                 download it once with network access or unset HF_HUB_OFFLINE",
                self.describe(),
                self.config.cache_dir.display(),
                ref_path.display()
            ),
        }
    }

    /// Asks the Hub which commit the revision points at, and which files that commit has;
    /// records the revision → commit mapping in `refs/`.
    fn remote_commit(&self) -> Result<(String, Vec<String>)> {
        let url = format!(
            "{}/api/{}/{}/revision/{}",
            self.config.endpoint,
            self.kind.api_plural(),
            self.id,
            encode_component(self.revision)
        );
        let info = http::with_retries(&self.config.retry, "revision lookup", || {
            let mut request = self.agent.get(&url);
            if let Some(auth) = http::bearer(self.config) {
                request = request.header("Authorization", auth);
            }
            let response = http::check("GET", &url, request.call())?;
            http::read_json("GET", &url, response)
        })
        .map_err(|e| self.not_found_hint(e))?;
        let commit = info
            .get("sha")
            .and_then(|s| s.as_str())
            .filter(|s| is_commit_hash(s))
            .ok_or_else(|| anyhow!("GET {url}: the response has no commit `sha`"))?
            .to_string();
        let files = info
            .get("siblings")
            .and_then(|s| s.as_array())
            .map(|s| {
                s.iter()
                    .filter_map(|f| f.get("rfilename").and_then(|n| n.as_str()))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        if commit != self.revision {
            let ref_path = self.dir.join("refs").join(self.revision);
            crate::atomic_file::write(&ref_path, commit.as_bytes())?;
        }
        Ok((commit, files))
    }

    fn not_found_hint(&self, e: HubHttpError) -> anyhow::Error {
        let hint = match e.status {
            Some(401) | Some(404) if self.config.token.is_none() => {
                " (if the repo is private or gated, set HF_TOKEN)"
            }
            Some(404) => " (check the repo id and revision)",
            _ => "",
        };
        let context = format!("{}{hint}", self.describe());
        anyhow::Error::new(e).context(context)
    }

    fn list_tree(&self, commit: &str, prefix: &str) -> Result<Vec<String>> {
        let folder = if prefix.is_empty() {
            String::new()
        } else {
            format!("/{}", encode_path(prefix))
        };
        let mut url = format!(
            "{}/api/{}/{}/tree/{commit}{folder}?recursive=true",
            self.config.endpoint,
            self.kind.api_plural(),
            self.id,
        );
        let mut files = Vec::new();
        // The tree API pages its answer; `Link: <...>; rel="next"` points at the next page.
        for _page in 0..10_000 {
            let (entries, next) = http::with_retries(&self.config.retry, "tree listing", || {
                let mut request = self.agent.get(&url);
                if let Some(auth) = http::bearer(self.config) {
                    request = request.header("Authorization", auth);
                }
                let response = http::check("GET", &url, request.call())?;
                let next = response
                    .headers()
                    .get("link")
                    .and_then(|v| v.to_str().ok())
                    .and_then(next_link);
                Ok((http::read_json("GET", &url, response)?, next))
            })
            .map_err(|e| self.not_found_hint(e))?;
            let entries = entries
                .as_array()
                .ok_or_else(|| anyhow!("GET {url}: expected a JSON array of tree entries"))?;
            for entry in entries {
                if entry.get("type").and_then(|t| t.as_str()) == Some("file") {
                    if let Some(path) = entry.get("path").and_then(|p| p.as_str()) {
                        files.push(path.to_string());
                    }
                }
            }
            match next {
                Some(next) => url = http::resolve_location(&url, &next),
                None => {
                    files.sort();
                    return Ok(files);
                }
            }
        }
        bail!("GET {url}: the tree listing did not end after 10000 pages")
    }

    /// `path` of `commit` in the snapshot, downloaded unless already there.
    fn fetch(&self, commit: &str, path: &str) -> Result<PathBuf> {
        if path.split('/').any(|p| p.is_empty() || p == "..") {
            bail!("`{path}` is not a file path inside a repo");
        }
        let target = self.snapshot_dir(commit).join(path);
        if target.is_file() {
            return Ok(target);
        }
        if self.config.offline {
            bail!(
                "HF_HUB_OFFLINE is set and {path} of {} is not in the cache at {}",
                self.describe(),
                self.snapshot_dir(commit).display()
            );
        }
        let url = format!(
            "{}/{}{}/resolve/{commit}/{}",
            self.config.endpoint,
            self.kind.url_prefix(),
            self.id,
            encode_path(path)
        );
        let meta = self
            .file_metadata(&url)
            .map_err(|e| anyhow!("{}: {path}: {e}", self.describe()))?;
        let blob = self.dir.join("blobs").join(&meta.etag);
        let _lock = self.lock_blob(&meta.etag)?;
        // Another process may have completed the blob while this one waited for the lock.
        if !blob.is_file() {
            self.download_blob(&meta, &blob, path)?;
        }
        link_snapshot(&blob, &target)?;
        Ok(target)
    }

    /// Holds `{cache}/.locks/{repo folder}/{etag}.lock` until dropped, as huggingface_hub does:
    /// processes sharing a cache (every rank of a job on a cold cache) then write each blob's
    /// `.incomplete` file one at a time, and the later ones find the blob complete.
    fn lock_blob(&self, etag: &str) -> Result<File> {
        let repo_folder = self.dir.file_name().expect("a repo folder has a name");
        let locks = self.config.cache_dir.join(".locks").join(repo_folder);
        fs::create_dir_all(&locks).with_context(|| format!("creating {}", locks.display()))?;
        let path = locks.join(format!("{etag}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening the lock {}", path.display()))?;
        file.lock()
            .with_context(|| format!("locking {}", path.display()))?;
        Ok(file)
    }

    /// What a HEAD of the resolve URL says: the blob name, the size, and where the bytes are.
    fn file_metadata(&self, url: &str) -> Result<FileMetadata, HubHttpError> {
        let mut current = url.to_string();
        // The Hub answers a renamed repo with a relative redirect to its new name, and an LFS
        // file with a redirect to storage; only the former is followed here.
        for _ in 0..5 {
            // An absolute Location may name another host: the token goes to the Hub only.
            let to_hub = http::origin(&current) == http::origin(&self.config.endpoint);
            let response = http::with_retries(&self.config.retry, "file metadata", || {
                let mut request = self.agent.head(&current);
                if let Some(auth) = http::bearer(self.config).filter(|_| to_hub) {
                    request = request.header("Authorization", auth);
                }
                http::check("HEAD", &current, request.call())
            })?;
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let status = response.status().as_u16();
            let linked_etag = header("x-linked-etag");
            let location = header("location");
            if (300..400).contains(&status) && linked_etag.is_none() {
                let Some(location) = location else { break };
                current = http::resolve_location(&current, &location);
                continue;
            }
            let etag = linked_etag
                .or_else(|| header("etag"))
                .map(|e| clean_etag(&e));
            let etag = etag.filter(|e| !e.is_empty() && !e.contains(['/', '\\']));
            let Some(etag) = etag else {
                return Err(HubHttpError {
                    method: "HEAD".into(),
                    url: current,
                    status: Some(status),
                    message: "the response has no ETag, so the file cannot be cached".into(),
                });
            };
            let size = header("x-linked-size")
                .or_else(|| header("content-length"))
                .and_then(|s| s.parse().ok());
            let download_url = match location {
                Some(l) if (300..400).contains(&status) => http::resolve_location(&current, &l),
                _ => current.clone(),
            };
            return Ok(FileMetadata {
                etag,
                size,
                download_url,
            });
        }
        Err(HubHttpError {
            method: "HEAD".into(),
            url: url.to_string(),
            status: None,
            message: "too many redirects".into(),
        })
    }

    /// Streams the file into `blobs/{etag}.incomplete` (resuming a previous partial download with
    /// a Range request), checks its size and, for LFS files, its sha256, then renames it.
    fn download_blob(&self, meta: &FileMetadata, blob: &Path, path: &str) -> Result<()> {
        let partial = blob.with_extension("incomplete");
        fs::create_dir_all(blob.parent().expect("blob has a parent"))?;
        let same_origin = http::origin(&meta.download_url) == http::origin(&self.config.endpoint);
        let progress = super::progress_bar(
            self.config,
            meta.size.unwrap_or(0),
            &format!("downloading {path}"),
        );
        http::with_retries(&self.config.retry, "download", || {
            let mut have = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            if meta.size.is_some_and(|size| have >= size) {
                // Nothing left to ask for: a range request would be refused.
                fs::remove_file(&partial).ok();
                have = 0;
            }
            let mut request = self.agent.get(&meta.download_url);
            if same_origin {
                if let Some(auth) = http::bearer(self.config) {
                    request = request.header("Authorization", auth);
                }
            }
            if have > 0 {
                request = request.header("Range", format!("bytes={have}-"));
            }
            let response = http::check("GET", &meta.download_url, request.call())?;
            let resumed = response.status().as_u16() == 206;
            let io_error = |e: std::io::Error| HubHttpError {
                method: "GET".into(),
                url: meta.download_url.clone(),
                status: None,
                message: format!("download interrupted: {e}"),
            };
            let mut file = OpenOptions::new()
                .create(true)
                .write(true)
                .append(resumed)
                .truncate(!resumed)
                .open(&partial)
                .map_err(io_error)?;
            progress.set_position(if resumed { have } else { 0 });
            let mut reader = response.into_body().into_reader();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = reader.read(&mut buf).map_err(io_error)?;
                if n == 0 {
                    break;
                }
                file.write_all(&buf[..n]).map_err(io_error)?;
                progress.inc(n as u64);
            }
            file.sync_all().map_err(io_error)
        })
        .map_err(|e| anyhow!("{}: {path}: {e}", self.describe()))?;
        progress.finish_and_clear();
        let size = fs::metadata(&partial)?.len();
        if let Some(expected) = meta.size.filter(|&s| s != size) {
            fs::remove_file(&partial).ok();
            bail!(
                "{}: {path}: downloaded {size} bytes, the Hub announced {expected}",
                self.describe()
            );
        }
        if meta.etag.len() == 64 && meta.etag.bytes().all(|b| b.is_ascii_hexdigit()) {
            let actual = sha256_file(&partial)?;
            if actual != meta.etag.to_ascii_lowercase() {
                fs::remove_file(&partial).ok();
                bail!(
                    "{}: {path}: sha256 of the download is {actual}, the Hub announced {}",
                    self.describe(),
                    meta.etag
                );
            }
        }
        fs::rename(&partial, blob)
            .with_context(|| format!("moving the download into {}", blob.display()))?;
        Ok(())
    }
}

struct FileMetadata {
    etag: String,
    size: Option<u64>,
    download_url: String,
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `W/"abc"` → `abc`.
fn clean_etag(etag: &str) -> String {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// The URL of a `Link` header's `rel="next"` entry.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"")
            .then(|| {
                url.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
    })
}

pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Points `target` (in a snapshot) at `blob` with a relative symlink, as the official client does,
/// so the cache can be moved as a whole.
fn link_snapshot(blob: &Path, target: &Path) -> Result<()> {
    let dir = target.parent().expect("snapshot files have a parent");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let relative = relative_path(dir, blob);
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        target.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    fs::remove_file(&tmp).ok();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&relative, &tmp)
        .with_context(|| format!("linking {}", target.display()))?;
    #[cfg(not(unix))]
    fs::copy(blob, &tmp).with_context(|| format!("copying into {}", target.display()))?;
    fs::rename(&tmp, target).with_context(|| format!("linking {}", target.display()))?;
    Ok(())
}

fn relative_path(from_dir: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from_dir.components().collect();
    let to_parts: Vec<_> = to.components().collect();
    let common = from
        .iter()
        .zip(&to_parts)
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for part in &to_parts[common..] {
        out.push(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(clean_etag("W/\"abc\""), "abc");
        assert_eq!(
            next_link(r#"<https://h/api/x?cursor=2>; rel="next""#).unwrap(),
            "https://h/api/x?cursor=2"
        );
        assert!(next_link(r#"<https://h/a>; rel="prev""#).is_none());
        assert_eq!(
            relative_path(
                Path::new("/c/m/snapshots/abc/sub"),
                Path::new("/c/m/blobs/e")
            ),
            PathBuf::from("../../../blobs/e")
        );
    }
}
