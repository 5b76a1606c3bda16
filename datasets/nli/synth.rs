//! The bundled NLI dataset (`datasets/nli`) and its small tokenizer, generated from a seed:
//!
//!     cargo run --release --example synth-nli -- --out datasets/nli --seed 0
//!
//! (`tests/data.rs` includes this file to check that the committed files are what it writes.)
//!
//! Every premise states one fact: a subject did something to an object (with an attribute),
//! optionally somewhere and at some time. Hypotheses relate to that fact in fixed ways with
//! varied wording, so labels follow consistent cues a small model can learn:
//! - entailment restates part of the fact or generalises it (object → its kind, subject →
//!   "someone", passive voice, "was in PLACE");
//! - contradiction negates it ("did not", "never", "nobody", "refused to") or changes one part
//!   of it (another attribute, another place, the opposite verb);
//! - neutral adds information the premise does not give (a reason, a beneficiary, a companion,
//!   a feeling, a second object, or a place/time the premise left open).
//!
//! The schema is MNLI's (premise, hypothesis, label 0/1/2 = entailment/neutral/contradiction,
//! genre, idx). Nothing here comes from MNLI.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use kiln::tokenizer::EOS_TOKEN;

pub const LABEL_WORDS: [&str; 3] = ["entailment", "neutral", "contradiction"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct NliRow {
    pub premise: String,
    pub hypothesis: String,
    pub label: u8,
    pub genre: String,
    pub idx: usize,
}

struct Genre {
    name: &'static str,
    subjects: &'static [&'static str],
    /// (noun, the kind it is an instance of)
    objects: &'static [(&'static str, &'static str)],
    places: &'static [&'static str],
    relatives: &'static [&'static str],
    beneficiaries: &'static [&'static str],
}

const GENRES: &[Genre] = &[
    Genre {
        name: "travel",
        subjects: &[
            "the tourist",
            "the guide",
            "the pilot",
            "a backpacker",
            "the hotel manager",
            "the driver",
        ],
        objects: &[
            ("suitcase", "bag"),
            ("map", "document"),
            ("ticket", "document"),
            ("camera", "device"),
            ("jacket", "garment"),
            ("backpack", "bag"),
            ("guidebook", "book"),
            ("umbrella", "thing"),
        ],
        places: &[
            "Lisbon",
            "the station",
            "the airport",
            "Rome",
            "the harbour",
            "Kyoto",
            "the old town",
            "the ferry",
        ],
        relatives: &[
            "who had just landed",
            "who was travelling alone",
            "who spoke four languages",
        ],
        beneficiaries: &["a fellow traveller", "the hotel", "a cousin abroad"],
    },
    Genre {
        name: "fiction",
        subjects: &[
            "the knight",
            "the old witch",
            "the young prince",
            "the sailor",
            "the thief",
            "the queen",
        ],
        objects: &[
            ("sword", "weapon"),
            ("letter", "document"),
            ("lantern", "lamp"),
            ("ring", "jewel"),
            ("key", "thing"),
            ("diary", "book"),
            ("cloak", "garment"),
            ("mirror", "thing"),
        ],
        places: &[
            "the castle",
            "the forest",
            "the tower",
            "the village",
            "the cave",
            "the marsh",
            "the palace",
        ],
        relatives: &["who feared the dark", "who had a secret", "who never slept"],
        beneficiaries: &["the king", "a lost child", "an old friend"],
    },
    Genre {
        name: "news",
        subjects: &[
            "the mayor",
            "the minister",
            "a reporter",
            "the senator",
            "the police chief",
            "the clerk",
        ],
        objects: &[
            ("report", "document"),
            ("laptop", "computer"),
            ("flag", "thing"),
            ("microphone", "device"),
            ("car", "vehicle"),
            ("file", "document"),
            ("badge", "thing"),
            ("phone", "device"),
        ],
        places: &[
            "the city hall",
            "the parliament",
            "the courthouse",
            "the press room",
            "Berlin",
            "the capital",
        ],
        relatives: &[
            "who was up for election",
            "who had resigned",
            "who led the inquiry",
        ],
        beneficiaries: &["the council", "a local charity", "the committee"],
    },
    Genre {
        name: "science",
        subjects: &[
            "the chemist",
            "the biologist",
            "a student",
            "the astronomer",
            "the lab assistant",
            "the professor",
        ],
        objects: &[
            ("microscope", "instrument"),
            ("sample", "specimen"),
            ("telescope", "instrument"),
            ("notebook", "book"),
            ("battery", "device"),
            ("fossil", "specimen"),
            ("thermometer", "instrument"),
        ],
        places: &[
            "the laboratory",
            "the museum",
            "the observatory",
            "the field station",
            "the library",
            "Geneva",
        ],
        relatives: &[
            "who studied beetles",
            "who had won a prize",
            "who worked at night",
        ],
        beneficiaries: &["the department", "a rival team", "the museum"],
    },
    Genre {
        name: "sports",
        subjects: &[
            "the coach",
            "the goalkeeper",
            "a runner",
            "the captain",
            "the referee",
            "the cyclist",
        ],
        objects: &[
            ("ball", "piece of equipment"),
            ("bicycle", "vehicle"),
            ("racket", "piece of equipment"),
            ("helmet", "piece of equipment"),
            ("trophy", "prize"),
            ("medal", "prize"),
            ("shoe", "garment"),
        ],
        places: &[
            "the stadium",
            "the gym",
            "the track",
            "the locker room",
            "Madrid",
            "the training ground",
        ],
        relatives: &[
            "who had been injured",
            "who trained every day",
            "who was new to the team",
        ],
        beneficiaries: &["the team", "a young fan", "the club"],
    },
];

const NAMES: &[&str] = &[
    "Maria", "John", "Aiko", "Pedro", "Fatima", "Lars", "Chen", "Amara", "Tomas", "Priya", "Omar",
    "Elena", "Kofi", "Sofia", "Ivan", "Grace", "Mateo", "Yuki", "Hannah", "Ravi",
];

/// (past, base, past participle) and the verb that undoes it.
const VERBS: &[([&str; 3], [&str; 3])] = &[
    (["bought", "buy", "bought"], ["sold", "sell", "sold"]),
    (["found", "find", "found"], ["lost", "lose", "lost"]),
    (
        ["repaired", "repair", "repaired"],
        ["broke", "break", "broken"],
    ),
    (
        ["kept", "keep", "kept"],
        ["threw away", "throw away", "thrown away"],
    ),
    (
        ["carried", "carry", "carried"],
        ["left behind", "leave behind", "left behind"],
    ),
    (
        ["cleaned", "clean", "cleaned"],
        ["damaged", "damage", "damaged"],
    ),
    (
        ["borrowed", "borrow", "borrowed"],
        ["gave away", "give away", "given away"],
    ),
];

/// Each adjective's opposite; colours have none and change to another colour.
const ADJECTIVES: &[(&str, Option<&str>)] = &[
    ("old", Some("new")),
    ("new", Some("old")),
    ("small", Some("large")),
    ("large", Some("small")),
    ("cheap", Some("expensive")),
    ("expensive", Some("cheap")),
    ("heavy", Some("light")),
    ("light", Some("heavy")),
    ("red", None),
    ("blue", None),
    ("green", None),
    ("black", None),
    ("white", None),
    ("yellow", None),
];
const COLOURS: &[&str] = &["red", "blue", "green", "black", "white", "yellow"];

const TIMES: &[&str] = &[
    "on Monday",
    "last summer",
    "in the morning",
    "after lunch",
    "yesterday",
    "at dawn",
    "in the evening",
    "last week",
    "on Friday night",
    "during the storm",
];
const REASONS: &[&str] = &[
    "it was on sale",
    "a friend had asked",
    "the weather was bad",
    "it reminded them of home",
    "the old one was useless",
    "there was nothing else to do",
    "everyone else had one",
];
const COMPANIONS: &[&str] = &[
    "a colleague",
    "two friends",
    "a neighbour",
    "the whole family",
    "a stranger",
];
const FEELINGS: &[&str] = &["happy", "proud", "nervous", "sad", "relieved", "surprised"];
const PROFESSIONS: &[&str] = &[
    "teacher", "nurse", "baker", "lawyer", "farmer", "painter", "engineer",
];

/// One fact a premise states.
struct Fact<'g> {
    genre: &'g Genre,
    subject: String,
    verb: usize,
    object: (&'static str, &'static str),
    adjective: &'static str,
    place: Option<&'static str>,
    time: Option<&'static str>,
}

fn article(phrase: &str) -> String {
    let vowel = phrase.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {phrase}", if vowel { "an" } else { "a" })
}

fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn sentence(words: &str) -> String {
    format!("{}.", capitalise(words))
}

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    items.choose(rng).expect("non-empty word list")
}

fn other<'a>(rng: &mut StdRng, items: &'a [&'a str], not: &str) -> &'a str {
    loop {
        let x = *pick(rng, items);
        if x != not {
            return x;
        }
    }
}

impl<'g> Fact<'g> {
    fn draw(rng: &mut StdRng, genre: &'g Genre) -> Self {
        let subject = if rng.gen_bool(0.5) {
            pick(rng, NAMES).to_string()
        } else {
            pick(rng, genre.subjects).to_string()
        };
        Fact {
            genre,
            subject,
            verb: rng.gen_range(0..VERBS.len()),
            object: *pick(rng, genre.objects),
            adjective: pick(rng, ADJECTIVES).0,
            place: rng.gen_bool(0.75).then(|| *pick(rng, genre.places)),
            time: rng.gen_bool(0.6).then(|| *pick(rng, TIMES)),
        }
    }

    fn past(&self) -> &'static str {
        VERBS[self.verb].0[0]
    }
    fn base(&self) -> &'static str {
        VERBS[self.verb].0[1]
    }
    fn participle(&self) -> &'static str {
        VERBS[self.verb].0[2]
    }
    fn full_object(&self) -> String {
        article(&format!("{} {}", self.adjective, self.object.0))
    }
    fn the_object(&self) -> String {
        format!("the {}", self.object.0)
    }
    fn place_phrase(&self) -> String {
        self.place.map(|p| format!(" in {p}")).unwrap_or_default()
    }
    fn time_phrase(&self) -> String {
        self.time.map(|t| format!(" {t}")).unwrap_or_default()
    }

    fn premise(&self, rng: &mut StdRng) -> String {
        let (s, v, o) = (&self.subject, self.past(), self.full_object());
        let (place, time) = (self.place_phrase(), self.time_phrase());
        match rng.gen_range(0..4) {
            0 if self.time.is_some() => {
                sentence(&format!("{}, {s} {v} {o}{place}", self.time.unwrap()))
            }
            1 if self.place.is_some() => {
                sentence(&format!("in {}, {s} {v} {o}{time}", self.place.unwrap()))
            }
            2 => sentence(&format!(
                "{s}, {}, {v} {o}{place}{time}",
                pick(rng, self.genre.relatives)
            )),
            _ => sentence(&format!("{s} {v} {o}{place}{time}")),
        }
    }

    fn entailment(&self, rng: &mut StdRng) -> String {
        let (s, v) = (&self.subject, self.past());
        loop {
            let h = match rng.gen_range(0..7) {
                0 => format!(
                    "{s} {v} {}{}{}",
                    article(self.object.0),
                    self.place_phrase(),
                    self.time_phrase()
                ),
                1 => format!("{s} {v} {}", article(self.object.1)),
                2 => format!(
                    "someone {v} {}{}{}",
                    self.full_object(),
                    self.place_phrase(),
                    self.time_phrase()
                ),
                3 if self.place.is_some() => {
                    format!("{s} was in {}{}", self.place.unwrap(), self.time_phrase())
                }
                4 => format!("{} was {} by {s}", self.full_object(), self.participle()),
                5 => format!("{s} {v} something {}", self.adjective),
                6 => format!(
                    "a person {v} {}{}",
                    article(self.object.1),
                    self.place_phrase()
                ),
                _ => continue,
            };
            return sentence(&h);
        }
    }

    fn contradiction(&self, rng: &mut StdRng) -> String {
        let (s, v, the) = (&self.subject, self.past(), self.the_object());
        loop {
            let h = match rng.gen_range(0..8) {
                0 => format!("{s} did not {} {the}{}", self.base(), self.place_phrase()),
                1 => format!("{s} never {v} {}", article(self.object.0)),
                2 => format!(
                    "nobody {v} {}{}",
                    article(self.object.0),
                    self.time_phrase()
                ),
                3 if self.place.is_some() => {
                    format!("{s} has never been to {}", self.place.unwrap())
                }
                4 => format!("{s} refused to {} {the}{}", self.base(), self.time_phrase()),
                5 => {
                    let changed = match ADJECTIVES.iter().find(|(a, _)| *a == self.adjective) {
                        Some((_, Some(opposite))) => opposite.to_string(),
                        _ => other(rng, COLOURS, self.adjective).to_string(),
                    };
                    format!(
                        "{s} {v} {}{}",
                        article(&format!("{changed} {}", self.object.0)),
                        self.time_phrase()
                    )
                }
                6 if self.place.is_some() => {
                    let elsewhere = other(rng, self.genre.places, self.place.unwrap());
                    format!("{s} {v} {the} in {elsewhere}")
                }
                7 => format!("{s} {} {}", VERBS[self.verb].1[0], self.full_object()),
                _ => continue,
            };
            return sentence(&h);
        }
    }

    fn neutral(&self, rng: &mut StdRng) -> String {
        let (s, v, the) = (&self.subject, self.past(), self.the_object());
        loop {
            let h = match rng.gen_range(0..9) {
                0 => format!("{s} {v} {the} because {}", pick(rng, REASONS)),
                1 => format!("{s} {v} {the} for {}", pick(rng, self.genre.beneficiaries)),
                2 => format!(
                    "{s} {v} {} with {}",
                    self.full_object(),
                    pick(rng, COMPANIONS)
                ),
                3 => format!("{s} was {} to {} {the}", pick(rng, FEELINGS), self.base()),
                4 => {
                    let second = loop {
                        let o = pick(rng, self.genre.objects).0;
                        if o != self.object.0 {
                            break o;
                        }
                    };
                    format!("{s} also {v} {}", article(second))
                }
                5 if self.time.is_none() => format!("{s} {v} {the} {}", pick(rng, TIMES)),
                6 if self.place.is_none() => {
                    format!("{s} {v} {the} in {}", pick(rng, self.genre.places))
                }
                7 if NAMES.contains(&s.as_str()) => format!("{s} is a {}", pick(rng, PROFESSIONS)),
                8 => format!("{s} felt {} that day", pick(rng, FEELINGS)),
                _ => continue,
            };
            return sentence(&h);
        }
    }
}

/// `n` rows drawn with `rng`, labels balanced (cycled, then shuffled), none in `exclude`.
pub fn generate(rng: &mut StdRng, n: usize, exclude: &HashSet<(String, String)>) -> Vec<NliRow> {
    let mut labels: Vec<u8> = (0..n).map(|i| (i % 3) as u8).collect();
    labels.shuffle(rng);
    let mut seen = exclude.clone();
    let mut rows = Vec::with_capacity(n);
    for label in labels {
        loop {
            let genre = pick(rng, GENRES);
            let fact = Fact::draw(rng, genre);
            let premise = fact.premise(rng);
            let hypothesis = match label {
                0 => fact.entailment(rng),
                1 => fact.neutral(rng),
                _ => fact.contradiction(rng),
            };
            if seen.insert((premise.clone(), hypothesis.clone())) {
                rows.push(NliRow {
                    premise,
                    hypothesis,
                    label,
                    genre: genre.name.to_string(),
                    idx: rows.len(),
                });
                break;
            }
        }
    }
    rows
}

/// Graphcore's MNLI format, the text the tokenizer is trained on.
pub fn mnli_text(row: &NliRow) -> String {
    format!(
        "mnli hypothesis: {} premise: {} target: {}{EOS_TOKEN}",
        row.hypothesis, row.premise, LABEL_WORDS[row.label as usize]
    )
}

/// A byte-level BPE (GPT-2's pre-tokenizer and decoder) trained on `texts`, with `<|endoftext|>`.
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;
    use tokenizers::{AddedToken, Tokenizer};

    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    // GPT-2's settings: split on its regex, no prefix space, offsets left untrimmed.
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_post_processor(Some(ByteLevelProcessor::new(true, false, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    // The special token must not be split into bytes while training.
    let texts: Vec<&str> = texts
        .iter()
        .map(|t| t.trim_end_matches(EOS_TOKEN))
        .collect();
    tokenizer
        .train(&mut trainer, texts.into_iter())
        .map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    tokenizer
        .add_special_tokens([AddedToken::from(EOS_TOKEN, true)])
        .map_err(|e| anyhow!("adding {EOS_TOKEN}: {e}"))?;
    Ok(tokenizer)
}

pub struct SynthConfig {
    pub seed: u64,
    pub train_rows: usize,
    pub validation_rows: usize,
    pub vocab_size: usize,
}

/// What [`write_dataset`] wrote.
pub struct SynthSummary {
    pub files: Vec<PathBuf>,
    pub vocab_size: usize,
}

/// Writes `train.jsonl`, `validation.jsonl` and `tokenizer/tokenizer.json` under `out`. Each file
/// goes to a temporary file first and is renamed into place, so an interrupted run leaves the
/// previous files intact.
pub fn write_dataset(out: &Path, config: &SynthConfig) -> Result<SynthSummary> {
    let mut rng = StdRng::seed_from_u64(config.seed);
    let train = generate(&mut rng, config.train_rows, &HashSet::new());
    let seen: HashSet<(String, String)> = train
        .iter()
        .map(|r| (r.premise.clone(), r.hypothesis.clone()))
        .collect();
    let validation = generate(&mut rng, config.validation_rows, &seen);
    let texts: Vec<String> = train.iter().chain(&validation).map(mnli_text).collect();
    let tokenizer = train_tokenizer(&texts, config.vocab_size)?;
    let tokenizer_dir = out.join("tokenizer");
    std::fs::create_dir_all(&tokenizer_dir)
        .with_context(|| format!("{}: cannot create", tokenizer_dir.display()))?;
    let mut files = Vec::new();
    for (name, rows) in [("train.jsonl", &train), ("validation.jsonl", &validation)] {
        let mut text = String::new();
        for row in rows.iter() {
            text.push_str(&serde_json::to_string(row)?);
            text.push('\n');
        }
        let path = out.join(name);
        kiln::atomic_file::write(&path, text.as_bytes())?;
        files.push(path);
    }
    let json = tokenizer
        .to_string(false)
        .map_err(|e| anyhow!("serialising the tokenizer: {e}"))?;
    let path = tokenizer_dir.join("tokenizer.json");
    kiln::atomic_file::write(&path, json.as_bytes())?;
    files.push(path);
    Ok(SynthSummary {
        files,
        vocab_size: tokenizer.get_vocab_size(true),
    })
}

/// Generate the bundled NLI dataset (MNLI schema) and train its tokenizer.
#[derive(clap::Parser)]
struct Args {
    /// Output directory (train.jsonl, validation.jsonl, tokenizer/tokenizer.json).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 6000)]
    train_rows: usize,
    #[arg(long, default_value_t = 600)]
    validation_rows: usize,
    /// Tokenizer vocabulary size, `<|endoftext|>` included.
    #[arg(long, default_value_t = 1024)]
    vocab_size: usize,
}

// Unused where tests include this file as a module.
#[allow(dead_code)]
fn main() -> Result<()> {
    let args = <Args as clap::Parser>::parse();
    let config = SynthConfig {
        seed: args.seed,
        train_rows: args.train_rows,
        validation_rows: args.validation_rows,
        vocab_size: args.vocab_size,
    };
    let summary = write_dataset(&args.out, &config)?;
    println!(
        "wrote {} (seed {}; tokenizer vocabulary {})",
        summary
            .files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        args.seed,
        summary.vocab_size
    );
    Ok(())
}
