//! `merge`: an adapter folded into the weights and written as a Hugging Face directory gives
//! the same logits as the base model with the adapter attached, and the directory round-trips
//! through our loader (config, tokenizer, chat template).

mod common;

use repshield::backend::cpu::CpuBackend;
use repshield::llama::merge::{merge_into, save_hf_dir, SaveDtype};
use repshield::llama::{Llama, LogitsMode, LoraAdapter, LoraConfig, LoraModule};
use repshield::model::{load_model_path, Message};
use repshield::util::Rng;

#[test]
fn merged_directory_reproduces_the_adapter_model() {
    let fx = common::fixture("tiny-llama-tied");
    let mut m = load_model_path(&fx).unwrap();
    let lcfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        layers: vec![0, 1],
        modules: LoraModule::ALL.to_vec(),
    };
    let mut ad = LoraAdapter::init(&m.config, lcfg, 7);
    let mut r = Rng::new(8);
    for p in &mut ad.pairs {
        p.b.iter_mut().for_each(|x| *x = r.normal() * 0.05);
    }
    let ids = m
        .tokenizer
        .encode_chat(&[Message::new("user", "merge me please")], true)
        .unwrap();
    let logits = |model: &Llama<CpuBackend>| {
        let mut c = model.new_cache(1, ids.len()).unwrap();
        model
            .forward(&ids, 1, &mut c, None, &[], LogitsMode::All)
            .unwrap()
            .logits
            .unwrap()
    };
    let mut with_adapter = Llama::new(CpuBackend, &m.config, &m.weights).unwrap();
    let base = logits(&with_adapter);
    with_adapter.attach_lora(&ad).unwrap();
    let want = logits(&with_adapter);
    assert!(
        common::max_rel(&want, &base) > 1e-3,
        "the adapter must change the logits"
    );

    merge_into(&mut m.weights, &ad).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_hf_dir(&m, dir.path(), SaveDtype::F32).unwrap();
    let back = load_model_path(dir.path()).unwrap();
    assert_eq!(back.config.num_layers, m.config.num_layers);
    assert_eq!(back.config.rope_scaling, m.config.rope_scaling);
    assert!(back.config.tie_embeddings && back.weights.lm_head.is_none());
    assert_eq!(
        back.tokenizer
            .encode_chat(&[Message::new("user", "merge me please")], true)
            .unwrap(),
        ids
    );
    let merged = Llama::new(CpuBackend, &back.config, &back.weights).unwrap();
    let got = logits(&merged);
    let e = common::max_rel(&got, &want);
    assert!(e < 1e-5, "merged logits differ from adapter logits by {e}");

    // bf16 storage rounds the weights: close, not exact.
    let dir16 = tempfile::tempdir().unwrap();
    save_hf_dir(&m, dir16.path(), SaveDtype::Bf16).unwrap();
    let b16 = load_model_path(dir16.path()).unwrap();
    assert_eq!(b16.file_dtype, "bf16");
    let e16 = common::max_rel(
        &logits(&Llama::new(CpuBackend, &b16.config, &b16.weights).unwrap()),
        &want,
    );
    assert!(e16 < 3e-2 && e16 > 0.0, "bf16 merged logits: {e16}");
}
