//! `repshield merge`: folds a LoRA adapter into the weights (`W += (alpha/r) B A`) and writes a
//! Hugging Face model directory (config.json, model.safetensors, tokenizer files).

use super::lora::{LoraAdapter, LoraModule};
use super::peft::write_atomic;
use crate::model::{HostTensor, LoadedModel, ModelWeights};
use anyhow::{bail, Context, Result};
use std::path::Path;

pub fn merge_into(weights: &mut ModelWeights, adapter: &LoraAdapter) -> Result<()> {
    let r = adapter.config.rank;
    let scale = adapter.config.scale();
    for p in &adapter.pairs {
        let l = weights
            .layers
            .get_mut(p.layer)
            .with_context(|| format!("adapter layer {} does not exist", p.layer))?;
        let w = match p.module {
            LoraModule::Q => &mut l.q,
            LoraModule::K => &mut l.k,
            LoraModule::V => &mut l.v,
            LoraModule::O => &mut l.o,
            LoraModule::Gate => &mut l.gate,
            LoraModule::Up => &mut l.up,
            LoraModule::Down => &mut l.down,
        };
        let (fan_out, fan_in) = (w.shape[0], w.shape[1]);
        if p.a.len() != r * fan_in || p.b.len() != fan_out * r {
            bail!(
                "adapter layer {} {}: shapes do not fit the weight [{fan_out}, {fan_in}]",
                p.layer,
                p.module.hf_name()
            );
        }
        // W[o, i] += scale * sum_j B[o, j] A[j, i], as one rank-r GEMM.
        crate::backend::cpu::matmul::gemm_fwd(
            &p.b,
            &p.a,
            &mut w.data,
            fan_out,
            fan_in,
            r,
            false,
            false,
            scale,
            true,
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SaveDtype {
    F32,
    Bf16,
    F16,
}

fn encode(t: &HostTensor, dtype: SaveDtype) -> (safetensors::Dtype, Vec<u8>) {
    match dtype {
        SaveDtype::F32 => (
            safetensors::Dtype::F32,
            bytemuck::cast_slice(&t.data).to_vec(),
        ),
        SaveDtype::Bf16 => (
            safetensors::Dtype::BF16,
            t.data
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
        ),
        SaveDtype::F16 => (
            safetensors::Dtype::F16,
            t.data
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
        ),
    }
}

/// Writes `m` (with its possibly merged weights) as a Hugging Face directory.
pub fn save_hf_dir(m: &LoadedModel, dir: &Path, dtype: SaveDtype) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let w = &m.weights;
    let mut named: Vec<(String, &HostTensor)> =
        vec![("model.embed_tokens.weight".into(), &w.embed)];
    for (i, l) in w.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        for (n, t) in [
            ("input_layernorm.weight", &l.attn_norm),
            ("self_attn.q_proj.weight", &l.q),
            ("self_attn.k_proj.weight", &l.k),
            ("self_attn.v_proj.weight", &l.v),
            ("self_attn.o_proj.weight", &l.o),
            ("post_attention_layernorm.weight", &l.mlp_norm),
            ("mlp.gate_proj.weight", &l.gate),
            ("mlp.up_proj.weight", &l.up),
            ("mlp.down_proj.weight", &l.down),
        ] {
            named.push((format!("{p}.{n}"), t));
        }
        for (n, t) in [
            ("q_proj", &l.q_bias),
            ("k_proj", &l.k_bias),
            ("v_proj", &l.v_bias),
        ] {
            if let Some(t) = t {
                named.push((format!("{p}.self_attn.{n}.bias"), t));
            }
        }
    }
    named.push(("model.norm.weight".into(), &w.final_norm));
    if let Some(h) = &w.lm_head {
        named.push(("lm_head.weight".into(), h));
    }
    let encoded: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = named
        .into_iter()
        .map(|(n, t)| {
            let (dt, bytes) = encode(t, dtype);
            (n, t.shape.clone(), dt, bytes)
        })
        .collect();
    let views = encoded
        .iter()
        .map(|(n, s, dt, b)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), b)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    write_atomic(
        &dir.join("model.safetensors"),
        &safetensors::serialize(views, Some(meta))?,
    )?;

    let mut cfg = m.config.to_hf_json();
    cfg["torch_dtype"] = match dtype {
        SaveDtype::F32 => "float32",
        SaveDtype::Bf16 => "bfloat16",
        SaveDtype::F16 => "float16",
    }
    .into();
    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    let tok_json = m
        .tokenizer
        .inner
        .to_string(true)
        .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
    write_atomic(&dir.join("tokenizer.json"), tok_json.as_bytes())?;
    let tc = serde_json::json!({
        "chat_template": m.tokenizer.chat_template,
        "bos_token": m.tokenizer.bos_token,
        "eos_token": m.tokenizer.eos_token,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
    });
    write_atomic(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc)?.as_bytes(),
    )?;
    Ok(())
}
