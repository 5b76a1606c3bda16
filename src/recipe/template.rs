//! Text-to-text templates as a recipe writes them: a named preset or a prompt and a target with
//! `{field}` placeholders (`{{` and `}}` write literal braces). Rendering rows with them is
//! `data::template`'s job.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};

use super::TemplateSpec;
use crate::tokenizer::EOS_TOKEN;

/// Named templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Graphcore's GPT-J MNLI format, byte for byte:
    /// `mnli hypothesis: {hypothesis} premise: {premise} target: {label}<|endoftext|>`.
    Mnli,
    /// `Review: {text}\nSentiment: {label}<|endoftext|>`, labels 0/1 → negative/positive.
    Sentiment,
    /// OpenAI fine-tuning JSONL: the prompt as written, then `{completion}<|endoftext|>`.
    PromptCompletion,
    /// Plain language modelling on a `text` column: all target, eos appended.
    Text,
}

impl Preset {
    pub const NAMES: &'static str = "mnli, sentiment, prompt-completion, text";

    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "mnli" => Preset::Mnli,
            "sentiment" => Preset::Sentiment,
            "prompt-completion" => Preset::PromptCompletion,
            "text" => Preset::Text,
            other => bail!(
                "unknown preset {other:?} (expected one of {}, chat (conversations), preference \
                 (prompt/chosen/rejected pairs), or a mapping with prompt and target)",
                Self::NAMES
            ),
        })
    }

    /// (prompt, target) template text.
    pub fn templates(self) -> (&'static str, String) {
        match self {
            Preset::Mnli => (
                "mnli hypothesis: {hypothesis} premise: {premise} target:",
                format!(" {{label}}{EOS_TOKEN}"),
            ),
            Preset::Sentiment => (
                "Review: {text}\nSentiment:",
                format!(" {{label}}{EOS_TOKEN}"),
            ),
            Preset::PromptCompletion => ("{prompt}", format!("{{completion}}{EOS_TOKEN}")),
            Preset::Text => ("", format!("{{text}}{EOS_TOKEN}")),
        }
    }

    pub fn default_label_map(self) -> Option<BTreeMap<String, String>> {
        let words: &[&str] = match self {
            Preset::Mnli => &["entailment", "neutral", "contradiction"],
            Preset::Sentiment => &["negative", "positive"],
            _ => return None,
        };
        Some(
            words
                .iter()
                .enumerate()
                .map(|(i, w)| (i.to_string(), w.to_string()))
                .collect(),
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Field(String),
}

/// A parsed prompt/target template pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub(crate) prompt: Vec<Piece>,
    pub(crate) target: Vec<Piece>,
    preset: Option<Preset>,
}

impl Template {
    pub fn from_spec(spec: &TemplateSpec) -> Result<Self> {
        match spec {
            TemplateSpec::Preset(name) => {
                let preset = Preset::parse(name)?;
                let (prompt, target) = preset.templates();
                Ok(Self {
                    prompt: parse_pieces(prompt).map_err(|e| anyhow!("prompt: {e}"))?,
                    target: parse_pieces(&target).map_err(|e| anyhow!("target: {e}"))?,
                    preset: Some(preset),
                })
            }
            TemplateSpec::Custom { prompt, target } => {
                if prompt.is_empty() && target.is_empty() {
                    bail!("prompt and target are both empty");
                }
                Ok(Self {
                    prompt: parse_pieces(prompt).map_err(|e| anyhow!("prompt: {e}"))?,
                    target: parse_pieces(target).map_err(|e| anyhow!("target: {e}"))?,
                    preset: None,
                })
            }
        }
    }

    pub fn preset(&self) -> Option<Preset> {
        self.preset
    }

    /// Placeholder names, in order of first use.
    pub fn fields(&self) -> Vec<&str> {
        let mut fields: Vec<&str> = Vec::new();
        for piece in self.prompt.iter().chain(&self.target) {
            if let Piece::Field(f) = piece {
                if !fields.contains(&f.as_str()) {
                    fields.push(f);
                }
            }
        }
        fields
    }
}

pub(crate) fn parse_pieces(text: &str) -> Result<Vec<Piece>> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                chars.next();
                literal.push('{');
            }
            '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                chars.next();
                literal.push('}');
            }
            '{' => {
                let rest = &text[at + 1..];
                let end = rest.find('}').ok_or_else(|| {
                    anyhow!(
                        "unclosed `{{` at byte {at} in {text:?} (write `{{{{` for a literal brace)"
                    )
                })?;
                let name = &rest[..end];
                if name.is_empty() || name.contains(['{', ' ']) {
                    bail!("`{{{name}}}` at byte {at} in {text:?} is not a placeholder (expected {{column}})");
                }
                if !literal.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut literal)));
                }
                pieces.push(Piece::Field(name.to_string()));
                for _ in 0..name.chars().count() + 1 {
                    chars.next();
                }
            }
            '}' => {
                bail!("unmatched `}}` at byte {at} in {text:?} (write `}}}}` for a literal brace)")
            }
            c => literal.push(c),
        }
    }
    if !literal.is_empty() {
        pieces.push(Piece::Text(literal));
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_escaped_braces() {
        let pieces = parse_pieces("{{a}} {b} x{c}}}").unwrap();
        assert_eq!(
            pieces,
            [
                Piece::Text("{a} ".into()),
                Piece::Field("b".into()),
                Piece::Text(" x".into()),
                Piece::Field("c".into()),
                Piece::Text("}".into()),
            ]
        );
        let t = Template::from_spec(&TemplateSpec::Preset("mnli".into())).unwrap();
        assert_eq!(t.fields(), ["hypothesis", "premise", "label"]);
        assert!(parse_pieces("{a b}").is_err());
    }
}
