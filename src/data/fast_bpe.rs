//! GPT-2 byte-level BPE encoding without the `tokenizers` pre-tokenizer.
//!
//! The crate is built with `fancy-regex`, which runs GPT-2's splitting pattern (it has a
//! lookahead) in a backtracking engine; that, not BPE, dominated tokenizing a dataset. Here the
//! same pattern minus the lookahead runs in the `regex` crate and the lookahead's effect is
//! applied by hand; words then go through the tokenizer's own BPE model (and its cache). The
//! result is the same ids as `Tokenizer::encode`, which the tests check on the MNLI sample and on
//! edge cases; tokenizers configured any other way are not handled here (`new` returns `None`).

use std::sync::LazyLock;

use anyhow::{anyhow, Result};
use regex::Regex;
use tokenizers::models::ModelWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::Model;

use crate::tokenizer::{Offsets, TextTokenizer};

/// GPT-2's pattern without the final `\s+(?!\S)` alternative, which `split_words` emulates.
static WORDS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+")
        .expect("valid pattern")
});

/// GPT-2's reversible byte → printable char map.
fn byte_chars() -> [char; 256] {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map = ['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        map[b as usize] = if printable.contains(&b) {
            char::from_u32(b).expect("latin-1")
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("below the surrogates")
        };
    }
    map
}

pub struct FastBpe<'a> {
    model: &'a ModelWrapper,
    /// Added tokens (longest first) and their ids; they are matched in the raw text first.
    added: Vec<(String, u32)>,
    added_first_bytes: [bool; 256],
    byte_chars: [char; 256],
}

impl<'a> FastBpe<'a> {
    /// The fast path for GPT-2-style tokenizers, or `None` for any other configuration.
    pub fn new(tokenizer: &'a TextTokenizer) -> Option<Self> {
        let inner = tokenizer.inner();
        if inner.get_normalizer().is_some() {
            return None;
        }
        match inner.get_pre_tokenizer() {
            Some(PreTokenizerWrapper::ByteLevel(b)) if b.use_regex && !b.add_prefix_space => {}
            _ => return None,
        }
        let model = inner.get_model();
        match model {
            ModelWrapper::BPE(bpe)
                if bpe.dropout.is_none()
                    && !bpe.byte_fallback
                    && bpe.continuing_subword_prefix.is_none()
                    && bpe.end_of_word_suffix.is_none() => {}
            _ => return None,
        }
        let mut added = Vec::new();
        let mut added_first_bytes = [false; 256];
        for (id, token) in inner.get_added_tokens_decoder() {
            if token.lstrip || token.rstrip || token.single_word || token.content.is_empty() {
                return None;
            }
            added_first_bytes[token.content.as_bytes()[0] as usize] = true;
            added.push((token.content, id));
        }
        added.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Some(Self {
            model,
            added,
            added_first_bytes,
            byte_chars: byte_chars(),
        })
    }

    /// Token ids of `text` and each token's byte span in it.
    pub fn encode(&self, text: &str) -> Result<(Vec<u32>, Offsets)> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        let mut offsets = Vec::with_capacity(text.len() / 3);
        let mut start = 0;
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if self.added_first_bytes[bytes[i] as usize] {
                if let Some((content, id)) = self
                    .added
                    .iter()
                    .find(|(c, _)| text[i..].starts_with(c.as_str()))
                {
                    self.encode_words(&text[start..i], start, &mut ids, &mut offsets)?;
                    ids.push(*id);
                    offsets.push((i, i + content.len()));
                    i += content.len();
                    start = i;
                    continue;
                }
            }
            i += 1;
        }
        self.encode_words(&text[start..], start, &mut ids, &mut offsets)?;
        Ok((ids, offsets))
    }

    fn encode_words(
        &self,
        text: &str,
        base: usize,
        ids: &mut Vec<u32>,
        offsets: &mut Offsets,
    ) -> Result<()> {
        let mut mapped = String::new();
        for (start, end) in split_words(text) {
            mapped.clear();
            mapped.extend(
                text.as_bytes()[start..end]
                    .iter()
                    .map(|&b| self.byte_chars[b as usize]),
            );
            let tokens = self
                .model
                .tokenize(&mapped)
                .map_err(|e| anyhow!("tokenizing {:?}: {e}", &text[start..end]))?;
            let mut at = base + start;
            for token in tokens {
                // Each mapped char stands for one byte of the text.
                let len = token.value.chars().count();
                ids.push(token.id);
                offsets.push((at, at + len));
                at += len;
            }
        }
        Ok(())
    }
}

/// Byte spans of GPT-2's pre-tokens. A whitespace run followed by a non-space gives up its last
/// char to the next pre-token, which is what `\s+(?!\S)` does in the original pattern.
pub fn split_words(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::with_capacity(text.len() / 4);
    let mut at = 0;
    while at < text.len() {
        let Some(m) = WORDS.find_at(text, at) else {
            break;
        };
        let (start, mut end) = (m.start(), m.end());
        let is_space_run = text[start..end].chars().all(char::is_whitespace);
        if is_space_run && end < text.len() {
            let last = text[start..end]
                .char_indices()
                .last()
                .map(|(i, _)| start + i)
                .unwrap_or(start);
            if last > start {
                end = last;
            }
        }
        spans.push((start, end));
        at = end;
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<&str> {
        split_words(text)
            .into_iter()
            .map(|(s, e)| &text[s..e])
            .collect()
    }

    #[test]
    fn whitespace_runs_leave_their_last_char_to_the_next_word() {
        assert_eq!(words("a  b"), ["a", " ", " b"]);
        assert_eq!(words("a\n b"), ["a", "\n", " b"]);
        assert_eq!(words("a \nb"), ["a", " ", "\n", "b"]);
        assert_eq!(words("end   "), ["end", "   "]);
        assert_eq!(
            words("it's 12 o'clock!!"),
            ["it", "'s", " 12", " o", "'", "clock", "!!"]
        );
    }

    #[test]
    fn byte_chars_are_gpt2s_printable_map() {
        let map = byte_chars();
        assert_eq!(map[b'A' as usize], 'A');
        assert_eq!(map[b' ' as usize], 'Ġ');
        assert_eq!(map[b'\n' as usize], 'Ċ');
        let distinct: std::collections::HashSet<char> = map.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
