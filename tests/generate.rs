//! Generation against HF transformers' greedy `generate`, batching, sampling and validation.

mod common;

use candle_core::{DType, Device};
use common::*;
use std::sync::Arc;

use kiln::generate::{generate, DecodeBatch, FinishReason, GenerationParams, Sequence};
use kiln::model::{self, Model};

struct Case {
    prompt: Vec<u32>,
    expected: Vec<u32>,
    repetition_penalty: f64,
}

fn fixture() -> (Model, Vec<Case>, usize) {
    let dir = fixtures().join("generate");
    let model = model::load_model(&dir, DType::F32, &Device::Cpu).unwrap();
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("generate.json")).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let cases = doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            prompt: ids(&c["prompt_ids"]),
            expected: ids(&c["output_ids"]),
            repetition_penalty: c["repetition_penalty"].as_f64().unwrap_or(1.0),
        })
        .collect();
    (
        model,
        cases,
        doc["max_new_tokens"].as_u64().unwrap() as usize,
    )
}

fn greedy(max_new_tokens: usize, repetition_penalty: f64) -> GenerationParams {
    GenerationParams {
        max_new_tokens,
        repetition_penalty,
        ..Default::default()
    }
}

#[test]
fn greedy_matches_transformers_token_for_token() {
    let (model, cases, max_new) = fixture();
    let mut saw_eos = false;
    for case in &cases {
        let params = greedy(max_new, case.repetition_penalty);
        let out = generate(
            &model,
            None,
            std::slice::from_ref(&case.prompt),
            &params,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(out[0].ids, case.expected, "prompt {:?}", case.prompt);
        let reason = if case.expected.last() == Some(&100) {
            saw_eos = true;
            FinishReason::Eos
        } else {
            FinishReason::Length
        };
        assert_eq!(out[0].finish_reason, reason);
    }
    assert!(saw_eos, "the fixture exercises early stopping at eos");
}

#[test]
fn batched_generation_equals_each_prompt_alone() {
    let (model, cases, max_new) = fixture();
    let plain: Vec<&Case> = cases
        .iter()
        .filter(|c| c.repetition_penalty == 1.0)
        .collect();
    let prompts: Vec<Vec<u32>> = plain.iter().map(|c| c.prompt.clone()).collect();
    let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
    assert!(
        lengths.iter().min() != lengths.iter().max(),
        "prompts of different lengths"
    );
    let mut streamed = vec![Vec::new(); prompts.len()];
    let out = generate(
        &model,
        None,
        &prompts,
        &greedy(max_new, 1.0),
        &mut |row, token| streamed[row].push(token),
    )
    .unwrap();
    for ((case, got), stream) in plain.iter().zip(&out).zip(&streamed) {
        assert_eq!(
            got.ids, case.expected,
            "prompt {:?} in a batch",
            case.prompt
        );
        assert_eq!(&got.ids, stream, "the callback saw every token in order");
    }
}

/// Continuous batching's guarantee: rows that join a batch already decoding (their cache rows
/// left-padded to the batch's), and rows that leave it early, generate what HF generates for
/// each prompt alone.
#[test]
fn rows_joining_and_leaving_a_running_batch_generate_what_they_generate_alone() {
    let (model, cases, max_new) = fixture();
    let plain: Vec<&Case> = cases
        .iter()
        .filter(|c| c.repetition_penalty == 1.0)
        .collect();
    assert!(plain.len() >= 3, "the fixture has three plain prompts");
    let params = Arc::new(greedy(max_new, 1.0));
    let sequence = |i: usize| Sequence::new(model.config(), &plain[i].prompt, 0, params.clone());
    let mut batch: DecodeBatch<usize> = DecodeBatch::new(&model, None);
    let mut got: Vec<Option<Vec<u32>>> = vec![None; plain.len()];
    let mut take = |finished: Vec<(usize, anyhow::Result<kiln::generate::Generated>)>| {
        for (i, g) in finished {
            got[i] = Some(g.unwrap().ids);
        }
    };
    let joined = |finished: Vec<(usize, kiln::generate::Generated)>| {
        finished.into_iter().map(|(i, g)| (i, Ok(g))).collect()
    };
    take(joined(batch.join(vec![(0, sequence(0).unwrap())]).unwrap()));
    take(batch.advance(&mut |_, _| {}).unwrap());
    take(batch.advance(&mut |_, _| {}).unwrap());
    // Two more join after two tokens of the first, one of them with a longer prompt.
    take(joined(
        batch
            .join(
                (1..plain.len())
                    .map(|i| (i, sequence(i).unwrap()))
                    .collect(),
            )
            .unwrap(),
    ));
    assert_eq!(batch.len(), plain.len());
    // A cancelled row leaves and comes back as a new request: the others do not notice.
    take(batch.advance(&mut |_, _| {}).unwrap());
    let removed = batch.remove(|&i| i == 1).unwrap();
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].1.len(), 1, "it had made one token");
    take(joined(batch.join(vec![(1, sequence(1).unwrap())]).unwrap()));
    while !batch.is_empty() {
        take(batch.advance(&mut |_, _| {}).unwrap());
    }
    for (case, got) in plain.iter().zip(&got) {
        assert_eq!(
            got.as_ref().expect("finished"),
            &case.expected,
            "prompt {:?} joined a running batch",
            case.prompt
        );
    }
}

#[test]
fn sampling_is_seeded_and_top_k_one_is_greedy() {
    let (model, cases, _) = fixture();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt.clone()).collect();
    let sample = |seed: u64, top_k: Option<usize>, top_p: Option<f64>| {
        let params = GenerationParams {
            max_new_tokens: 10,
            do_sample: true,
            temperature: 1.5,
            top_k,
            top_p,
            seed,
            ..Default::default()
        };
        generate(&model, None, &prompts, &params, &mut |_, _| {})
            .unwrap()
            .into_iter()
            .map(|g| g.ids)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        sample(7, None, None),
        sample(7, None, None),
        "same seed, same samples"
    );
    assert_ne!(
        sample(7, None, None),
        sample(8, None, None),
        "another seed, other samples"
    );
    let greedy_out: Vec<Vec<u32>> =
        generate(&model, None, &prompts, &greedy(10, 1.0), &mut |_, _| {})
            .unwrap()
            .into_iter()
            .map(|g| g.ids)
            .collect();
    assert_eq!(
        sample(3, Some(1), None),
        greedy_out,
        "top_k 1 leaves only the argmax"
    );
    assert_eq!(
        sample(3, None, Some(1e-9)),
        greedy_out,
        "a tiny top_p keeps only the argmax"
    );
}

#[test]
fn min_new_tokens_suppresses_eos_and_limits_are_respected() {
    let (model, cases, max_new) = fixture();
    let eos_case = cases
        .iter()
        .find(|c| c.repetition_penalty == 1.0 && c.expected.last() == Some(&100))
        .expect("a case that stops at eos");
    let params = GenerationParams {
        max_new_tokens: max_new,
        min_new_tokens: max_new,
        ..Default::default()
    };
    let out = generate(
        &model,
        None,
        std::slice::from_ref(&eos_case.prompt),
        &params,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(out[0].ids.len(), max_new);
    assert!(!out[0].ids.contains(&100));
    assert_eq!(out[0].finish_reason, FinishReason::Length);

    // max_length counts the prompt; the context (n_positions 64) caps everything.
    let prompt = cases[0].prompt.clone();
    let params = GenerationParams {
        max_new_tokens: 50,
        max_length: Some(prompt.len() + 3),
        min_new_tokens: 50,
        ..Default::default()
    };
    assert_eq!(
        generate(
            &model,
            None,
            std::slice::from_ref(&prompt),
            &params,
            &mut |_, _| {}
        )
        .unwrap()[0]
            .ids
            .len(),
        3
    );
    let params = GenerationParams {
        max_new_tokens: 500,
        min_new_tokens: 500,
        ..Default::default()
    };
    let out = generate(
        &model,
        None,
        std::slice::from_ref(&prompt),
        &params,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(prompt.len() + out[0].ids.len(), 64);

    // max_new_tokens 0 is answered with no new tokens.
    let out = generate(&model, None, &[prompt], &greedy(0, 1.0), &mut |_, _| {}).unwrap();
    assert!(out[0].ids.is_empty() && out[0].finish_reason == FinishReason::Length);
}

#[test]
fn bad_parameters_and_prompts_are_clear_errors() {
    let (model, _, _) = fixture();
    let err = |prompts: &[Vec<u32>], params: GenerationParams| {
        format!(
            "{:#}",
            generate(&model, None, prompts, &params, &mut |_, _| {}).unwrap_err()
        )
    };
    let ok = vec![vec![1, 2, 3]];
    assert!(err(&[vec![]], greedy(5, 1.0)).contains("prompt 0 is empty"));
    let long = vec![(0..70).map(|i| i % 50).collect::<Vec<u32>>()];
    let e = err(&long, greedy(5, 1.0));
    assert!(
        e.contains("70 tokens") && e.contains("n_positions 64"),
        "{e}"
    );
    let truncated = GenerationParams {
        truncate_left: true,
        ..greedy(5, 1.0)
    };
    let out = generate(&model, None, &long, &truncated, &mut |_, _| {}).unwrap();
    assert_eq!(out[0].prompt_ids.len(), 59);
    assert_eq!(
        out[0].prompt_ids,
        long[0][11..].to_vec(),
        "the last tokens are kept"
    );
    let e = err(
        &ok,
        GenerationParams {
            top_p: Some(0.0),
            ..Default::default()
        },
    );
    assert!(e.contains("top_p must be in (0, 1], got 0"), "{e}");
    let e = err(
        &ok,
        GenerationParams {
            top_p: Some(1.5),
            ..Default::default()
        },
    );
    assert!(e.contains("top_p must be in (0, 1], got 1.5"), "{e}");
    let e = err(
        &ok,
        GenerationParams {
            temperature: -0.1,
            ..Default::default()
        },
    );
    assert!(e.contains("temperature must be >= 0"), "{e}");
    let e = err(
        &ok,
        GenerationParams {
            top_k: Some(0),
            ..Default::default()
        },
    );
    assert!(e.contains("top_k must be at least 1"), "{e}");
    let e = err(&[vec![1, 500]], greedy(5, 1.0));
    assert!(
        e.contains("prompt 0: token id 500 is outside the vocabulary (101)"),
        "{e}"
    );
}

#[test]
fn stop_strings_cut_the_completion() {
    let Some(tok_dir) = shared("tokenizers/gpt2") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("m");
    let (ok, _, stderr) = kiln(&[
        "init",
        "--preset",
        "tiny",
        "--out",
        out_dir.to_str().unwrap(),
        "--seed",
        "3",
        "--tokenizer",
        tok_dir.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let model = model::load_model(&out_dir, DType::F32, &Device::Cpu).unwrap();
    let tokenizer = kiln::tokenizer::TextTokenizer::from_dir(&out_dir).unwrap();
    let prompt = tokenizer.encode("The weather today is").unwrap();
    let free = generate(
        &model,
        Some(&tokenizer),
        std::slice::from_ref(&prompt),
        &greedy(8, 1.0),
        &mut |_, _| {},
    )
    .unwrap();
    let text = free[0].text.clone();
    assert!(text.chars().count() >= 3, "{text:?}");
    // Stop at a piece of what it would say anyway.
    let stop: String = text
        .chars()
        .skip(text.chars().count() / 2)
        .take(2)
        .collect();
    let params = GenerationParams {
        stop: vec![stop.clone()],
        ..greedy(8, 1.0)
    };
    let cut = generate(&model, Some(&tokenizer), &[prompt], &params, &mut |_, _| {}).unwrap();
    assert_eq!(cut[0].finish_reason, FinishReason::Stop);
    assert!(
        !cut[0].text.contains(&stop) && text.starts_with(&cut[0].text),
        "{:?} vs {text:?}",
        cut[0].text
    );

    // The CLI streams nothing special when not on a terminal: it prints the completion.
    let (ok, stdout, stderr) = kiln(&[
        "generate",
        "--model",
        out_dir.to_str().unwrap(),
        "--prompt",
        "The weather today is",
        "--max-new-tokens",
        "8",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains(&text), "{stdout:?} should contain {text:?}");
    let input = tmp.path().join("prompts.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"The weather today is\"}\n{\"ids\": [464, 3290]}\n",
    )
    .unwrap();
    let output = tmp.path().join("out.jsonl");
    let (ok, _, stderr) = kiln(&[
        "generate",
        "--model",
        out_dir.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--max-new-tokens",
        "8",
        "--batch-size",
        "2",
    ]);
    assert!(ok, "{stderr}");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["completion"].as_str().unwrap(), text);
    assert_eq!(rows[0]["finish_reason"], "length");
    assert_eq!(rows[1]["ids"].as_array().unwrap().len(), 8);
}

#[test]
fn prefix_lm_models_read_the_prompt_both_ways_when_generating() {
    // Generation with a KV cache (prefill of the prompt, then one token at a time) must give
    // what a full forward pass over prompt + generated tokens gives under the prefix layout:
    // the prompt bidirectional, the generated tokens causal.
    let dir = fixtures().join("parity/rot8");
    let mut config = model::load_config(&dir).unwrap();
    let params = model::load_parameters(&dir, &config, DType::F32, &Device::Cpu).unwrap();
    config.set_prefix_lm(true);
    let prefix_model =
        model::model_from_parameters(&config, &params, DType::F32, &Device::Cpu).unwrap();
    let prompt: Vec<u32> = vec![5, 17, 42, 8, 99, 23];
    let out = generate(
        &prefix_model,
        None,
        std::slice::from_ref(&prompt),
        &greedy(6, 1.0),
        &mut |_, _| {},
    )
    .unwrap();
    let mut reference = Vec::new();
    for _ in 0..out[0].ids.len() {
        let mut ids = prompt.clone();
        ids.extend(&reference);
        let layout = kiln::ops::PrefixLayout {
            segment: vec![0; ids.len()],
            prefix: (0..ids.len()).map(|i| i < prompt.len()).collect(),
        };
        let batch = model::Batch::prefix_lm(std::slice::from_ref(&ids), &[layout], 0, &Device::Cpu)
            .unwrap();
        let logits = prefix_model.forward(&batch, None).unwrap();
        let last = logits.get(0).unwrap().get(ids.len() - 1).unwrap();
        reference.push(last.argmax(0).unwrap().to_scalar::<u32>().unwrap());
    }
    assert_eq!(out[0].ids, reference);

    // And the prompt's layout matters: the causal model's first step differs.
    config.set_prefix_lm(false);
    let causal = model::model_from_parameters(&config, &params, DType::F32, &Device::Cpu).unwrap();
    let batch = model::Batch::right_padded(std::slice::from_ref(&prompt), 0, &Device::Cpu).unwrap();
    let causal_last = causal
        .forward(&batch, None)
        .unwrap()
        .get(0)
        .unwrap()
        .get(prompt.len() - 1)
        .unwrap();
    let layout = kiln::ops::PrefixLayout {
        segment: vec![0; prompt.len()],
        prefix: vec![true; prompt.len()],
    };
    let batch =
        model::Batch::prefix_lm(std::slice::from_ref(&prompt), &[layout], 0, &Device::Cpu).unwrap();
    let prefix_last = prefix_model
        .forward(&batch, None)
        .unwrap()
        .get(0)
        .unwrap()
        .get(prompt.len() - 1)
        .unwrap();
    assert!(max_abs_diff(&causal_last, &prefix_last) > 1e-3);
}

#[test]
fn prefix_lm_models_score_with_the_prompt_read_both_ways() {
    // What MNLI's rank mode does: a label continuation scored after a prompt.
    let dir = fixtures().join("parity/rot8");
    let mut config = model::load_config(&dir).unwrap();
    let params = model::load_parameters(&dir, &config, DType::F32, &Device::Cpu).unwrap();
    config.set_prefix_lm(true);
    let prefix_model =
        model::model_from_parameters(&config, &params, DType::F32, &Device::Cpu).unwrap();
    let row: Vec<u32> = vec![5, 17, 42, 8, 99, 23, 7, 3];
    let prompt_len = 5;
    let score = |lens: Option<&[usize]>| {
        kiln::eval::score::score_rows(&prefix_model, std::slice::from_ref(&row), lens, 1).unwrap()
            [0]
        .total
    };
    let with_prompt = score(Some(&[prompt_len]));
    let layout = kiln::ops::PrefixLayout {
        segment: vec![0; row.len()],
        prefix: (0..row.len()).map(|i| i < prompt_len).collect(),
    };
    let batch =
        model::Batch::prefix_lm(std::slice::from_ref(&row), &[layout], 0, &Device::Cpu).unwrap();
    let logits = prefix_model.forward(&batch, None).unwrap().get(0).unwrap();
    let log_probs = candle_nn::ops::log_softmax(&logits, 1).unwrap();
    let expected: f32 = (0..row.len() - 1)
        .map(|i| {
            log_probs
                .get(i)
                .unwrap()
                .get(row[i + 1] as usize)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum();
    assert!(
        (with_prompt - expected).abs() < 1e-4,
        "{with_prompt} vs {expected}"
    );
    assert!(
        (with_prompt - score(None)).abs() > 1e-4,
        "the layout matters"
    );
}
