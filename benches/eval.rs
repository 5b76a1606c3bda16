//! MNLI evaluation speed: the full validation_matched split (`../shared/data/mnli`, 9,815 pairs)
//! with a random `tiny` GPT-J (2 layers, d 128) and the real GPT-2 tokenizer, in both modes, with
//! batch 64 and 2 threads, next to the way Kiln evaluated before (rank: every prompt scored
//! whole once per label, full log-softmax at every position; generate: batches in file order).
//!
//!     cargo bench --bench eval                 # the full split; the old rank reading on 500 pairs
//!     cargo bench --bench eval -- --limit 2000 # fewer pairs
//!
//! The old rank reading takes about 11 minutes for the whole split, so it runs on the first
//! 500 pairs and its time is scaled to the split; both readings' predictions on those pairs must
//! be identical, and the bench fails otherwise. Generated completions must match too, except where
//! the greedy path passes a near-tie (top-2 logits within `NEAR_TIE`), which batching's different
//! summation order may break either way; any other difference fails the bench.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use kiln::eval::mnli::{prompt, EntailmentPipeline, LABELS, MAX_NEW_TOKENS};
use kiln::eval::score::score_rows;
use kiln::generate::{generate, GenerationParams};
use kiln::model::init::{init_parameter, Preset};
use kiln::recipe::EvalMode;
use kiln::tokenizer::{TextTokenizer, EOS_TOKEN};

const THREADS: usize = 2;
const BATCH: usize = 64;
const OLD_RANK_SAMPLE: usize = 500;

fn main() -> Result<()> {
    kiln::process::configure_process();
    rayon::ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .build_global()
        .context("configuring the thread pool")?;
    let args: Vec<String> = std::env::args().collect();
    let limit = args
        .iter()
        .position(|a| a == "--limit")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse::<usize>())
        .transpose()
        .context("--limit takes a number of pairs")?;
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    let data = shared.join("data/mnli/validation_matched.jsonl");
    if !data.is_file() {
        bail!(
            "{}: missing (the bench reads ../shared beside the repository)",
            data.display()
        );
    }
    let tokenizer = TextTokenizer::from_dir(&shared.join("tokenizers/gpt2"))?;
    let mut pairs: Vec<(String, String)> = Vec::new();
    for line in std::fs::read_to_string(&data)?.lines() {
        let row: serde_json::Value = serde_json::from_str(line)?;
        let field = |k: &str| row[k].as_str().unwrap_or_default().to_string();
        pairs.push((field("premise"), field("hypothesis")));
    }
    pairs.truncate(limit.unwrap_or(pairs.len()));
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(p, h)| (p.as_str(), h.as_str()))
        .collect();
    let prompt_tokens: usize = pairs
        .iter()
        .map(|(p, h)| tokenizer.encode(&prompt(p, h)).map(|ids| ids.len()))
        .sum::<Result<usize>>()?;

    let mut config = Preset::Tiny.config();
    config.set_vocab_size(tokenizer.vocab_size().div_ceil(64) * 64);
    config.set_eos_and_bos(tokenizer.eos_id());
    let params = kiln::model::parameter_shapes(&config)
        .into_iter()
        .map(|(name, shape)| Ok((name.clone(), init_parameter(&config, &name, &shape, 0)?)))
        .collect::<Result<_>>()?;
    let model = kiln::model::model_from_parameters(&config, &params, DType::F32, &Device::Cpu)?;
    println!(
        "load average: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "{} pairs ({prompt_tokens} prompt tokens), tiny preset, batch {BATCH}, {THREADS} threads",
        pairs.len()
    );

    let pipeline = |mode| EntailmentPipeline {
        model: &model,
        tokenizer: &tokenizer,
        mode,
        batch_size: BATCH,
    };
    let report = |what: &str, seconds: f64, n: usize| {
        println!(
            "{what:<34} {seconds:>8.1} s for {n} pairs  {:>7.0} pairs/s  {:>8.0} prompt tokens/s",
            n as f64 / seconds,
            prompt_tokens as f64 * n as f64 / pairs.len() as f64 / seconds
        );
    };

    let started = Instant::now();
    let ranked = pipeline(EvalMode::Rank).predict(&pairs)?;
    report(
        "rank (shared prompt pass)",
        started.elapsed().as_secs_f64(),
        pairs.len(),
    );

    let sample = &pairs[..OLD_RANK_SAMPLE.min(pairs.len())];
    let started = Instant::now();
    let old_ranked = old_rank(&model, &tokenizer, sample)?;
    let seconds = started.elapsed().as_secs_f64();
    report("rank (before: whole rows)", seconds, sample.len());
    println!(
        "{:<34} {:>8.1} s (scaled to {} pairs)",
        "",
        seconds * pairs.len() as f64 / sample.len() as f64,
        pairs.len()
    );
    let same = ranked
        .iter()
        .zip(&old_ranked)
        .filter(|(new, old)| new.label == Some(**old))
        .count();
    println!(
        "rank predictions identical on {same} of {} pairs",
        sample.len()
    );
    anyhow::ensure!(
        same == sample.len(),
        "rank mode: {} of {} predictions differ from the old reading's",
        sample.len() - same,
        sample.len()
    );

    let started = Instant::now();
    let generated = pipeline(EvalMode::Generate).predict(&pairs)?;
    report(
        "generate (length-sorted batches)",
        started.elapsed().as_secs_f64(),
        pairs.len(),
    );

    let started = Instant::now();
    let old_generated = old_generate(&model, &tokenizer, &pairs)?;
    report(
        "generate (before: file order)",
        started.elapsed().as_secs_f64(),
        pairs.len(),
    );
    let same = generated
        .iter()
        .zip(&old_generated)
        .filter(|(new, old)| new.raw == **old)
        .count();
    println!(
        "generate completions identical on {same} of {} pairs",
        pairs.len()
    );
    // A completion that differs should come from a near-tie at some step: the smallest gap between
    // the two best next tokens along the prompt's greedy path, decoded alone, says whether it does.
    for (i, (new, old)) in generated.iter().zip(&old_generated).enumerate() {
        if new.raw != *old {
            let mut ids = tokenizer.encode(&prompt(pairs[i].0, pairs[i].1))?;
            let mut smallest_gap = f32::INFINITY;
            for _ in 0..MAX_NEW_TOKENS {
                let batch = kiln::model::Batch::left_padded(
                    std::slice::from_ref(&ids),
                    tokenizer.eos_id(),
                    false,
                    &Device::Cpu,
                )?;
                let logits = model.forward_last(&batch, &[ids.len() - 1], None)?;
                let logits = logits.get(0)?.to_vec1::<f32>()?;
                let mut ranked: Vec<(f32, u32)> = logits.into_iter().zip(0..).collect();
                ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
                smallest_gap = smallest_gap.min(ranked[0].0 - ranked[1].0);
                ids.push(ranked[0].1);
            }
            println!(
                "  pair {i}: {:?}, before {old:?} (smallest top-2 logit gap {smallest_gap:.1e})",
                new.raw
            );
            anyhow::ensure!(
                smallest_gap < NEAR_TIE,
                "generate mode: pair {i}'s completion differs from the old reading's without a \
                 near-tie on its greedy path (smallest top-2 gap {smallest_gap:.1e}, \
                 over {NEAR_TIE:.0e})"
            );
        }
    }
    Ok(())
}

/// Largest top-2 logit gap that batched and unbatched decoding may resolve differently: their
/// logits differ by float summation order alone (around 1e-5 here), far below this.
const NEAR_TIE: f32 = 1e-3;

/// Rank mode as Kiln did it before: each prompt + label row scored whole.
fn old_rank(
    model: &kiln::model::Model,
    tokenizer: &TextTokenizer,
    pairs: &[(&str, &str)],
) -> Result<Vec<usize>> {
    let continuations: Vec<Vec<u32>> = LABELS
        .iter()
        .map(|l| tokenizer.encode(&format!(" {l}{EOS_TOKEN}")))
        .collect::<Result<_>>()?;
    let mut rows = Vec::new();
    for (p, h) in pairs {
        let ids = tokenizer.encode(&prompt(p, h))?;
        for continuation in &continuations {
            rows.push([ids.as_slice(), continuation].concat());
        }
    }
    let scored = score_rows(model, &rows, None, BATCH)?;
    Ok(scored
        .chunks(LABELS.len())
        .map(|candidates| {
            let totals: Vec<f32> = candidates
                .iter()
                .zip(&continuations)
                .map(|(row, c)| {
                    row.logprobs[row.logprobs.len() - c.len()..]
                        .iter()
                        .flatten()
                        .sum()
                })
                .collect();
            (0..LABELS.len())
                .max_by(|&a, &b| totals[a].total_cmp(&totals[b]))
                .expect("three labels")
        })
        .collect())
}

/// Generate mode as Kiln did it before: batches in file order.
fn old_generate(
    model: &kiln::model::Model,
    tokenizer: &TextTokenizer,
    pairs: &[(&str, &str)],
) -> Result<Vec<String>> {
    let params = GenerationParams {
        max_new_tokens: MAX_NEW_TOKENS,
        truncate_left: true,
        ..Default::default()
    };
    let prompts: Vec<Vec<u32>> = pairs
        .iter()
        .map(|(p, h)| tokenizer.encode(&prompt(p, h)))
        .collect::<Result<_>>()?;
    let mut raw = Vec::new();
    for chunk in prompts.chunks(BATCH) {
        for generated in generate(model, Some(tokenizer), chunk, &params, &mut |_, _| {})? {
            raw.push(tokenizer.decode(&generated.ids, false)?);
        }
    }
    Ok(raw)
}
