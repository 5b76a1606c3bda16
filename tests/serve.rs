//! `kiln serve` over loopback: the three APIs, continuous batching against one-at-a-time
//! answers, limits, bad input, cancellation, metrics, logs, shutdown and startup errors.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::server::Server;
use common::*;
use serde_json::{json, Value};

/// One HTTP/1.1 request on its own connection: (status, head lowercased, body), chunked bodies
/// decoded.
fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let answer = common::http::http_request(addr, method, path, &[], body);
    (answer.status, answer.head, answer.body)
}

/// The `data:` payloads of a server-sent event stream.
fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

fn prompts() -> Vec<String> {
    (0..24)
        .map(|i| {
            format!(
                "{} {i}:",
                [
                    "The quick brown fox",
                    "mnli hypothesis: a man",
                    "Once upon a time, in"
                ][i % 3]
                    .repeat(1 + i % 4)
            )
        })
        .collect()
}

/// `kiln generate --input` on `prompts` with `flags`: the completions.
fn kiln_generate(dir: &Path, model: &Path, prompts: &[String], flags: &[&str]) -> Vec<String> {
    let input = dir.join("prompts.jsonl");
    let lines: Vec<String> = prompts
        .iter()
        .map(|p| json!({"prompt": p}).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let output = dir.join("generated.jsonl");
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    let (ok, _, stderr) = kiln(&args);
    assert!(ok, "{stderr}");
    std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["completion"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn the_three_apis_answer_what_kiln_generate_answers() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let prompts = &prompts()[..3];
    let expected = kiln_generate(dir.path(), &model, prompts, &["--max-new-tokens", "12"]);
    assert!(expected.iter().all(|t| !t.is_empty()), "{expected:?}");
    let server = Server::start(&model, &["--name", "tiny"]);

    // KServe's list, and OpenAI's beside it.
    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["models"], json!(["tiny"]));
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["object"], "model");
    let (status, body) = server.get("/v1/models/tiny");
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"name":"tiny","ready":true}"#)
    );
    assert_eq!(server.get("/v2/health/live").0, 200);
    assert_eq!(server.get("/v2/health/ready").1, r#"{"ready":true}"#);
    let (status, body) = server.get("/v2/models/tiny");
    assert_eq!(status, 200);
    let metadata: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(metadata["inputs"][0]["name"], "text_input");
    assert_eq!(metadata["outputs"][0]["datatype"], "BYTES");
    assert_eq!(server.get("/v2/models/tiny/ready").0, 200);

    // KServe v1, all instances in one request.
    let (status, body) = server.post(
        "/v1/models/tiny:predict",
        &json!({"instances": prompts, "parameters": {"max_new_tokens": 12}}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["predictions"], json!(expected));

    // Open Inference Protocol.
    let (status, body) = server.post(
        "/v2/models/tiny/infer",
        &json!({"id": "r1", "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [3], "data": prompts}],
                "parameters": {"max_new_tokens": 12}}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "r1");
    assert_eq!(body["model_name"], "tiny");
    assert_eq!(body["outputs"][0]["name"], "text_output");
    assert_eq!(body["outputs"][0]["shape"], json!([3]));
    assert_eq!(body["outputs"][0]["data"], json!(expected));

    // OpenAI completions, whole and streamed.
    let request = json!({"model": "tiny", "prompt": prompts, "max_tokens": 12, "temperature": 0});
    let (status, body) = server.post("/v1/completions", &request);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    for (i, text) in expected.iter().enumerate() {
        assert_eq!(body["choices"][i]["index"], i);
        assert_eq!(&body["choices"][i]["text"], text);
        assert_eq!(body["choices"][i]["finish_reason"], "length");
    }
    assert_eq!(body["usage"]["completion_tokens"], 36);
    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    let (status, head, raw) = http(
        server.addr,
        "POST",
        "/v1/completions",
        streaming.to_string().as_bytes(),
    );
    assert_eq!(status, 200);
    assert!(head.contains("text/event-stream"), "{head}");
    let events = sse_data(&raw);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut streamed = vec![String::new(); 3];
    let mut finished = vec![None; 3];
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        let choice = &chunk["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        assert!(finished[i].is_none(), "nothing after a choice's finish");
        streamed[i].push_str(choice["text"].as_str().unwrap());
        if let Some(reason) = choice["finish_reason"].as_str() {
            finished[i] = Some(reason.to_string());
        }
    }
    assert_eq!(
        streamed, expected,
        "the streamed pieces add up to the answer"
    );
    assert!(finished.iter().all(|f| f.as_deref() == Some("length")));

    // A stop string cuts the streamed text exactly where it cuts the whole one.
    let stop: String = expected[0].chars().skip(3).take(2).collect();
    let cut = server.predict(&prompts[0], json!({"max_new_tokens": 12, "stop": stop}));
    assert_eq!(cut, expected[0][..expected[0].find(&stop).unwrap()]);
    let (_, _, raw) = http(
        server.addr,
        "POST",
        "/v1/completions",
        json!({"model": "tiny", "prompt": prompts[0], "max_tokens": 12, "temperature": 0, "stop": stop, "stream": true})
            .to_string()
            .as_bytes(),
    );
    let text: String = sse_data(&raw)
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(text, cut);

    // Sampling is seeded per request as `kiln generate` seeds it.
    let sampled = kiln_generate(
        dir.path(),
        &model,
        &prompts[..1],
        &[
            "--max-new-tokens",
            "12",
            "--do-sample",
            "--seed",
            "7",
            "--top-k",
            "50",
        ],
    );
    assert_eq!(
        server.predict(
            &prompts[0],
            json!({"max_new_tokens": 12, "do_sample": true, "seed": 7, "top_k": 50})
        ),
        sampled[0]
    );
    assert_ne!(sampled[0], expected[0]);
}

/// 16 clients at once get, each, exactly what the server answers one request at a time, and
/// they were decoded together.
#[test]
fn concurrent_clients_get_the_one_at_a_time_answers() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let server = Server::start(&model, &["--name", "tiny"]);
    let prompts = prompts();
    let budget = |i: usize| 4 + (i * 7) % 20;
    let sequential: Vec<String> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| server.predict(p, json!({"max_new_tokens": budget(i)})))
        .collect();
    let rows_before = server.metric("kiln_decode_batch_rows_sum");
    let steps_before = server.metric("kiln_decode_batch_rows_count");
    assert_eq!(rows_before, steps_before, "one at a time: one row a step");

    let concurrent: Vec<(usize, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|client| {
                let (server, prompts) = (&server, &prompts);
                scope.spawn(move || {
                    (client..prompts.len())
                        .step_by(16)
                        .chain(client..client + 1)
                        .map(|i| {
                            let i = i % prompts.len();
                            (
                                i,
                                server.predict(&prompts[i], json!({"max_new_tokens": budget(i)})),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("no client failed"))
            .collect()
    });
    assert_eq!(concurrent.len(), 24 + 16);
    for (i, text) in &concurrent {
        assert_eq!(
            text, &sequential[*i],
            "prompt {i} with other requests in the batch"
        );
    }
    let rows = server.metric("kiln_decode_batch_rows_sum") - rows_before;
    let steps = server.metric("kiln_decode_batch_rows_count") - steps_before;
    assert!(
        rows / steps > 2.0,
        "requests were decoded together: {rows} rows in {steps} steps"
    );
    assert_eq!(server.metric("kiln_batch_rows"), 0.0);
    assert_eq!(server.metric("kiln_queue_depth"), 0.0);
}

#[test]
fn classify_ranks_the_label_words_as_kiln_eval_does() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let pairs = [
        ("A man is playing a guitar.", "A person plays music."),
        ("The cat sleeps.", "A dog barks loudly at the mailman."),
    ];
    let loaded =
        kiln::model::load_model(&model, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    let tokenizer = kiln::tokenizer::TextTokenizer::from_dir(&model).unwrap();
    let prompts: Vec<Vec<u32>> = pairs
        .iter()
        .map(|(p, h)| tokenizer.encode(&kiln::eval::mnli::prompt(p, h)).unwrap())
        .collect();
    let candidates: Vec<Vec<u32>> = kiln::eval::mnli::LABELS
        .iter()
        .map(|l| tokenizer.encode(&format!(" {l}<|endoftext|>")).unwrap())
        .collect();
    let expected =
        kiln::eval::score::score_continuations(&loaded, &prompts, &candidates, 8).unwrap();
    let pipeline = kiln::eval::mnli::EntailmentPipeline {
        model: &loaded,
        tokenizer: &tokenizer,
        mode: kiln::recipe::EvalMode::Rank,
        batch_size: 8,
    };
    let labels = pipeline.predict(&pairs).unwrap();

    let server = Server::start(&model, &["--name", "tiny"]);
    let instances: Vec<Value> = pairs
        .iter()
        .map(|(p, h)| json!({"premise": p, "hypothesis": h}))
        .collect();
    let (status, body) = server.post("/v1/models/tiny:classify", &json!({"instances": instances}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["labels"],
        json!(["entailment", "neutral", "contradiction"])
    );
    for (i, prediction) in body["predictions"].as_array().unwrap().iter().enumerate() {
        assert_eq!(prediction["label"], labels[i].label_name());
        let total: f64 = kiln::eval::mnli::LABELS
            .iter()
            .map(|l| prediction["probabilities"][l].as_f64().unwrap())
            .sum();
        assert!((total - 1.0).abs() < 1e-9);
        for (j, label) in kiln::eval::mnli::LABELS.iter().enumerate() {
            let got = prediction["log_likelihoods"][label].as_f64().unwrap();
            assert!(
                (got - expected[i][j] as f64).abs() < 1e-4,
                "{got} vs {}",
                expected[i][j]
            );
        }
    }

    // Any template with its label words.
    let (status, body) = server.post(
        "/v1/models/tiny:classify",
        &json!({"instances": [{"review": "Great film."}, {"review": "Dull."}],
                "parameters": {"template": {"prompt": "Review: {review}\nSentiment:", "target": " {label}"},
                               "labels": ["negative", "positive"]}}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["predictions"].as_array().unwrap().len(), 2);
    assert!(["negative", "positive"].contains(&body["predictions"][0]["label"].as_str().unwrap()));
    let (status, body) = server.post(
        "/v1/models/tiny:classify",
        &json!({"instances": [{"review": "x"}], "parameters": {"template": {"prompt": "{review}", "target": " {label}"}}}),
    );
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("parameters.labels: a custom template needs its label words"),
        "{body}"
    );
    let (status, body) = server.post(
        "/v1/models/tiny:classify",
        &json!({"instances": [{"premise": "x"}]}),
    );
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("instances[0]: no string field \"hypothesis\""),
        "{body}"
    );
}

#[test]
fn bad_input_is_a_clear_error_and_never_a_stuck_slot() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let server = Server::start(&model, &["--name", "tiny", "--max-body-bytes", "4000"]);
    let error = |path: &str, body: &[u8]| -> (u16, String) {
        let (status, _, body) = http(server.addr, "POST", path, body);
        let body: Value = serde_json::from_slice(&body).unwrap();
        let message = match &body["error"] {
            Value::String(s) => s.clone(),
            other => other["message"].as_str().unwrap().to_string(),
        };
        (status, message)
    };
    let predict = "/v1/models/tiny:predict";
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (predict, b"{\"instances\": [".to_vec(), 400, "malformed JSON body"),
        (predict, br#"{"instances": "hi"}"#.to_vec(), 400, "instances: invalid type"),
        (predict, br#"{"instances": [3]}"#.to_vec(), 400, "instances[0]: expected a string"),
        (predict, br#"{"instances": []}"#.to_vec(), 400, "instances: empty"),
        (predict, br#"{"instance": ["x"]}"#.to_vec(), 400, "unknown field `instance`"),
        (
            predict,
            br#"{"instances": ["x"], "parameters": {"top_k": "a"}}"#.to_vec(),
            400,
            "parameters.top_k: invalid type",
        ),
        (
            predict,
            br#"{"instances": ["x"], "parameters": {"temperature": -1}}"#.to_vec(),
            400,
            "temperature must be >= 0",
        ),
        ("/v1/models/other:predict", br#"{"instances": ["x"]}"#.to_vec(), 404, "model \"other\" is not served here"),
        ("/v1/models/tiny:explain", br#"{"instances": ["x"]}"#.to_vec(), 404, "unknown verb :explain"),
        ("/v2/models/tiny/infer", br#"{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}"#.to_vec(), 400, "inputs[0].name: expected \"text_input\""),
        ("/v2/models/tiny/infer", br#"{"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [2], "data": ["x"]}]}"#.to_vec(), 400, "inputs[0].shape: [2] does not hold the 1 elements of data"),
        ("/v1/completions", br#"{"model": "tiny", "prompt": "x", "n": 2}"#.to_vec(), 400, "n: not supported"),
        ("/v1/completions", br#"{"model": "tiny", "prompt": "x", "max_tokens": "many"}"#.to_vec(), 400, "max_tokens: invalid type"),
        ("/v1/completions", br#"{"model": "gpt-4", "prompt": "x"}"#.to_vec(), 404, "model \"gpt-4\" is not served here"),
        ("/nowhere", b"{}".to_vec(), 404, "no route POST /nowhere"),
        (predict, format!("{{\"instances\": [\"{}\"]}}", "x".repeat(5000)).into_bytes(), 413, "the request body is over the server's limit (--max-body-bytes)"),
    ];
    for (path, body, status, message) in cases {
        let (got_status, got) = error(path, &body);
        assert_eq!(got_status, status, "{path}: {got}");
        assert!(
            got.contains(message),
            "{path}: {got:?} should say {message:?}"
        );
    }
    // OpenAI errors keep OpenAI's shape.
    let (_, body) = server.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "x", "n": 2}),
    );
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(
        body["error"]["message"],
        "n: not supported by kiln serve (leave it out or at its default)"
    );

    // No room for a new token is an empty answer, not an error.
    let (status, body) = server.post(
        predict,
        &json!({"instances": ["x"], "parameters": {"max_new_tokens": 2, "max_length": 1}}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["predictions"][0], "", "no room: nothing generated");

    // After all that, the server still answers, with nothing left in its batch or queue.
    server.predict("Hello", json!({"max_new_tokens": 3}));
    assert_eq!(server.metric("kiln_batch_rows"), 0.0);
    let (_, metrics) = server.get("/metrics");
    assert!(metrics.contains("kiln_requests_total{endpoint=\"v1_predict\",status=\"400\"}"));
    assert!(
        metrics.contains("kiln_requests_total{endpoint=\"v1_predict\",status=\"413\"}"),
        "{metrics}"
    );
}

#[test]
fn prompts_longer_than_the_context_are_refused_or_truncated_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    // A context of 64 positions.
    let config_path = model.join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["n_positions"] = json!(64);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let server = Server::start(&model, &["--name", "tiny"]);
    let long = "one two three ".repeat(30);
    let (status, body) = server.post(
        "/v1/models/tiny:predict",
        &json!({"instances": ["short", long], "parameters": {"max_new_tokens": 4}}),
    );
    assert_eq!(status, 400);
    let message = body["error"].as_str().unwrap();
    assert!(
        message.starts_with("instances[1]: prompt 1 has ")
            && message.contains("more than the model's context (n_positions 64)")
            && message.contains("truncate_left: true"),
        "{message}"
    );
    let truncated = server.predict(&long, json!({"max_new_tokens": 4, "truncate_left": true}));
    let expected = kiln_generate(
        dir.path(),
        &model,
        &[long],
        &["--max-new-tokens", "4", "--truncate-left"],
    );
    assert_eq!(truncated, expected[0]);
}

#[test]
fn a_full_queue_is_429_with_retry_after_and_a_late_request_is_504() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let server = Server::start(
        &model,
        &["--name", "tiny", "--max-batch", "1", "--max-queue", "1"],
    );
    let body = json!({"instances": ["Once upon a time"], "parameters": {"max_new_tokens": 400}})
        .to_string();
    let answers: Vec<(u16, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    let (status, head, _) = http(
                        server.addr,
                        "POST",
                        "/v1/models/tiny:predict",
                        body.as_bytes(),
                    );
                    (status, head)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let busy: Vec<&(u16, String)> = answers.iter().filter(|(s, _)| *s == 429).collect();
    let served = answers.iter().filter(|(s, _)| *s == 200).count();
    assert!(!busy.is_empty() && served >= 1, "{answers:?}");
    assert_eq!(busy.len() + served, 8, "{answers:?}");
    assert!(busy
        .iter()
        .all(|(_, head)| head.to_ascii_lowercase().contains("retry-after: 1")));
    drop(server);

    // The deadline cuts the work short: counted in tokens, not seconds, so that a loaded machine
    // (which makes every token slower) cannot fail it.
    let server = Server::start(&model, &["--name", "tiny", "--timeout", "0.2"]);
    let (status, body) = server.post(
        "/v1/models/tiny:predict",
        &json!({"instances": ["Once upon a time"], "parameters": {"max_new_tokens": 2000}}),
    );
    assert_eq!(status, 504, "{body}");
    assert_eq!(
        body["error"].as_str().unwrap(),
        "the request did not finish within the server's timeout of 200ms (--timeout)",
        "{body}"
    );
    let generated = server.metric("kiln_generated_tokens_total");
    assert!(
        generated < 1990.0,
        "stopped at the deadline, not after its 2000 tokens: {generated}"
    );
    assert_eq!(server.metric("kiln_timed_out_requests_total"), 1.0);
    server.predict("Hi", json!({"max_new_tokens": 2}));
    assert_eq!(server.metric("kiln_batch_rows"), 0.0);
    drop(server);

    // Room for one row's prompt and budget only: concurrent requests take turns.
    let server = Server::start(&model, &["--name", "tiny", "--max-batch-tokens", "40"]);
    std::thread::scope(|scope| {
        for i in 0..4 {
            let server = &server;
            scope.spawn(move || {
                server.predict(&format!("Hello {i}"), json!({"max_new_tokens": 30}))
            });
        }
    });
    assert_eq!(
        server.metric("kiln_decode_batch_rows_sum"),
        server.metric("kiln_decode_batch_rows_count"),
        "never two rows in a step"
    );
}

/// A client that goes away mid-stream frees its row at the next token boundary.
#[test]
fn a_client_that_disconnects_frees_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let server = Server::start(&model, &["--name", "tiny", "--max-batch", "1"]);
    for stream in [true, false] {
        let before = server.metric("kiln_cancelled_requests_total");
        let tokens_before = server.metric("kiln_generated_tokens_total");
        let mut connection = TcpStream::connect(server.addr).unwrap();
        let body = json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 2000,
                          "temperature": 0, "stream": stream})
        .to_string();
        write!(
            connection,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        // Wait until it is decoding, then hang up.
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.metric("kiln_batch_rows") < 1.0 {
            assert!(Instant::now() < deadline, "the request never started");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(connection);
        // With one slot, this can only run once the other has left: counted in tokens, the
        // abandoned request stopped short of its 2000 (seconds would depend on the load).
        server.predict("Hi", json!({"max_new_tokens": 2}));
        let abandoned = server.metric("kiln_generated_tokens_total") - tokens_before - 2.0;
        assert!(
            abandoned < 1990.0,
            "stream={stream}: {abandoned} more tokens for a client that had gone"
        );
        assert_eq!(
            server.metric("kiln_cancelled_requests_total"),
            before + 1.0,
            "stream={stream}"
        );
    }
}

/// SIGTERM: no new connections, the request in flight finishes, exit 0. Request logs are one
/// JSON object a line with `--log-format json`.
#[test]
fn sigterm_finishes_the_requests_in_flight_then_exits() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let mut server = Server::start(&model, &["--name", "tiny", "--log-format", "json"]);
    let addr = server.addr;
    let in_flight = std::thread::spawn(move || {
        http(
            addr,
            "POST",
            "/v1/completions",
            json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 600, "temperature": 0, "stream": true})
                .to_string()
                .as_bytes(),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.metric("kiln_batch_rows") < 1.0 {
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let (status, _, body) = in_flight.join().unwrap();
    assert_eq!(status, 200);
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(
        last["choices"][0]["finish_reason"], "length",
        "it ran to the end"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(TcpStream::connect(addr).is_err(), "no longer listening");
    let mut logs = String::new();
    server
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    let requests: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "request")
        .collect();
    assert!(!requests.is_empty(), "{logs}");
    let completion = requests
        .iter()
        .find(|r| r["path"] == "/v1/completions")
        .unwrap_or_else(|| panic!("{logs}"));
    assert_eq!(completion["status"], 200);
    assert_eq!(completion["method"], "POST");
    assert_eq!(completion["streamed"], true);
    assert!(completion["duration_ms"].is_u64());
}

#[test]
fn startup_fails_clearly_on_a_taken_port_or_a_bad_model() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (ok, _, stderr) = kiln(&["serve", "--model", model.to_str().unwrap(), "--port", &port]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")) && stderr.contains("--port"),
        "{stderr}"
    );
    let missing = dir.path().join("nothing-here");
    let (ok, _, stderr) = kiln(&["serve", "--model", missing.to_str().unwrap(), "--port", "0"]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "{}: model directory does not exist",
            missing.display()
        )),
        "{stderr}"
    );
    for file in ["tokenizer.json", "vocab.json", "merges.txt"] {
        let _ = std::fs::remove_file(model.join(file));
    }
    let (ok, _, stderr) = kiln(&["serve", "--model", model.to_str().unwrap(), "--port", "0"]);
    assert!(!ok);
    assert!(
        stderr.contains("serving text needs a tokenizer"),
        "{stderr}"
    );
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib * 1024
}

/// A streamed greedy completion's whole text and its finish reason.
fn streamed_completion(addr: SocketAddr, prompt: &str, max_tokens: usize) -> (String, String) {
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                      "temperature": 0, "stream": true});
    let (status, _, raw) = http(addr, "POST", "/v1/completions", body.to_string().as_bytes());
    assert_eq!(status, 200);
    let mut text = String::new();
    let mut finish = String::new();
    for data in sse_data(&raw) {
        if data == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap();
        assert!(chunk.get("error").is_none(), "the stream failed: {chunk}");
        text.push_str(chunk["choices"][0]["text"].as_str().unwrap());
        if let Some(reason) = chunk["choices"][0]["finish_reason"].as_str() {
            finish = reason.to_string();
        }
    }
    (text, finish)
}

/// The bad-input suite: while a long greedy stream runs, every hostile request the review found
/// (and the ones handled before) is sent; each gets its status, the stream's answer is its
/// answer alone, the server stays ready and within its memory bound, and `/metrics` counted
/// every failure. A one-prompt request is answered while a 4,000-prompt request runs.
#[test]
fn hostile_requests_never_hurt_a_running_stream_or_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let server = Server::start(&model, &["--name", "tiny"]);
    let addr = server.addr;
    let story = "Once upon a time, in a land far away,";
    let (alone, reason) = streamed_completion(addr, story, 1500);
    assert_eq!(reason, "length");

    let labels: Vec<String> = (0..3000).map(|i| format!("label{i}")).collect();
    let instances: Vec<Value> = (0..64)
        .map(|i| json!({"premise": format!("p{i}"), "hypothesis": "h"}))
        .collect();
    let many_prompts: Vec<String> = (0..5000).map(|i| format!("prompt {i}")).collect();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let mut non_utf8 = br#"{"instances": [""#.to_vec();
    non_utf8.extend_from_slice(&[0xff, 0xfe, 0xfd]);
    non_utf8.extend_from_slice(br#""]}"#);
    let completions = "/v1/completions";
    let predict = "/v1/models/tiny:predict";
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "sampling at temperature 1e-40",
            completions,
            json!({"model": "tiny", "prompt": "Hello", "temperature": 1e-40, "max_tokens": 8})
                .to_string()
                .into_bytes(),
            200,
            "",
        ),
        (
            "repetition_penalty 1e-300 with sampling",
            predict,
            json!({"instances": ["Hello"], "parameters": {"do_sample": true, "repetition_penalty": 1e-300}})
                .to_string()
                .into_bytes(),
            400,
            "repetition_penalty must be in [1e-6, 1e6]",
        ),
        (
            "repetition_penalty 1e-300 (OpenAI)",
            completions,
            json!({"model": "tiny", "prompt": "Hello", "repetition_penalty": 1e-300})
                .to_string()
                .into_bytes(),
            400,
            "repetition_penalty must be in [1e-6, 1e6] (1 is no penalty), got 1e-300",
        ),
        (
            "classify 64 instances x 3,000 labels",
            "/v1/models/tiny:classify",
            json!({"instances": instances, "parameters": {"labels": labels}})
                .to_string()
                .into_bytes(),
            413,
            "64 × 3000 is over the server's limit of 16384",
        ),
        (
            "v2 shape whose product overflows",
            "/v2/models/tiny/infer",
            json!({"inputs": [{"name": "text_input", "datatype": "BYTES",
                   "shape": [3, 6148914691236517206_i64], "data": ["a", "b"]}]})
            .to_string()
            .into_bytes(),
            400,
            "inputs[0].shape: [3, 6148914691236517206] does not hold the 2 elements of data",
        ),
        (
            "5,000 prompts",
            predict,
            json!({"instances": many_prompts}).to_string().into_bytes(),
            413,
            "5000 prompts is over the server's limit of 4096",
        ),
        ("malformed JSON", predict, b"{\"instances\": [".to_vec(), 400, "malformed JSON body: EOF while parsing a list"),
        ("non-UTF-8 bytes", predict, non_utf8, 400, "malformed JSON body: invalid unicode code point"),
        ("100,000-deep nesting", predict, deep.into_bytes(), 400, "malformed JSON body: recursion limit exceeded"),
        (
            "a number past f64",
            predict,
            br#"{"instances": ["x"], "parameters": {"max_new_tokens": 1e400}}"#.to_vec(),
            400,
            "malformed JSON body: number out of range",
        ),
        (
            "a negative seed",
            predict,
            br#"{"instances": ["x"], "parameters": {"seed": -1}}"#.to_vec(),
            400,
            "parameters.seed: invalid value: integer `-1`, expected u64",
        ),
        (
            "a 5 MiB body",
            predict,
            vec![b' '; 5 << 20],
            413,
            "over the server's limit (--max-body-bytes)",
        ),
    ];

    let streaming = std::thread::spawn(move || {
        let answer = streamed_completion(addr, story, 1500);
        (answer, Instant::now())
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.metric("kiln_batch_rows") < 1.0 {
        assert!(Instant::now() < deadline, "the stream never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    for (what, path, body, status, message) in &cases {
        let (got_status, _, got) = http(addr, "POST", path, body);
        let got = String::from_utf8_lossy(&got);
        eprintln!("{what}: {got_status} {got}");
        assert_eq!(got_status, *status, "{what}: {got}");
        assert!(
            got.contains(message),
            "{what}: {got} should say {message:?}"
        );
    }
    // A near-zero temperature decodes greedily.
    let (_, cold) = server.post(
        completions,
        &json!({"model": "tiny", "prompt": "Hello", "temperature": 1e-40, "max_tokens": 8}),
    );
    let (_, greedy) = server.post(
        completions,
        &json!({"model": "tiny", "prompt": "Hello", "temperature": 0, "max_tokens": 8}),
    );
    assert_eq!(cold["choices"][0]["text"], greedy["choices"][0]["text"]);

    // Clients that hang up: mid-body, and mid-stream.
    let mut half = TcpStream::connect(addr).unwrap();
    write!(
        half,
        "POST {predict} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{\"instances\""
    )
    .unwrap();
    drop(half);
    let mut hang_up = TcpStream::connect(addr).unwrap();
    let body = json!({"model": "tiny", "prompt": "Bye", "max_tokens": 500, "temperature": 0,
                      "stream": true})
    .to_string();
    write!(
        hang_up,
        "POST {completions} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    hang_up.read_exact(&mut first).unwrap();
    drop(hang_up);

    // Head-of-line: a one-prompt request while 4,000 prompts are being answered.
    let big: Vec<String> = (0..4000).map(|i| format!("prompt number {i}")).collect();
    let big_request = json!({"instances": big, "parameters": {"max_new_tokens": 4}}).to_string();
    let big_started = Instant::now();
    let big_thread = std::thread::spawn(move || {
        let (status, _, body) = http(addr, "POST", predict, big_request.as_bytes());
        (status, body, Instant::now())
    });
    while server.metric("kiln_batch_rows") < 2.0 {
        assert!(big_started.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(5));
    }
    let small_started = Instant::now();
    let small = server.predict("Hello", json!({"max_new_tokens": 4}));
    let small_done = Instant::now();
    let (big_status, big_body, big_done) = big_thread.join().unwrap();
    assert_eq!(big_status, 200, "{}", String::from_utf8_lossy(&big_body));
    let big_body: Value = serde_json::from_slice(&big_body).unwrap();
    assert_eq!(big_body["predictions"].as_array().unwrap().len(), 4000);
    eprintln!(
        "1-prompt request: {:?} while the 4,000-prompt one took {:?}",
        small_done - small_started,
        big_done - big_started
    );
    assert!(
        small_done < big_done,
        "the small request waited for the big one"
    );
    assert_eq!(small, server.predict("Hello", json!({"max_new_tokens": 4})));

    let ((text, reason), stream_done) = streaming.join().unwrap();
    assert_eq!(reason, "length");
    assert_eq!(text, alone, "the stream beside the hostile requests");
    assert!(
        stream_done > small_started,
        "the hostile requests ran while the stream did"
    );
    let (status, _) = server.get("/v2/health/ready");
    assert_eq!(status, 200);
    let peak = peak_rss(server.child.id());
    eprintln!("server peak RSS: {} MiB", peak >> 20);
    assert!(peak < 1 << 30, "peak RSS {} MiB", peak >> 20);
    let (_, metrics) = server.get("/metrics");
    for (endpoint, status) in [
        ("v1_completions", 400),
        ("v1_predict", 400),
        ("v1_predict", 413),
        ("v1_classify", 413),
        ("v2_infer", 400),
    ] {
        let line = format!("kiln_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}}");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    assert!(server.metric("kiln_cancelled_requests_total") >= 1.0);
    assert_eq!(server.metric("kiln_batch_rows"), 0.0);
}

/// The largest classification the limits allow is scored chunk by chunk within its memory
/// budget, gives what one-pass scoring gives, and does not hold generation up.
#[test]
fn the_largest_classification_stays_in_its_memory_budget_and_lets_generation_through() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let server = Server::start(
        &model,
        &[
            "--name",
            "tiny",
            "--max-classify-pairs",
            "4096",
            "--score-memory-mib",
            "64",
        ],
    );
    let addr = server.addr;
    server.predict("warm up", json!({"max_new_tokens": 2}));
    let before = peak_rss(server.child.id());
    let labels: Vec<String> = (0..512).map(|i| format!("word{i}")).collect();
    let instances: Vec<Value> = (0..8)
        .map(
            |i| json!({"premise": format!("A premise number {i}."), "hypothesis": "A hypothesis."}),
        )
        .collect();
    let request = json!({"instances": instances, "parameters": {"labels": labels}}).to_string();
    let classify = std::thread::spawn(move || {
        let (status, _, body) = http(addr, "POST", "/v1/models/tiny:classify", request.as_bytes());
        (status, body, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(300));
    let answer = server.predict("Hello", json!({"max_new_tokens": 4}));
    let generated = Instant::now();
    let (status, body, classified) = classify.join().unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(
        generated < classified,
        "generation waited for the classification"
    );
    assert_eq!(
        answer,
        server.predict("Hello", json!({"max_new_tokens": 4}))
    );
    let grown = peak_rss(server.child.id()).saturating_sub(before);
    eprintln!(
        "peak RSS grew by {} MiB for 8 x 512 label scores",
        grown >> 20
    );
    // Twice the budget: the chunk's temporaries plus what the allocator keeps between chunks.
    assert!(grown < 128 << 20, "grew by {} MiB", grown >> 20);

    // The same log-likelihoods as scoring in one process without the server's chunking.
    let body: Value = serde_json::from_slice(&body).unwrap();
    let loaded =
        kiln::model::load_model(&model, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    let tokenizer = kiln::tokenizer::TextTokenizer::from_dir(&model).unwrap();
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|i| {
            let prompt =
                kiln::eval::mnli::prompt(&format!("A premise number {i}."), "A hypothesis.");
            tokenizer.encode(&prompt).unwrap()
        })
        .collect();
    let candidates: Vec<Vec<u32>> = (0..512)
        .map(|i| tokenizer.encode(&format!(" word{i}<|endoftext|>")).unwrap())
        .collect();
    let expected =
        kiln::eval::score::score_continuations(&loaded, &prompts, &candidates, 8).unwrap();
    for (i, prediction) in body["predictions"].as_array().unwrap().iter().enumerate() {
        for (c, score) in expected[i].iter().enumerate() {
            let got = prediction["log_likelihoods"][format!("word{c}")]
                .as_f64()
                .unwrap();
            assert!(
                (got - *score as f64).abs() < 1e-3,
                "{i}/{c}: {got} vs {score}"
            );
        }
    }
}

/// A scheduler thread that dies (made to, with `KILN_TEST_SCHEDULER_PANIC`: no input is known to
/// kill it) makes the server unready and answers 503 at once instead of hanging, then `kiln
/// serve` exits non-zero, so that its orchestrator restarts it.
#[test]
fn a_dead_scheduler_is_unready_answers_503_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--port",
            "0",
            "--name",
            "tiny",
        ])
        .env(kiln::serve::scheduler::PANIC_FOR_TESTS, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line
        .trim()
        .rsplit("http://")
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(http(addr, "GET", "/v2/health/ready", b"").0, 200);
    let request = br#"{"instances": ["Hello"], "parameters": {"max_new_tokens": 3}}"#;
    let (status, _, body) = http(addr, "POST", "/v1/models/tiny:predict", request);
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("scheduler thread died"), "{body}");
    for path in [
        "/v2/health/ready",
        "/v2/health/live",
        "/v2/models/tiny/ready",
        "/v1/models/tiny",
    ] {
        let (status, _, body) = http(addr, "GET", path, b"");
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 503, "{path}: {body}");
        assert!(
            body.contains("\"ready\": false")
                || body.contains("\"ready\":false")
                || body.contains("\"live\":false"),
            "{path}: {body}"
        );
    }
    // A contract with a wide margin: refused at once, not after the 300 s request timeout.
    let started = Instant::now();
    let (status, _, _) = http(addr, "POST", "/v1/models/tiny:predict", request);
    assert_eq!(status, 503);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "answered at once, not at the request deadline ({:?})",
        started.elapsed()
    );
    let exit = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!exit.success(), "{exit:?}");
    assert!(stderr.contains("scheduler thread died"), "{stderr}");
}

/// `kiln serve` against HF transformers' greedy `generate` (`tests/fixtures/generate`, written by
/// `scripts/make_fixtures.py`), token for token: every case alone, then 16 requests at once, so
/// that ragged prompts are decoded in one batch. The fixture has token ids, not text: a word-level
/// tokenizer (`t0` … `t99`, and `<|endoftext|>` as id 100) makes each id one word.
#[test]
fn completions_match_transformers_greedy_alone_and_sixteen_at_once() {
    let fixture = fixtures().join("generate");
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("generate.json")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("rot8");
    std::fs::create_dir(&model).unwrap();
    for file in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(file), model.join(file)).unwrap();
    }
    let eos = doc["eos_token_id"].as_u64().unwrap() as u32;
    let mut vocab: serde_json::Map<String, Value> =
        (0..eos).map(|id| (format!("t{id}"), json!(id))).collect();
    vocab.insert("<|endoftext|>".into(), json!(eos));
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": eos, "content": "<|endoftext|>", "single_word": false,
                          "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<|endoftext|>"}
    });
    std::fs::write(model.join("tokenizer.json"), tokenizer.to_string()).unwrap();

    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let cases: Vec<(Vec<u32>, Vec<u32>, f64)> = doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                ids(&c["prompt_ids"]),
                ids(&c["output_ids"]),
                c["repetition_penalty"].as_f64().unwrap_or(1.0),
            )
        })
        .collect();
    assert!(
        cases.iter().any(|(_, out, _)| out.last() == Some(&eos)),
        "a case that stops at eos"
    );
    let max_tokens = doc["max_new_tokens"].as_u64().unwrap();

    let server = Server::start(&model, &["--name", "rot8"]);
    // The new tokens of one completion, eos included when it stopped there (as in the fixture).
    let complete = |(prompt, _, penalty): &(Vec<u32>, Vec<u32>, f64)| -> Vec<u32> {
        let words: Vec<String> = prompt.iter().map(|id| format!("t{id}")).collect();
        let (status, body) = server.post(
            "/v1/completions",
            &json!({"model": "rot8", "prompt": words.join(" "), "max_tokens": max_tokens,
                    "temperature": 0, "repetition_penalty": penalty}),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["prompt_tokens"], prompt.len(), "{body}");
        let choice = &body["choices"][0];
        let mut new: Vec<u32> = choice["text"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .map(|word| {
                word.strip_prefix('t')
                    .and_then(|id| id.parse().ok())
                    .unwrap_or_else(|| panic!("not a token of the vocabulary: {word:?}"))
            })
            .collect();
        match choice["finish_reason"].as_str() {
            Some("stop") => new.push(eos),
            Some("length") => assert_eq!(new.len() as u64, max_tokens, "{body}"),
            other => panic!("finish_reason {other:?}: {body}"),
        }
        assert_eq!(body["usage"]["completion_tokens"], new.len(), "{body}");
        new
    };
    for case in &cases {
        assert_eq!(complete(case), case.1, "alone: prompt {:?}", case.0);
    }

    let (rows_before, steps_before) = (
        server.metric("kiln_decode_batch_rows_sum"),
        server.metric("kiln_decode_batch_rows_count"),
    );
    let answers: Vec<Vec<u32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let case = &cases[i % cases.len()];
                let complete = &complete;
                scope.spawn(move || complete(case))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, answer) in answers.iter().enumerate() {
        let case = &cases[i % cases.len()];
        assert_eq!(answer, &case.1, "request {i} of 16: prompt {:?}", case.0);
    }
    let rows = server.metric("kiln_decode_batch_rows_sum") - rows_before;
    let steps = server.metric("kiln_decode_batch_rows_count") - steps_before;
    assert!(
        rows > steps,
        "the 16 requests were decoded together: {rows} rows in {steps} steps"
    );
}
