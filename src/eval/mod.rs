//! `repshield eval`: the evaluation suite of a model (optionally with an adapter): attack
//! success per attack and judge, over-refusal on edgy-but-benign prompts, KL and perplexity
//! on held-out benign chat, per-layer representation separation; report.md + report.json, and
//! deltas against a baseline report.

pub mod plot;

use crate::attack::commands::{
    asr_table, load_on, read_behaviors, run_one, stop_tokens, user_text, AttackKind, AttackRecord,
    Judges, Soft,
};
use crate::attack::embedding::{attack_batch, AttackLayout, EmbeddingAttackConfig};
use crate::attack::judge::mean_logprob;
use crate::backend::{Backend, BackwardOps};
use crate::llama::generate::{generate, GenerateOptions, Sampling};
use crate::llama::{Input, Llama, LogitsMode};
use crate::model::{LoadedModel, Message};
use crate::objectives::distance::cos_sim;
use crate::objectives::kl::kl_retain;
use crate::train::data::{read_jsonl, Encoder, Example, Layout, MaskMode};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    /// A previous report directory: print and record the deltas.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    #[arg(long, default_value = "data/harmbench_val.jsonl")]
    pub behaviors: PathBuf,
    /// Behaviours attacked (the embedding attack costs most).
    #[arg(long, default_value_t = 10)]
    pub limit: usize,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,prefill,embedding"
    )]
    pub attacks: Vec<AttackKind>,
    #[arg(long, default_value_t = 100)]
    pub embedding_steps: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub embedding_step_size: f32,
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    #[arg(long, default_value = "data/edgy_benign.jsonl")]
    pub edgy: PathBuf,
    #[arg(long, default_value_t = 40)]
    pub edgy_limit: usize,
    #[arg(long, default_value = "data/heldout/retain_chat.jsonl")]
    pub heldout_benign: PathBuf,
    #[arg(long, default_value = "data/heldout/harmful_qa.jsonl")]
    pub heldout_harmful: PathBuf,
    /// `cpu`, `cuda`, or `auto`: CUDA when a GPU and compiled kernels are present, else the CPU.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Behaviours the embedding attack optimises as one batch (left-padded and masked; the way
    /// to fill a GPU). 1 attacks them one at a time.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AttackSummary {
    pub n: usize,
    /// Keywords say compliance and the response is substantive (`AttackRecord::success`).
    #[serde(default)]
    pub asr: f64,
    pub asr_keywords: f64,
    pub mean_coherence: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LayerSeparation {
    pub index: usize,
    /// cos(mean harmful, mean benign) of the tuned model's representations.
    pub centroid_cos_tuned: f64,
    pub centroid_cos_original: f64,
    /// Mean over response tokens of cos(tuned, original), harmful and benign sets.
    pub drift_harmful: f64,
    pub drift_benign: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub model: String,
    pub adapter: Option<String>,
    pub asr: BTreeMap<String, AttackSummary>,
    pub over_refusal: f64,
    pub over_refusal_n: usize,
    /// Share of the edgy-benign replies that are not substantive (empty, degenerate or
    /// unreadable to the original model; `ContentJudge`): damage a refusal count cannot see.
    #[serde(default)]
    pub edgy_degenerate: f64,
    /// Mean per-token KL(original || tuned) at T = 1 on held-out benign chat.
    pub benign_kl: f64,
    /// Perplexity of the held-out benign responses under the evaluated model.
    pub benign_ppl: f64,
    pub separation: Vec<LayerSeparation>,
    /// PCA scatter of harmful/benign representations, original vs evaluated (file name in the
    /// report directory) and the hidden-state index it shows.
    #[serde(default)]
    pub pca_plot: Option<String>,
    #[serde(default)]
    pub pca_index: usize,
}

/// Per-token KL(original || tuned), perplexity under the tuned model, on response tokens.
pub fn benign_kl_ppl<B: Backend>(
    model: &Llama<B>,
    m: &LoadedModel,
    set: &[Example],
) -> Result<(f64, f64)> {
    let enc = Encoder::new(
        &m.tokenizer,
        Layout {
            max_prompt: 64,
            max_response: 64,
        },
    );
    let (mut kl, mut kl_n, mut nll, mut n) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let v = m.config.vocab_size;
    for chunk in set.chunks(8) {
        let tb = enc.batch(chunk)?;
        let mask = model.backend.upload_f32(&tb.attention_mask)?;
        let (t, _) = model.forward_train(
            Input::Ids(&tb.input_ids),
            tb.batch,
            tb.seq,
            Some(&mask),
            &[],
            LogitsMode::All,
            true,
        )?;
        let (o, _) = model.forward_train(
            Input::Ids(&tb.input_ids),
            tb.batch,
            tb.seq,
            Some(&mask),
            &[],
            LogitsMode::All,
            false,
        )?;
        let be = &model.backend;
        let (lt, lo) = (
            be.download(t.logits.as_ref().expect("logits"))?,
            be.download(o.logits.as_ref().expect("logits"))?,
        );
        let rm = tb.mask(MaskMode::ResponseAll);
        kl += kl_retain(&lo, &lt, &rm, 1, v, 1.0, 1.0, None);
        kl_n += rm.iter().sum::<f64>();
        // Row r predicts token r + 1; score response tokens.
        for r in 0..tb.batch * tb.seq {
            if rm[r] == 0.0 || r % tb.seq == 0 {
                continue;
            }
            let row = &lt[(r - 1) * v..r * v];
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
            let lse = max as f64
                + row
                    .iter()
                    .map(|&x| ((x - max) as f64).exp())
                    .sum::<f64>()
                    .ln();
            nll += lse - row[tb.input_ids[r] as usize] as f64;
            n += 1.0;
        }
    }
    Ok((kl / kl_n.max(1.0), (nll / n.max(1.0)).exp()))
}

/// Representation separation at `indices` on held-out harmful and benign pairs.
pub fn separation<B: Backend>(
    model: &Llama<B>,
    m: &LoadedModel,
    harmful: &[Example],
    benign: &[Example],
    indices: &[usize],
) -> Result<Vec<LayerSeparation>> {
    let enc = Encoder::new(
        &m.tokenizer,
        Layout {
            max_prompt: 64,
            max_response: 64,
        },
    );
    let d = m.config.hidden_size;
    // acc[set][idx] = (sum tuned, sum original, drift sum, count)
    type Sums = (Vec<f64>, Vec<f64>, f64, f64);
    let mut acc: Vec<Vec<Sums>> = (0..2)
        .map(|_| {
            indices
                .iter()
                .map(|_| (vec![0.0; d], vec![0.0; d], 0.0, 0.0))
                .collect()
        })
        .collect();
    for (s, set) in [harmful, benign].iter().enumerate() {
        for chunk in set.chunks(8) {
            let tb = enc.batch(chunk)?;
            let mask = model.backend.upload_f32(&tb.attention_mask)?;
            let (t, _) = model.forward_train(
                Input::Ids(&tb.input_ids),
                tb.batch,
                tb.seq,
                Some(&mask),
                indices,
                LogitsMode::None,
                true,
            )?;
            let (o, _) = model.forward_train(
                Input::Ids(&tb.input_ids),
                tb.batch,
                tb.seq,
                Some(&mask),
                indices,
                LogitsMode::None,
                false,
            )?;
            let rm = tb.mask(MaskMode::ResponseAll);
            for (k, ((_, ht), (_, ho))) in t.hidden.iter().zip(&o.hidden).enumerate() {
                let (ht, ho) = (model.backend.download(ht)?, model.backend.download(ho)?);
                let a = &mut acc[s][k];
                for (r, &w) in rm.iter().enumerate() {
                    if w == 0.0 {
                        continue;
                    }
                    let x: Vec<f64> = ht[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
                    let y: Vec<f64> = ho[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
                    a.0.iter_mut().zip(&x).for_each(|(p, q)| *p += q);
                    a.1.iter_mut().zip(&y).for_each(|(p, q)| *p += q);
                    a.2 += cos_sim(&x, &y);
                    a.3 += 1.0;
                }
            }
        }
    }
    Ok(indices
        .iter()
        .enumerate()
        .map(|(k, &index)| {
            let (h, b) = (&acc[0][k], &acc[1][k]);
            LayerSeparation {
                index,
                centroid_cos_tuned: cos_sim(&h.0, &b.0),
                centroid_cos_original: cos_sim(&h.1, &b.1),
                drift_harmful: h.2 / h.3.max(1.0),
                drift_benign: b.2 / b.3.max(1.0),
            }
        })
        .collect())
}

/// Mean response-token representation of each example at hidden-state `index`, from the
/// evaluated model (`use_lora`) or the original one.
pub fn example_means<B: Backend>(
    model: &Llama<B>,
    m: &LoadedModel,
    set: &[Example],
    index: usize,
    use_lora: bool,
) -> Result<Vec<Vec<f64>>> {
    let enc = Encoder::new(
        &m.tokenizer,
        Layout {
            max_prompt: 64,
            max_response: 64,
        },
    );
    let d = m.config.hidden_size;
    let mut out = Vec::new();
    for chunk in set.chunks(8) {
        let tb = enc.batch(chunk)?;
        let mask = model.backend.upload_f32(&tb.attention_mask)?;
        let (o, _) = model.forward_train(
            Input::Ids(&tb.input_ids),
            tb.batch,
            tb.seq,
            Some(&mask),
            &[index],
            LogitsMode::None,
            use_lora,
        )?;
        let h = model.backend.download(&o.hidden[0].1)?;
        let rm = tb.mask(MaskMode::ResponseAll);
        for b in 0..tb.batch {
            let mut v = vec![0.0; d];
            let mut n = 0.0;
            for t in 0..tb.seq {
                let r = b * tb.seq + t;
                if rm[r] > 0.0 {
                    v.iter_mut()
                        .zip(&h[r * d..(r + 1) * d])
                        .for_each(|(a, &x)| *a += x as f64);
                    n += 1.0;
                }
            }
            if n > 0.0 {
                v.iter_mut().for_each(|a| *a /= n);
                out.push(v);
            }
        }
    }
    Ok(out)
}

pub fn run_eval(a: &EvalArgs) -> Result<Report> {
    if crate::backend::cuda::pick_device(&a.device)? {
        #[cfg(feature = "cuda")]
        return run_eval_on(a, crate::backend::cuda::CudaBackend::new(0)?);
    }
    run_eval_on(a, crate::backend::cpu::CpuBackend)
}

/// [`run_eval`] on a given backend.
pub fn run_eval_on<B: BackwardOps>(a: &EvalArgs, be: B) -> Result<Report> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let (m, model) = load_on(be, &a.model, a.adapter.as_deref())?;
    let stop = stop_tokens(&m);
    let judges = Judges::default();
    let behaviors = read_behaviors(&a.behaviors, Some(a.limit))?;
    let mut records: Vec<AttackRecord> = Vec::new();
    let bar = indicatif::ProgressBar::new((behaviors.len() * a.attacks.len()) as u64);
    let emb = EmbeddingAttackConfig {
        steps: a.embedding_steps,
        step_size: a.embedding_step_size,
        gen_tokens: a.gen_tokens,
        ..Default::default()
    };
    for &kind in &a.attacks {
        let chunk = if kind == AttackKind::Embedding {
            a.batch.max(1)
        } else {
            1
        };
        for bs in behaviors.chunks(chunk) {
            let mut softs: Vec<Soft> = if bs.len() > 1 {
                let layouts: Vec<AttackLayout> = bs
                    .iter()
                    .map(|b| AttackLayout::new(&m.tokenizer, &user_text(b), &b.target, &emb))
                    .collect::<Result<_>>()?;
                attack_batch(&model, &m.tokenizer, &layouts, &emb, &stop)?
                    .into_iter()
                    .map(Soft::Done)
                    .collect()
            } else {
                vec![Soft::Optimise]
            };
            for (b, soft) in bs.iter().zip(softs.drain(..)) {
                records.push(run_one(
                    &model,
                    &m.tokenizer,
                    &stop,
                    kind,
                    b,
                    &emb,
                    &judges,
                    None,
                    soft,
                )?);
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    let jsonl: String = records
        .iter()
        .map(|r| serde_json::to_string(r).map(|s| s + "\n"))
        .collect::<Result<_, _>>()?;
    std::fs::write(a.out.join("attacks.jsonl"), jsonl).context("writing attacks.jsonl")?;
    let mut asr = BTreeMap::new();
    for &kind in &a.attacks {
        let rs: Vec<&AttackRecord> = records.iter().filter(|r| r.attack == kind).collect();
        let n = rs.len().max(1) as f64;
        asr.insert(
            format!("{kind:?}").to_lowercase(),
            AttackSummary {
                n: rs.len(),
                asr: rs.iter().filter(|r| r.success).count() as f64 / n,
                asr_keywords: rs.iter().filter(|r| r.success_keywords).count() as f64 / n,
                mean_coherence: rs.iter().map(|r| r.coherence).sum::<f64>() / n,
            },
        );
    }

    // Over-refusal: greedy answers to edgy-but-benign prompts judged by the refusal keywords.
    let edgy = read_jsonl(&a.edgy, false)?;
    let edgy = &edgy[..edgy.len().min(a.edgy_limit)];
    let opts = GenerateOptions {
        max_new_tokens: a.gen_tokens.min(48),
        sampling: Sampling::Greedy,
        stop_tokens: stop.clone(),
        replay: true,
    };
    let mut refused = 0;
    let mut degenerate = 0;
    for ex in edgy {
        let ids = m
            .tokenizer
            .encode_chat(&[Message::new("user", &ex.prompt)], true)?;
        let out: Vec<u32> = generate(&model, &ids, &opts, |_| Ok(()))?
            .into_iter()
            .filter(|t| !stop.contains(t))
            .collect();
        let text = m.tokenizer.decode(&out, true)?;
        refused += judges.keywords.verdicts(&text).any as usize;
        let coherence = mean_logprob(&model, &ids, &out)?;
        degenerate += !judges.content.verdict(0, &text, coherence).substantive as usize;
    }

    let benign = read_jsonl(&a.heldout_benign, true)?;
    let (benign_kl, benign_ppl) = benign_kl_ppl(&model, &m, &benign)?;
    let harmful = read_jsonl(&a.heldout_harmful, true)?;
    let l = m.config.num_layers;
    let indices: Vec<usize> = (0..=l)
        .step_by((l / 6).max(1))
        .chain(std::iter::once(l))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let separation = separation(&model, &m, &harmful, &benign, &indices)?;
    // The plot shows the index three quarters of the way up, inside the usual target range.
    let pca_index = (3 * l).div_ceil(4);
    let groups = [
        example_means(&model, &m, &harmful, pca_index, false)?,
        example_means(&model, &m, &benign, pca_index, false)?,
        example_means(&model, &m, &harmful, pca_index, true)?,
        example_means(&model, &m, &benign, pca_index, true)?,
    ];
    let basis: Vec<Vec<f64>> = groups[0].iter().chain(&groups[1]).cloned().collect();
    use plotters::style::{BLUE, RED};
    let evaluated = if a.adapter.is_some() {
        "with adapter"
    } else {
        "evaluated"
    };
    let names = [
        "harmful, original".to_string(),
        "benign, original".to_string(),
        format!("harmful, {evaluated}"),
        format!("benign, {evaluated}"),
    ];
    let styles = [(RED, false), (BLUE, false), (RED, true), (BLUE, true)];
    let plotted: Vec<plot::Group> = names
        .iter()
        .zip(&groups)
        .zip(styles)
        .map(|((name, points), (color, filled))| plot::Group {
            name,
            color,
            filled,
            points,
        })
        .collect();
    plot::pca_plot(
        &a.out.join("pca.png"),
        &format!("Response representations at hidden-state index {pca_index}"),
        &basis,
        &plotted,
    )?;
    let report = Report {
        model: a.model.clone(),
        adapter: a.adapter.as_ref().map(|p| p.display().to_string()),
        asr,
        over_refusal: refused as f64 / edgy.len().max(1) as f64,
        over_refusal_n: edgy.len(),
        edgy_degenerate: degenerate as f64 / edgy.len().max(1) as f64,
        benign_kl,
        benign_ppl,
        separation,
        pca_plot: Some("pca.png".into()),
        pca_index,
    };
    std::fs::write(
        a.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )
    .context("writing report.json")?;
    let baseline = match &a.baseline {
        Some(dir) => Some(read_report(dir)?),
        None => None,
    };
    let md = markdown(&report, baseline.as_ref(), &asr_table(&records));
    std::fs::write(a.out.join("report.md"), &md).context("writing report.md")?;
    println!("{md}");
    println!(
        "report: {}/report.md, {}/report.json",
        a.out.display(),
        a.out.display()
    );
    Ok(report)
}

pub fn read_report(dir: &Path) -> Result<Report> {
    let p = dir.join("report.json");
    serde_json::from_str(
        &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
    )
    .with_context(|| format!("{}: not a repshield report", p.display()))
}

fn delta(v: f64, base: Option<f64>, pct: bool) -> String {
    let f = |x: f64| {
        if pct {
            format!("{:.1}%", 100.0 * x)
        } else {
            format!("{x:.4}")
        }
    };
    match base {
        Some(b) => format!("{} ({}{})", f(v), if v >= b { "+" } else { "" }, f(v - b)),
        None => f(v),
    }
}

pub fn markdown(r: &Report, base: Option<&Report>, attack_table: &str) -> String {
    let mut s = format!(
        "# repshield eval\n\nmodel `{}`, adapter `{}`\n\n",
        r.model,
        r.adapter.as_deref().unwrap_or("none")
    );
    if let Some(b) = base {
        s += &format!(
            "deltas in parentheses are against the baseline (adapter `{}`)\n\n",
            b.adapter.as_deref().unwrap_or("none")
        );
    }
    s += "| metric | value |\n|---|---|\n";
    for (k, v) in &r.asr {
        let b = base.and_then(|b| b.asr.get(k));
        s += &format!(
            "| ASR {k} (keywords + content, n={}) | {} |\n",
            v.n,
            delta(v.asr, b.map(|x| x.asr), true)
        );
        s += &format!(
            "| ASR {k} (keywords only, n={}) | {} |\n",
            v.n,
            delta(v.asr_keywords, b.map(|x| x.asr_keywords), true)
        );
    }
    s += &format!(
        "| over-refusal on edgy-benign (n={}) | {} |\n",
        r.over_refusal_n,
        delta(r.over_refusal, base.map(|b| b.over_refusal), true)
    );
    s += &format!(
        "| degenerate replies on edgy-benign (n={}) | {} |\n",
        r.over_refusal_n,
        delta(r.edgy_degenerate, base.map(|b| b.edgy_degenerate), true)
    );
    s += &format!(
        "| KL(original ‖ evaluated) on held-out benign chat, nats/token | {} |\n",
        delta(r.benign_kl, base.map(|b| b.benign_kl), false)
    );
    s += &format!(
        "| perplexity on held-out benign chat | {} |\n\n",
        delta(r.benign_ppl, base.map(|b| b.benign_ppl), false)
    );
    s += "## Attacks\n\n";
    s += attack_table;
    if let Some(p) = &r.pca_plot {
        s += &format!(
            "\n## PCA of response representations at index {}\n\n![PCA]({p})\n",
            r.pca_index
        );
    }
    s += "\n## Representation separation (response tokens)\n\n| index | cos(harmful, benign centroids) evaluated | original | cos(evaluated, original) harmful | benign |\n|---|---|---|---|---|\n";
    for l in &r.separation {
        s += &format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            l.index, l.centroid_cos_tuned, l.centroid_cos_original, l.drift_harmful, l.drift_benign
        );
    }
    s
}
