//! Training: data pipeline (JSONL -> templated, masked batches); trainer, optimiser and
//! checkpoints build on it.

pub mod adamw;
pub mod commands;
pub mod data;
pub mod frozen;
pub mod mining;
pub mod step;
pub mod trainer;
