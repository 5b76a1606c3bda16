//! The MNLI evaluator: Graphcore's parsing rules, report arithmetic, bad rows, and `kiln eval`.

mod common;

use common::*;
use kiln::eval::mnli::{self, parse_completion, NliRow, Prediction};
use kiln::recipe::EvalMode;

#[test]
fn completions_are_read_as_graphcore_reads_them() {
    assert_eq!(parse_completion("neutral<|endoftext|>"), Some(1));
    assert_eq!(parse_completion(" entailment\nfoo"), Some(0));
    assert_eq!(
        parse_completion(" contradiction <|endoftext|><|endoftext|>"),
        Some(2)
    );
    assert_eq!(parse_completion("banana"), None);
    assert_eq!(parse_completion(""), None);
    assert_eq!(
        parse_completion("\nneutral"),
        None,
        "only the first line counts"
    );
    assert_eq!(
        parse_completion(" Neutral"),
        None,
        "label words are compared exactly"
    );
}

fn row(label: usize, genre: &str) -> NliRow {
    NliRow {
        premise: "p".into(),
        hypothesis: "h".into(),
        label,
        genre: Some(genre.into()),
    }
}

#[test]
fn report_numbers_follow_from_the_predictions() {
    // gold:      E E E N N C C C
    // predicted: E E N N ? C E C   (? = badly formed)
    let rows: Vec<NliRow> = [
        (0, "a"),
        (0, "a"),
        (0, "b"),
        (1, "b"),
        (1, "b"),
        (2, "a"),
        (2, "a"),
        (2, "b"),
    ]
    .iter()
    .map(|&(l, g)| row(l, g))
    .collect();
    let predicted = [
        Some(0),
        Some(0),
        Some(1),
        Some(1),
        None,
        Some(2),
        Some(0),
        Some(2),
    ];
    let predictions: Vec<Prediction> = predicted
        .iter()
        .map(|&label| Prediction {
            label,
            raw: String::new(),
        })
        .collect();
    let r = mnli::summarize(&rows, &predictions, EvalMode::Generate);
    assert_eq!(r.n, 8);
    assert_eq!(r.correct, 5);
    assert!((r.accuracy - 5.0 / 8.0).abs() < 1e-12);
    assert_eq!(r.badly_formed, 1);
    assert_eq!(r.confusion, [[2, 1, 0, 0], [0, 1, 0, 1], [1, 0, 2, 0]]);
    assert_eq!(r.confusion.iter().flatten().sum::<usize>(), r.n);
    let e = &r.per_label["entailment"];
    assert!((e.precision - 2.0 / 3.0).abs() < 1e-12 && (e.recall - 2.0 / 3.0).abs() < 1e-12);
    let n = &r.per_label["neutral"];
    assert!(
        (n.precision - 0.5).abs() < 1e-12
            && (n.recall - 0.5).abs() < 1e-12
            && (n.f1 - 0.5).abs() < 1e-12
    );
    let c = &r.per_label["contradiction"];
    assert!((c.precision - 1.0).abs() < 1e-12 && (c.recall - 2.0 / 3.0).abs() < 1e-12);
    assert!((c.f1 - 0.8).abs() < 1e-12);
    assert_eq!(r.per_genre["a"].n, 4);
    assert!((r.per_genre["a"].accuracy - 0.75).abs() < 1e-12);
    assert!((r.per_genre["b"].accuracy - 0.5).abs() < 1e-12);
}

#[test]
fn rows_with_missing_or_unknown_labels_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.jsonl");
    std::fs::write(
        &path,
        "{\"premise\": \"a\", \"hypothesis\": \"b\", \"label\": 0}\n\
         {\"premise\": \"a\", \"hypothesis\": \"b\", \"label\": 7}\n\
         {\"premise\": \"a\", \"hypothesis\": \"b\", \"label\": null}\n\
         {\"premise\": \"a\", \"hypothesis\": \"b\", \"label\": \"maybe\"}\n",
    )
    .unwrap();
    let e = format!(
        "{:#}",
        mnli::read_nli_rows(path.to_str().unwrap(), None, None).unwrap_err()
    );
    assert!(e.contains("bad.jsonl") && e.contains("3 rows"), "{e}");
    assert!(
        e.contains("line 2: label 7")
            && e.contains("line 3")
            && e.contains("line 4: label \"maybe\""),
        "{e}"
    );
    let e = format!(
        "{:#}",
        mnli::read_nli_rows("no/such/file.jsonl", None, None).unwrap_err()
    );
    assert!(e.contains("no/such/file.jsonl"), "{e}");
}

#[test]
fn kiln_eval_writes_consistent_reports_in_both_modes() {
    let Some(tok) = shared("tokenizers/gpt2") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    let (ok, _, stderr) = kiln(&[
        "init",
        "--preset",
        "tiny",
        "--out",
        model_dir.to_str().unwrap(),
        "--seed",
        "1",
        "--tokenizer",
        tok.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let rows = fixtures().join("mnli/rows.jsonl");
    for mode in ["generate", "rank"] {
        let report_dir = tmp.path().join(mode);
        let (ok, stdout, stderr) = kiln(&[
            "eval",
            "--model",
            model_dir.to_str().unwrap(),
            "--task",
            "mnli",
            "--data",
            rows.to_str().unwrap(),
            "--mode",
            mode,
            "--batch-size",
            "3",
            "--report",
            report_dir.to_str().unwrap(),
        ]);
        assert!(ok, "{stderr}");
        assert!(stdout.contains("accuracy"), "{stdout}");
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(report_dir.join("report.json")).unwrap())
                .unwrap();
        assert_eq!(report["n"], 8);
        assert_eq!(report["mode"], mode);
        let confusion: Vec<Vec<u64>> = serde_json::from_value(report["confusion"].clone()).unwrap();
        assert_eq!(confusion.iter().flatten().sum::<u64>(), 8);
        let diagonal: u64 = (0..3).map(|i| confusion[i][i]).sum();
        assert_eq!(report["correct"].as_u64().unwrap(), diagonal);
        assert_eq!(report["model_sha256"].as_str().unwrap().len(), 64);
        assert_eq!(report["per_genre"]["fiction"]["n"], 3);
        if mode == "rank" {
            assert_eq!(report["badly_formed"], 0, "ranking always answers a label");
        }
        let md = std::fs::read_to_string(report_dir.join("report.md")).unwrap();
        assert!(
            md.contains("| entailment |") && md.contains("Per genre"),
            "{md}"
        );
        let svg = std::fs::read_to_string(report_dir.join("confusion.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(
            svg.matches("<rect").count(),
            1 + 12,
            "background + 3x4 cells"
        );
    }
}
