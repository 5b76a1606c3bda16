//! Load + cast + tokenize + pack MNLI train from `../shared/data/mnli` with the GPT-2 tokenizer,
//! as `kiln train` does for the Graphcore recipe. Target: ≥ 1M tokens/s on a 2-core machine.
//!
//! The shared sample has 19,999 rows (~0.93M tokens), so the file is repeated `KILN_BENCH_REPEAT`
//! times (default 4) to measure over a few million tokens; each pass re-reads it from disk.
//!
//! Run: `cargo bench --bench data_pipeline`.

use std::path::Path;
use std::time::Instant;

use kiln::data::source::{read_file, Format, Records};
use kiln::data::template::Caster;
use kiln::data::{pack::pack, tokenize_all, Rendered};
use kiln::recipe::{DatasetSpec, LossOn, SourceSpec, TemplateSpec};
use kiln::tokenizer::TextTokenizer;
use rayon::prelude::*;

fn main() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    let data = shared.join("data/mnli/train.jsonl");
    let tok = shared.join("tokenizers/gpt2");
    if !data.is_file() || !tok.is_dir() {
        eprintln!("SKIPPED: {} or {} is absent", data.display(), tok.display());
        return;
    }
    let repeat: usize = std::env::var("KILN_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let tokenizer = TextTokenizer::from_dir(&tok).expect("GPT-2 tokenizer");
    let spec = DatasetSpec {
        source: SourceSpec {
            path: Some(data.clone()),
            format: None,
            hub: None,
            config: None,
            split: None,
            revision: None,
        },
        template: TemplateSpec::Preset("mnli".into()),
        label_map: None,
        columns: Default::default(),
        limit: None,
        few_shot: None,
    };
    for loss_on in [LossOn::All, LossOn::Target] {
        // Warm the tokenizer's word cache and the page cache once, as a long run would be.
        run(&data, &spec, &tokenizer, 1, loss_on);
        let start = Instant::now();
        let (examples, tokens, sequences) = run(&data, &spec, &tokenizer, repeat, loss_on);
        let seconds = start.elapsed().as_secs_f64();
        println!(
            "data_pipeline loss_on={loss_on:?}: {examples} examples ({repeat}× the 19,999-row sample), {tokens} tokens, \
             {sequences} sequences of 1024 in {seconds:.2} s = {:.2} M tokens/s on {} threads",
            tokens as f64 / seconds / 1e6,
            rayon::current_num_threads()
        );
    }
}

fn run(
    data: &Path,
    spec: &DatasetSpec,
    tokenizer: &TextTokenizer,
    repeat: usize,
    loss_on: LossOn,
) -> (usize, usize, usize) {
    let t0 = Instant::now();
    let mut records = Records::default();
    for _ in 0..repeat {
        let part = read_file(data, Format::Jsonl, None).expect("reads the sample");
        if records.rows.is_empty() {
            records = part;
        } else {
            records.rows.extend(part.rows);
            records.positions.extend(part.positions);
        }
    }
    let t_load = Instant::now();
    if std::env::var_os("KILN_BENCH_STAGES").is_some() {
        eprint!("load {:.2}s ", (t_load - t0).as_secs_f64());
    }
    let caster = Caster::new(spec, &records).expect("mnli columns");
    let rendered: Vec<Rendered> = (0..caster.len())
        .into_par_iter()
        .map(|i| caster.render(i).unwrap())
        .collect();
    let t_render = Instant::now();
    let examples = tokenize_all(tokenizer, &rendered, loss_on).expect("tokenizes");
    let t_tok = Instant::now();
    let tokens = examples.iter().map(|e| e.len()).sum();
    let (blocks, _) = pack(&examples, 1024);
    if std::env::var_os("KILN_BENCH_STAGES").is_some() {
        eprintln!(
            "render {:.2}s tokenize {:.2}s pack {:.2}s",
            (t_render - t_load).as_secs_f64(),
            (t_tok - t_render).as_secs_f64(),
            t_tok.elapsed().as_secs_f64()
        );
    }
    (examples.len(), tokens, blocks.len())
}
