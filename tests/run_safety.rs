//! `kiln train` never destroys a run's work: a fresh start over an earlier run is refused unless
//! `--overwrite`, and a second process on a run that another one is training is refused before it
//! touches anything.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use common::{kiln, write_recipe};

fn run_ok(args: &[&str]) -> String {
    let (ok, stdout, stderr) = kiln(args);
    assert!(ok, "kiln {args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

/// Every file under `dir` (hidden ones too) with its bytes and modification time.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, SystemTime)> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
                files.insert(path.clone(), (std::fs::read(&path).unwrap(), modified));
            }
        }
    }
    files
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn logged_steps(run_dir: &Path, tag: &str) -> Vec<u64> {
    kiln::track::read_metrics(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.tag == tag)
        .map(|r| r.step)
        .collect()
}

/// The issue's case: a second `kiln train` of the same recipe emptied metrics.jsonl and, with
/// `keep_last: 1`, pruned the earlier run's checkpoint. Now it is refused, saying what is there
/// and the three ways on, and not one byte of the earlier run changes.
#[test]
fn a_fresh_start_over_an_earlier_run_is_refused_and_changes_nothing() {
    let out = tempfile::tempdir().unwrap();
    let recipe = write_recipe(out.path(), "");
    let args = [
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--set",
        "steps=4",
        "--set",
        "checkpoint.keep_last=1",
    ];
    run_ok(&args);
    let (checkpoints, logs) = (
        out.path().join("checkpoints/run"),
        out.path().join("runs/run"),
    );
    let before = (snapshot(&checkpoints), snapshot(&logs));
    let metric_lines = std::fs::read_to_string(logs.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();

    let (ok, _, err) = kiln(&args);
    assert!(!ok, "a fresh start over the earlier run must be refused");
    for expected in [
        "run `run` was trained before".to_string(),
        format!(
            "{} holds 1 checkpoint (step-4), `latest` naming step-4",
            checkpoints.display()
        ),
        format!(
            "{} holds metrics.jsonl ({metric_lines} lines), 1 TensorBoard event file, run.json \
             (finished, 4 of 4 steps)",
            logs.display()
        ),
        "`--resume latest`".to_string(),
        "`--set name=run-2`".to_string(),
        "`--overwrite`".to_string(),
    ] {
        assert!(err.contains(&expected), "{expected:?} in:\n{err}");
    }
    assert!(
        before == (snapshot(&checkpoints), snapshot(&logs)),
        "the refused start changed the earlier run's files"
    );
    // Resuming it is still allowed.
    let resumed = run_ok(&[&args[..], &["--resume", "latest", "--set", "steps=5"]].concat());
    assert!(resumed.contains("resumed from"), "{resumed}");
}

/// `--overwrite` starts over: nothing of the earlier run (checkpoints beyond the new run's, eval
/// reports, event files, metrics, run.json's sessions) survives into the new one.
#[test]
fn overwrite_replaces_the_earlier_run_and_keeps_none_of_it() {
    let out = tempfile::tempdir().unwrap();
    let recipe = write_recipe(out.path(), "eval: {every: 2, task: perplexity}\n");
    let recipe = recipe.to_str().unwrap();
    run_ok(&["train", recipe, "--quiet", "--set", "steps=4"]);
    let (checkpoints, logs) = (
        out.path().join("checkpoints/run"),
        out.path().join("runs/run"),
    );
    assert_eq!(entries(&logs.join("eval")), ["step-2", "step-4"]);

    let (ok, _, err) = kiln(&["train", recipe, "--overwrite", "--resume", "latest"]);
    assert!(
        !ok && err.contains("the argument '--overwrite' cannot be used with '--resume <"),
        "{err}"
    );

    let said = run_ok(&[
        "train",
        recipe,
        "--quiet",
        "--overwrite",
        "--set",
        "steps=3",
    ]);
    assert!(
        said.contains("overwrite: deleted the earlier run")
            && said.contains("4 checkpoints (step-1, step-2, step-3, step-4)"),
        "{said}"
    );
    assert_eq!(
        entries(&checkpoints),
        ["latest", "step-1", "step-2", "step-3"]
    );
    assert_eq!(
        kiln::checkpoint::verify(&checkpoints.join("step-3"))
            .unwrap()
            .step,
        3
    );
    assert_eq!(entries(&logs.join("eval")), ["step-2", "step-3"]);
    let event_files = entries(&logs)
        .into_iter()
        .filter(|name| name.starts_with("events.out.tfevents."))
        .count();
    assert_eq!(event_files, 1, "{:?}", entries(&logs));
    assert_eq!(logged_steps(&logs, "train/loss"), [1, 2, 3]);
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(logs.join("run.json")).unwrap()).unwrap();
    let counts = ["sessions", "steps_done", "total_steps"].map(|key| info[key].as_u64());
    assert_eq!(counts, [Some(1), Some(3), Some(3)], "{info}");
}

/// Waits up to `limit` for `child` to exit; kills it past that (then `None`).
fn wait_at_most(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    None
}

/// While one `kiln train` runs, a second on the same run name — resuming, overwriting or fresh —
/// is refused at once, naming the first's pid and host, and the first finishes unharmed: every
/// checkpoint it writes (each built in its `.tmp-step-N`) lands, and its metrics hold every step
/// once.
#[test]
fn a_second_process_on_a_live_run_is_refused_and_the_first_finishes_unharmed() {
    let out = tempfile::tempdir().unwrap();
    let recipe = write_recipe(out.path(), "");
    let recipe = recipe.to_str().unwrap();
    let long_run = [
        "--quiet",
        "--threads",
        "1",
        "--set",
        "steps=100000",
        "--set",
        "checkpoint.keep_last=3",
    ];
    let mut first = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", recipe])
        .args(long_run)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, said) = mpsc::channel();
    let stdout = BufReader::new(first.stdout.take().unwrap());
    let reader = std::thread::spawn(move || {
        for line in stdout.lines() {
            let _ = lines.send(line.unwrap());
        }
    });
    let mut saved = 0;
    while saved < 2 {
        let line = said
            .recv_timeout(Duration::from_secs(60))
            .expect("the first run saves checkpoints");
        saved += usize::from(line.contains("saved checkpoint"));
    }

    let holder = format!("pid {} on host {}", first.id(), kiln::track::host_name());
    for how in [&["--resume", "latest"][..], &["--overwrite"], &[]] {
        let mut second = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["train", recipe])
            .args(long_run)
            .args(how)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = wait_at_most(&mut second, Duration::from_secs(30));
        let mut err = String::new();
        std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
        assert!(
            status.is_some_and(|s| !s.success()),
            "kiln train {how:?} beside a live run was not refused: {err}"
        );
        assert!(
            err.contains("this run is being trained by another process") && err.contains(&holder),
            "{how:?}: {err}"
        );
    }
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first run ended early"
    );

    // SIGTERM: the first finishes its step, checkpoints it and exits 0.
    // SAFETY: kill sends a signal to our own child, which is still running.
    assert_eq!(unsafe { libc::kill(first.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_at_most(&mut first, Duration::from_secs(60));
    reader.join().unwrap();
    let rest: Vec<String> = said.try_iter().collect();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut first.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.is_some_and(|s| s.success()), "{rest:?}\n{err}");
    assert!(
        rest.iter().any(|l| l.contains("stopped at step")),
        "{rest:?}"
    );
    let checkpoints = out.path().join("checkpoints/run");
    let latest = std::fs::read_to_string(checkpoints.join("latest")).unwrap();
    let last = kiln::checkpoint::verify(&checkpoints.join(latest.trim()))
        .unwrap()
        .step;
    let steps = logged_steps(&out.path().join("runs/run"), "train/loss");
    assert_eq!(steps, (1..=last).collect::<Vec<_>>());
    // keep_last 3 and `latest`; no `.tmp-step-N` left behind, and the lock file is gone.
    let names = entries(&checkpoints);
    assert!(
        names.len() <= 4 && names.iter().all(|name| !name.starts_with('.')),
        "{names:?}"
    );
}

/// `kill -9` leaves the lock file naming the dead process: `--resume latest` takes it over with a
/// warning and removes it at the end. A lock file naming another host is not taken over.
#[test]
fn a_lock_left_by_a_killed_run_is_taken_over_and_one_from_another_host_is_not() {
    let out = tempfile::tempdir().unwrap();
    let recipe = write_recipe(out.path(), "");
    let recipe = recipe.to_str().unwrap();
    common::train_and_kill_after_step_4(out.path(), Path::new(recipe));
    let lock = out.path().join("checkpoints/run/.lock");
    let left: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&lock).expect("the killed run's lock"))
            .unwrap();
    assert_eq!(left["host"], kiln::track::host_name().as_str(), "{left}");
    let dead = left["pid"].as_u64().unwrap();
    assert!(!kiln::track::runs::process_exists(dead as u32));

    let (ok, stdout, err) = kiln(&["train", recipe, "--quiet", "--resume", "latest"]);
    assert!(ok, "{stdout}\n{err}");
    assert!(
        err.contains(&format!("taking over the lock of pid {dead} on this host")),
        "{err}"
    );
    assert!(!lock.exists(), "a run that ends removes its lock file");

    let elsewhere = r#"{"pid": 4242, "host": "node-17.elsewhere", "since": 0}"#;
    std::fs::write(&lock, elsewhere).unwrap();
    let more = [
        "train", recipe, "--quiet", "--resume", "latest", "--set", "steps=11",
    ];
    let (ok, _, err) = kiln(&more);
    assert!(!ok, "a lock from another host must not be taken over");
    assert!(
        err.contains("pid 4242 on host node-17.elsewhere")
            && err.contains(&format!("delete {}", lock.display())),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), elsewhere);
    assert!(!out.path().join("checkpoints/run/step-11").exists());
    std::fs::remove_file(&lock).unwrap();
    run_ok(&more);
}
