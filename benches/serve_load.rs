//! `kiln serve` under load on loopback: 16 concurrent clients, continuous batching against one
//! request at a time (`--max-batch 1`), with throughput, latency percentiles and the server's
//! RSS over the run. Greedy answers must be the same in both modes.
//!
//! `cargo bench --bench serve_load [-- --preset small --requests 1000 --one-at-a-time-requests 160
//! --max-new-tokens 32 --clients 16]` (needs `../shared/tokenizers/gpt2`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{json, Value};

struct Options {
    preset: String,
    requests: usize,
    one_at_a_time_requests: usize,
    max_new_tokens: usize,
    clients: usize,
}

fn options() -> Options {
    let mut o = Options {
        preset: "small".into(),
        requests: 1000,
        one_at_a_time_requests: 160,
        max_new_tokens: 32,
        clients: 16,
    };
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).map(String::as_str).unwrap_or("");
        match pair[0].as_str() {
            "--preset" => o.preset = value.into(),
            "--requests" => o.requests = value.parse().expect("--requests N"),
            "--one-at-a-time-requests" => {
                o.one_at_a_time_requests = value.parse().expect("--one-at-a-time-requests N")
            }
            "--max-new-tokens" => o.max_new_tokens = value.parse().expect("--max-new-tokens N"),
            "--clients" => o.clients = value.parse().expect("--clients N"),
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

fn prompt(i: usize) -> String {
    let words = [
        "mnli hypothesis: The man is sleeping. premise: A man plays the guitar on stage. target:",
        "Once upon a time, in a village by the sea, there lived",
        "The quick brown fox jumps over the lazy dog, and then",
        "Review: The film was long, but the acting kept me watching.\nSentiment:",
    ];
    format!("{} ({i})", words[i % words.len()].repeat(1 + i % 3))
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(model: &Path, max_batch: usize) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(["--name", "bench", "--max-batch", &max_batch.to_string()])
            .args(["--max-queue", "1024"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
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
            .unwrap()
            .parse()
            .unwrap();
        Server { child, addr }
    }

    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        kib / 1024.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One greedy completion: its text and its length in tokens.
fn complete(addr: SocketAddr, prompt: &str, max_new_tokens: usize) -> (String, u64) {
    let body =
        json!({"model": "bench", "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0})
            .to_string();
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{raw}");
    let value: Value = serde_json::from_str(body).unwrap();
    (
        value["choices"][0]["text"].as_str().unwrap().to_string(),
        value["usage"]["completion_tokens"].as_u64().unwrap(),
    )
}

/// A request's index, its answer and length in tokens, and its latency in seconds.
type Answered = (usize, (String, u64), f64);

struct RunResult {
    seconds: f64,
    latencies: Vec<f64>,
    answers: Vec<(usize, String)>,
    tokens: u64,
    rss: Vec<(usize, f64)>,
}

fn run(server: &Server, options: &Options, requests: usize) -> RunResult {
    let next = AtomicUsize::new(0);
    let rss = Mutex::new(Vec::new());
    let started = Instant::now();
    let per_client: Vec<Vec<Answered>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..options.clients)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= requests {
                            return done;
                        }
                        if i.is_multiple_of(100) {
                            rss.lock().unwrap().push((i, server.rss_mib()));
                        }
                        let t = Instant::now();
                        let text = complete(server.addr, &prompt(i), options.max_new_tokens);
                        done.push((i, text, t.elapsed().as_secs_f64()));
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let mut answers = Vec::new();
    let mut tokens = 0;
    for (i, (text, n), latency) in per_client.into_iter().flatten() {
        latencies.push(latency);
        answers.push((i, text));
        tokens += n;
    }
    latencies.sort_by(f64::total_cmp);
    answers.sort();
    let mut rss = rss.into_inner().unwrap();
    rss.push((requests, server.rss_mib()));
    rss.sort_by_key(|r| r.0);
    RunResult {
        seconds,
        latencies,
        answers,
        tokens,
        rss,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let options = options();
    let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tokenizers/gpt2");
    assert!(
        tokenizer.exists(),
        "{} is needed (the real GPT-2 BPE)",
        tokenizer.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join(&options.preset);
    let status = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["init", "--preset", &options.preset, "--seed", "1"])
        .args([
            "--out",
            model.to_str().unwrap(),
            "--tokenizer",
            tokenizer.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());

    println!(
        "kiln serve, {} preset, {} clients, greedy, {} new tokens a request (eos can end one sooner)\n",
        options.preset, options.clients, options.max_new_tokens
    );
    let one = {
        let server = Server::start(&model, 1);
        run(&server, &options, options.one_at_a_time_requests)
    };
    let batched = {
        let server = Server::start(&model, options.clients);
        // Warm up the allocator and caches as a long-running server would be.
        let _ = complete(server.addr, &prompt(0), options.max_new_tokens);
        run(&server, &options, options.requests)
    };
    let same = one
        .answers
        .iter()
        .all(|(i, text)| batched.answers[*i].1 == *text);
    assert!(same, "greedy answers differ between the modes");

    println!(
        "| mode | requests | wall s | requests/s | new tokens/s | p50 latency s | p99 latency s |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, r) in [
        ("one at a time (--max-batch 1)", &one),
        ("continuous batching", &batched),
    ] {
        println!(
            "| {name} | {} | {:.1} | {:.2} | {:.0} | {:.2} | {:.2} |",
            r.answers.len(),
            r.seconds,
            r.answers.len() as f64 / r.seconds,
            r.tokens as f64 / r.seconds,
            percentile(&r.latencies, 0.5),
            percentile(&r.latencies, 0.99),
        );
    }
    let speedup =
        (batched.answers.len() as f64 / batched.seconds) / (one.answers.len() as f64 / one.seconds);
    println!("\nthroughput, continuous / one at a time: {speedup:.2}x");
    println!("greedy answers identical in both modes: {same}");
    print!("server RSS (MiB) during the batched run, by request:");
    for (i, mib) in &batched.rss {
        print!(" {i}: {mib:.0}");
    }
    println!();
}
