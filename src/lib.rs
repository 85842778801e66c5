//! repshield: representation-engineering safety training and embedding-space attacks for
//! Llama-family chat models, on hand-written kernels with a thin Rust driver.

pub mod attack;
pub mod backend;
pub mod bench;
pub mod bench_kernels;
pub mod bench_train;
pub mod demo;
pub mod eval;
pub mod llama;
pub mod model;
pub mod objectives;
pub mod train;
pub mod util;
