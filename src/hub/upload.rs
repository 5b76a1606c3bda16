//! Pushing a directory to a Hub repo as one commit, the way the official client's `upload_folder`
//! does: create the repo (already existing is fine), ask `preupload` which files go through LFS,
//! upload LFS objects the Hub does not already have (basic or multipart transfer, then `verify`),
//! and post one NDJSON commit. Files whose content the branch already has are left out, and a push
//! that changes nothing makes no commit.
//!
//! Nothing here writes to the pushed directory.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use indicatif::ProgressBar;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::http::{self, encode_component, HubHttpError};
use super::{validate_repo_id, HubConfig, RepoType};

/// The preupload and LFS batch endpoints take at most this many files per call.
const BATCH_FILES: usize = 256;
/// Bytes of each file the Hub inspects to guess whether it is binary.
const SAMPLE_BYTES: usize = 512;

/// What to push where.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// `owner/name`.
    pub repo: String,
    /// Branch to commit to.
    pub revision: String,
    /// Visibility when the push creates the repo; an existing repo keeps its own.
    pub private: bool,
    /// Commit summary.
    pub message: String,
    /// Folder inside the repo the directory's files go to (`""`: the root).
    pub path_in_repo: String,
}

impl PushOptions {
    pub fn new(repo: &str) -> Self {
        PushOptions {
            repo: repo.to_string(),
            revision: "main".into(),
            private: false,
            message: "Upload with kiln".into(),
            path_in_repo: String::new(),
        }
    }
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// None when every file was already on the branch, so no commit was made.
    pub commit_oid: Option<String>,
    pub commit_url: Option<String>,
    /// Files in the commit (added or changed).
    pub committed_files: Vec<String>,
    /// Files left out because the branch already has the same content.
    pub unchanged_files: Vec<String>,
    /// Files left out because the repo's `.gitignore` ignores them.
    pub ignored_files: Vec<String>,
    /// LFS objects whose bytes were sent (the others were already in the Hub's storage).
    pub lfs_objects_uploaded: usize,
    pub lfs_bytes_uploaded: u64,
}

struct LocalFile {
    local: PathBuf,
    path_in_repo: String,
    size: u64,
    sha256: String,
    sample: Vec<u8>,
}

#[derive(PartialEq)]
enum Mode {
    Regular,
    Lfs,
}

/// Pushes every file under `dir` (except `.git` and `.cache/huggingface`) as one commit.
/// Fails before sending anything when no token is configured.
pub fn push_folder(config: &HubConfig, dir: &Path, options: &PushOptions) -> Result<PushReport> {
    let Some(auth) = http::bearer(config) else {
        bail!(
            "pushing to {} needs a Hugging Face token with write access: set HF_TOKEN or log in \
             (the token file is {})",
            options.repo,
            config
                .cache_dir
                .parent()
                .unwrap_or(&config.cache_dir)
                .join("token")
                .display()
        );
    };
    if config.offline {
        bail!(
            "HF_HUB_OFFLINE is set: pushing to {} needs the network",
            options.repo
        );
    }
    validate_repo_id(&options.repo)?;
    if options.message.trim().is_empty() {
        bail!("the commit message is empty");
    }
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let files = scan_folder(dir, options.path_in_repo.trim_matches('/'))?;
    if files.is_empty() {
        bail!("{} has no files to push", dir.display());
    }
    let session = Session {
        config,
        options,
        agent: http::agent(),
        auth,
    };
    let fail = |e: HubHttpError| {
        anyhow::Error::new(e).context(format!("pushing {} to {}", dir.display(), options.repo))
    };
    session.create_repo().map_err(fail)?;
    let plan = session.preupload(&files).map_err(fail)?;

    let mut report = PushReport {
        commit_oid: None,
        commit_url: None,
        committed_files: vec![],
        unchanged_files: vec![],
        ignored_files: vec![],
        lfs_objects_uploaded: 0,
        lfs_bytes_uploaded: 0,
    };
    let mut lines =
        vec![json!({"key": "header", "value": {"summary": options.message, "description": ""}})];
    let mut lfs_pending = Vec::new();
    for (file, (mode, ignore, remote_oid)) in files.iter().zip(&plan) {
        if *ignore {
            report.ignored_files.push(file.path_in_repo.clone());
            continue;
        }
        match mode {
            Mode::Lfs => {
                if remote_oid.as_deref() == Some(file.sha256.as_str()) {
                    report.unchanged_files.push(file.path_in_repo.clone());
                    continue;
                }
                lfs_pending.push(file);
                lines.push(json!({"key": "lfsFile", "value": {
                    "path": file.path_in_repo, "algo": "sha256", "oid": file.sha256, "size": file.size}}));
            }
            Mode::Regular => {
                let content = fs::read(&file.local)
                    .with_context(|| format!("reading {}", file.local.display()))?;
                if remote_oid.as_deref() == Some(git_blob_sha1(&content).as_str()) {
                    report.unchanged_files.push(file.path_in_repo.clone());
                    continue;
                }
                lines.push(json!({"key": "file", "value": {
                    "content": base64::engine::general_purpose::STANDARD.encode(&content),
                    "path": file.path_in_repo, "encoding": "base64"}}));
            }
        }
        report.committed_files.push(file.path_in_repo.clone());
    }
    if report.committed_files.is_empty() {
        tracing::info!(
            "{}: every file is already on {}@{}; no commit",
            dir.display(),
            options.repo,
            options.revision
        );
        return Ok(report);
    }
    // Two paths with the same content are one LFS object.
    lfs_pending.sort_by(|a, b| a.sha256.cmp(&b.sha256));
    lfs_pending.dedup_by(|a, b| a.sha256 == b.sha256);
    for chunk in lfs_pending.chunks(BATCH_FILES) {
        let (count, bytes) = session.upload_lfs(chunk).map_err(fail)?;
        report.lfs_objects_uploaded += count;
        report.lfs_bytes_uploaded += bytes;
    }
    let mut body = Vec::new();
    for line in &lines {
        serde_json::to_writer(&mut body, line)?;
        body.push(b'\n');
    }
    let commit = session.commit(body).map_err(fail)?;
    report.commit_oid = commit
        .get("commitOid")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    report.commit_url = commit
        .get("commitUrl")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    Ok(report)
}

/// All files under `dir`, sorted, with their hashes; `.git` and `.cache/huggingface` are skipped
/// as the official client does.
fn scan_folder(dir: &Path, prefix: &str) -> Result<Vec<LocalFile>> {
    let mut paths = Vec::new();
    walk(dir, dir, &mut paths)?;
    paths.sort();
    paths
        .into_iter()
        .map(|(local, rel)| {
            let path_in_repo = if prefix.is_empty() {
                rel
            } else {
                format!("{prefix}/{rel}")
            };
            let mut f =
                File::open(&local).with_context(|| format!("opening {}", local.display()))?;
            let mut hasher = Sha256::new();
            let mut sample = Vec::new();
            let mut size = 0u64;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f
                    .read(&mut buf)
                    .with_context(|| format!("reading {}", local.display()))?;
                if n == 0 {
                    break;
                }
                if sample.len() < SAMPLE_BYTES {
                    let take = (SAMPLE_BYTES - sample.len()).min(n);
                    sample.extend_from_slice(&buf[..take]);
                }
                hasher.update(&buf[..n]);
                size += n as u64;
            }
            Ok(LocalFile {
                local,
                path_in_repo,
                size,
                sha256: hex::encode(hasher.finalize()),
                sample,
            })
        })
        .collect()
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String)>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let rel = path
            .strip_prefix(root)
            .expect("walked paths are under the root")
            .to_string_lossy()
            .replace('\\', "/");
        if rel == ".git"
            || rel.ends_with("/.git")
            || rel == ".cache/huggingface"
            || rel.ends_with("/.cache/huggingface")
        {
            continue;
        }
        if path.is_dir() {
            walk(root, &path, out)?;
        } else if path.is_file() {
            out.push((path, rel));
        }
    }
    Ok(())
}

/// Git's object id of a blob: sha1 of `blob {len}\0` + content; the Hub reports regular files so.
fn git_blob_sha1(content: &[u8]) -> String {
    let mut hasher = sha1::Sha1::new();
    hasher.update(format!("blob {}\0", content.len()).as_bytes());
    hasher.update(content);
    hex::encode(hasher.finalize())
}

struct Session<'a> {
    config: &'a HubConfig,
    options: &'a PushOptions,
    agent: ureq::Agent,
    auth: String,
}

impl Session<'_> {
    fn api(&self, tail: &str) -> String {
        format!(
            "{}/api/{}/{}/{tail}/{}",
            self.config.endpoint,
            RepoType::Model.api_plural(),
            self.options.repo,
            encode_component(&self.options.revision)
        )
    }

    /// POSTs `body` as JSON (with retries) and returns the response's JSON, or `Null` when the
    /// caller does not need it (`want_answer` false: the body is not even read).
    fn post_json(
        &self,
        what: &str,
        url: &str,
        body: &Value,
        content_type: &str,
        want_answer: bool,
    ) -> Result<Value, HubHttpError> {
        let bytes = serde_json::to_vec(body).expect("JSON values serialize");
        // The token goes only to the Hub itself, never to a URL a response pointed elsewhere.
        let same_origin = http::origin(url) == http::origin(&self.config.endpoint);
        http::with_retries(&self.config.retry, what, || {
            let mut request = self
                .agent
                .post(url)
                .header("Accept", content_type)
                .content_type(content_type);
            if same_origin {
                request = request.header("Authorization", &self.auth);
            }
            let response = http::check("POST", url, request.send(&bytes[..]))?;
            if want_answer {
                http::read_json("POST", url, response)
            } else {
                Ok(Value::Null)
            }
        })
    }

    fn create_repo(&self) -> Result<(), HubHttpError> {
        let url = format!("{}/api/repos/create", self.config.endpoint);
        let (organization, name) = match self.options.repo.split_once('/') {
            Some((owner, name)) => (Some(owner), name),
            None => (None, self.options.repo.as_str()),
        };
        let body = json!({
            "name": name,
            "organization": organization,
            "type": RepoType::Model.name(),
            "visibility": if self.options.private { "private" } else { "public" },
        });
        match self.post_json("create repo", &url, &body, "application/json", false) {
            Ok(_) => Ok(()),
            Err(e) if e.status == Some(409) => Ok(()),
            // A token may lack the right to create repos in the namespace, yet be allowed to
            // write to one that exists: go on when the repo is there, as the official client does.
            Err(e) if matches!(e.status, Some(401..=403)) && self.repo_exists() => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn repo_exists(&self) -> bool {
        let url = format!(
            "{}/api/{}/{}",
            self.config.endpoint,
            RepoType::Model.api_plural(),
            self.options.repo
        );
        let response = self
            .agent
            .get(&url)
            .header("Authorization", &self.auth)
            .call();
        http::check("GET", &url, response).is_ok()
    }

    /// Per file: upload mode, whether the repo ignores it, and the oid the branch has at that path.
    fn preupload(
        &self,
        files: &[LocalFile],
    ) -> Result<Vec<(Mode, bool, Option<String>)>, HubHttpError> {
        let url = self.api("preupload");
        let mut plan = Vec::with_capacity(files.len());
        for chunk in files.chunks(BATCH_FILES) {
            let body = json!({"files": chunk.iter().map(|f| json!({
                "path": f.path_in_repo,
                "sample": base64::engine::general_purpose::STANDARD.encode(&f.sample),
                "size": f.size,
            })).collect::<Vec<_>>()});
            let answer = self.post_json("preupload", &url, &body, "application/json", true)?;
            let malformed = |why: &str| HubHttpError {
                method: "POST".into(),
                url: url.clone(),
                status: None,
                message: format!("malformed preupload response: {why}"),
            };
            let entries = answer
                .get("files")
                .and_then(|f| f.as_array())
                .ok_or_else(|| malformed("no `files` array"))?;
            for file in chunk {
                let entry = entries
                    .iter()
                    .find(|e| e.get("path").and_then(|p| p.as_str()) == Some(&file.path_in_repo))
                    .ok_or_else(|| malformed(&format!("{} is missing", file.path_in_repo)))?;
                let mode = match entry.get("uploadMode").and_then(|m| m.as_str()) {
                    // Empty files cannot go through LFS storage; the Hub takes them inline.
                    Some("lfs") if file.size > 0 => Mode::Lfs,
                    Some("lfs") | Some("regular") => Mode::Regular,
                    other => {
                        return Err(malformed(&format!(
                            "uploadMode {other:?} for {}",
                            file.path_in_repo
                        )))
                    }
                };
                let ignore = entry
                    .get("shouldIgnore")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false);
                let oid = entry
                    .get("oid")
                    .and_then(|v| v.as_str())
                    .map(str::to_string);
                plan.push((mode, ignore, oid));
            }
        }
        Ok(plan)
    }

    /// LFS batch for `files`, then the uploads it asks for. Returns (objects sent, bytes sent).
    fn upload_lfs(&self, files: &[&LocalFile]) -> Result<(usize, u64), HubHttpError> {
        let url = format!(
            "{}/{}.git/info/lfs/objects/batch",
            self.config.endpoint, self.options.repo
        );
        let body = json!({
            "operation": "upload",
            "transfers": ["basic", "multipart"],
            "objects": files.iter().map(|f| json!({"oid": f.sha256, "size": f.size})).collect::<Vec<_>>(),
            "hash_algo": "sha256",
            "ref": {"name": self.options.revision},
        });
        let answer = self.post_json(
            "LFS batch",
            &url,
            &body,
            "application/vnd.git-lfs+json",
            true,
        )?;
        let malformed = |why: String| HubHttpError {
            method: "POST".into(),
            url: url.clone(),
            status: None,
            message: format!("malformed LFS batch response: {why}"),
        };
        let objects = answer
            .get("objects")
            .and_then(|o| o.as_array())
            .ok_or_else(|| malformed("no `objects` array".into()))?;
        let mut sent = (0, 0);
        for object in objects {
            let oid = object
                .get("oid")
                .and_then(|o| o.as_str())
                .unwrap_or_default();
            let file = files
                .iter()
                .find(|f| f.sha256 == oid)
                .ok_or_else(|| malformed(format!("unknown oid `{oid}`")))?;
            if let Some(error) = object.get("error") {
                return Err(HubHttpError {
                    method: "POST".into(),
                    url: url.clone(),
                    status: error.get("code").and_then(|c| c.as_u64()).map(|c| c as u16),
                    message: format!(
                        "the Hub refused LFS object {oid} ({}): {}",
                        file.path_in_repo,
                        error
                            .get("message")
                            .and_then(|m| m.as_str())
                            .unwrap_or("no message")
                    ),
                });
            }
            // No actions: the Hub's storage already has these bytes.
            let Some(actions) = object.get("actions") else {
                continue;
            };
            let upload = actions
                .get("upload")
                .ok_or_else(|| malformed(format!("no upload action for {oid}")))?;
            let href = upload
                .get("href")
                .and_then(|h| h.as_str())
                .ok_or_else(|| malformed(format!("upload action of {oid} has no href")))?;
            let header = upload.get("header").and_then(|h| h.as_object());
            match header.and_then(|h| h.get("chunk_size")) {
                Some(chunk_size) => {
                    let chunk_size = chunk_size
                        .as_str()
                        .and_then(|s| s.parse::<u64>().ok())
                        .or_else(|| chunk_size.as_u64())
                        .filter(|&c| c > 0)
                        .ok_or_else(|| malformed(format!("chunk_size {chunk_size} of {oid}")))?;
                    self.upload_multipart(file, href, header.expect("checked"), chunk_size)?
                }
                None => self.upload_basic(file, href, header)?,
            }
            if let Some(verify) = actions.get("verify") {
                let verify_url = verify
                    .get("href")
                    .and_then(|h| h.as_str())
                    .ok_or_else(|| malformed(format!("verify action of {oid} has no href")))?;
                let body = serde_json::to_vec(&json!({"oid": file.sha256, "size": file.size}))
                    .expect("JSON");
                let same_origin = http::origin(verify_url) == http::origin(&self.config.endpoint);
                http::with_retries(&self.config.retry, "LFS verify", || {
                    let mut request = self
                        .agent
                        .post(verify_url)
                        .header("Accept", "application/vnd.git-lfs+json")
                        .content_type("application/vnd.git-lfs+json");
                    if same_origin {
                        request = request.header("Authorization", &self.auth);
                    }
                    for (k, v) in verify
                        .get("header")
                        .and_then(|h| h.as_object())
                        .into_iter()
                        .flatten()
                    {
                        if let Some(v) = v.as_str() {
                            request = request.header(k.as_str(), v);
                        }
                    }
                    http::check("POST", verify_url, request.send(&body[..])).map(drop)
                })?;
            }
            sent.0 += 1;
            sent.1 += file.size;
        }
        Ok(sent)
    }

    /// Basic transfer: one PUT of the whole file, with the headers the batch answer gave.
    fn upload_basic(
        &self,
        file: &LocalFile,
        href: &str,
        header: Option<&serde_json::Map<String, Value>>,
    ) -> Result<(), HubHttpError> {
        let progress = super::progress_bar(
            self.config,
            file.size,
            &format!("uploading {}", file.path_in_repo),
        );
        http::with_retries(&self.config.retry, "LFS upload", || {
            progress.set_position(0);
            let mut request = self.agent.put(href);
            for (k, v) in header.into_iter().flatten() {
                if let Some(v) = v.as_str() {
                    request = request.header(k.as_str(), v);
                }
            }
            let reader = open_slice(&file.local, 0, file.size, &progress, href)?;
            let response = request
                .header("Content-Length", file.size.to_string())
                .send(ureq::SendBody::from_owned_reader(reader));
            http::check("PUT", href, response).map(drop)
        })?;
        progress.finish_and_clear();
        Ok(())
    }

    /// Multipart transfer: PUT each `chunk_size` slice to its numbered URL, then POST the parts'
    /// ETags to `completion_url`.
    fn upload_multipart(
        &self,
        file: &LocalFile,
        completion_url: &str,
        header: &serde_json::Map<String, Value>,
        chunk_size: u64,
    ) -> Result<(), HubHttpError> {
        let mut part_urls: Vec<(u64, &str)> = header
            .iter()
            .filter_map(|(k, v)| Some((k.parse::<u64>().ok()?, v.as_str()?)))
            .collect();
        part_urls.sort();
        let expected = file.size.div_ceil(chunk_size);
        let numbered_from_one = part_urls
            .iter()
            .enumerate()
            .all(|(i, (n, _))| *n == i as u64 + 1);
        if part_urls.len() as u64 != expected || !numbered_from_one {
            return Err(HubHttpError {
                method: "POST".into(),
                url: completion_url.to_string(),
                status: None,
                message: format!(
                    "the LFS batch answer has {} part URLs for {} ({} bytes in parts of {chunk_size}); expected {expected}",
                    part_urls.len(),
                    file.path_in_repo,
                    file.size
                ),
            });
        }
        let progress = super::progress_bar(
            self.config,
            file.size,
            &format!("uploading {}", file.path_in_repo),
        );
        let mut parts = Vec::with_capacity(part_urls.len());
        for (number, url) in part_urls {
            let offset = (number - 1) * chunk_size;
            let len = chunk_size.min(file.size - offset);
            let etag = http::with_retries(&self.config.retry, "LFS part upload", || {
                progress.set_position(offset);
                let reader = open_slice(&file.local, offset, len, &progress, url)?;
                let response = self
                    .agent
                    .put(url)
                    .header("Content-Length", len.to_string())
                    .send(ureq::SendBody::from_owned_reader(reader));
                let response = http::check("PUT", url, response)?;
                response
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| HubHttpError {
                        method: "PUT".into(),
                        url: url.to_string(),
                        status: Some(response.status().as_u16()),
                        message: format!(
                            "part {number} of {} came back without an ETag",
                            file.path_in_repo
                        ),
                    })
            })?;
            parts.push(json!({"partNumber": number, "etag": etag}));
        }
        progress.finish_and_clear();
        let body = json!({"oid": file.sha256, "parts": parts});
        self.post_json(
            "LFS multipart completion",
            completion_url,
            &body,
            "application/vnd.git-lfs+json",
            false,
        )
        .map(drop)
    }

    fn commit(&self, ndjson: Vec<u8>) -> Result<Value, HubHttpError> {
        let url = self.api("commit");
        http::with_retries(&self.config.retry, "commit", || {
            let response = self
                .agent
                .post(&url)
                .header("Authorization", &self.auth)
                .content_type("application/x-ndjson")
                .send(&ndjson[..]);
            http::read_json("POST", &url, http::check("POST", &url, response)?)
        })
    }
}

/// `len` bytes of `path` from `offset`, counted on `progress` as they are read.
fn open_slice(
    path: &Path,
    offset: u64,
    len: u64,
    progress: &ProgressBar,
    url: &str,
) -> Result<impl Read + 'static, HubHttpError> {
    let local_error = |e: std::io::Error| HubHttpError {
        method: "PUT".into(),
        url: url.to_string(),
        status: None,
        message: format!("reading {}: {e}", path.display()),
    };
    let mut file = File::open(path).map_err(local_error)?;
    file.seek(SeekFrom::Start(offset)).map_err(local_error)?;
    Ok(progress.wrap_read(file.take(len)))
}

/// What happened to a checkpoint handed to an [`Uploader`].
#[derive(Debug, Clone)]
pub enum UploadEvent {
    Pushed {
        dir: PathBuf,
        report: PushReport,
        attempts: u32,
    },
    Failed {
        dir: PathBuf,
        error: String,
        attempts: u32,
    },
}

impl UploadEvent {
    pub fn failed(&self) -> bool {
        matches!(self, UploadEvent::Failed { .. })
    }
}

impl std::fmt::Display for UploadEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UploadEvent::Pushed {
                dir,
                report,
                attempts,
            } => match &report.commit_oid {
                Some(oid) => write!(
                    f,
                    "uploaded {} (commit {oid}, {} files, attempt {attempts})",
                    dir.display(),
                    report.committed_files.len()
                ),
                None => write!(f, "{} was already on the Hub", dir.display()),
            },
            UploadEvent::Failed {
                dir,
                error,
                attempts,
            } => write!(
                f,
                "uploading {} failed after {attempts} attempts: {error} (the local checkpoint is \
                 intact; push it later with `kiln push`)",
                dir.display()
            ),
        }
    }
}

/// Pushes directories on a background thread, one at a time in submission order, so that the
/// caller (the trainer) never waits for the network. A push whose failure is transient (network,
/// 5xx, 429) is tried again with exponential backoff; every outcome is logged and sent as an
/// [`UploadEvent`]. Nothing here panics the caller or touches the directories.
///
/// Dropping an `Uploader` (or calling [`Uploader::finish`]) waits for the queued pushes, so a
/// checkpoint submitted at the end of training is not lost.
pub struct Uploader {
    jobs: Option<mpsc::Sender<(PathBuf, String)>>,
    /// Directories submitted whose push has not finished (queued or running), in order.
    pending: Arc<Mutex<Vec<PathBuf>>>,
    events: mpsc::Receiver<UploadEvent>,
    worker: Option<JoinHandle<()>>,
}

impl Uploader {
    /// Starts the worker. `options.message` is the default commit message; `push_attempts` is how
    /// many times a whole push is tried (each request inside it also has `config.retry`).
    pub fn spawn(config: HubConfig, options: PushOptions, push_attempts: u32) -> Result<Uploader> {
        let (job_tx, job_rx) = mpsc::channel::<(PathBuf, String)>();
        let (event_tx, event_rx) = mpsc::channel();
        let pending = Arc::new(Mutex::new(Vec::<PathBuf>::new()));
        let still_pending = pending.clone();
        let worker = std::thread::Builder::new()
            .name("kiln-hub-upload".into())
            .spawn(move || {
                for (dir, message) in job_rx {
                    let options = PushOptions {
                        message,
                        ..options.clone()
                    };
                    let event = push_with_retries(&config, &dir, &options, push_attempts.max(1));
                    let mut pending = still_pending.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(i) = pending.iter().position(|d| *d == dir) {
                        pending.remove(i);
                    }
                    drop(pending);
                    // The receiver may be gone when the trainer stopped listening; the log has it.
                    let _ = event_tx.send(event);
                }
            })
            .context("starting the upload thread")?;
        Ok(Uploader {
            jobs: Some(job_tx),
            pending,
            events: event_rx,
            worker: Some(worker),
        })
    }

    /// Queues `dir` for pushing with commit message `message`; returns at once.
    pub fn submit(&self, dir: &Path, message: &str) {
        self.lock_pending().push(dir.to_path_buf());
        let sent = self
            .jobs
            .as_ref()
            .map(|jobs| jobs.send((dir.to_path_buf(), message.to_string())).is_ok())
            .unwrap_or(false);
        if !sent {
            self.lock_pending().pop();
            tracing::error!(
                "the upload thread is gone; {} will not be pushed",
                dir.display()
            );
        }
    }

    /// Directories submitted whose push has not finished yet: they must stay on disk.
    pub fn pending(&self) -> Vec<PathBuf> {
        self.lock_pending().clone()
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        // A panic while holding the lock leaves a list that is still right.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Events of pushes finished so far, without waiting.
    pub fn poll(&self) -> Vec<UploadEvent> {
        self.events.try_iter().collect()
    }

    /// Waits until every queued push has finished, and returns the events not yet polled.
    pub fn finish(mut self) -> Vec<UploadEvent> {
        drop(self.jobs.take());
        if let Some(worker) = self.worker.take() {
            if worker.join().is_err() {
                tracing::error!("the upload thread panicked");
            }
        }
        self.events.try_iter().collect()
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        // Pending pushes still finish: dropping the sender ends the worker's loop after the queue.
        drop(self.jobs.take());
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

fn push_with_retries(
    config: &HubConfig,
    dir: &Path,
    options: &PushOptions,
    attempts: u32,
) -> UploadEvent {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            push_folder(config, dir, options)
        }))
        .unwrap_or_else(|_| Err(anyhow!("the push panicked")));
        match result {
            Ok(report) => {
                tracing::info!(
                    "pushed {} to {}@{}: {} files committed, {} unchanged",
                    dir.display(),
                    options.repo,
                    options.revision,
                    report.committed_files.len(),
                    report.unchanged_files.len()
                );
                return UploadEvent::Pushed {
                    dir: dir.to_path_buf(),
                    report,
                    attempts: attempt,
                };
            }
            Err(e) => {
                let transient = e
                    .chain()
                    .find_map(|c| c.downcast_ref::<HubHttpError>())
                    .is_some_and(HubHttpError::is_transient);
                if transient && attempt < attempts {
                    let wait = config.retry.backoff(attempt).max(Duration::from_millis(1)) * 4;
                    tracing::warn!(
                        "pushing {} failed ({e:#}); trying again in {wait:?}",
                        dir.display()
                    );
                    std::thread::sleep(wait);
                    continue;
                }
                tracing::error!(
                    "pushing {} to {} failed: {e:#}",
                    dir.display(),
                    options.repo
                );
                return UploadEvent::Failed {
                    dir: dir.to_path_buf(),
                    error: format!("{e:#}"),
                    attempts: attempt,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_blob_ids() {
        // `printf 'hello\n' | git hash-object --stdin` and `git hash-object /dev/null`
        assert_eq!(
            git_blob_sha1(b"hello\n"),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
        assert_eq!(
            git_blob_sha1(b""),
            "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
        );
    }
}
