//! LoRA adapters in PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`
//! with PEFT's tensor names (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`),
//! so `peft.PeftModel.from_pretrained` loads what we write and we load what PEFT writes.

use super::lora::{LoraAdapter, LoraConfig, LoraModule, LoraPair};
use crate::model::ModelConfig;
use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

fn module_path(m: LoraModule) -> &'static str {
    match m {
        LoraModule::Q | LoraModule::K | LoraModule::V | LoraModule::O => "self_attn",
        _ => "mlp",
    }
}

fn tensor_name(layer: usize, m: LoraModule, ab: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.lora_{ab}.weight",
        module_path(m),
        m.hf_name()
    )
}

/// Writes `path` via a temporary file and a rename, so a crash never leaves half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Writes `adapter` as peft's `adapter_model.safetensors` + `adapter_config.json`, with
/// `lora_dropout` 0 (an adapter that was not trained here: see [`save_peft_trained`]).
pub fn save_peft(dir: &Path, adapter: &LoraAdapter, base_model: &str) -> Result<()> {
    save_peft_trained(dir, adapter, base_model, 0.0)
}

/// [`save_peft`] recording the dropout probability the adapter was trained with.
pub fn save_peft_trained(
    dir: &Path,
    adapter: &LoraAdapter,
    base_model: &str,
    lora_dropout: f32,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let c = &adapter.config;
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for p in &adapter.pairs {
        let fan_in = p.a.len() / c.rank;
        let fan_out = p.b.len() / c.rank;
        tensors.insert(
            tensor_name(p.layer, p.module, "A"),
            (vec![c.rank, fan_in], bytemuck::cast_slice(&p.a).to_vec()),
        );
        tensors.insert(
            tensor_name(p.layer, p.module, "B"),
            (vec![fan_out, c.rank], bytemuck::cast_slice(&p.b).to_vec()),
        );
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, (shape, data))| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)?,
            ))
        })
        .collect::<Result<_>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(meta))?;
    let mut modules: Vec<&str> = c.modules.iter().map(|m| m.hf_name()).collect();
    modules.sort_unstable();
    // The f32's shortest decimal (0.05, not 0.05000000074505806), as peft's config shows it.
    let lora_dropout: f64 = lora_dropout.to_string().parse()?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": c.rank,
        "lora_alpha": c.alpha,
        "lora_dropout": lora_dropout,
        "target_modules": modules,
        "layers_to_transform": c.layers,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "revision": null,
    });
    write_atomic(&dir.join("adapter_model.safetensors"), &bytes)?;
    write_atomic(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    Ok(())
}

pub fn load_peft(dir: &Path, cfg: &ModelConfig) -> Result<LoraAdapter> {
    let cpath = dir.join("adapter_config.json");
    let ctext =
        std::fs::read_to_string(&cpath).with_context(|| format!("reading {}", cpath.display()))?;
    let c: serde_json::Value = serde_json::from_str(&ctext)
        .with_context(|| format!("{}: not valid JSON", cpath.display()))?;
    let field = |k: &str| {
        c.get(k)
            .with_context(|| format!("{}: missing {k:?}", cpath.display()))
    };
    ensure!(
        field("peft_type")?.as_str() == Some("LORA"),
        "{}: peft_type must be LORA",
        cpath.display()
    );
    let rank = field("r")?
        .as_u64()
        .with_context(|| format!("{}: r must be an integer", cpath.display()))?
        as usize;
    let alpha = field("lora_alpha")?
        .as_f64()
        .with_context(|| format!("{}: lora_alpha must be a number", cpath.display()))?
        as f32;
    if c.get("use_dora").and_then(|v| v.as_bool()) == Some(true)
        || c.get("use_rslora").and_then(|v| v.as_bool()) == Some(true)
    {
        bail!(
            "{}: DoRA and rsLoRA adapters are not supported",
            cpath.display()
        );
    }
    let wpath = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&wpath).with_context(|| format!("reading {}", wpath.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: corrupt safetensors", wpath.display()))?;
    let load = |name: &str, shape: [usize; 2]| -> Result<Option<Vec<f32>>> {
        let Ok(t) = st.tensor(name) else {
            return Ok(None);
        };
        ensure!(
            t.shape() == shape,
            "{}: tensor {name} has shape {:?}, expected {:?}",
            wpath.display(),
            t.shape(),
            shape
        );
        let v: Vec<f32> = match t.dtype() {
            safetensors::Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            safetensors::Dtype::BF16 => t
                .data()
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            safetensors::Dtype::F16 => t
                .data()
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            d => bail!(
                "{}: tensor {name} has unsupported dtype {d:?}",
                wpath.display()
            ),
        };
        Ok(Some(v))
    };
    let mut pairs = Vec::new();
    let mut layers = std::collections::BTreeSet::new();
    let mut modules = std::collections::BTreeSet::new();
    for layer in 0..cfg.num_layers {
        for m in LoraModule::ALL {
            let (fan_in, fan_out) = m.dims(cfg);
            // PEFT names tensors with or without the adapter name ("default") depending on version.
            let a_name = tensor_name(layer, m, "A");
            let a = match load(&a_name, [rank, fan_in])? {
                Some(a) => a,
                None => match load(
                    &a_name.replace(".weight", ".default.weight"),
                    [rank, fan_in],
                )? {
                    Some(a) => a,
                    None => continue,
                },
            };
            let b_name = tensor_name(layer, m, "B");
            let b = load(&b_name, [fan_out, rank])?
                .or(load(
                    &b_name.replace(".weight", ".default.weight"),
                    [fan_out, rank],
                )?)
                .with_context(|| format!("{}: {a_name} has no matching lora_B", wpath.display()))?;
            layers.insert(layer);
            modules.insert(m);
            pairs.push(LoraPair {
                layer,
                module: m,
                a,
                b,
            });
        }
    }
    ensure!(
        !pairs.is_empty(),
        "{}: no LoRA tensors for this model's layers",
        wpath.display()
    );
    let config = LoraConfig {
        rank,
        alpha,
        layers: layers.into_iter().collect(),
        modules: modules.into_iter().collect(),
    };
    Ok(LoraAdapter { config, pairs })
}
