//! `eval.task: classify` and `eval.task: perplexity`, from recipes and from `kiln eval`: report
//! arithmetic, agreement with MNLI's rank mode and with training's `eval/loss`, answers absent
//! from the rows, per-group accuracy, and bad input.

mod common;

use std::path::{Path, PathBuf};

use common::{bundled, kiln, write_recipe};
use serde_json::Value;

fn run_ok(args: &[&str]) -> String {
    let (ok, stdout, stderr) = kiln(args);
    assert!(ok, "kiln {args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

fn run_err(args: &[&str]) -> String {
    let (ok, stdout, stderr) = kiln(args);
    assert!(!ok, "kiln {args:?} should have failed:\n{stdout}");
    stderr
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn sentiment(file: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("datasets/sentiment")
        .join(file);
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn confusion(report: &Value) -> Vec<Vec<u64>> {
    serde_json::from_value(report["confusion"].clone()).unwrap()
}

fn metric(run: &Path, tag: &str) -> Vec<(u64, f64)> {
    kiln::track::read_metrics(&run.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.tag == tag)
        .map(|r| (r.step, r.value))
        .collect()
}

/// A tiny GPT-J with the bundled tokenizer, untrained.
fn init_model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    run_ok(&[
        "init",
        "--preset",
        "tiny",
        "--vocab-size",
        "1024",
        "--seed",
        "5",
        "--tokenizer",
        &bundled("tokenizer"),
        "--out",
        model.to_str().unwrap(),
    ]);
    model
}

/// Report arithmetic: the matrix holds every row once, accuracy is its diagonal over n, and each
/// label's precision / recall / F1 follow from its column and row.
fn check_report_arithmetic(report: &Value) {
    let m = confusion(report);
    let labels: Vec<String> = serde_json::from_value(report["labels"].clone()).unwrap();
    let n = report["n"].as_u64().unwrap();
    assert_eq!(m.len(), labels.len());
    assert!(m.iter().all(|row| row.len() == labels.len()), "{m:?}");
    assert_eq!(m.iter().flatten().sum::<u64>(), n);
    let diagonal: u64 = (0..labels.len()).map(|i| m[i][i]).sum();
    assert_eq!(report["correct"].as_u64().unwrap(), diagonal);
    let accuracy = report["accuracy"].as_f64().unwrap();
    assert!((accuracy - diagonal as f64 / n as f64).abs() < 1e-12);
    for (i, label) in labels.iter().enumerate() {
        let predicted: u64 = m.iter().map(|row| row[i]).sum();
        let support: u64 = m[i].iter().sum();
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let (p, r) = (ratio(m[i][i], predicted), ratio(m[i][i], support));
        let f1 = if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        };
        let got = &report["per_label"][label];
        assert_eq!(got["support"].as_u64().unwrap(), support, "{label}");
        for (key, want) in [("precision", p), ("recall", r), ("f1", f1)] {
            let value = got[key].as_f64().unwrap();
            assert!(
                (value - want).abs() < 1e-12,
                "{label} {key}: {value} vs {want}"
            );
        }
    }
}

/// On MNLI data the mnli template ranked by `classify` is MNLI's rank mode: same labels in the
/// same order, same confusion matrix. Also: the report's arithmetic, per-group accuracy (grouped
/// by the gold label, each group's accuracy is that label's recall), the picture, and a
/// prompt-completion set whose classes are its distinct completions.
#[test]
fn classify_with_the_mnli_template_equals_mnli_rank_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let model = init_model(tmp.path());
    let model = model.to_str().unwrap();
    let data = bundled("validation.jsonl");
    let mnli_dir = tmp.path().join("mnli");
    let classify_dir = tmp.path().join("classify");
    let with = |extra: &[&str]| -> Vec<String> {
        let common = ["eval", "--model", model, "--data", &data, "--limit", "60"];
        let mut args: Vec<String> = common.iter().map(|s| s.to_string()).collect();
        args.extend(["--batch-size", "7"].iter().map(|s| s.to_string()));
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let mnli_args = with(&[
        "--task",
        "mnli",
        "--mode",
        "rank",
        "--report",
        mnli_dir.to_str().unwrap(),
    ]);
    run_ok(&mnli_args.iter().map(String::as_str).collect::<Vec<_>>());
    let classify_args = with(&[
        "--task",
        "classify",
        "--template",
        "mnli",
        "--group-by",
        "label",
        "--report",
        classify_dir.to_str().unwrap(),
    ]);
    let out = run_ok(&classify_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.contains("classify") && out.contains("accuracy"),
        "{out}"
    );
    let mnli = read_json(&mnli_dir.join("report.json"));
    let classify = read_json(&classify_dir.join("report.json"));
    assert_eq!(classify["task"], "classify");
    assert_eq!(classify["mode"], "rank");
    assert_eq!(classify["n"], 60);
    assert_eq!(
        classify["labels"],
        serde_json::json!(["entailment", "neutral", "contradiction"])
    );
    let mnli_matrix = confusion(&mnli);
    assert!(
        mnli_matrix.iter().all(|row| row[3] == 0),
        "rank mode is never badly formed"
    );
    let mnli_3: Vec<Vec<u64>> = mnli_matrix.iter().map(|r| r[..3].to_vec()).collect();
    assert_eq!(confusion(&classify), mnli_3);
    assert_eq!(classify["accuracy"], mnli["accuracy"]);
    assert_eq!(classify["correct"], mnli["correct"]);
    assert_eq!(classify["model_sha256"], mnli["model_sha256"]);
    assert!(classify.get("per_genre").is_none(), "per_genre is MNLI's");
    check_report_arithmetic(&classify);
    // Grouped by the gold label, a group's accuracy is that label's recall.
    assert_eq!(classify["group_by"], "label");
    for (value, label) in ["entailment", "neutral", "contradiction"]
        .iter()
        .enumerate()
    {
        let group = &classify["per_group"][value.to_string()];
        let metrics = &classify["per_label"][label];
        assert_eq!(group["n"], metrics["support"], "{label}");
        let (a, r) = (group["accuracy"].as_f64(), metrics["recall"].as_f64());
        assert!((a.unwrap() - r.unwrap()).abs() < 1e-12, "{label}");
    }
    let md = std::fs::read_to_string(classify_dir.join("report.md")).unwrap();
    assert!(
        md.contains("| neutral |") && md.contains("Per label"),
        "{md}"
    );
    let svg = std::fs::read_to_string(classify_dir.join("confusion.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(
        svg.matches("<rect").count(),
        1 + 9,
        "background + 3x3 cells"
    );

    // Prompt-completion with a fixed set of completions: the classes are the completions.
    let rows: Vec<Value> = (0..9)
        .map(|i| {
            let completion = [" yes", " no", " maybe"][i % 3];
            serde_json::json!({"prompt": format!("Question {i}: is it so? Answer:"), "completion": completion})
        })
        .collect();
    let file = tmp.path().join("yes-no.jsonl");
    write_jsonl(&file, &rows);
    let report_dir = tmp.path().join("yes-no");
    run_ok(&[
        "eval",
        "--model",
        model,
        "--task",
        "classify",
        "--template",
        "prompt-completion",
        "--data",
        file.to_str().unwrap(),
        "--report",
        report_dir.to_str().unwrap(),
    ]);
    let report = read_json(&report_dir.join("report.json"));
    assert_eq!(report["labels"], serde_json::json!(["yes", "no", "maybe"]));
    assert_eq!(report["per_label"]["maybe"]["support"], 3);
    check_report_arithmetic(&report);
}

/// A model trained to always answer "positive", evaluated on rows that are all "negative":
/// "positive" is in no eval row, yet it is an answer and wins. Perplexity from the recipe
/// (in training and from `kiln eval`) is exp of the `eval/loss` training logs; perplexity of
/// plain text equals the one computed by hand from `kiln score`'s log-probabilities.
#[test]
fn absent_labels_compete_and_perplexity_is_the_eval_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let positive: Vec<Value> = sentiment("train.jsonl")
        .into_iter()
        .filter(|r| r["label"] == 1)
        .collect();
    write_jsonl(&dir.join("train.jsonl"), &positive);
    let negative: Vec<Value> = sentiment("validation.jsonl")
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            r["label"] = 0.into();
            // The last row has no shop: it is left out of per-group accuracy.
            r["shop"] = match i {
                7 => Value::Null,
                i => ["north", "south"][i % 2].into(),
            };
            r
        })
        .collect();
    write_jsonl(&dir.join("eval.jsonl"), &negative);
    let recipe = dir.join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            "name: run\nseed: 0\n\
             model: {{init: {{preset: tiny, seed: 0, vocab_size: 1024}}}}\n\
             tokenizer: {tokenizer}\n\
             data:\n  \
               train: [{{source: {{path: train.jsonl}}, template: sentiment}}]\n  \
               eval: [{{source: {{path: eval.jsonl}}, template: sentiment}}]\n  \
               seq_len: 64\n  mode: pad\n  loss_on: target\n\
             optimizer: {{lr: 3.0e-3}}\n\
             batch: {{global: 8, micro: 8}}\n\
             steps: 24\n\
             eval: {{task: perplexity, every: 12, batch_size: 3}}\n\
             checkpoint: {{dir: {checkpoints}}}\n\
             tracking: {{log_dir: {logs}}}\n",
            tokenizer = bundled("tokenizer"),
            checkpoints = dir.join("checkpoints").display(),
            logs = dir.join("runs").display(),
        ),
    )
    .unwrap();
    let out = run_ok(&["train", recipe.to_str().unwrap(), "--quiet"]);
    assert!(out.contains("perplexity"), "{out}");
    let run = dir.join("runs/run");
    let losses = metric(&run, "eval/loss");
    let perplexities = metric(&run, "eval/perplexity");
    assert_eq!(
        perplexities.iter().map(|p| p.0).collect::<Vec<_>>(),
        [12, 24]
    );
    for ((step, loss), (_, perplexity)) in losses.iter().zip(&perplexities) {
        assert!(
            (perplexity - loss.exp()).abs() <= 1e-12 * perplexity,
            "step {step}: {perplexity} vs exp({loss})"
        );
    }
    let loss = losses.last().unwrap().1;
    let in_training = read_json(&run.join("eval/step-24/report.json"));
    assert_eq!(in_training["task"], "perplexity");
    assert_eq!(in_training["n"], 8);
    assert_eq!(in_training["loss_on"], "target");
    assert_eq!(in_training["loss"].as_f64().unwrap(), loss);
    assert_eq!(in_training["model_sha256"].as_str().unwrap().len(), 64);

    // `kiln eval` on the final checkpoint, through the recipe: the same figure.
    let checkpoint = dir.join("checkpoints/run/step-24");
    let checkpoint = checkpoint.to_str().unwrap();
    let ppl_dir = dir.join("ppl");
    run_ok(&[
        "eval",
        "--model",
        checkpoint,
        "--task",
        "perplexity",
        "--recipe",
        recipe.to_str().unwrap(),
        "--batch-size",
        "5",
        "--report",
        ppl_dir.to_str().unwrap(),
    ]);
    let report = read_json(&ppl_dir.join("report.json"));
    let perplexity = report["perplexity"].as_f64().unwrap();
    assert!(
        (perplexity - loss.exp()).abs() <= 1e-5 * perplexity,
        "{perplexity} vs exp({loss})"
    );
    assert_eq!(report["target_tokens"], in_training["target_tokens"]);
    assert_eq!(report["model_sha256"], in_training["model_sha256"]);

    // Every eval row is negative, and the model learnt to say positive.
    let classify_dir = dir.join("classify");
    run_ok(&[
        "eval",
        "--model",
        checkpoint,
        "--task",
        "classify",
        "--recipe",
        recipe.to_str().unwrap(),
        "--group-by",
        "shop",
        "--report",
        classify_dir.to_str().unwrap(),
    ]);
    let report = read_json(&classify_dir.join("report.json"));
    assert_eq!(
        report["labels"],
        serde_json::json!(["negative", "positive"])
    );
    let m = confusion(&report);
    assert_eq!(m[1], [0, 0], "no row is positive");
    assert!(m[0][1] > 0, "the absent label was never predicted: {m:?}");
    assert_eq!(report["per_label"]["positive"]["support"], 0);
    check_report_arithmetic(&report);
    let groups = &report["per_group"];
    assert_eq!(report["group_by"], "shop");
    assert_eq!(groups["north"]["n"], 4);
    assert_eq!(
        groups["south"]["n"], 3,
        "the row without a shop is left out"
    );
    let grouped_correct: f64 = ["north", "south"]
        .iter()
        .map(|g| groups[g]["n"].as_f64().unwrap() * groups[g]["accuracy"].as_f64().unwrap())
        .sum();
    let correct = report["correct"].as_f64().unwrap();
    assert!(grouped_correct <= correct + 1e-9 && grouped_correct >= correct - 1.0 - 1e-9);

    // Plain text: every token but each row's first is scored, so the perplexity is the one
    // `kiln score`'s log-probabilities give for the same text (eos included).
    let text_dir = dir.join("text");
    run_ok(&[
        "eval",
        "--model",
        checkpoint,
        "--task",
        "perplexity",
        "--template",
        "text",
        "--data",
        dir.join("eval.jsonl").to_str().unwrap(),
        "--report",
        text_dir.to_str().unwrap(),
    ]);
    let report = read_json(&text_dir.join("report.json"));
    let inputs: Vec<Value> = negative
        .iter()
        .map(|r| serde_json::json!({"text": format!("{}<|endoftext|>", r["text"].as_str().unwrap())}))
        .collect();
    write_jsonl(&dir.join("score-in.jsonl"), &inputs);
    let scored_path = dir.join("score-out.jsonl");
    run_ok(&[
        "score",
        "--model",
        checkpoint,
        "--input",
        dir.join("score-in.jsonl").to_str().unwrap(),
        "--output",
        scored_path.to_str().unwrap(),
    ]);
    let (mut total, mut tokens) = (0f64, 0u64);
    for line in std::fs::read_to_string(&scored_path).unwrap().lines() {
        let row: Value = serde_json::from_str(line).unwrap();
        for logprob in row["logprobs"].as_array().unwrap().iter().skip(1) {
            total += logprob.as_f64().unwrap();
            tokens += 1;
        }
    }
    assert_eq!(report["target_tokens"].as_u64().unwrap(), tokens);
    let by_hand = (-total / tokens as f64).exp();
    let perplexity = report["perplexity"].as_f64().unwrap();
    assert!(
        (perplexity - by_hand).abs() <= 1e-5 * by_hand,
        "{perplexity} vs {by_hand} from kiln score"
    );
}

/// `eval.task: classify` in training logs `eval/accuracy`, writes the report for each eval step
/// (per genre via `eval.group_by`), and agrees with `kiln eval --recipe` on the checkpoint.
#[test]
fn classify_is_evaluated_during_training() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = write_recipe(
        tmp.path(),
        "eval: {every: 2, task: classify, group_by: genre, batch_size: 16}\n",
    );
    let out = run_ok(&[
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--set",
        "steps=4",
        "--set",
        "checkpoint.every=0",
    ]);
    assert!(
        out.contains("eval accuracy") && out.contains("rank mode"),
        "{out}"
    );
    let run = tmp.path().join("runs/run");
    let accuracy = metric(&run, "eval/accuracy");
    assert_eq!(accuracy.iter().map(|a| a.0).collect::<Vec<_>>(), [2, 4]);
    assert_eq!(metric(&run, "eval/loss").len(), 2);
    let report = read_json(&run.join("eval/step-4/report.json"));
    assert_eq!(report["task"], "classify");
    assert_eq!(report["n"], 40);
    assert_eq!(report["accuracy"].as_f64().unwrap(), accuracy[1].1);
    assert_eq!(report["group_by"], "genre");
    let grouped: u64 = report["per_group"]
        .as_object()
        .unwrap()
        .values()
        .map(|g| g["n"].as_u64().unwrap())
        .sum();
    assert_eq!(grouped, 40);
    check_report_arithmetic(&report);
    for file in ["report.md", "confusion.svg"] {
        assert!(run.join("eval/step-4").join(file).is_file(), "{file}");
    }
    let again_dir = tmp.path().join("again");
    run_ok(&[
        "eval",
        "--model",
        tmp.path().join("checkpoints/run/step-4").to_str().unwrap(),
        "--task",
        "classify",
        "--recipe",
        recipe.to_str().unwrap(),
        "--report",
        again_dir.to_str().unwrap(),
    ]);
    let again = read_json(&again_dir.join("report.json"));
    assert_eq!(again["confusion"], report["confusion"]);
    assert_eq!(again["per_group"], report["per_group"]);
    assert_eq!(again["model_sha256"], report["model_sha256"]);
    assert_eq!(again["split"], report["split"]);
}

/// What cannot be classified or measured is refused, naming the file, the field or option, and
/// what was expected.
#[test]
fn bad_input_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = init_model(tmp.path());
    let model = model.to_str().unwrap();
    let report = tmp.path().join("report");
    let report = report.to_str().unwrap();
    let sentiment_data = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("datasets/sentiment/validation.jsonl")
        .display()
        .to_string();
    let classify = |extra: &[&str]| {
        let mut args = vec![
            "eval", "--model", model, "--task", "classify", "--report", report,
        ];
        args.extend_from_slice(extra);
        run_err(&args)
    };

    let e = classify(&[
        "--data",
        &sentiment_data,
        "--template",
        "sentiment",
        "--group-by",
        "shop",
    ]);
    assert!(
        e.contains("validation.jsonl") && e.contains("--group-by") && e.contains("\"shop\""),
        "{e}"
    );
    assert!(
        e.contains("columns: label, text") || e.contains("columns: text, label"),
        "{e}"
    );

    let e = classify(&["--data", &sentiment_data, "--template", "text"]);
    assert!(
        e.contains("validation.jsonl") && e.contains("prompt is empty") && e.contains("perplexity"),
        "{e}"
    );

    let e = classify(&["--data", &sentiment_data]);
    assert!(
        e.contains("--task classify --data needs --template (a preset: mnli, "),
        "{e}"
    );

    let e = classify(&[
        "--data",
        &sentiment_data,
        "--template",
        "sentiment",
        "--mode",
        "generate",
    ]);
    assert!(
        e.contains(
            "--mode generate does not apply to --task classify: classify ranks the answers by \
             likelihood"
        ),
        "{e}"
    );

    let e = classify(&["--data", &sentiment_data, "--template", "sentimental"]);
    assert!(
        e.contains("--template: unknown preset \"sentimental\""),
        "{e}"
    );

    // Free-form completions are generation, not classes.
    let rows: Vec<Value> = (0..101)
        .map(|i| serde_json::json!({"prompt": format!("Count: {i}\nNext:"), "completion": format!(" {}", i + 1)}))
        .collect();
    let file = tmp.path().join("free.jsonl");
    write_jsonl(&file, &rows);
    let e = classify(&[
        "--data",
        file.to_str().unwrap(),
        "--template",
        "prompt-completion",
    ]);
    assert!(
        e.contains("free.jsonl")
            && e.contains("101 distinct targets among 101 rows, more than 100"),
        "{e}"
    );

    // One completion for every row: nothing to choose between.
    let rows: Vec<Value> = (0..4)
        .map(|i| serde_json::json!({"prompt": format!("Q{i}:"), "completion": " ok"}))
        .collect();
    let file = tmp.path().join("one.jsonl");
    write_jsonl(&file, &rows);
    let e = classify(&[
        "--data",
        file.to_str().unwrap(),
        "--template",
        "prompt-completion",
    ]);
    assert!(e.contains("one.jsonl") && e.contains("1 answer(s)"), "{e}");

    // Recipes: the keys are named at `recipe check`, the data problems before step 1.
    let recipe = write_recipe(tmp.path(), "");
    let recipe = recipe.to_str().unwrap();
    let e = run_err(&[
        "recipe",
        "check",
        recipe,
        "--set",
        "data.eval=[]",
        "--set",
        "eval.task=perplexity",
    ]);
    assert!(
        e.contains("eval.task: perplexity needs an eval dataset under data.eval"),
        "{e}"
    );
    let e = run_err(&["recipe", "check", recipe, "--set", "eval.group_by=genre"]);
    assert!(
        e.contains("eval.group_by: only applies to eval.task: classify"),
        "{e}"
    );
    let e = run_err(&[
        "train",
        recipe,
        "--quiet",
        "--set",
        "eval.task=classify",
        "--set",
        "eval.group_by=shop",
    ]);
    assert!(
        e.contains("eval.task: classify")
            && e.contains("data.eval[0]")
            && e.contains("eval.group_by")
            && e.contains("\"shop\"")
            && e.contains("validation.jsonl"),
        "{e}"
    );
    assert!(
        !tmp.path().join("checkpoints/run").exists(),
        "refused before training"
    );
}
