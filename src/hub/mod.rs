//! The Hugging Face Hub: download models and dataset files into the HF cache, push checkpoints.
//!
//! Everything takes a [`HubConfig`] (endpoint, token, cache directory, offline flag, retry policy)
//! so that callers — and tests running in parallel threads — never depend on process-wide state;
//! [`HubConfig::from_env`] reads the usual `HF_*` variables.
//!
//! Downloads ([`download`]) use the Hub's `resolve` URLs and the cache layout of the official
//! client (`models--owner--name/{blobs,refs,snapshots/<commit>}`), so a cache shared with Python
//! tools works both ways. Uploads ([`upload`]) speak the Hub's commit API: preupload, the LFS batch
//! API (basic and multipart transfers), then one NDJSON commit.
//!
//! ```no_run
//! use kiln::hub::{self, HubConfig, PushOptions, Uploader};
//! # fn main() -> anyhow::Result<()> {
//! // A model directory: local as is, else downloaded (config, weights, tokenizer) into the cache.
//! let model_dir = hub::resolve_model("EleutherAI/gpt-j-6b", Some("float16"))?;
//!
//! // The parquet shards of one split of a dataset config.
//! let config = HubConfig::from_env();
//! let shards = hub::resolve_parquet_split(&config, "nyu-mll/glue", None, "mnli", "validation_mismatched")?;
//!
//! // Checkpoints pushed in the background while training goes on.
//! let uploader = Uploader::spawn(config, PushOptions::new("me/my-run"), 3)?;
//! uploader.submit(std::path::Path::new("out/checkpoint-100"), "step 100");
//! for event in uploader.poll() { println!("{event:?}"); }
//! let remaining = uploader.finish(); // waits for queued pushes
//! # let _ = (model_dir, shards, remaining); Ok(()) }
//! ```

pub mod download;
mod http;
pub mod upload;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};

pub use download::{
    list_dataset_files, resolve_dataset_file, resolve_model, resolve_model_metadata,
    resolve_model_with, resolve_parquet_split, resolve_tokenizer,
};
pub use http::HubHttpError;
pub use upload::{push_folder, PushOptions, PushReport, UploadEvent, Uploader};

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Kind of Hub repository; it decides URL prefixes and cache folder names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoType {
    Model,
    Dataset,
}

impl RepoType {
    /// Plural form used in API paths: `/api/models/...`.
    pub(crate) fn api_plural(self) -> &'static str {
        match self {
            RepoType::Model => "models",
            RepoType::Dataset => "datasets",
        }
    }

    /// Prefix of web and git URLs: models have none, datasets live under `datasets/`.
    pub(crate) fn url_prefix(self) -> &'static str {
        match self {
            RepoType::Model => "",
            RepoType::Dataset => "datasets/",
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            RepoType::Model => "model",
            RepoType::Dataset => "dataset",
        }
    }
}

/// How often and how patiently a failed request (5xx, 429, dropped connection) is retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(32),
        }
    }
}

impl RetryPolicy {
    /// Sleep before attempt `attempt` (1-based count of failures so far): doubling, capped.
    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u32 << failures.saturating_sub(1).min(16);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// Where the Hub is, who we are, and where downloaded files live.
#[derive(Clone)]
pub struct HubConfig {
    /// Base URL without a trailing slash, e.g. `https://huggingface.co`.
    pub endpoint: String,
    pub token: Option<String>,
    /// The `hub` cache directory (`$HF_HOME/hub` by default).
    pub cache_dir: PathBuf,
    /// Only the cache is used; any file not in it is an error.
    pub offline: bool,
    pub retry: RetryPolicy,
    /// Files at least this large get a progress bar while they download or upload.
    pub progress_min_bytes: u64,
}

impl HubConfig {
    /// A configuration from explicit parts, with the default retry policy.
    pub fn new(endpoint: &str, token: Option<String>, cache_dir: PathBuf, offline: bool) -> Self {
        HubConfig {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            cache_dir,
            offline,
            retry: RetryPolicy::default(),
            progress_min_bytes: 10 << 20,
        }
    }

    /// The configuration the official client would use: `HF_ENDPOINT`, `HF_TOKEN` (else the
    /// `$HF_HOME/token` file), `HF_HUB_CACHE` (else `$HF_HOME/hub`, `HF_HOME` defaulting to
    /// `~/.cache/huggingface`) and `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`HubConfig::from_env`] with the variables looked up by `lookup`.
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let base = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            base.join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| {
            let path = var("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "on" | "yes" | "true"
            )
        });
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        HubConfig::new(&endpoint, token, cache_dir, offline)
    }
}

// The token stays out of logs and error messages.
impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("retry", &self.retry)
            .finish()
    }
}

/// A byte-count progress bar on stderr for transfers of at least `config.progress_min_bytes`;
/// hidden otherwise (and by indicatif when stderr is not a terminal).
pub(crate) fn progress_bar(config: &HubConfig, total: u64, label: &str) -> indicatif::ProgressBar {
    if total < config.progress_min_bytes {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total).with_message(label.to_string());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .expect("static template"),
    );
    bar
}

/// Checks a repo id (`name` or `owner/name`) so it can go into URLs and cache folder names.
pub(crate) fn validate_repo_id(repo: &str) -> Result<()> {
    let parts: Vec<&str> = repo.split('/').collect();
    let well_formed = !parts.is_empty()
        && parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with(['.', '-'])
                && !p.ends_with('.')
                && !p.contains("..")
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        });
    if !well_formed {
        bail!(
            "`{repo}` is not a Hub repo id: expected `name` or `owner/name` with letters, digits, `-`, `_` or `.`"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        for ok in ["gpt2", "EleutherAI/gpt-j-6b", "nyu-mll/glue", "a.b/c_d"] {
            validate_repo_id(ok).unwrap();
        }
        for bad in ["", "/x", "a/b/c", "../x", "a/..", "a b/c", "a/.git"] {
            assert!(validate_repo_id(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn config_from_variables() {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("token"), "hf_from_file\n").unwrap();
        let home_str = home.path().to_string_lossy().into_owned();
        let vars = |pairs: Vec<(&'static str, String)>| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.clone())
            }
        };
        let c = HubConfig::from_vars(vars(vec![("HOME", "/home/u".into())]));
        assert_eq!(c.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(c.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert!(!c.offline);

        let c = HubConfig::from_vars(vars(vec![
            ("HF_HOME", home_str.clone()),
            ("HF_ENDPOINT", "http://mirror:8080/".into()),
            ("HF_HUB_OFFLINE", "1".into()),
        ]));
        assert_eq!(c.endpoint, "http://mirror:8080");
        assert_eq!(c.cache_dir, home.path().join("hub"));
        assert_eq!(c.token.as_deref(), Some("hf_from_file"));
        assert!(c.offline);
        assert!(
            !format!("{c:?}").contains("hf_from_file"),
            "the token leaks into Debug"
        );

        let c = HubConfig::from_vars(vars(vec![
            ("HF_HOME", home_str),
            ("HF_TOKEN", "hf_env".into()),
            ("HF_HUB_CACHE", "/elsewhere".into()),
            ("HF_HUB_OFFLINE", "0".into()),
        ]));
        assert_eq!(c.token.as_deref(), Some("hf_env"));
        assert_eq!(c.cache_dir, PathBuf::from("/elsewhere"));
        assert!(!c.offline);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy {
            max_attempts: 9,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
        };
        let got: Vec<u128> = (1..=5).map(|f| p.backoff(f).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 500, 500]);
    }
}
