//! Hugging Face model directories: `config.json`, safetensors weights (one file or a sharded set
//! with `model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json` and the chat
//! template.
//!
//! The safetensors header is parsed here rather than by the `safetensors` crate so that every
//! error can name the file and the tensor at fault (the crate reports "incomplete metadata" or
//! "invalid offset" without saying which tensor ran past the end of a truncated file).

use super::config::ModelConfig;
use super::tokenizer::ChatTokenizer;
use super::weights::{HostTensor, ModelWeights, TensorSource};
use super::LoadedModel;
use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Header size limit, as in the safetensors format (100 MB): anything larger is a corrupt length.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Tensors at least this large are converted to f32 on all cores.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone)]
struct TensorEntry {
    /// Safetensors dtype name as written in the header ("F32", "BF16", "I8", ...).
    dtype: String,
    shape: Vec<usize>,
    /// Byte range inside the file (already offset past the header).
    start: usize,
    end: usize,
}

/// One memory-mapped `.safetensors` file with its parsed header.
struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    tensors: HashMap<String, TensorEntry>,
}

fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        _ => return None,
    })
}

impl SafetensorsFile {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("{}: cannot stat", path.display()))?
            .len();
        if len < 8 {
            bail!(
                "{}: truncated safetensors file ({len} bytes; even the 8-byte header length is missing)",
                path.display()
            );
        }
        // SAFETY: the map is read-only and private to this process; a file changed underneath us
        // while loading is outside what any loader can defend against.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot memory-map", path.display()))?;
        let header_len = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes"));
        if header_len > MAX_HEADER_BYTES {
            bail!(
                "{}: corrupt safetensors header: it claims {header_len} header bytes (not a safetensors file?)",
                path.display()
            );
        }
        let data_start = 8 + header_len as usize;
        if data_start > mmap.len() {
            bail!(
                "{}: truncated safetensors file: the header alone should be {header_len} bytes but the file has {} bytes",
                path.display(),
                mmap.len()
            );
        }
        let header: Value = std::str::from_utf8(&mmap[8..data_start])
            .map_err(|e| anyhow!("{e}"))
            .and_then(|s| serde_json::from_str(s).map_err(|e| anyhow!("{e}")))
            .map_err(|e| {
                anyhow!(
                    "{}: corrupt safetensors header (not valid JSON: {e})",
                    path.display()
                )
            })?;
        let obj = header.as_object().ok_or_else(|| {
            anyhow!(
                "{}: corrupt safetensors header: expected a JSON object",
                path.display()
            )
        })?;
        let data_len = mmap.len() - data_start;
        let mut tensors = HashMap::with_capacity(obj.len());
        for (name, v) in obj {
            if name == "__metadata__" {
                continue;
            }
            let bad = |what: &str| {
                anyhow!(
                    "{}: corrupt safetensors header: tensor {name:?} {what}",
                    path.display()
                )
            };
            let dtype = v
                .get("dtype")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("has no dtype"))?
                .to_string();
            let shape = v
                .get("shape")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("has no shape"))?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| bad("has a shape that is not a list of non-negative integers"))?;
            let offs = v
                .get("data_offsets")
                .and_then(Value::as_array)
                .filter(|a| a.len() == 2)
                .and_then(|a| Some((a[0].as_u64()? as usize, a[1].as_u64()? as usize)))
                .ok_or_else(|| bad("has no data_offsets [begin, end]"))?;
            let (begin, end) = offs;
            if end < begin {
                return Err(bad(&format!(
                    "has data_offsets [{begin}, {end}] that end before they begin"
                )));
            }
            if end > data_len {
                bail!(
                    "{}: truncated or corrupt safetensors file: tensor {name:?} occupies bytes [{begin}, {end}) of the \
                     data section, which holds only {data_len} bytes",
                    path.display()
                );
            }
            if let Some(size) = dtype_size(&dtype) {
                let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                match numel.and_then(|n| n.checked_mul(size)) {
                    Some(bytes) if bytes == end - begin => {}
                    _ => {
                        return Err(bad(&format!(
                            "has {} data bytes but dtype {dtype} and shape {shape:?} need {}",
                            end - begin,
                            numel
                                .and_then(|n| n.checked_mul(size))
                                .map_or("an overflowing number of".to_string(), |b| b.to_string())
                        )))
                    }
                }
            }
            tensors.insert(
                name.clone(),
                TensorEntry {
                    dtype,
                    shape,
                    start: data_start + begin,
                    end: data_start + end,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            tensors,
        })
    }

    fn load(&self, name: &str, e: &TensorEntry) -> Result<HostTensor> {
        let bytes = &self.mmap[e.start..e.end];
        let numel: usize = e.shape.iter().product();
        let data = match e.dtype.as_str() {
            "F32" => convert::<4>(bytes, numel, f32::from_le_bytes),
            "F16" => convert::<2>(bytes, numel, |b| half::f16::from_le_bytes(b).to_f32()),
            "BF16" => convert::<2>(bytes, numel, |b| half::bf16::from_le_bytes(b).to_f32()),
            "F64" => convert::<8>(bytes, numel, |b| f64::from_le_bytes(b) as f32),
            other => bail!(
                "{}: tensor {name:?} has unsupported dtype {other} (supported: F32, F16, BF16, F64; \
                 quantised safetensors checkpoints must be dequantised first)",
                self.path.display()
            ),
        };
        Ok(HostTensor::new(e.shape.clone(), data))
    }
}

/// Little-endian elements of `N` bytes to f32, on all cores for large tensors. The source may be
/// unaligned (safetensors headers have arbitrary length), so elements are read bytewise.
fn convert<const N: usize>(
    bytes: &[u8],
    numel: usize,
    f: impl Fn([u8; N]) -> f32 + Sync,
) -> Vec<f32> {
    debug_assert_eq!(bytes.len(), numel * N);
    let mut out = vec![0f32; numel];
    let one = |(o, b): (&mut f32, &[u8])| *o = f(b.try_into().expect("chunk of N bytes"));
    if numel >= PARALLEL_MIN_ELEMS {
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK)
            .zip(bytes.par_chunks(CHUNK * N))
            .for_each(|(o, b)| o.iter_mut().zip(b.chunks_exact(N)).for_each(one));
    } else {
        out.iter_mut().zip(bytes.chunks_exact(N)).for_each(one);
    }
    out
}

/// Tensors from one `.safetensors` file or a sharded set, memory-mapped, in Hugging Face naming.
pub struct SafetensorsSource {
    /// The single file, or the index of a sharded set: what errors name as the origin.
    origin: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name -> index into `files`.
    location: HashMap<String, usize>,
}

impl SafetensorsSource {
    /// One `.safetensors` file.
    pub fn open_file(path: &Path) -> Result<Self> {
        let file = SafetensorsFile::open(path)?;
        let location = file.tensors.keys().map(|k| (k.clone(), 0)).collect();
        Ok(Self {
            origin: path.to_path_buf(),
            files: vec![file],
            location,
        })
    }

    /// A sharded set described by `model.safetensors.index.json` (its `weight_map` maps each
    /// tensor name to a shard file next to the index).
    pub fn open_index(index_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index_path)
            .with_context(|| format!("{}: cannot read safetensors index", index_path.display()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            anyhow!(
                "{}: corrupt safetensors index (not valid JSON: {e})",
                index_path.display()
            )
        })?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                anyhow!(
                    "{}: safetensors index has no \"weight_map\" object",
                    index_path.display()
                )
            })?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut files: Vec<SafetensorsFile> = Vec::new();
        let mut file_idx: HashMap<String, usize> = HashMap::new();
        let mut location = HashMap::with_capacity(map.len());
        // Sorted so shards open in a stable order and the first error reported is reproducible.
        let mut entries: Vec<(&String, &Value)> = map.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        for (name, shard) in entries {
            let shard = shard.as_str().ok_or_else(|| {
                anyhow!(
                    "{}: weight_map entry for {name:?} is not a file name",
                    index_path.display()
                )
            })?;
            let idx = match file_idx.get(shard) {
                Some(&i) => i,
                None => {
                    let path = dir.join(shard);
                    if !path.is_file() {
                        bail!(
                            "{}: shard file {} is missing (the index lists tensor {name:?} in it)",
                            index_path.display(),
                            path.display()
                        );
                    }
                    files.push(SafetensorsFile::open(&path)?);
                    file_idx.insert(shard.to_string(), files.len() - 1);
                    files.len() - 1
                }
            };
            location.insert(name.clone(), idx);
        }
        Ok(Self {
            origin: index_path.to_path_buf(),
            files,
            location,
        })
    }

    /// The weights of a model directory: `model.safetensors.index.json` if present, else
    /// `model.safetensors`, else every `*.safetensors` file in it (a set without an index).
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            return Self::open_index(&index);
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::open_file(&single);
        }
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot list directory", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            bail!(
                "{}: no weights (expected model.safetensors or model.safetensors.index.json)",
                dir.display()
            );
        }
        let mut files = Vec::new();
        let mut location: HashMap<String, usize> = HashMap::new();
        for p in &paths {
            let f = SafetensorsFile::open(p)?;
            for k in f.tensors.keys() {
                if let Some(&prev) = location.get(k) {
                    bail!(
                        "tensor {k:?} appears in both {} and {} (and there is no index to choose)",
                        paths[prev].display(),
                        p.display()
                    );
                }
                location.insert(k.clone(), files.len());
            }
            files.push(f);
        }
        Ok(Self {
            origin: dir.to_path_buf(),
            files,
            location,
        })
    }

    /// Every tensor name the source offers, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.location.keys().cloned().collect();
        v.sort();
        v
    }

    /// Storage dtype and shape of a tensor, without loading it.
    pub fn info(&self, name: &str) -> Option<(&str, &[usize])> {
        let f = &self.files[*self.location.get(name)?];
        f.tensors
            .get(name)
            .map(|e| (e.dtype.as_str(), e.shape.as_slice()))
    }

    /// Distinct storage dtypes of the tensors, lowercase, joined by "/" (e.g. "bf16", "f32/bf16").
    pub fn file_dtype(&self) -> String {
        let set: BTreeSet<String> = self
            .location
            .keys()
            .filter_map(|n| self.info(n))
            .map(|(d, _)| d.to_ascii_lowercase())
            .collect();
        set.into_iter().collect::<Vec<_>>().join("/")
    }
}

impl TensorSource for SafetensorsSource {
    fn origin(&self) -> String {
        self.origin.display().to_string()
    }

    fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    fn load(&self, name: &str) -> Result<HostTensor> {
        let &idx = self
            .location
            .get(name)
            .ok_or_else(|| anyhow!("{}: missing tensor {name:?}", self.origin.display()))?;
        let file = &self.files[idx];
        let entry = file.tensors.get(name).ok_or_else(|| {
            anyhow!(
                "{}: tensor {name:?} is not in shard {} although the index places it there",
                self.origin.display(),
                file.path.display()
            )
        })?;
        file.load(name, entry)
    }
}

/// Special-token fields of `tokenizer_config.json` are a plain string or an AddedToken dict.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which "default" is the one
/// `apply_chat_template` uses when no name is given.
fn chat_template_from(v: &Value, path: &Path) -> Result<Option<String>> {
    match v.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let named = |want: &str| {
                list.iter().find_map(|t| {
                    (t.get("name").and_then(Value::as_str) == Some(want))
                        .then(|| {
                            t.get("template")
                                .and_then(Value::as_str)
                                .map(str::to_string)
                        })
                        .flatten()
                })
            };
            match named("default") {
                Some(t) => Ok(Some(t)),
                None if list.len() == 1 => Ok(list[0]
                    .get("template")
                    .and_then(Value::as_str)
                    .map(str::to_string)),
                None => bail!(
                    "{}: chat_template is a list of named templates without a \"default\" one",
                    path.display()
                ),
            }
        }
        Some(_) => bail!(
            "{}: chat_template must be a string or a list of {{name, template}}",
            path.display()
        ),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))
}

fn eos_ids(v: &Value) -> Vec<u32> {
    match v.get("eos_token_id") {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

/// Reads the tokenizer and chat template of a Hugging Face directory.
pub fn load_hf_tokenizer(dir: &Path) -> Result<ChatTokenizer> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        bail!(
            "{}: missing tokenizer (a Hugging Face model directory needs tokenizer.json; \
             slow-tokenizer files such as tokenizer.model are not supported)",
            tok_path.display()
        );
    }
    let inner = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow!("{}: cannot parse tokenizer: {e}", tok_path.display()))?;

    let cfg_path = dir.join("tokenizer_config.json");
    let (mut chat_template, bos, eos) = if cfg_path.is_file() {
        let v = read_json(&cfg_path)?;
        (
            chat_template_from(&v, &cfg_path)?,
            token_string(v.get("bos_token")),
            token_string(v.get("eos_token")),
        )
    } else {
        (None, None, None)
    };
    // Newer transformers saves the template beside the config instead of inside it; when both
    // exist transformers prefers the file, and so do we.
    let jinja = dir.join("chat_template.jinja");
    let json = dir.join("chat_template.json");
    if jinja.is_file() {
        chat_template = Some(
            std::fs::read_to_string(&jinja)
                .with_context(|| format!("reading {}", jinja.display()))?,
        );
    } else if json.is_file() {
        chat_template = chat_template_from(&read_json(&json)?, &json)?;
    }
    Ok(ChatTokenizer::new(inner, chat_template, bos, eos))
}

/// Loads a Hugging Face model directory: config.json, safetensors weights (f32/f16/bf16, single
/// or sharded), tokenizer.json, and tokenizer_config.json's chat template and special tokens.
///
/// End-of-sequence ids are the union of config.json's `eos_token_id`, generation_config.json's
/// (Llama 3 Instruct ends turns with `<|eot_id|>`, listed only there) and the tokenizer's
/// `eos_token`, in that order.
pub fn load_hf_dir(dir: &Path) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        bail!(
            "{}: missing model config (not a Hugging Face model directory?)",
            cfg_path.display()
        );
    }
    let mut config = ModelConfig::from_hf_json(&cfg_path)?;
    // The tokenizer is cheap to check; do it before mapping gigabytes of weights.
    let tokenizer = load_hf_tokenizer(dir)?;
    // Token ids past the embedding would index out of bounds in every kernel.
    let tok_vocab = tokenizer.vocab_size();
    if tok_vocab > config.vocab_size {
        bail!(
            "{}: the tokenizer has {tok_vocab} tokens but the model's embedding has only {} rows \
             (config.json vocab_size)",
            dir.join("tokenizer.json").display(),
            config.vocab_size
        );
    }

    let source = SafetensorsSource::open_dir(dir)?;
    let weights = ModelWeights::load(&config, &source)?;

    let gen_path = dir.join("generation_config.json");
    let gen = if gen_path.is_file() {
        Some(read_json(&gen_path)?)
    } else {
        None
    };
    let mut eos = config.eos_token_ids.clone();
    eos.extend(gen.as_ref().map(eos_ids).unwrap_or_default());
    eos.extend(
        tokenizer
            .eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t)),
    );
    let mut seen = BTreeSet::new();
    eos.retain(|id| seen.insert(*id));
    config.eos_token_ids = eos;
    if config.bos_token_id.is_none() {
        config.bos_token_id = gen
            .as_ref()
            .and_then(|g| g.get("bos_token_id"))
            .and_then(Value::as_u64)
            .map(|x| x as u32)
            .or_else(|| {
                tokenizer
                    .bos_token
                    .as_deref()
                    .and_then(|t| tokenizer.token_to_id(t))
            });
    }

    Ok(LoadedModel {
        config,
        weights,
        tokenizer,
        source: dir.to_path_buf(),
        file_dtype: source.file_dtype(),
    })
}
