//! The Hub module against a local Hub stand-in (tests/hub_server): pushes (repo creation,
//! preupload, LFS batch with basic and multipart transfers, commits), retries and failures,
//! downloads into the cache, offline mode, dataset listing, `kiln push`, and — when the official
//! Python client is installed — that both clients produce the same commit.

mod common;
mod hub_server;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hub_server::{
    Entry, Fault, FaultAction, HubServer, ServerOptions, BOB_TOKEN, READ_TOKEN, WRITE_TOKEN,
};
use kiln::hub::{self, HubConfig, PushOptions, RetryPolicy, UploadEvent, Uploader};

fn config(server: &HubServer, token: Option<&str>, cache: &Path) -> HubConfig {
    let mut c = HubConfig::new(
        &server.url,
        token.map(str::to_string),
        cache.to_path_buf(),
        false,
    );
    c.retry = RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(40),
    };
    c
}

/// Deterministic pseudo-random bytes, so LFS objects differ between tests that want them to.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A checkpoint-like directory: config.json, model.safetensors (LFS, `weights` bytes),
/// tokenizer.json and README.md.
fn checkpoint(dir: &Path, weights: usize, seed: u64) -> BTreeMap<String, Vec<u8>> {
    let files = BTreeMap::from([
        (
            "config.json".to_string(),
            br#"{"model_type": "gptj", "n_layer": 2}"#.to_vec(),
        ),
        ("model.safetensors".to_string(), bytes(weights, seed)),
        (
            "tokenizer.json".to_string(),
            format!("{{\"version\": \"1.0\", \"seed\": {seed}}}").into_bytes(),
        ),
        (
            "README.md".to_string(),
            b"---\nlicense: apache-2.0\n---\n# A kiln checkpoint\n".to_vec(),
        ),
    ]);
    fs::create_dir_all(dir).unwrap();
    for (name, content) in &files {
        fs::write(dir.join(name), content).unwrap();
    }
    files
}

/// Every file's path, content hash and modification time: a push must change none of them.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, String, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::metadata(&path).unwrap();
            if meta.is_dir() {
                pending.push(path.clone());
                out.push((path, String::new(), meta.modified().unwrap()));
            } else {
                let hash = hub_server::sha256_hex(&fs::read(&path).unwrap());
                out.push((path, hash, meta.modified().unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn assert_tree_matches(server: &HubServer, repo: &str, files: &BTreeMap<String, Vec<u8>>) {
    let tree = server.tree(repo, "main").expect("repo exists");
    assert_eq!(
        tree.keys().collect::<Vec<_>>(),
        files.keys().collect::<Vec<_>>(),
        "file list of {repo}"
    );
    for (path, entry) in &tree {
        assert_eq!(
            &server.content(entry),
            &files[path],
            "{path} differs on the server"
        );
        let expect_lfs = path.ends_with(".safetensors");
        assert_eq!(
            matches!(entry, Entry::Lfs { .. }),
            expect_lfs,
            "{path}: LFS or not"
        );
    }
}

#[test]
fn push_commits_exactly_the_directory_and_leaves_it_untouched() {
    let server = HubServer::start(ServerOptions::default());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("checkpoint-100");
    // 200 kB: above the server's multipart threshold, so parts + completion are exercised.
    let files = checkpoint(&dir, 200_000, 1);
    let before = fingerprint(&dir);
    let report = hub::push_folder(
        &config(&server, Some(WRITE_TOKEN), tmp.path()),
        &dir,
        &PushOptions::new("alice/run1"),
    )
    .unwrap();
    assert_eq!(fingerprint(&dir), before, "the local directory changed");
    assert_tree_matches(&server, "models/alice/run1", &files);
    assert_eq!(report.committed_files.len(), 4);
    assert_eq!(report.lfs_objects_uploaded, 1);
    assert_eq!(report.lfs_bytes_uploaded, 200_000);
    assert!(report.commit_oid.is_some());
    let requests = server.requests();
    let parts: Vec<_> = requests
        .iter()
        .filter(|r| r.path.starts_with("/lfs-multipart/") && r.method == "PUT")
        .collect();
    assert_eq!(parts.len(), 7, "200000 bytes in 32 KiB parts");
    assert!(
        parts.iter().all(|r| !r.chunked),
        "storage PUTs must carry a Content-Length"
    );
    assert!(requests
        .iter()
        .any(|r| r.path.ends_with("/complete") && r.status == 200));
    assert!(requests
        .iter()
        .any(|r| r.path.starts_with("/lfs-verify/") && r.status == 200));
    assert_eq!(server.lfs_bytes_received(), 200_000);
}

#[test]
fn basic_transfer_for_objects_below_the_multipart_threshold() {
    let server = HubServer::start(ServerOptions {
        multipart_threshold: 1 << 30,
        verify: false,
        lfs_threshold: 10_000,
        ..Default::default()
    });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let mut files = checkpoint(&dir, 50_000, 2);
    // Above the server's 10 kB LFS threshold here, although not a weights file by name.
    let big_text = bytes(12_000, 3)
        .iter()
        .map(|b| b'a' + b % 26)
        .collect::<Vec<u8>>();
    fs::create_dir_all(dir.join("logs")).unwrap();
    fs::write(dir.join("logs/metrics.txt"), &big_text).unwrap();
    files.insert("logs/metrics.txt".into(), big_text);
    let report = hub::push_folder(
        &config(&server, Some(WRITE_TOKEN), tmp.path()),
        &dir,
        &PushOptions::new("alice/basic"),
    )
    .unwrap();
    let tree = server.tree("models/alice/basic", "main").unwrap();
    assert_eq!(tree.len(), 5);
    for (path, entry) in &tree {
        assert_eq!(server.content(entry), files[path], "{path}");
    }
    assert!(tree.contains_key("logs/metrics.txt"));
    assert!(matches!(
        tree["logs/metrics.txt"],
        Entry::Lfs { size: 12_000, .. }
    ));
    assert_eq!(report.lfs_objects_uploaded, 2);
    let mut puts: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/lfs-storage/"))
        .collect();
    puts.sort_by_key(|r| r.body_len);
    assert_eq!(
        puts.iter().map(|r| r.body_len).collect::<Vec<_>>(),
        vec![12_000, 50_000]
    );
    assert!(puts.iter().all(|r| !r.chunked && r.status == 200));
}

#[test]
fn pushing_again_sends_no_lfs_bytes_for_unchanged_files() {
    let server = HubServer::start(ServerOptions::default());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let files = checkpoint(&dir, 100_000, 4);
    let cfg = config(&server, Some(WRITE_TOKEN), tmp.path());
    hub::push_folder(&cfg, &dir, &PushOptions::new("alice/again")).unwrap();
    let sent = server.lfs_bytes_received();
    let commits = server.commit_count("models/alice/again");

    // Same content: nothing to commit.
    let report = hub::push_folder(&cfg, &dir, &PushOptions::new("alice/again")).unwrap();
    assert_eq!(report.commit_oid, None);
    assert_eq!(report.unchanged_files.len(), 4);
    assert_eq!(server.lfs_bytes_received(), sent);
    assert_eq!(server.commit_count("models/alice/again"), commits);

    // Only the tokenizer changed: one file committed, still no LFS bytes.
    fs::write(dir.join("tokenizer.json"), b"{\"version\": \"2.0\"}").unwrap();
    let report = hub::push_folder(&cfg, &dir, &PushOptions::new("alice/again")).unwrap();
    assert_eq!(report.committed_files, vec!["tokenizer.json".to_string()]);
    assert_eq!(server.lfs_bytes_received(), sent);
    let mut expected = files.clone();
    expected.insert("tokenizer.json".into(), b"{\"version\": \"2.0\"}".to_vec());
    assert_tree_matches(&server, "models/alice/again", &expected);

    // Another repo, same weights: the storage already has the object, the batch asks for nothing.
    let report = hub::push_folder(&cfg, &dir, &PushOptions::new("alice/copy")).unwrap();
    assert_eq!(report.lfs_objects_uploaded, 0);
    assert_eq!(server.lfs_bytes_received(), sent);
    assert_tree_matches(&server, "models/alice/copy", &expected);
}

#[test]
fn server_errors_are_retried_until_the_push_succeeds() {
    let server = HubServer::start(ServerOptions::default());
    let fault = |method, path: &str, skip, times, status| Fault {
        method,
        path_contains: path.into(),
        skip,
        times,
        action: FaultAction::Status(status, "try again later".into()),
    };
    server.inject(fault("POST", "/preupload/", 0, 1, 500));
    server.inject(fault("POST", "/info/lfs/objects/batch", 0, 1, 429));
    server.inject(fault("PUT", "/lfs-multipart/", 1, 2, 503));
    server.inject(fault("POST", "/complete", 0, 1, 502));
    server.inject(fault("POST", "/commit/", 0, 1, 500));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let files = checkpoint(&dir, 100_000, 5);
    hub::push_folder(
        &config(&server, Some(WRITE_TOKEN), tmp.path()),
        &dir,
        &PushOptions::new("alice/flaky"),
    )
    .unwrap();
    assert_tree_matches(&server, "models/alice/flaky", &files);
    let failed: Vec<u16> = server
        .requests()
        .iter()
        .filter(|r| r.status >= 429)
        .map(|r| r.status)
        .collect();
    assert_eq!(failed, vec![500, 429, 503, 503, 502, 500]);
    assert_eq!(
        server.commit_count("models/alice/flaky"),
        2,
        "creation + exactly one push commit"
    );
}

#[test]
fn dropped_connections_are_retried() {
    let server = HubServer::start(ServerOptions::default());
    server.inject(Fault {
        method: "PUT",
        path_contains: "/lfs-multipart/".into(),
        skip: 2,
        times: 1,
        action: FaultAction::DropMidBody,
    });
    server.inject(Fault {
        method: "POST",
        path_contains: "/commit/".into(),
        skip: 0,
        times: 1,
        action: FaultAction::DropBeforeResponse,
    });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let files = checkpoint(&dir, 150_000, 6);
    let before = fingerprint(&dir);
    hub::push_folder(
        &config(&server, Some(WRITE_TOKEN), tmp.path()),
        &dir,
        &PushOptions::new("alice/dropped"),
    )
    .unwrap();
    assert_tree_matches(&server, "models/alice/dropped", &files);
    assert_eq!(fingerprint(&dir), before);
    let dropped = server.requests().iter().filter(|r| r.status == 0).count();
    assert_eq!(dropped, 2);
}

#[test]
fn auth_failures_pass_the_hub_message_through_without_retrying() {
    let server = HubServer::start(ServerOptions::default());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    checkpoint(&dir, 1000, 7);
    let push = |token: &str, repo: &str| {
        let e = hub::push_folder(
            &config(&server, Some(token), tmp.path()),
            &dir,
            &PushOptions::new(repo),
        )
        .unwrap_err();
        format!("{e:#}")
    };
    let e = push("hf_not_a_token", "alice/secure");
    assert!(
        e.contains("HTTP 401") && e.contains("Invalid credentials in Authorization header"),
        "{e}"
    );
    // A 401 is final: one create, one look whether the repo exists anyway, and no retry.
    let seen: Vec<(String, String, u16)> = server
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path, r.status))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("POST".to_string(), "/api/repos/create".to_string(), 401),
            (
                "GET".to_string(),
                "/api/models/alice/secure".to_string(),
                401
            )
        ]
    );

    let e = push(BOB_TOKEN, "alice/secure");
    assert!(
        e.contains("HTTP 403")
            && e.contains("rights to create a model under the namespace \"alice\""),
        "{e}"
    );

    // The repo exists (409 on create is fine) but the token may only read.
    server.seed("models/alice/secure", false, &[("a.txt", b"a", false)]);
    let e = push(READ_TOKEN, "alice/secure");
    assert!(
        e.contains("HTTP 403") && e.contains("You don't have write access to alice/secure"),
        "{e}"
    );

    let mut options = PushOptions::new("alice/secure");
    options.revision = "no-such-branch".into();
    let e = hub::push_folder(
        &config(&server, Some(WRITE_TOKEN), tmp.path()),
        &dir,
        &options,
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("HTTP 404") && e.contains("Invalid rev id: no-such-branch"),
        "{e}"
    );
    assert!(server.requests().iter().all(|r| r.status < 500));
}

#[test]
fn no_token_fails_before_any_request() {
    let server = HubServer::start(ServerOptions::default());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    checkpoint(&dir, 1000, 8);
    let e = hub::push_folder(
        &config(&server, None, tmp.path()),
        &dir,
        &PushOptions::new("alice/x"),
    )
    .unwrap_err();
    assert!(
        format!("{e:#}").contains(
            "pushing to alice/x needs a Hugging Face token with write access: set HF_TOKEN"
        ),
        "{e:#}"
    );
    assert!(
        server.requests().is_empty(),
        "requests were sent without a token"
    );
}

#[test]
fn uploader_runs_in_the_background_and_retries_whole_pushes() {
    let server = HubServer::start(ServerOptions::default());
    // More consecutive failures than one request's retry budget (4): the first push fails,
    // the uploader tries the whole push again.
    server.inject(Fault {
        method: "POST",
        path_contains: "/commit/".into(),
        skip: 0,
        times: 5,
        action: FaultAction::Status(503, "maintenance".into()),
    });
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("checkpoint-1");
    let b = tmp.path().join("checkpoint-2");
    checkpoint(&a, 70_000, 9);
    let files_b = checkpoint(&b, 70_000, 10);
    let uploader = Uploader::spawn(
        config(&server, Some(WRITE_TOKEN), tmp.path()),
        PushOptions::new("alice/bg"),
        3,
    )
    .unwrap();
    uploader.submit(&a, "step 1");
    uploader.submit(&b, "step 2");
    let events = uploader.finish();
    assert_eq!(events.len(), 2, "{events:?}");
    match events.as_slice() {
        [UploadEvent::Pushed {
            dir: first,
            attempts: 2,
            ..
        }, UploadEvent::Pushed {
            dir: second,
            attempts: 1,
            ..
        }] => {
            assert_eq!((first, second), (&a, &b), "pushed in submission order");
        }
        other => panic!(
            "expected checkpoint-1 pushed on its second attempt, then checkpoint-2: {other:?}"
        ),
    }
    assert_eq!(
        server.commit_count("models/alice/bg"),
        3,
        "creation + one commit per checkpoint"
    );
    assert_tree_matches(&server, "models/alice/bg", &files_b);

    // A final error (403) is reported once, not retried.
    let uploader = Uploader::spawn(
        config(&server, Some(READ_TOKEN), tmp.path()),
        PushOptions::new("alice/bg"),
        3,
    )
    .unwrap();
    uploader.submit(&a, "step 3");
    let events = uploader.finish();
    match events.as_slice() {
        [UploadEvent::Failed {
            error,
            attempts,
            dir,
        }] => {
            assert_eq!(*attempts, 1);
            assert_eq!(dir, &a);
            assert!(error.contains("You don't have write access"), "{error}");
        }
        other => panic!("expected one failure, got {other:?}"),
    }
}

fn seed_model(server: &HubServer, repo: &str, private: bool) -> BTreeMap<String, Vec<u8>> {
    let files = BTreeMap::from([
        (
            "config.json".to_string(),
            br#"{"model_type": "gptj"}"#.to_vec(),
        ),
        ("model.safetensors".to_string(), bytes(80_000, 11)),
        (
            "tokenizer.json".to_string(),
            b"{\"version\": \"1.0\"}".to_vec(),
        ),
        ("generation_config.json".to_string(), b"{}".to_vec()),
    ]);
    let mut seeded: Vec<(&str, &[u8], bool)> = files
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice(), k.ends_with(".safetensors")))
        .collect();
    seeded.push(("README.md", b"not needed to load the model", false));
    seeded.push(("flax_model.msgpack", b"other framework", true));
    server.seed(repo, private, &seeded);
    files
}

#[test]
fn resolve_model_fills_the_cache_then_works_offline() {
    let server = HubServer::start(ServerOptions::default());
    let files = seed_model(&server, "models/alice/tiny", false);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let dir = hub::resolve_model_with(&config(&server, None, &cache), "alice/tiny", None).unwrap();
    let repo_dir = cache.join("models--alice--tiny");
    let commit = fs::read_to_string(repo_dir.join("refs/main")).unwrap();
    assert_eq!(dir, repo_dir.join("snapshots").join(&commit));
    let mut present: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    assert_eq!(
        present,
        files.keys().cloned().collect::<Vec<_>>(),
        "only what a model needs"
    );
    for (name, content) in &files {
        assert_eq!(&fs::read(dir.join(name)).unwrap(), content, "{name}");
        let link = fs::read_link(dir.join(name)).unwrap();
        assert!(
            link.starts_with("../../blobs"),
            "{name} -> {}",
            link.display()
        );
    }
    let lfs_blob = repo_dir
        .join("blobs")
        .join(hub_server::sha256_hex(&files["model.safetensors"]));
    assert!(lfs_blob.is_file(), "LFS blobs are named by sha256");

    // Offline: the same directory, without a single request.
    let seen = server.requests().len();
    let mut offline = config(&server, None, &cache);
    offline.offline = true;
    assert_eq!(
        hub::resolve_model_with(&offline, "alice/tiny", Some("main")).unwrap(),
        dir
    );
    assert_eq!(
        hub::resolve_model_with(&offline, "alice/tiny", Some(&commit)).unwrap(),
        dir
    );
    assert_eq!(server.requests().len(), seen);

    // Online again: everything is cached, so only the revision lookup goes out.
    hub::resolve_model_with(&config(&server, None, &cache), "alice/tiny", None).unwrap();
    assert_eq!(server.requests().len(), seen + 1);

    let e = hub::resolve_model_with(&offline, "alice/never-downloaded", Some("v2")).unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("HF_HUB_OFFLINE") && e.contains("alice/never-downloaded") && e.contains("v2"),
        "{e}"
    );
    assert!(e.contains(&cache.display().to_string()), "{e}");
    // A local directory is used as is.
    assert_eq!(
        hub::resolve_model_with(&offline, dir.to_str().unwrap(), None).unwrap(),
        dir
    );
}

#[test]
fn resolve_model_downloads_sharded_weights_and_resumes_partial_blobs() {
    let server = HubServer::start(ServerOptions::default());
    let shard1 = bytes(30_000, 12);
    let shard2 = bytes(20_000, 13);
    let index = br#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#;
    server.seed(
        "models/alice/sharded",
        false,
        &[
            ("config.json", b"{}", false),
            ("model.safetensors.index.json", index, false),
            ("model-00001-of-00002.safetensors", &shard1, true),
            ("model-00002-of-00002.safetensors", &shard2, true),
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    // An interrupted earlier download left the first half of shard 2.
    let blobs = cache.join("models--alice--sharded/blobs");
    fs::create_dir_all(&blobs).unwrap();
    fs::write(
        blobs.join(format!("{}.incomplete", hub_server::sha256_hex(&shard2))),
        &shard2[..10_000],
    )
    .unwrap();

    let dir =
        hub::resolve_model_with(&config(&server, None, &cache), "alice/sharded", None).unwrap();
    assert_eq!(
        fs::read(dir.join("model-00001-of-00002.safetensors")).unwrap(),
        shard1
    );
    assert_eq!(
        fs::read(dir.join("model-00002-of-00002.safetensors")).unwrap(),
        shard2
    );
    let ranged = server
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/lfs-cdn/") && r.status == 206)
        .count();
    assert_eq!(ranged, 1, "the partial blob was resumed");

    let mut offline = config(&server, None, &cache);
    offline.offline = true;
    assert_eq!(
        hub::resolve_model_with(&offline, "alice/sharded", None).unwrap(),
        dir
    );
    fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = format!(
        "{:#}",
        hub::resolve_model_with(&offline, "alice/sharded", None).unwrap_err()
    );
    assert!(
        e.contains("missing model-00002-of-00002.safetensors"),
        "{e}"
    );
}

#[test]
fn private_and_missing_repos_give_clear_errors() {
    let server = HubServer::start(ServerOptions::default());
    seed_model(&server, "models/alice/private", true);
    let tmp = tempfile::tempdir().unwrap();
    let e = format!(
        "{:#}",
        hub::resolve_model_with(&config(&server, None, tmp.path()), "alice/private", None)
            .unwrap_err()
    );
    assert!(
        e.contains("Repository not found") && e.contains("HF_TOKEN"),
        "{e}"
    );
    let dir = hub::resolve_model_with(
        &config(&server, Some(READ_TOKEN), tmp.path()),
        "alice/private",
        None,
    )
    .unwrap();
    assert!(dir.join("model.safetensors").is_file());
    let e = format!(
        "{:#}",
        hub::resolve_model_with(
            &config(&server, Some(READ_TOKEN), tmp.path()),
            "alice/private",
            Some("nope")
        )
        .unwrap_err()
    );
    assert!(e.contains("Invalid rev id: nope"), "{e}");
    let e = format!(
        "{:#}",
        hub::resolve_model_with(&config(&server, None, tmp.path()), "not a repo/../x", None)
            .unwrap_err()
    );
    assert!(
        e.contains("neither an existing directory nor a Hub repo id"),
        "{e}"
    );
    let cfg = config(&server, Some(READ_TOKEN), tmp.path());
    let e = hub::resolve_model_with(&cfg, "alice/private", Some("../../escape")).unwrap_err();
    assert!(
        format!("{e:#}").contains(
            "`../../escape` is not a revision (a branch, tag or commit of alice/private)"
        ),
        "{e:#}"
    );
}

#[test]
fn dataset_files_are_listed_and_downloaded() {
    let server = HubServer::start(ServerOptions {
        tree_page_size: 2,
        ..Default::default()
    });
    let mismatched = bytes(5_000, 14);
    server.seed(
        "datasets/nyu-mll/glue",
        false,
        &[
            ("README.md", b"# GLUE", false),
            ("mnli/train-00000-of-00001.parquet", &bytes(9_000, 15), true),
            (
                "mnli/validation_matched-00000-of-00001.parquet",
                &bytes(4_000, 16),
                true,
            ),
            (
                "mnli/validation_mismatched-00000-of-00001.parquet",
                &mismatched,
                true,
            ),
            ("ax/test-00000-of-00001.parquet", &bytes(1_000, 17), true),
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(&server, None, tmp.path());
    let files = hub::list_dataset_files(&cfg, "nyu-mll/glue", None, "mnli").unwrap();
    assert_eq!(
        files,
        vec![
            "mnli/train-00000-of-00001.parquet",
            "mnli/validation_matched-00000-of-00001.parquet",
            "mnli/validation_mismatched-00000-of-00001.parquet",
        ],
        "three entries over two pages"
    );
    let path = hub::resolve_dataset_file(&cfg, "nyu-mll/glue", None, &files[2]).unwrap();
    assert_eq!(fs::read(&path).unwrap(), mismatched);
    let split =
        hub::resolve_parquet_split(&cfg, "nyu-mll/glue", None, "mnli", "validation_mismatched")
            .unwrap();
    assert_eq!(
        split,
        vec![path.clone()],
        "validation_mismatched only, not validation_matched"
    );
    let e = format!(
        "{:#}",
        hub::resolve_parquet_split(&cfg, "nyu-mll/glue", None, "mnli", "test").unwrap_err()
    );
    assert!(
        e.contains("split `test`")
            && e.contains("train, validation_matched, validation_mismatched"),
        "{e}"
    );
    assert!(path.starts_with(tmp.path().join("datasets--nyu-mll--glue/snapshots")));

    let mut offline = cfg.clone();
    offline.offline = true;
    assert_eq!(
        hub::resolve_dataset_file(&offline, "nyu-mll/glue", None, &files[2]).unwrap(),
        path
    );
    assert_eq!(
        hub::list_dataset_files(&offline, "nyu-mll/glue", None, "mnli").unwrap(),
        vec![files[2].clone()]
    );
    let e = format!(
        "{:#}",
        hub::resolve_dataset_file(&offline, "nyu-mll/glue", None, &files[0]).unwrap_err()
    );
    assert!(
        e.contains("HF_HUB_OFFLINE") && e.contains("mnli/train-00000-of-00001.parquet"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        hub::resolve_dataset_file(&cfg, "nyu-mll/glue", None, "mnli/nope.parquet").unwrap_err()
    );
    assert!(
        e.contains("HTTP 404") && e.contains("does not exist"),
        "{e}"
    );
}

#[test]
fn kiln_push_cli() {
    let server = HubServer::start(ServerOptions::default());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let files = checkpoint(&dir, 40_000, 18);
    let home = tmp.path().join("hf_home");
    let run = |token: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args([
            "push",
            dir.to_str().unwrap(),
            "--repo",
            "alice/cli",
            "--private",
            "--message",
            "first",
        ])
        .args(["--endpoint", &server.url])
        .env("HF_HOME", &home)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN_PATH")
        .env_remove("HF_ENDPOINT");
        if let Some(t) = token {
            cmd.env("HF_TOKEN", t);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, stderr) = run(None);
    assert!(
        !ok && stderr.contains(
            "pushing to alice/cli needs a Hugging Face token with write access: set HF_TOKEN"
        ),
        "{stderr}"
    );
    assert!(server.requests().is_empty());

    let (ok, stdout, stderr) = run(Some(WRITE_TOKEN));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("pushed") && stdout.contains("4 files"),
        "{stdout}"
    );
    assert_tree_matches(&server, "models/alice/cli", &files);
    // Private: invisible without a token.
    let e = format!(
        "{:#}",
        hub::resolve_model_with(&config(&server, None, tmp.path()), "alice/cli", None).unwrap_err()
    );
    assert!(
        e.contains("model alice/cli (revision main)")
            && e.contains("(if the repo is private or gated, set HF_TOKEN)")
            && e.contains("Repository not found"),
        "{e}"
    );

    // The token file under HF_HOME counts too.
    fs::create_dir_all(&home).unwrap();
    fs::write(home.join("token"), format!("{WRITE_TOKEN}\n")).unwrap();
    let (ok, stdout, stderr) = run(None);
    assert!(
        ok && stdout.contains("nothing to commit"),
        "{stdout}{stderr}"
    );
}

#[test]
fn official_python_client_makes_the_same_commit() {
    let Some(python) = common::python_with("huggingface_hub") else {
        return;
    };
    let server = HubServer::start(ServerOptions::default());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let mut files = checkpoint(&dir, 120_000, 19);
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("sub/notes.txt"), b"nested file").unwrap();
    files.insert("sub/notes.txt".into(), b"nested file".to_vec());
    let before = fingerprint(&dir);

    hub::push_folder(
        &config(&server, Some(WRITE_TOKEN), tmp.path()),
        &dir,
        &PushOptions::new("alice/rust"),
    )
    .unwrap();
    let rust_lfs_bytes = server.lfs_bytes_received();

    let script = r#"
import sys
from huggingface_hub import HfApi
endpoint, token, folder, repo = sys.argv[1:5]
api = HfApi(endpoint=endpoint, token=token)
api.create_repo(repo, exist_ok=True)
info = api.upload_folder(folder_path=folder, repo_id=repo, commit_message="Upload with huggingface_hub")
print("COMMIT", info.oid)
again = api.upload_folder(folder_path=folder, repo_id=repo, commit_message="again")
print("AGAIN", again.oid)
"#;
    let out = std::process::Command::new(&python)
        .args([
            "-c",
            script,
            &server.url,
            WRITE_TOKEN,
            dir.to_str().unwrap(),
            "alice/python",
        ])
        .env("HF_HUB_DISABLE_XET", "1")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HOME", tmp.path().join("py_home"))
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fingerprint(&dir), before);

    let rust_tree = server.tree("models/alice/rust", "main").unwrap();
    let python_tree = server.tree("models/alice/python", "main").unwrap();
    assert_eq!(
        rust_tree, python_tree,
        "the two clients committed different trees"
    );
    assert_tree_matches(&server, "models/alice/python", &files);
    // The object was already in storage from the Rust push: Python sent no LFS bytes either.
    assert_eq!(server.lfs_bytes_received(), rust_lfs_bytes);
    // Python's second upload found nothing to change and made no commit, as ours does.
    assert_eq!(server.commit_count("models/alice/python"), 2);
    let commit = stdout
        .lines()
        .find_map(|l| l.strip_prefix("COMMIT "))
        .unwrap();
    let again = stdout
        .lines()
        .find_map(|l| l.strip_prefix("AGAIN "))
        .unwrap();
    assert_eq!(commit, again);
}

#[test]
fn official_python_client_uploads_lfs_through_the_same_server() {
    // The Python client uploading new LFS objects (multipart and basic), then our client finding
    // them all present: proves the server's LFS side matches what the official client speaks.
    let Some(python) = common::python_with("huggingface_hub") else {
        return;
    };
    let server = HubServer::start(ServerOptions::default());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let mut files = checkpoint(&dir, 100_000, 20);
    fs::write(dir.join("small.bin"), bytes(3_000, 21)).unwrap();
    files.insert("small.bin".into(), bytes(3_000, 21));
    let script = r#"
import sys
from huggingface_hub import HfApi
endpoint, token, folder, repo = sys.argv[1:5]
api = HfApi(endpoint=endpoint, token=token)
api.create_repo(repo)
api.upload_folder(folder_path=folder, repo_id=repo, commit_message="from python")
"#;
    let out = std::process::Command::new(&python)
        .args([
            "-c",
            script,
            &server.url,
            WRITE_TOKEN,
            dir.to_str().unwrap(),
            "alice/py-first",
        ])
        .env("HF_HUB_DISABLE_XET", "1")
        .env("HF_HOME", tmp.path().join("py_home"))
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = server.tree("models/alice/py-first", "main").unwrap();
    assert_eq!(tree.len(), 5);
    for (path, entry) in &tree {
        assert_eq!(server.content(entry), files[path], "{path}");
    }
    assert_eq!(server.lfs_bytes_received(), 103_000);
    let report = hub::push_folder(
        &config(&server, Some(WRITE_TOKEN), tmp.path()),
        &dir,
        &PushOptions::new("alice/py-first"),
    )
    .unwrap();
    assert_eq!(
        report.commit_oid, None,
        "our client sees Python's commit as identical"
    );
    assert_eq!(report.unchanged_files.len(), 5);
}

#[test]
fn push_into_a_folder_honours_the_repo_gitignore() {
    let server = HubServer::start(ServerOptions::default());
    server.seed(
        "models/alice/runs",
        false,
        &[(".gitignore", b"# scratch\n*.tmp\nwandb-id\n", false)],
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("step-100");
    let files = checkpoint(&dir, 10_000, 22);
    fs::write(dir.join("scratch.tmp"), b"partial").unwrap();
    fs::write(dir.join("wandb-id"), b"abc").unwrap();
    let mut options = PushOptions::new("alice/runs");
    options.path_in_repo = "checkpoints/step-100".into();
    let report = hub::push_folder(
        &config(&server, Some(WRITE_TOKEN), tmp.path()),
        &dir,
        &options,
    )
    .unwrap();
    let mut ignored = report.ignored_files.clone();
    ignored.sort();
    assert_eq!(
        ignored,
        vec![
            "checkpoints/step-100/scratch.tmp",
            "checkpoints/step-100/wandb-id"
        ]
    );
    let tree = server.tree("models/alice/runs", "main").unwrap();
    let mut expected: Vec<String> = files
        .keys()
        .map(|k| format!("checkpoints/step-100/{k}"))
        .collect();
    expected.push(".gitignore".into());
    expected.sort();
    assert_eq!(tree.keys().cloned().collect::<Vec<_>>(), expected);
    for (name, content) in &files {
        assert_eq!(
            &server.content(&tree[&format!("checkpoints/step-100/{name}")]),
            content,
            "{name}"
        );
    }
}

#[test]
fn offline_push_is_refused_before_any_request() {
    let server = HubServer::start(ServerOptions::default());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    checkpoint(&dir, 1000, 23);
    let mut cfg = config(&server, Some(WRITE_TOKEN), tmp.path());
    cfg.offline = true;
    let e = format!(
        "{:#}",
        hub::push_folder(&cfg, &dir, &PushOptions::new("alice/x")).unwrap_err()
    );
    assert!(
        e.contains("HF_HUB_OFFLINE is set: pushing to alice/x needs the network"),
        "{e}"
    );
    assert!(server.requests().is_empty());
}

#[test]
fn unreachable_hub_falls_back_to_a_complete_cached_snapshot() {
    let server = HubServer::start(ServerOptions::default());
    seed_model(&server, "models/alice/cached", false);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let dir =
        hub::resolve_model_with(&config(&server, None, &cache), "alice/cached", None).unwrap();
    // A port nothing listens on: every connection is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut unreachable = HubConfig::new(&url, None, cache.clone(), false);
    unreachable.retry = RetryPolicy {
        max_attempts: 2,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(1),
    };
    assert_eq!(
        hub::resolve_model_with(&unreachable, "alice/cached", None).unwrap(),
        dir
    );
    let e = format!(
        "{:#}",
        hub::resolve_model_with(&unreachable, "alice/elsewhere", None).unwrap_err()
    );
    assert!(
        e.contains("alice/elsewhere") && e.contains("revision/main"),
        "{e}"
    );
}

#[test]
fn cache_is_shared_with_the_official_python_client() {
    let Some(python) = common::python_with("huggingface_hub") else {
        return;
    };
    let server = HubServer::start(ServerOptions::default());
    let files = seed_model(&server, "models/alice/shared", false);
    let tmp = tempfile::tempdir().unwrap();
    let hf_home = tmp.path().join("hf_home");
    let cache = hf_home.join("hub");
    let script = r#"
import sys
from huggingface_hub import hf_hub_download
repo, names = sys.argv[1], sys.argv[2:]
for name in names:
    print(hf_hub_download(repo, name))
"#;
    let run_python = |repo: &str, offline: bool| {
        let mut cmd = std::process::Command::new(&python);
        cmd.args(["-c", script, repo])
            .args(files.keys())
            .env("HF_ENDPOINT", &server.url)
            .env("HF_HOME", &hf_home)
            .env("HF_HUB_DISABLE_XET", "1")
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_CACHE");
        if offline {
            cmd.env("HF_HUB_OFFLINE", "1");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "python: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(PathBuf::from)
            .collect::<Vec<_>>()
    };
    // Python fills the cache; we read it offline.
    let python_paths = run_python("alice/shared", false);
    let mut offline = config(&server, None, &cache);
    offline.offline = true;
    let dir = hub::resolve_model_with(&offline, "alice/shared", None).unwrap();
    for (path, name) in python_paths.iter().zip(files.keys()) {
        assert_eq!(
            path,
            &dir.join(name),
            "both clients agree on where {name} lives"
        );
        assert_eq!(&fs::read(path).unwrap(), &files[name]);
    }

    // We fill the cache; Python reads it offline.
    server.seed(
        "models/alice/ours",
        false,
        &[
            ("config.json", b"{}", false),
            ("model.safetensors", &bytes(5_000, 24), true),
        ],
    );
    let ours = hub::resolve_model_with(&config(&server, None, &cache), "alice/ours", None).unwrap();
    let mut cmd = std::process::Command::new(&python);
    let out = cmd
        .args([
            "-c",
            script,
            "alice/ours",
            "config.json",
            "model.safetensors",
        ])
        .env("HF_HOME", &hf_home)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python offline: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let paths: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    assert_eq!(
        paths,
        vec![ours.join("config.json"), ours.join("model.safetensors")]
    );
}

/// `kiln train` with `checkpoint.push_to_hub`, against `server`, as `token`.
fn train_with_push(server: &HubServer, token: &str, out: &Path) -> (bool, String, String) {
    let bundled = |p: &str| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("datasets/nli")
            .join(p)
            .display()
            .to_string()
    };
    let recipe = out.join("recipe.yaml");
    fs::write(
        &recipe,
        format!(
            "name: pushed\n\
             model: {{init: {{preset: tiny, vocab_size: 1024}}}}\n\
             tokenizer: {}\n\
             data: {{train: [{{source: {{path: {}}}, template: mnli, limit: 64}}], seq_len: 64, mode: pad}}\n\
             batch: {{global: 4, micro: 4}}\n\
             steps: 4\n\
             checkpoint: {{every: 2, dir: {}, push_to_hub: {{repo: alice/kiln-run, private: true}}}}\n\
             tracking: {{log_dir: {}}}\n",
            bundled("tokenizer"),
            bundled("train.jsonl"),
            out.join("checkpoints").display(),
            out.join("runs").display()
        ),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", recipe.to_str().unwrap(), "--quiet"])
        .env("HF_ENDPOINT", &server.url)
        .env("HF_TOKEN", token)
        .env("HF_HOME", out.join("hf"))
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn training_uploads_every_checkpoint_in_the_background() {
    let server = HubServer::start(ServerOptions::default());
    let tmp = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = train_with_push(&server, WRITE_TOKEN, tmp.path());
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(stdout.matches("uploaded ").count(), 2, "{stdout}");
    // The repo's creation, then one commit per checkpoint (steps 2 and 4).
    assert_eq!(server.commit_count("models/alice/kiln-run"), 3);
    let tree = server.tree("models/alice/kiln-run", "main").unwrap();
    let local = tmp.path().join("checkpoints/pushed/step-4");
    let mut names: Vec<String> = fs::read_dir(&local)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(tree.keys().cloned().collect::<Vec<_>>(), names);
    for (name, entry) in &tree {
        assert_eq!(
            server.content(entry),
            fs::read(local.join(name)).unwrap(),
            "{name} on the Hub differs from the local checkpoint"
        );
    }
}

#[test]
fn a_refused_upload_never_stops_training_or_touches_the_checkpoint() {
    let server = HubServer::start(ServerOptions::default());
    let tmp = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = train_with_push(&server, READ_TOKEN, tmp.path());
    assert!(ok, "training must finish: {stdout}\n{stderr}");
    let failures: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning: uploading "))
        .collect();
    assert!(!failures.is_empty(), "{stderr}");
    for line in failures {
        assert!(
            line.contains("checkpoints/pushed/step-")
                && line.contains(" failed after ")
                && line.contains("You don't have the rights to create a model under the namespace")
                && line
                    .contains("(the local checkpoint is intact; push it later with `kiln push`)"),
            "{line}"
        );
    }
    assert_eq!(server.commit_count("models/alice/kiln-run"), 0);
    for step in [2, 4] {
        let dir = tmp.path().join(format!("checkpoints/pushed/step-{step}"));
        kiln::checkpoint::verify(&dir).expect("the local checkpoint is intact");
    }
}

#[test]
fn push_to_hub_without_a_token_fails_before_training() {
    let server = HubServer::start(ServerOptions::default());
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = train_with_push(&server, "", tmp.path());
    assert!(!ok);
    assert!(
        stderr.contains("checkpoint.push_to_hub needs a Hub token with write access: set HF_TOKEN"),
        "{stderr}"
    );
    assert!(!tmp.path().join("checkpoints").exists());
    assert!(server.requests().is_empty(), "no byte is sent");
}

#[test]
fn a_metadata_redirect_to_another_host_never_carries_the_token() {
    let server = HubServer::start(ServerOptions::default());
    let files = seed_model(&server, "models/alice/tiny", false);
    // Every HEAD of a file answers with an absolute Location on the storage origin, which
    // refuses any request that carries the Hub token.
    server.inject(Fault {
        method: "HEAD",
        path_contains: "/alice/tiny/resolve/".into(),
        skip: 0,
        times: usize::MAX,
        action: FaultAction::RedirectToMirror,
    });
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let dir = hub::resolve_model_with(
        &config(&server, Some(READ_TOKEN), &cache),
        "alice/tiny",
        None,
    )
    .unwrap();
    for (name, content) in &files {
        assert_eq!(&fs::read(dir.join(name)).unwrap(), content, "{name}");
    }
    let mirrored: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/mirror/"))
        .collect();
    assert_eq!(
        mirrored.iter().filter(|r| r.method == "HEAD").count(),
        files.len(),
        "{mirrored:?}"
    );
    assert!(mirrored.iter().all(|r| r.status != 400), "{mirrored:?}");
}

#[test]
fn concurrent_resolves_on_a_cold_cache_download_each_file_once() {
    let server = HubServer::start(ServerOptions::default());
    // Large enough that the downloads of all the resolvers overlap.
    let weights = bytes(8 << 20, 21);
    server.seed(
        "models/alice/big",
        false,
        &[
            ("config.json", br#"{"model_type": "gptj"}"#, false),
            ("model.safetensors", &weights, true),
            ("tokenizer.json", b"{\"version\": \"1.0\"}", false),
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    const RESOLVERS: usize = 8;
    let start = std::sync::Barrier::new(RESOLVERS);
    let dirs: Vec<PathBuf> = std::thread::scope(|scope| {
        let resolvers: Vec<_> = (0..RESOLVERS)
            .map(|_| {
                scope.spawn(|| {
                    start.wait();
                    hub::resolve_model_with(&config(&server, None, &cache), "alice/big", None)
                })
            })
            .collect();
        resolvers
            .into_iter()
            .map(|r| r.join().unwrap().unwrap())
            .collect()
    });
    assert!(dirs.iter().all(|d| d == &dirs[0]), "{dirs:?}");
    assert_eq!(
        fs::read(dirs[0].join("model.safetensors")).unwrap(),
        weights
    );
    let mut downloads: BTreeMap<String, usize> = BTreeMap::new();
    for request in server.requests() {
        let is_file = request.path.contains("/resolve/") || request.path.starts_with("/lfs-cdn/");
        if request.method == "GET" && is_file {
            *downloads.entry(request.path).or_default() += 1;
        }
    }
    assert_eq!(downloads.len(), 3, "{downloads:?}");
    assert!(downloads.values().all(|&n| n == 1), "{downloads:?}");
    let blobs = cache.join("models--alice--big/blobs");
    let leftovers: Vec<_> = fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".incomplete"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let locks = cache.join(".locks/models--alice--big");
    assert!(
        locks
            .join(format!("{}.lock", hub_server::sha256_hex(&weights)))
            .is_file(),
        "huggingface_hub's lock file layout"
    );
}
