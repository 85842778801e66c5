//! GGUF v2/v3 reader: metadata, tensors (dequantised to f32), config, tokenizer and chat template.
//!
//! File layout (little-endian throughout):
//!
//! ```text
//! "GGUF"  u32 version  u64 tensor_count  u64 kv_count
//! kv_count     × { string key, u32 value_type, value }
//! tensor_count × { string name, u32 n_dims, n_dims × u64 ne, u32 ggml_type, u64 offset }
//! padding to `general.alignment` (default 32)
//! tensor data (each tensor at data_start + offset)
//! ```
//!
//! A string is `u64 len` + bytes. Every read is bounds-checked against the file; counts are
//! checked against the bytes left before anything is allocated, so a corrupt file gives an
//! error naming the file and the field, never a panic or a huge allocation.
//!
//! Tensor dims are stored fastest-first (`ne[0]` is the column count), so a GGUF tensor with
//! `ne = [cols, rows]` is the row-major `[rows, cols]` matrix. Quantised blocks are decoded
//! exactly as ggml's `dequantize_row_*` do.

use super::config::{ModelConfig, RopeScaling};
use super::tokenizer::ChatTokenizer;
use super::weights::{HostTensor, ModelWeights, TensorSource};
use super::LoadedModel;
use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of each tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal; deeper nesting than this is treated as corruption.
const MAX_ARRAY_NESTING: usize = 8;
/// Below this many elements a tensor is dequantised on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 16;

// ---------------------------------------------------------------------------------------------
// Tensor types
// ---------------------------------------------------------------------------------------------

/// A ggml tensor type id (`enum ggml_type`). Unknown ids are kept so errors can name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GgmlType(pub u32);

/// (id, name, elements per block, bytes per block), as ggml's type traits.
const GGML_TYPES: &[(u32, &str, usize, usize)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

impl GgmlType {
    pub const F32: Self = Self(0);
    pub const F16: Self = Self(1);
    pub const Q4_0: Self = Self(2);
    pub const Q4_1: Self = Self(3);
    pub const Q5_0: Self = Self(6);
    pub const Q5_1: Self = Self(7);
    pub const Q8_0: Self = Self(8);
    pub const Q2_K: Self = Self(10);
    pub const Q3_K: Self = Self(11);
    pub const Q4_K: Self = Self(12);
    pub const Q5_K: Self = Self(13);
    pub const Q6_K: Self = Self(14);
    pub const BF16: Self = Self(30);

    /// Types [`dequantize`] can decode.
    pub const SUPPORTED: &'static [GgmlType] = &[
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
    ];

    fn entry(self) -> Option<&'static (u32, &'static str, usize, usize)> {
        GGML_TYPES.iter().find(|e| e.0 == self.0)
    }

    /// ggml's name for the type ("Q4_1"), `None` for ids ggml does not define.
    pub fn name(self) -> Option<&'static str> {
        self.entry().map(|e| e.1)
    }

    /// (elements per block, bytes per block); `None` for unknown ids.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        self.entry().map(|e| (e.2, e.3))
    }

    pub fn is_supported(self) -> bool {
        Self::SUPPORTED.contains(&self)
    }

    /// Bytes taken by `numel` elements, `None` when unknown, not whole blocks, or overflowing.
    pub fn bytes_for(self, numel: u64) -> Option<u64> {
        let (bs, ts) = self.block_layout()?;
        if !numel.is_multiple_of(bs as u64) {
            return None;
        }
        (numel / bs as u64).checked_mul(ts as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "unknown type {}", self.0),
        }
    }
}

fn supported_list() -> String {
    GgmlType::SUPPORTED
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// Dequantisation (ggml-quants.c, dequantize_row_*)
// ---------------------------------------------------------------------------------------------

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

fn deq_f32(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

fn deq_f16(b: &[u8], y: &mut [f32]) {
    y[0] = f16_at(b, 0);
}

fn deq_bf16(b: &[u8], y: &mut [f32]) {
    y[0] = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
}

/// block_q4_0 { f16 d; u8 qs[16] }: x = (nibble - 8) * d; low nibbles first, then high.
fn deq_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0F) as i32 - 8;
        let x1 = (qs[j] >> 4) as i32 - 8;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// block_q4_1 { f16 d; f16 m; u8 qs[16] }: x = nibble * d + m.
fn deq_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0F) as i32;
        let x1 = (qs[j] >> 4) as i32;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

/// block_q5_0 { f16 d; u8 qh[4]; u8 qs[16] }: 5-bit values with the 5th bit in qh, minus 16.
fn deq_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let xh0 = ((qh >> j) << 4) & 0x10;
        let xh1 = (qh >> (j + 12)) & 0x10;
        let x0 = ((qs[j] & 0x0F) as u32 | xh0) as i32 - 16;
        let x1 = ((qs[j] >> 4) as u32 | xh1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// block_q5_1 { f16 d; f16 m; u8 qh[4]; u8 qs[16] }: x = q5 * d + m.
fn deq_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let xh0 = ((qh >> j) << 4) & 0x10;
        let xh1 = (qh >> (j + 12)) & 0x10;
        let x0 = (qs[j] & 0x0F) as u32 | xh0;
        let x1 = (qs[j] >> 4) as u32 | xh1;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

/// block_q8_0 { f16 d; i8 qs[32] }: x = q * d.
fn deq_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// ggml's get_scale_min_k4: 6-bit scale and min number `j` (0..8) from the 12 packed bytes.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// block_q2_K { u8 scales[16]; u8 qs[64]; f16 d; f16 dmin }.
fn deq_q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let d = f16_at(b, 80);
    let min = f16_at(b, 82);
    let mut is = 0;
    let mut out = 0;
    for n in 0..2 {
        let q = &b[16 + 32 * n..16 + 32 * n + 32];
        let mut shift = 0;
        for _ in 0..4 {
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0x0F) as f32;
                let ml = min * (sc >> 4) as f32;
                for l in 0..16 {
                    y[out] = dl * ((q[l + 16 * half] >> shift) & 3) as i8 as f32 - ml;
                    out += 1;
                }
            }
            shift += 2;
        }
    }
}

/// block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d }.
fn deq_q3_k(b: &[u8], y: &mut [f32]) {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let hm = &b[0..32];
    let sc = &b[96..108];
    let d_all = f16_at(b, 108);
    let mut aux = [
        u32::from_le_bytes([sc[0], sc[1], sc[2], sc[3]]),
        u32::from_le_bytes([sc[4], sc[5], sc[6], sc[7]]),
        u32::from_le_bytes([sc[8], sc[9], sc[10], sc[11]]),
        0,
    ];
    let tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4);
    aux[3] = ((aux[1] >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4);
    aux[0] = (aux[0] & KMASK2) | ((tmp & KMASK1) << 4);
    aux[1] = (aux[1] & KMASK2) | (((tmp >> 2) & KMASK1) << 4);
    let mut scales = [0i8; 16];
    for (i, a) in aux.iter().enumerate() {
        for (k, byte) in a.to_le_bytes().iter().enumerate() {
            scales[4 * i + k] = *byte as i8;
        }
    }
    let mut is = 0;
    let mut m: u8 = 1;
    let mut out = 0;
    for n in 0..2 {
        let q = &b[32 + 32 * n..32 + 32 * n + 32];
        let mut shift = 0;
        for _ in 0..4 {
            for half in 0..2 {
                let dl = d_all * (scales[is] as i32 - 32) as f32;
                is += 1;
                for l in 0..16 {
                    let idx = l + 16 * half;
                    let lo = ((q[idx] >> shift) & 3) as i8;
                    let hi = if hm[idx] & m != 0 { 0 } else { 4 };
                    y[out] = dl * (lo - hi) as f32;
                    out += 1;
                }
            }
            shift += 2;
            m <<= 1;
        }
    }
}

/// block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128] }.
fn deq_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    for n in 0..4 {
        let q = &b[16 + 32 * n..16 + 32 * n + 32];
        let (sc1, m1) = scale_min_k4(2 * n, scales);
        let (sc2, m2) = scale_min_k4(2 * n + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let yo = &mut y[64 * n..64 * n + 64];
        for l in 0..32 {
            yo[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            yo[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// block_q5_K { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128] }.
fn deq_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let mut u1: u8 = 1;
    let mut u2: u8 = 2;
    for n in 0..4 {
        let ql = &b[48 + 32 * n..48 + 32 * n + 32];
        let (sc1, m1) = scale_min_k4(2 * n, scales);
        let (sc2, m2) = scale_min_k4(2 * n + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let yo = &mut y[64 * n..64 * n + 64];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            yo[l] = d1 * ((ql[l] & 0x0F) + h1) as f32 - m1;
            yo[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
        u1 <<= 2;
        u2 <<= 2;
    }
}

/// block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }.
fn deq_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let yo = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            yo[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            yo[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            yo[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            yo[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

fn run_blocks<F>(data: &[u8], out: &mut [f32], bs: usize, ts: usize, f: F)
where
    F: Fn(&[u8], &mut [f32]) + Sync,
{
    if out.len() < PAR_MIN_ELEMS {
        for (y, b) in out.chunks_exact_mut(bs).zip(data.chunks_exact(ts)) {
            f(b, y);
        }
    } else {
        // ~16k elements per task: big enough to amortise scheduling, small enough to balance.
        let blocks = (16384 / bs).max(1);
        out.par_chunks_mut(bs * blocks)
            .zip(data.par_chunks(ts * blocks))
            .for_each(|(o, d)| {
                for (y, b) in o.chunks_exact_mut(bs).zip(d.chunks_exact(ts)) {
                    f(b, y);
                }
            });
    }
}

/// Decodes `numel` elements of type `ty` from `data` to f32, exactly as ggml does.
/// `data` must hold exactly the bytes of those elements (whole blocks).
pub fn dequantize(ty: GgmlType, data: &[u8], numel: usize) -> Result<Vec<f32>> {
    let (bs, ts) = ty
        .block_layout()
        .ok_or_else(|| anyhow!("{ty} is not a ggml tensor type"))?;
    if !ty.is_supported() {
        bail!(
            "tensor type {ty} is not supported (supported: {})",
            supported_list()
        );
    }
    if !numel.is_multiple_of(bs) {
        bail!("{numel} elements is not a whole number of {ty} blocks of {bs}");
    }
    let need = numel / bs * ts;
    if data.len() != need {
        bail!(
            "{numel} {ty} elements take {need} bytes, got {}",
            data.len()
        );
    }
    let mut out = vec![0f32; numel];
    match ty {
        GgmlType::F32 => run_blocks(data, &mut out, bs, ts, deq_f32),
        GgmlType::F16 => run_blocks(data, &mut out, bs, ts, deq_f16),
        GgmlType::BF16 => run_blocks(data, &mut out, bs, ts, deq_bf16),
        GgmlType::Q4_0 => run_blocks(data, &mut out, bs, ts, deq_q4_0),
        GgmlType::Q4_1 => run_blocks(data, &mut out, bs, ts, deq_q4_1),
        GgmlType::Q5_0 => run_blocks(data, &mut out, bs, ts, deq_q5_0),
        GgmlType::Q5_1 => run_blocks(data, &mut out, bs, ts, deq_q5_1),
        GgmlType::Q8_0 => run_blocks(data, &mut out, bs, ts, deq_q8_0),
        GgmlType::Q2_K => run_blocks(data, &mut out, bs, ts, deq_q2_k),
        GgmlType::Q3_K => run_blocks(data, &mut out, bs, ts, deq_q3_k),
        GgmlType::Q4_K => run_blocks(data, &mut out, bs, ts, deq_q4_k),
        GgmlType::Q5_K => run_blocks(data, &mut out, bs, ts, deq_q5_k),
        GgmlType::Q6_K => run_blocks(data, &mut out, bs, ts, deq_q6_k),
        _ => unreachable!("is_supported covers every arm"),
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Q/K row permutation (llama.cpp's convert_hf_to_gguf `LlamaModel.permute`)
// ---------------------------------------------------------------------------------------------

fn check_qk_dims(len: usize, rows: usize, cols: usize, heads: usize) -> Result<usize> {
    if rows.checked_mul(cols) != Some(len) {
        bail!("Q/K permutation: {len} values do not form a {rows}x{cols} matrix");
    }
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        bail!("Q/K permutation: {rows} rows do not split into {heads} heads of even size");
    }
    Ok(rows / heads)
}

/// Applies llama.cpp's permutation to a row-major `[rows, cols]` Q or K projection (or bias,
/// `cols = 1`): numpy `w.reshape(heads, 2, hd/2, cols).swapaxes(1, 2).reshape(w.shape)`.
/// Permuted row `h*hd + 2i + t` holds original row `h*hd + t*hd/2 + i`.
pub fn permute_qk(data: &[f32], rows: usize, cols: usize, heads: usize) -> Result<Vec<f32>> {
    let hd = check_qk_dims(data.len(), rows, cols, heads)?;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for t in 0..2 {
                let dst = (h * hd + 2 * i + t) * cols;
                let src = (h * hd + t * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    Ok(out)
}

/// Undoes [`permute_qk`]: numpy `w.reshape(heads, hd/2, 2, cols).swapaxes(1, 2).reshape(w.shape)`,
/// turning llama.cpp's interleaved RoPE rows back into Hugging Face's half-split layout.
pub fn unpermute_qk(data: &[f32], rows: usize, cols: usize, heads: usize) -> Result<Vec<f32>> {
    let hd = check_qk_dims(data.len(), rows, cols, heads)?;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for t in 0..2 {
                let src = (h * hd + 2 * i + t) * cols;
                let dst = (h * hd + t * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------

/// The GGUF tensor name for a Hugging Face Llama-family tensor name, `None` if it has none.
pub fn hf_to_gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (n, rest) = rest.split_once('.')?;
    let layer: usize = n.parse().ok()?;
    let g = match rest {
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}"))
}

// ---------------------------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------------------------

/// A GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The GGUF type name ("u32", "string", "array" ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "u8",
            Self::I8(_) => "i8",
            Self::U16(_) => "u16",
            Self::I16(_) => "i16",
            Self::U32(_) => "u32",
            Self::I32(_) => "i32",
            Self::F32(_) => "f32",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
            Self::U64(_) => "u64",
            Self::I64(_) => "i64",
            Self::F64(_) => "f64",
        }
    }

    /// Any integer type holding a value >= 0.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v as u64),
            Self::U16(v) => Some(v as u64),
            Self::U32(v) => Some(v as u64),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type that fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::U8(v) => Some(v as i64),
            Self::U16(v) => Some(v as i64),
            Self::U32(v) => Some(v as i64),
            Self::U64(v) => i64::try_from(v).ok(),
            Self::I8(v) => Some(v as i64),
            Self::I16(v) => Some(v as i64),
            Self::I32(v) => Some(v as i64),
            Self::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Any numeric type, as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v as f64),
            Self::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Smallest encoding of a value of GGUF value type `t`; `None` for unknown types.
fn min_value_size(t: u32) -> Option<usize> {
    Some(match t {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,  // u64 length
        9 => 12, // u32 element type + u64 count
        10..=12 => 8,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Bounds-checked reader
// ---------------------------------------------------------------------------------------------

enum ReadError {
    /// `need` bytes wanted at `at`.
    Truncated {
        need: u64,
        at: usize,
    },
    Invalid(String),
    /// `count` entries of at least `min_size` bytes each cannot fit in what is left after `at`.
    Count {
        count: u64,
        min_size: usize,
        at: usize,
    },
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], ReadError> {
        if n > self.remaining() as u64 {
            return Err(ReadError::Truncated {
                need: n,
                at: self.pos,
            });
        }
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ReadError> {
        let s = self.take(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, ReadError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ReadError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, ReadError> {
        let len = self.u64()?;
        let bytes = self.take(len)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    /// Checks that `count` entries of at least `min_size` bytes each can fit in what is left.
    fn check_count(&self, count: u64, min_size: usize) -> Result<usize, ReadError> {
        let need = count.checked_mul(min_size as u64);
        if need.is_none_or(|b| b > self.remaining() as u64) {
            return Err(ReadError::Count {
                count,
                min_size,
                at: self.pos,
            });
        }
        Ok(count as usize)
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue, ReadError> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>()?[0]),
            1 => GgufValue::I8(self.array::<1>()?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => {
                    return Err(ReadError::Invalid(format!(
                        "bool value {b} is neither 0 nor 1"
                    )))
                }
            },
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(ReadError::Invalid(format!(
                        "arrays nested deeper than {MAX_ARRAY_NESTING}"
                    )));
                }
                let et = self.u32()?;
                let min = min_value_size(et).ok_or_else(|| {
                    ReadError::Invalid(format!("unknown array element type {et}"))
                })?;
                let n = self.u64()?;
                let n = self.check_count(n, min)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(et, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            t => return Err(ReadError::Invalid(format!("unknown value type {t}"))),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------------

/// One tensor's header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// GGUF order: `ne[0]` is the fastest-varying (column) dimension.
    pub ne: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
    /// Bytes of data; `None` for a type id ggml does not define.
    pub nbytes: Option<u64>,
}

impl GgufTensorInfo {
    /// Row-major shape (`ne` reversed): a matrix is `[rows, cols]`.
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&x| x as usize).collect()
    }

    pub fn numel(&self) -> u64 {
        self.ne.iter().product()
    }
}

enum Bytes {
    Map(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: metadata and tensor headers, with the tensor data memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    pub version: u32,
    metadata: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .finish()
    }
}

fn read_err(path: &Path, len: usize, what: &str, e: ReadError) -> anyhow::Error {
    match e {
        ReadError::Truncated { need, at } => anyhow!(
            "{}: truncated while reading {what} (needs {need} bytes at offset {at}, the file has {len} bytes)",
            path.display()
        ),
        ReadError::Invalid(msg) => anyhow!("{}: corrupt {what}: {msg}", path.display()),
        ReadError::Count { count, min_size, at } => anyhow!(
            "{}: truncated or corrupt file while reading {what}: count {count} is impossible (at least \
             {min_size} bytes each, only {} bytes left after offset {at})",
            path.display(),
            len - at
        ),
    }
}

impl GgufFile {
    /// Opens and parses `path` (memory-mapped; tensor data is read on demand).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("{}: cannot open GGUF file", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("{}: cannot stat", path.display()))?
            .len();
        let bytes = if len == 0 {
            Bytes::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only; like every mmap-based loader we assume the file is not
            // truncated or rewritten by another process while it is open.
            Bytes::Map(
                unsafe { Mmap::map(&file) }
                    .with_context(|| format!("{}: cannot memory-map", path.display()))?,
            )
        };
        Self::parse(path.to_path_buf(), bytes)
    }

    /// Parses a GGUF image held in memory; `name` is used in error messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(name.into(), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<Self> {
        let len = bytes.len();
        let mut r = Reader {
            buf: &bytes,
            pos: 0,
        };
        let p = path.as_path();
        let err = |what: &str, e: ReadError| read_err(p, len, what, e);

        let magic = r.array::<4>().map_err(|e| err("the magic number", e))?;
        if magic != GGUF_MAGIC {
            bail!(
                "{}: not a GGUF file (starts with {:?} = {:02x?}, expected \"GGUF\")",
                p.display(),
                String::from_utf8_lossy(&magic),
                magic
            );
        }
        let version = r.u32().map_err(|e| err("the version", e))?;
        match version {
            2 | 3 => {}
            1 => bail!(
                "{}: GGUF version 1 is not supported (only versions 2 and 3)",
                p.display()
            ),
            v if matches!(v.swap_bytes(), 2 | 3) => {
                bail!(
                    "{}: big-endian GGUF files are not supported (version field {v:#x})",
                    p.display()
                )
            }
            v => bail!(
                "{}: unsupported GGUF version {v} (only versions 2 and 3)",
                p.display()
            ),
        }
        let tensor_count = r.u64().map_err(|e| err("the tensor count", e))?;
        let kv_count = r.u64().map_err(|e| err("the metadata count", e))?;
        // Smallest metadata entry: empty key (8) + type (4) + a one-byte value.
        let kv_count = r
            .check_count(kv_count, 13)
            .map_err(|e| err("header field metadata_kv_count", e))?;
        // Smallest tensor info: empty name (8) + n_dims (4) + type (4) + offset (8).
        let tensor_count = r
            .check_count(tensor_count, 24)
            .map_err(|e| err("header field tensor_count", e))?;

        let mut metadata = Vec::with_capacity(kv_count);
        let mut meta_index = HashMap::with_capacity(kv_count);
        for i in 0..kv_count {
            let key = r
                .string()
                .map_err(|e| err(&format!("the key of metadata entry {i}"), e))?;
            let what = || format!("metadata entry {i} ({key})");
            let ty = r.u32().map_err(|e| err(&what(), e))?;
            let value = r.value(ty, 0).map_err(|e| err(&what(), e))?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                bail!(
                    "{}: corrupt metadata: key {key:?} appears twice",
                    p.display()
                );
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(GgufValue::U32(a)) if a.is_power_of_two() => *a as u64,
            Some(v) => bail!(
                "{}: corrupt metadata general.alignment: {v:?} (must be a u32 power of two)",
                p.display()
            ),
        };

        let mut tensors = Vec::with_capacity(tensor_count);
        let mut tensor_index = HashMap::with_capacity(tensor_count);
        for i in 0..tensor_count {
            let name = r
                .string()
                .map_err(|e| err(&format!("tensor info {i}"), e))?;
            let what = || format!("tensor info {i} ({name})");
            let n_dims = r.u32().map_err(|e| err(&what(), e))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                bail!(
                    "{}: corrupt {}: {n_dims} dimensions (must be 1 to {MAX_DIMS})",
                    p.display(),
                    what()
                );
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                ne.push(r.u64().map_err(|e| err(&what(), e))?);
            }
            let ggml_type = GgmlType(r.u32().map_err(|e| err(&what(), e))?);
            let offset = r.u64().map_err(|e| err(&what(), e))?;
            let numel = ne.iter().try_fold(1u64, |acc, &d| {
                if d > i64::MAX as u64 {
                    None
                } else {
                    acc.checked_mul(d)
                }
            });
            let Some(numel) = numel.filter(|&n| n <= i64::MAX as u64) else {
                bail!(
                    "{}: corrupt {}: dimensions {ne:?} overflow",
                    p.display(),
                    what()
                );
            };
            let nbytes = match ggml_type.block_layout() {
                None => None,
                Some((bs, _)) => {
                    if !ne[0].is_multiple_of(bs as u64) {
                        bail!(
                            "{}: corrupt {}: row length ne[0] = {} is not a multiple of the {ggml_type} block size {bs}",
                            p.display(),
                            what(),
                            ne[0]
                        );
                    }
                    match ggml_type.bytes_for(numel) {
                        Some(b) => Some(b),
                        None => bail!(
                            "{}: corrupt {}: size of dimensions {ne:?} overflows",
                            p.display(),
                            what()
                        ),
                    }
                }
            };
            if !offset.is_multiple_of(alignment) {
                bail!(
                    "{}: corrupt {}: data offset {offset} is not a multiple of the alignment {alignment}",
                    p.display(),
                    what()
                );
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                bail!(
                    "{}: corrupt tensor info {i}: tensor name {name:?} appears twice",
                    p.display()
                );
            }
            tensors.push(GgufTensorInfo {
                name,
                ne,
                ggml_type,
                offset,
                nbytes,
            });
        }

        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        for t in &tensors {
            let Some(nbytes) = t.nbytes else { continue };
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(nbytes));
            match end {
                Some(end) if end <= len as u64 => {}
                _ => bail!(
                    "{}: truncated: the data of tensor {} ({}, {} bytes at data offset {}) ends past the end of \
                     the file ({len} bytes, data section starts at {data_offset})",
                    p.display(),
                    t.name,
                    t.ggml_type,
                    nbytes,
                    t.offset
                ),
            }
        }

        Ok(Self {
            path,
            bytes,
            version,
            metadata,
            meta_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// All tensor headers, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, gguf_name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(gguf_name).map(|&i| &self.tensors[i])
    }

    fn wrong_type(&self, key: &str, want: &str, v: &GgufValue) -> anyhow::Error {
        anyhow!(
            "{}: metadata {key} should be {want}, found {} {v:?}",
            self.path.display(),
            v.type_name()
        )
    }

    /// An optional non-negative integer key (any integer type).
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v)),
        }
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a number", v)),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a string", v)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a bool", v)),
        }
    }

    fn missing(&self, key: &str) -> anyhow::Error {
        anyhow!("{}: missing metadata key {key}", self.path.display())
    }

    /// A required integer key that must also fit a usize.
    pub fn req_usize(&self, key: &str) -> Result<usize> {
        let v = self.get_u64(key)?.ok_or_else(|| self.missing(key))?;
        usize::try_from(v).map_err(|_| {
            anyhow!(
                "{}: metadata {key} = {v} is out of range",
                self.path.display()
            )
        })
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get_u64(key)? {
            None => Ok(None),
            Some(v) => usize::try_from(v).map(Some).map_err(|_| {
                anyhow!(
                    "{}: metadata {key} = {v} is out of range",
                    self.path.display()
                )
            }),
        }
    }

    /// An optional array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let arr = v
            .as_array()
            .ok_or_else(|| self.wrong_type(key, "an array of strings", v))?;
        arr.iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_str().ok_or_else(|| {
                    anyhow!(
                        "{}: metadata {key}[{i}] should be a string, found {} {x:?}",
                        self.path.display(),
                        x.type_name()
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// The `general.architecture` string.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")?
            .ok_or_else(|| self.missing("general.architecture"))
    }

    /// The raw bytes of a tensor's data.
    pub fn tensor_data(&self, info: &GgufTensorInfo) -> Result<&[u8]> {
        let nbytes = info.nbytes.ok_or_else(|| {
            anyhow!(
                "{}: tensor {} has {}, which this loader cannot read",
                self.path.display(),
                info.name,
                info.ggml_type
            )
        })?;
        // Ranges were checked against the file length when it was parsed.
        let start = (self.data_offset + info.offset) as usize;
        Ok(&self.bytes[start..start + nbytes as usize])
    }

    /// Loads a tensor by its GGUF name, dequantised to f32, in row-major shape. No Q/K unpermute.
    pub fn load_tensor(&self, gguf_name: &str) -> Result<HostTensor> {
        let info = self
            .tensor(gguf_name)
            .ok_or_else(|| anyhow!("{}: missing tensor {gguf_name}", self.path.display()))?;
        if !info.ggml_type.is_supported() {
            bail!(
                "{}: tensor {} has type {}, which this loader cannot dequantise (supported: {})",
                self.path.display(),
                info.name,
                info.ggml_type,
                supported_list()
            );
        }
        let data = self.tensor_data(info)?;
        let numel = info.numel() as usize;
        let v = dequantize(info.ggml_type, data, numel).with_context(|| {
            format!(
                "{}: dequantising tensor {} ({})",
                self.path.display(),
                info.name,
                info.ggml_type
            )
        })?;
        Ok(HostTensor::new(info.shape(), v))
    }

    /// Distinct tensor types, largest share of bytes first, e.g. "Q4_1+Q8_0+F32".
    pub fn file_dtype(&self) -> String {
        let mut by_type: HashMap<GgmlType, u64> = HashMap::new();
        for t in &self.tensors {
            *by_type.entry(t.ggml_type).or_default() += t.nbytes.unwrap_or(0);
        }
        let mut v: Vec<_> = by_type.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.iter()
            .map(|(t, _)| t.to_string())
            .collect::<Vec<_>>()
            .join("+")
    }

    /// Whether llama.cpp permuted this architecture's Q/K rows for its interleaved RoPE.
    fn qk_permuted(&self) -> Result<bool> {
        Ok(matches!(self.architecture()?, "llama" | "mistral"))
    }

    /// Heads to unpermute with, for a GGUF tensor name (`None`: not a permuted tensor).
    fn qk_heads(&self, gguf_name: &str) -> Result<Option<usize>> {
        let Some(rest) = gguf_name.strip_prefix("blk.") else {
            return Ok(None);
        };
        let Some((_, kind)) = rest.split_once('.') else {
            return Ok(None);
        };
        let is_q = matches!(kind, "attn_q.weight" | "attn_q.bias");
        let is_k = matches!(kind, "attn_k.weight" | "attn_k.bias");
        if !(is_q || is_k) || !self.qk_permuted()? {
            return Ok(None);
        }
        let arch = self.architecture()?;
        let heads = self.req_usize(&format!("{arch}.attention.head_count"))?;
        if is_q {
            return Ok(Some(heads));
        }
        Ok(Some(
            self.opt_usize(&format!("{arch}.attention.head_count_kv"))?
                .unwrap_or(heads),
        ))
    }

    /// Model hyper-parameters from the metadata.
    pub fn config(&self) -> Result<ModelConfig> {
        let p = self.path.display();
        let garch = self.architecture()?;
        let arch = match garch {
            "llama" | "mistral" | "qwen2" => garch.to_string(),
            other => bail!("{p}: unsupported architecture {other:?} (general.architecture); supported: llama, mistral, qwen2"),
        };
        let k = |s: &str| format!("{garch}.{s}");
        let hidden_size = self.req_usize(&k("embedding_length"))?;
        let num_layers = self.req_usize(&k("block_count"))?;
        let intermediate_size = self.req_usize(&k("feed_forward_length"))?;
        let num_heads = self.req_usize(&k("attention.head_count"))?;
        let num_kv_heads = self
            .opt_usize(&k("attention.head_count_kv"))?
            .unwrap_or(num_heads);
        if num_heads == 0 {
            bail!("{p}: metadata {} is 0", k("attention.head_count"));
        }
        let head_dim = match self.opt_usize(&k("attention.key_length"))? {
            Some(hd) => hd,
            None => {
                if !hidden_size.is_multiple_of(num_heads) {
                    bail!(
                        "{p}: {} = {hidden_size} is not a multiple of {} = {num_heads} and {} is absent",
                        k("embedding_length"),
                        k("attention.head_count"),
                        k("attention.key_length")
                    );
                }
                hidden_size / num_heads
            }
        };
        if let Some(vl) = self.opt_usize(&k("attention.value_length"))? {
            if vl != head_dim {
                bail!(
                    "{p}: {} = {vl} differs from the key length {head_dim}; not supported",
                    k("attention.value_length")
                );
            }
        }
        if let Some(rd) = self.opt_usize(&k("rope.dimension_count"))? {
            if rd != head_dim {
                bail!(
                    "{p}: {} = {rd} but head_dim = {head_dim}: partial rotary embeddings are not supported",
                    k("rope.dimension_count")
                );
            }
        }
        let rms_eps = self
            .get_f64(&k("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| self.missing(&k("attention.layer_norm_rms_epsilon")))?
            as f32;
        let rope_theta = self.get_f64(&k("rope.freq_base"))?.unwrap_or(10000.0) as f32;
        let max_position = self.req_usize(&k("context_length"))?;
        let vocab_size = match self.get("tokenizer.ggml.tokens") {
            Some(GgufValue::Array(a)) => a.len(),
            Some(v) => {
                return Err(self.wrong_type("tokenizer.ggml.tokens", "an array of strings", v))
            }
            None => match self.opt_usize(&k("vocab_size"))? {
                Some(v) => v,
                None => self
                    .tensor("token_embd.weight")
                    .and_then(|t| t.ne.get(1).copied())
                    .map(|v| v as usize)
                    .ok_or_else(|| {
                        anyhow!("{p}: cannot tell the vocabulary size (no tokenizer.ggml.tokens)")
                    })?,
            },
        };
        let bos_token_id = self
            .get_u64("tokenizer.ggml.bos_token_id")?
            .map(|x| x as u32);
        let mut eos_token_ids = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = self.get_u64(key)? {
                if !eos_token_ids.contains(&(id as u32)) {
                    eos_token_ids.push(id as u32);
                }
            }
        }
        let mut cfg = ModelConfig {
            qkv_bias: arch == "qwen2" || self.tensor("blk.0.attn_q.bias").is_some(),
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_eps,
            rope_theta,
            rope_scaling: None,
            tie_embeddings: self.tensor("output.weight").is_none(),
            max_position,
            bos_token_id,
            eos_token_ids,
        };
        cfg.rope_scaling = self.rope_scaling(&cfg)?;
        cfg.validate().map_err(|e| anyhow!("{p}: {e}"))?;
        Ok(cfg)
    }

    fn rope_scaling(&self, cfg: &ModelConfig) -> Result<Option<RopeScaling>> {
        let p = self.path.display();
        let garch = self.architecture()?;
        let k = |s: &str| format!("{garch}.{s}");
        let kind = self.get_str(&k("rope.scaling.type"))?;
        let factor = self.get_f64(&k("rope.scaling.factor"))?;
        let scaling = match kind {
            Some("linear") => {
                let f = factor.ok_or_else(|| self.missing(&k("rope.scaling.factor")))?;
                Some(RopeScaling::Linear { factor: f as f32 })
            }
            Some("none") => None,
            None => match self.get_f64(&k("rope.scale_linear"))? {
                Some(f) if f != 1.0 => Some(RopeScaling::Linear { factor: f as f32 }),
                _ => None,
            },
            Some(other) => bail!(
                "{p}: unsupported RoPE scaling {other:?} ({}); supported: linear, llama3",
                k("rope.scaling.type")
            ),
        };
        if self.tensor("rope_freqs.weight").is_none() {
            return Ok(scaling);
        }
        if scaling.is_some() {
            bail!(
                "{p}: both {} and a rope_freqs.weight tensor are present",
                k("rope.scaling.type")
            );
        }
        // Llama 3.1+ files store the per-frequency divisors of "llama3" scaling as a tensor.
        let freqs = self.load_tensor("rope_freqs.weight")?;
        let half = cfg.head_dim / 2;
        if freqs.data.len() != half {
            bail!(
                "{p}: rope_freqs.weight has {} values, expected head_dim/2 = {half}",
                freqs.data.len()
            );
        }
        if freqs.data.iter().all(|&f| f == 1.0) {
            return Ok(None);
        }
        let factor = freqs.data.iter().cloned().fold(f32::MIN, f32::max);
        let original = self.opt_usize(&k("rope.scaling.original_context_length"))?;
        let mut tried = Vec::new();
        // Every Llama 3.x release uses low/high frequency factors 1 and 4; the original context
        // is 8192 unless the file says otherwise.
        let (lo, hi) = (1.0f32, 4.0f32);
        let plain = ModelConfig {
            rope_scaling: None,
            ..cfg.clone()
        }
        .rope_inv_freq();
        for orig in original.into_iter().chain([8192]) {
            let cand = RopeScaling::Llama3 {
                factor,
                low_freq_factor: lo,
                high_freq_factor: hi,
                original_max_position: orig,
            };
            let scaled = ModelConfig {
                rope_scaling: Some(cand.clone()),
                ..cfg.clone()
            }
            .rope_inv_freq();
            let ok = plain
                .iter()
                .zip(&scaled)
                .zip(&freqs.data)
                .all(|((b, s), f)| {
                    let want = b / s;
                    (want - f).abs() <= 1e-3 * want.abs().max(1.0)
                });
            if ok {
                return Ok(Some(cand));
            }
            tried.push(format!(
                "factor {factor}, low {lo}, high {hi}, original context {orig}"
            ));
        }
        bail!(
            "{p}: rope_freqs.weight does not match Llama-3 RoPE scaling with any known parameters (tried {})",
            tried.join("; ")
        )
    }

    /// Checks every tensor the config calls for: present, shaped as the metadata says, and of a
    /// type this loader can decode. Cheap (headers only); run before dequantising anything.
    pub fn check_tensors(&self, cfg: &ModelConfig) -> Result<()> {
        let p = self.path.display();
        let d = cfg.hidden_size;
        let (qd, kvd, ff, v) = (
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        let mut want: Vec<(String, Vec<usize>)> = vec![
            ("token_embd.weight".into(), vec![v, d]),
            ("output_norm.weight".into(), vec![d]),
        ];
        if !cfg.tie_embeddings {
            want.push(("output.weight".into(), vec![v, d]));
        }
        for i in 0..cfg.num_layers {
            let b = |n: &str| format!("blk.{i}.{n}");
            want.extend([
                (b("attn_norm.weight"), vec![d]),
                (b("attn_q.weight"), vec![qd, d]),
                (b("attn_k.weight"), vec![kvd, d]),
                (b("attn_v.weight"), vec![kvd, d]),
                (b("attn_output.weight"), vec![d, qd]),
                (b("ffn_norm.weight"), vec![d]),
                (b("ffn_gate.weight"), vec![ff, d]),
                (b("ffn_up.weight"), vec![ff, d]),
                (b("ffn_down.weight"), vec![d, ff]),
            ]);
            if cfg.qkv_bias {
                want.extend([
                    (b("attn_q.bias"), vec![qd]),
                    (b("attn_k.bias"), vec![kvd]),
                    (b("attn_v.bias"), vec![kvd]),
                ]);
            }
        }
        let from = || {
            format!(
                "vocab {v}, hidden {d}, {} heads x head_dim {} (q {qd}), {} kv heads (kv {kvd}), ffn {ff}",
                cfg.num_heads, cfg.head_dim, cfg.num_kv_heads
            )
        };
        for (name, shape) in &want {
            let Some(t) = self.tensor(name) else {
                let hf = gguf_to_hf_name(name).unwrap_or_default();
                bail!("{p}: missing tensor {name} (Hugging Face name {hf})");
            };
            if t.shape() != *shape {
                bail!(
                    "{p}: tensor {name} has shape {:?} (GGUF ne {:?}) but the metadata implies {shape:?} ({})",
                    t.shape(),
                    t.ne,
                    from()
                );
            }
            if !t.ggml_type.is_supported() {
                bail!(
                    "{p}: tensor {name} has type {}, which this loader cannot dequantise (supported: {})",
                    t.ggml_type,
                    supported_list()
                );
            }
        }
        Ok(())
    }

    /// The tokenizer and chat template stored in the metadata (byte-level BPE only).
    pub fn tokenizer(&self) -> Result<ChatTokenizer> {
        build_tokenizer(self)
    }
}

/// The Hugging Face name for a GGUF tensor name (inverse of [`hf_to_gguf_name`]).
pub fn gguf_to_hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    let layer: usize = n.parse().ok()?;
    let h = match rest {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{h}"))
}

impl TensorSource for GgufFile {
    fn origin(&self) -> String {
        self.path.display().to_string()
    }

    fn contains(&self, name: &str) -> bool {
        hf_to_gguf_name(name).is_some_and(|g| self.tensor(&g).is_some())
    }

    /// Loads by Hugging Face name; Q/K of llama-arch files come back in Hugging Face row order.
    fn load(&self, name: &str) -> Result<HostTensor> {
        let g = hf_to_gguf_name(name).ok_or_else(|| {
            anyhow!(
                "{}: no GGUF tensor corresponds to {name:?}",
                self.path.display()
            )
        })?;
        if self.tensor(&g).is_none() {
            bail!(
                "{}: missing tensor {g} (Hugging Face name {name})",
                self.path.display()
            );
        }
        let mut t = self.load_tensor(&g)?;
        if let Some(heads) = self.qk_heads(&g)? {
            let rows = t.shape[0];
            let cols = if t.shape.len() > 1 {
                t.shape[1..].iter().product()
            } else {
                1
            };
            t.data = unpermute_qk(&t.data, rows, cols, heads)
                .with_context(|| format!("{}: tensor {g}", self.path.display()))?;
        }
        Ok(t)
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

/// Pre-tokenizer split regexes of the Llama 3 and Qwen2 `tokenizer.json` files (llama.cpp's
/// LLAMA3 and QWEN2 pre-tokenizers). GPT-2's own regex is built into tokenizers' ByteLevel.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

fn build_tokenizer(f: &GgufFile) -> Result<ChatTokenizer> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::normalizers::unicode::NFC;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

    let p = f.path.display();
    let model = f.get_str("tokenizer.ggml.model")?.ok_or_else(|| {
        anyhow!("{p}: no tokenizer in the GGUF metadata (tokenizer.ggml.model is missing)")
    })?;
    match model {
        "gpt2" => {}
        "llama" => bail!(
            "{p}: tokenizer.ggml.model is \"llama\" (SentencePiece), which is not supported for GGUF files; \
             only \"gpt2\" byte-level BPE is (Llama 3, Qwen2, SmolLM2). Load the model's Hugging Face \
             directory instead"
        ),
        other => bail!("{p}: unsupported tokenizer.ggml.model {other:?} (supported: \"gpt2\" byte-level BPE)"),
    }
    let tokens = f
        .get_str_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| f.missing("tokenizer.ggml.tokens"))?;
    let merges_raw = f
        .get_str_array("tokenizer.ggml.merges")?
        .ok_or_else(|| f.missing("tokenizer.ggml.merges"))?;
    let types: Vec<i64> = match f.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => {
            let a = v.as_array().ok_or_else(|| {
                f.wrong_type("tokenizer.ggml.token_type", "an array of integers", v)
            })?;
            if a.len() != tokens.len() {
                bail!(
                    "{p}: tokenizer.ggml.token_type has {} entries but there are {} tokens",
                    a.len(),
                    tokens.len()
                );
            }
            a.iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_i64().ok_or_else(|| {
                        anyhow!("{p}: tokenizer.ggml.token_type[{i}] is not an integer: {x:?}")
                    })
                })
                .collect::<Result<_>>()?
        }
    };
    let pre = f.get_str("tokenizer.ggml.pre")?.unwrap_or("default");

    let mut vocab = Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.to_string()).or_insert(i as u32);
    }
    let mut merges = Vec::with_capacity(merges_raw.len());
    for (i, m) in merges_raw.iter().enumerate() {
        let (a, b) = m.split_once(' ').ok_or_else(|| {
            anyhow!(
                "{p}: tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by a space"
            )
        })?;
        merges.push((a.to_string(), b.to_string()));
    }
    let llama3 = matches!(pre, "llama3" | "llama-v3" | "llama-bpe");
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(llama3)
        .build()
        .map_err(|e| anyhow!("{p}: building the BPE tokenizer from GGUF metadata: {e}"))?;
    let mut tok = Tokenizer::new(bpe);

    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        let s = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow!("pre-tokenizer regex: {e}"))?;
        Ok(Sequence::new(vec![s.into(), ByteLevel::new(false, true, false).into()]).into())
    };
    let pre_tok: PreTokenizerWrapper = match pre {
        // HF SmolLM/SmolLM2 tokenizer.json: Digits(individual) then ByteLevel with GPT-2's regex.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
        _ if llama3 => split(LLAMA3_REGEX)?,
        "qwen2" | "deepseek-r1-qwen" => {
            tok.with_normalizer(Some(NFC));
            split(QWEN2_REGEX)?
        }
        "default" | "gpt-2" | "gpt2" => ByteLevel::new(false, true, true).into(),
        other => bail!(
            "{p}: unsupported tokenizer.ggml.pre {other:?} (supported: smollm, llama-bpe/llama3, qwen2, \
             gpt-2/default); load the model's Hugging Face directory instead"
        ),
    };
    tok.with_pre_tokenizer(Some(pre_tok));
    tok.with_decoder(Some(ByteLevelDecoder::new(true, true, true)));

    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
        .map(|(s, _)| AddedToken::from(s.to_string(), true).normalized(false))
        .collect();
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == TOKEN_TYPE_USER_DEFINED)
        .map(|(s, _)| AddedToken::from(s.to_string(), false).normalized(false))
        .collect();
    tok.add_special_tokens(&special);
    tok.add_tokens(&user);

    let token_str = |key: &str| -> Result<Option<(u32, String)>> {
        match f.get_u64(key)? {
            None => Ok(None),
            Some(id) => match tokens.get(id as usize) {
                Some(s) => Ok(Some((id as u32, s.to_string()))),
                None => bail!(
                    "{p}: {key} = {id} is outside the vocabulary of {} tokens",
                    tokens.len()
                ),
            },
        }
    };
    let bos = token_str("tokenizer.ggml.bos_token_id")?;
    let eos = token_str("tokenizer.ggml.eos_token_id")?;
    if f.get_bool("tokenizer.ggml.add_bos_token")? == Some(true) {
        if let Some((id, s)) = &bos {
            let mut b = TemplateProcessing::builder();
            b.try_single(format!("{s} $A"))
                .map_err(|e| anyhow!("{p}: BOS template: {e}"))?;
            b.try_pair(format!("{s} $A {s}:1 $B:1"))
                .map_err(|e| anyhow!("{p}: BOS template: {e}"))?;
            b.special_tokens(vec![(s.as_str(), *id)]);
            let tp = b.build().map_err(|e| anyhow!("{p}: BOS template: {e}"))?;
            tok.with_post_processor(Some(tp));
        }
    }
    let chat_template = f.get_str("tokenizer.chat_template")?.map(str::to_string);
    Ok(ChatTokenizer::new(
        tok,
        chat_template,
        bos.map(|b| b.1),
        eos.map(|e| e.1),
    ))
}

// ---------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------

/// Loads a `.gguf` model: config from metadata, f32 weights (dequantised, Q/K unpermuted, in
/// Hugging Face naming) and the tokenizer with its chat template.
pub fn load_gguf(path: &Path) -> Result<LoadedModel> {
    let file = GgufFile::open(path)?;
    let config = file.config()?;
    file.check_tensors(&config)?;
    let tokenizer = file.tokenizer()?;
    let weights = ModelWeights::load(&config, &file)?;
    Ok(LoadedModel {
        config,
        weights,
        tokenizer,
        source: path.to_path_buf(),
        file_dtype: file.file_dtype(),
    })
}
