//! The accept loop: a cap on open connections, and deadlines that close connections a client
//! holds without using them (a head sent too slowly, a keep-alive connection left idle, a body
//! that stopped arriving), and graceful shutdown.
//!
//! hyper's own `header_read_timeout` is not used: its timer also runs while a keep-alive
//! connection waits for its next request, so it would close idle connections after the header
//! timeout rather than the (longer) idle timeout a load balancer's connection pool needs.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::{Body as HttpBody, Bytes, Frame, Incoming, SizeHint};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;

/// How long a client may hold a connection without using it, and how many it may hold.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// From a request's first byte (a new connection: from its accept) to the end of its head.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no bytes either way for this long is closed,
    /// and so is one whose request body has had no new bytes for this long.
    pub idle_timeout: Duration,
    /// Connections open at once; more wait in the listen backlog until one closes.
    pub max_connections: u32,
}

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting, closes the
/// connections with no request in flight and waits for the requests in flight to finish.
pub async fn serve_connections(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections as usize));
    let (stop, stopping) = watch::channel(false);
    let service = TowerToHyperService::new(router);
    tokio::pin!(shutdown);
    loop {
        // Waiting for a free slot before accepting leaves extra clients in the kernel's backlog.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection = serve_connection(stream, service.clone(), limits, stopping.clone());
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(reason) = connection.await {
                tracing::debug!(%peer, "connection ended: {reason}");
            }
        });
    }
    drop(listener);
    stop.send_replace(true);
    // Each connection holds a slot until it closes: once all are free, all are done.
    let _all_closed = slots.acquire_many(limits.max_connections).await;
}

/// Serves one connection until it ends, or until a deadline closes it (the error says which).
async fn serve_connection(
    stream: TcpStream,
    router: TowerToHyperService<Router>,
    limits: ConnectionLimits,
    mut stopping: watch::Receiver<bool>,
) -> Result<(), String> {
    let activity = Arc::new(Activity::new(limits));
    let io = TokioIo::new(WatchedStream {
        stream,
        activity: activity.clone(),
    });
    let service = WatchedService {
        router,
        activity: activity.clone(),
    };
    let connection = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
    tokio::pin!(connection);
    let mut told_to_stop = false;
    loop {
        tokio::select! {
            served = connection.as_mut() => return served.map_err(|e| e.to_string()),
            reason = activity.expired() => return Err(reason.to_string()),
            // Resolves once: the value only ever turns true (or the sender is gone).
            _ = stopping.changed(), if !told_to_stop => {
                told_to_stop = true;
                // hyper closes an idle keep-alive connection at once and any other after its
                // answer, but would wait for a new connection's first head.
                connection.as_mut().graceful_shutdown();
                activity.stop();
            }
        }
    }
}

/// Errors of one connection (it was reset before the accept) are skipped; others (out of file
/// descriptors) are logged and retried after a pause, as hyper 0.14's server did.
async fn accept_failed(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!("cannot accept a connection: {e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// What a connection is doing, and since when: the basis of its deadline.
struct Activity {
    limits: ConnectionLimits,
    state: Mutex<State>,
    /// Woken when the deadline may have moved earlier.
    changed: Notify,
}

struct State {
    phase: Phase,
    /// Whether a request has been read on this connection (its first head counts from accept).
    served_one: bool,
    last_read: Instant,
    /// The server is shutting down.
    stopping: bool,
}

#[derive(Clone, Copy)]
enum Phase {
    /// Waiting for a request's head; `head_started` is when its first byte came.
    BetweenRequests {
        since: Instant,
        head_started: Option<Instant>,
    },
    /// The head was read and its handler waits for the body.
    ReadingBody,
    /// The body is in (or the answer has begun): a long generation writes nothing until it is
    /// done, and streams send keep-alive comments, so this never expires.
    Answering,
}

impl Activity {
    fn new(limits: ConnectionLimits) -> Self {
        let now = Instant::now();
        Self {
            limits,
            state: Mutex::new(State {
                phase: Phase::BetweenRequests {
                    since: now,
                    head_started: None,
                },
                served_one: false,
                last_read: now,
                stopping: false,
            }),
            changed: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the state half-written: every update is one assignment.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let mut state = self.state();
        state.last_read = Instant::now();
        if let Phase::BetweenRequests {
            since,
            head_started: None,
        } = state.phase
        {
            state.phase = Phase::BetweenRequests {
                since,
                head_started: Some(state.last_read),
            };
            self.changed.notify_one();
        }
    }

    /// Bytes of the last answer leaving count as activity between requests.
    fn wrote(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let mut state = self.state();
        if let Phase::BetweenRequests {
            head_started: None, ..
        } = state.phase
        {
            state.phase = Phase::BetweenRequests {
                since: Instant::now(),
                head_started: None,
            };
        }
    }

    fn stop(&self) {
        self.state().stopping = true;
        self.changed.notify_one();
    }

    fn request_started(&self, body_is_empty: bool) {
        let mut state = self.state();
        state.served_one = true;
        state.phase = if body_is_empty {
            Phase::Answering
        } else {
            Phase::ReadingBody
        };
    }

    fn answering(&self) {
        let mut state = self.state();
        if matches!(state.phase, Phase::ReadingBody) {
            state.phase = Phase::Answering;
        }
    }

    fn request_ended(&self) {
        self.state().phase = Phase::BetweenRequests {
            since: Instant::now(),
            head_started: None,
        };
        self.changed.notify_one();
    }

    /// When the connection should be closed unless something happens first, and why.
    fn deadline(&self) -> Option<(Instant, &'static str)> {
        let state = self.state();
        let limits = &self.limits;
        match state.phase {
            Phase::BetweenRequests { .. } if state.stopping && !state.served_one => {
                Some((Instant::now(), "the server is shutting down"))
            }
            Phase::BetweenRequests { since, .. } if !state.served_one => Some((
                since + limits.header_read_timeout,
                "no complete request head within --header-read-timeout of connecting",
            )),
            Phase::BetweenRequests {
                head_started: Some(started),
                ..
            } => Some((
                started + limits.header_read_timeout,
                "the request head did not arrive within --header-read-timeout",
            )),
            Phase::BetweenRequests { since, .. } => Some((
                since + limits.idle_timeout,
                "no new request within --idle-timeout",
            )),
            Phase::ReadingBody => Some((
                state.last_read + limits.idle_timeout,
                "the request body stopped arriving for --idle-timeout",
            )),
            Phase::Answering => None,
        }
    }

    /// Completes when the connection's deadline passes; the reason says which it was.
    async fn expired(&self) -> &'static str {
        loop {
            match self.deadline() {
                Some((at, reason)) if Instant::now() >= at => return reason,
                // A deadline that moved later is found on waking; one that moved earlier notifies.
                Some((at, _)) => tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = self.changed.notified() => {}
                },
                None => self.changed.notified().await,
            }
        }
    }
}

/// The client's socket, noting when bytes come and go.
struct WatchedStream {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        self.activity.read(buf.filled().len() - before);
        polled
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(bytes)) = polled {
            self.activity.wrote(bytes);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(bytes)) = polled {
            self.activity.wrote(bytes);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The router, with each request's progress reported to the connection's [`Activity`].
struct WatchedService {
    router: TowerToHyperService<Router>,
    activity: Arc<Activity>,
}

impl Service<Request<Incoming>> for WatchedService {
    type Response = Response<AnswerBody>;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.activity
            .request_started(request.body().is_end_stream());
        // Ends the request when the answer's body is done or dropped, or when the handler is
        // dropped before answering (its client went away).
        let in_flight = InFlight(self.activity.clone());
        let request = request.map(|body| {
            Body::new(RequestBody {
                body,
                activity: self.activity.clone(),
            })
        });
        let answer = self.router.call(request);
        Box::pin(async move {
            let response = answer.await?;
            in_flight.0.answering();
            Ok(response.map(|body| AnswerBody {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A request's body, noting when it has all arrived.
struct RequestBody {
    body: Incoming,
    activity: Arc<Activity>,
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.body.is_end_stream() {
            self.activity.answering();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// An answer's body, holding its request in flight until it is done.
struct AnswerBody {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for AnswerBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
