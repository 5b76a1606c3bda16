//! `kiln serve`'s connections: the API key, the header-read and idle deadlines, the connection
//! cap, and shutdown with connections held open.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::http::{http_request as http, split_response, Answer};
use common::*;
use serde_json::{json, Value};

/// A `kiln serve` process on a free port, killed when dropped.
struct Server {
    child: Child,
    /// Where to connect: the printed address, with an unspecified host read as 127.0.0.1.
    addr: SocketAddr,
}

impl Server {
    /// Starts `kiln serve` with `extra` flags; `KILN_API_KEY` is taken from `api_key_env` only.
    fn start(model: &Path, extra: &[&str], api_key_env: Option<&str>) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command
            .args([
                "serve",
                "--model",
                model.to_str().unwrap(),
                "--name",
                "tiny",
            ])
            .args(["--port", "0", "--threads", "2"])
            .args(extra)
            .env_remove("KILN_API_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(key) = api_key_env {
            command.env("KILN_API_KEY", key);
        }
        let mut child = command.spawn().expect("kiln serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(mut addr) = line
            .trim()
            .rsplit("http://")
            .next()
            .and_then(|a| a.parse::<SocketAddr>().ok())
        else {
            let _ = child.kill();
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("no address in {line:?}; stderr: {err}")
        };
        if addr.ip().is_unspecified() {
            addr.set_ip([127, 0, 0, 1].into());
        }
        Server { child, addr }
    }

    fn request(&self, method: &str, path: &str, headers: &[&str], body: &Value) -> Answer {
        http(
            self.addr,
            method,
            path,
            headers,
            body.to_string().as_bytes(),
        )
    }

    fn metric(&self, name: &str) -> f64 {
        let answer = http(self.addr, "GET", "/metrics", &[], b"");
        let text = String::from_utf8(answer.body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Stops the server and returns what it wrote to stderr.
    fn logs(mut self) -> String {
        let _ = self.child.kill();
        let mut logs = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut logs)
            .unwrap();
        logs
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads one response with a Content-Length from a connection kept open.
fn read_response(stream: &mut TcpStream) -> Answer {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "the connection closed");
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("a content-length")
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    raw.extend_from_slice(&body);
    split_response(&raw)
}

/// Whether the server closes `stream` within `within` (bytes it sends meanwhile are dropped).
fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(e) => panic!("reading from the server: {e}"),
        }
    }
}

fn completion_body() -> Value {
    json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0})
}

/// The generous bound within which the server must have closed a connection it should close.
const CLOSES_WITHIN: Duration = Duration::from_secs(10);

#[test]
fn an_api_key_guards_every_endpoint_but_health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let server = Server::start(&model, &["--api-key", "sk-test"], None);
    let completion = completion_body();

    let missing = server.request("POST", "/v1/completions", &[], &completion);
    assert_eq!(missing.status, 401, "{missing:?}");
    assert!(
        missing.head.contains("www-authenticate: bearer"),
        "{}",
        missing.head
    );
    let error = &missing.json()["error"];
    assert_eq!(error["type"], "invalid_request_error", "{error}");
    assert_eq!(error["code"], "invalid_api_key", "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer"),
        "{error}"
    );

    let wrong = server.request(
        "POST",
        "/v1/completions",
        &["Authorization: Bearer sk-wrong"],
        &completion,
    );
    assert_eq!(wrong.status, 401, "{wrong:?}");
    assert_eq!(wrong.json()["error"]["code"], "invalid_api_key");
    assert!(wrong.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("the API key in the Authorization header is not valid"));
    let basic = server.request(
        "POST",
        "/v1/completions",
        &["Authorization: Basic sk-test"],
        &completion,
    );
    assert_eq!(basic.status, 401, "{basic:?}");
    let prefix = server.request(
        "POST",
        "/v1/completions",
        &["Authorization: Bearer sk-tes"],
        &completion,
    );
    assert_eq!(prefix.status, 401, "{prefix:?}");

    let right = server.request(
        "POST",
        "/v1/completions",
        &["Authorization: Bearer sk-test"],
        &completion,
    );
    assert_eq!(right.status, 200, "{right:?}");
    assert_eq!(right.json()["choices"].as_array().unwrap().len(), 1);
    let lowercase = server.request(
        "GET",
        "/v1/models",
        &["Authorization: bearer sk-test"],
        &Value::Null,
    );
    assert_eq!(lowercase.status, 200, "{lowercase:?}");

    // The other APIs' refusals have their plain error shape; unknown paths reveal nothing.
    for (method, path) in [
        ("GET", "/v1/models"),
        ("POST", "/v1/models/tiny:predict"),
        ("POST", "/v2/models/tiny/infer"),
        ("GET", "/v2"),
        ("GET", "/no/such/path"),
    ] {
        let answer = server.request(method, path, &[], &json!({"instances": ["Hi"]}));
        assert_eq!(answer.status, 401, "{path}: {answer:?}");
        assert!(answer.head.contains("www-authenticate: bearer"), "{path}");
        assert!(answer.json()["error"].is_string(), "{path}: {answer:?}");
    }

    for path in ["/v2/health/live", "/v2/health/ready", "/metrics"] {
        let answer = server.request("GET", path, &[], &Value::Null);
        assert_eq!(answer.status, 200, "{path} is open: {answer:?}");
    }
    assert_eq!(
        server.metric(r#"kiln_requests_total{endpoint="other",status="401"}"#),
        9.0,
        "each refusal is counted"
    );
}

#[test]
fn kiln_api_key_is_read_from_the_environment_and_an_empty_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let authorized = |server: &Server, key: &str| {
        let header = format!("Authorization: Bearer {key}");
        server
            .request("GET", "/v1/models", &[&header], &Value::Null)
            .status
    };
    let server = Server::start(&model, &[], Some("sk-env"));
    assert_eq!(
        server
            .request("GET", "/v1/models", &[], &Value::Null)
            .status,
        401
    );
    assert_eq!(authorized(&server, "sk-env"), 200);
    drop(server);

    let server = Server::start(&model, &["--api-key", "sk-flag"], Some("sk-env"));
    assert_eq!(authorized(&server, "sk-flag"), 200, "the flag wins");
    assert_eq!(authorized(&server, "sk-env"), 401);
    drop(server);

    let model = model.to_str().unwrap();
    for (flag, env, expected) in [
        (Some(""), None, "--api-key: the key is empty"),
        (None, Some(""), "KILN_API_KEY: the key is empty"),
        (Some("sk test"), None, "--api-key: the key contains ' '"),
    ] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command
            .args(["serve", "--model", model, "--port", "0"])
            .env_remove("KILN_API_KEY");
        if let Some(key) = flag {
            command.args(["--api-key", key]);
        }
        if let Some(key) = env {
            command.env("KILN_API_KEY", key);
        }
        let output = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{flag:?} {env:?}: started");
        assert!(stderr.contains(expected), "{flag:?} {env:?}: {stderr}");
        assert!(
            output.stdout.is_empty(),
            "never listened: {:?}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
}

#[test]
fn a_non_loopback_address_without_a_key_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let warning = "non-loopback address without an API key";
    let server = Server::start(&model, &["--host", "0.0.0.0"], None);
    let live = server.request("GET", "/v2/health/live", &[], &Value::Null);
    assert_eq!(live.status, 200, "{live:?}");
    let logs = server.logs();
    let line = logs
        .lines()
        .find(|l| l.contains(warning))
        .unwrap_or_else(|| panic!("no warning in {logs}"));
    assert!(line.contains("WARN"), "{line}");

    let server = Server::start(&model, &["--host", "0.0.0.0", "--api-key", "sk-k"], None);
    let logs = server.logs();
    assert!(!logs.contains(warning), "a key was set: {logs}");
    let server = Server::start(&model, &[], None);
    let logs = server.logs();
    assert!(!logs.contains(warning), "loopback: {logs}");
}

#[test]
fn a_request_head_sent_too_slowly_is_cut_at_the_header_read_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let server = Server::start(
        &model,
        &["--header-read-timeout", "1", "--idle-timeout", "60"],
        None,
    );
    let mut half_head = TcpStream::connect(server.addr).unwrap();
    half_head
        .write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut silent = TcpStream::connect(server.addr).unwrap();
    assert!(
        closed_by_server(&mut half_head, CLOSES_WITHIN),
        "half a head"
    );
    assert!(
        closed_by_server(&mut silent, CLOSES_WITHIN),
        "a new connection that sends nothing"
    );

    // On a kept-alive connection the head's time counts from its first byte, not the idle time.
    let mut kept = TcpStream::connect(server.addr).unwrap();
    kept.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut kept).status, 200);
    kept.write_all(b"GET /v2/health/live HTTP/1.1\r\n").unwrap();
    assert!(
        closed_by_server(&mut kept, CLOSES_WITHIN),
        "half a second head"
    );

    let live = server.request("GET", "/v2/health/live", &[], &Value::Null);
    assert_eq!(live.status, 200, "whole heads are still served: {live:?}");
}

#[test]
fn an_idle_connection_is_closed_but_a_slow_answer_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let idle_timeout = Duration::from_millis(200);
    let server = Server::start(
        &model,
        &["--idle-timeout", "0.2", "--header-read-timeout", "60"],
        None,
    );

    // Kept alive between two requests, then closed once idle.
    let mut kept = TcpStream::connect(server.addr).unwrap();
    for _ in 0..2 {
        kept.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        assert_eq!(read_response(&mut kept).status, 200);
    }
    assert!(
        closed_by_server(&mut kept, CLOSES_WITHIN),
        "idle keep-alive"
    );

    // A body that stops arriving.
    let mut stalled = TcpStream::connect(server.addr).unwrap();
    stalled
        .write_all(b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"instan")
        .unwrap();
    assert!(
        closed_by_server(&mut stalled, CLOSES_WITHIN),
        "a stalled body"
    );

    // A non-streamed answer writes nothing until it is done; its connection is in use.
    let started = Instant::now();
    let slow = server.request(
        "POST",
        "/v1/models/tiny:predict",
        &[],
        &json!({"instances": ["Once upon a time"], "parameters": {"max_new_tokens": 2000}}),
    );
    let took = started.elapsed();
    assert_eq!(slow.status, 200, "{slow:?}");
    assert!(
        took > 3 * idle_timeout,
        "the answer ({took:?}) must outlast the idle timeout for this test to mean anything"
    );

    // A stream whose client reads late.
    let mut streamed = TcpStream::connect(server.addr).unwrap();
    let body = json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 50,
                      "temperature": 0, "stream": true})
    .to_string();
    write!(
        streamed,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(3 * idle_timeout);
    streamed
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut raw = Vec::new();
    streamed.read_to_end(&mut raw).unwrap();
    let answer = split_response(&raw);
    assert_eq!(answer.status, 200);
    assert!(
        String::from_utf8_lossy(&answer.body).contains("data: [DONE]"),
        "{answer:?}"
    );
}

#[test]
fn connections_over_the_cap_wait_until_one_closes() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let server = Server::start(
        &model,
        &[
            "--max-connections",
            "2",
            "--header-read-timeout",
            "60",
            "--idle-timeout",
            "60",
        ],
        None,
    );
    let first = TcpStream::connect(server.addr).unwrap();
    let _second = TcpStream::connect(server.addr).unwrap();
    let mut third = TcpStream::connect(server.addr).unwrap();
    third
        .write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut byte = [0u8; 1];
    let waited = third.read(&mut byte);
    assert!(
        waited
            .as_ref()
            .is_err_and(|e| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "a third connection was served while two were open: {waited:?}"
    );
    drop(first);
    third
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut raw = Vec::new();
    third.read_to_end(&mut raw).unwrap();
    assert_eq!(split_response(&raw).status, 200, "served once a slot freed");
}

#[test]
fn sigterm_closes_idle_connections_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let mut server = Server::start(
        &model,
        &["--header-read-timeout", "60", "--idle-timeout", "60"],
        None,
    );
    let mut kept = TcpStream::connect(server.addr).unwrap();
    kept.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut kept).status, 200);
    let mut half_head = TcpStream::connect(server.addr).unwrap();
    half_head.write_all(b"GET /v2 HTTP/1.1\r\n").unwrap();
    let in_flight = {
        let addr = server.addr;
        std::thread::spawn(move || {
            http(
                addr,
                "POST",
                "/v1/models/tiny:predict",
                &[],
                json!({"instances": ["Once upon a time"], "parameters": {"max_new_tokens": 1000}})
                    .to_string()
                    .as_bytes(),
            )
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.metric("kiln_batch_rows") < 1.0 && !in_flight.is_finished() {
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert!(
        closed_by_server(&mut kept, CLOSES_WITHIN),
        "idle keep-alive"
    );
    assert!(
        closed_by_server(&mut half_head, CLOSES_WITHIN),
        "half a head"
    );
    let answer = in_flight.join().unwrap();
    assert_eq!(answer.status, 200, "the request in flight finished");
    let deadline = Instant::now() + CLOSES_WITHIN;
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}
