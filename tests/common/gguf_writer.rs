//! A tiny GGUF v3 writer for tests: metadata of every value type, tensors of any type id
//! (raw bytes), and helpers that build quantised blocks and llama.cpp's Q/K row permutation.
//! Written independently of the loader so the two can check each other.
#![allow(dead_code)]

use half::{bf16, f16};
use std::path::Path;

/// A metadata value (GGUF value type in brackets).
#[derive(Debug, Clone)]
pub enum Val {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    /// Array with the given element type id and already-encoded elements.
    Arr(u32, Vec<Val>),
}

impl Val {
    pub fn str(s: &str) -> Self {
        Val::Str(s.to_string())
    }
    pub fn strs(v: &[&str]) -> Self {
        Val::Arr(8, v.iter().map(|s| Val::str(s)).collect())
    }
    pub fn i32s(v: &[i32]) -> Self {
        Val::Arr(5, v.iter().map(|&x| Val::I32(x)).collect())
    }
    fn type_id(&self) -> u32 {
        match self {
            Val::U8(_) => 0,
            Val::I8(_) => 1,
            Val::U16(_) => 2,
            Val::I16(_) => 3,
            Val::U32(_) => 4,
            Val::I32(_) => 5,
            Val::F32(_) => 6,
            Val::Bool(_) => 7,
            Val::Str(_) => 8,
            Val::Arr(..) => 9,
            Val::U64(_) => 10,
            Val::I64(_) => 11,
            Val::F64(_) => 12,
        }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Val::U8(v) => out.push(*v),
            Val::I8(v) => out.push(*v as u8),
            Val::U16(v) => out.extend(v.to_le_bytes()),
            Val::I16(v) => out.extend(v.to_le_bytes()),
            Val::U32(v) => out.extend(v.to_le_bytes()),
            Val::I32(v) => out.extend(v.to_le_bytes()),
            Val::F32(v) => out.extend(v.to_le_bytes()),
            Val::Bool(v) => out.push(*v as u8),
            Val::Str(s) => put_str(out, s),
            Val::U64(v) => out.extend(v.to_le_bytes()),
            Val::I64(v) => out.extend(v.to_le_bytes()),
            Val::F64(v) => out.extend(v.to_le_bytes()),
            Val::Arr(t, items) => {
                out.extend(t.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for it in items {
                    it.encode(out);
                }
            }
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

#[derive(Debug, Clone)]
pub struct RawTensor {
    pub name: String,
    /// GGUF order (fastest first).
    pub ne: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct GgufWriter {
    pub version: u32,
    pub alignment: usize,
    pub kvs: Vec<(String, Val)>,
    pub tensors: Vec<RawTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        Self {
            version: 3,
            alignment: 32,
            kvs: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Sets (or replaces) a metadata key.
    pub fn kv(&mut self, key: &str, v: Val) -> &mut Self {
        self.kvs.retain(|(k, _)| k != key);
        self.kvs.push((key.to_string(), v));
        self
    }

    pub fn remove_kv(&mut self, key: &str) -> &mut Self {
        self.kvs.retain(|(k, _)| k != key);
        self
    }

    /// Adds (or replaces) a tensor given in GGUF order with raw data.
    pub fn raw(&mut self, name: &str, ne: &[u64], ty: u32, data: Vec<u8>) -> &mut Self {
        self.remove_tensor(name);
        self.tensors.push(RawTensor {
            name: name.to_string(),
            ne: ne.to_vec(),
            ty,
            data,
        });
        self
    }

    /// Adds an F32 tensor of row-major `shape`.
    pub fn f32(&mut self, name: &str, shape: &[usize], data: &[f32]) -> &mut Self {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        let ne: Vec<u64> = shape.iter().rev().map(|&x| x as u64).collect();
        self.raw(
            name,
            &ne,
            0,
            data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }

    /// Adds an F16 tensor of row-major `shape` (values rounded to f16).
    pub fn f16(&mut self, name: &str, shape: &[usize], data: &[f32]) -> &mut Self {
        let ne: Vec<u64> = shape.iter().rev().map(|&x| x as u64).collect();
        self.raw(
            name,
            &ne,
            1,
            data.iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect(),
        )
    }

    /// Adds a BF16 tensor of row-major `shape` (values rounded to bf16).
    pub fn bf16(&mut self, name: &str, shape: &[usize], data: &[f32]) -> &mut Self {
        let ne: Vec<u64> = shape.iter().rev().map(|&x| x as u64).collect();
        self.raw(
            name,
            &ne,
            30,
            data.iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
        )
    }

    pub fn remove_tensor(&mut self, name: &str) -> &mut Self {
        self.tensors.retain(|t| t.name != name);
        self
    }

    pub fn tensor_mut(&mut self, name: &str) -> &mut RawTensor {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .expect("no such tensor")
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let a = self.alignment;
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut out, k);
            out.extend(v.type_id().to_le_bytes());
            v.encode(&mut out);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend((t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ty.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len()).div_ceil(a) * a;
        }
        out.resize(out.len().div_ceil(a) * a, 0);
        let data_start = out.len();
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off, 0);
            out.extend(&t.data);
        }
        out
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.to_bytes()).expect("writing test GGUF");
    }
}

/// llama.cpp's `LlamaModel.permute` on a row-major `[rows, cols]` matrix:
/// numpy `w.reshape(heads, 2, rows/heads/2, cols).swapaxes(1, 2).reshape(w.shape)`.
pub fn llama_permute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0.0; w.len()];
    // out[h, i, t, :] = w[h, t, i, :]
    for h in 0..heads {
        for i in 0..half {
            for t in 0..2 {
                let dst = ((h * half + i) * 2 + t) * cols;
                let src = ((h * 2 + t) * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// block_q8_0: f16 scale then 32 signed bytes; value j = qs[j] * d.
pub fn q8_0_block(d: f32, qs: &[i8; 32]) -> Vec<u8> {
    let mut b = f16::from_f32(d).to_le_bytes().to_vec();
    b.extend(qs.iter().map(|&q| q as u8));
    b
}

/// block_q4_0: value j = (q[j] - 8) * d, q in 0..16; j < 16 in low nibbles, j >= 16 in high.
pub fn q4_0_block(d: f32, q: &[u8; 32]) -> Vec<u8> {
    let mut b = f16::from_f32(d).to_le_bytes().to_vec();
    b.extend((0..16).map(|j| (q[j] & 15) | ((q[j + 16] & 15) << 4)));
    b
}

/// block_q4_1: value j = q[j] * d + m.
pub fn q4_1_block(d: f32, m: f32, q: &[u8; 32]) -> Vec<u8> {
    let mut b = f16::from_f32(d).to_le_bytes().to_vec();
    b.extend(f16::from_f32(m).to_le_bytes());
    b.extend((0..16).map(|j| (q[j] & 15) | ((q[j + 16] & 15) << 4)));
    b
}
