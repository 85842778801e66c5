#!/usr/bin/env python3
"""The PyTorch side of `repshield bench train-step`: one optimiser step of the CRL triplet
objective in PyTorch + transformers + peft (eager, no torch.compile), on the CPU in float32 or
with `--device cuda` on the GPU in bfloat16, random weights at a given model shape, doing the
same work as repshield's step:

  benign, harmful and retain sets of `batch` random sequences of `prompt-len + response-len`
  tokens (no padding); LoRA of rank `rank` (alpha = rank) on all seven projections of the
  `lora-layers` blocks; tuned forward (adapter on) and frozen forward (adapter off, no_grad) of
  each set; the benign term over every hidden-state index, the harmful term over `targets`,
  KL retain at T = 2 (x T^2); backward; torch.optim.AdamW (lr 1e-4, no weight decay).

Called by `repshield bench train-step --compare-python PYTHON` with the shape as a Hugging Face
config dict; usable by hand:

  python tools/bench_train_step.py --config-json '{"model_type": "llama", ...}' \
      --batch 4 --prompt-len 128 --response-len 128 --rank 16 --targets 18,19 \
      --lora-layers 0,1 --repeats 3 --threads 2

Times one warm-up step and `repeats` steps for each attention implementation and reports the
median of the faster one, with the peak memory (`torch.cuda.max_memory_allocated` on a GPU,
the process's peak RSS on the CPU). Prints one JSON object on stdout (everything else goes to
stderr).
"""

import argparse
import json
import statistics
import sys
import time


def log(*a):
    print(*a, file=sys.stderr, flush=True)


MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(cfg_dict, attn, args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(cfg_dict)
    model_type = d.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **d)
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    base.to(args.device)
    lcfg = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=MODULES, lora_dropout=0.0,
                      layers_to_transform=args.lora_layers, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, lcfg)
    model.eval()  # no dropout anywhere; gradients still flow to the LoRA factors
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)  # as repshield's bench: a non-zero B
    return model


def triplet_step(model, sets, targets, opt):
    import torch
    import torch.nn.functional as F

    def run(s, tuned):
        kw = dict(input_ids=s["ids"], attention_mask=s["am"], output_hidden_states=True,
                  use_cache=False)
        if tuned:
            out = model(**kw)
        else:
            with torch.no_grad(), model.disable_adapter():
                out = model(**kw)
        return torch.stack(out.hidden_states), out.logits

    def cos_sim(a, b):
        return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)

    bset, hset, rset = sets
    bm, hm = bset["rm"], hset["rm"]
    hb_t, _ = run(bset, True)
    hb_o, _ = run(bset, False)
    hh_t, _ = run(hset, True)
    hh_o, _ = run(hset, False)
    mb, mh = bm[None, :, :, None], hm[None, :, :, None]
    hb_t, hb_o, hh_t, hh_o = hb_t * mb, hb_o * mb, hh_t * mh, hh_o * mh
    mu = hh_t.sum(dim=(1, 2)) / hm.sum()
    n_all = hb_t.shape[0]
    hb = F.relu(torch.norm(hb_t - hb_o, dim=-1) - (1 - cos_sim(hb_t, mu[:, None, None, :])) + 2.0)
    benign = (hb * bm[None]).sum() / (n_all * bm.sum())
    t = targets
    hh = F.relu((1 - cos_sim(hh_t[t], mu[t][:, None, None, :])) - (1 - cos_sim(hh_t[t], hh_o[t])) + 3.0)
    harmful = (hh * hm[None]).sum() / (len(t) * hm.sum())
    _, zt = run(rset, True)
    _, zo = run(rset, False)
    T = 2.0
    kl = F.kl_div(F.log_softmax(zt / T, -1), F.softmax(zo / T, -1), reduction="batchmean") * T * T
    total = 0.5 * benign + 0.6 * harmful + 0.7 * kl
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return float(total)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-json", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--response-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", required=True)
    ap.add_argument("--lora-layers", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", default="eager,sdpa")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    args.targets = [int(x) for x in args.targets.split(",")]
    args.lora_layers = [int(x) for x in args.lora_layers.split(",")]

    import peft
    import torch
    import transformers

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = json.loads(args.config_json)
    g = torch.Generator().manual_seed(args.seed)
    seq = args.prompt_len + args.response_len
    sets = []
    for _ in range(3):
        ids = torch.randint(0, cfg["vocab_size"], (args.batch, seq), generator=g)
        rm = torch.zeros(args.batch, seq)
        rm[:, args.prompt_len:] = 1.0
        sets.append({"ids": ids.to(args.device),
                     "am": torch.ones(args.batch, seq, dtype=torch.long, device=args.device),
                     "rm": rm.to(args.device)})
    cuda = args.device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    results = {}
    peaks = {}
    for attn in args.attn.split(","):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = build(cfg, attn, args)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        times = []
        for step in range(args.repeats + 1):
            sync()
            t0 = time.perf_counter()
            loss = triplet_step(model, sets, args.targets, opt)
            sync()
            s = time.perf_counter() - t0
            log(f"{attn} step {step}{' (warm-up)' if step == 0 else ''}: {s:.2f}s, loss {loss:.4f}")
            if step > 0:
                times.append(s)
        results[attn] = statistics.median(times)
        if cuda:
            peaks[attn] = torch.cuda.max_memory_allocated()
        else:
            import resource
            peaks[attn] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        del model, opt
    best = min(results, key=results.get)
    print(json.dumps({
        "step_s": results[best],
        "attn": best,
        "per_attn": results,
        "peak_bytes": peaks[best],
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }))


if __name__ == "__main__":
    main()
