//! GPT-2/GPT-J byte-level BPE, through the `tokenizers` crate.
//!
//! GPT-J's embedding has 50,400 rows for a 50,257-token vocabulary: the extra rows are never
//! produced by the tokenizer, so the only check needed is that every token id fits the model.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tokenizers::models::bpe::BPE;
use tokenizers::{AddedToken, Tokenizer};

pub const EOS_TOKEN: &str = "<|endoftext|>";

/// Byte span in the encoded text of each token.
pub type Offsets = Vec<(usize, usize)>;

/// Distinct words whose BPE result is remembered (MNLI has about 100,000).
const WORD_CACHE_CAPACITY: usize = 1 << 20;

/// Files that make up a tokenizer in a HF model directory; copied along with checkpoints.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

/// The special tokens a template may name (`{{ eos_token }}`, `{{ bos_token }}`).
#[derive(Debug, Clone, Default)]
pub struct TemplateTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    eos_id: u32,
    pad_id: u32,
    source: PathBuf,
    /// The Jinja chat template: the directory's (`chat_template.jinja`, or `chat_template` in
    /// `tokenizer_config.json`), or one set for training.
    chat_template: Option<String>,
    /// Whether the vocabulary or the template changed since loading (then saving writes them).
    changed: bool,
    /// `bos_token` / `eos_token` of `tokenizer_config.json`, for templates that name them.
    bos_token: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads `DIR/tokenizer.json`, or builds the byte-level BPE from `DIR/vocab.json` and
    /// `DIR/merges.txt`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let inner = if json.is_file() {
            Tokenizer::from_file(&json)
                .map_err(|e| anyhow::anyhow!("{}: not a valid tokenizer: {e}", json.display()))?
        } else if vocab.is_file() && merges.is_file() {
            byte_level_bpe(&vocab, &merges)?
        } else {
            bail!(
                "{}: no tokenizer found (expected tokenizer.json, or vocab.json and merges.txt)",
                dir.display()
            );
        };
        let mut inner = inner;
        // BPE caches each word's tokens, but only its first 10,000 distinct words; a fine-tuning
        // corpus has far more, and the cache then misses for most of the text.
        let mut model = inner.get_model().clone();
        model.resize_cache(WORD_CACHE_CAPACITY);
        inner.with_model(model);
        let eos_id = inner.token_to_id(EOS_TOKEN).with_context(|| {
            format!("{}: the tokenizer has no {EOS_TOKEN} token", dir.display())
        })?;
        let pad_id = read_pad_token(dir)
            .and_then(|t| inner.token_to_id(&t))
            .unwrap_or(eos_id);
        Ok(Self {
            inner,
            eos_id,
            pad_id,
            source: dir.to_path_buf(),
            chat_template: read_chat_template(dir)?,
            changed: false,
            bos_token: read_config_token(dir, "bos_token"),
        })
    }

    /// The chat template this tokenizer carries, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Makes `template` this tokenizer's chat template (saved with it).
    pub fn set_chat_template(&mut self, template: &str) {
        if self.chat_template.as_deref() != Some(template) {
            self.chat_template = Some(template.to_string());
            self.changed = true;
        }
    }

    /// Adds `tokens` the vocabulary lacks as special tokens (new ids after the last); returns
    /// those it added.
    pub fn add_special_tokens(&mut self, tokens: &[&str]) -> Result<Vec<String>> {
        let missing: Vec<&str> = (tokens.iter().copied())
            .filter(|t| self.inner.token_to_id(t).is_none())
            .collect();
        if !missing.is_empty() {
            let added: Vec<AddedToken> =
                missing.iter().map(|t| AddedToken::from(*t, true)).collect();
            (self.inner)
                .add_special_tokens(added)
                .map_err(|e| anyhow::anyhow!("adding the special tokens {missing:?}: {e}"))?;
            self.changed = true;
        }
        Ok(missing.into_iter().map(str::to_string).collect())
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The special tokens a chat template may name.
    pub fn template_tokens(&self) -> TemplateTokens {
        let eos = self.id_to_token(self.eos_id);
        TemplateTokens {
            bos_token: self.bos_token.clone().or_else(|| eos.clone()),
            eos_token: eos,
            pad_token: self.id_to_token(self.pad_id),
            unk_token: None,
        }
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// GPT-J has no pad token; like HF users do, we pad with eos unless the directory names one.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Number of token ids the tokenizer can produce (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The embedding rows every id this tokenizer produces needs: its largest id + 1.
    pub fn rows_needed(&self) -> usize {
        (self.inner.get_vocab(true).values().copied().max()).map_or(0, |id| id as usize + 1)
    }

    /// Fails unless every id this tokenizer produces has a row in an embedding of `rows` rows.
    pub fn check_fits(&self, rows: usize, model_dir: &Path) -> Result<()> {
        let max_id = self
            .inner
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .unwrap_or(0) as usize;
        if max_id >= rows {
            bail!(
                "tokenizer {} produces ids up to {max_id}, but the model in {} has only {rows} \
                 embedding rows (vocab_size in config.json); use the model's own tokenizer",
                self.source.display(),
                model_dir.display()
            );
        }
        Ok(())
    }

    /// Token ids of `text`; special tokens written in the text (`<|endoftext|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` with each token's byte span in `text`, to find which tokens a part of
    /// the text produced without tokenizing the parts separately.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Offsets)> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// Decodes ids to text; ids without a token (GPT-J's padding rows) are dropped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow::anyhow!("decoding {ids:?}: {e}"))
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Writes the tokenizer into a model directory: the source's files where it had them, and a
    /// `tokenizer.json` in any case so that `AutoTokenizer.from_pretrained` finds one.
    pub fn save_to(&self, dir: &Path) -> Result<Vec<String>> {
        let mut written = Vec::new();
        for name in TOKENIZER_FILES {
            let from = self.source.join(name);
            let to = dir.join(name);
            if from.is_file() && from != to {
                std::fs::copy(&from, &to)
                    .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
                written.push(name.to_string());
            }
        }
        if self.changed || !dir.join("tokenizer.json").is_file() {
            self.inner
                .save(dir.join("tokenizer.json"), false)
                .map_err(|e| {
                    anyhow::anyhow!("{}: cannot write tokenizer.json: {e}", dir.display())
                })?;
            if !written.iter().any(|w| w == "tokenizer.json") {
                written.push("tokenizer.json".into());
            }
        }
        if let Some(template) = self.chat_template.as_ref().filter(|_| self.changed) {
            std::fs::write(dir.join(CHAT_TEMPLATE_FILE), template)
                .with_context(|| format!("{}: cannot write {CHAT_TEMPLATE_FILE}", dir.display()))?;
            written.push(CHAT_TEMPLATE_FILE.into());
            // One template: the file's; a copied config's own would contradict it.
            let config_path = dir.join("tokenizer_config.json");
            if let Ok(text) = std::fs::read_to_string(&config_path) {
                if let Ok(mut config) = serde_json::from_str::<serde_json::Value>(&text) {
                    // A list of named templates keeps its others; the file is its `default`.
                    let changed = match config.get_mut("chat_template") {
                        Some(serde_json::Value::Array(named)) => {
                            named.retain(|t| t["name"] != "default");
                            true
                        }
                        Some(_) => {
                            config.as_object_mut().map(|o| o.remove("chat_template"));
                            true
                        }
                        None => false,
                    };
                    if changed {
                        let text = serde_json::to_string_pretty(&config)? + "\n";
                        std::fs::write(&config_path, text)?;
                    }
                }
            }
        }
        if !dir.join("tokenizer_config.json").is_file() {
            let config = serde_json::json!({
                "tokenizer_class": "GPT2Tokenizer",
                "bos_token": EOS_TOKEN,
                "eos_token": EOS_TOKEN,
                "unk_token": EOS_TOKEN,
                "add_prefix_space": false,
                "model_max_length": 2048,
            });
            std::fs::write(
                dir.join("tokenizer_config.json"),
                serde_json::to_string_pretty(&config)? + "\n",
            )?;
            written.push("tokenizer_config.json".into());
        }
        Ok(written)
    }
}

fn byte_level_bpe(vocab: &Path, merges: &Path) -> Result<Tokenizer> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .build()
        .map_err(|e| {
            anyhow::anyhow!(
                "{} / {}: not a valid BPE vocabulary: {e}",
                vocab.display(),
                merges.display()
            )
        })?;
    let mut tokenizer = Tokenizer::new(bpe);
    // GPT-2 splits words with its regex before BPE (use_regex: true).
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer
        .add_special_tokens([AddedToken::from(EOS_TOKEN, true)])
        .map_err(|e| anyhow::anyhow!("adding {EOS_TOKEN}: {e}"))?;
    Ok(tokenizer)
}

/// Where transformers keeps a tokenizer's chat template (it also reads `chat_template` in
/// `tokenizer_config.json`).
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// `DIR/chat_template.jinja`, else `chat_template` of `DIR/tokenizer_config.json` (a string, or
/// a list of named templates, of which `default` is taken).
fn read_chat_template(dir: &Path) -> Result<Option<String>> {
    let file = dir.join(CHAT_TEMPLATE_FILE);
    if file.is_file() {
        return std::fs::read_to_string(&file)
            .map(Some)
            .with_context(|| format!("{}: cannot read", file.display()));
    }
    let Ok(text) = std::fs::read_to_string(dir.join("tokenizer_config.json")) else {
        return Ok(None);
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(None);
    };
    Ok(match &json["chat_template"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    })
}

fn read_config_token(dir: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    match &json[key] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn read_pad_token(dir: &Path) -> Option<String> {
    for file in ["special_tokens_map.json", "tokenizer_config.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(file)) else {
            continue;
        };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        match &json["pad_token"] {
            serde_json::Value::String(s) => return Some(s.clone()),
            serde_json::Value::Object(o) => {
                if let Some(serde_json::Value::String(s)) = o.get("content") {
                    return Some(s.clone());
                }
            }
            _ => {}
        }
    }
    None
}
