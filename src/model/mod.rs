//! Models: configuration, weights (safetensors, GGUF), tokenizer and chat template.

pub mod config;
pub mod fetch;
pub mod gguf;
pub mod hf;
pub mod tokenizer;
pub mod weights;

pub use config::{ModelConfig, RopeScaling};
pub use tokenizer::{ChatTokenizer, Message};
pub use weights::{HostTensor, LayerWeights, ModelWeights, TensorSource};

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// A model ready to run: config, f32 host weights and tokenizer.
pub struct LoadedModel {
    pub config: ModelConfig,
    pub weights: ModelWeights,
    pub tokenizer: ChatTokenizer,
    /// The file or directory it was loaded from.
    pub source: PathBuf,
    /// Storage dtype(s) on disk, e.g. "Q4_1/Q8_0/F32" or "bf16".
    pub file_dtype: String,
}

/// Loads a model from a `.gguf` file, a Hugging Face directory, or an alias (`smollm2`).
pub fn load_model(spec: &str) -> Result<LoadedModel> {
    let path = fetch::resolve_model(spec)?;
    load_model_path(&path)
}

pub fn load_model_path(path: &Path) -> Result<LoadedModel> {
    if path.is_dir() {
        hf::load_hf_dir(path)
    } else if path.is_file() {
        gguf::load_gguf(path)
    } else {
        bail!("model path {} does not exist", path.display())
    }
}
