//! Preference pairs (`template: preference`): rows of `prompt`, `chosen` and `rejected`, as TRL
//! reads them — strings, or conversations (lists of `{role, content}`) rendered with the chat
//! template — tokenised as TRL's `DPOTrainer` tokenises them, into one sequence per completion
//! whose loss covers the completion's tokens.
//!
//! As TRL 1.16: string completions get the end-of-sequence token appended unless they end with
//! it; the prompt, `prompt + chosen` and `prompt + rejected` are each tokenised whole, and the
//! completions start where the tokenised prompt stops being a prefix of both; a row without a
//! `prompt` has it taken as the start `chosen` and `rejected` share (`extract_prompt`). A
//! sequence longer than `data.seq_len` (TRL's `max_length`) is refused (`truncation: error`),
//! cut at its end (`right`, TRL's `keep_start`; a pair whose prompt alone fills `seq_len` is
//! dropped, as TRL drops it), or cut at its start (`left`, TRL's `keep_end`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use super::chat::{messages_in, ChatTemplate, Message};
use super::prepare::{load_split_records, LoadedDataset, SourceStats, Split};
use super::source::Row;
use super::Sequence;
use crate::recipe::{Recipe, Truncation};
use crate::tokenizer::TextTokenizer;

/// One preference pair: the prompt followed by the chosen completion, and by the rejected one,
/// each trained on its completion only.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub chosen: Sequence,
    pub rejected: Sequence,
    /// The reference model's log-probabilities of the chosen and the rejected completion, when
    /// they were computed before training (`objective.precompute_ref_log_probs`).
    pub reference: Option<[f64; 2]>,
}

impl PreferencePair {
    /// Both sequences' tokens.
    pub fn len(&self) -> usize {
        self.chosen.len() + self.rejected.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The prompt's tokens (those the two sequences share before their completions).
    pub fn prompt_len(&self) -> usize {
        prompt_len_of(&self.chosen)
    }

    /// Whether each of the two sequences trains at least one predicted token.
    fn trains_both(&self) -> bool {
        self.chosen.target_count() > 0 && self.rejected.target_count() > 0
    }
}

/// The untrained tokens a pair's sequence starts with: its prompt (after `truncation: left`,
/// what is left of it may differ between the two sequences of a pair).
pub fn prompt_len_of(sequence: &Sequence) -> usize {
    sequence.loss_mask.iter().take_while(|&&m| !m).count()
}

/// A pair's three parts as the row gives them: text, or conversations.
#[derive(Debug, Clone, PartialEq)]
enum Parts {
    Text {
        prompt: String,
        chosen: String,
        rejected: String,
    },
    Chat {
        prompt: Vec<Message>,
        chosen: Vec<Message>,
        rejected: Vec<Message>,
    },
}

/// The source column of template field `field` under a dataset's `columns` mapping.
fn column<'a>(columns: &'a Columns, field: &'a str) -> &'a str {
    columns.get(field).map_or(field, String::as_str)
}

type Columns = std::collections::BTreeMap<String, String>;

/// Checks that every row of `records` is a preference pair (`kiln recipe check`).
pub fn check_rows(spec: &crate::recipe::DatasetSpec, records: &super::Records) -> Result<()> {
    for (i, row) in records.rows.iter().enumerate() {
        parts_of(&spec.columns, row, &records.locate(i))?;
    }
    Ok(())
}

/// The pair of a row (`at` naming it), its parts as written.
fn parts_of(dataset: &Columns, row: &Row, at: &str) -> Result<Parts> {
    let get = |field: &str| -> Result<Option<&Value>> {
        let name = column(dataset, field);
        match row.get(name) {
            None | Some(Value::Null) if field == "prompt" => Ok(None),
            None | Some(Value::Null) => bail!(
                "{at}: no `{name}` column (preference rows need `chosen` and `rejected`, and \
                 usually a `prompt`; rename columns with `columns:`)"
            ),
            Some(value) => Ok(Some(value)),
        }
    };
    let (prompt, chosen, rejected) = (get("prompt")?, get("chosen")?, get("rejected")?);
    let conversational = matches!(chosen, Some(Value::Array(_)));
    if conversational {
        let messages = |field: &str, value: &Value| messages_in(value, column(dataset, field), at);
        let (chosen, rejected) = (
            messages("chosen", chosen.expect("present"))?,
            messages("rejected", rejected.expect("present"))?,
        );
        return Ok(match prompt {
            Some(prompt) => Parts::Chat {
                prompt: messages("prompt", prompt)?,
                chosen,
                rejected,
            },
            None => {
                let (prompt, chosen, rejected) = split_shared_start(&chosen, &rejected);
                Parts::Chat {
                    prompt,
                    chosen,
                    rejected,
                }
            }
        });
    }
    let text = |field: &str, value: &Value| -> Result<String> {
        match value {
            Value::String(s) => Ok(s.clone()),
            other => bail!(
                "{at}: `{}` is {}, expected a string (or, for conversations, a list of \
                 {{role, content}} in chosen, rejected and prompt alike)",
                column(dataset, field),
                kind(other)
            ),
        }
    };
    let (chosen, rejected) = (
        text("chosen", chosen.expect("present"))?,
        text("rejected", rejected.expect("present"))?,
    );
    Ok(match prompt {
        Some(prompt) => Parts::Text {
            prompt: text("prompt", prompt)?,
            chosen,
            rejected,
        },
        None => {
            let (chosen, rejected): (Vec<char>, Vec<char>) =
                (chosen.chars().collect(), rejected.chars().collect());
            let (prompt, chosen, rejected) = split_shared_start(&chosen, &rejected);
            let text = |chars: Vec<char>| chars.into_iter().collect::<String>();
            Parts::Text {
                prompt: text(prompt),
                chosen: text(chosen),
                rejected: text(rejected),
            }
        }
    })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// TRL's `extract_prompt` for rows without a prompt: the prompt is what `chosen` and `rejected`
/// share from the start (characters, or whole turns), a space before the first difference going
/// to the completions; when one is a prefix of the other, the last shared item stays in the
/// completions, as there.
fn split_shared_start<T: Clone + PartialEq + AsSpace>(
    chosen: &[T],
    rejected: &[T],
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let shortest = chosen.len().min(rejected.len());
    let mut at = shortest.saturating_sub(1);
    if let Some(first_difference) = (0..shortest).find(|&i| chosen[i] != rejected[i]) {
        at = first_difference;
        if at > 0 && chosen[at - 1].is_space() {
            at -= 1;
        }
    }
    (
        chosen[..at].to_vec(),
        chosen[at..].to_vec(),
        rejected[at..].to_vec(),
    )
}

trait AsSpace {
    fn is_space(&self) -> bool;
}

impl AsSpace for char {
    fn is_space(&self) -> bool {
        *self == ' '
    }
}

impl AsSpace for Message {
    fn is_space(&self) -> bool {
        false
    }
}

/// The pair's token ids: the prompt's tokens, then each completion's, as TRL finds them.
#[derive(Debug, Clone, PartialEq)]
struct TokenizedPair {
    prompt_chosen: Vec<u32>,
    prompt_rejected: Vec<u32>,
    prompt_len: usize,
}

fn tokenize_parts(
    parts: &Parts,
    tokenizer: &TextTokenizer,
    chat: Option<&ChatTemplate>,
    at: &str,
) -> Result<TokenizedPair> {
    let encode = |text: &str| tokenizer.encode(text).with_context(|| at.to_string());
    let (prompt, prompt_chosen, prompt_rejected) = match parts {
        Parts::Text {
            prompt,
            chosen,
            rejected,
        } => {
            let eos = tokenizer
                .id_to_token(tokenizer.eos_id())
                .context("the tokenizer has no end-of-sequence token")?;
            let ended = |completion: &str| match completion.ends_with(&eos) {
                true => completion.to_string(),
                false => format!("{completion}{eos}"),
            };
            (
                encode(prompt)?,
                encode(&format!("{prompt}{}", ended(chosen)))?,
                encode(&format!("{prompt}{}", ended(rejected)))?,
            )
        }
        Parts::Chat {
            prompt,
            chosen,
            rejected,
        } => {
            let template = chat.context("conversations need a chat template")?;
            let render = |messages: &[Message], generation_prompt: bool| -> Result<Vec<u32>> {
                let text = (template.render(messages, generation_prompt))
                    .with_context(|| at.to_string())?;
                encode(&text)
            };
            let whole = |completion: &[Message]| {
                let mut messages = prompt.clone();
                messages.extend_from_slice(completion);
                messages
            };
            (
                render(prompt, true)?,
                render(&whole(chosen), false)?,
                render(&whole(rejected), false)?,
            )
        }
    };
    let shared = |ids: &[u32]| prompt.iter().zip(ids).take_while(|(a, b)| a == b).count();
    let prompt_len = shared(&prompt_chosen).min(shared(&prompt_rejected));
    Ok(TokenizedPair {
        prompt_chosen,
        prompt_rejected,
        prompt_len,
    })
}

/// What `truncation` makes of a pair longer than `seq_len`: its two sequences, or `None` when
/// it is dropped (its prompt alone fills `seq_len` and the end is cut: nothing would be
/// trained). `cut` counts the sequences that were shortened.
fn fit(
    pair: TokenizedPair,
    seq_len: usize,
    truncation: Truncation,
    at: &str,
    cut: &mut usize,
) -> Result<Option<PreferencePair>> {
    let TokenizedPair {
        prompt_chosen,
        prompt_rejected,
        prompt_len,
    } = pair;
    let sequence = |ids: Vec<u32>| {
        let loss_mask = (0..ids.len()).map(|i| i >= prompt_len).collect();
        Sequence::new(ids, loss_mask)
    };
    let (chosen, rejected) = (sequence(prompt_chosen), sequence(prompt_rejected));
    let longest = chosen.len().max(rejected.len());
    if longest <= seq_len {
        return Ok(Some(PreferencePair {
            chosen,
            rejected,
            reference: None,
        }));
    }
    let mut shorten = |s: Sequence| {
        let len = s.len();
        if len <= seq_len {
            return s;
        }
        *cut += 1;
        match truncation {
            Truncation::Left => s.slice(len - seq_len..len),
            _ => s.slice(0..seq_len),
        }
    };
    match truncation {
        Truncation::Error => bail!(
            "{at}: the pair's longer sequence (prompt and completion) has {longest} tokens, more \
             than data.seq_len = {seq_len} (raise seq_len, or set data.truncation to right — \
             TRL's keep_start — or left — keep_end)"
        ),
        Truncation::Right if prompt_len >= seq_len => Ok(None),
        _ => Ok(Some(PreferencePair {
            chosen: shorten(chosen),
            rejected: shorten(rejected),
            reference: None,
        })),
    }
}

/// What became of a split's preference data (`kiln data stats`).
#[derive(Debug, Clone, Serialize)]
pub struct PreferenceStats {
    pub split: Split,
    pub sources: Vec<SourceStats>,
    /// Rows read.
    pub rows: usize,
    /// Pairs trained on (rows less those dropped).
    pub pairs: usize,
    /// Rows written as conversations, rendered with the chat template.
    pub conversational: usize,
    pub seq_len: usize,
    /// Sequences cut to `seq_len`.
    pub truncated: usize,
    /// Pairs dropped because their prompt alone fills `seq_len` (`truncation: right`).
    pub dropped: usize,
    /// Tokens of both sequences of every pair.
    pub tokens: usize,
    pub prompt_tokens: Lengths,
    pub chosen_tokens: Lengths,
    pub rejected_tokens: Lengths,
}

/// The least, mean and most of a count over pairs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Lengths {
    pub min: usize,
    pub mean: f64,
    pub max: usize,
}

impl Lengths {
    fn of(counts: impl Iterator<Item = usize>) -> Self {
        let counts: Vec<usize> = counts.collect();
        Self {
            min: counts.iter().copied().min().unwrap_or(0),
            mean: counts.iter().sum::<usize>() as f64 / counts.len().max(1) as f64,
            max: counts.iter().copied().max().unwrap_or(0),
        }
    }
}

pub struct PreparedPairs {
    pub pairs: Vec<PreferencePair>,
    pub stats: PreferenceStats,
}

/// Loads and tokenises a split's preference pairs. A split with no datasets gives none; datasets
/// whose rows all drop are an error.
pub fn prepare_pairs(
    recipe: &Recipe,
    recipe_dir: &Path,
    tokenizer: &TextTokenizer,
    split: Split,
) -> Result<PreparedPairs> {
    let datasets = load_split_records(recipe, recipe_dir, split)?;
    let (seq_len, truncation) = (recipe.data.seq_len, recipe.data.truncation);
    pairs_of(&datasets, tokenizer, (seq_len, truncation), split)
}

/// The preference pairs of `datasets`, fitted into `seq_len` tokens as `truncation` says.
pub fn pairs_of(
    datasets: &[LoadedDataset],
    tokenizer: &TextTokenizer,
    (seq_len, truncation): (usize, Truncation),
    split: Split,
) -> Result<PreparedPairs> {
    let mut chat: Option<ChatTemplate> = None;
    let mut pairs = Vec::new();
    let (mut rows, mut conversational, mut truncated, mut dropped) = (0, 0, 0, 0);
    for dataset in datasets {
        let records = &dataset.records;
        let parts: Vec<Parts> = (0..records.len())
            .into_par_iter()
            .map(|i| parts_of(&dataset.spec.columns, &records.rows[i], &records.locate(i)))
            .collect::<Result<_>>()?;
        if parts.iter().any(|p| matches!(p, Parts::Chat { .. })) && chat.is_none() {
            let template = ChatTemplate::of(tokenizer)
                .with_context(|| format!("{}: conversational preference pairs", records.origin))?;
            chat = Some(template);
        }
        let tokenized: Vec<TokenizedPair> = (parts.par_iter().enumerate())
            .map(|(i, p)| tokenize_parts(p, tokenizer, chat.as_ref(), &records.locate(i)))
            .collect::<Result<_>>()?;
        rows += parts.len();
        conversational += (parts.iter())
            .filter(|p| matches!(p, Parts::Chat { .. }))
            .count();
        for (i, pair) in tokenized.into_iter().enumerate() {
            let at = records.locate(i);
            match fit(pair, seq_len, truncation, &at, &mut truncated)? {
                Some(pair) if !pair.trains_both() => bail!(
                    "{at}: the chosen or the rejected completion has no token to train (an empty \
                     completion after an empty prompt, or cut away by data.truncation)"
                ),
                Some(pair) => pairs.push(pair),
                None => dropped += 1,
            }
        }
    }
    if pairs.is_empty() && !datasets.is_empty() {
        bail!(
            "data.{}: none of its {rows} preference rows fits: every prompt alone fills \
             data.seq_len = {seq_len} (raise seq_len)",
            split.name()
        );
    }
    let sources = SourceStats::of(datasets);
    let completion = |s: &Sequence| s.loss_mask.iter().filter(|&&m| m).count();
    let stats = PreferenceStats {
        split,
        sources,
        rows,
        pairs: pairs.len(),
        conversational,
        seq_len,
        truncated,
        dropped,
        tokens: pairs.iter().map(PreferencePair::len).sum(),
        prompt_tokens: Lengths::of(pairs.iter().map(PreferencePair::prompt_len)),
        chosen_tokens: Lengths::of(pairs.iter().map(|p| completion(&p.chosen))),
        rejected_tokens: Lengths::of(pairs.iter().map(|p| completion(&p.rejected))),
    };
    Ok(PreparedPairs { pairs, stats })
}

/// `kiln data stats` of preference data.
pub fn stats_text(stats: &PreferenceStats) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{} (preference pairs):", stats.split.name());
    for s in &stats.sources {
        let _ = writeln!(out, "  source {}: {} rows", s.origin, s.rows);
    }
    let _ = writeln!(
        out,
        "  pairs:               {} of {} rows ({} conversational, {} dropped: prompt fills \
         seq_len)",
        stats.pairs, stats.rows, stats.conversational, stats.dropped
    );
    let _ = writeln!(
        out,
        "  tokens:              {} in both sequences of every pair; {} sequences cut to {}",
        stats.tokens, stats.truncated, stats.seq_len
    );
    for (name, l) in [
        ("prompt", stats.prompt_tokens),
        ("chosen", stats.chosen_tokens),
        ("rejected", stats.rejected_tokens),
    ] {
        let _ = writeln!(
            out,
            "  {name:<9} tokens:     min {}, mean {:.1}, max {}",
            l.min, l.mean, l.max
        );
    }
    out
}

/// `kiln data preview` of preference pairs: the prompt, then each completion with its trained
/// tokens marked ⟦…⟧; with `json`, one object a line with TRL's `prompt_ids`, `chosen_ids` and
/// `rejected_ids`.
pub fn preview(
    pairs: &[PreferencePair],
    tokenizer: &TextTokenizer,
    n: usize,
    json: bool,
) -> Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    for (i, pair) in pairs.iter().take(n).enumerate() {
        let prompt = &pair.chosen.ids[..pair.prompt_len()];
        let completion = |s: &Sequence| s.ids[prompt_len_of(s)..].to_vec();
        if json {
            let line = serde_json::json!({
                "prompt_ids": prompt,
                "chosen_ids": completion(&pair.chosen),
                "rejected_ids": completion(&pair.rejected),
            });
            let _ = writeln!(out, "{line}");
            continue;
        }
        let decode = |ids: &[u32]| tokenizer.decode(ids, false);
        let _ = writeln!(out, "── pair {} ──", i + 1);
        let _ = writeln!(out, "prompt:   {}", decode(prompt)?);
        let _ = writeln!(out, "chosen:   ⟦{}⟧", decode(&completion(&pair.chosen))?);
        let _ = writeln!(out, "rejected: ⟦{}⟧", decode(&completion(&pair.rejected))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_start_is_the_prompt_as_trl_extracts_it() {
        let chars = |s: &str| s.chars().collect::<Vec<_>>();
        let text = |c: Vec<char>| c.into_iter().collect::<String>();
        let split = |a: &str, b: &str| {
            let (p, c, r) = split_shared_start(&chars(a), &chars(b));
            (text(p), text(c), text(r))
        };
        assert_eq!(
            split("The sky is blue.", "The sky is green."),
            ("The sky is".into(), " blue.".into(), " green.".into())
        );
        // One a prefix of the other: the last shared character stays in the completions.
        assert_eq!(split("abc", "abcd"), ("ab".into(), "c".into(), "cd".into()));
        assert_eq!(split("x", "y"), ("".into(), "x".into(), "y".into()));
    }

    /// Cut at their starts (`truncation: left`), the two sequences keep prompts of different
    /// lengths: each completion is what its own sequence trains.
    #[test]
    fn left_truncation_keeps_each_completion_whole() {
        let pair = TokenizedPair {
            prompt_chosen: vec![1, 2, 3, 4, 10, 11],
            prompt_rejected: vec![1, 2, 3, 4, 20, 21, 22, 23],
            prompt_len: 4,
        };
        let mut cut = 0;
        let fitted = fit(pair.clone(), 5, Truncation::Left, "row", &mut cut)
            .unwrap()
            .unwrap();
        assert_eq!(cut, 2);
        assert_eq!(fitted.chosen.ids, [2, 3, 4, 10, 11]);
        assert_eq!(fitted.rejected.ids, [4, 20, 21, 22, 23]);
        assert_eq!(prompt_len_of(&fitted.chosen), 3);
        assert_eq!(prompt_len_of(&fitted.rejected), 1);
        // A prompt that fills seq_len with the end cut trains nothing: the pair is dropped.
        assert!(fit(pair.clone(), 4, Truncation::Right, "row", &mut cut)
            .unwrap()
            .is_none());
        let error = fit(pair, 5, Truncation::Error, "row 7", &mut cut).unwrap_err();
        assert!(error
            .to_string()
            .starts_with("row 7: the pair's longer sequence"));
    }
}
