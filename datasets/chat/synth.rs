//! The bundled conversation dataset (`datasets/chat`), generated from a seed:
//!
//!     cargo run --release --example synth-chat -- --out datasets/chat --seed 0
//!
//! (`tests/chat.rs` includes this file to check that the committed files are what it writes.)
//!
//! Each row is `{"messages": [{role, content}, ...]}` in the OpenAI / Hugging Face chat format:
//! an optional system prompt, then one to three exchanges of a user asking and the assistant
//! answering. The assistant's answers follow fixed rules a small model learns quickly: repeating
//! a phrase, the capital of a country (from a fixed table), the colour of a thing, and greetings.
//! Validation rows use phrases that no training row repeats.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ChatRow {
    pub messages: Vec<ChatMessage>,
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
    ("Finland", "Helsinki"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Canada", "Ottawa"),
];

const COLOURS: &[(&str, &str)] = &[
    ("a banana", "yellow"),
    ("grass", "green"),
    ("the sky", "blue"),
    ("snow", "white"),
    ("coal", "black"),
    ("a tomato", "red"),
    ("an orange", "orange"),
    ("a plum", "purple"),
    ("chocolate", "brown"),
    ("a lemon", "yellow"),
    ("a strawberry", "red"),
    ("milk", "white"),
];

const WORDS: &[&str] = &[
    "red", "green", "quiet", "river", "stone", "little", "bright", "garden", "window", "happy",
    "morning", "cloud", "silver", "forest", "gentle", "orange", "paper", "candle", "music",
    "summer", "winter", "ocean", "mountain", "yellow", "basket", "lantern", "tiger", "rabbit",
    "pocket", "thunder", "velvet", "marble", "copper", "meadow", "harbor", "island", "pepper",
    "ribbon", "saddle", "window", "feather", "pebble", "honey", "violet", "comet", "planet",
];

const SYSTEM: &str = "You are a helpful assistant. Answer briefly.";

pub struct SynthConfig {
    pub seed: u64,
    pub train_rows: usize,
    pub validation_rows: usize,
}

fn message(role: &str, content: String) -> ChatMessage {
    ChatMessage {
        role: role.to_string(),
        content,
    }
}

fn phrase(rng: &mut StdRng) -> String {
    let n = rng.gen_range(2..=5);
    (0..n)
        .map(|_| *WORDS.choose(rng).expect("words"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One exchange: (the user's turn, the assistant's answer). `avoid` holds phrases another split
/// uses; `used` collects this split's.
fn exchange(
    rng: &mut StdRng,
    avoid: &HashSet<String>,
    used: &mut HashSet<String>,
) -> (String, String) {
    match rng.gen_range(0..4) {
        0 => loop {
            let p = phrase(rng);
            if avoid.contains(&p) {
                continue;
            }
            used.insert(p.clone());
            let ask = [
                "Please repeat: ",
                "Say this back to me: ",
                "Repeat after me: ",
            ]
            .choose(rng)
            .expect("asks");
            break (format!("{ask}{p}"), p);
        },
        1 => {
            let (country, capital) = CAPITALS.choose(rng).expect("capitals");
            let ask = [
                "What is the capital of {}?",
                "Which city is the capital of {}?",
            ]
            .choose(rng)
            .expect("asks");
            (
                ask.replace("{}", country),
                format!("The capital of {country} is {capital}."),
            )
        }
        2 => {
            let (thing, colour) = COLOURS.choose(rng).expect("colours");
            (
                format!("What colour is {thing}?"),
                format!("{} is {colour}.", capitalise(thing)),
            )
        }
        _ => {
            let greeting = ["Hello!", "Hi there.", "Good morning!"]
                .choose(rng)
                .expect("greetings");
            (
                greeting.to_string(),
                "Hello! How can I help you?".to_string(),
            )
        }
    }
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().collect::<String>() + chars.as_str(),
        None => String::new(),
    }
}

fn conversations(
    rng: &mut StdRng,
    rows: usize,
    avoid: &HashSet<String>,
    used: &mut HashSet<String>,
) -> Vec<ChatRow> {
    (0..rows)
        .map(|_| {
            let mut messages = Vec::new();
            if rng.gen_bool(0.3) {
                messages.push(message("system", SYSTEM.to_string()));
            }
            for _ in 0..rng.gen_range(1..=3) {
                let (ask, answer) = exchange(rng, avoid, used);
                messages.push(message("user", ask));
                messages.push(message("assistant", answer));
            }
            ChatRow { messages }
        })
        .collect()
}

/// Writes `train.jsonl` and `validation.jsonl` into `out`.
pub fn write_dataset(out: &Path, config: &SynthConfig) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut train_phrases = HashSet::new();
    let train = conversations(
        &mut rng,
        config.train_rows,
        &HashSet::new(),
        &mut train_phrases,
    );
    let validation = conversations(
        &mut rng,
        config.validation_rows,
        &train_phrases,
        &mut HashSet::new(),
    );
    for (name, rows) in [("train.jsonl", &train), ("validation.jsonl", &validation)] {
        let mut text = String::new();
        for row in rows {
            text.push_str(&serde_json::to_string(row)?);
            text.push('\n');
        }
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[allow(dead_code)]
fn main() -> Result<()> {
    let mut out = PathBuf::from("datasets/chat");
    let mut config = SynthConfig {
        seed: 0,
        train_rows: 2000,
        validation_rows: 200,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--out" => out = PathBuf::from(value()?),
            "--seed" => config.seed = value()?.parse()?,
            "--train-rows" => config.train_rows = value()?.parse()?,
            "--validation-rows" => config.validation_rows = value()?.parse()?,
            other => return Err(anyhow!("unknown argument {other}")),
        }
    }
    write_dataset(&out, &config)?;
    println!(
        "wrote {} and {} conversations to {}",
        config.train_rows,
        config.validation_rows,
        out.display()
    );
    Ok(())
}
