//! Device memory needed to run a model on the CUDA backend, per category (weights,
//! activations, KV cache, scratch), computed from the config alone so that `repshield info`
//! can print it on any machine.
//!
//! Storage follows the backend: weight matrices, activations and the KV cache in bf16; norm
//! weights, biases, rope `inv_freq` and logits in f32. Activations are sized for the largest
//! forward call, a prefill of `batch * ctx` rows.

use crate::model::ModelConfig;
use std::fmt;

const BF16: usize = 2;
const F32: usize = 4;
/// Upper bound of attention's key splits (src/backend/cuda/attention.rs MAX_SPLITS).
const MAX_ATTENTION_SPLITS: usize = 64;

/// One line of the plan: what it is and its size in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanItem {
    pub what: String,
    pub bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryPlan {
    pub batch: usize,
    pub ctx: usize,
    pub weights: Vec<PlanItem>,
    pub activations: Vec<PlanItem>,
    pub kv_cache: Vec<PlanItem>,
    pub scratch: Vec<PlanItem>,
}

fn item(what: impl Into<String>, bytes: usize) -> PlanItem {
    PlanItem {
        what: what.into(),
        bytes,
    }
}

impl MemoryPlan {
    pub fn new(cfg: &ModelConfig, batch: usize, ctx: usize) -> Self {
        let (d, qd, kvd, ff, v, l) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
            cfg.vocab_size,
            cfg.num_layers,
        );
        let per_layer_matrices = d * qd * 2 + d * kvd * 2 + 3 * d * ff;
        let bias = if cfg.qkv_bias { qd + 2 * kvd } else { 0 };
        let mut weights = vec![
            item(format!("embedding [{v}, {d}] bf16"), v * d * BF16),
            item(
                format!("{l} layers of projections (q, k, v, o, gate, up, down) bf16"),
                l * per_layer_matrices * BF16,
            ),
            item(
                format!(
                    "norms{} and rope inv_freq (and its negation, for the backward), f32",
                    if cfg.qkv_bias { ", qkv biases" } else { "" }
                ),
                (l * (2 * d + bias) + d + cfg.head_dim) * F32,
            ),
        ];
        if !cfg.tie_embeddings {
            weights.push(item(format!("lm_head [{v}, {d}] bf16"), v * d * BF16));
        }

        let rows = batch * ctx;
        let activations = vec![
            item(
                format!("residual stream, o/down projection out: 2 x [{rows}, {d}] f32"),
                2 * rows * d * F32,
            ),
            item(format!("normed [{rows}, {d}] bf16"), rows * d * BF16),
            item(
                format!("q, attention out: 2 x [{rows}, {qd}] bf16"),
                2 * rows * qd * BF16,
            ),
            item(
                format!("k, v: 2 x [{rows}, {kvd}] bf16"),
                2 * rows * kvd * BF16,
            ),
            item(
                format!("gate, up, swiglu: 3 x [{rows}, {ff}] bf16"),
                3 * rows * ff * BF16,
            ),
        ];

        let kv_cache = vec![item(
            format!("{l} layers x (k, v) x [{batch}, {ctx}, {kvd}] bf16"),
            l * 2 * batch * ctx * kvd * BF16,
        )];

        let decode_rows = batch * cfg.num_heads;
        let scratch = vec![
            item(
                format!("last-position logits [{batch}, {v}] f32"),
                batch * v * F32,
            ),
            item(
                format!(
                    "attention split partials (decode, up to {MAX_ATTENTION_SPLITS} splits) f32"
                ),
                MAX_ATTENTION_SPLITS * decode_rows * (cfg.head_dim + 2) * F32,
            ),
            item("token ids, row lists, argmax (u32)", (rows + batch) * 4),
        ];
        Self {
            batch,
            ctx,
            weights,
            activations,
            kv_cache,
            scratch,
        }
    }

    pub fn categories(&self) -> [(&'static str, &[PlanItem]); 4] {
        [
            ("weights", &self.weights),
            ("activations", &self.activations),
            ("KV cache", &self.kv_cache),
            ("scratch", &self.scratch),
        ]
    }

    /// Bytes of one category's items.
    pub fn total(items: &[PlanItem]) -> usize {
        items.iter().map(|i| i.bytes).sum()
    }

    pub fn total_bytes(&self) -> usize {
        self.categories()
            .iter()
            .flat_map(|(_, items)| items.iter())
            .map(|i| i.bytes)
            .sum()
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "CUDA memory plan: batch {}, context {} tokens (activations sized for a {}-row prefill)",
            self.batch,
            self.ctx,
            self.batch * self.ctx
        )?;
        for (name, items) in self.categories() {
            writeln!(f, "  {name:<12} {:>10.1} MiB", mib(Self::total(items)))?;
            for i in items {
                writeln!(f, "    {:>10.1} MiB  {}", mib(i.bytes), i.what)?;
            }
        }
        write!(f, "  {:<12} {:>10.1} MiB", "total", mib(self.total_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> ModelConfig {
        ModelConfig {
            arch: "llama".into(),
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            rms_eps: 1e-5,
            rope_theta: 100000.0,
            rope_scaling: None,
            tie_embeddings: true,
            qkv_bias: false,
            max_position: 8192,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    #[test]
    fn weights_match_the_parameter_count_and_kv_cache_the_formula() {
        let cfg = smollm2();
        let plan = MemoryPlan::new(&cfg, 1, 2048);
        // Matrices in bf16, vectors in f32: the bf16 share is everything but norms/inv_freq.
        // inv_freq (32) is uploaded twice, as itself and negated.
        let vectors = cfg.num_layers * 2 * 576 + 576 + 64;
        assert_eq!(
            MemoryPlan::total(&plan.weights),
            (cfg.param_count() - (vectors - 64)) * 2 + vectors * 4
        );
        assert_eq!(plan.kv_cache[0].bytes, 30 * 2 * 2048 * 192 * 2);
        let text = plan.to_string();
        for cat in ["weights", "activations", "KV cache", "scratch", "total"] {
            assert!(text.contains(cat), "{cat} missing from:\n{text}");
        }
    }
}
