//! Kiln: fine-tune GPT-J-family causal language models from recipes.
//!
//! The pipeline reads top to bottom: `model` (GPT-J, HF model directories) and `tokenizer`,
//! then `eval` (scoring and task evaluation); `cli` wires them to the `kiln` binary.

pub mod cli;
pub mod eval;
pub mod hub;
pub mod model;
pub mod tokenizer;
