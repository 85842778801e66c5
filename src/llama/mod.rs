//! The Llama-family transformer, written once against [`crate::backend::Backend`]:
//! forward with residual capture, LoRA, KV cache and generation.

pub mod backward;
pub mod forward;
pub mod generate;
pub mod latent;
pub mod lora;
pub mod merge;
pub mod model;
pub mod peft;

pub use backward::LoraGrads;
pub use forward::{Activations, DecodeWorkspace, ForwardOutput, Input, LogitsMode};
pub use generate::{generate, GenerateOptions, Sampling};
pub use latent::LatentHook;
pub use lora::{LoraAdapter, LoraConfig, LoraDropout, LoraModule};
pub use model::{KvCache, Llama};
