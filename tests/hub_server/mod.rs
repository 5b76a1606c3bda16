//! A local stand-in for the Hugging Face Hub, enough of it for pushes and downloads:
//! repo creation, preupload, the LFS batch API with basic and multipart transfers and verify,
//! NDJSON commits, revision/tree info and `resolve` downloads (with LFS redirects and ranges).
//! It checks what a client sends (tokens, sha256 and sizes of LFS objects, base64 of inline files,
//! that committed LFS objects were uploaded) and can be told to fail chosen requests.
//!
//! HTTP/1.1 over std's TcpListener, one thread per connection, bound to 127.0.0.1. As on the real
//! Hub, LFS storage (presigned upload URLs, the download CDN) is another origin than the Hub
//! itself: a second port, which must never see the Hub token.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Tokens the server knows: alice may write to `alice/*` with the first, only read with the
/// second; bob writes only to `bob/*`.
pub const WRITE_TOKEN: &str = "hf_test_alice_write";
pub const READ_TOKEN: &str = "hf_test_alice_read";
pub const BOB_TOKEN: &str = "hf_test_bob_write";

/// File name suffixes the Hub's default `.gitattributes` routes through LFS.
const LFS_SUFFIXES: &[&str] = &[
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".parquet",
    ".arrow",
    ".zip",
    ".gz",
];

#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Files at least this large go through LFS (the Hub uses 10 MB).
    pub lfs_threshold: u64,
    /// LFS objects larger than this get a multipart transfer when the client accepts one.
    pub multipart_threshold: u64,
    pub chunk_size: u64,
    /// Whether batch answers include a `verify` action.
    pub verify: bool,
    /// Entries per page of the tree API.
    pub tree_page_size: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            lfs_threshold: 10 << 20,
            multipart_threshold: 64 << 10,
            chunk_size: 32 << 10,
            verify: true,
            tree_page_size: 1000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Regular(Vec<u8>),
    Lfs { oid: String, size: u64 },
}

#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub body_len: usize,
    pub chunked: bool,
    pub status: u16,
}

#[derive(Clone, Debug)]
pub enum FaultAction {
    /// Answer with this status and `{"error": message}`.
    Status(u16, String),
    /// Read part of the request body, then close the connection.
    DropMidBody,
    /// Read the whole request, then close the connection without answering.
    DropBeforeResponse,
    /// Answer 302 with an absolute `Location` on the storage origin, which serves the same path
    /// under `/mirror` (a mirror on another host: it must never see the Hub token).
    RedirectToMirror,
}

/// Fails the matching requests: `method` and a substring of the path; the first `skip` matching
/// requests pass, the next `times` fail.
#[derive(Clone, Debug)]
pub struct Fault {
    pub method: &'static str,
    pub path_contains: String,
    pub skip: usize,
    pub times: usize,
    pub action: FaultAction,
}

struct Repo {
    private: bool,
    branches: HashMap<String, String>,
    commits: HashMap<String, BTreeMap<String, Entry>>,
    commit_count: usize,
}

struct PendingMultipart {
    size: u64,
    parts: Vec<Option<(String, Vec<u8>)>>,
}

struct State {
    options: ServerOptions,
    base: String,
    /// Origin of the storage listener.
    storage: String,
    tokens: HashMap<String, (String, bool)>,
    repos: HashMap<String, Repo>,
    lfs: HashMap<String, Vec<u8>>,
    /// oid → size announced in the batch request, for objects a client was told to upload.
    expected: HashMap<String, u64>,
    multipart: HashMap<String, PendingMultipart>,
    log: Vec<Logged>,
    faults: Vec<Fault>,
    lfs_bytes_received: u64,
    next_commit: u64,
}

pub struct HubServer {
    pub url: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    ports: [u16; 2],
}

impl HubServer {
    pub fn start(options: ServerOptions) -> HubServer {
        let hub = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let storage = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let ports = [
            hub.local_addr().unwrap().port(),
            storage.local_addr().unwrap().port(),
        ];
        let url = format!("http://127.0.0.1:{}", ports[0]);
        let tokens = HashMap::from([
            (WRITE_TOKEN.to_string(), ("alice".to_string(), true)),
            (READ_TOKEN.to_string(), ("alice".to_string(), false)),
            (BOB_TOKEN.to_string(), ("bob".to_string(), true)),
        ]);
        let state = Arc::new(Mutex::new(State {
            options,
            base: url.clone(),
            storage: format!("http://127.0.0.1:{}", ports[1]),
            tokens,
            repos: HashMap::new(),
            lfs: HashMap::new(),
            expected: HashMap::new(),
            multipart: HashMap::new(),
            log: Vec::new(),
            faults: Vec::new(),
            lfs_bytes_received: 0,
            next_commit: 1,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        for (listener, is_storage) in [(hub, false), (storage, true)] {
            let (st, sp) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if sp.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let st = st.clone();
                    std::thread::spawn(move || serve_connection(stream, st, is_storage));
                }
            });
        }
        HubServer {
            url,
            state,
            stop,
            ports,
        }
    }

    pub fn inject(&self, fault: Fault) {
        self.state.lock().unwrap().faults.push(fault);
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn lfs_bytes_received(&self) -> u64 {
        self.state.lock().unwrap().lfs_bytes_received
    }

    /// The files of `repo` (`models/owner/name` or `datasets/owner/name`) at branch or commit `rev`.
    pub fn tree(&self, repo: &str, rev: &str) -> Option<BTreeMap<String, Entry>> {
        let state = self.state.lock().unwrap();
        let r = state.repos.get(repo)?;
        let commit = r
            .branches
            .get(rev)
            .cloned()
            .unwrap_or_else(|| rev.to_string());
        r.commits.get(&commit).cloned()
    }

    /// Content of a tree entry, LFS objects resolved through storage.
    pub fn content(&self, entry: &Entry) -> Vec<u8> {
        match entry {
            Entry::Regular(bytes) => bytes.clone(),
            Entry::Lfs { oid, .. } => self.state.lock().unwrap().lfs[oid].clone(),
        }
    }

    /// Commits on `repo`, the repo's creation included.
    pub fn commit_count(&self, repo: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .repos
            .get(repo)
            .map(|r| r.commit_count)
            .unwrap_or(0)
    }

    /// Puts files straight into a repo (created if needed) as one commit on `main`.
    pub fn seed(&self, repo: &str, private: bool, files: &[(&str, &[u8], bool)]) -> String {
        self.seed_branch(repo, private, "main", files)
    }

    /// Puts files straight into a repo (created if needed) as one commit on `branch`, which
    /// starts from `main` when it is new (as a branch made on the Hub does).
    pub fn seed_branch(
        &self,
        repo: &str,
        private: bool,
        branch: &str,
        files: &[(&str, &[u8], bool)],
    ) -> String {
        let mut state = self.state.lock().unwrap();
        if !state.repos.contains_key(repo) {
            let repo_state = new_repo(&mut state, private);
            state.repos.insert(repo.to_string(), repo_state);
        }
        let mut tree = head_tree(&state, repo, branch)
            .or_else(|| head_tree(&state, repo, "main"))
            .unwrap();
        for (path, bytes, lfs) in files {
            let entry = if *lfs {
                let oid = sha256_hex(bytes);
                state.lfs.insert(oid.clone(), bytes.to_vec());
                Entry::Lfs {
                    oid,
                    size: bytes.len() as u64,
                }
            } else {
                Entry::Regular(bytes.to_vec())
            };
            tree.insert(path.to_string(), entry);
        }
        add_commit(&mut state, repo, branch, tree)
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loops so they see the flag.
        for port in self.ports {
            let _ = TcpStream::connect(("127.0.0.1", port));
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn git_blob_sha1(bytes: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex::encode(h.finalize())
}

fn new_repo(state: &mut State, private: bool) -> Repo {
    let commit = next_commit_id(state);
    Repo {
        private,
        branches: HashMap::from([("main".to_string(), commit.clone())]),
        commits: HashMap::from([(commit, BTreeMap::new())]),
        commit_count: 1,
    }
}

fn next_commit_id(state: &mut State) -> String {
    state.next_commit += 1;
    hex::encode(&Sha256::digest(state.next_commit.to_le_bytes())[..20])
}

fn head_tree(state: &State, repo: &str, rev: &str) -> Option<BTreeMap<String, Entry>> {
    let r = state.repos.get(repo)?;
    let commit = r
        .branches
        .get(rev)
        .cloned()
        .unwrap_or_else(|| rev.to_string());
    r.commits.get(&commit).cloned()
}

fn add_commit(
    state: &mut State,
    repo: &str,
    branch: &str,
    tree: BTreeMap<String, Entry>,
) -> String {
    let commit = next_commit_id(state);
    let r = state.repos.get_mut(repo).unwrap();
    r.commits.insert(commit.clone(), tree);
    r.branches.insert(branch.to_string(), commit.clone());
    r.commit_count += 1;
    commit
}

struct Request {
    method: String,
    path: String,
    query: HashMap<String, String>,
    headers: HashMap<String, String>,
    body: Vec<u8>,
    chunked: bool,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn json_response(status: u16, value: Value) -> Response {
    Response {
        status,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: serde_json::to_vec(&value).unwrap(),
    }
}

fn error(status: u16, message: &str) -> Response {
    json_response(status, json!({ "error": message }))
}

fn error_code(status: u16, code: &str, message: &str) -> Response {
    let mut r = error(status, message);
    r.headers.push(("X-Error-Code".into(), code.into()));
    r.headers.push(("X-Error-Message".into(), message.into()));
    r
}

fn serve_connection(stream: TcpStream, state: Arc<Mutex<State>>, is_storage: bool) {
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let Some((method, target, headers)) = read_head(&mut reader) else {
            return;
        };
        let (path, query) = split_query(&target);
        let fault = take_fault(&state, &method, &path);
        let chunked = headers
            .get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if let Some(FaultAction::DropMidBody) = fault {
            let len: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut partial = vec![0u8; len / 2];
            let _ = reader.read_exact(&mut partial);
            log(&state, &method, &path, partial.len(), chunked, 0);
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
        let Some(body) = read_body(&mut reader, &headers, chunked) else {
            return;
        };
        let request = Request {
            method,
            path,
            query,
            headers,
            body,
            chunked,
        };
        let response = match fault {
            Some(FaultAction::DropBeforeResponse) => {
                log(
                    &state,
                    &request.method,
                    &request.path,
                    request.body.len(),
                    chunked,
                    0,
                );
                let _ = writer.shutdown(Shutdown::Both);
                return;
            }
            Some(FaultAction::Status(status, message)) => error(status, &message),
            // The mirror's own paths contain the Hub's: it answers them itself.
            Some(FaultAction::RedirectToMirror) if !is_storage => {
                let storage = state.lock().unwrap().storage.clone();
                Response {
                    status: 302,
                    headers: vec![(
                        "Location".into(),
                        format!("{storage}/mirror{}", request.path),
                    )],
                    body: vec![],
                }
            }
            _ => {
                let mut st = state.lock().unwrap();
                if is_storage {
                    route_storage(&mut st, &request)
                } else {
                    route(&mut st, &request)
                }
            }
        };
        log(
            &state,
            &request.method,
            &request.path,
            request.body.len(),
            chunked,
            response.status,
        );
        let close = request
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        if write_response(&mut writer, &request.method, &response, close).is_err() || close {
            return;
        }
    }
}

fn log(
    state: &Mutex<State>,
    method: &str,
    path: &str,
    body_len: usize,
    chunked: bool,
    status: u16,
) {
    state.lock().unwrap().log.push(Logged {
        method: method.to_string(),
        path: path.to_string(),
        body_len,
        chunked,
        status,
    });
}

fn take_fault(state: &Mutex<State>, method: &str, path: &str) -> Option<FaultAction> {
    let mut st = state.lock().unwrap();
    for fault in st.faults.iter_mut() {
        if fault.method == method && path.contains(&fault.path_contains) && fault.times > 0 {
            if fault.skip > 0 {
                fault.skip -= 1;
                continue;
            }
            fault.times -= 1;
            return Some(fault.action.clone());
        }
    }
    None
}

type Head = (String, String, HashMap<String, String>);

fn read_head(reader: &mut impl BufRead) -> Option<Head> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    Some((method, target, headers))
}

fn read_body(
    reader: &mut impl BufRead,
    headers: &HashMap<String, String>,
    chunked: bool,
) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line).ok()?;
            let size = usize::from_str_radix(size_line.trim().split(';').next()?, 16).ok()?;
            if size == 0 {
                // Trailers until the empty line.
                loop {
                    let mut t = String::new();
                    reader.read_line(&mut t).ok()?;
                    if t.trim().is_empty() {
                        break;
                    }
                }
                return Some(body);
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..]).ok()?;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf).ok()?;
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    body.resize(len, 0);
    reader.read_exact(&mut body).ok()?;
    Some(body)
}

fn write_response(
    w: &mut TcpStream,
    method: &str,
    r: &Response,
    close: bool,
) -> std::io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", r.status);
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n", r.body.len()));
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    if method != "HEAD" {
        w.write_all(&r.body)?;
    }
    w.flush()
}

fn split_query(target: &str) -> (String, HashMap<String, String>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    (path.to_string(), query)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Who the request is from: Ok(None) anonymous, Ok(Some((user, can_write))), Err for a bad token.
fn caller(state: &State, req: &Request) -> Result<Option<(String, bool)>, Response> {
    match req.header("authorization") {
        None => Ok(None),
        Some(h) => match h
            .strip_prefix("Bearer ")
            .and_then(|t| state.tokens.get(t.trim()))
        {
            Some(who) => Ok(Some(who.clone())),
            None => Err(error(401, "Invalid credentials in Authorization header")),
        },
    }
}

fn require_write(state: &State, req: &Request, repo: &str) -> Result<(), Response> {
    let Some((user, can_write)) = caller(state, req)? else {
        return Err(error(401, "Invalid username or password."));
    };
    let namespace = repo.split('/').nth(1).unwrap_or_default();
    if !state.repos.contains_key(repo) {
        return Err(error_code(404, "RepoNotFound", "Repository not found"));
    }
    if !can_write || namespace != user {
        return Err(error(
            403,
            &format!(
                "You don't have write access to {}",
                &repo[repo.find('/').unwrap() + 1..]
            ),
        ));
    }
    Ok(())
}

fn require_read(state: &State, req: &Request, repo: &str) -> Result<(), Response> {
    let who = caller(state, req)?;
    let Some(r) = state.repos.get(repo) else {
        return Err(error_code(404, "RepoNotFound", "Repository not found"));
    };
    let namespace = repo.split('/').nth(1).unwrap_or_default();
    if r.private && who.map(|(u, _)| u) != Some(namespace.to_string()) {
        // The Hub does not reveal private repos to others.
        return Err(error_code(404, "RepoNotFound", "Repository not found"));
    }
    Ok(())
}

fn route(state: &mut State, req: &Request) -> Response {
    let segments: Vec<String> = req
        .path
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
    let m = req.method.as_str();
    let result = match (m, seg.as_slice()) {
        ("POST", ["api", "repos", "create"]) => create_repo(state, req),
        ("POST", ["api", "validate-yaml"]) => {
            Ok(json_response(200, json!({"errors": [], "warnings": []})))
        }
        ("GET", ["api", kind @ ("models" | "datasets"), owner, name]) => {
            revision_info(state, req, &format!("{kind}/{owner}/{name}"), "main")
        }
        (_, ["api", kind @ ("models" | "datasets"), owner, name, action, rest @ ..])
            if !rest.is_empty() =>
        {
            let repo = format!("{kind}/{owner}/{name}");
            // A revision such as refs/pr/1 arrives percent-encoded as one segment.
            let rev = rest[0];
            let path = rest[1..].join("/");
            match (m, *action) {
                ("GET", "revision") => revision_info(state, req, &repo, &rest.join("/")),
                ("GET", "tree") => tree_listing(state, req, &repo, rev, &path),
                ("POST", "preupload") => preupload(state, req, &repo, rev),
                ("POST", "commit") => commit(state, req, &repo, rev),
                _ => Err(error(404, "Not Found")),
            }
        }
        ("POST", [owner, git, "info", "lfs", "objects", "batch"]) if git.ends_with(".git") => {
            lfs_batch(
                state,
                req,
                &format!("models/{owner}/{}", git.trim_end_matches(".git")),
            )
        }
        ("POST", ["datasets", owner, git, "info", "lfs", "objects", "batch"])
            if git.ends_with(".git") =>
        {
            lfs_batch(
                state,
                req,
                &format!("datasets/{owner}/{}", git.trim_end_matches(".git")),
            )
        }
        ("POST", ["lfs-multipart", oid, "complete"]) => multipart_complete(state, req, oid),
        ("POST", ["lfs-verify", oid]) => lfs_verify(state, req, oid),
        ("GET" | "HEAD", ["datasets", owner, name, "resolve", rev, path @ ..])
            if !path.is_empty() =>
        {
            resolve(
                state,
                req,
                &format!("datasets/{owner}/{name}"),
                rev,
                &path.join("/"),
            )
        }
        ("GET" | "HEAD", [owner, name, "resolve", rev, path @ ..]) if !path.is_empty() => resolve(
            state,
            req,
            &format!("models/{owner}/{name}"),
            rev,
            &path.join("/"),
        ),
        _ => Err(error(404, "Not Found")),
    };
    result.unwrap_or_else(|e| e)
}

/// The storage origin: presigned uploads and the download CDN.
fn route_storage(state: &mut State, req: &Request) -> Response {
    if req.header("authorization").is_some() {
        return error(
            400,
            "storage URLs are presigned; the Hub token must not be sent here",
        );
    }
    let segments: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let result = match (req.method.as_str(), segments.as_slice()) {
        ("PUT", ["lfs-storage", oid]) => storage_put(state, req, oid),
        ("PUT", ["lfs-multipart", oid, part]) => multipart_put(state, req, oid, part),
        ("GET" | "HEAD", ["lfs-cdn", oid]) => cdn_get(state, req, oid),
        ("GET" | "HEAD", ["mirror", owner, name, "resolve", rev, path @ ..])
            if !path.is_empty() =>
        {
            let path = path.iter().map(|p| percent_decode(p)).collect::<Vec<_>>();
            resolve(
                state,
                req,
                &format!("models/{owner}/{name}"),
                rev,
                &path.join("/"),
            )
        }
        _ => Err(error(404, "NoSuchKey")),
    };
    result.unwrap_or_else(|e| e)
}

fn parse_json(req: &Request) -> Result<Value, Response> {
    serde_json::from_slice(&req.body).map_err(|e| error(400, &format!("invalid JSON body: {e}")))
}

fn create_repo(state: &mut State, req: &Request) -> Result<Response, Response> {
    let Some((user, can_write)) = caller(state, req)? else {
        return Err(error(401, "Invalid username or password."));
    };
    let body = parse_json(req)?;
    let name = body
        .get("name")
        .and_then(|v| v.as_str())
        .ok_or_else(|| error(400, "`name` is required"))?;
    let namespace = body
        .get("organization")
        .and_then(|v| v.as_str())
        .unwrap_or(&user)
        .to_string();
    let kind = match body.get("type").and_then(|v| v.as_str()).unwrap_or("model") {
        "model" => "models",
        "dataset" => "datasets",
        other => return Err(error(400, &format!("unsupported repo type {other}"))),
    };
    if !can_write || namespace != user {
        return Err(error(
            403,
            &format!(
                "You don't have the rights to create a model under the namespace \"{namespace}\""
            ),
        ));
    }
    let repo = format!("{kind}/{namespace}/{name}");
    if state.repos.contains_key(&repo) {
        return Err(error(409, "You already created this model repo"));
    }
    let private = body.get("visibility").and_then(|v| v.as_str()) == Some("private")
        || body.get("private").and_then(|v| v.as_bool()) == Some(true);
    let r = new_repo(state, private);
    state.repos.insert(repo, r);
    Ok(json_response(
        200,
        json!({"url": format!("{}/{namespace}/{name}", state.base), "name": format!("{namespace}/{name}")}),
    ))
}

fn revision_info(
    state: &State,
    req: &Request,
    repo: &str,
    rev: &str,
) -> Result<Response, Response> {
    require_read(state, req, repo)?;
    let r = &state.repos[repo];
    let commit = r
        .branches
        .get(rev)
        .cloned()
        .unwrap_or_else(|| rev.to_string());
    let tree = r
        .commits
        .get(&commit)
        .ok_or_else(|| error_code(404, "RevisionNotFound", &format!("Invalid rev id: {rev}")))?;
    let id = repo.split_once('/').unwrap().1;
    Ok(json_response(
        200,
        json!({
            "id": id,
            "sha": commit,
            "private": r.private,
            "siblings": tree.keys().map(|k| json!({"rfilename": k})).collect::<Vec<_>>(),
        }),
    ))
}

fn tree_listing(
    state: &State,
    req: &Request,
    repo: &str,
    rev: &str,
    prefix: &str,
) -> Result<Response, Response> {
    require_read(state, req, repo)?;
    let tree = head_tree(state, repo, rev)
        .ok_or_else(|| error_code(404, "RevisionNotFound", &format!("Invalid rev id: {rev}")))?;
    let recursive = req
        .query
        .get("recursive")
        .is_some_and(|v| v == "true" || v == "1");
    let dir = prefix.trim_matches('/');
    let mut entries: Vec<Value> = Vec::new();
    let mut dirs_seen = Vec::new();
    for (path, entry) in &tree {
        let rel = if dir.is_empty() {
            path.as_str()
        } else if let Some(r) = path.strip_prefix(dir).and_then(|r| r.strip_prefix('/')) {
            r
        } else {
            continue;
        };
        if !recursive {
            if let Some((sub, _)) = rel.split_once('/') {
                let full = if dir.is_empty() {
                    sub.to_string()
                } else {
                    format!("{dir}/{sub}")
                };
                if !dirs_seen.contains(&full) {
                    entries.push(json!({"type": "directory", "path": full, "oid": "0", "size": 0}));
                    dirs_seen.push(full);
                }
                continue;
            }
        }
        let size = match entry {
            Entry::Regular(b) => b.len() as u64,
            Entry::Lfs { size, .. } => *size,
        };
        let mut v = json!({"type": "file", "path": path, "size": size});
        if let Entry::Lfs { oid, size } = entry {
            v["lfs"] = json!({"oid": oid, "size": size, "pointerSize": 134});
        }
        entries.push(v);
    }
    if entries.is_empty() && !dir.is_empty() {
        return Err(error_code(
            404,
            "EntryNotFound",
            &format!("{dir} does not exist on \"{rev}\""),
        ));
    }
    let page = state.options.tree_page_size.max(1);
    let cursor: usize = req
        .query
        .get("cursor")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let end = (cursor + page).min(entries.len());
    let mut response = json_response(200, Value::Array(entries[cursor.min(end)..end].to_vec()));
    if end < entries.len() {
        let link = format!(
            "<{}{}?recursive={}&cursor={end}>; rel=\"next\"",
            state.base, req.path, recursive
        );
        response.headers.push(("Link".into(), link));
    }
    Ok(response)
}

fn is_lfs_path(state: &State, path: &str, size: u64, sample: &[u8]) -> bool {
    size >= state.options.lfs_threshold
        || LFS_SUFFIXES.iter().any(|s| path.ends_with(s))
        || sample.contains(&0)
}

fn gitignored(tree: &BTreeMap<String, Entry>, path: &str) -> bool {
    let Some(Entry::Regular(rules)) = tree.get(".gitignore") else {
        return false;
    };
    let name = path.rsplit('/').next().unwrap_or(path);
    String::from_utf8_lossy(rules)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .any(|rule| match rule.strip_prefix('*') {
            Some(suffix) => name.ends_with(suffix),
            None => rule == path || rule == name,
        })
}

fn preupload(state: &State, req: &Request, repo: &str, rev: &str) -> Result<Response, Response> {
    require_write(state, req, repo)?;
    let tree = head_tree(state, repo, rev)
        .ok_or_else(|| error_code(404, "RevisionNotFound", &format!("Invalid rev id: {rev}")))?;
    let body = parse_json(req)?;
    let files = body
        .get("files")
        .and_then(|f| f.as_array())
        .ok_or_else(|| error(400, "`files` must be an array"))?;
    let mut out = Vec::new();
    for f in files {
        let path = f
            .get("path")
            .and_then(|p| p.as_str())
            .ok_or_else(|| error(400, "each file needs a `path`"))?;
        let size = f
            .get("size")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| error(400, &format!("{path}: `size` must be an integer")))?;
        let sample = f
            .get("sample")
            .and_then(|s| s.as_str())
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            .ok_or_else(|| error(400, &format!("{path}: `sample` must be base64")))?;
        if sample.len() > 512 || sample.len() as u64 > size {
            return Err(error(
                400,
                &format!("{path}: the sample must be the first bytes of the file (at most 512)"),
            ));
        }
        let lfs = is_lfs_path(state, path, size, &sample);
        let oid = tree.get(path).map(|e| match e {
            Entry::Regular(b) => git_blob_sha1(b),
            Entry::Lfs { oid, .. } => oid.clone(),
        });
        out.push(json!({
            "path": path,
            "uploadMode": if lfs { "lfs" } else { "regular" },
            "shouldIgnore": gitignored(&tree, path),
            "oid": oid,
        }));
    }
    Ok(json_response(
        200,
        json!({"files": out, "commitOid": state.repos[repo].branches.get(rev)}),
    ))
}

fn lfs_batch(state: &mut State, req: &Request, repo: &str) -> Result<Response, Response> {
    require_write(state, req, repo)?;
    if !req
        .header("accept")
        .is_some_and(|a| a.contains("application/vnd.git-lfs+json"))
    {
        return Err(error(
            406,
            "the LFS batch API answers application/vnd.git-lfs+json",
        ));
    }
    let body = parse_json(req)?;
    if body.get("operation").and_then(|o| o.as_str()) != Some("upload") {
        return Err(error(422, "only the upload operation is supported"));
    }
    if body
        .get("hash_algo")
        .and_then(|h| h.as_str())
        .unwrap_or("sha256")
        != "sha256"
    {
        return Err(error(422, "hash_algo must be sha256"));
    }
    let transfers: Vec<&str> = body
        .get("transfers")
        .and_then(|t| t.as_array())
        .map(|t| t.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_else(|| vec!["basic"]);
    let objects = body
        .get("objects")
        .and_then(|o| o.as_array())
        .ok_or_else(|| error(422, "`objects` must be an array"))?;
    let mut out = Vec::new();
    let mut used_multipart = false;
    for o in objects {
        let oid = o
            .get("oid")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let size = o.get("size").and_then(|v| v.as_u64());
        let (true, Some(size)) = (
            oid.len() == 64 && oid.bytes().all(|b| b.is_ascii_hexdigit()),
            size,
        ) else {
            out.push(json!({"oid": oid, "size": o.get("size").and_then(|v| v.as_u64()).unwrap_or(0),
                "error": {"code": 422, "message": "oid must be a sha256 hex digest and size an integer"}}));
            continue;
        };
        if let Some(stored) = state.lfs.get(&oid) {
            if stored.len() as u64 == size {
                out.push(json!({"oid": oid, "size": size}));
                continue;
            }
        }
        state.expected.insert(oid.clone(), size);
        let mut actions = serde_json::Map::new();
        if size > state.options.multipart_threshold && transfers.contains(&"multipart") {
            used_multipart = true;
            let chunk = state.options.chunk_size;
            let parts = size.div_ceil(chunk);
            let mut header = serde_json::Map::new();
            header.insert("chunk_size".into(), json!(chunk.to_string()));
            for n in 1..=parts {
                header.insert(
                    n.to_string(),
                    json!(format!("{}/lfs-multipart/{oid}/{n}?sig=s3", state.storage)),
                );
            }
            state.multipart.insert(
                oid.clone(),
                PendingMultipart {
                    size,
                    parts: vec![None; parts as usize],
                },
            );
            actions.insert("upload".into(), json!({"href": format!("{}/lfs-multipart/{oid}/complete", state.base), "header": header}));
        } else {
            actions.insert(
                "upload".into(),
                json!({"href": format!("{}/lfs-storage/{oid}?sig=s3", state.storage)}),
            );
        }
        if state.options.verify {
            actions.insert("verify".into(), json!({"href": format!("{}/lfs-verify/{oid}", state.base), "header": {"X-Verify-Token": "v"}}));
        }
        out.push(json!({"oid": oid, "size": size, "authenticated": true, "actions": actions}));
    }
    let mut r = json_response(
        200,
        json!({"transfer": if used_multipart {"multipart"} else {"basic"}, "objects": out, "hash_algo": "sha256"}),
    );
    r.headers[0].1 = "application/vnd.git-lfs+json".into();
    Ok(r)
}

fn signed(req: &Request) -> Result<(), Response> {
    if req.query.get("sig").map(String::as_str) != Some("s3") {
        return Err(error(403, "SignatureDoesNotMatch"));
    }
    Ok(())
}

fn storage_put(state: &mut State, req: &Request, oid: &str) -> Result<Response, Response> {
    signed(req)?;
    let Some(&size) = state.expected.get(oid) else {
        return Err(error(403, "no upload was announced for this object"));
    };
    state.lfs_bytes_received += req.body.len() as u64;
    if req.body.len() as u64 != size {
        return Err(error(
            400,
            &format!(
                "IncompleteBody: expected {size} bytes, got {}",
                req.body.len()
            ),
        ));
    }
    if sha256_hex(&req.body) != oid {
        return Err(error(
            400,
            "BadDigest: the sha256 of the body does not match the object id",
        ));
    }
    state.lfs.insert(oid.to_string(), req.body.clone());
    state.expected.remove(oid);
    let mut r = json_response(200, json!({}));
    r.headers
        .push(("ETag".into(), format!("\"{}\"", &oid[..32])));
    Ok(r)
}

fn multipart_put(
    state: &mut State,
    req: &Request,
    oid: &str,
    part: &str,
) -> Result<Response, Response> {
    signed(req)?;
    let chunk = state.options.chunk_size;
    let pending = state
        .multipart
        .get_mut(oid)
        .ok_or_else(|| error(404, "NoSuchUpload"))?;
    let n: usize = part.parse().map_err(|_| error(400, "bad part number"))?;
    if n == 0 || n > pending.parts.len() {
        return Err(error(400, "InvalidPart"));
    }
    let expected_len = chunk.min(pending.size - (n as u64 - 1) * chunk);
    if req.body.len() as u64 != expected_len {
        return Err(error(
            400,
            &format!(
                "part {n}: expected {expected_len} bytes, got {}",
                req.body.len()
            ),
        ));
    }
    let etag = format!("\"{}\"", &sha256_hex(&req.body)[..32]);
    pending.parts[n - 1] = Some((etag.clone(), req.body.clone()));
    state.lfs_bytes_received += req.body.len() as u64;
    Ok(Response {
        status: 200,
        headers: vec![("ETag".into(), etag)],
        body: vec![],
    })
}

fn multipart_complete(state: &mut State, req: &Request, oid: &str) -> Result<Response, Response> {
    let body = parse_json(req)?;
    if body.get("oid").and_then(|o| o.as_str()) != Some(oid) {
        return Err(error(400, "the completion's oid does not match the upload"));
    }
    let parts = body
        .get("parts")
        .and_then(|p| p.as_array())
        .ok_or_else(|| error(400, "`parts` must be an array"))?;
    let pending = state
        .multipart
        .get(oid)
        .ok_or_else(|| error(404, "NoSuchUpload"))?;
    if parts.len() != pending.parts.len() {
        return Err(error(
            400,
            &format!(
                "expected {} parts, got {}",
                pending.parts.len(),
                parts.len()
            ),
        ));
    }
    let mut data = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let number = p.get("partNumber").and_then(|n| n.as_u64());
        let etag = p.get("etag").and_then(|e| e.as_str());
        let Some((stored_etag, bytes)) = pending.parts.get(i).and_then(|x| x.as_ref()) else {
            return Err(error(400, &format!("part {} was never uploaded", i + 1)));
        };
        if number != Some(i as u64 + 1) || etag != Some(stored_etag.as_str()) {
            return Err(error(
                400,
                &format!("InvalidPart: part {} has a wrong number or etag", i + 1),
            ));
        }
        data.extend_from_slice(bytes);
    }
    if data.len() as u64 != pending.size || sha256_hex(&data) != oid {
        return Err(error(
            400,
            "the assembled object does not match its oid and size",
        ));
    }
    state.multipart.remove(oid);
    state.expected.remove(oid);
    state.lfs.insert(oid.to_string(), data);
    Ok(json_response(200, json!({})))
}

fn lfs_verify(state: &State, req: &Request, oid: &str) -> Result<Response, Response> {
    if caller(state, req)?.is_none() {
        return Err(error(401, "Invalid username or password."));
    }
    let body = parse_json(req)?;
    let size = body.get("size").and_then(|s| s.as_u64());
    match state.lfs.get(oid) {
        Some(bytes)
            if Some(bytes.len() as u64) == size
                && body.get("oid").and_then(|o| o.as_str()) == Some(oid) =>
        {
            Ok(json_response(200, json!({})))
        }
        _ => Err(error(
            404,
            &format!("object {oid} was not uploaded with that size"),
        )),
    }
}

fn commit(state: &mut State, req: &Request, repo: &str, rev: &str) -> Result<Response, Response> {
    require_write(state, req, repo)?;
    if req
        .header("content-type")
        .map(|c| c.split(';').next().unwrap_or("").trim())
        != Some("application/x-ndjson")
    {
        return Err(error(415, "the commit body must be application/x-ndjson"));
    }
    let mut tree = head_tree(state, repo, rev)
        .ok_or_else(|| error_code(404, "RevisionNotFound", &format!("Invalid rev id: {rev}")))?;
    if !state.repos[repo].branches.contains_key(rev) {
        return Err(error(400, &format!("{rev} is not a branch")));
    }
    let text = String::from_utf8(req.body.clone())
        .map_err(|_| error(400, "the commit body is not UTF-8"))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Value =
        serde_json::from_str(lines.next().ok_or_else(|| error(400, "empty commit"))?)
            .map_err(|e| error(400, &format!("line 1: {e}")))?;
    if header.get("key").and_then(|k| k.as_str()) != Some("header")
        || header["value"]
            .get("summary")
            .and_then(|s| s.as_str())
            .is_none_or(|s| s.is_empty())
    {
        return Err(error(
            400,
            "the first line must be the header with a summary",
        ));
    }
    let mut touched = 0;
    for (i, line) in lines.enumerate() {
        let item: Value =
            serde_json::from_str(line).map_err(|e| error(400, &format!("line {}: {e}", i + 2)))?;
        let value = &item["value"];
        let path = value
            .get("path")
            .and_then(|p| p.as_str())
            .ok_or_else(|| error(400, &format!("line {}: no path", i + 2)))?;
        if path.starts_with('/')
            || path
                .split('/')
                .any(|p| p.is_empty() || p == ".." || p == ".git")
        {
            return Err(error(400, &format!("invalid path {path}")));
        }
        match item.get("key").and_then(|k| k.as_str()) {
            Some("file") => {
                if value.get("encoding").and_then(|e| e.as_str()) != Some("base64") {
                    return Err(error(400, &format!("{path}: encoding must be base64")));
                }
                let content = value
                    .get("content")
                    .and_then(|c| c.as_str())
                    .and_then(|c| base64::engine::general_purpose::STANDARD.decode(c).ok())
                    .ok_or_else(|| error(400, &format!("{path}: content is not base64")))?;
                tree.insert(path.to_string(), Entry::Regular(content));
            }
            Some("lfsFile") => {
                if value.get("algo").and_then(|a| a.as_str()) != Some("sha256") {
                    return Err(error(400, &format!("{path}: algo must be sha256")));
                }
                let oid = value
                    .get("oid")
                    .and_then(|o| o.as_str())
                    .unwrap_or_default();
                let Some(stored) = state.lfs.get(oid) else {
                    return Err(error(
                        400,
                        &format!("{path}: LFS object {oid} was not uploaded"),
                    ));
                };
                let size = value
                    .get("size")
                    .and_then(|s| s.as_u64())
                    .unwrap_or(stored.len() as u64);
                if size != stored.len() as u64 {
                    return Err(error(
                        400,
                        &format!("{path}: size {size} does not match the uploaded object"),
                    ));
                }
                tree.insert(
                    path.to_string(),
                    Entry::Lfs {
                        oid: oid.to_string(),
                        size,
                    },
                );
            }
            Some("deletedFile") => {
                tree.remove(path).ok_or_else(|| {
                    error(404, &format!("A file with this name doesn't exist: {path}"))
                })?;
            }
            other => return Err(error(400, &format!("unknown commit operation {other:?}"))),
        }
        touched += 1;
    }
    if touched == 0 {
        return Err(error(400, "empty commit"));
    }
    let commit = add_commit(state, repo, rev, tree);
    let id = repo.split_once('/').unwrap().1;
    Ok(json_response(
        200,
        json!({
            "success": true,
            "commitOid": commit,
            "commitUrl": format!("{}/{id}/commit/{commit}", state.base),
            "pullRequestUrl": null,
        }),
    ))
}

fn resolve(
    state: &State,
    req: &Request,
    repo: &str,
    rev: &str,
    path: &str,
) -> Result<Response, Response> {
    require_read(state, req, repo)?;
    let r = &state.repos[repo];
    let commit = r
        .branches
        .get(rev)
        .cloned()
        .unwrap_or_else(|| rev.to_string());
    let tree = r
        .commits
        .get(&commit)
        .ok_or_else(|| error_code(404, "RevisionNotFound", &format!("Invalid rev id: {rev}")))?;
    let entry = tree.get(path).ok_or_else(|| {
        error_code(
            404,
            "EntryNotFound",
            &format!("{path} does not exist on \"{rev}\""),
        )
    })?;
    let common = vec![("X-Repo-Commit".to_string(), commit.clone())];
    Ok(match entry {
        Entry::Regular(bytes) => {
            let mut headers = common;
            headers.push(("ETag".into(), format!("\"{}\"", git_blob_sha1(bytes))));
            Response {
                status: 200,
                headers,
                body: bytes.clone(),
            }
        }
        Entry::Lfs { oid, size } => {
            let mut headers = common;
            headers.push(("X-Linked-Etag".into(), format!("\"{oid}\"")));
            headers.push(("X-Linked-Size".into(), size.to_string()));
            headers.push((
                "ETag".into(),
                format!("\"{}\"", git_blob_sha1(oid.as_bytes())),
            ));
            headers.push((
                "Location".into(),
                format!("{}/lfs-cdn/{oid}", state.storage),
            ));
            Response {
                status: 302,
                headers,
                body: vec![],
            }
        }
    })
}

fn cdn_get(state: &State, req: &Request, oid: &str) -> Result<Response, Response> {
    let bytes = state.lfs.get(oid).ok_or_else(|| error(404, "NoSuchKey"))?;
    if let Some(range) = req.header("range").and_then(|r| r.strip_prefix("bytes=")) {
        let start: usize = range
            .trim_end_matches('-')
            .parse()
            .map_err(|_| error(400, "bad range"))?;
        if start >= bytes.len() {
            return Err(error(416, "range not satisfiable"));
        }
        return Ok(Response {
            status: 206,
            headers: vec![(
                "Content-Range".into(),
                format!("bytes {start}-{}/{}", bytes.len() - 1, bytes.len()),
            )],
            body: bytes[start..].to_vec(),
        });
    }
    Ok(Response {
        status: 200,
        headers: vec![],
        body: bytes.clone(),
    })
}
