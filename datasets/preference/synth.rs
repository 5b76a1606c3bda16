//! The bundled preference dataset (`datasets/preference`), generated from a seed:
//!
//!     cargo run --release --example synth-preference -- --out datasets/preference --seed 0
//!
//! (`tests/preference.rs` includes this file to check that the committed files are what it
//! writes.)
//!
//! Each row is TRL's standard preference format, `{"prompt", "chosen", "rejected"}`, strings: a
//! question and two answers, the chosen one right and polite, the rejected one wrong or curt.
//! The questions: which of two numbers is larger, the capital of a country (from a fixed table,
//! the rejected answer naming another capital), and requests answered helpfully or brushed off.
//! Validation rows use number pairs no training row uses.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreferenceRow {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

const CAPITALS: &[(&str, &str)] = &[
    ("France", "Paris"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Portugal", "Lisbon"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Japan", "Tokyo"),
    ("Peru", "Lima"),
    ("Canada", "Ottawa"),
];

/// Requests, with a helpful answer and a curt one.
const REQUESTS: &[(&str, &str, &str)] = &[
    ("Please say hello.", "Hello! It is nice to meet you.", "No."),
    (
        "Can you help me?",
        "Of course. What do you need?",
        "Ask someone else.",
    ),
    (
        "Thank you for your help.",
        "You are welcome. Have a good day!",
        "Whatever.",
    ),
    (
        "Tell me something kind.",
        "You are doing well, and that is worth saying.",
        "I would rather not.",
    ),
    (
        "Good morning!",
        "Good morning! How can I help you today?",
        "Go away.",
    ),
];

/// One row for the number pair `(a, b)` (`a != b`).
fn larger(a: u32, b: u32) -> PreferenceRow {
    let (big, small) = (a.max(b), a.min(b));
    PreferenceRow {
        prompt: format!("Question: which is larger, {a} or {b}? Answer:"),
        chosen: format!(" {big} is larger than {small}."),
        rejected: format!(" {small} is larger than {big}."),
    }
}

fn capital(rng: &mut StdRng) -> PreferenceRow {
    let (country, city) = CAPITALS[rng.gen_range(0..CAPITALS.len())];
    let wrong = loop {
        let (_, other) = CAPITALS[rng.gen_range(0..CAPITALS.len())];
        if other != city {
            break other;
        }
    };
    PreferenceRow {
        prompt: format!("Question: what is the capital of {country}? Answer:"),
        chosen: format!(" The capital of {country} is {city}."),
        rejected: format!(" The capital of {country} is {wrong}."),
    }
}

fn request(rng: &mut StdRng) -> PreferenceRow {
    let (ask, kind, curt) = REQUESTS[rng.gen_range(0..REQUESTS.len())];
    PreferenceRow {
        prompt: format!("User: {ask} Assistant:"),
        chosen: format!(" {kind}"),
        rejected: format!(" {curt}"),
    }
}

/// `train` and `validation` rows: half number comparisons (validation's pairs unseen in
/// training), a third capitals, the rest requests.
pub fn generate(
    seed: u64,
    train: usize,
    validation: usize,
) -> (Vec<PreferenceRow>, Vec<PreferenceRow>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pairs: Vec<(u32, u32)> = (10..100)
        .flat_map(|a| (10..100).map(move |b| (a, b)))
        .filter(|(a, b)| a != b)
        .collect();
    pairs.shuffle(&mut rng);
    let held_out: HashSet<(u32, u32)> = pairs[..validation].iter().copied().collect();
    let mut unseen = pairs[..validation].iter().copied();
    let mut seen = pairs.iter().copied().filter(|p| !held_out.contains(p));
    let rows = |n: usize, numbers: &mut dyn Iterator<Item = (u32, u32)>, rng: &mut StdRng| {
        (0..n)
            .map(|i| match i % 6 {
                0..=2 => {
                    let (a, b) = numbers.next().expect("enough number pairs");
                    larger(a, b)
                }
                3 | 4 => capital(rng),
                _ => request(rng),
            })
            .collect::<Vec<_>>()
    };
    let train_rows = rows(train, &mut seen, &mut rng);
    let validation_rows = rows(validation, &mut unseen, &mut rng);
    (train_rows, validation_rows)
}

fn write_jsonl(path: &Path, rows: &[PreferenceRow]) -> Result<()> {
    let mut text = String::new();
    for row in rows {
        text.push_str(&serde_json::to_string(row)?);
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("{}: cannot write", path.display()))
}

/// Writes `train.jsonl` and `validation.jsonl` into `out`.
pub fn write(out: &Path, seed: u64, train: usize, validation: usize) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let (train_rows, validation_rows) = generate(seed, train, validation);
    write_jsonl(&out.join("train.jsonl"), &train_rows)?;
    write_jsonl(&out.join("validation.jsonl"), &validation_rows)
}

/// The committed files' sizes.
pub const TRAIN_ROWS: usize = 1200;
pub const VALIDATION_ROWS: usize = 120;

#[allow(dead_code)]
fn main() -> Result<()> {
    let mut out = PathBuf::from("datasets/preference");
    let mut seed = 0u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or_else(|| anyhow!("{arg} needs a value"))?;
        match arg.as_str() {
            "--out" => out = PathBuf::from(value),
            "--seed" => seed = value.parse()?,
            other => return Err(anyhow!("unknown option {other} (--out DIR, --seed N)")),
        }
    }
    write(&out, seed, TRAIN_ROWS, VALIDATION_ROWS)?;
    println!(
        "wrote {} ({TRAIN_ROWS} train and {VALIDATION_ROWS} validation pairs)",
        out.display()
    );
    Ok(())
}
