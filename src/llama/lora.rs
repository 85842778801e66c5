//! LoRA adapters on the seven projections: `y += (alpha / r) * (x A^T) B^T`.
//! A is Kaiming-uniform (PEFT's default: bound 1/sqrt(in)), B starts at zero so a fresh
//! adapter leaves every output unchanged.

use crate::model::ModelConfig;
use crate::util::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraModule {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraModule {
    pub const ALL: [LoraModule; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    /// PEFT's module name (`q_proj` ...).
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    /// (in_features, out_features) of the projection.
    pub fn dims(self, cfg: &ModelConfig) -> (usize, usize) {
        let d = cfg.hidden_size;
        match self {
            Self::Q => (d, cfg.q_dim()),
            Self::K | Self::V => (d, cfg.kv_dim()),
            Self::O => (cfg.q_dim(), d),
            Self::Gate | Self::Up => (d, cfg.intermediate_size),
            Self::Down => (cfg.intermediate_size, d),
        }
    }
}

/// PEFT's `lora_dropout` in a training forward: inverted dropout with probability `p` on
/// the input of each adapted projection's LoRA path (the frozen path sees the clean input),
/// one mask per (layer, module) even where modules share an input. Masks are functions of
/// `seed` (see [`crate::backend::dropout_mask`]): the backward pass and a recomputed block
/// regenerate them, and a resumed run draws the same ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraDropout {
    pub p: f32,
    pub seed: u64,
}

impl LoraDropout {
    /// The dropout of one trainer micro-batch: a function of the run's seed and the position
    /// in the run, which a checkpoint restores.
    pub fn for_micro_batch(p: f32, run_seed: u64, step: usize, micro: usize) -> Self {
        use crate::backend::dropout_mask::derive;
        // A stream of its own, so the masks share nothing with the seed's other uses.
        const STREAM: u64 = 0x4C6F_5241_4472_6F70;
        Self {
            p,
            seed: derive(derive(derive(run_seed, STREAM), step as u64), micro as u64),
        }
    }

    /// An independent dropout for sub-pass `v` (one forward of a micro-batch's data sets).
    pub fn stream(self, v: u64) -> Self {
        Self {
            p: self.p,
            seed: crate::backend::dropout_mask::derive(self.seed, v),
        }
    }

    /// The mask of projection `m` of block `layer`.
    pub fn module(self, layer: usize, m: LoraModule) -> Self {
        self.stream((layer * LoraModule::ALL.len() + m as usize) as u64)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    pub layers: Vec<usize>,
    pub modules: Vec<LoraModule>,
}

impl LoraConfig {
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }
}

/// Host copy of one adapter matrix pair.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub layer: usize,
    pub module: LoraModule,
    /// [rank, in]
    pub a: Vec<f32>,
    /// [out, rank]
    pub b: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    pub pairs: Vec<LoraPair>,
}

impl LoraAdapter {
    /// Fresh adapter: A Kaiming-uniform, B zero.
    pub fn init(cfg: &ModelConfig, config: LoraConfig, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut pairs = Vec::new();
        for &layer in &config.layers {
            assert!(
                layer < cfg.num_layers,
                "LoRA layer {layer} >= num_layers {}",
                cfg.num_layers
            );
            for &module in &config.modules {
                let (fan_in, fan_out) = module.dims(cfg);
                let bound = 1.0 / (fan_in as f32).sqrt();
                let a = (0..config.rank * fan_in)
                    .map(|_| (rng.uniform() * 2.0 - 1.0) * bound)
                    .collect();
                pairs.push(LoraPair {
                    layer,
                    module,
                    a,
                    b: vec![0.0; fan_out * config.rank],
                });
            }
        }
        Self { config, pairs }
    }
}
