//! Measuring models: per-token scoring and, built on it, task evaluation (MNLI, any labelled
//! template, perplexity).

pub mod classify;
pub mod mnli;
pub mod perplexity;
pub mod preference;
pub mod report;
pub mod score;
pub mod task;
