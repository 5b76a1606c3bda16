//! `kiln bench`: the latency table (markdown and JSON) on the tiny fixture model, its skipped
//! shapes, and the errors for bad flags.

mod common;

use common::{fixtures, kiln};
use serde_json::Value;

fn model_dir() -> String {
    fixtures().join("generate").display().to_string()
}

/// The table's data rows, each split into its cells (the header and the alignment row dropped).
fn table_rows(markdown: &str) -> Vec<Vec<String>> {
    let lines: Vec<&str> = markdown.lines().filter(|l| l.starts_with('|')).collect();
    assert_eq!(
        lines[0],
        "| batch | input tokens | output tokens | TTFT (ms) | per token (ms) | total (ms) | tokens/s |"
    );
    assert_eq!(lines[1], "|---:|---:|---:|---:|---:|---:|---:|");
    lines[2..]
        .iter()
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

fn close(a: f64, b: f64, tolerance: f64) -> bool {
    (a - b).abs() <= tolerance
}

/// Decimal places a table cell was printed with, so a check allows for exactly that rounding.
fn half_unit(cell: &str) -> f64 {
    let decimals = cell.split_once('.').map_or(0, |(_, d)| d.len());
    0.5 * 10f64.powi(-(decimals as i32))
}

#[test]
fn table_over_the_shape_grid_in_markdown_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let markdown_path = dir.path().join("bench.md");
    // Context 64: 40 + 30 does not fit (skipped); every other pairing does.
    let (ok, stdout, stderr) = kiln(&[
        "bench",
        "--model",
        &model_dir(),
        "--input-lengths",
        "40,8",
        "--output-lengths",
        "4,30",
        "--batch-sizes",
        "2,1",
        "--repeats",
        "3",
        "--warmup",
        "--threads",
        "1",
        "--json",
        json_path.to_str().unwrap(),
        "--markdown",
        markdown_path.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(std::fs::read_to_string(&markdown_path).unwrap(), stdout);
    assert!(stdout.starts_with("`kiln bench`: "), "{stdout}");
    assert!(
        stdout.contains("median of 3 runs after a warmup"),
        "{stdout}"
    );

    let rows = table_rows(&stdout);
    let shapes: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r[0].clone(), r[1].clone(), r[2].clone()))
        .collect();
    let expected: Vec<(String, String, String)> = [
        (1, 8, 4),
        (1, 8, 30),
        (1, 40, 4),
        (1, 40, 30),
        (2, 8, 4),
        (2, 8, 30),
        (2, 40, 4),
        (2, 40, 30),
    ]
    .iter()
    .map(|(b, i, o)| (b.to_string(), i.to_string(), o.to_string()))
    .collect();
    assert_eq!(shapes, expected, "rows are sorted batch, input, output");

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(report["kiln_version"], env!("CARGO_PKG_VERSION"));
    assert!(report["date"].as_str().unwrap().starts_with("20"));
    assert!(!report["machine"]["cpu"].as_str().unwrap().is_empty());
    assert!(report["machine"]["cores"].as_u64().unwrap() >= 1);
    assert_eq!(report["machine"]["threads"], 1);
    assert_eq!(report["model"]["name"], model_dir());
    assert_eq!(report["model"]["model_type"], "gptj");
    assert_eq!(report["model"]["n_layer"], 2);
    assert_eq!(report["model"]["hidden_size"], 64);
    assert_eq!(report["model"]["vocab_size"], 101);
    assert_eq!(report["model"]["context"], 64);
    assert!(report["model"]["parameters"].as_u64().unwrap() > 0);
    assert_eq!(report["dtype"], "f32");
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["repeats"], 3);
    assert_eq!(report["warmup"], true);

    let json_rows = report["rows"].as_array().unwrap();
    assert_eq!(json_rows.len(), rows.len());
    for (cells, row) in rows.iter().zip(json_rows) {
        let batch = row["batch_size"].as_u64().unwrap() as f64;
        let input = row["input_tokens"].as_u64().unwrap();
        let output = row["output_tokens"].as_u64().unwrap();
        assert_eq!(cells[0], row["batch_size"].to_string());
        assert_eq!(cells[1], input.to_string());
        assert_eq!(cells[2], output.to_string());
        if input + output > 64 {
            let reason = row["skipped"].as_str().unwrap();
            assert_eq!(reason, "40 + 30 tokens exceed the context (64)");
            assert_eq!(cells[3], format!("skipped: {reason}"));
            assert_eq!(&cells[4..], ["–", "–", "–"]);
            assert!(row["ttft_ms"].is_null() && row["tokens_per_s"].is_null());
            continue;
        }
        assert!(row["skipped"].is_null());
        let ttft = row["ttft_ms"].as_f64().unwrap();
        let per_token = row["per_token_ms"].as_f64().unwrap();
        let total = row["total_ms"].as_f64().unwrap();
        let tokens_per_s = row["tokens_per_s"].as_f64().unwrap();
        assert!(ttft > 0.0 && per_token > 0.0 && total > ttft && tokens_per_s > 0.0);
        let runs = |key: &str| -> Vec<f64> {
            let mut runs: Vec<f64> = row[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(runs.len(), 3, "{key}");
            runs.sort_by(f64::total_cmp);
            runs
        };
        assert_eq!(runs("ttft_ms_runs")[1], ttft, "TTFT is the median run");
        assert_eq!(runs("total_ms_runs")[1], total, "total is the median run");
        assert!(close(
            total,
            ttft + (output - 1) as f64 * per_token,
            1e-9 * total
        ));
        assert!(close(
            tokens_per_s,
            batch * output as f64 / (total / 1e3),
            1e-9 * tokens_per_s
        ));
        // The table prints the same numbers, rounded.
        let cell = |i: usize| -> f64 { cells[i].parse().unwrap() };
        for (i, value) in [(3, ttft), (4, per_token), (5, total), (6, tokens_per_s)] {
            assert!(cell(i) > 0.0, "{cells:?}");
            assert!(close(cell(i), value, half_unit(&cells[i])), "{cells:?}");
        }
        let rounding = half_unit(&cells[3]) + (output - 1) as f64 * half_unit(&cells[4]);
        assert!(
            close(
                cell(5),
                cell(3) + (output - 1) as f64 * cell(4),
                rounding + half_unit(&cells[5])
            ),
            "{cells:?}"
        );
    }
}

#[test]
fn preset_model_and_single_token_outputs() {
    let (ok, stdout, stderr) = kiln(&[
        "bench",
        "--preset",
        "tiny",
        "--input-lengths",
        "4",
        "--output-lengths",
        "1,2",
        "--batch-sizes",
        "1",
        "--repeats",
        "1",
        "--threads",
        "1",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.starts_with("`kiln bench`: preset tiny (gptj, 2 layers, d 128"));
    assert!(stdout.contains("median of 1 run."), "{stdout}");
    let rows = table_rows(&stdout);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0][4], "–", "one token has no per-token latency");
    assert!(rows[0][3].parse::<f64>().unwrap() > 0.0);
    assert!(rows[1][4].parse::<f64>().unwrap() > 0.0);
}

/// Runs `kiln bench` on the fixture with `extra` flags, expecting an error that mentions each of
/// `needles`.
fn assert_rejected(extra: &[&str], needles: &[&str]) {
    let model = model_dir();
    let mut args = vec!["bench", "--model", &model];
    args.extend_from_slice(extra);
    let (ok, _, stderr) = kiln(&args);
    assert!(!ok, "{args:?} should fail");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{args:?}: {needle:?} not in {stderr}"
        );
    }
}

#[test]
fn malformed_lists_name_the_flag_and_the_expected_form() {
    let expected = "expected positive whole numbers separated by commas";
    for (flag, value, why) in [
        ("--input-lengths", "", "found an empty entry"),
        ("--input-lengths", "8,,16", "found an empty entry"),
        ("--output-lengths", "4,x", "\"x\" is not a whole number"),
        ("--output-lengths", "4,-4", "\"-4\" is not a whole number"),
        ("--batch-sizes", "0", "0 is not positive"),
        ("--batch-sizes", "1,2.5", "\"2.5\" is not a whole number"),
    ] {
        assert_rejected(&[flag, value], &[flag, expected, why]);
    }
    assert_rejected(&["--repeats", "0"], &["--repeats", "0 is not in 1.."]);
    assert_rejected(&["--threads", "0"], &["--threads", "0 is not in 1.."]);
}

#[test]
fn lengths_beyond_the_context_are_errors() {
    // The fixture's context is 64 positions.
    assert_rejected(
        &["--input-lengths", "8,64", "--output-lengths", "4"],
        &[
            "--input-lengths: 64 prompt tokens + 4 new tokens",
            "context of 64",
            "at most 60",
        ],
    );
    assert_rejected(
        &["--input-lengths", "8", "--output-lengths", "4,64"],
        &["--output-lengths: 64 new tokens", "at most 63"],
    );
    assert_rejected(
        &["--input-lengths", "40", "--output-lengths", "4,30"],
        &[
            "--output-lengths: 40 prompt tokens",
            "+ 30 new tokens",
            "at most 24",
        ],
    );
}

#[test]
fn bad_models_and_outputs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_model = dir.path().to_str().unwrap();
    let (ok, _, stderr) = kiln(&["bench", "--model", not_a_model]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "--model {not_a_model}: expected a Hugging Face model directory"
        )),
        "{stderr}"
    );
    let (ok, _, stderr) = kiln(&["bench"]);
    assert!(
        !ok && stderr.contains("the following required arguments were not provided")
            && stderr.contains("--model <MODEL>"),
        "{stderr}"
    );
    let (ok, _, stderr) = kiln(&["bench", "--model", &model_dir(), "--preset", "tiny"]);
    assert!(
        !ok && stderr
            .contains("the argument '--model <MODEL>' cannot be used with '--preset <PRESET>'"),
        "{stderr}"
    );
    let missing = dir.path().join("absent/bench.json");
    assert_rejected(
        &["--json", missing.to_str().unwrap()],
        &["--json", "expected a file in an existing directory"],
    );
    assert_rejected(
        &["--markdown", not_a_model],
        &["--markdown", "expected a file path, found a directory"],
    );
    assert_rejected(
        &["--dtype", "fp8"],
        &["--dtype", "expected fp32, fp16 or bf16"],
    );
}
