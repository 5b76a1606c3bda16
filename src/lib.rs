//! Kiln: fine-tune GPT-J-family causal language models from recipes.
//!
//! The pipeline reads top to bottom: `recipe` (the experiment) → `data` (sources, templates,
//! tokenize, pack) → `model` (GPT-J, HF model directories; math only) over `ops` (each operation
//! dispatched to the fused CPU kernels in `cpu` or to device-generic candle code) and `tokenizer`
//! → `train` → `checkpoint` → `track` → `eval` (scoring and task evaluation), `generate` and
//! `serve` (HTTP over `generate` and `eval`);
//! `cli` wires them to the `kiln` binary.

pub mod atomic_file;
pub mod checkpoint;
pub mod cli;
mod cpu;
pub mod data;
pub mod eval;
pub mod generate;
pub mod hub;
pub mod model;
pub mod ops;
pub mod process;
pub mod recipe;
pub mod serve;
mod tls;
pub mod tokenizer;
pub mod track;
pub mod train;
