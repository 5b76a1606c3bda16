//! Kiln: fine-tune GPT-J-family causal language models from recipes.
//!
//! The pipeline reads top to bottom: `recipe` (the experiment) → `data` (sources, templates,
//! tokenize, pack) → `model` (GPT-J, HF model directories) and `tokenizer` → `eval` (scoring and
//! task evaluation); `cli` wires them to the `kiln` binary.

pub mod atomic_file;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod eval;
pub mod generate;
pub mod hub;
pub mod model;
pub mod recipe;
pub mod tokenizer;
pub mod track;
pub mod train;
