//! Isolated packing vs one example a row, on MNLI in Graphcore's format (`../shared/data/mnli`,
//! GPT-2 tokenizer, loss on the target) and on the bundled conversations (ChatML, loss on the
//! assistant): how many rows an epoch takes, the padding its micro-batches carry, and the
//! training throughput in real (non-padding) tokens per second on the `small` preset.
//!
//!     cargo bench --bench packing
//!
//! Both layouts train the same examples with the same loss (isolated packing gives each example
//! its loss and gradients alone, `tests/chat.rs`); packing only stops paying for padding.

use std::path::{Path, PathBuf};

use anyhow::Result;
use kiln::data::{prepare, SequenceStream, Split};
use kiln::model::init::{init_parameter, Preset};
use kiln::recipe::Recipe;
use kiln::tokenizer::TextTokenizer;
use kiln::train::{ModelInit, TrainOptions, Trainer};

const THREADS: usize = 2;
const STEPS: u64 = 6;
const WARMUP: usize = 2;

struct Case {
    name: &'static str,
    data: PathBuf,
    tokenizer: PathBuf,
    template: &'static str,
    extra: &'static str,
    seq_len: usize,
    /// Rows per optimizer step, one example each when padded.
    micro: usize,
}

fn recipe(case: &Case, out: &Path, packed: bool) -> Result<Recipe> {
    let layout = match packed {
        true => "mode: pack\n  packing: isolated",
        false => "mode: pad",
    };
    let text = format!(
        "name: bench\nmodel: {{init: {{preset: small}}}}\ntokenizer: {tokenizer}\n\
         data:\n  train: [{{source: {{path: {data}}}, template: {template}, limit: 2000}}]\n  \
         seq_len: {seq}\n  {layout}\n  {extra}\n\
         batch: {{global: {micro}, micro: {micro}}}\nsteps: {STEPS}\noptimizer: {{lr: 1.0e-4}}\n\
         checkpoint: {{dir: {out}/checkpoints, every: 0}}\ntracking: {{log_dir: {out}/runs, log_every: 1000}}\n",
        tokenizer = case.tokenizer.display(),
        data = case.data.display(),
        template = case.template,
        seq = case.seq_len,
        extra = case.extra,
        micro = case.micro,
        out = out.display(),
    );
    let recipe: Recipe = serde_norway::from_str(&text)?;
    recipe.validate()?;
    Ok(recipe)
}

fn run(case: &Case, packed: bool) -> Result<()> {
    let out = tempfile::tempdir()?;
    let recipe = recipe(case, out.path(), packed)?;
    let mut tokenizer = TextTokenizer::from_dir(&case.tokenizer)?;
    kiln::data::chat::apply_recipe_template(&recipe, Path::new("."), &mut tokenizer)?;
    let prepared = prepare(&recipe, Path::new("."), &tokenizer, Split::Train)?;
    let stats = &prepared.stats;
    let mut config = Preset::Small.config();
    config.set_vocab_size(tokenizer.vocab_size().div_ceil(64) * 64);
    let params = kiln::model::parameter_shapes(&config)
        .into_iter()
        .map(|(name, shape)| Ok((name.clone(), init_parameter(&config, &name, &shape, 0)?)))
        .collect::<Result<_>>()?;
    let init = ModelInit {
        config,
        params,
        tokenizer: Some(tokenizer.clone()),
        base_model: "init:small".into(),
    };
    // The rows in data order, so that both layouts see the same examples first.
    let rows = prepared.sequences;
    let real_per_step: Vec<usize> = rows
        .chunks(case.micro)
        .map(|b| b.iter().map(|r| r.len()).sum())
        .take(STEPS as usize)
        .collect();
    let padded_per_step: Vec<usize> = rows
        .chunks(case.micro)
        .map(|b| b.iter().map(|r| r.len()).max().unwrap_or(0) * b.len())
        .take(STEPS as usize)
        .collect();
    let stream = SequenceStream::new(rows, 0, false);
    let options = TrainOptions {
        quiet: true,
        threads: Some(THREADS),
        ..TrainOptions::default()
    };
    let summary = Trainer::new(&recipe, init, stream, None, options)?.train()?;
    let seconds: f64 = summary.step_seconds[WARMUP..].iter().sum();
    let real: usize = real_per_step[WARMUP..].iter().sum();
    let padded: usize = padded_per_step[WARMUP..].iter().sum();
    let epoch_padded = stats.tokens + stats.padding_tokens;
    println!(
        "{:<22} {:<15} {:>6} rows/epoch, padding {:>6.1}% of the epoch's batches ({} tokens), \
         {:>7.0} real tokens/s ({:.0}% of computed tokens real)",
        case.name,
        if packed { "packed-isolated" } else { "padded" },
        stats.sequences,
        100.0 * stats.padding_tokens as f64 / epoch_padded.max(1) as f64,
        stats.padding_tokens,
        real as f64 / seconds,
        100.0 * real as f64 / padded.max(1) as f64,
    );
    Ok(())
}

fn main() -> Result<()> {
    kiln::process::configure_process();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shared = root.join("../shared");
    println!(
        "load average: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let mut cases = vec![Case {
        name: "chat (ChatML)",
        data: root.join("datasets/chat/train.jsonl"),
        tokenizer: root.join("datasets/nli/tokenizer"),
        template: "chat",
        extra: "chat_template: chatml\n  loss_on: assistant",
        seq_len: 256,
        micro: 8,
    }];
    let mnli = shared.join("data/mnli/train.jsonl");
    let gpt2 = shared.join("tokenizers/gpt2");
    if mnli.is_file() && gpt2.is_dir() {
        cases.insert(
            0,
            Case {
                name: "MNLI (Graphcore)",
                data: mnli,
                tokenizer: gpt2,
                template: "mnli",
                extra: "loss_on: target\n  truncation: left",
                seq_len: 256,
                micro: 8,
            },
        );
    } else {
        println!("MNLI: SKIPPED, ../shared/data/mnli or ../shared/tokenizers/gpt2 is absent");
    }
    for case in &cases {
        for packed in [false, true] {
            run(case, packed)?;
        }
    }
    Ok(())
}
