//! `kiln serve`: one model over HTTP, as KServe v1 (`:predict`, `:classify`), the Open Inference
//! Protocol (KServe v2) and OpenAI's `/v1/completions` (with server-sent events), with
//! continuous batching ([`scheduler`]), Prometheus metrics, request logs and graceful shutdown.

pub mod auth;
pub mod connections;
pub mod metrics;
pub mod protocol;
pub mod scheduler;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_stream::StreamExt;

use crate::data::chat::Chat;
use crate::eval::score::ScoredRow;
use crate::generate::{FinishReason, Generated, GenerationParams, Sequence};
use crate::model::{Config, Model};
use crate::tokenizer::TextTokenizer;
use auth::ApiKey;
use connections::ConnectionLimits;
use metrics::Metrics;
use protocol::{BadRequest, Parsed, Prompts};
use scheduler::{Event, Limits, Refused, Scheduler, Work};

/// What the handlers share.
pub struct App {
    pub name: String,
    pub config: Config,
    pub tokenizer: Arc<TextTokenizer>,
    pub scheduler: Scheduler,
    pub metrics: Arc<Metrics>,
    /// When the server started (Unix seconds): the `created` of OpenAI's model list.
    pub started: u64,
    /// The model's chat template and the tokens that end its turns, or why chat is not served.
    pub chat: Result<Chat, String>,
}

/// Where and how to serve.
pub struct ServeOptions {
    pub name: String,
    pub addr: SocketAddr,
    pub limits: Limits,
    pub max_body_bytes: usize,
    /// Requests must carry `Authorization: Bearer KEY` (but for [`auth::OPEN_PATHS`]).
    pub api_key: Option<ApiKey>,
    pub connections: ConnectionLimits,
}

/// How long a server whose scheduler died answers 503 before it exits.
const DEATH_DRAIN: std::time::Duration = std::time::Duration::from_secs(3);

/// Serves `model` until SIGTERM or Ctrl-C, then stops taking connections, finishes the requests
/// in flight and returns. `on_ready` gets the bound address (port 0 picks a free one).
pub fn serve(
    model: Model,
    tokenizer: TextTokenizer,
    options: ServeOptions,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // The model runs on its own thread; these only move requests and bytes.
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(options.addr)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {}: is another server using the port? (choose another with --port)",
                    options.addr
                )
            })?;
        let addr = listener.local_addr()?;
        auth::warn_if_exposed(addr, options.api_key.as_ref());
        let metrics = Arc::new(Metrics::new());
        let tokenizer = Arc::new(tokenizer);
        let config = model.config().clone();
        let (scheduler, worker) =
            Scheduler::start(model, tokenizer.clone(), options.limits, metrics.clone())?;
        let app = Arc::new(App {
            name: options.name,
            config,
            chat: Chat::of(&tokenizer).map_err(|e| format!("{e:#}")),
            tokenizer,
            scheduler: scheduler.clone(),
            metrics,
            started: unix_seconds(),
        });
        let router = router(app, options.max_body_bytes, options.api_key.map(Arc::new));
        on_ready(addr);
        // A dead scheduler stops the server too, so that it exits non-zero and whoever runs it
        // (KServe, systemd, Kubernetes) starts a new one; until then it answers 503.
        let watched = scheduler.clone();
        let shutdown = async move {
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = watched.died() => {
                    // Answer 503 (readiness too) a moment before going, so that a load balancer
                    // sees the server unready and drains it, as KServe expects.
                    tracing::error!("the scheduler died: shutting down in {DEATH_DRAIN:?}");
                    tokio::time::sleep(DEATH_DRAIN).await;
                }
            }
        };
        connections::serve_connections(listener, router, options.connections, shutdown).await;
        tracing::info!("stopped taking requests; finishing the ones in flight");
        scheduler.close();
        match tokio::task::spawn_blocking(move || worker.join()).await? {
            Ok(Ok(())) => Ok(()),
            Ok(Err(death)) => Err(anyhow::anyhow!(death)),
            Err(_) => Err(anyhow::anyhow!("the scheduler thread panicked")),
        }
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C: shutting down"),
    }
}

pub fn router(app: Arc<App>, max_body_bytes: usize, api_key: Option<Arc<ApiKey>>) -> Router {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{target}", get(model_status).post(model_verb))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/metrics", get(prometheus))
        .fallback(not_found)
        // Inside the request log, so refusals are logged and counted like any answer.
        .layer(axum::middleware::from_fn_with_state(
            api_key,
            auth::require_api_key,
        ))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            log_request,
        ))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(app)
}

/// An error answer: `{"error": "..."}`, or OpenAI's `{"error": {"message", "type", ...}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    retry_after: Option<u64>,
    openai: bool,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
            openai: false,
        }
    }

    fn openai(mut self) -> Self {
        self.openai = true;
        self
    }
}

impl From<BadRequest> for ApiError {
    fn from(e: BadRequest) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, e.0)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = if self.openai {
            let kind = match self.status {
                StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => "invalid_request_error",
                StatusCode::SERVICE_UNAVAILABLE => "service_unavailable_error",
                StatusCode::NOT_FOUND => "not_found_error",
                StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
                _ => "server_error",
            };
            json!({"error": {"message": self.message, "type": kind, "param": null, "code": null}})
        } else {
            json!({"error": self.message})
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response.extensions_mut().insert(ErrorMessage(self.message));
        response
    }
}

/// The endpoint a response belongs to (metrics label) and what it cost, for the request log.
#[derive(Clone, Copy)]
struct Endpoint(&'static str);

#[derive(Clone, Copy, Default)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
}

#[derive(Clone)]
struct ErrorMessage(String);

/// A streamed response records its own duration when its stream ends.
#[derive(Clone, Copy)]
struct Streamed;

async fn log_request(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let endpoint = response
        .extensions()
        .get::<Endpoint>()
        .map_or("other", |e| e.0);
    let usage = response
        .extensions()
        .get::<Usage>()
        .copied()
        .unwrap_or_default();
    let seconds = started.elapsed().as_secs_f64();
    if response.extensions().get::<Streamed>().is_none() {
        app.metrics.record_request(endpoint, status, seconds);
    }
    let error = response
        .extensions()
        .get::<ErrorMessage>()
        .map(|e| e.0.as_str());
    tracing::info!(
        target: "kiln::serve",
        %method,
        path,
        status,
        endpoint,
        duration_ms = (seconds * 1000.0).round() as u64,
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        error,
        streamed = response.extensions().get::<Streamed>().is_some(),
        "request"
    );
    response
}

fn with_endpoint(endpoint: &'static str, mut response: Response) -> Response {
    response.extensions_mut().insert(Endpoint(endpoint));
    response
}

async fn not_found(request: Request) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route {} {}; see the README's serving section for the endpoints",
            request.method(),
            request.uri().path()
        ),
    )
    .into_response()
}

/// The body, or 413 when it is over the limit.
fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is over the server's limit (--max-body-bytes)".to_string()
        } else {
            format!("cannot read the request body: {}", rejection.body_text())
        };
        ApiError::new(status, message)
    })
}

impl App {
    /// KServe v1's model status and v2's model readiness: the same answer.
    fn readiness(&self, name: &str) -> Response {
        if name != self.name {
            return self.unknown_model(name).into_response();
        }
        match self.scheduler.dead() {
            None => Json(json!({"name": self.name, "ready": true})).into_response(),
            Some(death) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"name": self.name, "ready": false, "error": death})),
            )
                .into_response(),
        }
    }

    /// 503 once the scheduler has died: no request can be answered any more.
    fn unavailable(&self) -> ApiError {
        let death = self
            .scheduler
            .dead()
            .unwrap_or_else(|| "the scheduler stopped".into());
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{death}; the server is shutting down"),
        )
    }

    /// The channel of a request closed before its answer: the scheduler died (503), or it is
    /// a bug (500).
    fn stopped_early(&self) -> ApiError {
        if self.scheduler.dead().is_some() {
            self.unavailable()
        } else {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the scheduler stopped before the request finished",
            )
        }
    }

    /// 413 for a request of more prompts than `--max-prompts` allows.
    fn check_prompt_count(&self, count: usize, at: &str) -> Result<(), ApiError> {
        let limit = self.scheduler.limits().max_prompts;
        if count > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{at}: {count} prompts is over the server's limit of {limit} a request \
                     (--max-prompts); split the request"
                ),
            ));
        }
        Ok(())
    }

    fn unknown_model(&self, name: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "model {name:?} is not served here (this server serves {:?})",
                self.name
            ),
        )
    }

    /// Tokenizes prompts and checks them against the model, errors naming `at[i]`.
    fn sequences(
        &self,
        texts: &[String],
        params: GenerationParams,
        at: &str,
    ) -> Parsed<Vec<Sequence>> {
        self.sequences_of_ids(&self.encode(texts, at)?, params, at)
    }

    /// Each text's token ids, errors naming `at[i]`.
    fn encode(&self, texts: &[String], at: &str) -> Parsed<Vec<Vec<u32>>> {
        texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                self.tokenizer
                    .encode(text)
                    .map_err(|e| BadRequest(format!("{at}[{i}]: {e:#}")))
            })
            .collect()
    }

    /// Prompts given as token ids, checked against the model, errors naming `at[i]`.
    fn sequences_of_ids(
        &self,
        prompts: &[Vec<u32>],
        params: GenerationParams,
        at: &str,
    ) -> Parsed<Vec<Sequence>> {
        let params = Arc::new(params);
        prompts
            .iter()
            .enumerate()
            .map(|(i, ids)| {
                Sequence::new(&self.config, ids, i, params.clone()).map_err(|e| {
                    let hint = if params.truncate_left {
                        ""
                    } else {
                        " (or set truncate_left: true in the parameters)"
                    };
                    BadRequest(format!("{at}[{i}]: {e:#}{hint}"))
                })
            })
            .collect()
    }

    fn submit(&self, work: Work) -> Result<tokio::sync::mpsc::UnboundedReceiver<Event>, ApiError> {
        self.scheduler
            .submit(work)
            .map_err(|refused| match refused {
                Refused::Busy { retry_after_secs } => ApiError {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    message: format!(
                        "the server is busy ({} requests queued); retry after {retry_after_secs} s",
                        self.scheduler.limits().max_queue,
                    ),
                    retry_after: Some(retry_after_secs),
                    openai: false,
                },
                Refused::Dead(_) => self.unavailable(),
            })
    }

    /// Runs sequences to the end; the results are in order.
    async fn generate(
        &self,
        sequences: Vec<Sequence>,
    ) -> Result<(Vec<Generated>, Usage), ApiError> {
        let n = sequences.len();
        let prompt_tokens = sequences.iter().map(|s| s.prompt().len()).sum();
        let started = Instant::now();
        let mut events = self.submit(Work::Generate(sequences))?;
        let mut results: Vec<Option<Generated>> = vec![None; n];
        let mut first_token = true;
        let mut done = 0;
        while done < n {
            match events.recv().await {
                Some(Event::Token { .. }) => {
                    if first_token {
                        self.metrics
                            .first_token_seconds
                            .observe(started.elapsed().as_secs_f64());
                        first_token = false;
                    }
                }
                Some(Event::Done {
                    instance,
                    generated,
                }) => {
                    results[instance] = Some(generated);
                    done += 1;
                }
                Some(Event::TimedOut) => return Err(self.timed_out()),
                Some(Event::Rejected(message)) => {
                    return Err(ApiError::new(StatusCode::BAD_REQUEST, message))
                }
                Some(Event::Failed(message)) => {
                    return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message))
                }
                Some(Event::Scored(_) | Event::Logprobs(_)) | None => {
                    return Err(self.stopped_early())
                }
            }
        }
        let results: Vec<Generated> = results.into_iter().map(|r| r.expect("done")).collect();
        let usage = Usage {
            prompt_tokens,
            completion_tokens: results.iter().map(|g| g.ids.len()).sum(),
        };
        Ok((results, usage))
    }

    /// Every token's log-probability in each prompt followed by its completion, with the `top`
    /// most likely tokens at each position, scored as `kiln score` scores (through the
    /// scheduler, a chunk at a time).
    async fn token_logprobs(
        &self,
        generated: &[Generated],
        top: usize,
    ) -> Result<Vec<ScoredRow>, ApiError> {
        let rows = generated
            .iter()
            .map(|g| [g.prompt_ids.as_slice(), g.ids.as_slice()].concat())
            .collect();
        match self.score(Work::Logprobs { rows, top }).await? {
            Event::Logprobs(rows) => Ok(rows),
            _ => Err(self.stopped_early()),
        }
    }

    /// Runs a scoring job (classification or log-probabilities): its one answer, or the error
    /// the scheduler reported (timed out 504, rejected 400, failed 500, gone 503).
    async fn score(&self, work: Work) -> Result<Event, ApiError> {
        let mut events = self.submit(work)?;
        match events.recv().await {
            Some(Event::TimedOut) => Err(self.timed_out()),
            Some(Event::Rejected(message)) => Err(ApiError::new(StatusCode::BAD_REQUEST, message)),
            Some(Event::Failed(message)) => {
                Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message))
            }
            Some(answer) => Ok(answer),
            None => Err(self.stopped_early()),
        }
    }

    /// OpenAI's `logprobs` object for the tokens of `row` from `from` on: each token's text, its
    /// log-probability (`null` for a first token, which has no context), the `top` most likely
    /// tokens at its position (and the token itself, so up to `top + 1`, as OpenAI gives them)
    /// and its character offset in the choice's text, the first at `offset`.
    fn logprobs_object(&self, row: &ScoredRow, from: usize, offset: usize, top: usize) -> Value {
        let piece = |id: u32| self.tokenizer.decode(&[id], false).unwrap_or_default();
        let (mut tokens, mut offsets, mut top_logprobs) = (Vec::new(), Vec::new(), Vec::new());
        let mut at = offset;
        for position in from..row.ids.len() {
            let token = piece(row.ids[position]);
            offsets.push(at);
            at += token.chars().count();
            top_logprobs.push(
                match (row.logprobs[position], row.top_logprobs.get(position)) {
                    (Some(logprob), Some(Some(best))) => {
                        let mut listed: serde_json::Map<String, Value> = best
                            .iter()
                            .take(top)
                            .map(|&(id, logprob)| (piece(id), json!(logprob)))
                            .collect();
                        listed.entry(token.clone()).or_insert(json!(logprob));
                        Value::Object(listed)
                    }
                    (Some(logprob), _) => json!({ token.clone(): logprob }),
                    (None, _) => Value::Null,
                },
            );
            tokens.push(token);
        }
        json!({
            "tokens": tokens,
            "token_logprobs": row.logprobs[from..],
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        })
    }

    fn timed_out(&self) -> ApiError {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the request did not finish within the server's timeout of {:?} (--timeout)",
                self.scheduler.limits().timeout
            ),
        )
    }
}

/// KServe's `{"models": [...]}` and, beside it, OpenAI's list (`client.models.list()`).
async fn list_models(State(app): State<Arc<App>>) -> Response {
    let model =
        json!({"id": app.name, "object": "model", "created": app.started, "owned_by": "kiln"});
    with_endpoint(
        "v1_models",
        Json(json!({"models": [app.name], "object": "list", "data": [model]})).into_response(),
    )
}

async fn model_status(State(app): State<Arc<App>>, Path(target): Path<String>) -> Response {
    with_endpoint("v1_model", app.readiness(&target))
}

/// `POST /v1/models/NAME:predict` and `NAME:classify`.
async fn model_verb(
    State(app): State<Arc<App>>,
    Path(target): Path<String>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let Some((name, verb)) = target.rsplit_once(':') else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            format!("POST /v1/models/{target}: expected NAME:predict or NAME:classify"),
        )
        .into_response();
    };
    let (endpoint, result) = match verb {
        "predict" => ("v1_predict", predict(&app, name, bytes).await),
        "classify" => ("v1_classify", classify(&app, name, bytes).await),
        other => (
            "other",
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("unknown verb :{other}; expected :predict or :classify"),
            )),
        ),
    };
    with_endpoint(endpoint, result.unwrap_or_else(IntoResponse::into_response))
}

async fn predict(
    app: &App,
    name: &str,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body(bytes)?;
    if name != app.name {
        return Err(app.unknown_model(name));
    }
    let request: protocol::PredictRequest = protocol::from_value(protocol::json_body(&bytes)?, "")?;
    let params = protocol::generation_params(request.parameters, "parameters")?;
    app.check_prompt_count(request.instances.len(), "instances")?;
    let texts = protocol::instance_texts(&request.instances)?;
    let sequences = app.sequences(&texts, params, "instances")?;
    let (generated, usage) = app.generate(sequences).await?;
    let predictions: Vec<Value> = generated
        .into_iter()
        .map(|g| Value::String(g.text))
        .collect();
    let mut response = Json(json!({"predictions": predictions})).into_response();
    response.extensions_mut().insert(usage);
    Ok(response)
}

async fn classify(
    app: &App,
    name: &str,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body(bytes)?;
    if name != app.name {
        return Err(app.unknown_model(name));
    }
    let request: protocol::ClassifyRequest =
        protocol::from_value(protocol::json_body(&bytes)?, "")?;
    app.check_prompt_count(request.instances.len(), "instances")?;
    let classification = protocol::classification(request, &app.tokenizer)?;
    let (instances, labels) = (classification.prompts.len(), classification.labels.len());
    let limit = app.scheduler.limits().max_classify_pairs;
    if instances
        .checked_mul(labels)
        .is_none_or(|pairs| pairs > limit)
    {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "instances × labels: {instances} × {labels} is over the server's limit of {limit} \
                 label scores a request (--max-classify-pairs); split the request"
            ),
        ));
    }
    let prompt_tokens = classification.prompts.iter().map(Vec::len).sum();
    let work = Work::Score {
        prompts: classification.prompts,
        candidates: classification.candidates,
    };
    let Event::Scored(scores) = app.score(work).await? else {
        return Err(app.stopped_early());
    };
    let labels = &classification.labels;
    let predictions: Vec<Value> = scores
        .iter()
        .map(|totals| {
            let probabilities = protocol::probabilities(totals);
            let best = (0..labels.len())
                .max_by(|&a, &b| totals[a].total_cmp(&totals[b]))
                .expect("at least two labels");
            json!({
                "label": labels[best],
                "probabilities": labels.iter().cloned().zip(probabilities.into_iter().map(|p| json!(p))).collect::<serde_json::Map<String, Value>>(),
                "log_likelihoods": labels.iter().cloned().zip(totals.iter().map(|&t| json!(t))).collect::<serde_json::Map<String, Value>>(),
            })
        })
        .collect();
    let mut response = Json(json!({"predictions": predictions, "labels": labels})).into_response();
    response.extensions_mut().insert(Usage {
        prompt_tokens,
        completion_tokens: 0,
    });
    Ok(response)
}

async fn server_metadata() -> Response {
    with_endpoint(
        "v2_metadata",
        Json(json!({"name": "kiln", "version": env!("CARGO_PKG_VERSION"), "extensions": []}))
            .into_response(),
    )
}

/// `{"<key>": true}`, or 503 with `false` and the reason once the scheduler has died.
fn health(app: &App, key: &str) -> Response {
    let response = match app.scheduler.dead() {
        None => Json(json!({ key: true })).into_response(),
        Some(death) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ key: false, "error": death })),
        )
            .into_response(),
    };
    with_endpoint("v2_health", response)
}

async fn live(State(app): State<Arc<App>>) -> Response {
    health(&app, "live")
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    // The model is loaded before the port is bound: listening means ready, until the scheduler
    // that runs it dies.
    health(&app, "ready")
}

async fn model_metadata(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    let response = if name == app.name {
        Json(json!({
            "name": app.name,
            "versions": ["1"],
            "platform": "kiln",
            "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}],
        }))
        .into_response()
    } else {
        app.unknown_model(&name).into_response()
    };
    with_endpoint("v2_model", response)
}

async fn model_ready(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    with_endpoint("v2_model", app.readiness(&name))
}

async fn infer(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let bytes = body(bytes)?;
        if name != app.name {
            return Err(app.unknown_model(&name));
        }
        let request: protocol::InferRequest =
            protocol::from_value(protocol::json_body(&bytes)?, "")?;
        let texts = protocol::infer_texts(&request)?;
        app.check_prompt_count(texts.len(), "inputs[0].data")?;
        let params = protocol::generation_params(request.parameters.clone(), "parameters")?;
        let sequences = app.sequences(&texts, params, "inputs[0].data")?;
        let (generated, usage) = app.generate(sequences).await?;
        let data: Vec<String> = generated.into_iter().map(|g| g.text).collect();
        let mut response = Json(json!({
            "model_name": app.name,
            "model_version": "1",
            "id": request.id,
            "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [data.len()], "data": data}],
        }))
        .into_response();
        response.extensions_mut().insert(usage);
        Ok(response)
    }
    .await;
    with_endpoint(
        "v2_infer",
        result.unwrap_or_else(IntoResponse::into_response),
    )
}

async fn prometheus(State(app): State<Arc<App>>) -> Response {
    let mut response = app.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    with_endpoint("metrics", response)
}

fn openai_finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// OpenAI's `usage` object.
fn openai_usage(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    })
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// OpenAI's `POST /v1/completions`, streamed as server-sent events when `stream` is true.
async fn completions(
    State(app): State<Arc<App>>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let response = completion(app, bytes)
        .await
        .unwrap_or_else(|e| e.openai().into_response());
    with_endpoint("v1_completions", response)
}

async fn completion(
    app: Arc<App>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body(bytes)?;
    let request: protocol::CompletionRequest =
        protocol::from_value(protocol::json_body(&bytes)?, "")?;
    if request.model != app.name {
        return Err(app.unknown_model(&request.model));
    }
    let params = request.params()?;
    let prompts = request.prompts()?;
    let (echo, logprobs) = (request.echo.unwrap_or(false), request.logprobs()?);
    app.check_prompt_count(prompts.len(), "prompt")?;
    if request.stream && (echo || logprobs.is_some()) {
        return Err(BadRequest(
            "echo and logprobs: not supported with stream: true (ask without streaming)".into(),
        )
        .into());
    }
    if request.stream && params.max_new_tokens == 0 {
        return Err(BadRequest("max_tokens: 0 needs stream: false".into()).into());
    }
    let stream_usage = request
        .stream_options
        .as_ref()
        .and_then(|options| options.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // The prompts as text (what `echo` repeats) and as the model reads them.
    let (texts, prompt_ids) = match prompts {
        Prompts::Texts(texts) => {
            let ids = app.encode(&texts, "prompt")?;
            (texts, ids)
        }
        Prompts::Tokens(rows) => {
            let texts = rows
                .iter()
                .map(|ids| app.tokenizer.decode(ids, false).unwrap_or_default())
                .collect();
            (texts, rows)
        }
    };
    let id = format!("cmpl-{:016x}", rand::random::<u64>());
    let created = unix_seconds();
    if !request.stream {
        // `max_tokens: 0` asks only for the prompt's numbers (with `echo`): nothing to generate.
        let (generated, usage) = if params.max_new_tokens == 0 {
            // Checked as prompts to continue are (empty, outside the vocabulary, too long).
            app.sequences_of_ids(&prompt_ids, params.clone(), "prompt")?;
            let generated: Vec<Generated> = prompt_ids
                .iter()
                .map(|ids| Generated {
                    prompt_ids: ids.clone(),
                    ids: Vec::new(),
                    text: String::new(),
                    finish_reason: FinishReason::Length,
                })
                .collect();
            let prompt_tokens = prompt_ids.iter().map(Vec::len).sum();
            (
                generated,
                Usage {
                    prompt_tokens,
                    completion_tokens: 0,
                },
            )
        } else {
            let sequences = app.sequences_of_ids(&prompt_ids, params.clone(), "prompt")?;
            app.generate(sequences).await?
        };
        let scored = match logprobs {
            Some(top) => Some(app.token_logprobs(&generated, top).await?),
            None => None,
        };
        let choices: Vec<Value> = generated
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let prompt_text = if echo { texts[i].as_str() } else { "" };
                let logprobs = match (&scored, logprobs) {
                    (Some(rows), Some(top)) => {
                        // Without echo, only the completion's tokens, at their offsets after
                        // the prompt.
                        let from = if echo { 0 } else { g.prompt_ids.len() };
                        let offset = if echo { 0 } else { texts[i].chars().count() };
                        app.logprobs_object(&rows[i], from, offset, top)
                    }
                    _ => Value::Null,
                };
                json!({
                    "index": i,
                    "text": format!("{prompt_text}{}", g.text),
                    "logprobs": logprobs,
                    "finish_reason": openai_finish_reason(g.finish_reason),
                })
            })
            .collect();
        let mut response = Json(json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": app.name,
            "choices": choices,
            "usage": openai_usage(&usage),
        }))
        .into_response();
        response.extensions_mut().insert(usage);
        return Ok(response);
    }
    let sequences = app.sequences_of_ids(&prompt_ids, params.clone(), "prompt")?;
    let stream = Stream {
        chat: false,
        id,
        created,
        stops: params.stop,
        include_usage: stream_usage,
    };
    streamed(&app, sequences, stream)
}

/// OpenAI's `POST /v1/chat/completions`: the messages through the model's chat template,
/// generation ending at its end-of-turn token; streamed when `stream` is true.
async fn chat_completions(
    State(app): State<Arc<App>>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let response = chat_completion(app, bytes)
        .await
        .unwrap_or_else(|e| e.openai().into_response());
    with_endpoint("v1_chat_completions", response)
}

async fn chat_completion(
    app: Arc<App>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body(bytes)?;
    let request: protocol::ChatRequest = protocol::from_value(protocol::json_body(&bytes)?, "")?;
    if request.model != app.name {
        return Err(app.unknown_model(&request.model));
    }
    let chat = app.chat.as_ref().map_err(|why| {
        BadRequest(format!(
            "this model cannot chat: {why} (use /v1/completions)"
        ))
    })?;
    let messages = request.messages()?;
    let mut params = request.params()?;
    params.stop_token_ids = chat.stop_token_ids.clone();
    if params.max_new_tokens == 0 {
        return Err(BadRequest("max_tokens: must be at least 1".into()).into());
    }
    let prompt = (chat.template)
        .render(&messages, true)
        .map_err(|e| BadRequest(format!("messages: {e:#}")))?;
    let prompt_ids = app.encode(&[prompt], "messages")?;
    let sequences = app.sequences_of_ids(&prompt_ids, params.clone(), "messages")?;
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    let created = unix_seconds();
    if request.stream {
        let include_usage = (request.stream_options.as_ref())
            .and_then(|options| options.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let stream = Stream {
            chat: true,
            id,
            created,
            stops: params.stop,
            include_usage,
        };
        return streamed(&app, sequences, stream);
    }
    let (generated, usage) = app.generate(sequences).await?;
    let choices: Vec<Value> = (generated.iter().enumerate())
        .map(|(i, g)| {
            json!({
                "index": i,
                "message": {"role": "assistant", "content": g.text},
                "logprobs": null,
                "finish_reason": openai_finish_reason(g.finish_reason),
            })
        })
        .collect();
    let mut response = Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": app.name,
        "choices": choices,
        "usage": openai_usage(&usage),
    }))
    .into_response();
    response.extensions_mut().insert(usage);
    Ok(response)
}

/// How a streamed response is sent.
struct Stream {
    chat: bool,
    id: String,
    created: u64,
    stops: Vec<String>,
    include_usage: bool,
}

/// Runs `sequences`, sending each choice's text as server-sent events as it comes.
fn streamed(
    app: &Arc<App>,
    sequences: Vec<Sequence>,
    stream: Stream,
) -> Result<Response, ApiError> {
    let choices = sequences.len();
    let prompt_tokens = sequences.iter().map(|s| s.prompt().len()).sum();
    let events = app.submit(Work::Generate(sequences))?;
    let stream_state = Arc::new(std::sync::Mutex::new(StreamState {
        app: app.clone(),
        chat: stream.chat,
        named: vec![false; choices],
        id: stream.id,
        created: stream.created,
        stops: stream.stops,
        decoded: vec![(Vec::new(), 0); choices],
        started: Instant::now(),
        first_token: true,
        failed: None,
        unfinished: choices,
        usage: stream.include_usage.then_some(Usage {
            prompt_tokens,
            completion_tokens: 0,
        }),
    }));
    let at_end = stream_state.clone();
    // Only this stream's closures take it, one after the other.
    fn locked(state: &std::sync::Mutex<StreamState>) -> std::sync::MutexGuard<'_, StreamState> {
        state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
    let chunks = tokio_stream::wrappers::UnboundedReceiverStream::new(events)
        .map(move |event| Ok::<_, std::convert::Infallible>(locked(&stream_state).event(event)))
        .chain(tokio_stream::iter([false, true]).map(move |last| {
            Ok(if last {
                SseEvent::default().data("[DONE]")
            } else {
                locked(&at_end).closing_event()
            })
        }));
    let mut response = Sse::new(chunks)
        .keep_alive(KeepAlive::default())
        .into_response();
    response.extensions_mut().insert(Streamed);
    response.extensions_mut().insert(Usage {
        prompt_tokens,
        completion_tokens: 0,
    });
    Ok(response)
}

/// A streamed completion: what each choice has sent so far.
struct StreamState {
    app: Arc<App>,
    /// Chat completions' chunks carry a `delta`; completions' a `text`.
    chat: bool,
    /// Per choice, whether a chunk has named its role yet (chat).
    named: Vec<bool>,
    id: String,
    created: u64,
    stops: Vec<String>,
    /// Per choice, its tokens and how many bytes of their text were sent.
    decoded: Vec<(Vec<u32>, usize)>,
    started: Instant,
    first_token: bool,
    /// The status a stream that ended in an error event would have had.
    failed: Option<u16>,
    unfinished: usize,
    /// With `stream_options.include_usage`: the counts sent in a last chunk before `[DONE]`.
    usage: Option<Usage>,
}

impl StreamState {
    fn object(&self) -> &'static str {
        match self.chat {
            true => "chat.completion.chunk",
            false => "text_completion",
        }
    }

    fn chunk(&mut self, index: usize, text: &str, finish_reason: Option<&str>) -> SseEvent {
        let choice = match self.chat {
            // The first chunk of a choice names the role, as OpenAI's do.
            true => {
                let first = !std::mem::replace(&mut self.named[index], true);
                let delta = match (first, text.is_empty()) {
                    (true, _) => json!({"role": "assistant", "content": text}),
                    (false, true) => json!({}),
                    (false, false) => json!({"content": text}),
                };
                json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish_reason})
            }
            false => {
                json!({"index": index, "text": text, "logprobs": null, "finish_reason": finish_reason})
            }
        };
        SseEvent::default().data(
            json!({
                "id": self.id,
                "object": self.object(),
                "created": self.created,
                "model": self.app.name,
                "choices": [choice],
            })
            .to_string(),
        )
    }

    fn event(&mut self, event: Event) -> SseEvent {
        match event {
            Event::Token { instance, token } => {
                if self.first_token {
                    self.first_token = false;
                    self.app
                        .metrics
                        .first_token_seconds
                        .observe(self.started.elapsed().as_secs_f64());
                }
                let (tokens, sent) = &mut self.decoded[instance];
                tokens.push(token);
                // Decode the whole completion each time (a character can span tokens), and hold
                // back what could still become a stop string, which the final text cuts off.
                let text = self.app.tokenizer.decode(tokens, true).unwrap_or_default();
                let safe = safe_prefix(&text, &self.stops);
                if safe > *sent {
                    let delta = text[*sent..safe].to_string();
                    *sent = safe;
                    self.chunk(instance, &delta, None)
                } else {
                    SseEvent::default().comment("")
                }
            }
            Event::Done {
                instance,
                generated,
            } => {
                self.unfinished -= 1;
                if let Some(usage) = self.usage.as_mut() {
                    usage.completion_tokens += generated.ids.len();
                }
                let (_, sent) = &mut self.decoded[instance];
                let rest = generated.text.get(*sent..).unwrap_or("").to_string();
                *sent = generated.text.len();
                self.chunk(
                    instance,
                    &rest,
                    Some(openai_finish_reason(generated.finish_reason)),
                )
            }
            Event::TimedOut => {
                self.failed = Some(504);
                SseEvent::default().data(
                    json!({"error": {"message": self.app.timed_out().message, "type": "server_error"}})
                        .to_string(),
                )
            }
            Event::Rejected(message) => {
                self.failed = Some(400);
                SseEvent::default().data(
                    json!({"error": {"message": message, "type": "invalid_request_error"}})
                        .to_string(),
                )
            }
            Event::Failed(message) => {
                self.failed = Some(500);
                SseEvent::default().data(
                    json!({"error": {"message": message, "type": "server_error"}}).to_string(),
                )
            }
            Event::Scored(_) | Event::Logprobs(_) => SseEvent::default().comment(""),
        }
    }

    /// After the last event: an error event if the scheduler went away before every choice
    /// finished (it died), else nothing a client reads.
    fn closing_event(&mut self) -> SseEvent {
        if self.failed.is_some() {
            return SseEvent::default().comment("");
        }
        if self.unfinished == 0 {
            // OpenAI's usage chunk: no choices, the whole request's counts.
            return match self.usage {
                Some(usage) => SseEvent::default().data(
                    json!({
                        "id": self.id,
                        "object": self.object(),
                        "created": self.created,
                        "model": self.app.name,
                        "choices": [],
                        "usage": openai_usage(&usage),
                    })
                    .to_string(),
                ),
                None => SseEvent::default().comment(""),
            };
        }
        let error = self.app.stopped_early();
        self.failed = Some(error.status.as_u16());
        SseEvent::default()
            .data(json!({"error": {"message": error.message, "type": "server_error"}}).to_string())
    }
}

impl Drop for StreamState {
    fn drop(&mut self) {
        // 499, as nginx logs it: the client closed the stream before it ended.
        let status = match (self.failed, self.unfinished) {
            (Some(status), _) => status,
            (None, 0) => 200,
            (None, _) => 499,
        };
        let endpoint = match self.chat {
            true => "v1_chat_completions",
            false => "v1_completions",
        };
        self.app
            .metrics
            .record_request(endpoint, status, self.started.elapsed().as_secs_f64());
    }
}

/// The bytes of `text` that can be sent: up to a stop string it contains, and short of a tail
/// that could be the start of one.
fn safe_prefix(text: &str, stops: &[String]) -> usize {
    let mut end = stops
        .iter()
        .filter_map(|s| text.find(s.as_str()))
        .min()
        .unwrap_or(text.len());
    for stop in stops {
        for cut in (1..stop.len()).rev() {
            if stop.is_char_boundary(cut) && text[..end].ends_with(&stop[..cut]) {
                end -= cut;
                break;
            }
        }
    }
    // A character split across tokens decodes as U+FFFD until its last token arrives.
    while !text.is_char_boundary(end) || text[..end].ends_with('\u{FFFD}') {
        end -= 1;
    }
    end
}
