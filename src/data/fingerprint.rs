//! Fingerprints of a recipe's training sources (size and sha256 of every file read), kept in
//! each checkpoint so that a resume notices when the data under the same path has changed: the
//! saved data cursor would otherwise carry on over other examples without a word.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::source::hub_parquet_files;
use crate::recipe::Recipe;

/// Size and sha256 of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub size: u64,
    pub sha256: String,
}

/// One file a training source was read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFingerprint {
    /// The recipe key of the source, e.g. `data.train[0]`.
    pub key: String,
    /// The file as found when the checkpoint was written (a Hub source lists its parquet files).
    pub file: String,
    #[serde(flatten)]
    pub digest: FileDigest,
}

/// Streams a file through sha256.
pub fn file_digest(path: &Path) -> Result<FileDigest> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok(FileDigest {
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// Every file the recipe's training data is read from, in recipe order (local paths relative to
/// `recipe_dir`; Hub sources through the local cache, as `prepare` reads them).
pub fn training_data(recipe: &Recipe, recipe_dir: &Path) -> Result<Vec<SourceFingerprint>> {
    let mut out = Vec::new();
    for (i, dataset) in recipe.data.train.iter().enumerate() {
        let key = format!("data.train[{i}]");
        let files = match &dataset.source.path {
            Some(path) => vec![recipe_dir.join(path)],
            None => hub_parquet_files(&dataset.source).with_context(|| key.clone())?,
        };
        for file in files {
            out.push(SourceFingerprint {
                key: key.clone(),
                digest: file_digest(&file).with_context(|| key.clone())?,
                file: file.display().to_string(),
            });
        }
    }
    Ok(out)
}

/// The first way `now` differs from `saved`, said for the user; `None` when they agree. Files
/// are compared by content within each recipe key, so a moved recipe directory is no change.
pub fn first_difference(saved: &[SourceFingerprint], now: &[SourceFingerprint]) -> Option<String> {
    let keys = |list: &[SourceFingerprint]| {
        let mut keys: Vec<String> = list.iter().map(|f| f.key.clone()).collect();
        keys.dedup();
        keys
    };
    let (saved_keys, now_keys) = (keys(saved), keys(now));
    if saved_keys != now_keys {
        return Some(format!(
            "the training sources are {} now, the checkpoint was trained on {}",
            now_keys.join(", "),
            saved_keys.join(", ")
        ));
    }
    for key in &now_keys {
        let before: Vec<&SourceFingerprint> = saved.iter().filter(|f| &f.key == key).collect();
        let after: Vec<&SourceFingerprint> = now.iter().filter(|f| &f.key == key).collect();
        if before.len() != after.len() {
            return Some(format!(
                "{key}: read from {} files now, {} when the checkpoint was written",
                after.len(),
                before.len()
            ));
        }
        for (old, new) in before.iter().zip(&after) {
            if old.digest != new.digest {
                return Some(format!(
                    "{key}: {} has changed since the checkpoint was written (now {} bytes, \
                     sha256 {}; then {} bytes, sha256 {})",
                    new.file,
                    new.digest.size,
                    short(&new.digest.sha256),
                    old.digest.size,
                    short(&old.digest.sha256)
                ));
            }
        }
    }
    None
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, file: &str, size: u64, sha: &str) -> SourceFingerprint {
        SourceFingerprint {
            key: key.into(),
            file: file.into(),
            digest: FileDigest {
                size,
                sha256: sha.into(),
            },
        }
    }

    #[test]
    fn differences_name_the_source_and_file() {
        let saved = vec![entry("data.train[0]", "/a/train.jsonl", 10, "aaaa")];
        let moved = vec![entry("data.train[0]", "/b/train.jsonl", 10, "aaaa")];
        assert_eq!(first_difference(&saved, &moved), None);
        let edited = vec![entry("data.train[0]", "/a/train.jsonl", 11, "bbbb")];
        let message = first_difference(&saved, &edited).unwrap();
        assert!(
            message.starts_with("data.train[0]: /a/train.jsonl has changed"),
            "{message}"
        );
        let more = vec![saved[0].clone(), entry("data.train[1]", "/x", 1, "cc")];
        assert!(first_difference(&saved, &more)
            .unwrap()
            .contains("data.train[0], data.train[1] now"));
    }

    #[test]
    fn digest_is_size_and_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let d = file_digest(&path).unwrap();
        assert_eq!(d.size, 3);
        assert_eq!(
            d.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
