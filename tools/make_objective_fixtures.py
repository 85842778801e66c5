#!/usr/bin/env python3
"""Reference values and LoRA gradients of the three safety objectives, from PyTorch + peft.

An oracle that shares no code with the Rust engine: transformers' LlamaForCausalLM (eager
attention) loaded from tests/fixtures/tiny-llama, wrapped by peft (LoRA r=4, alpha=8, dropout 0,
all seven projections, blocks 0 and 1), LoRA weights set to fixed seeded values with B != 0,
and the objectives written again here from ../shared/OBJECTIVES.md the way the authors' code
writes them (per-layer representations from output_hidden_states multiplied by the token mask,
torch F.normalize cosine, F.kl_div(reduction="batchmean") * T^2, ...). Frozen representations
come from the same model under `with model.disable_adapter()` and no grad.

Writes tests/fixtures/objectives/:

  batch.safetensors        the pre-tokenised batch (`repshield loss --batch` format)
  adapter/                 the LoRA adapter, written by peft's save_pretrained
  grads_{method}.safetensors  d total / d LoRA factor, `{layer}.{module}.A|B` (f32, PEFT layout)
  logits.safetensors       adapter-applied logits of the benign batch, [B, T, V] (f32)
  expected.json            every term, the total, settings and self-checks

Values are computed in float64 (the f32 weights and adapter upcast exactly), so the fixture is
the exact answer for these f32 parameters up to ~1e-15; the same computation in float32 is
recorded next to it (`f32_rel_err`) as the size of plain f32 rounding noise. Before it writes
anything the script also checks: the adapter reloads with `PeftModel.from_pretrained` and gives
the same logits; every hinge is away from its kink; a central finite difference along a random
direction in LoRA space matches autograd for every method.

Usage (no network; deterministic, byte-identical output on reruns):
  HF_HUB_OFFLINE=1 python tools/make_objective_fixtures.py [--out tests/fixtures/objectives]
  python tools/make_objective_fixtures.py --check-adapter DIR   # peft loads DIR (e.g. written by
                                                                # `repshield train`/save_peft) and
                                                                # must give logits.safetensors
See tests/fixtures/README.md ("objectives/").
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

transformers.logging.set_verbosity_error()

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO_ROOT / "tests" / "fixtures" / "tiny-llama"
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "objectives"

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, LORA_LAYERS = 4, 8, [0, 1]
LORA_SEED, BATCH_SEED, FD_SEED = 20240601, 777, 4242
B_STD = 0.05
PAD_ID = 2
VOCAB = 512
# (prompt length, response length) of each row; T = 12, the rest is right padding.
SEQ = 12
ROWS = {
    "benign": [(5, 7), (4, 5)],
    "harmful": [(6, 6), (3, 5)],
    "retain": [(4, 8), (5, 2)],
}
TARGETS = [1, 2]  # hidden-state indices of the harmful / unsafe / circuit-breaker terms
TRIPLET = dict(margin_benign=2.0, margin_harmful=3.0, w_benign=0.5, w_harmful=0.6, w_kl=0.7, temperature=2.0,
               benign_pos="l2", benign_neg="cos", harmful_pos="cos", harmful_neg="cos")
REPBEND = dict(alpha=0.5, beta=0.5, gamma=0.1, epsilon=0.3, temperature=2.0)
CB = dict(alpha=10.0, step=3, max_steps=10, retain_masked_mean=False)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def float64_everywhere():
    """Make transformers' Llama compute float64 models in float64 throughout.

    transformers runs three steps in float32 whatever the model dtype: RMSNorm (casts its input
    to float32), RoPE (inv_freq and the angles in float32) and eager attention's softmax
    (dtype=torch.float32). For a float64 model that caps the precision at ~1e-7, and a central
    difference with a small step then disagrees with autograd by ~1e-2. These replacements
    compute the same formulas in the input's dtype when it is float64 and call the originals
    otherwise, so the float32 model below is plain transformers.
    """
    from transformers.models.llama import modeling_llama as ml

    rms_orig = ml.LlamaRMSNorm.forward

    def rms(self, x):
        if x.dtype != torch.float64:
            return rms_orig(self, x)
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    rope_orig = ml.LlamaRotaryEmbedding.forward

    def rope(self, x, position_ids):
        if x.dtype != torch.float64:
            return rope_orig(self, x, position_ids)
        assert self.rope_type == "default" and self.attention_scaling == 1.0
        theta = self.config.rope_parameters["rope_theta"]
        dim = self.config.head_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids[..., None].to(torch.float64) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    attn_orig = ml.eager_attention_forward

    def attn(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        if query.dtype != torch.float64:
            return attn_orig(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        k = ml.repeat_kv(key, module.num_key_value_groups)
        v = ml.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = torch.softmax(w, dim=-1)
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    ml.LlamaRMSNorm.forward = rms
    ml.LlamaRotaryEmbedding.forward = rope
    ml.eager_attention_forward = attn


# ----------------------------------------------------------------------------- data


def make_batch():
    g = torch.Generator().manual_seed(BATCH_SEED)
    out = {}
    for name, rows in ROWS.items():
        ids = torch.full((len(rows), SEQ), PAD_ID, dtype=torch.int64)
        am = torch.zeros((len(rows), SEQ), dtype=torch.int64)
        rm = torch.zeros((len(rows), SEQ), dtype=torch.int64)
        last = torch.zeros(len(rows), dtype=torch.int64)
        for b, (p, r) in enumerate(rows):
            assert p + r <= SEQ
            # real tokens avoid the three special ids, so "pad" is unambiguous
            ids[b, : p + r] = torch.randint(3, VOCAB, (p + r,), generator=g)
            am[b, : p + r] = 1
            rm[b, p: p + r] = 1
            last[b] = p - 1
        out[f"{name}/input_ids"] = ids
        out[f"{name}/attention_mask"] = am
        out[f"{name}/response_mask"] = rm
        out[f"{name}/last_prompt_index"] = last
    return out


def batch_set(batch, name):
    return {k.split("/", 1)[1]: v for k, v in batch.items() if k.startswith(name + "/")}


# ----------------------------------------------------------------------------- model


def lora_values():
    """Fixed f32 LoRA factors: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's bound), B ~ N(0, B_STD^2)."""
    g = torch.Generator().manual_seed(LORA_SEED)
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    d, ff = cfg["hidden_size"], cfg["intermediate_size"]
    qd = cfg["num_attention_heads"] * cfg["head_dim"]
    kvd = cfg["num_key_value_heads"] * cfg["head_dim"]
    dims = {"q_proj": (d, qd), "k_proj": (d, kvd), "v_proj": (d, kvd), "o_proj": (qd, d),
            "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}
    vals = {}
    for layer in LORA_LAYERS:
        for m in MODULES:
            fin, fout = dims[m]
            a = (torch.rand((RANK, fin), generator=g, dtype=torch.float32) * 2 - 1) / fin ** 0.5
            b = torch.randn((fout, RANK), generator=g, dtype=torch.float32) * B_STD
            vals[(layer, m)] = (a, b)
    return vals


def module_of(name):
    """(layer, module, 'A'|'B') of a peft LoRA parameter name."""
    parts = name.split(".")
    layer = int(parts[parts.index("layers") + 1])
    m = next(p for p in parts if p in MODULES)
    ab = "A" if "lora_A" in parts else "B"
    return layer, m, ab


def lora_params(model):
    return {module_of(n): p for n, p in model.named_parameters() if "lora_" in n}


def build(dtype, vals):
    base = LlamaForCausalLM.from_pretrained(MODEL_DIR, dtype=dtype, attn_implementation="eager")
    base.eval()
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=MODULES, lora_dropout=0.0,
                     layers_to_transform=LORA_LAYERS, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    model.eval()  # dropout is 0 anyway
    params = lora_params(model)
    assert len(params) == 2 * len(vals), sorted(params)
    with torch.no_grad():
        for (layer, m, ab), p in params.items():
            v = vals[(layer, m)][0 if ab == "A" else 1]
            assert p.shape == v.shape, (layer, m, ab, p.shape, v.shape)
            p.copy_(v.to(dtype))
            assert p.dtype == dtype
    for n, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in n), n
    return model


def run(model, s, tuned):
    """(hidden states stacked [L+1, B, T, D], logits [B, T, V]) of one set."""
    ids, am = s["input_ids"], s["attention_mask"]
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    kw = dict(input_ids=ids, attention_mask=am, position_ids=pos, output_hidden_states=True, use_cache=False)
    if tuned:
        out = model(**kw)
    else:
        with torch.no_grad(), model.disable_adapter():
            out = model(**kw)
    return torch.stack(out.hidden_states), out.logits


# ----------------------------------------------------------------------------- objectives


def cos_sim(a, b):
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


DIST = {
    "l2": lambda a, b: torch.norm(a - b, dim=-1),
    "cos": lambda a, b: 1 - cos_sim(a, b),
}


def kl_retain(model, r, temperature):
    """KL_T(p_orig || p_lora) * T^2, batchmean over [B, T, V]; padded positions zeroed."""
    m = r["attention_mask"].unsqueeze(-1).to(model.dtype)
    _, zt = run(model, r, True)
    _, zo = run(model, r, False)
    zt, zo = zt * m, zo * m
    return F.kl_div(F.log_softmax(zt / temperature, -1), F.softmax(zo / temperature, -1),
                    reduction="batchmean") * temperature ** 2


def masked_mean(x, mask, n_idx):
    """sum over (index, batch, token) of x*mask / (n_idx * sum mask)."""
    return (x * mask).sum() / (n_idx * mask.sum())


def triplet(model, batch, hinges):
    c = TRIPLET
    bset, hset, rset = (batch_set(batch, n) for n in ("benign", "harmful", "retain"))
    dt = model.dtype
    bm = bset["response_mask"].to(dt)  # mask response_all
    hm = hset["response_mask"].to(dt)
    hb_t, _ = run(model, bset, True)
    hb_o, _ = run(model, bset, False)
    hh_t, _ = run(model, hset, True)
    hh_o, _ = run(model, hset, False)
    mb, mh = bm[None, :, :, None], hm[None, :, :, None]
    hb_t, hb_o, hh_t, hh_o = hb_t * mb, hb_o * mb, hh_t * mh, hh_o * mh
    # mu^l: mean of the tuned harmful representations over H's masked tokens, not detached
    mu = hh_t.sum(dim=(1, 2)) / hm.sum()  # [L+1, D]
    n_all = hb_t.shape[0]
    # benign term over every hidden-state index 0..L
    hb = F.relu(DIST[c["benign_pos"]](hb_t, hb_o) - DIST[c["benign_neg"]](hb_t, mu[:, None, None, :])
                + c["margin_benign"])
    benign = masked_mean(hb, bm[None], n_all)
    # harmful term over the target indices
    t = TARGETS
    hh = F.relu(DIST[c["harmful_pos"]](hh_t[t], mu[t][:, None, None, :]) - DIST[c["harmful_neg"]](hh_t[t], hh_o[t])
                + c["margin_harmful"])
    harmful = masked_mean(hh, hm[None], len(t))
    kl = kl_retain(model, rset, c["temperature"])
    hinges["triplet.benign"] = hb.detach()[bm[None].expand_as(hb) > 0]
    hinges["triplet.harmful"] = hh.detach()[hm[None].expand_as(hh) > 0]
    total = c["w_benign"] * benign + c["w_harmful"] * harmful + c["w_kl"] * kl
    return {"benign": benign, "harmful": harmful, "kl": kl}, total


def repbend(model, batch, hinges):
    c = REPBEND
    sset, uset, rset = (batch_set(batch, n) for n in ("benign", "harmful", "retain"))
    dt = model.dtype
    sm, um = sset["response_mask"].to(dt), uset["response_mask"].to(dt)
    hs_t, _ = run(model, sset, True)
    hs_o, _ = run(model, sset, False)
    hu_t_raw, _ = run(model, uset, True)
    hu_o, _ = run(model, uset, False)
    hs_t, hs_o = hs_t * sm[None, :, :, None], hs_o * sm[None, :, :, None]
    hu_t, hu_o = hu_t_raw * um[None, :, :, None], hu_o * um[None, :, :, None]
    safe = masked_mean(torch.norm(hs_t - hs_o, dim=-1), sm[None], hs_t.shape[0])
    t = TARGETS
    unsafe = masked_mean(torch.norm(hu_t[t] - hu_o[t], dim=-1), um[None], len(t))
    # mean over target indices and ordered pairs i != j of 1 - cos(h'_i, h'_j) at each row's last
    # prompt token (the tuned representation itself: that token is outside the response mask)
    last = uset["last_prompt_index"]
    nb = last.shape[0]
    v = hu_t_raw[t][:, torch.arange(nb), last]  # [n_t, B, D]
    vn = F.normalize(v, dim=-1)
    sim = vn @ vn.transpose(1, 2)  # [n_t, B, B]
    off = ~torch.eye(nb, dtype=torch.bool)
    ucos = (1 - sim[:, off]).mean()
    kl = kl_retain(model, rset, c["temperature"])
    total = c["alpha"] * safe - c["beta"] * unsafe + c["gamma"] * ucos + c["epsilon"] * kl
    return {"safe_dist": safe, "unsafe_dist": unsafe, "unsafe_cos": ucos, "kl": kl}, total


def circuit_breakers(model, batch, hinges):
    c = CB
    progress = c["step"] / (2 * c["max_steps"])
    c_retain, c_cb = c["alpha"] * progress, c["alpha"] * (1 - progress)
    rset, hset = batch_set(batch, "retain"), batch_set(batch, "harmful")
    dt = model.dtype
    rm, hm = rset["attention_mask"].to(dt), hset["attention_mask"].to(dt)  # all non-pad tokens
    hr_t, _ = run(model, rset, True)
    hr_o, _ = run(model, rset, False)
    hc_t, _ = run(model, hset, True)
    hc_o, _ = run(model, hset, False)
    # retain: over all indices and ALL (batch, token) positions, padding included as zeros
    mr = rm[None, :, :, None]
    retain = torch.norm(hr_t * mr - hr_o * mr, dim=-1).mean()
    # cb: relu(cos) over the target indices, / (n_targets * sum mask)
    t = TARGETS
    mc = hm[None, :, :, None]
    inner = (F.normalize(hc_t[t] * mc, dim=-1) * F.normalize(hc_o[t] * mc, dim=-1) * mc).sum(-1)
    cb = F.relu(inner).sum() / (len(t) * hm.sum())
    hinges["cb.cos"] = inner.detach()[hm[None].expand_as(inner) > 0]
    total = c_retain * retain + c_cb * cb
    as_t = lambda x: torch.tensor(x, dtype=dt)
    return {"retain": retain, "cb": cb, "c_retain": as_t(c_retain), "c_cb": as_t(c_cb)}, total


METHODS = {"triplet": triplet, "repbend": repbend, "circuit_breakers": circuit_breakers}


def evaluate(model, batch, method, hinges=None):
    """Terms (floats), total, and {(layer, module, A|B): grad} of one method."""
    params = lora_params(model)
    for p in params.values():
        p.grad = None
    terms, total = METHODS[method](model, batch, {} if hinges is None else hinges)
    total.backward()
    grads = {k: p.grad.detach().clone() for k, p in params.items()}
    return {k: float(v.detach()) for k, v in terms.items()}, float(total.detach()), grads


# ----------------------------------------------------------------------------- checks


def rel_err(x, ref):
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-300))


def fd_check(model, batch, method, grads):
    """Central difference of the total along a random direction in LoRA space vs autograd."""
    params = lora_params(model)
    g = torch.Generator().manual_seed(FD_SEED)
    dirs = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in params.items()}
    analytic = sum(float((dirs[k] * grads[k]).sum()) for k in params)
    h = 1e-6

    def total_at(s):
        with torch.no_grad():
            for k, p in params.items():
                p.add_(s * dirs[k])
        with torch.no_grad():
            _, tot = METHODS[method](model, batch, {})
            for k, p in params.items():
                p.sub_(s * dirs[k])
        return float(tot)

    numeric = (total_at(h) - total_at(-h)) / (2 * h)
    err = abs(numeric - analytic) / abs(analytic)
    log(f"  [{method}] directional derivative: autograd {analytic:.10g}, central difference "
        f"{numeric:.10g}, rel err {err:.2e}")
    assert err < 1e-6, f"{method}: autograd and finite difference disagree ({err})"
    return err


def check_adapter(adapter_dir, logits_ref, batch, tol=1e-5):
    """peft loads `adapter_dir` on the f32 tiny model; its benign logits must match `logits_ref`."""
    base = LlamaForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    n = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    assert n == 2 * len(LORA_LAYERS) * len(MODULES), f"{adapter_dir}: {n} LoRA tensors loaded"
    with torch.no_grad():
        _, logits = run(model, batch_set(batch, "benign"), True)
    err = rel_err(logits, logits_ref)
    log(f"  peft-loaded {adapter_dir}: max |logits - ref| / max|ref| = {err:.2e}")
    assert err < tol, f"{adapter_dir}: logits differ from the reference ({err})"
    return err


# ----------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--check-adapter", metavar="DIR",
                    help="only check that peft loads DIR and reproduces OUT/logits.safetensors")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)

    if args.check_adapter:
        batch = load_file(out / "batch.safetensors")
        ref = load_file(out / "logits.safetensors")["benign.logits"]
        check_adapter(args.check_adapter, ref, batch)
        return

    float64_everywhere()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    batch = make_batch()
    vals = lora_values()
    m64 = build(torch.float64, vals)
    m32 = build(torch.float32, vals)

    # The adapter, written by peft itself (f32, as the f32 model holds it).
    m32.save_pretrained(out / "adapter")
    (out / "adapter" / "README.md").unlink(missing_ok=True)  # model card boilerplate
    # Reproducible bytes: peft writes target_modules in set order (which changes with the
    # interpreter's hash seed) and the absolute path of the base model.
    acfg_path = out / "adapter" / "adapter_config.json"
    acfg = json.loads(acfg_path.read_text())
    acfg["target_modules"] = sorted(acfg["target_modules"])
    acfg["base_model_name_or_path"] = "tests/fixtures/tiny-llama"
    acfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(saved) == 2 * len(vals) and all(t.dtype == torch.float32 for t in saved.values())

    # Logits of the adapter-applied model on the benign batch (and how far the adapter moves them).
    with torch.no_grad():
        _, logits = run(m64, batch_set(batch, "benign"), True)
        _, frozen = run(m64, batch_set(batch, "benign"), False)
        hid_t, _ = run(m64, batch_set(batch, "benign"), True)
        hid_o, _ = run(m64, batch_set(batch, "benign"), False)
    logits32 = logits.float()
    save_file({"benign.logits": logits32.contiguous()}, out / "logits.safetensors",
              metadata={"generator": "tools/make_objective_fixtures.py"})
    adapter_shift = rel_err(frozen, logits)
    log(f"adapter moves the benign logits by {adapter_shift:.3f} (max abs, relative to max|logit|)")
    hidden_shift = [rel_err(hid_o[i], hid_t[i]) for i in range(hid_t.shape[0])]
    log(f"adapter moves hidden states 0..L by {[f'{x:.3f}' for x in hidden_shift]}")
    assert adapter_shift > 0.05 and min(hidden_shift[1:]) > 0.05, "adapter too weak to test anything"
    peft_load_err = check_adapter(out / "adapter", logits32, batch)

    save_file(batch, out / "batch.safetensors", metadata={"generator": "tools/make_objective_fixtures.py"})

    methods = {}
    for method in METHODS:
        hinges = {}
        terms, total, grads = evaluate(m64, batch, method, hinges)
        terms32, total32, grads32 = evaluate(m32, batch, method)
        fd = fd_check(m64, batch, method, grads)
        f32_err = {k: abs(terms32[k] - v) / max(abs(v), 1e-300) for k, v in terms.items()}
        f32_err["total"] = abs(total32 - total) / abs(total)
        f32_err["grads"] = max(rel_err(grads32[k], g) for k, g in grads.items())
        kinks = {k: float(v.abs().min()) for k, v in hinges.items()}
        for k, v in kinks.items():
            assert v > 1e-3, f"{k}: an argument of relu is {v}, too close to the kink"
        tensors = {f"{layer}.{m}.{ab}": g.float().contiguous() for (layer, m, ab), g in sorted(grads.items())}
        save_file(tensors, out / f"grads_{method}.safetensors",
                  metadata={"generator": f"tools/make_objective_fixtures.py ({method})"})
        gnorm = float(torch.sqrt(sum((g ** 2).sum() for g in grads.values())))
        methods[method] = {
            "terms": terms,
            "total": total,
            "grads_file": f"grads_{method}.safetensors",
            "grad_norm": gnorm,
            "f32_rel_err": f32_err,
            "fd_directional_rel_err": fd,
            "min_abs_relu_argument": kinks,
        }
        log(f"[{method}] " + ", ".join(f"{k} {v:.8g}" for k, v in terms.items())
            + f", total {total:.8g}, |grad| {gnorm:.6g}; f32 vs f64: terms "
            + f"{max(v for k, v in f32_err.items() if k != 'grads'):.1e}, grads {f32_err['grads']:.1e}")

    import importlib.metadata as md
    expected = {
        "generator": "tools/make_objective_fixtures.py",
        "versions": {p: md.version(p) for p in ("torch", "transformers", "peft", "safetensors")},
        "model": "tests/fixtures/tiny-llama",
        "compute_dtype": "float64 (f32 weights and adapter upcast exactly); eager attention",
        "lora": {"r": RANK, "lora_alpha": ALPHA, "layers": LORA_LAYERS, "modules": MODULES,
                 "lora_dropout": 0.0, "seed": LORA_SEED,
                 "init": f"A ~ U(-1/sqrt(in), 1/sqrt(in)), B ~ N(0, {B_STD}^2), f32"},
        "batch": {"file": "batch.safetensors", "seq": SEQ, "rows_prompt_response": ROWS, "pad_id": PAD_ID,
                  "seed": BATCH_SEED, "layout": "right-padded, positions 0..T-1"},
        "targets": TARGETS,
        "settings": {
            "triplet": {**TRIPLET, "mask": "response_all", "sets": "benign term: benign; harmful term and mu: "
                        "harmful; KL: retain"},
            "repbend": {**REPBEND, "mask": "response_all", "sets": "safe: benign; unsafe: harmful; KL: retain"},
            "circuit_breakers": {**CB, "mask": "all (attention_mask)",
                                 "sets": "retain term: retain; cb term: harmful"},
        },
        "methods": methods,
        "logits": {"file": "logits.safetensors", "tensor": "benign.logits", "shape": list(logits.shape),
                   "adapter_shift_rel": adapter_shift, "peft_reload_rel_err": peft_load_err},
        "hidden_shift_rel": hidden_shift,
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    total_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"wrote {out} ({total_bytes / 1024:.1f} KiB)")
    assert total_bytes < 300 * 1024, "objective fixtures exceed 300 KB"


if __name__ == "__main__":
    main()
