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
        mnli::read_nli_rows("./no/such/file.jsonl", None, None).unwrap_err()
    );
    assert!(
        e.contains(
            "./no/such/file.jsonl: no such file or directory (nor a Hub dataset id like nyu-mll/glue)"
        ),
        "{e}"
    );
}

#[test]
fn kiln_eval_writes_consistent_reports_in_both_modes() {
    let Some(tok) = shared("tokenizers/gpt2") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    init_tiny(&model_dir, 1, &tok);
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

/// The candidates' log-likelihoods from one prompt pass and a shared KV cache equal the old
/// reading (each prompt + candidate scored whole, every position's log-softmax), for every family
/// (GPT-Neo's local window included) and for a prefix-LM model, so rank mode predicts the same.
#[test]
fn shared_prompt_scoring_equals_scoring_whole_rows() {
    use candle_core::{DType, Device};
    use kiln::eval::score::{score_continuations, score_rows};
    for name in ["rot8", "gpt2", "neo", "neox", "rot8-prefix"] {
        let dir = fixtures()
            .join("parity")
            .join(name.trim_end_matches("-prefix"));
        let mut config = kiln::model::load_config(&dir).unwrap();
        config.set_prefix_lm(name.ends_with("-prefix"));
        let params = kiln::model::load_parameters(&dir, &config, DType::F32, &Device::Cpu).unwrap();
        let vb = candle_nn::VarBuilder::from_tensors(params, DType::F32, &Device::Cpu);
        let model = kiln::model::Model::load(vb, &config).unwrap();
        let vocab = config.vocab_size() as u64;
        // Prompts of many lengths (so batches pad), candidates of 1 to 3 tokens.
        let mut state = 7u64;
        let mut token = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % vocab) as u32
        };
        let prompts: Vec<Vec<u32>> = (0..11)
            .map(|i| (0..3 + 2 * i).map(|_| token()).collect())
            .collect();
        let candidates: Vec<Vec<u32>> = [2, 1, 3]
            .iter()
            .map(|&n| (0..n).map(|_| token()).collect())
            .collect();
        let fast = score_continuations(&model, &prompts, &candidates, 4).unwrap();
        let mut rows = Vec::new();
        let mut prompt_lens = Vec::new();
        for prompt in &prompts {
            for candidate in &candidates {
                rows.push([prompt.as_slice(), candidate].concat());
                prompt_lens.push(prompt.len());
            }
        }
        let whole = score_rows(&model, &rows, Some(&prompt_lens), 5).unwrap();
        for (p, fast_row) in fast.iter().enumerate() {
            for (c, candidate) in candidates.iter().enumerate() {
                let row = &whole[p * candidates.len() + c];
                let expected: f32 = row.logprobs[row.logprobs.len() - candidate.len()..]
                    .iter()
                    .flatten()
                    .sum();
                let got = fast_row[c];
                assert!(
                    (got - expected).abs() <= 1e-4 * expected.abs().max(1.0),
                    "{name}: prompt {p} candidate {c}: {got} vs {expected}"
                );
            }
        }
    }
}

/// Generate mode batches prompts by length; what it predicts does not depend on the batching.
#[test]
fn generate_mode_predictions_do_not_depend_on_batching() {
    let Some(tok) = shared("tokenizers/gpt2") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    init_tiny(&model_dir, 3, &tok);
    let model = kiln::model::load_model(
        &model_dir,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let tokenizer = kiln::tokenizer::TextTokenizer::from_dir(&model_dir).unwrap();
    let text = std::fs::read_to_string(fixtures().join("mnli/rows.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let pairs: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["premise"].as_str().unwrap(),
                r["hypothesis"].as_str().unwrap(),
            )
        })
        .collect();
    let predict = |mode, batch_size| {
        mnli::EntailmentPipeline {
            model: &model,
            tokenizer: &tokenizer,
            mode,
            batch_size,
        }
        .predict(&pairs)
        .unwrap()
    };
    for mode in [EvalMode::Generate, EvalMode::Rank] {
        let one_by_one = predict(mode, 1);
        assert_eq!(predict(mode, 3), one_by_one, "{mode:?}");
        assert_eq!(predict(mode, 8), one_by_one, "{mode:?}");
    }
}
