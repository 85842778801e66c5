#!/usr/bin/env python3
"""PyTorch + transformers reference of `repshield attack --attack embedding` (src/attack/).

The same embedding-space attack, written the way a PyTorch user would write it, so that
repshield's attack can be checked against it (steps to success, losses) and timed against it
(optimisation steps per second). See docs/ATTACK.md for the recorded comparison.

What is reproduced, exactly as src/attack/embedding.rs does it:
  layout   the chat template is rendered (apply_chat_template, add_generation_prompt=True) with
           the user message = behaviour + a placeholder; the text is split at the placeholder;
           prefix = encode(text before, add_special_tokens=False), suffix = encode(text after),
           soft tokens = encode(" " + init) cycled/truncated to n_soft, target = encode(target).
           Sequence: prefix | soft | suffix | target.
  loss     mean cross-entropy of the target tokens under teacher forcing (row prompt_len-1+i
           predicts target[i]); computed here with F.cross_entropy in float32.
  update   e <- e - step * sign(dL/de) on the soft-token embeddings only (sign(0) = 0), no ball.
  loop     for step in 0..=steps: forward, loss; stop if every target token is the argmax
           (early stop) or step == steps; else backward + update. So `steps` is the number of
           updates made and `final_loss` the loss of the last forward.
  response greedy generation of --gen-tokens tokens after the attacked prompt (KV cache fed
           with the attacked embeddings), stopping at EOS / <|im_end|> / <|endoftext|> ...,
           decoded with skip_special_tokens=True.

Timing: `opt_seconds` covers the optimisation steps only (forward + loss + backward + update
per update made; the last, update-less forward is left out), `steps_per_s` = steps /
opt_seconds. Model loading, layout and generation are timed separately.

Usage (float32 on the CPU, 2 threads by default):
  HF_HUB_OFFLINE=1 /root/pyref/bin/python tools/attack_reference.py \
      --behaviors data/advbench.jsonl --limit 5 --steps 100 --step-size 0.001,0.01 \
      --n-soft 20 --gen-tokens 32 --out /tmp/ref.jsonl
  # side-by-side table against repshield's JSONL (one file per step size, or one with both):
  python tools/attack_reference.py --compare /tmp/ref.jsonl --rust /tmp/rs.jsonl
  # how fragile sign(grad) is: first gradient in float32 sdpa / float32 eager / float64
  python tools/attack_reference.py --sign-check --limit 5
  # the attack under another float order (controls for a divergence)
  python tools/attack_reference.py ... --attn eager --dtype float64
"""

import argparse
import json
import os
import sys
import time

PLACEHOLDER = "\x01REPSHIELD_SOFT_TOKENS\x01"  # src/attack/embedding.rs PLACEHOLDER
DEFAULT_INIT = "! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! !"
STOP_STRINGS = ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>"]  # commands.rs stop_tokens


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Behaviours (a port of src/attack/commands.rs read_behaviors / default_target / user_text)
# --------------------------------------------------------------------------------------------


def default_target(behavior):
    b = behavior.strip().rstrip(".")
    first, _, rest = b.partition(" ")
    if first.lower() in {"write", "create", "generate", "give", "provide", "develop",
                         "design", "describe", "list", "explain"}:
        r = rest
        if r.startswith("me "):
            r = r[3:]
        p = "detailed instructions for "
        while r.startswith(p):
            r = r[len(p):]
        return "Sure, here is " + r
    return "Sure, here is how to " + (b[:1].lower() + b[1:])


def read_behaviors(path, limit):
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            v = json.loads(line)

            def s(k):
                x = v.get(k)
                return x if isinstance(x, str) and x.strip() else None

            behavior = s("behavior") or s("goal") or s("prompt")
            if behavior is None:
                raise SystemExit(f"{path}:{i + 1}: needs \"behavior\", \"goal\" or \"prompt\"")
            ctx = s("context")
            out.append({
                "id": s("id") or f"row{i + 1}",
                "behavior": behavior,
                "target": s("target") or default_target(behavior),
                "user": f"{ctx}\n\n---\n\n{behavior}" if ctx else behavior,
            })
            if limit is not None and len(out) >= limit:
                break
    return out


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def resolve_gguf(spec):
    if spec and os.path.isfile(spec):
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    d = os.path.expanduser("~/.cache/repshield/models/smollm2")
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not os.path.isfile(os.path.join(d, f)):
        raise SystemExit(f"{d}/{f} not found: run `repshield fetch smollm2` or pass --gguf")
    return d, f


def load(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    d, f = resolve_gguf(args.gguf)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=f, dtype=torch.float32, attn_implementation=args.attn
    )
    if args.dtype == "float64":
        model = model.double()
    model.eval()
    model.requires_grad_(False)  # only the soft tokens are variables
    log(f"loaded {d}/{f} in {time.perf_counter() - t0:.1f}s "
        f"(attn {args.attn}, tied embeddings {model.config.tie_word_embeddings})")
    stop = []
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos = eos if eos is not None else model.config.eos_token_id
    for e in (eos if isinstance(eos, list) else [eos]):
        if e is not None and e not in stop:
            stop.append(int(e))
    vocab = tok.get_vocab()
    for s in STOP_STRINGS:
        if s in vocab and vocab[s] not in stop:
            stop.append(vocab[s])
    return tok, model, stop


def layout(tok, user, target, n_soft, init):
    """src/attack/embedding.rs AttackLayout::new."""
    text = tok.apply_chat_template(
        [{"role": "user", "content": user + PLACEHOLDER}],
        tokenize=False, add_generation_prompt=True,
    )
    if PLACEHOLDER not in text:
        raise SystemExit("chat template dropped the user message")
    pre, post = text.split(PLACEHOLDER, 1)
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    ini = enc(" " + init)
    if not ini:
        raise SystemExit(f"the soft-token init string {init!r} tokenises to nothing")
    soft = [ini[i % len(ini)] for i in range(n_soft)]
    tgt = enc(target)
    if not tgt:
        raise SystemExit("empty attack target")
    return {"prefix": enc(pre), "soft": soft, "suffix": enc(post), "target": tgt}


# --------------------------------------------------------------------------------------------
# The attack
# --------------------------------------------------------------------------------------------


def attack(model, lay, steps, step_size, gen_tokens, stop, trace_grad=0):
    import torch
    import torch.nn.functional as F

    emb = model.get_input_embeddings()
    ids = lay["prefix"] + lay["soft"] + lay["suffix"] + lay["target"]
    p0, n = len(lay["prefix"]), len(lay["soft"])
    prompt_len = p0 + n + len(lay["suffix"])
    with torch.no_grad():
        e_all = emb(torch.tensor([ids]))
    pre = e_all[:, :p0]
    post = e_all[:, p0 + n:]
    soft = e_all[:, p0:p0 + n].clone().requires_grad_(True)
    tgt = torch.tensor(lay["target"])
    rows = torch.arange(prompt_len - 1, prompt_len - 1 + len(lay["target"]))

    losses, step_times, step_cpu, sign_stats = [], [], [], []
    success, done_steps = False, 0
    t_loop = time.perf_counter()
    for step in range(steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        x = torch.cat([pre, soft, post], dim=1)
        logits = model(inputs_embeds=x, use_cache=False).logits[0]
        z = logits[rows]
        loss = F.cross_entropy(z, tgt)
        ok = bool((z.argmax(-1) == tgt).all())
        losses.append(loss.item())
        success, done_steps = ok, step
        if ok or step == steps:
            break
        (g,) = torch.autograd.grad(loss, soft)
        with torch.no_grad():
            soft -= step_size * torch.sign(g)
        step_times.append(time.perf_counter() - t0)
        step_cpu.append(time.process_time() - c0)
        if step < trace_grad:
            a = g.abs().flatten()
            sign_stats.append({
                "zero": int((g == 0).sum()),
                "tiny_rel_1e-5": int((a < 1e-5 * a.max()).sum()),
                "max_abs": float(a.max()),
            })
    loop_s = time.perf_counter() - t_loop

    # Greedy generation from the attacked prompt (prefix | soft | suffix).
    t0 = time.perf_counter()
    gen = []
    with torch.no_grad():
        x = torch.cat([pre, soft, post], dim=1)[:, :prompt_len]
        out = model(inputs_embeds=x, use_cache=True)
        past = out.past_key_values
        for _ in range(gen_tokens):
            nxt = int(out.logits[0, -1].argmax())
            if nxt in stop:
                break
            gen.append(nxt)
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
    gen_s = time.perf_counter() - t0
    opt_s = sum(step_times)
    return {
        "steps": done_steps,
        "final_loss": losses[-1],
        "first_loss": losses[0],
        "teacher_forced_success": success,
        "losses": losses,
        "gen_ids": gen,
        "opt_seconds": opt_s,
        "step_seconds": step_times,
        # CPU time (all threads) of the same steps; on a busy machine OpenMP's spinning
        # threads inflate it, so compare timings only when the machine is otherwise idle
        "opt_cpu_seconds": sum(step_cpu),
        "steps_per_s": (len(step_times) / opt_s) if step_times else None,
        "loop_seconds": loop_s,
        "gen_seconds": gen_s,
        "grad_sign_stats": sign_stats,
    }


def fmt_step(x):
    return f"{x:g}"


def run(args):
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    behaviors = read_behaviors(args.behaviors, args.limit)
    tok, model, stop = load(args)
    sizes = [float(s) for s in args.step_size.split(",") if s.strip()]
    out = open(args.out, "w", encoding="utf-8") if args.out else None
    tot_steps, tot_s, tot_cpu = 0, 0.0, 0.0
    for b in behaviors:
        lay = layout(tok, b["user"], b["target"], args.n_soft, args.init)
        if args.print_ids:
            log(json.dumps({"id": b["id"], **lay}))
        for s in sizes:
            r = attack(model, lay, args.steps, s, args.gen_tokens, stop, args.trace_grad)
            response = tok.decode(r.pop("gen_ids"), skip_special_tokens=True)
            rec = {
                "id": b["id"], "behavior": b["behavior"], "attack": "embedding",
                "config": f"pgd step {fmt_step(s)} x{args.steps} n_soft {args.n_soft} None",
                "step_size": s, "target": b["target"], "response": response,
                "layout_lens": {k: len(v) for k, v in lay.items()},
                **r,
            }
            tot_steps += r["steps"]  # = updates made
            tot_s += r["opt_seconds"]
            tot_cpu += r["opt_cpu_seconds"]
            log(f"{b['id']} step {fmt_step(s)}: steps {r['steps']} success "
                f"{r['teacher_forced_success']} loss {r['first_loss']:.4f} -> "
                f"{r['final_loss']:.4f}  {r['steps_per_s'] or 0:.2f} steps/s")
            if out:
                out.write(json.dumps(rec) + "\n")
                out.flush()
    if out:
        out.close()
    summary = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "attn": args.attn,
        "dtype": args.dtype,
        "total_steps": tot_steps, "opt_seconds": tot_s,
        "steps_per_s": tot_steps / tot_s if tot_s else None,
        "opt_cpu_seconds": tot_cpu,
    }
    print(json.dumps(summary))


def first_grad(model, lay):
    import torch
    import torch.nn.functional as F

    ids = lay["prefix"] + lay["soft"] + lay["suffix"] + lay["target"]
    p0, n = len(lay["prefix"]), len(lay["soft"])
    prompt_len = p0 + n + len(lay["suffix"])
    with torch.no_grad():
        e = model.get_input_embeddings()(torch.tensor([ids]))
    soft = e[:, p0:p0 + n].clone().requires_grad_(True)
    x = torch.cat([e[:, :p0], soft, e[:, p0 + n:]], dim=1)
    z = model(inputs_embeds=x, use_cache=False).logits[0]
    rows = torch.arange(prompt_len - 1, prompt_len - 1 + len(lay["target"]))
    loss = F.cross_entropy(z[rows], torch.tensor(lay["target"]))
    (g,) = torch.autograd.grad(loss, soft)
    return loss.item(), g.double().flatten()


def sign_check(args):
    """How fragile sign(grad) is: the first gradient under three float evaluation orders."""
    import torch

    torch.set_num_threads(args.threads)
    behaviors = read_behaviors(args.behaviors, args.limit)
    variants = {}
    for name, attn, dt in [("f32-sdpa", "sdpa", "float32"), ("f32-eager", "eager", "float32"),
                           ("f64-eager", "eager", "float64")]:
        a = argparse.Namespace(**{**vars(args), "attn": attn, "dtype": dt})
        tok, model, _ = load(a)
        variants[name] = [first_grad(model, layout(tok, b["user"], b["target"], args.n_soft,
                                                    args.init)) for b in behaviors]
        del model
    ref = variants["f64-eager"]
    for name in ["f32-sdpa", "f32-eager"]:
        for b, (l32, g32), (l64, g64) in zip(behaviors, variants[name], ref):
            diff = int((torch.sign(g32) != torch.sign(g64)).sum())
            print(json.dumps({
                "id": b["id"], "variant": name, "loss": l32, "loss_f64": l64,
                "sign_differs_from_f64": diff, "of": g64.numel(),
                "grad_rel_err": float((g32 - g64).norm() / g64.norm()),
            }))
    for b, (_, ga), (_, gb) in zip(behaviors, variants["f32-sdpa"], variants["f32-eager"]):
        print(json.dumps({"id": b["id"], "sdpa_vs_eager_sign_differs":
                          int((torch.sign(ga) != torch.sign(gb)).sum()), "of": ga.numel()}))


# --------------------------------------------------------------------------------------------
# Side-by-side table
# --------------------------------------------------------------------------------------------


def read_jsonl(paths):
    rows = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def step_of(rec):
    if "step_size" in rec:
        return float(rec["step_size"])
    # repshield: "pgd step 0.001 x100 n_soft 20 None"
    return float(rec["config"].split()[2])


def compare(args):
    py = read_jsonl(args.compare)
    rs = {(r["id"], step_of(r)): r for r in read_jsonl(args.rust)}
    # the first loss does not depend on the step size
    rs0 = {r["id"]: r for r in read_jsonl(args.rust_first)} if args.rust_first else {}
    print("| behaviour | step | first loss (rs / py) | steps (rs / py) | final loss (rs / py) "
          "| TF success (rs / py) | same response |")
    print("|---|---|---|---|---|---|---|")
    for p in py:
        k = (p["id"], step_of(p))
        r = rs.get(k)
        r0 = rs0.get(p["id"])
        first_r = f"{r0['final_loss']:.4f}" if r0 else "-"
        if r is None:
            print(f"| {p['id']} | {k[1]:g} | {first_r} / {p['first_loss']:.4f} | - / "
                  f"{p['steps']} | - / {p['final_loss']:.4f} | - / {p['teacher_forced_success']} | - |")
            continue
        yn = lambda x: "yes" if x else "no"  # noqa: E731
        print(f"| {p['id']} | {k[1]:g} | {first_r} / {p['first_loss']:.4f} | {r['steps']} / "
              f"{p['steps']} | {r['final_loss']:.4f} / {p['final_loss']:.4f} | "
              f"{yn(r['teacher_forced_success'])} / {yn(p['teacher_forced_success'])} | "
              f"{yn(r['response'] == p['response'])} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="GGUF file (default: the smollm2 file in repshield's cache)")
    ap.add_argument("--behaviors", default="data/advbench.jsonl")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--step-size", default="0.001", help="comma-separated, one run per value")
    ap.add_argument("--n-soft", type=int, default=20)
    ap.add_argument("--init", default=DEFAULT_INIT)
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="float64: a control for how much float rounding alone moves the attack")
    ap.add_argument("--sign-check", action="store_true",
                    help="instead of attacking: how many signs of the first gradient differ "
                         "between float32 sdpa, float32 eager and float64 eager")
    ap.add_argument("--out", help="JSONL, one record per behaviour and step size")
    ap.add_argument("--print-ids", action="store_true", help="log each layout's token ids")
    ap.add_argument("--trace-grad", type=int, default=0,
                    help="record zero/tiny gradient counts for the first N steps")
    ap.add_argument("--compare", nargs="+", help="this script's JSONL: print a table instead")
    ap.add_argument("--rust", nargs="+", help="with --compare: repshield attack JSONL(s)")
    ap.add_argument("--rust-first", nargs="+",
                    help="with --compare: repshield JSONL(s) run with --steps 0 (first loss)")
    args = ap.parse_args()
    if args.sign_check:
        sign_check(args)
    elif args.compare:
        if not args.rust:
            raise SystemExit("--compare needs --rust")
        compare(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
