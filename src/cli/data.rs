//! `kiln data preview|stats`: a recipe's data as the model sees it.

use super::*;

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Print examples exactly as the model sees them, with the prompt/target split (or, for
    /// conversations, the trained tokens) marked.
    Preview {
        #[command(flatten)]
        recipe: RecipeArgs,
        #[arg(long, value_enum, default_value = "train")]
        split: crate::data::Split,
        /// Number of examples.
        #[arg(long, default_value_t = 5)]
        n: usize,
        /// One JSON object a line: `origin`, `input_ids` and `labels` (-100 where nothing is
        /// trained, as Hugging Face's collators write them).
        #[arg(long)]
        json: bool,
    },
    /// Count examples, tokens, sequences per epoch, truncated and dropped rows.
    Stats {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn data(command: DataCommand) -> Result<()> {
    use crate::data::{preference, prepare, preview, Split};
    match command {
        DataCommand::Preview {
            recipe,
            split,
            n,
            json,
        } => {
            let (r, dir, tokenizer) = recipe_and_tokenizer(&recipe)?;
            if r.objective.is_preference() {
                let pairs = preference::prepare_pairs(&r, &dir, &tokenizer, split)?.pairs;
                print!("{}", preference::preview(&pairs, &tokenizer, n, json)?);
                return Ok(());
            }
            match json {
                true => print!("{}", preview::preview_json(&r, &dir, &tokenizer, split, n)?),
                false => print!("{}", preview::preview(&r, &dir, &tokenizer, split, n)?),
            }
        }
        DataCommand::Stats { recipe, json } => {
            let (r, dir, tokenizer) = recipe_and_tokenizer(&recipe)?;
            if r.objective.is_preference() {
                let mut all =
                    vec![preference::prepare_pairs(&r, &dir, &tokenizer, Split::Train)?.stats];
                if !r.data.eval.is_empty() {
                    all.push(preference::prepare_pairs(&r, &dir, &tokenizer, Split::Eval)?.stats);
                }
                match json {
                    true => println!("{}", serde_json::to_string_pretty(&all)?),
                    false => all
                        .iter()
                        .for_each(|s| print!("{}", preference::stats_text(s))),
                }
                return Ok(());
            }
            let mut all = vec![prepare(&r, &dir, &tokenizer, Split::Train)?.stats];
            if !r.data.eval.is_empty() {
                all.push(prepare(&r, &dir, &tokenizer, Split::Eval)?.stats);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                for stats in &all {
                    print!("{}", preview::stats_text(stats));
                }
            }
        }
    }
    Ok(())
}
