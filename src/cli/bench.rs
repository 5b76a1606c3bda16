//! `kiln bench`: a generation latency table over input lengths × output lengths × batch sizes
//! (time to first token, per-token latency, total, tokens/s), as markdown and JSON.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use candle_core::{DType, Device};
use clap::ValueEnum;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::*;
use crate::generate::{generate, GenerationParams};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Hugging Face model directory, or a Hub model id `owner/name[@revision]` (downloaded into
    /// the HF cache).
    #[arg(long, conflicts_with = "preset", required_unless_present = "preset")]
    pub model: Option<PathBuf>,
    /// A PEFT LoRA adapter directory, merged into --model's weights as they load.
    #[arg(long, requires = "model")]
    pub adapter: Option<PathBuf>,
    /// Benchmark a randomly initialised model of this shape instead (nothing is read from disk).
    /// Its weights are made one at a time in --dtype (or quantised, with --quantize): a bf16
    /// preset holds its matrices in bf16, each CPU product widening its own, as a LoRA base.
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Prompt lengths in tokens, comma-separated.
    #[arg(long, value_name = "N,N,...", value_parser = parse_counts, default_value = "32,128,512")]
    pub input_lengths: Counts,
    /// New tokens per row, comma-separated; every row makes exactly this many (eos is suppressed).
    #[arg(long, value_name = "N,N,...", value_parser = parse_counts, default_value = "16,64")]
    pub output_lengths: Counts,
    /// Rows per `generate` call, comma-separated.
    #[arg(long, value_name = "N,N,...", value_parser = parse_counts, default_value = "1,8,16")]
    pub batch_sizes: Counts,
    /// Timed runs per shape; the table reports their median.
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub repeats: usize,
    /// Run each shape once untimed before its timed runs (caches, allocator, CPU clocks).
    #[arg(long)]
    pub warmup: bool,
    /// CPU threads (default: all cores).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub quantize: super::QuantizeArgs,
    /// Compute dtype: fp32, fp16 or bf16.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Seed of the random prompts (and of the `--preset` model's weights).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the results, with the machine they were measured on, as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also write the markdown table here (it is always printed).
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
}

/// A sorted, duplicate-free list of positive counts given as `N,N,...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts(pub Vec<usize>);

fn parse_counts(text: &str) -> std::result::Result<Counts, String> {
    const EXPECTED: &str = "expected positive whole numbers separated by commas, such as 1,8,16";
    let mut counts = Vec::new();
    for part in text.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(format!("{EXPECTED} (found an empty entry)"));
        }
        let count: usize = part
            .parse()
            .map_err(|_| format!("{EXPECTED} ({part:?} is not a whole number)"))?;
        if count == 0 {
            return Err(format!("{EXPECTED} (0 is not positive)"));
        }
        counts.push(count);
    }
    counts.sort_unstable();
    counts.dedup();
    Ok(Counts(counts))
}

/// Everything the JSON report holds: what was measured, where, and the rows of the table.
#[derive(Debug, Serialize)]
struct Report {
    kiln_version: &'static str,
    date: String,
    machine: Machine,
    model: ModelFacts,
    dtype: &'static str,
    device: String,
    repeats: usize,
    warmup: bool,
    seed: u64,
    rows: Vec<Row>,
}

#[derive(Debug, Serialize)]
struct Machine {
    cpu: String,
    /// Logical CPUs available to this process.
    cores: usize,
    threads: usize,
    os: &'static str,
    arch: &'static str,
    /// `/proc/loadavg` when the bench started: other work on the machine skews the numbers.
    load_average: Option<String>,
}

#[derive(Debug, Serialize)]
struct ModelFacts {
    /// The model directory, or `preset <name>` for a random model.
    name: String,
    model_type: &'static str,
    n_layer: usize,
    hidden_size: usize,
    n_head: usize,
    vocab_size: usize,
    context: usize,
    parameters: usize,
}

#[derive(Debug, Serialize)]
struct Row {
    batch_size: usize,
    input_tokens: usize,
    output_tokens: usize,
    /// Why the shape was not measured (it does not fit the context); the timings are then null.
    skipped: Option<String>,
    ttft_ms: Option<f64>,
    /// Mean time per token after the first; null when only one token is generated.
    per_token_ms: Option<f64>,
    total_ms: Option<f64>,
    /// New tokens of the whole batch per second of total time.
    tokens_per_s: Option<f64>,
    /// Every timed run, in order, for the spread the medians hide.
    ttft_ms_runs: Vec<f64>,
    total_ms_runs: Vec<f64>,
}

pub(super) fn bench(mut args: BenchArgs) -> Result<()> {
    if let Some(spec) = &args.model {
        args.model = Some(model_dir(spec)?);
    }
    let dtype = model::parse_dtype(&args.dtype).context("--dtype")?;
    let device = ops::parse_device(&args.device).context("--device")?;
    for (flag, path) in [("--json", &args.json), ("--markdown", &args.markdown)] {
        if let Some(path) = path {
            check_writable_dir(flag, path)?;
        }
    }
    let threads = args.threads.unwrap_or_else(available_cores);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("starting the thread pool")?;
    // Everything, loading included, runs in the pool so `--threads` bounds every parallel op.
    pool.install(|| run_bench(&args, dtype, &device, threads))
}

fn run_bench(args: &BenchArgs, dtype: DType, device: &Device, threads: usize) -> Result<()> {
    let load_average = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.trim().to_string());
    let (model, tokenizer, name) = load(args, dtype, device)?;
    let config = model.config().clone();
    let context = config.max_positions();
    check_fits_context(&args.input_lengths.0, &args.output_lengths.0, context)?;
    let eos = config
        .eos_token_id()
        .or(tokenizer.as_ref().map(|t| t.eos_id()));

    let mut rows = Vec::new();
    for &batch_size in &args.batch_sizes.0 {
        for &input_tokens in &args.input_lengths.0 {
            for &output_tokens in &args.output_lengths.0 {
                let mut row = Row {
                    batch_size,
                    input_tokens,
                    output_tokens,
                    skipped: None,
                    ttft_ms: None,
                    per_token_ms: None,
                    total_ms: None,
                    tokens_per_s: None,
                    ttft_ms_runs: Vec::new(),
                    total_ms_runs: Vec::new(),
                };
                if input_tokens + output_tokens > context {
                    row.skipped = Some(format!(
                        "{input_tokens} + {output_tokens} tokens exceed the context ({context})"
                    ));
                    rows.push(row);
                    continue;
                }
                let prompts = random_prompts(
                    args.seed,
                    batch_size,
                    input_tokens,
                    config.vocab_size(),
                    eos,
                );
                let params = GenerationParams {
                    max_new_tokens: output_tokens,
                    min_new_tokens: output_tokens,
                    ..GenerationParams::default()
                };
                let shape = format!("batch {batch_size}, {input_tokens} in, {output_tokens} out");
                if args.warmup {
                    time_generation(&model, tokenizer.as_ref(), &prompts, &params)
                        .with_context(|| format!("{shape}: warmup run"))?;
                }
                for _ in 0..args.repeats {
                    let (ttft, total) =
                        time_generation(&model, tokenizer.as_ref(), &prompts, &params)
                            .with_context(|| format!("{shape}: timed run"))?;
                    row.ttft_ms_runs.push(ttft.as_secs_f64() * 1e3);
                    row.total_ms_runs.push(total.as_secs_f64() * 1e3);
                }
                let ttft_ms = median(&row.ttft_ms_runs);
                let total_ms = median(&row.total_ms_runs);
                row.ttft_ms = Some(ttft_ms);
                row.total_ms = Some(total_ms);
                row.per_token_ms =
                    (output_tokens > 1).then(|| (total_ms - ttft_ms) / (output_tokens - 1) as f64);
                row.tokens_per_s = Some((batch_size * output_tokens) as f64 / (total_ms / 1e3));
                tracing::info!(
                    "{shape}: TTFT {} ms, total {} ms",
                    format_ms(ttft_ms),
                    format_ms(total_ms)
                );
                rows.push(row);
            }
        }
    }

    let report = Report {
        kiln_version: env!("CARGO_PKG_VERSION"),
        date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        machine: Machine {
            cpu: cpu_model(),
            cores: available_cores(),
            threads,
            os: std::env::consts::OS,
            arch: std::env::consts::ARCH,
            load_average,
        },
        model: ModelFacts {
            name,
            model_type: config.model_type(),
            n_layer: config.n_layer(),
            hidden_size: config.hidden_size(),
            n_head: config.n_head(),
            vocab_size: config.vocab_size(),
            context,
            parameters: init::parameter_count(&config),
        },
        dtype: dtype.as_str(),
        device: args.device.clone(),
        repeats: args.repeats,
        warmup: args.warmup,
        seed: args.seed,
        rows,
    };
    let markdown = markdown(&report);
    print!("{markdown}");
    if let Some(path) = &args.markdown {
        crate::atomic_file::write(path, markdown.as_bytes())
            .with_context(|| format!("--markdown {}: cannot write", path.display()))?;
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)? + "\n";
        crate::atomic_file::write(path, json.as_bytes())
            .with_context(|| format!("--json {}: cannot write", path.display()))?;
    }
    Ok(())
}

/// The model, its tokenizer (if its directory has one) and the name the report gives it.
fn load(
    args: &BenchArgs,
    dtype: DType,
    device: &Device,
) -> Result<(model::Model, Option<TextTokenizer>, String)> {
    if let Some(dir) = &args.model {
        let expected = || {
            format!(
                "--model {}: expected a Hugging Face model directory (config.json and safetensors \
                 weights)",
                dir.display()
            )
        };
        let quantization = args.quantize.quantization()?;
        let model =
            model::load_model_quantized(dir, args.adapter.as_deref(), dtype, device, quantization)
                .with_context(expected)?;
        let tokenizer = model_tokenizer(dir, model.config().vocab_size()).with_context(expected)?;
        return Ok((model, tokenizer, dir.display().to_string()));
    }
    let preset = args.preset.expect("clap requires --preset without --model");
    let config = preset.config();
    // Each weight in its dtype (or quantised) as it is made, so that a 6B-shaped preset never
    // exists whole in fp32.
    let quantized = model::quantized::quantized_weights(&config);
    let quantization = args.quantize.quantization()?;
    let mut params = std::collections::HashMap::new();
    for (name, shape) in model::parameter_shapes(&config) {
        let tensor = model::init::init_parameter(&config, &name, &shape, args.seed)?;
        match quantization {
            Some(q) => params.extend(model::quantized::quantize_parameter(
                &quantized, &name, tensor, q,
            )?),
            None => {
                params.insert(name, tensor.to_dtype(dtype)?);
            }
        }
    }
    let model = model::model_from_parameters(&config, &params, dtype, device)?;
    let name = preset
        .to_possible_value()
        .map_or_else(|| format!("{preset:?}"), |v| v.get_name().to_string());
    Ok((model, None, format!("preset {name}")))
}

/// Rejects a length that fits the context with none of the other flag's lengths: such a length
/// would only produce skipped rows. Shapes that merely combine too long an input with too long
/// an output are skipped in the table instead.
fn check_fits_context(inputs: &[usize], outputs: &[usize], context: usize) -> Result<()> {
    let shortest_input = inputs.iter().copied().min().unwrap_or(1);
    let shortest_output = outputs.iter().copied().min().unwrap_or(1);
    if let Some(&output) = outputs.iter().find(|&&o| o >= context) {
        bail!(
            "--output-lengths: {output} new tokens do not fit the model's context of {context} \
             positions even after a 1-token prompt; expected at most {}",
            context - 1
        );
    }
    if let Some(&input) = inputs.iter().find(|&&i| i + shortest_output > context) {
        bail!(
            "--input-lengths: {input} prompt tokens + {shortest_output} new tokens (the shortest \
             of --output-lengths) exceed the model's context of {context} positions; expected at \
             most {}",
            context - shortest_output
        );
    }
    if let Some(&output) = outputs.iter().find(|&&o| shortest_input + o > context) {
        bail!(
            "--output-lengths: {shortest_input} prompt tokens (the shortest of --input-lengths) + \
             {output} new tokens exceed the model's context of {context} positions; expected at \
             most {}",
            context - shortest_input
        );
    }
    Ok(())
}

/// `batch` prompts of exactly `length` ids drawn uniformly from the vocabulary except eos (which
/// a tokenizer would never put inside a prompt), the same for every run of a shape.
fn random_prompts(
    seed: u64,
    batch: usize,
    length: usize,
    vocab_size: usize,
    eos: Option<u32>,
) -> Vec<Vec<u32>> {
    let shape_seed = seed ^ ((batch as u64) << 40) ^ ((length as u64) << 20);
    let mut rng = rand::rngs::StdRng::seed_from_u64(shape_seed);
    let eos = eos.filter(|&e| (e as usize) < vocab_size && vocab_size > 1);
    let choices = vocab_size as u32 - u32::from(eos.is_some());
    (0..batch)
        .map(|_| {
            (0..length)
                .map(|_| {
                    let id = rng.gen_range(0..choices);
                    match eos {
                        Some(eos) if id >= eos => id + 1,
                        _ => id,
                    }
                })
                .collect()
        })
        .collect()
}

/// (time to first token, total time) of one `generate` call. The first token is timed when the
/// streaming callback first fires: every row's first token has then been sampled.
fn time_generation(
    model: &model::Model,
    tokenizer: Option<&TextTokenizer>,
    prompts: &[Vec<u32>],
    params: &GenerationParams,
) -> Result<(Duration, Duration)> {
    let started = Instant::now();
    let mut first_token = None;
    let generated = generate(model, tokenizer, prompts, params, &mut |_, _| {
        first_token.get_or_insert_with(|| started.elapsed());
    })?;
    let total = started.elapsed();
    ensure!(
        generated
            .iter()
            .all(|g| g.ids.len() == params.max_new_tokens),
        "a row stopped before {} new tokens, so the timing would not be of the shape asked for",
        params.max_new_tokens
    );
    Ok((first_token.expect("every row makes a token"), total))
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// About four significant digits: sub-millisecond and multi-second latencies share a column.
fn format_ms(ms: f64) -> String {
    let integer_digits = if ms >= 1.0 {
        ms.log10().floor() as usize + 1
    } else {
        1
    };
    format!("{ms:.*}", 4usize.saturating_sub(integer_digits).min(3))
}

fn markdown(report: &Report) -> String {
    let model = &report.model;
    let machine = &report.machine;
    let mut text = format!(
        "`kiln bench`: {} ({}, {} layers, d {}, {} heads, {} parameters, context {}), {} on {}, \
         {} of {} threads, {}; kiln {}, {}; median of {} run{}{}.\n\n",
        model.name,
        model.model_type,
        model.n_layer,
        model.hidden_size,
        model.n_head,
        model.parameters,
        model.context,
        report.dtype,
        report.device,
        machine.threads,
        machine.cores,
        machine.cpu,
        report.kiln_version,
        report.date,
        report.repeats,
        if report.repeats == 1 { "" } else { "s" },
        if report.warmup { " after a warmup" } else { "" },
    );
    text.push_str(
        "| batch | input tokens | output tokens | TTFT (ms) | per token (ms) | total (ms) | tokens/s |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in &report.rows {
        let cells = match (&row.skipped, row.ttft_ms, row.total_ms, row.tokens_per_s) {
            (Some(reason), ..) => format!("skipped: {reason} | – | – | –"),
            (None, Some(ttft), Some(total), Some(tokens_per_s)) => format!(
                "{} | {} | {} | {tokens_per_s:.1}",
                format_ms(ttft),
                row.per_token_ms.map_or_else(|| "–".to_string(), format_ms),
                format_ms(total)
            ),
            _ => unreachable!("a measured row has every timing"),
        };
        text.push_str(&format!(
            "| {} | {} | {} | {cells} |\n",
            row.batch_size, row.input_tokens, row.output_tokens
        ));
    }
    text
}

/// Fails before the (possibly long) measurement if a report could not be written afterwards.
fn check_writable_dir(flag: &str, path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    ensure!(
        parent.is_dir(),
        "{flag} {}: expected a file in an existing directory ({} does not exist)",
        path.display(),
        parent.display()
    );
    ensure!(
        !path.is_dir(),
        "{flag} {}: expected a file path, found a directory",
        path.display()
    );
    Ok(())
}

fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The CPU's marketing name (Linux's `/proc/cpuinfo`), else the architecture.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_sorted_and_deduplicated() {
        assert_eq!(parse_counts("16, 1,8,8").unwrap(), Counts(vec![1, 8, 16]));
    }

    #[test]
    fn medians_of_odd_and_even_runs() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn milliseconds_keep_about_four_digits() {
        assert_eq!(format_ms(0.01234), "0.012");
        assert_eq!(format_ms(1.23456), "1.235");
        assert_eq!(format_ms(123.456), "123.5");
        assert_eq!(format_ms(12345.6), "12346");
    }

    #[test]
    fn random_prompts_avoid_eos_and_stay_in_the_vocabulary() {
        let prompts = random_prompts(0, 4, 500, 5, Some(2));
        assert!(prompts.iter().flatten().all(|&id| id < 5 && id != 2));
        assert!(prompts.iter().flatten().any(|&id| id == 4));
    }
}
