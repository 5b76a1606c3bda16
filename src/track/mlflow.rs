//! MLflow tracking over its REST API (`/api/2.0/mlflow/...` and the server's artifact proxy,
//! `/api/2.0/mlflow-artifacts/...`).
//!
//! The run is created (or, on resume, continued) before step 1 and synchronously, so that a wrong
//! URI or token is reported before training starts. After that everything goes through a
//! background sender with a bounded queue: a slow server or one that goes away never holds up a
//! step. `metrics.jsonl` stays the record; MLflow gets a copy, and a problem with MLflow is a
//! warning, never a failed run.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::recipe::MlflowSpec;

/// MLflow's documented per-request and per-value limits (`mlflow/utils/validation.py`): the
/// server may accept more, the official clients do not, and neither do we.
const MAX_METRICS_PER_BATCH: usize = 1000;
const MAX_PARAMS_PER_BATCH: usize = 100;
const MAX_PARAM_VALUE_LENGTH: usize = 6000;
const MAX_TAG_VALUE_LENGTH: usize = 8000;
const MAX_KEY_LENGTH: usize = 250;
/// Messages waiting for the sender thread; beyond this, metrics are dropped (and counted) rather
/// than block a training step.
const QUEUE_CAPACITY: usize = 65_536;
/// Metrics kept while the server is away; the oldest go first beyond this.
const MAX_PENDING_METRICS: usize = 1_000_000;
const LONGEST_BACKOFF: Duration = Duration::from_secs(30);

/// Where a run lives in MLflow; kept in `trainer_state.json` and `run.json` so that a resumed run
/// continues the same MLflow run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRef {
    pub uri: String,
    pub experiment_id: String,
    pub run_id: String,
}

/// How a run ended, as MLflow's `RunStatus` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndStatus {
    Finished,
    Failed,
    /// Stopped on request (Ctrl-C, SIGTERM) after a checkpoint.
    Killed,
}

impl EndStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Finished => "FINISHED",
            Self::Failed => "FAILED",
            Self::Killed => "KILLED",
        }
    }
}

/// MLflow settings resolved from the recipe and the environment MLflow's own clients read.
#[derive(Clone)]
pub struct Settings {
    /// Without a trailing slash.
    pub uri: String,
    pub experiment: String,
    pub run_name: String,
    pub tags: BTreeMap<String, String>,
    pub flush_timeout: Duration,
    auth: Auth,
}

impl fmt::Debug for Settings {
    // The credentials stay out of every log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("uri", &self.uri)
            .field("experiment", &self.experiment)
            .field("run_name", &self.run_name)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
enum Auth {
    None,
    Header(String),
}

impl Settings {
    /// `Ok(None)` when MLflow is off: no `tracking.mlflow` section and no `MLFLOW_TRACKING_URI`,
    /// or `enabled: false`. `Err` is a warning for the user: MLflow is asked for but cannot be
    /// used (training goes on without it).
    pub fn resolve(spec: Option<&MlflowSpec>, recipe_name: &str) -> Result<Option<Self>, String> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let env_uri = env("MLFLOW_TRACKING_URI");
        let (uri, experiment, run_name, tags, flush) = match spec {
            Some(spec) if !spec.enabled => return Ok(None),
            Some(spec) => (
                spec.uri.clone().or(env_uri),
                spec.experiment.clone(),
                spec.run_name.clone(),
                spec.tags.clone(),
                spec.flush_timeout_secs,
            ),
            None => match env_uri {
                Some(uri) => (Some(uri), None, None, BTreeMap::new(), 30),
                None => return Ok(None),
            },
        };
        let uri = uri.ok_or(
            "tracking.mlflow: no server to log to: set tracking.mlflow.uri or \
             MLFLOW_TRACKING_URI (e.g. http://127.0.0.1:5000)",
        )?;
        let uri = uri.trim().trim_end_matches('/').to_string();
        if !(uri.starts_with("http://") || uri.starts_with("https://")) {
            return Err(format!(
                "tracking.mlflow.uri {uri:?}: Kiln speaks to an MLflow tracking server over \
                 HTTP; expected http://host:port or https://host (start one with `mlflow server`)"
            ));
        }
        let auth = match (
            env("MLFLOW_TRACKING_TOKEN"),
            env("MLFLOW_TRACKING_USERNAME"),
            env("MLFLOW_TRACKING_PASSWORD"),
        ) {
            (Some(token), _, _) => Auth::Header(format!("Bearer {token}")),
            (None, Some(user), password) => {
                let pair = format!("{user}:{}", password.unwrap_or_default());
                let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
                Auth::Header(format!("Basic {encoded}"))
            }
            (None, None, _) => Auth::None,
        };
        Ok(Some(Self {
            uri,
            experiment: experiment
                .or_else(|| env("MLFLOW_EXPERIMENT_NAME"))
                .unwrap_or_else(|| "kiln".into()),
            run_name: run_name.unwrap_or_else(|| recipe_name.to_string()),
            tags,
            flush_timeout: Duration::from_secs(flush),
            auth,
        }))
    }
}

/// What a new MLflow run is told at creation.
pub struct RunStart<'a> {
    /// Run tags beyond the recipe's own (`kiln.version`, `mlflow.source.name`, ...).
    pub tags: Vec<(String, String)>,
    /// The resolved recipe, flattened to `section.key` params.
    pub params: Vec<(String, String)>,
    /// The run to continue (a resumed training run), if any.
    pub resume: Option<&'a RunRef>,
}

/// A live MLflow run: metrics and artifacts go to a background sender.
pub struct MlflowRun {
    reference: RunRef,
    queue: SyncSender<Message>,
    worker: Option<JoinHandle<()>>,
    dropped: Arc<AtomicU64>,
    flush_timeout: Duration,
    /// Notes for the user from the start (truncated params, a run that could not be continued).
    pub notes: Vec<String>,
}

enum Message {
    Metric(Metric),
    Artifact {
        local: PathBuf,
        path: String,
    },
    Finish {
        status: EndStatus,
        deadline: Instant,
    },
}

struct Metric {
    key: String,
    value: f64,
    step: u64,
    timestamp_ms: u64,
}

impl MlflowRun {
    /// Creates the MLflow run (or continues `start.resume`) and logs its params and tags. An
    /// `Err` is the warning to print: training goes on without MLflow.
    pub fn start(settings: &Settings, start: RunStart<'_>) -> Result<Self, String> {
        let client = Client::new(settings);
        let mut notes = Vec::new();
        let explain = |e: CallError| e.explain(&settings.uri);
        let continued = match start.resume {
            Some(previous) if previous.uri == settings.uri => {
                match client.continue_run(&previous.run_id).map_err(explain)? {
                    Some(logged) => Some((previous.clone(), logged)),
                    None => {
                        notes.push(format!(
                            "MLflow: run {} is gone from {}; logging to a new run",
                            previous.run_id, settings.uri
                        ));
                        None
                    }
                }
            }
            Some(previous) => {
                notes.push(format!(
                    "MLflow: the run was logged to {} before and now to {}; logging to a new run",
                    previous.uri, settings.uri
                ));
                None
            }
            None => None,
        };
        let (reference, logged) = match continued {
            Some(found) => found,
            None => {
                let experiment_id = client
                    .experiment_id(&settings.experiment)
                    .map_err(explain)?;
                let mut tags = start.tags;
                tags.extend(settings.tags.clone());
                let run_id = client
                    .create_run(&experiment_id, &settings.run_name, &tags, &mut notes)
                    .map_err(explain)?;
                client
                    .log_params(&run_id, &start.params, &mut notes)
                    .map_err(explain)?;
                let reference = RunRef {
                    uri: settings.uri.clone(),
                    experiment_id,
                    run_id,
                };
                (reference, HashMap::new())
            }
        };

        let (queue, inbox) = std::sync::mpsc::sync_channel(QUEUE_CAPACITY);
        let sender = Sender {
            client,
            run_id: reference.run_id.clone(),
            artifact_root: format!("{}/{}/artifacts", reference.experiment_id, reference.run_id),
            already_logged: logged,
            metrics: VecDeque::new(),
            artifacts: VecDeque::new(),
            unreachable_since: None,
            failures: 0,
        };
        let worker = std::thread::Builder::new()
            .name("kiln-mlflow".into())
            .spawn(move || sender.run(inbox))
            .map_err(|e| format!("MLflow: cannot start the sender thread: {e}"))?;
        Ok(Self {
            reference,
            queue,
            worker: Some(worker),
            dropped: Arc::new(AtomicU64::new(0)),
            flush_timeout: settings.flush_timeout,
            notes,
        })
    }

    pub fn reference(&self) -> &RunRef {
        &self.reference
    }

    /// Queues one metric value; never blocks.
    pub fn metric(&self, key: &str, step: u64, value: f64) {
        let metric = Metric {
            key: key.to_string(),
            value,
            step,
            timestamp_ms: now_ms(),
        };
        self.send(Message::Metric(metric));
    }

    /// Queues a file for upload as `path` under the run's artifacts.
    pub fn artifact(&self, local: PathBuf, path: String) {
        self.send(Message::Artifact { local, path });
    }

    fn send(&self, message: Message) {
        match self.queue.try_send(message) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        "MLflow: the sender is {QUEUE_CAPACITY} messages behind; dropping \
                         metrics rather than slowing training (metrics.jsonl has them all)"
                    );
                }
            }
            // The sender only stops after `finish`.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Sends what is queued (waiting at most the flush timeout) and sets the run's final status.
    pub fn finish(mut self, status: EndStatus) {
        self.close(status);
    }

    fn close(&mut self, status: EndStatus) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        let deadline = Instant::now() + self.flush_timeout;
        // A full queue still takes the final message: the sender drains it continuously.
        if self
            .queue
            .send(Message::Finish { status, deadline })
            .is_ok()
        {
            let _ = worker.join();
        }
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!("MLflow: {dropped} metrics were dropped; metrics.jsonl has them all");
        }
    }
}

impl Drop for MlflowRun {
    /// A run that ends without `finish` ended with an error.
    fn drop(&mut self) {
        self.close(EndStatus::Failed);
    }
}

/// The background half: batches metrics, uploads artifacts, retries with backoff.
struct Sender {
    client: Client,
    run_id: String,
    /// `<experiment id>/<run id>/artifacts`, the run's directory under the artifact proxy.
    artifact_root: String,
    /// Per metric key, the highest step the server already has (a continued run skips those).
    already_logged: HashMap<String, u64>,
    metrics: VecDeque<Metric>,
    artifacts: VecDeque<(PathBuf, String)>,
    unreachable_since: Option<Instant>,
    failures: u32,
}

impl Sender {
    fn run(mut self, inbox: Receiver<Message>) {
        let mut finish: Option<(EndStatus, Instant)> = None;
        let mut retry_at: Option<Instant> = None;
        loop {
            let idle = self.metrics.is_empty() && self.artifacts.is_empty();
            if idle {
                if let Some((status, _)) = finish {
                    self.set_status(status);
                    return;
                }
            }
            let wake = match (idle, retry_at) {
                (true, _) => Instant::now() + Duration::from_secs(3600),
                (false, Some(at)) => at,
                (false, None) => Instant::now(),
            };
            let wake = finish.map_or(wake, |(_, deadline)| wake.min(deadline));
            match inbox.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(message) => {
                    self.take(message, &mut finish);
                    while let Ok(message) = inbox.try_recv() {
                        self.take(message, &mut finish);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // The run was dropped without a word: nothing more will come.
                Err(RecvTimeoutError::Disconnected) => {
                    finish.get_or_insert((EndStatus::Failed, Instant::now()));
                }
            }
            if let Some((status, deadline)) = finish {
                if Instant::now() >= deadline {
                    self.give_up(status);
                    return;
                }
            }
            if retry_at.is_some_and(|at| Instant::now() < at) {
                continue;
            }
            retry_at = match self.send_some() {
                Ok(()) => {
                    if let Some(since) = self.unreachable_since.take() {
                        tracing::info!(
                            "MLflow: {} reachable again after {:.0} s; catching up",
                            self.client.base,
                            since.elapsed().as_secs_f64()
                        );
                    }
                    self.failures = 0;
                    None
                }
                Err(e) => {
                    if self.unreachable_since.is_none() {
                        self.unreachable_since = Some(Instant::now());
                        tracing::warn!(
                            "{}; training goes on, metrics.jsonl keeps every metric, and they \
                             are sent when the server is back",
                            e.explain(&self.client.base)
                        );
                    }
                    self.failures += 1;
                    let backoff = Duration::from_millis(250 << self.failures.min(7));
                    Some(Instant::now() + backoff.min(LONGEST_BACKOFF))
                }
            };
        }
    }

    fn take(&mut self, message: Message, finish: &mut Option<(EndStatus, Instant)>) {
        match message {
            Message::Metric(metric) => {
                let sent = self.already_logged.get(&metric.key);
                if sent.is_some_and(|&step| metric.step <= step) {
                    return;
                }
                if self.metrics.len() >= MAX_PENDING_METRICS {
                    self.metrics.pop_front();
                }
                self.metrics.push_back(metric);
            }
            Message::Artifact { local, path } => self.artifacts.push_back((local, path)),
            Message::Finish { status, deadline } => *finish = Some((status, deadline)),
        }
    }

    /// One request's worth: a batch of metrics, else one artifact. Only failures worth retrying
    /// come back as `Err`; a request the server rejects for good is dropped with a warning.
    fn send_some(&mut self) -> Result<(), CallError> {
        if !self.metrics.is_empty() {
            let count = self.metrics.len().min(MAX_METRICS_PER_BATCH);
            let batch: Vec<Value> = self.metrics.iter().take(count).map(metric_json).collect();
            let body = json!({"run_id": self.run_id, "metrics": batch});
            match self.client.post("runs/log-batch", &body) {
                Ok(_) => {}
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => tracing::warn!(
                    "MLflow: {count} metrics rejected: {}",
                    e.explain(&self.client.base)
                ),
            }
            self.metrics.drain(..count);
            return Ok(());
        }
        if let Some((local, path)) = self.artifacts.front().cloned() {
            match std::fs::read(&local) {
                Ok(bytes) => {
                    let target = format!("{}/{}", self.artifact_root, path);
                    match self.client.put_artifact(&target, bytes) {
                        Ok(()) => {}
                        Err(e) if e.is_transient() => return Err(e),
                        Err(e) => tracing::warn!(
                            "MLflow: artifact {path} rejected: {}",
                            e.explain(&self.client.base)
                        ),
                    }
                }
                Err(e) => tracing::warn!(
                    "MLflow: artifact {} not uploaded: cannot read it: {e}",
                    local.display()
                ),
            }
            self.artifacts.pop_front();
        }
        Ok(())
    }

    fn set_status(&self, status: EndStatus) {
        let body = json!({
            "run_id": self.run_id,
            "status": status.as_str(),
            "end_time": now_ms(),
        });
        if let Err(e) = self.client.post("runs/update", &body) {
            tracing::warn!(
                "MLflow: could not mark run {} {}: {}",
                self.run_id,
                status.as_str(),
                e.explain(&self.client.base)
            );
        }
    }

    /// The flush timeout passed: say what MLflow is missing and try the status once.
    fn give_up(&self, status: EndStatus) {
        tracing::warn!(
            "MLflow: {} metrics and {} artifacts were not sent to {} within the flush timeout \
             (tracking.mlflow.flush_timeout_secs); metrics.jsonl and the run directory have them",
            self.metrics.len(),
            self.artifacts.len(),
            self.client.base
        );
        self.set_status(status);
    }
}

fn metric_json(metric: &Metric) -> Value {
    // MLflow's JSON takes non-finite doubles as the strings protobuf's JSON mapping uses.
    let value = if metric.value.is_nan() {
        json!("NaN")
    } else if metric.value.is_infinite() {
        json!(if metric.value > 0.0 {
            "Infinity"
        } else {
            "-Infinity"
        })
    } else {
        json!(metric.value)
    };
    json!({
        "key": truncate(&metric.key, MAX_KEY_LENGTH),
        "value": value,
        "timestamp": metric.timestamp_ms,
        "step": metric.step,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// At most `limit` characters (MLflow counts characters, not bytes).
fn truncate(s: &str, limit: usize) -> String {
    s.chars().take(limit).collect()
}

/// A failed MLflow request.
#[derive(Debug)]
enum CallError {
    /// No response: refused, reset, timed out, DNS.
    Unreachable(String),
    Status {
        status: u16,
        code: String,
        message: String,
    },
}

impl CallError {
    fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable(_) => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
        }
    }

    fn explain(&self, uri: &str) -> String {
        match self {
            Self::Unreachable(e) => format!("MLflow: cannot reach {uri}: {e}"),
            Self::Status { status, .. } if matches!(status, 401 | 403) => format!(
                "MLflow at {uri} refused Kiln's request (HTTP {status}): set \
                 MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, \
                 to credentials the server accepts"
            ),
            Self::Status {
                status,
                code,
                message,
            } => format!("MLflow at {uri} answered HTTP {status} {code}: {message}"),
        }
    }
}

struct Client {
    base: String,
    auth: Auth,
    agent: ureq::Agent,
}

impl Client {
    fn new(settings: &Settings) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(60)))
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .tls_config(crate::tls::config())
            .build()
            .into();
        Self {
            base: settings.uri.clone(),
            auth: settings.auth.clone(),
            agent,
        }
    }

    fn api(&self, endpoint: &str) -> String {
        format!("{}/api/2.0/mlflow/{endpoint}", self.base)
    }

    fn post(&self, endpoint: &str, body: &Value) -> Result<Value, CallError> {
        let mut request = self.agent.post(self.api(endpoint));
        if let Auth::Header(value) = &self.auth {
            request = request.header("Authorization", value);
        }
        read(request.send_json(body))
    }

    fn get(&self, endpoint: &str, query: &[(&str, &str)]) -> Result<Value, CallError> {
        let mut request = self.agent.get(self.api(endpoint));
        for (key, value) in query {
            request = request.query(*key, *value);
        }
        if let Auth::Header(value) = &self.auth {
            request = request.header("Authorization", value);
        }
        read(request.call())
    }

    fn put_artifact(&self, path: &str, bytes: Vec<u8>) -> Result<(), CallError> {
        let encoded: Vec<String> = path.split('/').map(encode_segment).collect();
        let url = format!(
            "{}/api/2.0/mlflow-artifacts/artifacts/{}",
            self.base,
            encoded.join("/")
        );
        let mut request = self.agent.put(url);
        if let Auth::Header(value) = &self.auth {
            request = request.header("Authorization", value);
        }
        read(request.send(&bytes[..])).map(|_| ())
    }

    /// The experiment's id, creating the experiment when it does not exist.
    fn experiment_id(&self, name: &str) -> Result<String, CallError> {
        match self.get("experiments/get-by-name", &[("experiment_name", name)]) {
            Ok(found) => {
                if let Some(id) = found["experiment"]["experiment_id"].as_str() {
                    return Ok(id.to_string());
                }
            }
            Err(CallError::Status { code, .. }) if code == "RESOURCE_DOES_NOT_EXIST" => {}
            Err(e) => return Err(e),
        }
        match self.post("experiments/create", &json!({"name": name})) {
            Ok(created) => string_field(&created, &["experiment_id"]),
            // Another run created it between our two calls.
            Err(CallError::Status { code, .. }) if code == "RESOURCE_ALREADY_EXISTS" => {
                let found = self.get("experiments/get-by-name", &[("experiment_name", name)])?;
                string_field(&found, &["experiment", "experiment_id"])
            }
            Err(e) => Err(e),
        }
    }

    fn create_run(
        &self,
        experiment_id: &str,
        run_name: &str,
        tags: &[(String, String)],
        notes: &mut Vec<String>,
    ) -> Result<String, CallError> {
        let tags: Vec<Value> = tags
            .iter()
            .map(|(key, value)| {
                if value.chars().count() > MAX_TAG_VALUE_LENGTH {
                    notes.push(format!(
                        "MLflow: tag {key} is longer than MLflow's {MAX_TAG_VALUE_LENGTH} \
                         characters and was truncated"
                    ));
                }
                json!({
                    "key": truncate(key, MAX_KEY_LENGTH),
                    "value": truncate(value, MAX_TAG_VALUE_LENGTH),
                })
            })
            .collect();
        let body = json!({
            "experiment_id": experiment_id,
            "run_name": run_name,
            "start_time": now_ms(),
            "tags": tags,
        });
        let created = self.post("runs/create", &body)?;
        string_field(&created, &["run", "info", "run_id"])
    }

    fn log_params(
        &self,
        run_id: &str,
        params: &[(String, String)],
        notes: &mut Vec<String>,
    ) -> Result<(), CallError> {
        let mut truncated = Vec::new();
        let params: Vec<Value> = params
            .iter()
            .map(|(key, value)| {
                if key.chars().count() > MAX_KEY_LENGTH
                    || value.chars().count() > MAX_PARAM_VALUE_LENGTH
                {
                    truncated.push(key.clone());
                }
                json!({
                    "key": truncate(key, MAX_KEY_LENGTH),
                    "value": truncate(value, MAX_PARAM_VALUE_LENGTH),
                })
            })
            .collect();
        if !truncated.is_empty() {
            notes.push(format!(
                "MLflow: params longer than MLflow allows ({MAX_KEY_LENGTH}-character keys, \
                 {MAX_PARAM_VALUE_LENGTH}-character values) were truncated: {}; recipe.yaml \
                 (an artifact of the run) has them whole",
                truncated.join(", ")
            ));
        }
        for chunk in params.chunks(MAX_PARAMS_PER_BATCH) {
            self.post(
                "runs/log-batch",
                &json!({"run_id": run_id, "params": chunk}),
            )?;
        }
        Ok(())
    }

    /// Marks `run_id` running again and returns, per metric key, the last step it holds; `None`
    /// when the server no longer has the run.
    fn continue_run(&self, run_id: &str) -> Result<Option<HashMap<String, u64>>, CallError> {
        let run = match self.get("runs/get", &[("run_id", run_id)]) {
            Ok(run) => run,
            Err(CallError::Status { code, .. }) if code == "RESOURCE_DOES_NOT_EXIST" => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        if run["run"]["info"]["lifecycle_stage"].as_str() == Some("deleted") {
            return Ok(None);
        }
        // `data.metrics` holds each key's latest value, which MLflow defines as the highest step.
        let mut logged = HashMap::new();
        for metric in run["run"]["data"]["metrics"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let (Some(key), Some(step)) = (metric["key"].as_str(), step_of(metric)) {
                logged.insert(key.to_string(), step);
            }
        }
        let body = json!({"run_id": run_id, "status": "RUNNING"});
        self.post("runs/update", &body)?;
        Ok(Some(logged))
    }
}

/// MLflow's JSON writes int64 fields such as `step` as numbers or (protobuf style) strings.
fn step_of(metric: &Value) -> Option<u64> {
    let step = &metric["step"];
    step.as_u64()
        .or_else(|| step.as_str().and_then(|s| s.parse().ok()))
}

fn string_field(value: &Value, path: &[&str]) -> Result<String, CallError> {
    let mut field = value;
    for key in path {
        field = &field[*key];
    }
    field
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| CallError::Status {
            status: 200,
            code: "UNEXPECTED_RESPONSE".into(),
            message: format!("expected `{}` in {value}", path.join(".")),
        })
}

fn read(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Value, CallError> {
    let mut response = result.map_err(|e| CallError::Unreachable(e.to_string()))?;
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .map_err(|e| CallError::Unreachable(format!("reading the response failed: {e}")))?;
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if status < 300 {
        return Ok(body);
    }
    let message = body["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| text.trim().chars().take(300).collect());
    Err(CallError::Status {
        status,
        code: body["error_code"].as_str().unwrap_or("").to_string(),
        message,
    })
}

/// RFC 3986's unreserved characters stay as they are in an artifact path's segments.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn encode_segment(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, SEGMENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_metrics_use_protobuf_json_names() {
        let metric = |value| Metric {
            key: "train/loss".into(),
            value,
            step: 3,
            timestamp_ms: 7,
        };
        assert_eq!(metric_json(&metric(f64::NAN))["value"], "NaN");
        assert_eq!(
            metric_json(&metric(f64::NEG_INFINITY))["value"],
            "-Infinity"
        );
        assert_eq!(metric_json(&metric(1.5))["value"], 1.5);
    }

    #[test]
    fn a_uri_that_is_not_an_http_server_is_explained() {
        let spec = MlflowSpec {
            enabled: true,
            uri: Some("file:///tmp/mlruns".into()),
            experiment: None,
            run_name: None,
            tags: BTreeMap::new(),
            flush_timeout_secs: 30,
        };
        let warning = Settings::resolve(Some(&spec), "run").unwrap_err();
        assert!(warning.contains("file:///tmp/mlruns") && warning.contains("http://host:port"));
        let off = MlflowSpec {
            enabled: false,
            ..spec
        };
        assert!(Settings::resolve(Some(&off), "run").unwrap().is_none());
    }

    #[test]
    fn auth_errors_say_which_variables_to_set() {
        let e = CallError::Status {
            status: 401,
            code: String::new(),
            message: "Unauthorized".into(),
        };
        let text = e.explain("http://127.0.0.1:5000");
        assert!(
            text.contains("MLFLOW_TRACKING_TOKEN") && text.contains("401"),
            "{text}"
        );
        assert!(!e.is_transient());
        assert!(CallError::Unreachable("refused".into()).is_transient());
    }
}
