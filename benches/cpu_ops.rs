//! Every forward op of the CPU backend at SmolLM2-135M shapes (hidden 576, 9/3 heads of 64,
//! ffn 1536, vocab 49152), prefill (512 tokens) and decode (1 token against a 512-entry cache).
//!
//! Throughput: compute-bound cases report `elem/s` where one element is one FLOP (so
//! `Gelem/s` reads GFLOP/s); memory-bound ones (decode matmuls, norms, RoPE, SwiGLU,
//! embedding) report bytes moved. Runs are short (10 samples, ~2 s each) because the reference
//! machine has 2 cores; `cargo bench --bench cpu_ops -- matmul/` picks a group.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use repshield::backend::cpu::{attention, embedding, matmul, rmsnorm, rope, swiglu};
use repshield::backend::AttnShape;
use repshield::bench::shape_config;
use repshield::util::Rng;
use std::hint::black_box;
use std::time::Duration;

const PREFILL: usize = 512;

fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal() * scale).collect()
}

fn bench_matmul(c: &mut Criterion) {
    let cfg = shape_config("smollm2").unwrap();
    let (d, qd, kvd, ff, v) = (
        cfg.hidden_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let projections = [
        ("q_proj", qd, d),
        ("k_proj", kvd, d),
        ("v_proj", kvd, d),
        ("o_proj", d, qd),
        ("gate_proj", ff, d),
        ("up_proj", ff, d),
        ("down_proj", d, ff),
        ("lm_head", v, d),
    ];
    let mut g = c.benchmark_group("matmul");
    for (name, n, k) in projections {
        let w = randn(n * k, 1, 1.0 / (k as f32).sqrt());
        for m in [1usize, PREFILL] {
            let x = randn(m * k, 2, 1.0);
            let mut out = vec![0f32; m * n];
            if m == 1 {
                g.throughput(Throughput::Bytes((n * k * 4) as u64));
            } else {
                g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            }
            g.bench_function(BenchmarkId::new(name, format!("m{m}")), |b| {
                b.iter(|| {
                    matmul::matmul_fwd(black_box(&x), &w, &mut out, m, n, k, 1.0, false);
                })
            });
        }
    }
    g.finish();
}

fn bench_attention(c: &mut Criterion) {
    let cfg = shape_config("smollm2").unwrap();
    let cap = PREFILL + 64;
    let mut g = c.benchmark_group("attention");
    for (name, q_len, start) in [("prefill", PREFILL, 0), ("decode", 1, PREFILL)] {
        let s = AttnShape {
            batch: 1,
            q_len,
            start_pos: start,
            capacity: cap,
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        };
        let q = randn(q_len * s.q_dim(), 3, 1.0);
        let kc = randn(cap * s.kv_dim(), 4, 1.0);
        let vc = randn(cap * s.kv_dim(), 5, 1.0);
        let mut out = vec![0f32; q.len()];
        let pairs = repshield::bench::causal_pairs(start, q_len);
        g.throughput(Throughput::Elements(
            (4 * pairs * s.n_heads * s.head_dim) as u64,
        ));
        g.bench_function(
            BenchmarkId::new(name, format!("q{q_len}_kv{}", start + q_len)),
            |b| b.iter(|| attention::attention_fwd(black_box(&q), &kc, &vc, None, &mut out, s)),
        );
    }
    g.finish();
}

fn bench_elementwise(c: &mut Criterion) {
    let cfg = shape_config("smollm2").unwrap();
    let (d, ff) = (cfg.hidden_size, cfg.intermediate_size);
    let mut g = c.benchmark_group("elementwise");
    for rows in [1usize, PREFILL] {
        let x = randn(rows * d, 6, 1.0);
        let w = randn(d, 7, 0.1);
        let mut out = vec![0f32; rows * d];
        g.throughput(Throughput::Bytes((2 * rows * d * 4) as u64));
        g.bench_function(BenchmarkId::new("rmsnorm", rows), |b| {
            b.iter(|| rmsnorm::rmsnorm_fwd(black_box(&x), &w, d, 1e-5, &mut out))
        });
        let mut resid = x.clone();
        g.throughput(Throughput::Bytes((4 * rows * d * 4) as u64));
        g.bench_function(BenchmarkId::new("add_rmsnorm", rows), |b| {
            b.iter(|| rmsnorm::add_rmsnorm_fwd(&mut resid, black_box(&x), &w, d, 1e-5, &mut out))
        });

        let inv_freq = cfg.rope_inv_freq();
        let mut q = randn(rows * cfg.q_dim(), 8, 1.0);
        g.throughput(Throughput::Bytes((2 * q.len() * 4) as u64));
        g.bench_function(BenchmarkId::new("rope_q", rows), |b| {
            b.iter(|| {
                rope::rope_fwd(
                    black_box(&mut q),
                    rows,
                    cfg.num_heads,
                    cfg.head_dim,
                    if rows == 1 { PREFILL } else { 0 },
                    &inv_freq,
                )
            })
        });

        let gate = randn(rows * ff, 9, 1.0);
        let up = randn(rows * ff, 10, 1.0);
        let mut act = vec![0f32; rows * ff];
        g.throughput(Throughput::Bytes((3 * rows * ff * 4) as u64));
        g.bench_function(BenchmarkId::new("swiglu", rows), |b| {
            b.iter(|| swiglu::swiglu_fwd(black_box(&gate), &up, &mut act))
        });
    }
    let table = randn(cfg.vocab_size * d, 11, 1.0);
    let mut r = Rng::new(12);
    let ids: Vec<u32> = (0..PREFILL)
        .map(|_| (r.next_u64() % cfg.vocab_size as u64) as u32)
        .collect();
    let mut out = vec![0f32; PREFILL * d];
    g.throughput(Throughput::Bytes((2 * PREFILL * d * 4) as u64));
    g.bench_function(BenchmarkId::new("embedding", PREFILL), |b| {
        b.iter(|| embedding::embedding_fwd(&table, black_box(&ids), d, &mut out))
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = cpu_ops;
    config = config();
    targets = bench_matmul, bench_attention, bench_elementwise
}
criterion_main!(cpu_ops);
