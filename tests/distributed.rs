//! One training over two processes, as `mpirun -np 2 kiln train` runs it on 127.0.0.1: the
//! same numbers as one process with two replicas, ZeRO-1 equal to unsharded, one writer, and a
//! job that stops cleanly when a rank dies, hangs or is interrupted. Needs Open MPI's `mpirun`
//! (`.ci/run` installs it) and a kiln built with `--features mpi`.
#![cfg(feature = "mpi")]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::bundled;

/// A 10-step run of the tiny GPT-J: 8 rows per step in micro-batches of 2 over 2 replicas (so
/// 2 accumulation steps), dropout on; `extra` is appended YAML.
fn write_recipe(out: &Path, extra: &str) -> PathBuf {
    let text = format!(
        "name: run\n\
         seed: 3\n\
         model: {{init: {{preset: tiny, seed: 1, vocab_size: 1024}}, dropout: {{resid: 0.1}}}}\n\
         tokenizer: {tokenizer}\n\
         data:\n  \
           train: [{{source: {{path: {train}}}, template: mnli, limit: 400}}]\n  \
           seq_len: 64\n  mode: pad\n  loss_on: target\n\
         optimizer: {{lr: 2.0e-3, weight_decay: 0.01}}\n\
         schedule: {{kind: cosine, warmup: 2}}\n\
         batch: {{global: 8, micro: 2, replicas: 2}}\n\
         steps: 10\n\
         checkpoint: {{every: 5, dir: {ckpt}}}\n\
         tracking: {{log_dir: {logs}}}\n\
         {extra}",
        tokenizer = bundled("tokenizer"),
        train = bundled("train.jsonl"),
        ckpt = out.join("checkpoints").display(),
        logs = out.join("runs").display(),
    );
    let path = out.join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `mpirun -np 2` (as root too, more ranks than cores allowed) running `kiln ARGS` with one
/// thread per rank.
fn mpirun(args: &[&str]) -> Command {
    let mut command = Command::new("mpirun");
    command
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .args(["--threads", "1"]);
    command
}

fn output(mut command: Command) -> Output {
    command
        .output()
        .expect("mpirun runs (install Open MPI: apt-get install openmpi-bin libopenmpi-dev)")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn train_two_ranks(recipe: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", recipe.to_str().unwrap(), "--quiet"];
    args.extend(extra);
    let out = output(mpirun(&args));
    assert!(
        out.status.success(),
        "mpirun -np 2 kiln train failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

fn train_one_process(recipe: &Path) {
    let (ok, stdout, stderr) = common::kiln(&[
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--threads",
        "2",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
}

/// (step, tag) → value of `train/loss` and `train/grad_norm`.
fn step_metrics(out: &Path) -> BTreeMap<(u64, String), f64> {
    let records = kiln::track::read_metrics(&out.join("runs/run/metrics.jsonl")).unwrap();
    let mut metrics = BTreeMap::new();
    for r in records {
        if r.tag == "train/loss" || r.tag == "train/grad_norm" {
            let previous = metrics.insert((r.step, r.tag.clone()), r.value);
            assert!(previous.is_none(), "step {} {} logged twice", r.step, r.tag);
        }
    }
    metrics
}

fn checkpoint_file(out: &Path, step: u64, file: &str) -> Vec<u8> {
    let path = out.join(format!("checkpoints/run/step-{step}/{file}"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The model and optimizer files of `a`'s and `b`'s checkpoints of `step` are byte-equal.
fn assert_same_checkpoint(a: &Path, b: &Path, step: u64, what: &str) {
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            checkpoint_file(a, step, file) == checkpoint_file(b, step, file),
            "{what}: {file} of step {step} differs"
        );
    }
}

#[test]
fn two_ranks_train_exactly_what_one_process_with_two_replicas_trains() {
    for precision in ["fp16", "fp32"] {
        let extra = format!("precision: {{compute: {precision}}}\n");
        let one = tempfile::tempdir().unwrap();
        train_one_process(&write_recipe(one.path(), &extra));
        let two = tempfile::tempdir().unwrap();
        let out = train_two_ranks(&write_recipe(two.path(), &extra), &[]);
        assert!(
            text(&out.stdout).contains("distributed: 2 ranks over MPI, 1 replica(s) each"),
            "{}",
            text(&out.stdout)
        );

        // Bit-identical: each rank sums its replica's micro-batches, and a sum of two is the
        // same whichever rank adds it.
        let (a, b) = (step_metrics(one.path()), step_metrics(two.path()));
        assert_eq!(a.len(), 20, "{a:?}");
        assert_eq!(a, b, "{precision}: per-step loss and gradient norm");
        assert_same_checkpoint(one.path(), two.path(), 10, precision);
    }
}

#[test]
fn four_replicas_over_two_ranks_agree_to_float_rounding() {
    // Two replicas per rank: the job adds (r0 + r1) + (r2 + r3) where one process adds
    // ((r0 + r1) + r2) + r3, so the two agree to rounding, not bit for bit.
    let one = tempfile::tempdir().unwrap();
    let recipe = write_recipe(one.path(), "").to_str().unwrap().to_string();
    let (ok, stdout, stderr) = common::kiln(&[
        "train",
        &recipe,
        "--quiet",
        "--threads",
        "4",
        "--set",
        "batch.micro=1",
        "--set",
        "batch.replicas=4",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let two = tempfile::tempdir().unwrap();
    train_two_ranks(
        &write_recipe(two.path(), ""),
        &["--set", "batch.micro=1", "--set", "batch.replicas=4"],
    );
    let (a, b) = (step_metrics(one.path()), step_metrics(two.path()));
    assert_eq!(a.len(), b.len());
    for ((key, x), y) in a.iter().zip(b.values()) {
        let relative = (x - y).abs() / x.abs().max(1e-12);
        assert!(
            relative <= 1e-6,
            "{key:?}: {x} vs {y} ({relative:e} relative)"
        );
    }
}

#[test]
fn zero1_equals_unsharded_training_with_half_the_optimizer_state_per_rank() {
    let plain = tempfile::tempdir().unwrap();
    let plain_out = train_two_ranks(&write_recipe(plain.path(), ""), &[]);
    let sharded = tempfile::tempdir().unwrap();
    let sharded_out = train_two_ranks(
        &write_recipe(sharded.path(), "distributed: {shard_optimizer: true}\n"),
        &[],
    );
    assert_eq!(step_metrics(plain.path()), step_metrics(sharded.path()));
    // ZeRO-1's optimizer state, gathered for the checkpoint, included.
    assert_same_checkpoint(plain.path(), sharded.path(), 10, "ZeRO-1 against unsharded");
    // Every rank reports its optimizer state: the sharded ranks' shares add up to one full
    // copy, each near half of it.
    let states = |stderr: &[u8]| -> Vec<f64> {
        (text(stderr).lines())
            .filter_map(|line| {
                let rest = line.split("optimizer state ").nth(1)?;
                rest.split(' ').next()?.parse().ok()
            })
            .collect()
    };
    let (full, shares) = (states(&plain_out.stderr), states(&sharded_out.stderr));
    assert_eq!(full.len(), 2, "{}", text(&plain_out.stderr));
    assert_eq!(shares.len(), 2, "{}", text(&sharded_out.stderr));
    assert!(
        (shares.iter().sum::<f64>() - full[0]).abs() < 0.2,
        "{shares:?} vs {full:?}"
    );
    assert!(
        shares.iter().all(|&s| s < 0.6 * full[0]),
        "{shares:?} of {full:?}"
    );
}

#[test]
fn rank_0_alone_writes_checkpoints_metrics_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let out = train_two_ranks(&write_recipe(dir.path(), ""), &[]);
    let stdout = text(&out.stdout);
    // Rank 1's standard output is quiet: every report appears once.
    for step in [5, 10] {
        let saved = format!(
            "saved checkpoint {}",
            dir.path()
                .join(format!("checkpoints/run/step-{step}"))
                .display()
        );
        assert_eq!(stdout.matches(&saved).count(), 1, "{stdout}");
    }
    assert_eq!(
        stdout.matches("trained steps 1..=10").count(),
        1,
        "{stdout}"
    );
    // One TensorBoard writer (its file name carries the writer's pid), one line per metric.
    let run = dir.path().join("runs/run");
    let events: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents")
        })
        .collect();
    assert_eq!(events.len(), 1, "event files in {}", run.display());
    assert_eq!(step_metrics(dir.path()).len(), 20);
    // The checkpoints, and nothing half-written beside them.
    let mut entries: Vec<String> = std::fs::read_dir(dir.path().join("checkpoints/run"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, ["latest", "step-10", "step-5"]);
    let state: serde_json::Value =
        serde_json::from_slice(&checkpoint_file(dir.path(), 10, "trainer_state.json")).unwrap();
    assert_eq!(state["world_size"], 2);
}

/// The pid of rank `rank` of the job whose command line names `marker`.
fn rank_pid(marker: &str, rank: usize) -> Option<u32> {
    let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !text(&cmdline).contains(marker) || !text(&cmdline).contains("train") {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if environ
            .split(|&b| b == 0)
            .any(|var| var == wanted.as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

/// Waits until `out`'s run has a checkpoint of step `step` or later.
fn wait_for_checkpoint(out: &Path, step: u64, job: &mut Child) {
    let latest = out.join("checkpoints/run/latest");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let at = std::fs::read_to_string(&latest)
            .ok()
            .and_then(|s| s.trim().strip_prefix("step-")?.parse::<u64>().ok());
        if at.is_some_and(|at| at >= step) {
            return;
        }
        assert!(
            job.try_wait().unwrap().is_none(),
            "the job ended before its checkpoint of step {step}"
        );
        assert!(Instant::now() < deadline, "no checkpoint of step {step}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits at most `limit` for `job` to end; its exit status and standard error.
fn wait_with_limit(mut job: Child, limit: Duration) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = job.try_wait().unwrap() {
            let mut stderr = String::new();
            use std::io::Read;
            job.stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            return (status, stderr);
        }
        if Instant::now() > deadline {
            job.kill().unwrap();
            panic!("the job did not stop within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn_job(recipe: &Path, extra: &[&str]) -> Child {
    let mut args = vec!["train", recipe.to_str().unwrap(), "--quiet"];
    args.extend(extra);
    mpirun(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun runs")
}

#[test]
fn a_killed_rank_stops_the_job_and_resume_ends_where_an_uninterrupted_run_ends() {
    let longer = ["--set", "steps=24", "--set", "checkpoint.every=4"];
    let zero1 = "distributed: {shard_optimizer: true}\n";
    let whole = tempfile::tempdir().unwrap();
    train_two_ranks(&write_recipe(whole.path(), zero1), &longer);

    let killed = tempfile::tempdir().unwrap();
    let recipe = write_recipe(killed.path(), zero1);
    let mut job = spawn_job(&recipe, &longer);
    wait_for_checkpoint(killed.path(), 8, &mut job);
    let marker = recipe.to_str().unwrap();
    let pid = rank_pid(marker, 1).expect("rank 1 is running");
    let started = Instant::now();
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let (status, stderr) = wait_with_limit(job, Duration::from_secs(60));
    assert!(!status.success(), "the job went on without rank 1");
    assert!(
        stderr.contains("rank 1"),
        "the launcher names the dead rank: {stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    let latest = std::fs::read_to_string(killed.path().join("checkpoints/run/latest")).unwrap();
    assert_ne!(
        latest.trim(),
        "step-24",
        "the job was killed before its end"
    );

    // The same two ranks continue from the last complete checkpoint to the same weights.
    train_two_ranks(&recipe, &[&longer[..], &["--resume", "latest"]].concat());
    let what = "after kill -9 and resume, against the uninterrupted run";
    assert_same_checkpoint(whole.path(), killed.path(), 24, what);
}

#[test]
fn a_hung_rank_is_named_and_the_job_stops_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), "distributed: {timeout_secs: 5}\n");
    let mut job = spawn_job(&recipe, &["--set", "steps=400"]);
    wait_for_checkpoint(dir.path(), 5, &mut job);
    let pid = rank_pid(recipe.to_str().unwrap(), 1).expect("rank 1 is running");
    Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    let (status, stderr) = wait_with_limit(job, Duration::from_secs(60));
    // A stopped process is still killed by the launcher's SIGKILL; make sure none is left.
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    assert!(!status.success());
    assert!(
        stderr.contains("rank(s) 1 did not reach step") && stderr.contains("within 5 s"),
        "{stderr}"
    );
}

/// Starts a long two-rank job, sends the launcher `signal` once training is under way, and
/// checks that every rank stopped after the same step with a checkpoint of it.
fn stop_launcher_with(signal: &str, mpirun_options: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), "");
    let mut command = Command::new("mpirun");
    command
        .args(["--allow-run-as-root", "--oversubscribe"])
        .args(mpirun_options)
        .args(["-np", "2", env!("CARGO_BIN_EXE_kiln"), "train"])
        .arg(&recipe)
        .args(["--quiet", "--threads", "1", "--set", "steps=400"])
        .args(["--set", "checkpoint.every=1000"]);
    let mut job = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Training is under way once the run has logged a step.
    let metrics = dir.path().join("runs/run/metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::metadata(&metrics).map_or(0, |m| m.len()) == 0 {
        assert!(job.try_wait().unwrap().is_none(), "the job ended early");
        assert!(Instant::now() < deadline, "no step within 2 minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill")
        .args([&format!("-{signal}"), &job.id().to_string()])
        .status()
        .unwrap();
    let stdout = job.stdout.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap());
    let (_, stderr) = wait_with_limit(job, Duration::from_secs(120));
    let stdout = reader.join().unwrap();
    let stopped = (stdout.lines())
        .find_map(|l| {
            l.strip_prefix("stopped at step ")?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or_else(|| panic!("SIG{signal}: no stop report:\n{stdout}\n{stderr}"));
    assert!(stopped < 400);
    let latest = std::fs::read_to_string(dir.path().join("checkpoints/run/latest")).unwrap();
    assert_eq!(
        latest.trim(),
        format!("step-{stopped}"),
        "a checkpoint of the last step"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&checkpoint_file(dir.path(), stopped, "trainer_state.json"))
            .unwrap();
    assert_eq!(state["step"], stopped);
    assert_eq!(state["world_size"], 2);
}

#[test]
fn ctrl_c_on_the_launcher_stops_every_rank_after_a_checkpoint() {
    // On SIGINT Open MPI's launcher sends the ranks SIGTERM after `odls_base_sigkill_timeout`
    // seconds and SIGKILL as long again later (default 1): the window a step and its checkpoint
    // must fit in. Five seconds here, for a busy machine.
    stop_launcher_with("INT", &["--mca", "odls_base_sigkill_timeout", "5"]);
}

#[test]
fn sigusr1_on_the_launcher_stops_every_rank_after_a_checkpoint_without_a_deadline() {
    // Forwarded to every rank as it is, with no SIGKILL behind it.
    stop_launcher_with("USR1", &[]);
}

#[test]
fn bad_jobs_fail_on_every_rank_before_any_step() {
    let dir = tempfile::tempdir().unwrap();
    // Three replicas cannot be shared by two ranks.
    let recipe = write_recipe(dir.path(), "");
    let out = output(mpirun(&[
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--set",
        "batch.replicas=3",
        "--set",
        "batch.global=6",
        "--set",
        "batch.micro=1",
    ]));
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    // Every rank finds it (the launcher may end one before it has printed its own).
    assert!(
        stderr.contains("batch.replicas (3) must be a multiple of the number of ranks (2)"),
        "{stderr}"
    );
    assert!(!dir.path().join("checkpoints/run").exists(), "no step ran");

    // Two ranks started on different recipes (here: another learning rate).
    let other = tempfile::tempdir().unwrap();
    let recipe_b = write_recipe(other.path(), "");
    let yaml = std::fs::read_to_string(&recipe_b)
        .unwrap()
        .replace("lr: 2.0e-3", "lr: 3.0e-3")
        .replace(
            &other.path().display().to_string(),
            &dir.path().display().to_string(),
        );
    std::fs::write(&recipe_b, yaml).unwrap();
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let out = output({
        let mut c = Command::new("mpirun");
        c.args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            "1",
            kiln,
            "train",
        ])
        .arg(&recipe)
        .args(["--quiet", "--threads", "1", ":", "-np", "1", kiln, "train"])
        .arg(&recipe_b)
        .args(["--quiet", "--threads", "1"]);
        c
    });
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("the resolved recipe of rank(s) 1 differs from rank 0's"),
        "{stderr}"
    );
    assert!(!dir.path().join("checkpoints/run").exists(), "no step ran");
}

/// DPO over two ranks, with each of its references (log-probabilities precomputed by the ranks
/// together and kept by rank 0, a frozen copy, the adapter off): pairs are never split, and the
/// job trains exactly what one process with two replicas trains.
#[test]
fn dpo_over_two_ranks_trains_what_one_process_trains() {
    let pairs = common::repo_root().join("datasets/preference/train.jsonl");
    let mnli = format!(
        "[{{source: {{path: {}}}, template: mnli, limit: 400}}]",
        bundled("train.jsonl")
    );
    let preference = format!(
        "[{{source: {{path: {}}}, template: preference, limit: 64}}]",
        pairs.display()
    );
    let recipe = |out: &Path, extra: &str| {
        let path = write_recipe(out, extra);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace(&mnli, &preference)
            .replace("  loss_on: target\n", "")
            .replace("steps: 10", "steps: 6")
            .replace("every: 5", "every: 3");
        std::fs::write(&path, text).unwrap();
        path
    };
    for (reference, extra) in [
        (
            "precomputed",
            "objective: {kind: dpo, beta: 0.1, precompute_ref_log_probs: true}\n",
        ),
        ("a frozen copy", "objective: {kind: dpo, beta: 0.1}\n"),
        (
            "the adapter off",
            "objective: {kind: dpo, beta: 0.1}\nlora: {r: 4, alpha: 8, dropout: 0.1}\n",
        ),
    ] {
        let one = tempfile::tempdir().unwrap();
        train_one_process(&recipe(one.path(), extra));
        let two = tempfile::tempdir().unwrap();
        let out = train_two_ranks(&recipe(two.path(), extra), &[]);
        if reference == "precomputed" {
            assert!(
                text(&out.stdout).contains("reference log-probabilities of 64 train"),
                "{}",
                text(&out.stdout)
            );
        }
        let (a, b) = (step_metrics(one.path()), step_metrics(two.path()));
        assert_eq!(a.len(), 12, "{a:?}");
        assert_eq!(a, b, "{reference}: per-step DPO loss and gradient norm");
        let files: &[&str] = match reference {
            "the adapter off" => &["adapter_model.safetensors", "optimizer.safetensors"],
            _ => &["model.safetensors", "optimizer.safetensors"],
        };
        for file in files {
            assert!(
                checkpoint_file(one.path(), 6, file) == checkpoint_file(two.path(), 6, file),
                "{reference}: {file} of step 6 differs"
            );
        }
    }
}
