//! Frozen-model representations captured once into a file (`repshield capture`) and read back
//! by the trainer instead of running the frozen forward every step.
//!
//! The frozen model is the same weights with the LoRA path skipped, and its pass always sees
//! the clean tokens (hard-negative mining only changes the tuned pass), so for a fixed data set
//! and layout its representations never change. They are stored per example, not per step:
//! the file serves any seed, step count or learning rate, and an example that comes back in a
//! later epoch is read, not recomputed.
//!
//! Only the rows an objective looks at are stored: the token rows its mask selects (every
//! objective skips unmasked rows, so the zeros the reader puts there are never read), at the
//! hidden-state indices it compares against. For the CRL triplet and RepBend that is the benign
//! set at every index, the harmful set at the target indices and the retain set's logits (KL);
//! for Circuit Breakers the retain set at every index and the harmful set at the targets.
//!
//! Exactness: capture runs the same `forward_train(use_lora = false)` call as the trainer, in
//! micro-batches of the training batch size (the last one padded by wrapping around), so every
//! forward has the row count a training step has. The CPU kernels compute each row of a
//! sequence independently of the other sequences in the batch (GEMM rows accumulate over `k`
//! in the same order whatever tile they sit in; attention and norms are per sequence), so the
//! values read back are bit-identical to a recompute (`tests/capture.rs` checks losses and
//! gradients step for step).
//!
//! File layout (little-endian):
//! ```text
//! [0, 8)    magic "RSFROZEN"
//! [8, 12)   format version (u32)
//! [12, 20)  header length in bytes (u64)
//! [20, ..)  header: JSON (Header), then zero padding to a multiple of 64 bytes
//! data      per section, per example: [n_indices, rows, width] values (f32 or bf16)
//! ```
//! The header carries a model fingerprint (config and a hash of a sample of the weights), the
//! data files' hashes, the layout and mask settings, the hidden-state indices, and each
//! example's offset, row count and a hash of its tokens; the trainer checks all of them and
//! names the file and the field that differs.

use super::data::{Encoder, Example, Layout, MaskMode, TokenBatch};
use super::step::{FrozenInputs, FrozenSet};
use super::trainer::{Datasets, Method, TrainConfig};
use crate::backend::Backend;
use crate::llama::{Input, Llama, LogitsMode};
use crate::model::{ChatTokenizer, ModelConfig};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub const MAGIC: [u8; 8] = *b"RSFROZEN";
pub const VERSION: u32 = 1;
/// Magic, version and header length.
const PREFIX: usize = 8 + 4 + 8;
/// The data starts at a multiple of this, so values can be read in place from the map.
const ALIGN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FrozenDtype {
    /// Bit-identical to recomputing (the default).
    F32,
    /// Half the size; training then differs from a recompute by bf16 rounding of the frozen side.
    Bf16,
}

impl FrozenDtype {
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 => 2,
        }
    }
}

/// The three data sets a training step draws a micro-batch from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SetName {
    /// Benign pairs + harmful prompts with refusals (RepBend's safe set).
    Benign,
    Harmful,
    Retain,
}

impl SetName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Benign => "benign",
            Self::Harmful => "harmful",
            Self::Retain => "retain",
        }
    }

    fn examples(self, d: &Datasets) -> &[Example] {
        match self {
            Self::Benign => &d.benign,
            Self::Harmful => &d.harmful,
            Self::Retain => &d.retain,
        }
    }

    /// The config's files this set is read from, with their roles.
    fn files(self, c: &TrainConfig) -> Vec<(&'static str, &Path)> {
        match self {
            Self::Benign => vec![("benign", &c.benign), ("refusal", &c.refusal)],
            Self::Harmful => vec![("harmful", &c.harmful)],
            Self::Retain => vec![("retain", &c.retain)],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Residual-stream rows at hidden-state indices, width = hidden size.
    Reps,
    /// Output logits, width = vocabulary size.
    Logits,
}

/// What an objective needs from the frozen model on one set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionSpec {
    pub set: SetName,
    pub kind: Kind,
    /// Hidden-state indices, increasing (the order the forward returns them in); empty for logits.
    pub indices: Vec<usize>,
    /// Which token rows are stored (logits: `all`, the attention mask).
    pub mask: MaskMode,
}

/// The frozen-model sections the configured method reads (mirrors `train::step`).
pub fn required_sections(c: &TrainConfig, cfg: &ModelConfig) -> Vec<SectionSpec> {
    let all: Vec<usize> = (0..=cfg.num_layers).collect();
    let mut targets = c.targets(cfg);
    targets.sort_unstable();
    targets.dedup();
    let reps = |set, indices: &[usize], mask| SectionSpec {
        set,
        kind: Kind::Reps,
        indices: indices.to_vec(),
        mask,
    };
    let logits = SectionSpec {
        set: SetName::Retain,
        kind: Kind::Logits,
        indices: vec![],
        mask: MaskMode::All,
    };
    match c.method {
        Method::Triplet | Method::Repbend => vec![
            reps(SetName::Benign, &all, c.mask),
            reps(SetName::Harmful, &targets, c.mask),
            logits,
        ],
        Method::CircuitBreakers => vec![
            reps(SetName::Retain, &all, MaskMode::All),
            reps(SetName::Harmful, &targets, MaskMode::All),
        ],
    }
}

/// 64-bit FNV-1a: a stable fingerprint for files, weights and token rows (not cryptographic;
/// it guards against mix-ups, not tampering).
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn write_f32s(&mut self, v: &[f32]) {
        for x in v {
            self.write(&x.to_le_bytes());
        }
    }
    fn hex(self) -> String {
        format!("{:016x}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelStamp {
    /// The model configuration (`Debug` of `ModelConfig`).
    pub config: String,
    /// Hash of every norm weight, the first block's q projection and the last block's down
    /// projection (at most 2^20 evenly spaced values of each).
    pub weights: String,
}

pub fn model_stamp<B: Backend>(model: &Llama<B>) -> Result<ModelStamp> {
    let be = &model.backend;
    let mut h = Fnv::new();
    let mut put = |buf: &B::Buf| -> Result<()> {
        let v = be.download(buf)?;
        let stride = v.len().div_ceil(1 << 20).max(1);
        h.write(&(v.len() as u64).to_le_bytes());
        for x in v.iter().step_by(stride) {
            h.write(&x.to_le_bytes());
        }
        Ok(())
    };
    put(&model.final_norm)?;
    for l in &model.layers {
        put(&l.attn_norm)?;
        put(&l.mlp_norm)?;
    }
    if let (Some(first), Some(last)) = (model.layers.first(), model.layers.last()) {
        put(&first.q)?;
        put(&last.down)?;
    }
    Ok(ModelStamp {
        config: format!("{:?}", model.cfg),
        weights: h.hex(),
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    /// `benign`, `refusal`, `harmful` or `retain` (the TrainConfig field).
    pub role: String,
    pub path: String,
    pub bytes: u64,
    pub hash: String,
}

fn file_stamp(role: &str, path: &Path) -> Result<FileStamp> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = Fnv::new();
    h.write(&bytes);
    Ok(FileStamp {
        role: role.to_string(),
        path: path.display().to_string(),
        bytes: bytes.len() as u64,
        hash: h.hex(),
    })
}

/// One example's place in the data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Byte offset from the start of the data.
    pub offset: u64,
    /// Stored token rows (the mask's count for this example).
    pub rows: usize,
    /// Hash of the example's token ids, attention mask and row mask.
    pub tokens: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Section {
    #[serde(flatten)]
    pub spec: SectionSpec,
    /// Values per row: hidden size (reps) or vocabulary size (logits).
    pub width: usize,
    /// One per example of the set, in file order.
    pub examples: Vec<Entry>,
}

impl Section {
    fn slabs(&self) -> usize {
        match self.spec.kind {
            Kind::Reps => self.spec.indices.len(),
            Kind::Logits => 1,
        }
    }
    fn entry_bytes(&self, rows: usize, dtype: FrozenDtype) -> u64 {
        (self.slabs() * rows * self.width * dtype.size()) as u64
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub dtype: FrozenDtype,
    pub model: ModelStamp,
    /// The backend that ran the frozen forward.
    pub backend: String,
    pub max_prompt: usize,
    pub max_response: usize,
    /// Micro-batch size of the capture forwards (the training batch it was made for).
    pub capture_batch: usize,
    pub files: Vec<FileStamp>,
    pub sections: Vec<Section>,
    /// Bytes of data after the header.
    pub data_bytes: u64,
}

/// Hash of one row of a batch as a section stores it.
fn token_hash(tb: &TokenBatch, row_mask: &[f64], b: usize) -> String {
    let s = tb.seq;
    let mut h = Fnv::new();
    for &id in &tb.input_ids[b * s..(b + 1) * s] {
        h.write(&id.to_le_bytes());
    }
    h.write_f32s(&tb.attention_mask[b * s..(b + 1) * s]);
    for &m in &row_mask[b * s..(b + 1) * s] {
        h.write(&[(m != 0.0) as u8]);
    }
    h.hex()
}

/// Positions of row `b` that the mask selects.
fn masked_positions(row_mask: &[f64], seq: usize, b: usize) -> Vec<usize> {
    (0..seq).filter(|&t| row_mask[b * seq + t] != 0.0).collect()
}

pub struct CaptureOptions {
    pub dtype: FrozenDtype,
    pub quiet: bool,
    /// Checked between forwards: when raised, the capture stops and the destination is left as
    /// it was.
    pub stop: Option<Arc<AtomicBool>>,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        Self {
            dtype: FrozenDtype::F32,
            quiet: false,
            stop: None,
        }
    }
}

pub struct CaptureSummary {
    pub header: Header,
    pub file_bytes: u64,
    pub forwards: usize,
}

/// Runs the frozen forward over every example the configured method reads frozen
/// representations of, and writes them to `out` atomically (a temporary file in the same
/// directory, synced, then renamed over `out`).
pub fn capture<B: Backend>(
    model: &Llama<B>,
    tokenizer: &ChatTokenizer,
    c: &TrainConfig,
    out: &Path,
    opts: &CaptureOptions,
) -> Result<CaptureSummary> {
    c.validate(&model.cfg)?;
    let data = Datasets::load(c)?;
    let enc = Encoder::new(
        tokenizer,
        Layout {
            max_prompt: c.max_prompt,
            max_response: c.max_response,
        },
    );
    let specs = required_sections(c, &model.cfg);
    let mut files = Vec::new();
    for s in &specs {
        for (role, p) in s.set.files(c) {
            if !files.iter().any(|f: &FileStamp| f.role == role) {
                files.push(file_stamp(role, p)?);
            }
        }
    }
    // Lay the file out first (row counts come from the tokens), then stream the data in order.
    let mut sections = Vec::new();
    let mut offset = 0u64;
    for spec in &specs {
        let width = match spec.kind {
            Kind::Reps => model.cfg.hidden_size,
            Kind::Logits => model.cfg.vocab_size,
        };
        let mut sec = Section {
            spec: spec.clone(),
            width,
            examples: Vec::new(),
        };
        for ex in spec.set.examples(&data) {
            let tb = enc.batch(std::slice::from_ref(ex))?;
            let m = tb.mask(spec.mask);
            let rows = masked_positions(&m, tb.seq, 0).len();
            sec.examples.push(Entry {
                offset,
                rows,
                tokens: token_hash(&tb, &m, 0),
            });
            offset += sec.entry_bytes(rows, opts.dtype);
        }
        sections.push(sec);
    }
    let header = Header {
        dtype: opts.dtype,
        model: model_stamp(model)?,
        backend: model.backend.name(),
        max_prompt: c.max_prompt,
        max_response: c.max_response,
        capture_batch: c.batch,
        files,
        sections,
        data_bytes: offset,
    };

    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = out
        .file_name()
        .with_context(|| format!("{}: not a file path", out.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write_capture(model, &enc, c, &data, &header, &tmp, opts);
    let forwards = match result {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.context(format!("{} left unchanged", out.display())));
        }
    };
    if let Err(e) = std::fs::rename(&tmp, out) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()));
    }
    let file_bytes = std::fs::metadata(out)
        .with_context(|| format!("reading {}", out.display()))?
        .len();
    Ok(CaptureSummary {
        header,
        file_bytes,
        forwards,
    })
}

fn header_bytes(header: &Header) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(header)?;
    let mut v = Vec::with_capacity(PREFIX + json.len() + ALIGN);
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(&(json.len() as u64).to_le_bytes());
    v.extend_from_slice(&json);
    v.resize(v.len().next_multiple_of(ALIGN), 0);
    Ok(v)
}

/// Writes header and data into `tmp`; returns the number of forwards run.
fn write_capture<B: Backend>(
    model: &Llama<B>,
    enc: &Encoder,
    c: &TrainConfig,
    data: &Datasets,
    header: &Header,
    tmp: &Path,
    opts: &CaptureOptions,
) -> Result<usize> {
    let be = &model.backend;
    let file = std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    let head = header_bytes(header)?;
    w.write_all(&head)
        .with_context(|| format!("writing {}", tmp.display()))?;
    let batch = c.batch;
    let total: usize = header
        .sections
        .iter()
        .map(|s| s.examples.len().div_ceil(batch))
        .sum();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} forward {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    if opts.quiet {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut written = 0u64;
    let mut forwards = 0;
    let mut bytes = Vec::new();
    for sec in &header.sections {
        let set = sec.spec.set.examples(data);
        let n = set.len();
        let what = match sec.spec.kind {
            Kind::Reps => format!("{} representations", sec.spec.set.as_str()),
            Kind::Logits => format!("{} logits", sec.spec.set.as_str()),
        };
        bar.set_message(what);
        for start in (0..n).step_by(batch) {
            if opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
                bar.abandon_with_message("interrupted");
                bail!("capture interrupted");
            }
            // A full micro-batch every time (wrapping around), so each forward has the row
            // count of a training step.
            let exs: Vec<Example> = (0..batch).map(|k| set[(start + k) % n].clone()).collect();
            let tb = enc.batch(&exs)?;
            let key_mask = be.upload_f32(&tb.attention_mask)?;
            let mode = match sec.spec.kind {
                Kind::Reps => LogitsMode::None,
                Kind::Logits => LogitsMode::All,
            };
            let (fwd, _) = model.forward_train(
                Input::Ids(&tb.input_ids),
                tb.batch,
                tb.seq,
                Some(&key_mask),
                &sec.spec.indices,
                mode,
                false,
            )?;
            forwards += 1;
            let slabs: Vec<Vec<f32>> = match sec.spec.kind {
                Kind::Reps => fwd
                    .hidden
                    .iter()
                    .map(|(_, h)| be.download(h))
                    .collect::<Result<_>>()?,
                Kind::Logits => {
                    vec![be.download(fwd.logits.as_ref().expect("logits were requested"))?]
                }
            };
            ensure!(
                slabs.len() == sec.slabs(),
                "capture: the forward returned {} hidden states for indices {:?}",
                slabs.len(),
                sec.spec.indices
            );
            let m = tb.mask(sec.spec.mask);
            let wd = sec.width;
            for b in 0..batch.min(n - start) {
                let entry = &sec.examples[start + b];
                let pos = masked_positions(&m, tb.seq, b);
                ensure!(
                    pos.len() == entry.rows && token_hash(&tb, &m, b) == entry.tokens,
                    "capture: example {} of the {} set encodes differently in a batch than alone",
                    start + b,
                    sec.spec.set.as_str()
                );
                ensure!(entry.offset == written, "capture: data out of order");
                bytes.clear();
                for slab in &slabs {
                    for &t in &pos {
                        let row = &slab[(b * tb.seq + t) * wd..(b * tb.seq + t + 1) * wd];
                        match header.dtype {
                            FrozenDtype::F32 => {
                                row.iter().for_each(|x| bytes.extend(x.to_le_bytes()))
                            }
                            FrozenDtype::Bf16 => row.iter().for_each(|&x| {
                                bytes.extend(half::bf16::from_f32(x).to_bits().to_le_bytes())
                            }),
                        }
                    }
                }
                w.write_all(&bytes)
                    .with_context(|| format!("writing {}", tmp.display()))?;
                written += bytes.len() as u64;
            }
            bar.inc(1);
        }
    }
    ensure!(
        written == header.data_bytes,
        "capture: wrote {written} bytes of data, the header says {}",
        header.data_bytes
    );
    let file = w
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    bar.finish();
    Ok(forwards)
}

/// A capture file opened for training: memory-mapped, its header checked against the model,
/// data and settings of the run.
pub struct FrozenReps {
    path: PathBuf,
    map: memmap2::Mmap,
    data_start: usize,
    pub header: Header,
    /// For each section the run reads: the required spec and the file's section index.
    used: Vec<(SectionSpec, usize)>,
}

/// Reads and checks the fixed prefix and the header: magic, version, JSON, data length, and
/// every entry inside the data. Errors name the file.
pub fn read_header(path: &Path) -> Result<(memmap2::Mmap, Header, usize)> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening frozen representations {}", path.display()))?;
    // SAFETY: the map is read-only; capture replaces files by rename, never in place, so a
    // file being mapped is not modified by this program.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("mapping {}", path.display()))?;
    let p = path.display();
    ensure!(
        map.len() >= 8 && map[..8] == MAGIC,
        "{p}: not a frozen-representation file (bad magic: expected {:?}); make one with `repshield capture`",
        String::from_utf8_lossy(&MAGIC)
    );
    ensure!(
        map.len() >= PREFIX,
        "{p}: truncated: {} bytes, shorter than the fixed header",
        map.len()
    );
    let version = u32::from_le_bytes(map[8..12].try_into().unwrap());
    ensure!(
        version == VERSION,
        "{p}: field version: the file has format version {version}, this build reads version {VERSION}; recapture with `repshield capture`"
    );
    let hlen = u64::from_le_bytes(map[12..20].try_into().unwrap()) as usize;
    ensure!(
        map.len() >= PREFIX.saturating_add(hlen),
        "{p}: truncated: the header is {hlen} bytes, the file only {} bytes",
        map.len()
    );
    let header: Header = serde_json::from_slice(&map[PREFIX..PREFIX + hlen])
        .with_context(|| format!("{p}: corrupt header"))?;
    let data_start = (PREFIX + hlen).next_multiple_of(ALIGN);
    let want = data_start as u64 + header.data_bytes;
    ensure!(
        map.len() as u64 == want,
        "{p}: {}: the header describes {want} bytes, the file has {}; recapture with `repshield capture`",
        if (map.len() as u64) < want {
            "truncated"
        } else {
            "trailing data"
        },
        map.len()
    );
    for s in &header.sections {
        for (i, e) in s.examples.iter().enumerate() {
            ensure!(
                e.offset.saturating_add(s.entry_bytes(e.rows, header.dtype)) <= header.data_bytes,
                "{p}: corrupt header: example {i} of section {} lies outside the data",
                s.spec.set.as_str()
            );
        }
    }
    Ok((map, header, data_start))
}

fn fmt_list(v: &[usize]) -> String {
    format!("{v:?}")
}

impl FrozenReps {
    /// Opens `path` for a run of `c` on `model`; checks that it was captured from the same
    /// model, data files, layout, masks and hidden-state indices.
    pub fn open<B: Backend>(path: &Path, model: &Llama<B>, c: &TrainConfig) -> Result<Self> {
        let (map, header, data_start) = read_header(path)?;
        let p = path.display();
        let redo = "recapture with `repshield capture` (same --config) or drop frozen_reps";
        let stamp = model_stamp(model)?;
        ensure!(
            header.model.config == stamp.config,
            "{p}: field model.config: captured from a different model\n  captured: {}\n  current:  {}\n{redo}",
            header.model.config,
            stamp.config
        );
        ensure!(
            header.model.weights == stamp.weights,
            "{p}: field model.weights: captured from different weights (hash {}, current {}); {redo}",
            header.model.weights,
            stamp.weights
        );
        ensure!(
            header.max_prompt == c.max_prompt,
            "{p}: field max_prompt: captured with {}, the run uses {}; {redo}",
            header.max_prompt,
            c.max_prompt
        );
        ensure!(
            header.max_response == c.max_response,
            "{p}: field max_response: captured with {}, the run uses {}; {redo}",
            header.max_response,
            c.max_response
        );
        let mut used = Vec::new();
        for spec in required_sections(c, &model.cfg) {
            let set = spec.set.as_str();
            for (role, file) in spec.set.files(c) {
                let now = file_stamp(role, file)?;
                let Some(was) = header.files.iter().find(|f| f.role == role) else {
                    bail!("{p}: field files.{role}: no {role} file was captured; {redo}");
                };
                ensure!(
                    was.hash == now.hash && was.bytes == now.bytes,
                    "{p}: field files.{role}: captured from {} ({} bytes, hash {}), but the run's {role} file {} has {} bytes, hash {}; {redo}",
                    was.path,
                    was.bytes,
                    was.hash,
                    now.path,
                    now.bytes,
                    now.hash
                );
            }
            let kind = match spec.kind {
                Kind::Reps => "representations",
                Kind::Logits => "logits",
            };
            let Some(si) = header
                .sections
                .iter()
                .position(|s| s.spec.set == spec.set && s.spec.kind == spec.kind)
            else {
                bail!(
                    "{p}: field sections: no frozen {kind} of the {set} set, which {:?} training reads; {redo}",
                    c.method
                );
            };
            let sec = &header.sections[si];
            ensure!(
                sec.spec.mask == spec.mask,
                "{p}: field sections.{set}.mask: captured with mask {:?}, the run uses {:?}; {redo}",
                sec.spec.mask,
                spec.mask
            );
            let missing: Vec<usize> = spec
                .indices
                .iter()
                .copied()
                .filter(|i| !sec.spec.indices.contains(i))
                .collect();
            ensure!(
                missing.is_empty(),
                "{p}: field sections.{set}.indices: captured hidden-state indices {}, the run needs {} (target_layers); {redo}",
                fmt_list(&sec.spec.indices),
                fmt_list(&spec.indices)
            );
            let width = match spec.kind {
                Kind::Reps => model.cfg.hidden_size,
                Kind::Logits => model.cfg.vocab_size,
            };
            ensure!(
                sec.width == width,
                "{p}: field sections.{set}.width: {} values per row, the model has {width}; {redo}",
                sec.width
            );
            used.push((spec, si));
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            data_start,
            header,
            used,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The frozen representations or logits of one micro-batch of `set` (`examples` = each
    /// row's index into the set), laid out as the frozen forward returns them; `None` when the
    /// run reads nothing frozen from this set.
    pub fn set(
        &self,
        set: SetName,
        tb: &TokenBatch,
        examples: &[usize],
    ) -> Result<Option<FrozenSet>> {
        let Some((spec, si)) = self.used.iter().find(|(s, _)| s.set == set) else {
            return Ok(None);
        };
        let sec = &self.header.sections[*si];
        let p = self.path.display();
        let name = set.as_str();
        ensure!(
            examples.len() == tb.batch,
            "frozen {name}: {} example indices for a batch of {}",
            examples.len(),
            tb.batch
        );
        let (seq, wd) = (tb.seq, sec.width);
        let m = tb.mask(sec.spec.mask);
        let slabs = sec.slabs();
        // Where each slab the run needs sits among the captured ones.
        let pick: Vec<usize> = match spec.kind {
            Kind::Reps => spec
                .indices
                .iter()
                .map(|i| sec.spec.indices.iter().position(|j| j == i).unwrap())
                .collect(),
            Kind::Logits => vec![0],
        };
        let slab_len = tb.batch * seq * wd;
        let mut out = vec![0f32; pick.len() * slab_len];
        let es = self.header.dtype.size();
        for (b, &i) in examples.iter().enumerate() {
            let Some(e) = sec.examples.get(i) else {
                bail!(
                    "{p}: example {i} of the {name} set is not in the file ({} captured); recapture",
                    sec.examples.len()
                );
            };
            let pos = masked_positions(&m, seq, b);
            ensure!(
                pos.len() == e.rows && token_hash(tb, &m, b) == e.tokens,
                "{p}: example {i} of the {name} set tokenises differently than when it was captured (tokenizer, chat template or data changed); recapture with `repshield capture`"
            );
            let base = self.data_start + e.offset as usize;
            for (k, &s) in pick.iter().enumerate() {
                debug_assert!(s < slabs);
                for (r, &t) in pos.iter().enumerate() {
                    let src = base + ((s * e.rows + r) * wd) * es;
                    let bytes = &self.map[src..src + wd * es];
                    let dst = &mut out[k * slab_len + (b * seq + t) * wd..][..wd];
                    match self.header.dtype {
                        FrozenDtype::F32 => {
                            for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                                *d = f32::from_le_bytes(c.try_into().unwrap());
                            }
                        }
                        FrozenDtype::Bf16 => {
                            for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                                *d = half::bf16::from_bits(u16::from_le_bytes(
                                    c.try_into().unwrap(),
                                ))
                                .to_f32();
                            }
                        }
                    }
                }
            }
        }
        Ok(Some(match spec.kind {
            Kind::Reps => FrozenSet {
                reps: out.into_iter().map(|x| x as f64).collect(),
                logits: None,
            },
            Kind::Logits => FrozenSet {
                reps: Vec::new(),
                logits: Some(out),
            },
        }))
    }

    /// Everything frozen one training step reads.
    pub fn inputs(
        &self,
        benign: (&TokenBatch, &[usize]),
        harmful: (&TokenBatch, &[usize]),
        retain: (&TokenBatch, &[usize]),
    ) -> Result<FrozenInputs> {
        Ok(FrozenInputs {
            benign: self.set(SetName::Benign, benign.0, benign.1)?,
            harmful: self.set(SetName::Harmful, harmful.0, harmful.1)?,
            retain: self.set(SetName::Retain, retain.0, retain.1)?,
        })
    }
}
