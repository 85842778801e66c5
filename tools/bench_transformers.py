#!/usr/bin/env python3
"""The transformers side of `repshield bench generate`: the same prefill and decode work in
PyTorch + transformers on the CPU in float32 or, with `--device cuda`, on the GPU in bfloat16,
random weights at a given model shape.

Called by `repshield bench generate --compare-python PYTHON` with the shape as a Hugging Face
config dict (so both engines run exactly the same architecture); usable by hand too:

  python tools/bench_transformers.py --config-json '{"model_type": "llama", ...}' \
      --prompt-len 512 --decode-tokens 64 --repeats 5 --threads 2

Measures, for each attention implementation (eager and sdpa):
  prefill: model(input_ids) on `prompt-len` random tokens under inference_mode, logits for the
           last position only (logits_to_keep=1, what generation needs; `--logits all` computes
           every position); median of `repeats` after one warm-up;
  decode:  a manual greedy loop from the prefilled DynamicCache: model(next_id, past_key_values)
           then argmax, `decode-tokens` steps; median over `repeats` fresh prefills;
  generate: model.generate(max_new_tokens=decode-tokens, greedy) for reference; its decode rate
           is (tokens - 1) / (total time - median prefill time).
On the GPU every timing is bracketed by torch.cuda.synchronize(); the manual decode loop keeps
the next id on the device (it never waits for it on the host, so the CPU may queue a step
while the previous one runs, which repshield's loop cannot), and model.generate syncs as it
does by itself.
Prints one JSON object on stdout (everything else goes to stderr).
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def build_model(cfg_dict, attn, seed, device):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(cfg_dict)
    model_type = d.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **d)
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # On the GPU the weights are initialised in place (an 8B model never sits on the CPU).
    place = torch.device("cuda") if device == "cuda" else contextlib.nullcontext()
    with place:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    model.eval()
    # transformers initialises with N(0, 0.02): small but never all zeros. The norms start at 1.
    return model


def sync(device):
    """Waits for the queued GPU work (nothing to wait for on the CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def median_time(fn, repeats, device="cpu"):
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def bench_one(cfg_dict, attn, args):
    import torch

    dev = args.device
    model = build_model(cfg_dict, attn, args.seed, dev)
    vocab = cfg_dict["vocab_size"]
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, vocab, (1, args.prompt_len), generator=g).to(dev)
    keep = 0 if args.logits == "all" else 1
    res = {"attn_implementation": attn}

    with torch.inference_mode():
        # Prefill.
        model(ids, logits_to_keep=keep, use_cache=False)  # warm-up
        med, times = median_time(
            lambda: model(ids, logits_to_keep=keep, use_cache=False), args.repeats, dev
        )
        res["prefill_s"] = med
        res["prefill_s_all"] = times
        res["prefill_tok_s"] = args.prompt_len / med

        # Decode: manual greedy loop from a prefilled cache.
        def decode_once():
            out = model(ids, use_cache=True, logits_to_keep=1)
            pkv = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(args.decode_tokens):
                out = model(nxt, past_key_values=pkv, use_cache=True, logits_to_keep=1)
                pkv = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
            sync(dev)
            return time.perf_counter() - t0

        decode_once()  # warm-up
        dts = [decode_once() for _ in range(args.repeats)]
        res["decode_s"] = statistics.median(dts)
        res["decode_s_all"] = dts
        res["decode_tok_s"] = args.decode_tokens / res["decode_s"]

        # model.generate, for reference (includes its own prefill and per-step bookkeeping).
        if not args.no_generate:
            n = args.decode_tokens

            def gen():
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )

            gen()  # warm-up
            med_g, gts = median_time(gen, max(1, args.repeats // 2), dev)
            pre_last = _prefill_last(model, ids, args.repeats, dev)
            res["generate_s"] = med_g
            res["generate_s_all"] = gts
            res["generate_decode_tok_s"] = (n - 1) / max(med_g - pre_last, 1e-9)
    del model
    return res


def _prefill_last(model, ids, repeats, device):
    med, _ = median_time(
        lambda: model(ids, logits_to_keep=1, use_cache=True), repeats, device
    )
    return med


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config-json", required=True, help="HF config dict as JSON (or @file)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logits", choices=["last", "all"], default="last")
    ap.add_argument("--attn", default="eager,sdpa", help="comma-separated implementations")
    ap.add_argument("--no-generate", action="store_true", help="skip the model.generate run")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cpu: float32; cuda: bfloat16 on the first GPU")
    args = ap.parse_args()

    text = args.config_json
    if text.startswith("@"):
        with open(text[1:]) as f:
            text = f.read()
    cfg_dict = json.loads(text)

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no GPU")

    runs = []
    for attn in [a.strip() for a in args.attn.split(",") if a.strip()]:
        log(f"transformers: {attn} attention ...")
        runs.append(bench_one(cfg_dict, attn, args))
        if args.device == "cuda":
            torch.cuda.empty_cache()
    best_prefill = max(runs, key=lambda r: r["prefill_tok_s"])
    best_decode = max(runs, key=lambda r: r["decode_tok_s"])
    out = {
        "engine": "transformers",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": "bfloat16" if args.device == "cuda" else "float32",
        "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "logits": args.logits,
        "runs": runs,
        "prefill_tok_s": best_prefill["prefill_tok_s"],
        "prefill_attn": best_prefill["attn_implementation"],
        "decode_tok_s": best_decode["decode_tok_s"],
        "decode_attn": best_decode["attn_implementation"],
        "generate_decode_tok_s": best_decode.get("generate_decode_tok_s"),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
