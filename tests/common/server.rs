//! A `kiln serve` process for the tests that talk to one over loopback.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

/// A `kiln serve` process on a free port, killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr: Option<std::process::ChildStderr>,
}

impl Server {
    /// A server whose request log the test reads (`stderr`) or leaves: a test that sends more
    /// than a pipe's worth of requests (64 KiB of log lines) must use [`Server::start_draining`],
    /// or the server blocks writing its log.
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        Server::start_with_env(model, extra, &[])
    }

    /// [`Server::start`] with these environment variables set for the server.
    pub fn start_with_env(model: &Path, extra: &[&str], env: &[(&str, &Path)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(["--threads", "2"])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kiln serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .rsplit("http://")
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("no address in {line:?}; stderr: {err}")
            });
        let stderr = child.stderr.take();
        Server {
            child,
            addr,
            stderr,
        }
    }

    /// A server whose request log is read and dropped as it comes, however many requests.
    pub fn start_draining(model: &Path, extra: &[&str]) -> Server {
        let mut server = Server::start(model, extra);
        if let Some(mut stderr) = server.stderr.take() {
            std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        }
        server
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let answer =
            super::http::http_request(self.addr, "POST", path, &[], body.to_string().as_bytes());
        (
            answer.status,
            serde_json::from_slice(&answer.body).unwrap_or(Value::Null),
        )
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let answer = super::http::http_request(self.addr, "GET", path, &[], b"");
        (answer.status, String::from_utf8(answer.body).unwrap())
    }

    pub fn predict(&self, prompt: &str, parameters: Value) -> String {
        let (status, body) = self.post(
            "/v1/models/tiny:predict",
            &json!({"instances": [prompt], "parameters": parameters}),
        );
        assert_eq!(status, 200, "{body}");
        body["predictions"][0].as_str().unwrap().to_string()
    }

    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
