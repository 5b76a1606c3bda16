//! A recipe's data, end to end: load each source, cast rows to text, tokenize in parallel, then
//! pack or pad into the sequences the trainer streams.

use std::path::Path;

use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::Serialize;

use super::chat::{messages_of, Chat, ChatTemplate};
use super::fast_bpe::FastBpe;
use super::pack::{one_per_row, pack, pack_isolated};
use super::source::{load_records, Records};
use super::template::{Caster, Rendered};
use super::Sequence;
use crate::recipe::{Attention, BatchMode, DatasetSpec, LossOn, Packing, Recipe};
use crate::tokenizer::TextTokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Split {
    Train,
    Eval,
}

impl Split {
    pub fn datasets(self, recipe: &Recipe) -> &[DatasetSpec] {
        match self {
            Split::Train => &recipe.data.train,
            Split::Eval => &recipe.data.eval,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Eval => "eval",
        }
    }
}

/// A dataset of a recipe with its rows.
#[derive(Debug, Clone)]
pub struct LoadedDataset {
    pub spec: DatasetSpec,
    pub records: Records,
}

/// The rows of every dataset of a split. Eval splits are also capped by `eval.limit`.
pub fn load_split_records(
    recipe: &Recipe,
    recipe_dir: &Path,
    split: Split,
) -> Result<Vec<LoadedDataset>> {
    split
        .datasets(recipe)
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let limit = match split {
                Split::Train => spec.limit,
                Split::Eval => match (spec.limit, recipe.eval.limit) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                },
            };
            let records = load_records(&spec.source, recipe_dir, limit)
                .with_context(|| format!("data.{}[{i}]", split.name()))?;
            Ok(LoadedDataset {
                spec: spec.clone(),
                records,
            })
        })
        .collect()
}

/// Every example of the split as the text the model sees, in source order.
pub fn render_split(
    recipe: &Recipe,
    recipe_dir: &Path,
    split: Split,
    tokenizer: &TextTokenizer,
) -> Result<Vec<Rendered>> {
    let datasets = load_split_records(recipe, recipe_dir, split)?;
    render_datasets(&datasets, tokenizer)
}

/// The datasets' rows as text: through their templates, or (conversations) the tokenizer's
/// chat template.
pub fn render_datasets(
    datasets: &[LoadedDataset],
    tokenizer: &TextTokenizer,
) -> Result<Vec<Rendered>> {
    let mut all = Vec::new();
    for dataset in datasets {
        if dataset.spec.template.is_chat() {
            all.extend(render_conversations(&dataset.records, tokenizer)?);
            continue;
        }
        let caster = Caster::new(&dataset.spec, &dataset.records)?;
        let rendered: Vec<Rendered> = (0..caster.len())
            .into_par_iter()
            .map(|i| caster.render(i))
            .collect::<Result<_>>()?;
        all.extend(rendered);
    }
    Ok(all)
}

/// Conversation rows rendered with the tokenizer's chat template, their assistant turns marked.
fn render_conversations(records: &Records, tokenizer: &TextTokenizer) -> Result<Vec<Rendered>> {
    let template = ChatTemplate::of(tokenizer)?;
    (0..records.len())
        .into_par_iter()
        .map(|i| {
            let at = records.locate(i);
            let messages = messages_of(&records.rows[i], &at)?;
            let chat = template
                .render_with_assistant(&messages)
                .with_context(|| at.clone())?;
            Ok(Rendered {
                origin: at,
                prompt: chat.text,
                target: String::new(),
                label: None,
                assistant: chat
                    .assistant
                    .into_iter()
                    .map(|r| (r.start, r.end))
                    .collect(),
            })
        })
        .collect()
}

/// Which tokens of a conversation are the assistant's, as transformers'
/// `return_assistant_tokens_mask` finds them: from the token holding a span's first byte to the
/// token holding its last (through the end when that byte has no token), stopping at a span
/// whose first byte has none.
fn assistant_mask(offsets: &[(usize, usize)], spans: &[(usize, usize)]) -> Vec<bool> {
    let token_at = |byte: usize| offsets.iter().position(|&(s, e)| byte >= s && byte < e);
    let mut mask = vec![false; offsets.len()];
    for &(start, end) in spans {
        let Some(first) = token_at(start) else {
            break;
        };
        // transformers' `end_token + 1 if end_token else len`: a span ending in token 0 runs to
        // the end, as there.
        let last = match token_at(end.saturating_sub(1)) {
            Some(t) if t != 0 => t + 1,
            _ => offsets.len(),
        };
        for m in &mut mask[first..last] {
            *m = true;
        }
    }
    mask
}

/// Tokenizes `prompt + target` as one text, so the ids are exactly those of the whole string
/// (tokenizing the parts separately can merge differently at the boundary); a token belongs to
/// the target when it ends past the prompt's last byte.
pub fn tokenize_example(
    tokenizer: &TextTokenizer,
    example: &Rendered,
    loss_on: LossOn,
) -> Result<Sequence> {
    tokenize_with(
        tokenizer,
        FastBpe::new(tokenizer).as_ref(),
        example,
        loss_on,
    )
}

fn tokenize_with(
    tokenizer: &TextTokenizer,
    fast: Option<&FastBpe>,
    example: &Rendered,
    loss_on: LossOn,
) -> Result<Sequence> {
    let text = example.text();
    if loss_on.is_assistant() {
        // The library's own offsets, as transformers' `char_to_token` reads them.
        let (ids, offsets) =
            (tokenizer.encode_with_offsets(&text)).with_context(|| example.origin.clone())?;
        let spans = match loss_on {
            LossOn::LastAssistant => {
                &example.assistant[example.assistant.len().saturating_sub(1)..]
            }
            _ => &example.assistant[..],
        };
        let loss_mask = assistant_mask(&offsets, spans);
        return Ok(Sequence::new(ids, loss_mask));
    }
    let tokenized = match (fast, loss_on) {
        (Some(fast), _) => fast.encode(&text),
        (None, LossOn::All) => tokenizer.encode(&text).map(|ids| (ids, Vec::new())),
        (None, _) => tokenizer.encode_with_offsets(&text),
    };
    let (ids, offsets) = tokenized.with_context(|| example.origin.clone())?;
    Ok(match loss_on {
        LossOn::All => Sequence::all_trained(ids),
        _ => {
            let split = example.prompt.len();
            let loss_mask = offsets.iter().map(|&(_, end)| end > split).collect();
            Sequence::new(ids, loss_mask)
        }
    })
}

/// A prefix-LM example from one tokenized with `loss_on: target`, whose untrained tokens are
/// exactly its prompt: those become the bidirectional prefix, and the loss covers what `loss_on`
/// says.
fn prefix_lm_example(split: Sequence, loss_on: LossOn) -> Sequence {
    let prefix = split.loss_mask.iter().map(|&target| !target).collect();
    let loss_mask = match loss_on {
        LossOn::All => vec![true; split.ids.len()],
        _ => split.loss_mask,
    };
    Sequence {
        segment: vec![0; split.ids.len()],
        prefix,
        loss_mask,
        ids: split.ids,
    }
}

/// Tokenizes examples in parallel, in order.
pub fn tokenize_all(
    tokenizer: &TextTokenizer,
    examples: &[Rendered],
    loss_on: LossOn,
) -> Result<Vec<Sequence>> {
    let fast = FastBpe::new(tokenizer);
    examples
        .par_iter()
        .map(|e| tokenize_with(tokenizer, fast.as_ref(), e, loss_on))
        .collect()
}

/// Examples as a split's data tokenizes them, one sequence each: causal, with the loss mask
/// `loss_on` says, or prefix-LM, the prompt being the bidirectional prefix.
pub fn tokenize_examples(
    tokenizer: &TextTokenizer,
    examples: &[Rendered],
    loss_on: LossOn,
    attention: Attention,
) -> Result<Vec<Sequence>> {
    Ok(match attention {
        Attention::Causal => tokenize_all(tokenizer, examples, loss_on)?,
        Attention::Prefix => tokenize_all(tokenizer, examples, LossOn::Target)?
            .into_iter()
            .map(|e| prefix_lm_example(e, loss_on))
            .collect(),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceStats {
    pub origin: String,
    pub rows: usize,
    pub dropped_rows: usize,
    pub dropped_reason: Option<String>,
}

impl SourceStats {
    /// Each dataset's rows read and dropped.
    pub fn of(datasets: &[LoadedDataset]) -> Vec<Self> {
        datasets
            .iter()
            .map(|d| SourceStats {
                origin: d.records.origin.clone(),
                rows: d.records.len(),
                dropped_rows: d.records.dropped,
                dropped_reason: d.records.dropped_reason.clone(),
            })
            .collect()
    }
}

/// What became of a split's data on the way to sequences.
#[derive(Debug, Clone, Serialize)]
pub struct DataStats {
    pub split: Split,
    pub sources: Vec<SourceStats>,
    pub examples: usize,
    /// Tokens of all examples (before packing or truncation).
    pub tokens: usize,
    /// Of those, tokens the loss covers.
    pub target_tokens: usize,
    pub longest_example: usize,
    pub mode: BatchMode,
    /// Pack mode: whole examples isolated in rows (`data.packing: isolated`).
    pub isolated: bool,
    pub seq_len: usize,
    /// Sequences per epoch.
    pub sequences: usize,
    /// Pad mode: examples cut to seq_len.
    pub truncated: usize,
    /// Pack mode: tokens in the dropped remainders of each 1000-example group.
    pub dropped_tokens: usize,
    /// Tokens under the loss, per example.
    pub trained_per_example: TrainedTokens,
    /// Padding the rows need in micro-batches taken in order (rows of one micro-batch are
    /// padded to its longest): what padding, or isolated packing's unfilled rows, waste.
    pub padding_tokens: usize,
}

/// How many tokens each example trains: the least, the mean and the most.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct TrainedTokens {
    pub min: usize,
    pub mean: f64,
    pub max: usize,
}

impl TrainedTokens {
    fn of(examples: &[Sequence]) -> Self {
        let counts: Vec<usize> = (examples.iter())
            .map(|e| e.loss_mask.iter().filter(|&&m| m).count())
            .collect();
        Self {
            min: counts.iter().copied().min().unwrap_or(0),
            mean: counts.iter().sum::<usize>() as f64 / counts.len().max(1) as f64,
            max: counts.iter().copied().max().unwrap_or(0),
        }
    }
}

/// The padding of `rows` right-padded `micro` at a time in order (packed blocks have none).
fn padding_tokens(rows: &[Sequence], mode: BatchMode, micro: usize) -> usize {
    if mode == BatchMode::Pack && rows.iter().all(|r| !r.is_prefix_lm()) {
        return 0;
    }
    rows.chunks(micro.max(1))
        .map(|batch| {
            let longest = batch.iter().map(Sequence::len).max().unwrap_or(0);
            batch.iter().map(|r| longest - r.len()).sum::<usize>()
        })
        .sum()
}

/// Refuses conversation data whose assistant masks cannot be what was meant: no row trains a
/// token, every row trains all of its tokens, or no trained token ends an assistant turn (the
/// model would never learn to stop).
fn check_assistant_masks(
    examples: &[Sequence],
    rendered: &[Rendered],
    tokenizer: &TextTokenizer,
    split: Split,
    loss_on: LossOn,
) -> Result<()> {
    let counts: Vec<usize> = (examples.iter())
        .map(|e| e.loss_mask.iter().filter(|&&m| m).count())
        .collect();
    let first = |pick: &dyn Fn(usize) -> bool| -> String {
        let rows: Vec<String> = (0..examples.len())
            .filter(|&i| pick(i))
            .take(3)
            .map(|i| {
                format!(
                    "{} ({} of {} tokens)",
                    rendered[i].origin,
                    counts[i],
                    examples[i].len()
                )
            })
            .collect();
        rows.join(", ")
    };
    let name = split.name();
    let loss = loss_on.name();
    if counts.iter().all(|&c| c == 0) {
        anyhow::bail!(
            "data.{name}: with loss_on: {loss} no row trains any token — e.g. {}: do the \
             conversations have assistant turns, and does the chat template render them?",
            first(&|_| true)
        );
    }
    if (counts.iter().zip(examples)).all(|(&c, e)| c == e.len()) {
        anyhow::bail!(
            "data.{name}: with loss_on: {loss} every row trains all of its tokens — e.g. {}: \
             the chat template marks the whole conversation as the assistant's (check its \
             {{% generation %}} blocks)",
            first(&|_| true)
        );
    }
    let mut stops = vec![tokenizer.eos_id()];
    stops.extend(Chat::of(tokenizer)?.stop_token_ids);
    let trains_a_stop = examples.iter().any(|e| {
        (e.ids.iter().zip(&e.loss_mask)).any(|(id, &trained)| trained && stops.contains(id))
    });
    if !trains_a_stop {
        let names: Vec<String> = (stops.iter())
            .filter_map(|&id| tokenizer.id_to_token(id))
            .collect();
        anyhow::bail!(
            "data.{name}: no trained token ends an assistant turn ({}), so the model would never \
             learn to stop — e.g. {}: the chat template's assistant turns (its {{% generation %}} \
             blocks) should include the end-of-turn token",
            names.join(" or "),
            first(&|i| counts[i] > 0)
        );
    }
    Ok(())
}

pub struct Prepared {
    pub sequences: Vec<Sequence>,
    pub stats: DataStats,
}

/// Loads, casts, tokenizes and packs (or pads) a split of a recipe's data. A split with no
/// datasets (no `data.eval`) gives no sequences; datasets that give none are an error.
pub fn prepare(
    recipe: &Recipe,
    recipe_dir: &Path,
    tokenizer: &TextTokenizer,
    split: Split,
) -> Result<Prepared> {
    let datasets = load_split_records(recipe, recipe_dir, split)?;
    let rendered = render_datasets(&datasets, tokenizer)?;
    let examples = tokenize_examples(
        tokenizer,
        &rendered,
        recipe.data.loss_on,
        recipe.data.attention,
    )?;
    let sources = SourceStats::of(&datasets);
    let tokens = examples.iter().map(Sequence::len).sum();
    let target_tokens = examples
        .iter()
        .map(|e| e.loss_mask.iter().filter(|&&m| m).count())
        .sum();
    let longest_example = examples.iter().map(Sequence::len).max().unwrap_or(0);
    let example_count = examples.len();
    let trained_per_example = TrainedTokens::of(&examples);
    if recipe.data.loss_on.is_assistant() && !examples.is_empty() {
        check_assistant_masks(&examples, &rendered, tokenizer, split, recipe.data.loss_on)?;
    }
    let seq_len = recipe.data.seq_len;
    let origin = |i: usize| rendered[i].origin.clone();
    let (sequences, truncated, dropped_tokens) = match (recipe.data.mode, recipe.data.packing) {
        (BatchMode::Pack, Packing::Isolated) => {
            let (rows, truncated) =
                pack_isolated(examples, seq_len, recipe.data.truncation, origin)?;
            (rows, truncated, 0)
        }
        (BatchMode::Pack, Packing::Concatenate) => {
            let (blocks, dropped) = pack(&examples, seq_len);
            (blocks, 0, dropped)
        }
        (BatchMode::Pad, _) => {
            let (rows, truncated) = one_per_row(examples, seq_len, recipe.data.truncation, origin)?;
            (rows, truncated, 0)
        }
    };
    let padding_tokens = padding_tokens(&sequences, recipe.data.mode, recipe.batch.micro);
    if sequences.is_empty() && !datasets.is_empty() {
        anyhow::bail!(
            "data.{}: {example_count} examples ({tokens} tokens) make no sequence of {seq_len} tokens \
             (packing drops each 1000-example group's remainder; lower seq_len or use mode: pad)",
            split.name()
        );
    }
    let stats = DataStats {
        split,
        sources,
        examples: example_count,
        tokens,
        target_tokens,
        longest_example,
        mode: recipe.data.mode,
        isolated: recipe.data.packing == Packing::Isolated,
        seq_len,
        sequences: sequences.len(),
        truncated,
        dropped_tokens,
        trained_per_example,
        padding_tokens,
    };
    Ok(Prepared { sequences, stats })
}
