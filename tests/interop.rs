//! Kiln in the tools users already run: `/v1/completions` log-likelihoods (`echo`, `logprobs`,
//! token-id prompts) equal to `kiln score`'s, EleutherAI's lm-evaluation-harness through
//! `kiln serve` scoring what it scores through transformers, the official `openai` client, HF
//! Trainer's fields in checkpoints, and Hub ids for every verb that names a model.

mod common;
mod hub_server;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::server::Server;
use common::*;
use serde_json::{json, Value};

/// Trains the quickstart recipe's tiny GPT-J for 150 steps into `out` (about 95% on the bundled
/// NLI split, so the harness's numbers mean something) and returns its checkpoint.
fn trained_tiny(out: &Path) -> PathBuf {
    let recipe = repo_root().join("recipes/quickstart.yaml");
    let sets = [
        "name=interop".to_string(),
        "steps=150".to_string(),
        "eval.every=0".to_string(),
        format!("checkpoint.dir={}", out.join("checkpoints").display()),
        format!("tracking.log_dir={}", out.join("runs").display()),
    ];
    let mut args = vec!["train", recipe.to_str().unwrap(), "--quiet"];
    for set in &sets {
        args.extend(["--set", set]);
    }
    let (ok, stdout, stderr) = kiln(&args);
    assert!(ok, "{stdout}\n{stderr}");
    out.join("checkpoints/interop/step-150")
}

/// `kiln score` on token-id rows: each row's per-token log-probabilities.
fn kiln_score(dir: &Path, model: &Path, rows: &[Vec<u32>]) -> Vec<Vec<Option<f64>>> {
    let (input, output) = (dir.join("score-in.jsonl"), dir.join("score-out.jsonl"));
    let lines: Vec<String> = rows
        .iter()
        .map(|ids| json!({"ids": ids}).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let (ok, _, stderr) = kiln(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|line| {
            let row: Value = serde_json::from_str(line).unwrap();
            row["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(Value::as_f64)
                .collect()
        })
        .collect()
}

fn floats(values: &Value) -> Vec<Option<f64>> {
    values
        .as_array()
        .unwrap()
        .iter()
        .map(Value::as_f64)
        .collect()
}

/// `echo` with `max_tokens: 0` scores the prompt; `logprobs: N` lists the N most likely tokens
/// at each position (and the token itself); without `echo` only the completion's tokens are
/// listed, at their offsets after the prompt. Every number is `kiln score`'s, to float rounding.
#[test]
fn completion_logprobs_are_what_kiln_score_computes() {
    let dir = tempfile::tempdir().unwrap();
    let model = trained_tiny(dir.path());
    let server = Server::start(&model, &["--name", "tiny"]);
    let rows: Vec<Vec<u32>> = vec![
        (5..17).collect(),
        vec![300, 7, 99, 4],
        (40..70).rev().collect(),
    ];
    let (status, body) = server.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": rows, "max_tokens": 0, "echo": true, "logprobs": 3,
                "temperature": 0}),
    );
    assert_eq!(status, 200, "{body}");
    let scored = kiln_score(dir.path(), &model, &rows);
    for (i, row) in rows.iter().enumerate() {
        let choice = &body["choices"][i];
        let logprobs = &choice["logprobs"];
        assert_eq!(choice["finish_reason"], "length");
        let served = floats(&logprobs["token_logprobs"]);
        assert_eq!(served.len(), row.len());
        assert_eq!(served[0], None, "the first token has no context");
        for (at, (a, b)) in served.iter().zip(&scored[i]).enumerate() {
            match (a, b) {
                (Some(a), Some(b)) => {
                    assert!((a - b).abs() <= 1e-5, "row {i}, token {at}: {a} vs {b}")
                }
                (None, None) => {}
                other => panic!("row {i}, token {at}: {other:?}"),
            }
        }
        let tokens: Vec<&str> = logprobs["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(choice["text"].as_str().unwrap(), tokens.concat(), "echo");
        let offsets: Vec<u64> = logprobs["text_offset"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_u64().unwrap())
            .collect();
        let mut expected_offset = 0;
        for (token, offset) in tokens.iter().zip(&offsets) {
            assert_eq!(*offset, expected_offset);
            expected_offset += token.chars().count() as u64;
        }
        let top = logprobs["top_logprobs"].as_array().unwrap();
        assert_eq!(top[0], Value::Null);
        for (at, listed) in top.iter().enumerate().skip(1) {
            let listed = listed.as_object().unwrap();
            assert!((3..=4).contains(&listed.len()), "{listed:?}");
            let own = served[at].unwrap();
            assert_eq!(
                listed[tokens[at]].as_f64(),
                Some(own),
                "the token is listed"
            );
            let best = listed
                .values()
                .map(|v| v.as_f64().unwrap())
                .fold(f64::MIN, f64::max);
            assert!(best >= own, "position {at}: {listed:?}");
        }
    }
    assert_eq!(body["usage"]["prompt_tokens"], 12 + 4 + 30);
    assert_eq!(body["usage"]["completion_tokens"], 0);

    // lm-evaluation-harness's request: the prompt echoed, one token generated, both scored.
    let (status, body) = server.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": [rows[1]], "max_tokens": 1, "echo": true,
                "logprobs": 1, "temperature": 0, "seed": 1234}),
    );
    assert_eq!(status, 200, "{body}");
    let logprobs = &body["choices"][0]["logprobs"];
    assert_eq!(
        logprobs["tokens"].as_array().unwrap().len(),
        rows[1].len() + 1
    );
    assert_eq!(body["usage"]["completion_tokens"], 1);

    // Without echo: the completion's tokens only, after the prompt text.
    let prompt =
        "mnli hypothesis: The bakery opens early. premise: The bakery opens at six. target:";
    let (status, body) = server.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": prompt, "max_tokens": 3, "logprobs": 2,
                "temperature": 0}),
    );
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    let logprobs = &choice["logprobs"];
    let generated = body["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert!(generated >= 1);
    assert_eq!(logprobs["tokens"].as_array().unwrap().len(), generated);
    assert_eq!(
        logprobs["text_offset"][0].as_u64().unwrap() as usize,
        prompt.chars().count()
    );
    let prompt_tokens = body["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let (status, echoed) = server.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": prompt, "max_tokens": 3, "logprobs": 2,
                "temperature": 0, "echo": true}),
    );
    assert_eq!(status, 200, "{echoed}");
    assert_eq!(
        echoed["choices"][0]["text"].as_str().unwrap(),
        format!("{prompt}{}", choice["text"].as_str().unwrap())
    );
    let whole = floats(&echoed["choices"][0]["logprobs"]["token_logprobs"]);
    assert_eq!(whole.len(), prompt_tokens + generated);
    for (a, b) in floats(&logprobs["token_logprobs"])
        .iter()
        .zip(&whole[prompt_tokens..])
    {
        assert!((a.unwrap() - b.unwrap()).abs() <= 1e-5, "{a:?} vs {b:?}");
    }

    for (request, message) in [
        (
            json!({"model": "tiny", "prompt": "x", "logprobs": 21}),
            "logprobs: expected an integer from 0 to 20 (or null), got 21",
        ),
        (
            json!({"model": "tiny", "prompt": [1, "a"]}),
            "prompt: expected token ids (integers from 0), as prompt[0] is",
        ),
        (
            json!({"model": "tiny", "prompt": [[1, 2], "a"]}),
            "prompt[1]: expected a list of token ids (integers from 0)",
        ),
        (
            json!({"model": "tiny", "prompt": {"text": "x"}}),
            "prompt: expected a string, a list of strings, a list of token ids or a list of lists \
             of token ids",
        ),
        (
            json!({"model": "tiny", "prompt": "x", "logprobs": 1, "stream": true}),
            "echo and logprobs: not supported with stream: true (ask without streaming)",
        ),
        (
            json!({"model": "tiny", "prompt": [[1, 99999]], "max_tokens": 0, "echo": true,
                   "logprobs": 0}),
            "prompt 0: token id 99999 is outside the vocabulary (1024)",
        ),
    ] {
        let (status, body) = server.post("/v1/completions", &request);
        assert_eq!(status, 400, "{request}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(message),
            "{request}: {body}"
        );
    }
}

/// The per-request results of one harness run: `task -> doc_id -> resps`.
type Samples = std::collections::BTreeMap<String, std::collections::BTreeMap<u64, Value>>;

/// `python -m lm_eval` with `model_args` on the committed tasks (tests/harness), offline; the
/// metrics of each task and every request's response.
fn lm_eval(
    python: &str,
    model: &str,
    model_args: &str,
    extra: &[&str],
    out: &Path,
) -> (Value, Samples) {
    let started = Instant::now();
    let output = Command::new(python)
        .current_dir(repo_root())
        .args([
            "-m",
            "lm_eval",
            "--model",
            model,
            "--model_args",
            model_args,
        ])
        .args(["--include_path", "tests/harness"])
        .args(["--tasks", "kiln_nli_mc,kiln_nli_gen", "--limit", "60"])
        .args(["--output_path", out.to_str().unwrap(), "--log_samples"])
        .args(extra)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_DATASETS_CACHE", out.with_extension("datasets-cache"))
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "lm_eval --model {model}: {stderr}");
    eprintln!(
        "lm_eval --model {model}: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut results = Value::Null;
    let mut samples = Samples::new();
    let mut files = Vec::new();
    for dir in std::fs::read_dir(out).unwrap() {
        let dir = dir.unwrap().path();
        if dir.is_dir() {
            let entries = std::fs::read_dir(&dir).unwrap().map(|f| f.unwrap().path());
            files.extend(entries.filter(|f| f.is_file()));
        }
    }
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&file).unwrap();
        if name.starts_with("results_") {
            results = serde_json::from_str::<Value>(&text).unwrap()["results"].clone();
        } else if let Some(task) = ["kiln_nli_mc", "kiln_nli_gen"]
            .into_iter()
            .find(|task| name.starts_with(&format!("samples_{task}_")))
        {
            for line in text.lines() {
                let sample: Value = serde_json::from_str(line).unwrap();
                samples
                    .entry(task.to_string())
                    .or_default()
                    .insert(sample["doc_id"].as_u64().unwrap(), sample["resps"].clone());
            }
        }
    }
    assert!(results.is_object(), "no results in {}", out.display());
    (results, samples)
}

/// `lm_eval --model local-completions` against `kiln serve` gives the accuracy `lm_eval --model
/// hf` gives on the same checkpoint (transformers loading Kiln's directory): a multiple-choice
/// task scored by log-likelihood and a generation task, each request's log-likelihood within
/// 1e-4 and each generation the same text. The tasks are committed YAML over the bundled data;
/// the harness needs no network.
#[test]
fn lm_eval_through_kiln_serve_scores_what_it_scores_through_transformers() {
    let Some(python) = python_with("lm_eval, tenacity, aiohttp, transformers, torch") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = trained_tiny(dir.path());
    let server = Server::start_draining(&model, &["--name", "kiln-tiny"]);
    let served_args = format!(
        "model=kiln-tiny,base_url=http://{}/v1/completions,tokenizer_backend=huggingface,\
         tokenizer={},max_length=64,num_concurrent=1,max_retries=1",
        server.addr,
        model.display()
    );
    let (served, served_samples) = lm_eval(
        &python,
        "local-completions",
        &served_args,
        &[],
        &dir.path().join("served"),
    );
    let hf_args = format!("pretrained={},dtype=float32", model.display());
    let (hf, hf_samples) = lm_eval(
        &python,
        "hf",
        &hf_args,
        &["--device", "cpu", "--batch_size", "1"],
        &dir.path().join("hf"),
    );
    eprintln!("kiln serve: {served}\ntransformers: {hf}");
    for (task, metric) in [
        ("kiln_nli_mc", "acc,none"),
        ("kiln_nli_gen", "exact_match,none"),
    ] {
        let (a, b) = (served[task][metric].as_f64(), hf[task][metric].as_f64());
        assert!(a.is_some() && a == b, "{task} {metric}: {a:?} vs {b:?}");
        assert!(
            a.unwrap() > 0.6,
            "{task}: the trained model is well above chance: {a:?}"
        );
    }
    // Each request: [[log-likelihood, is_greedy]] per choice (strings), or [text].
    let number = |v: &Value| -> f64 {
        v.as_str()
            .map(|s| s.parse().unwrap())
            .or_else(|| v.as_f64())
            .unwrap()
    };
    let mut worst = 0f64;
    let (mc, hf_mc) = (&served_samples["kiln_nli_mc"], &hf_samples["kiln_nli_mc"]);
    assert_eq!(mc.len(), 60);
    for (doc, resps) in mc {
        for (ours, theirs) in resps
            .as_array()
            .unwrap()
            .iter()
            .zip(hf_mc[doc].as_array().unwrap())
        {
            let (ours, theirs) = (&ours[0], &theirs[0]);
            worst = worst.max((number(&ours[0]) - number(&theirs[0])).abs());
            assert_eq!(ours[1], theirs[1], "doc {doc}: is_greedy");
        }
    }
    eprintln!(
        "log-likelihoods: worst difference {worst:e} over {} docs × 3 choices",
        mc.len()
    );
    assert!(worst <= 1e-4, "log-likelihoods differ by {worst:e}");
    let (generated, hf_generated) = (&served_samples["kiln_nli_gen"], &hf_samples["kiln_nli_gen"]);
    assert_eq!(generated.len(), 60);
    for (doc, resps) in generated {
        assert_eq!(resps, &hf_generated[doc], "doc {doc}: generated text");
    }
}

/// The official `openai` Python client against `kiln serve`: the model list, completions (with
/// `echo` and `logprobs`), a stream that ends with the usage chunk `stream_options` asks for, and
/// errors raised as the client's own exception types.
#[test]
fn the_official_openai_client_talks_to_kiln_serve() {
    let Some(python) = python_with("openai") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = tiny_model(dir.path()) else {
        return;
    };
    let server = Server::start(&model, &["--name", "tiny"]);
    let script = r#"
import json, sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
out = {"models": [m.id for m in client.models.list()]}
plain = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0)
out["plain"] = {"text": plain.choices[0].text, "finish_reason": plain.choices[0].finish_reason,
                "completion_tokens": plain.usage.completion_tokens}
scored = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=0,
                                   echo=True, logprobs=2, temperature=0)
lp = scored.choices[0].logprobs
out["scored"] = {"text": scored.choices[0].text, "tokens": lp.tokens,
                 "token_logprobs": lp.token_logprobs, "top": [None if t is None else len(t) for t in lp.top_logprobs],
                 "text_offset": lp.text_offset}
chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5,
                                        temperature=0, stream=True,
                                        stream_options={"include_usage": True}))
out["stream"] = {"text": "".join(c.choices[0].text for c in chunks if c.choices),
                 "usage": [c.usage.completion_tokens for c in chunks if c.usage is not None],
                 "last_has_choices": bool(chunks[-1].choices)}
errors = {}
try:
    client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
except openai.NotFoundError as e:
    errors["unknown_model"] = [e.status_code, e.body["message"], e.body["type"]]
try:
    client.completions.create(model="tiny", prompt="x", max_tokens=1, logprobs=99)
except openai.BadRequestError as e:
    errors["bad_logprobs"] = [e.status_code, e.body["message"], e.body["type"]]
out["errors"] = errors
print(json.dumps(out))
"#;
    let output = Command::new(&python)
        .args(["-c", script, &format!("http://{}/v1", server.addr)])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let out: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(out["models"], json!(["tiny"]));
    let plain = &out["plain"];
    assert_eq!(plain["completion_tokens"], 5, "{out}");
    assert_eq!(plain["finish_reason"], "length");
    assert_eq!(
        out["stream"]["text"], plain["text"],
        "the stream says what the plain answer said"
    );
    assert_eq!(out["stream"]["usage"], json!([5]), "one usage chunk: {out}");
    assert_eq!(
        out["stream"]["last_has_choices"], false,
        "the usage chunk comes last"
    );
    let scored = &out["scored"];
    assert_eq!(scored["text"], "Once upon a time");
    let tokens = scored["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 4, "{scored}");
    assert_eq!(scored["token_logprobs"][0], Value::Null);
    assert!(scored["token_logprobs"][1].as_f64().unwrap() < 0.0);
    assert_eq!(scored["top"][0], Value::Null);
    assert!(scored["top"][1].as_u64().unwrap() >= 2);
    assert_eq!(scored["text_offset"], json!([0, 4, 9, 11]));
    let errors = &out["errors"];
    assert_eq!(
        errors["unknown_model"],
        json!([
            404,
            "model \"gpt-4\" is not served here (this server serves \"tiny\")",
            "not_found_error"
        ])
    );
    assert_eq!(
        errors["bad_logprobs"],
        json!([
            400,
            "logprobs: expected an integer from 0 to 20 (or null), got 99",
            "invalid_request_error"
        ])
    );
}

/// A checkpoint's `trainer_state.json` carries HF Trainer's fields beside Kiln's own, and its model
/// card's front matter is what the Hub reads (no `base_model` for a model Kiln initialised).
#[test]
fn checkpoints_carry_hf_trainer_state() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = trained_tiny(dir.path());
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(checkpoint.join("trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["global_step"], 150);
    assert_eq!(state["step"], 150, "Kiln's own field stays");
    assert_eq!(state["max_steps"], 150);
    let recipe = &state["recipe"];
    assert_eq!(state["train_batch_size"], recipe["batch"]["micro"]);
    assert_eq!(state["logging_steps"], recipe["tracking"]["log_every"]);
    assert_eq!(state["save_steps"], recipe["checkpoint"]["every"]);
    assert_eq!(state["best_metric"], Value::Null);
    assert_eq!(state["best_model_checkpoint"], Value::Null);
    let history = state["log_history"].as_array().unwrap();
    let log_every = recipe["tracking"]["log_every"].as_u64().unwrap();
    let train: Vec<&Value> = history.iter().filter(|e| e.get("loss").is_some()).collect();
    let steps: Vec<u64> = train.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    let expected: Vec<u64> = (1..=150)
        .filter(|s| s % log_every == 0 || *s == 150)
        .collect();
    assert_eq!(steps, expected, "every logged step, in order");
    for entry in &train {
        for key in ["loss", "learning_rate", "grad_norm", "epoch"] {
            assert!(entry[key].is_number(), "{key} in {entry}");
        }
    }
    let last = train.last().unwrap();
    assert_eq!(last["epoch"], state["epoch"]);
    let eval = history.last().unwrap();
    assert_eq!(eval["step"], 150);
    assert!(
        eval["eval_loss"].is_number() && eval["eval_accuracy"].is_number(),
        "{eval}"
    );
    let card = std::fs::read_to_string(checkpoint.join("README.md")).unwrap();
    assert!(
        card.starts_with("---\nlibrary_name: transformers\ntags:\n- gptj\n- kiln\n---\n"),
        "{card}"
    );
}

/// `dir`'s files as the model repo `repo` (`models/owner/name`) of the Hub stand-in, weights as
/// LFS objects as the Hub keeps them.
fn seed_model_dir(server: &hub_server::HubServer, repo: &str, dir: &Path) {
    let files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    let seeded: Vec<(&str, &[u8], bool)> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice(), n.ends_with(".safetensors")))
        .collect();
    server.seed(repo, false, &seeded);
}

/// `kiln` with `HF_ENDPOINT` at the local Hub stand-in and its own `HF_HOME`.
fn kiln_with_hub(
    server: &hub_server::HubServer,
    home: &Path,
    offline: bool,
    args: &[&str],
) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .args(args)
        .env("HF_ENDPOINT", &server.url)
        .env("HF_HOME", home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN");
    match offline {
        true => command.env("HF_HUB_OFFLINE", "1"),
        false => command.env_remove("HF_HUB_OFFLINE"),
    };
    let output = command.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert!(output.status.success(), "kiln {args:?}: {stdout}\n{stderr}");
    stdout
}

/// Every verb that names a model takes a Hub id as `kiln train` does: `kiln download` fetches a
/// model (and a dataset) for offline use, then `generate`, `score`, `eval`, `bench` and `serve`
/// run on `owner/name[@revision]` from the cache with the Hub out of reach, giving what the
/// local directory gives. Training from a Hub model names it in the model card (`base_model`),
/// a LoRA adapter as PEFT's (`library_name: peft`).
#[test]
fn hub_ids_work_for_every_verb_and_checkpoints_name_their_base() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    init_tiny(&base, 1, Path::new(&bundled("tokenizer")));
    let server = hub_server::HubServer::start(hub_server::ServerOptions::default());
    seed_model_dir(&server, "models/alice/tiny", &base);
    let rows = std::fs::read(bundled("validation.jsonl")).unwrap();
    server.seed(
        "datasets/alice/nli",
        false,
        &[
            ("default/validation.jsonl", &rows, false),
            ("README.md", b"# NLI", false),
        ],
    );
    let home = dir.path().join("hf");

    let said = kiln_with_hub(&server, &home, false, &["download", "alice/tiny"]);
    let cached = PathBuf::from(said.trim());
    assert!(cached.starts_with(&home), "{said}");
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(
            cached.join(file).is_file(),
            "{file} in {}",
            cached.display()
        );
    }
    let said = kiln_with_hub(
        &server,
        &home,
        false,
        &["download", "--dataset", "alice/nli"],
    );
    assert!(said.trim().ends_with("(2 files)"), "{said}");
    let snapshot = PathBuf::from(said.trim().trim_end_matches(" (2 files)"));
    assert_eq!(
        std::fs::read(snapshot.join("default/validation.jsonl")).unwrap(),
        rows
    );

    // Offline from here: everything comes from the cache.
    let prompt = [
        "--prompt",
        "mnli hypothesis: a b premise: a b target:",
        "--max-new-tokens",
        "4",
    ];
    let local = kiln_with_hub(
        &server,
        &home,
        true,
        &[
            &["generate", "--model", base.to_str().unwrap()],
            &prompt[..],
        ]
        .concat(),
    );
    let by_id = kiln_with_hub(
        &server,
        &home,
        true,
        &[&["generate", "--model", "alice/tiny"], &prompt[..]].concat(),
    );
    assert_eq!(by_id, local);
    let input = dir.path().join("rows.jsonl");
    std::fs::write(&input, "{\"ids\": [5, 6, 7, 8, 9]}\n").unwrap();
    let score = |model: &str, out: &str| {
        let output = dir.path().join(out);
        kiln_with_hub(
            &server,
            &home,
            true,
            &[
                "score",
                "--model",
                model,
                "--input",
                input.to_str().unwrap(),
                "--output",
                output.to_str().unwrap(),
            ],
        );
        std::fs::read_to_string(output).unwrap()
    };
    assert_eq!(
        score("alice/tiny@main", "by-id.jsonl"),
        score(base.to_str().unwrap(), "local.jsonl")
    );
    let report = dir.path().join("report");
    kiln_with_hub(
        &server,
        &home,
        true,
        &[
            "eval",
            "--model",
            "alice/tiny",
            "--task",
            "mnli",
            "--data",
            &bundled("validation.jsonl"),
            "--limit",
            "6",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    let eval: Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(
        eval["model"], "alice/tiny",
        "the report names the model as given"
    );
    kiln_with_hub(
        &server,
        &home,
        true,
        &[
            "bench",
            "--model",
            "alice/tiny",
            "--input-lengths",
            "4",
            "--output-lengths",
            "2",
            "--batch-sizes",
            "1",
            "--repeats",
            "1",
            "--threads",
            "1",
        ],
    );
    let serving = Server::start_with_env(
        Path::new("alice/tiny"),
        &[],
        &[("HF_HOME", &home), ("HF_HUB_OFFLINE", Path::new("1"))],
    );
    let (status, models) = serving.get("/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    drop(serving);
    assert_eq!(
        models["models"],
        json!(["tiny"]),
        "served under the repo's name"
    );

    // Training from the Hub model: its cards name it.
    for (name, extra, library) in [
        ("full", "", "transformers"),
        (
            "lora",
            "lora: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}\n",
            "peft",
        ),
    ] {
        let out = dir.path().join(name);
        std::fs::create_dir_all(&out).unwrap();
        let recipe = write_recipe(&out, extra);
        let text = std::fs::read_to_string(&recipe).unwrap().replace(
            "model: {init: {preset: tiny, seed: 1, vocab_size: 1024}}",
            "model: {from: alice/tiny}",
        );
        std::fs::write(&recipe, text).unwrap();
        kiln_with_hub(
            &server,
            &home,
            true,
            &[
                "train",
                recipe.to_str().unwrap(),
                "--quiet",
                "--set",
                "steps=2",
                "--set",
                "schedule.warmup=1",
            ],
        );
        let card = std::fs::read_to_string(out.join("checkpoints/run/step-2/README.md")).unwrap();
        let tags = if name == "lora" {
            "- gptj\n- lora\n- kiln\n"
        } else {
            "- gptj\n- kiln\n"
        };
        assert!(
            card.starts_with(&format!(
                "---\nbase_model: alice/tiny\nlibrary_name: {library}\ntags:\n{tags}---\n"
            )),
            "{name}: {card}"
        );
    }
}

/// A TLS front for `upstream` (plain HTTP) with `cert`/`key`, relaying every request as it is
/// (redirects too: the Hub client follows them itself); prints its port.
const TLS_PROXY: &str = r#"
import http.server, ssl, sys, urllib.error, urllib.request
upstream, cert, key = sys.argv[1:4]
class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None
opener = urllib.request.build_opener(NoRedirect)
class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def relay(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        skip = ("host", "connection", "content-length", "accept-encoding")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        request = urllib.request.Request(upstream + self.path, data=body, headers=headers, method=self.command)
        try:
            response = opener.open(request)
        except urllib.error.HTTPError as error:
            response = error
        data = response.read()
        self.send_response(response.getcode())
        for k, v in response.headers.items():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                self.send_header(k, v)
        length = response.headers.get("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
    do_GET = do_POST = do_HEAD = do_PUT = relay
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// HTTPS to a server whose certificate a private CA signed, as a company's MLflow or Hub mirror
/// has: refused while the system's store lacks the CA, trusted once `SSL_CERT_FILE` names it
/// (Mozilla's roots are trusted as well, so public servers keep working).
#[test]
fn a_hub_behind_a_private_ca_is_trusted_through_the_system_store() {
    let Some(python) = python_with("ssl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    std::fs::write(
        dir.path().join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    for args in [
        vec![
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &at("ca.key"),
            "-out",
            &at("ca.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=Kiln test CA",
        ],
        vec![
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &at("server.key"),
            "-out",
            &at("server.csr"),
            "-subj",
            "/CN=127.0.0.1",
        ],
        vec![
            "x509",
            "-req",
            "-in",
            &at("server.csr"),
            "-CA",
            &at("ca.pem"),
            "-CAkey",
            &at("ca.key"),
            "-CAcreateserial",
            "-out",
            &at("server.pem"),
            "-days",
            "2",
            "-extfile",
            &at("ext.cnf"),
        ],
    ] {
        let output = Command::new("openssl")
            .args(&args)
            .output()
            .expect("openssl runs");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let base = dir.path().join("base");
    init_tiny(&base, 1, Path::new(&bundled("tokenizer")));
    let hub = hub_server::HubServer::start(hub_server::ServerOptions::default());
    seed_model_dir(&hub, "models/alice/tiny", &base);
    let mut proxy = Command::new(&python)
        .args([
            "-c",
            TLS_PROXY,
            hub.url.trim_end_matches('/'),
            &at("server.pem"),
            &at("server.key"),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(proxy.stdout.take().unwrap()),
        &mut port,
    )
    .unwrap();
    let endpoint = format!("https://127.0.0.1:{}", port.trim());
    let download = |ca: Option<&str>, home: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command
            .args(["download", "alice/tiny"])
            .env("HF_ENDPOINT", &endpoint)
            .env("HF_HOME", at(home))
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_TOKEN")
            .env_remove("SSL_CERT_DIR");
        match ca {
            Some(ca) => command.env("SSL_CERT_FILE", ca),
            None => command.env_remove("SSL_CERT_FILE"),
        };
        command.output().unwrap()
    };
    let refused = download(None, "hf-untrusted");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains(&endpoint) && stderr.to_lowercase().contains("certificate"),
        "{stderr}"
    );
    let trusted = download(Some(&at("ca.pem")), "hf-trusted");
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    let cached = PathBuf::from(String::from_utf8_lossy(&trusted.stdout).trim());
    assert_eq!(
        std::fs::read(cached.join("model.safetensors")).unwrap(),
        std::fs::read(base.join("model.safetensors")).unwrap()
    );
}
