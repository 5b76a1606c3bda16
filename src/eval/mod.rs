//! Measuring models: per-token scoring (and, built on it, task evaluation).

pub mod mnli;
pub mod score;
