"""The ops of `repshield bench kernels`, in PyTorch, at the same shapes: cuBLAS GEMMs
(F.linear, torch.matmul), SDPA attention (flash on a GPU), fused AdamW, autograd backward of
the KL. Prints one JSON object {op name: median milliseconds} on the last line of stdout.

On a GPU: bf16 storage, CUDA events around each run, a 256 MiB buffer overwritten before each
run (no operand left in L2). On the CPU: f32, wall clock. The op names and shapes are those of
src/bench_kernels.rs; `--ops` lists which to run (separated by ';').
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-json", required=True)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--ops", default="")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = json.loads(args.config_json)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dt = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)

    d, ff, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // nh
    qd, kvd = nh * hd, nkv * hd
    t, ctx = args.tokens, args.ctx
    theta = cfg.get("rope_theta", 10000.0)
    L = cfg["num_hidden_layers"]

    def rnd(*shape, scale=1.0, dtype=dt):
        return torch.randn(*shape, device=dev, dtype=torch.float32).mul_(scale).to(dtype)

    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev) if cuda else None

    def timed(fn, reps):
        fn()
        out = []
        for _ in range(reps):
            if cuda:
                flush.zero_()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                out.append(a.elapsed_time(b))
            else:
                s = time.perf_counter()
                fn()
                out.append((time.perf_counter() - s) * 1e3)
        return statistics.median(out)

    def gemm_case(m, n, k):
        x, w = rnd(m, k), rnd(n, k, scale=0.02)
        return lambda: F.linear(x, w)

    def rope_case():
        q = rnd(1, t, nh, hd)
        inv = 1.0 / (theta ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd))
        ang = torch.arange(t, device=dev, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat([ang, ang], dim=-1)
        cos, sin = emb.cos().to(dt)[None, :, None, :], emb.sin().to(dt)[None, :, None, :]

        def run():
            x1, x2 = q[..., : hd // 2], q[..., hd // 2 :]
            return q * cos + torch.cat([-x2, x1], dim=-1) * sin

        return run

    def rmsnorm_bwd_case():
        x, dy, w = rnd(t, d), rnd(t, d), rnd(d, dtype=torch.float32)

        def run():
            xf = x.float()
            r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
            g = dy.float() * w
            return ((g - xf * r * r * (g * xf).mean(-1, keepdim=True)) * r).to(dt)

        return run

    def swiglu_bwd_case():
        g, u, dout = rnd(t, ff), rnd(t, ff), rnd(t, ff)

        def run():
            s = torch.sigmoid(g)
            return dout * u * s * (1 + g * (1 - s)), dout * g * s

        return run

    def attn_case(q_len, kv_len, causal):
        q = rnd(1, nh, q_len, hd)
        k, vv = rnd(1, nkv, kv_len, hd), rnd(1, nkv, kv_len, hd)
        return lambda: F.scaled_dot_product_attention(q, k, vv, is_causal=causal, enable_gqa=True)

    def attn_bwd_case():
        q = rnd(1, nh, t, hd).requires_grad_()
        k, vv = rnd(1, nkv, t, hd).requires_grad_(), rnd(1, nkv, t, hd).requires_grad_()
        o = F.scaled_dot_product_attention(q, k, vv, is_causal=True, enable_gqa=True)
        dout = torch.randn_like(o)
        return lambda: torch.autograd.grad(o, (q, k, vv), dout, retain_graph=True)

    def kl_case():
        rows = min(t, 1024)
        zo = torch.randn(rows, v, device=dev) * 2.0
        zt = (torch.randn(rows, v, device=dev) * 2.0).requires_grad_()
        T = 2.0

        def run():
            loss = F.kl_div(F.log_softmax(zt / T, -1), F.log_softmax(zo / T, -1), log_target=True,
                            reduction="batchmean") * T * T
            return torch.autograd.grad(loss, zt)

        return run

    def target_ce_case():
        rows = min(t, 1024)
        nt = max(1, min(rows // 4, 32))
        z = (torch.randn(rows, v, device=dev) * 2.0).requires_grad_()
        idx = torch.arange(rows - nt, rows, device=dev)
        tok = idx * 7919 % v

        def run():
            return torch.autograd.grad(F.cross_entropy(z[idx], tok), z)

        return run

    def adamw_case():
        n = 16 * L * (7 * d + 2 * qd + 2 * kvd + 3 * ff)
        p = torch.nn.Parameter(torch.randn(n, device=dev) * 0.02)
        p.grad = torch.randn(n, device=dev) * 1e-3
        opt = torch.optim.AdamW([p], lr=1e-4, fused=cuda)
        return opt.step

    def add_rmsnorm_case():
        # repshield keeps the residual stream (and the projection outputs added to it) in f32
        # and writes the normed row in the working dtype: the same work here.
        f32 = torch.float32
        res, delta, w = rnd(t, d, dtype=f32), rnd(t, d, dtype=f32), rnd(d, dtype=f32)

        def run():
            res.add_(delta)
            return F.rms_norm(res, (d,), w, 1e-5).to(dt)

        return run

    sq = min(max(4 * d, 64), 4096)
    table = {
        "embedding": lambda: (lambda tb, ids: lambda: F.embedding(ids, tb))(
            rnd(v, d), torch.arange(t, device=dev) * 7919 % v),
        "rmsnorm": lambda: (lambda x, w: lambda: F.rms_norm(x, (d,), w, 1e-5))(rnd(t, d), rnd(d)),
        "add_rmsnorm": add_rmsnorm_case,
        "matmul qkv": lambda: gemm_case(t, qd + 2 * kvd, d),
        "matmul o": lambda: gemm_case(t, d, qd),
        "matmul gate+up": lambda: gemm_case(t, 2 * ff, d),
        "matmul down": lambda: gemm_case(t, d, ff),
        "matvec down (decode)": lambda: gemm_case(1, d, ff),
        # One GEMV over the concatenated q/k/v weights: what repshield's one launch does.
        "matvec qkv (decode)": lambda: gemm_case(1, qd + 2 * kvd, d),
        "matmul square": lambda: gemm_case(sq, sq, sq),
        "gemm dX = dY W (down)": lambda: (lambda dy, w: lambda: dy @ w)(rnd(t, d), rnd(d, ff, scale=0.02)),
        # PEFT's LoRA in bf16: the same thin products through cuBLAS.
        "matmul lora x A^T": lambda: gemm_case(t, 16, d),
        "gemm lora dY B": lambda: (lambda dy, b: lambda: dy @ b)(rnd(t, qd), rnd(qd, 16, scale=0.02)),
        "gemm lora dA += (dY B)^T x": lambda: (lambda tt, x: lambda: tt.t() @ x)(rnd(t, 16), rnd(t, d)),
        "matmul lora x A^T (decode)": lambda: gemm_case(1, 16, d),
        # Autograd's dX through an lm_head with a bf16 weight: the gradient in bf16.
        "gemm lm_head dX = dZ W (f32 dZ)": lambda: (lambda dz, w: lambda: dz @ w)(
            rnd(min(t, 1024), v, scale=1e-3), rnd(v, d, scale=0.02)),
        "rope (q)": rope_case,
        "swiglu": lambda: (lambda g, u: lambda: F.silu(g) * u)(rnd(t, ff), rnd(t, ff)),
        "swiglu_bwd": swiglu_bwd_case,
        "rmsnorm_bwd": rmsnorm_bwd_case,
        "attention prefill": lambda: attn_case(t, t, True),
        "attention_bwd": attn_bwd_case,
        "attention decode": lambda: attn_case(1, ctx, False),
        "kl_retain (+ grad)": kl_case,
        "target_ce (+ grad)": target_ce_case,
        "adamw": adamw_case,
    }
    wanted = [o for o in args.ops.split(";") if o] or list(table)
    res = {}
    for op in wanted:
        if op not in table:
            res[op] = None
            continue
        try:
            res[op] = timed(table[op](), args.repeats)
        except Exception as e:  # an op torch cannot run here: no number, say why
            print(f"{op}: {type(e).__name__}: {e}")
            res[op] = None
        if cuda:
            torch.cuda.empty_cache()
    res["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    res["torch"] = torch.__version__
    print(json.dumps(res))


if __name__ == "__main__":
    main()
