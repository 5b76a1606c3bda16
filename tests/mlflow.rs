//! `tracking.mlflow` against a real MLflow server (`mlflow server` from PyPI, started here on
//! 127.0.0.1 with a temporary sqlite store and artifact root), read back with the official
//! MLflow Python client (`scripts/check_mlflow.py`).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{kiln, write_recipe};
use serde_json::Value;

/// A running `mlflow server`, killed on drop; it can be stopped and started again on the same
/// port and store, as a server that goes away and comes back.
struct MlflowServer {
    python: String,
    child: Option<Child>,
    port: u16,
    uri: String,
    store: tempfile::TempDir,
}

impl MlflowServer {
    fn start(python: &str) -> Self {
        let port = free_port();
        let mut server = Self {
            python: python.to_string(),
            child: None,
            port,
            uri: format!("http://127.0.0.1:{port}"),
            store: tempfile::tempdir().unwrap(),
        };
        server.restart();
        server
    }

    fn restart(&mut self) {
        let store = self.store.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(store.join("server.log"))
            .unwrap();
        let mut child = Command::new(&self.python)
            .args(["-m", "mlflow", "server", "--host", "127.0.0.1"])
            .args(["--workers", "1", "--port", &self.port.to_string()])
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", store.join("mlflow.db").display()))
            .arg("--artifacts-destination")
            .arg(store.join("artifacts"))
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group: the server runs its workers as child processes, and they
            // must go down with it.
            .process_group(0)
            .spawn()
            .expect("mlflow server starts");
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if ureq::get(format!("{}/health", self.uri))
                .call()
                .is_ok_and(|r| r.status() == 200)
            {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(store.join("server.log")).unwrap();
                panic!("mlflow server exited with {status}:\n{log}");
            }
            assert!(Instant::now() < deadline, "mlflow server did not start");
            std::thread::sleep(Duration::from_millis(300));
        }
        self.child = Some(child);
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signals the process group this test started; no memory is involved.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The experiment as the official client reads it.
fn read_back(python: &str, uri: &str, experiment: &str) -> Value {
    let output = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_mlflow.py"))
        .args([uri, experiment])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// metrics.jsonl as `tag -> [(step, value)]`.
fn jsonl_metrics(run_dir: &Path) -> BTreeMap<String, Vec<(u64, f64)>> {
    let mut by_tag: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for record in kiln::track::read_metrics(&run_dir.join("metrics.jsonl")).unwrap() {
        by_tag
            .entry(record.tag)
            .or_default()
            .push((record.step, record.value));
    }
    by_tag
}

fn mlflow_metrics(run: &Value) -> BTreeMap<String, Vec<(u64, f64)>> {
    run["metrics"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(key, points)| {
            let points = points
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap_or(f64::NAN)))
                .collect();
            (key.clone(), points)
        })
        .collect()
}

fn mlflow_section(uri: &str, experiment: &str, extra: &str) -> String {
    format!(
        "eval: {{every: 5, task: mnli, mode: rank, batch_size: 16}}\n\
         tracking:\n  log_dir: LOGS\n  mlflow: {{uri: \"{uri}\", experiment: {experiment}, \
         tags: {{team: nlp}}{extra}}}\n"
    )
}

/// `write_recipe` with `extra`, its `tracking:` line replaced by `tracking_yaml`.
fn recipe_with_tracking(out: &Path, tracking_yaml: &str) -> PathBuf {
    let path = write_recipe(out, "");
    let logs = out.join("runs");
    let text = std::fs::read_to_string(&path).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("tracking:") && !l.starts_with("eval:"))
        .collect();
    let tracking = tracking_yaml.replace("LOGS", &logs.display().to_string());
    std::fs::write(&path, format!("{}\n{tracking}", kept.join("\n"))).unwrap();
    path
}

fn train(recipe: &Path, extra_args: &[&str]) -> (bool, String, String) {
    let mut args = vec!["train", recipe.to_str().unwrap(), "--threads", "2"];
    args.extend_from_slice(extra_args);
    kiln(&args)
}

#[test]
fn mlflow_run_mirrors_metrics_params_artifacts_and_survives_kill_and_server_loss() {
    let Some(python) = common::python_with("mlflow") else {
        return;
    };
    let mut server = MlflowServer::start(&python);
    let uri = server.uri.clone();

    // 1. A whole run: every metric, the resolved recipe as params, artifacts, FINISHED.
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe_with_tracking(dir.path(), &mlflow_section(&uri, "whole", ""));
    let (ok, stdout, stderr) = train(&recipe, &["--quiet"]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("MLflow: logging to"), "{stdout}");
    let run_dir = dir.path().join("runs/run");
    let dump = read_back(&python, &uri, "whole");
    let runs = dump["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{dump}");
    let run = &runs[0];
    assert_eq!(run["status"], "FINISHED");
    assert_eq!(run["run_name"], "run");
    let expected = jsonl_metrics(&run_dir);
    assert!(expected.contains_key("eval/accuracy") && expected.contains_key("train/loss"));
    let logged = mlflow_metrics(run);
    assert_eq!(
        logged.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (tag, points) in &expected {
        let got = &logged[tag];
        assert_eq!(got.len(), points.len(), "{tag}");
        for ((step, value), (got_step, got_value)) in points.iter().zip(got) {
            assert_eq!(step, got_step, "{tag}");
            // MLflow stores doubles: the value is exactly metrics.jsonl's.
            assert_eq!(value.to_bits(), got_value.to_bits(), "{tag} step {step}");
        }
    }
    // Params are the resolved recipe, flattened; tags say where the run came from.
    let recipe_path = run_dir.join("recipe.yaml");
    let resolved = std::fs::read_to_string(&recipe_path).unwrap();
    let params = run["params"].as_object().unwrap();
    let expected_params = kiln::track::runs::flatten_recipe(&resolved, &recipe_path).unwrap();
    assert_eq!(params.len(), expected_params.len(), "{params:?}");
    for (key, value) in &expected_params {
        assert_eq!(params[key].as_str(), Some(value.as_str()), "param {key}");
    }
    assert_eq!(params["optimizer.lr"], "0.002");
    assert_eq!(params["batch.global"], "8");
    let tags = run["tags"].as_object().unwrap();
    assert_eq!(tags["team"], "nlp");
    assert_eq!(tags["kiln.version"], env!("CARGO_PKG_VERSION"));
    assert!(tags["mlflow.source.name"]
        .as_str()
        .unwrap()
        .contains("kiln"));
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("run.json")).unwrap()).unwrap();
    assert_eq!(tags["kiln.recipe_sha256"], info["recipe_sha256"]);
    assert_eq!(info["status"], "finished");
    assert_eq!(info["mlflow"]["run_id"], run["run_id"]);
    let artifacts: Vec<&str> = run["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for expected in [
        "recipe.yaml",
        "eval/step-5/report.json",
        "eval/step-10/report.json",
        "curves.svg",
        "model/README.md",
    ] {
        assert!(artifacts.contains(&expected), "{expected} in {artifacts:?}");
    }

    // 2. Killed after a checkpoint, resumed: the same MLflow run, every step exactly once.
    let killed = tempfile::tempdir().unwrap();
    let recipe_k = recipe_with_tracking(
        killed.path(),
        &mlflow_section(&uri, "resumed", ", flush_timeout_secs: 5"),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", recipe_k.to_str().unwrap(), "--threads", "2"])
        .args(["--set", "steps=12", "--set", "checkpoint.every=4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut checkpointed = false;
    let mut killed_mid_run = false;
    for line in lines {
        let line = line.unwrap();
        checkpointed |= line.contains("saved checkpoint") && line.contains("step-4");
        // Steps 5 and 6 reach MLflow before the kill; the resumed run must not log them again.
        if checkpointed && line.starts_with("step 7/") {
            child.kill().unwrap();
            killed_mid_run = true;
            break;
        }
    }
    child.wait().unwrap();
    assert!(killed_mid_run, "the run ended before it could be killed");
    let before = read_back(&python, &uri, "resumed");
    assert_eq!(before["runs"][0]["status"], "RUNNING");
    let (ok, stdout, stderr) = train(
        &recipe_k,
        &[
            "--quiet",
            "--resume",
            "latest",
            "--set",
            "steps=12",
            "--set",
            "checkpoint.every=4",
        ],
    );
    assert!(ok, "{stdout}\n{stderr}");
    let after = read_back(&python, &uri, "resumed");
    let runs = after["runs"].as_array().unwrap();
    assert_eq!(
        runs.len(),
        1,
        "resume continues the same MLflow run: {after}"
    );
    assert_eq!(runs[0]["run_id"], before["runs"][0]["run_id"]);
    assert_eq!(runs[0]["status"], "FINISHED");
    let logged = mlflow_metrics(&runs[0]);
    let steps: Vec<u64> = logged["train/loss"].iter().map(|p| p.0).collect();
    assert_eq!(
        steps,
        (1..=12).collect::<Vec<_>>(),
        "no step twice, none missing"
    );
    let expected = jsonl_metrics(&killed.path().join("runs/run"));
    for tag in ["train/loss", "train/grad_norm", "train/lr", "eval/accuracy"] {
        let ours: Vec<(u64, u64)> = expected[tag].iter().map(|p| (p.0, p.1.to_bits())).collect();
        let theirs: Vec<(u64, u64)> = logged[tag].iter().map(|p| (p.0, p.1.to_bits())).collect();
        // Resume is bit-exact, so the interrupted session's values equal the resumed ones.
        assert_eq!(ours, theirs, "{tag}");
    }

    // 3. Ctrl-C: the run stops after a checkpoint, and MLflow calls it KILLED.
    let interrupted = tempfile::tempdir().unwrap();
    let recipe_i =
        recipe_with_tracking(interrupted.path(), &mlflow_section(&uri, "interrupted", ""));
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", recipe_i.to_str().unwrap(), "--threads", "2"])
        .args(["--set", "steps=40", "--set", "eval.every=0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().starts_with("step 3/") {
            // SAFETY: signals the child this test started.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            break;
        }
    }
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert!(child.wait().unwrap().success(), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("stopped at step")),
        "{rest:?}"
    );
    let dump = read_back(&python, &uri, "interrupted");
    assert_eq!(dump["runs"][0]["status"], "KILLED");
    let info: Value = serde_json::from_str(
        &std::fs::read_to_string(interrupted.path().join("runs/run/run.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(info["status"], "stopped");

    // 4. A run that fails (an absurd learning rate overflows at step 2) is FAILED in MLflow.
    let failing = tempfile::tempdir().unwrap();
    let recipe_f = recipe_with_tracking(failing.path(), &mlflow_section(&uri, "failing", ""));
    let (ok, stdout, stderr) = train(
        &recipe_f,
        &[
            "--quiet",
            "--set",
            "optimizer.lr=1.0e30",
            "--set",
            "optimizer.weight_decay=0.0",
        ],
    );
    assert!(!ok, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("the gradients are not finite")
            && stderr.contains("so the update was not applied and training stopped"),
        "{stderr}"
    );
    let dump = read_back(&python, &uri, "failing");
    assert_eq!(dump["runs"][0]["status"], "FAILED");
    assert_eq!(
        dump["runs"][0]["metrics"]["train/loss"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // 5. The server goes away mid-run and stays away: training finishes, the end says what
    // MLflow is missing.
    let gone = tempfile::tempdir().unwrap();
    let (_, stderr) = train_through_outage(&mut server, gone.path(), "gone", 2, false);
    assert!(
        stderr.contains("cannot reach") && stderr.contains("were not sent"),
        "{stderr}"
    );

    // 6. The server comes back while the run waits to flush: it catches up, every step once.
    server.restart();
    let back = tempfile::tempdir().unwrap();
    let (_, stderr) = train_through_outage(&mut server, back.path(), "back", 180, true);
    assert!(
        stderr.contains("cannot reach") && stderr.contains("reachable again"),
        "{stderr}"
    );
    let dump = read_back(&python, &uri, "back");
    let run = &dump["runs"][0];
    assert_eq!(run["status"], "FINISHED");
    let logged = mlflow_metrics(run);
    let expected = jsonl_metrics(&back.path().join("runs/run"));
    for (tag, points) in &expected {
        let steps: Vec<u64> = points.iter().map(|p| p.0).collect();
        let got: Vec<u64> = logged[tag].iter().map(|p| p.0).collect();
        assert_eq!(steps, got, "{tag}");
    }
}

/// Trains 12 steps with the server stopped after step 3 (and started again at once when
/// `come_back`); checks that training lost nothing and returns its (stdout, stderr).
fn train_through_outage(
    server: &mut MlflowServer,
    dir: &Path,
    experiment: &str,
    flush_timeout_secs: u64,
    come_back: bool,
) -> (String, String) {
    let flush = format!(", flush_timeout_secs: {flush_timeout_secs}");
    let recipe = recipe_with_tracking(dir, &mlflow_section(&server.uri, experiment, &flush));
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", recipe.to_str().unwrap(), "--threads", "2"])
        .args(["--set", "steps=12", "--set", "checkpoint.every=0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "ended early: {seen}"
        );
        seen.push_str(&line);
        if line.starts_with("step 3/") {
            server.stop();
            break;
        }
    }
    if come_back {
        server.restart();
    }
    stdout.read_to_string(&mut seen).unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{seen}\n{stderr}");
    let steps: Vec<u64> = jsonl_metrics(&dir.join("runs/run"))["train/loss"]
        .iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("runs/run/run.json")).unwrap())
            .unwrap();
    assert_eq!(info["status"], "finished");
    (seen, stderr)
}

#[test]
fn unreachable_mlflow_is_a_warning_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("http://127.0.0.1:{}", free_port());
    let recipe = recipe_with_tracking(dir.path(), &mlflow_section(&uri, "x", ""));
    let (ok, stdout, stderr) = train(&recipe, &["--quiet", "--set", "eval.every=0"]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("warning: MLflow: cannot reach {uri}"))
            && stdout.contains("training goes on without MLflow"),
        "{stdout}"
    );
    let steps = jsonl_metrics(&dir.path().join("runs/run"))["train/loss"].len();
    assert_eq!(steps, 10);
}

#[test]
fn mlflow_auth_failure_says_which_variables_to_set_and_never_logs_the_token() {
    // A server that refuses every request, recording what it was sent.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let seen_by_server = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut buffer = [0u8; 8192];
            let n = stream.read(&mut buffer).unwrap_or(0);
            seen_by_server
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buffer[..n]));
            let body = r#"{"error_code": "UNAUTHENTICATED", "message": "Unauthorized"}"#;
            let _ = write!(
                stream,
                "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe_with_tracking(dir.path(), "tracking:\n  log_dir: LOGS\n  mlflow: {}\n");
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "train",
            recipe.to_str().unwrap(),
            "--quiet",
            "--threads",
            "2",
        ])
        .env("MLFLOW_TRACKING_URI", &uri)
        .env("MLFLOW_TRACKING_TOKEN", "kiln-secret-token-42")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("HTTP 401") && stdout.contains("set MLFLOW_TRACKING_TOKEN"),
        "{stdout}"
    );
    // The token went to the server, and nowhere else.
    assert!(seen.lock().unwrap().contains("Bearer kiln-secret-token-42"));
    assert!(!stdout.contains("kiln-secret") && !stderr.contains("kiln-secret"));
    for entry in std::fs::read_dir(dir.path().join("runs/run")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains("kiln-secret"), "{}", path.display());
        }
    }
}
