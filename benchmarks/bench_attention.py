"""Forward and backward TFLOP/s of crlft_kernels/attention.py's flash_attention against PyTorch's
F.scaled_dot_product_attention (flash backend): causal, bfloat16, head_dim 128, on a CUDA GPU.

    python benchmarks/bench_attention.py [--heads 32] [--kv-heads 8] [--head-dim 128]

Work per layout, for total tokens 1k .. 16k:
  - one sequence of all the tokens;
  - packed: ShareGPT-like lengths (lognormal, mean ~600 tokens) concatenated up to the total.
FLOPs: a causal sequence of length L costs 2 matmuls (QK^T, PV) x 2 flops per multiply-add x L^2/2 x H x D
in the forward (half of full attention: the masked half is not counted); the backward counts 2.5x the
forward (five matmuls: QK^T recomputed, dP, dV, dQ, dK), the FlashAttention papers' convention. Our
backward really does seven (the dQ kernel recomputes QK^T and dP to avoid atomics): not counted.
Packs sum this over their sequences. The SDPA baseline is credited with the same useful FLOPs: for packs
it runs on the padded (n_seqs, max_len) batch (one call; padding sits after each sequence, so is_causal
hides it), so its padding waste shows as lower TFLOP/s.

Then Mistral's sliding window: one sequence of 16k tokens, forward and backward time with a window of
4096 against full causal attention on the same inputs, and the ratio. The window kernels skip the key
blocks out of reach, so the ideal ratio is the share of (query, key) pairs left: (W - W^2 / 2L) / (L / 2)
= 0.44 here (the masked blocks at the window's edge cost a little more).

Before timing, every case is checked in bf16 against attention_reference run in float32 on the same
inputs (relative error ||x - ref|| / ||ref|| of the output and all three gradients, bound 2e-2).
Times are triton.testing.do_bench medians. Without a CUDA GPU the script says so and exits 0.

    python benchmarks/bench_attention.py --sweep

times other launch configs (tile sizes, warps, stages) of each kernel on 8k tokens, one stage at a time
with the others at crlft_kernels/attention.py's choice, to pick kernel_config() from measurements.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crlft_kernels.attention import attention_reference, flash_attention  # noqa: E402

TOTALS = (1024, 2048, 4096, 8192, 16384)
WINDOW, WINDOW_TOKENS = 4096, 16384  # Mistral-7B's sliding window, over one sequence of 16k tokens
MAX_REL_ERR = 2e-2  # bf16 operands: errors of 1e-3 .. 1e-2 expected


def sharegpt_like_lengths(total, seed, mean=600):
    """Lognormal lengths (sigma 1, mean `mean`), each at least 1, cut so they sum to `total`."""
    g = torch.Generator().manual_seed(seed)
    sigma = 1.0
    mu = math.log(mean) - sigma ** 2 / 2
    lengths = []
    while sum(lengths) < total:
        length = int(torch.empty(1).log_normal_(mu, sigma, generator=g).clamp(min=1).item())
        lengths.append(min(length, total - sum(lengths)))
    return lengths


def causal_flops(lengths, n_heads, head_dim):
    forward = sum(4 * L * L * n_heads * head_dim / 2 for L in lengths)
    return forward, 2.5 * forward


def rel_err(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def make_inputs(lengths, n_heads, n_kv_heads, head_dim, device):
    n_tokens = sum(lengths)
    q = torch.randn(n_tokens, n_heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(n_tokens, n_kv_heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(n_tokens, n_kv_heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(n_tokens, n_heads, head_dim, device=device, dtype=torch.bfloat16)
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return q, k, v, do, cu_seqlens


def check(q, k, v, do, cu_seqlens, max_seqlen, window=None):
    """Max relative error of (out, dq, dk, dv) against the float32 reference on the same bf16 inputs."""
    out = flash_attention(q, k, v, cu_seqlens, max_seqlen, window=window)
    got = (out, *torch.autograd.grad(out, (q, k, v), do))
    q32, k32, v32 = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = attention_reference(q32, k32, v32, cu_seqlens, max_seqlen, window=window)
    want = (ref, *torch.autograd.grad(ref, (q32, k32, v32), do.float()))
    assert all(torch.isfinite(x).all() for x in got), "non-finite values in the kernel's results"
    return max(rel_err(x, y) for x, y in zip(got, want))


def padded_sdpa_inputs(q, k, v, do, lengths, gqa_ok):
    """(n_seqs, heads, max_len, D) copies for SDPA; K/V repeated per query head unless enable_gqa works."""
    n_seqs, max_len = len(lengths), max(lengths)
    valid = torch.arange(max_len, device=q.device)[None, :] < torch.tensor(lengths, device=q.device)[:, None]

    def pad(x):
        out = x.new_zeros(n_seqs, max_len, x.shape[1], x.shape[2])
        out[valid] = x.detach()
        return out.transpose(1, 2).contiguous()

    group = q.shape[1] // k.shape[1]
    kp, vp = pad(k), pad(v)
    if not gqa_ok and group > 1:
        kp, vp = kp.repeat_interleave(group, 1), vp.repeat_interleave(group, 1)
    return [t.requires_grad_() for t in (pad(q), kp, vp)] + [pad(do)]


def sdpa_gqa_works(device):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(1, 4, 128, 128, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, 2, 128, 128, device=device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        return True
    except (RuntimeError, TypeError):
        return False


def bench(args):
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = "cuda"
    H, H_kv, D = args.heads, args.kv_heads, args.head_dim
    gqa_ok = sdpa_gqa_works(device)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"H={H} H_kv={H_kv} D={D} bf16 causal; SDPA flash backend, "
          f"{'enable_gqa' if gqa_ok else 'K/V repeated per query head (enable_gqa not available on flash)'}")

    def ms(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    rows, failed = [], False
    for layout in ("one sequence", "packed"):
        for total in TOTALS:
            lengths = [total] if layout == "one sequence" else sharegpt_like_lengths(total, seed=total)
            max_len = max(lengths)
            q, k, v, do, cu = make_inputs(lengths, H, H_kv, D, device)
            err = check(q, k, v, do, cu, max_len)
            failed |= not err < MAX_REL_ERR
            fwd_flops, bwd_flops = causal_flops(lengths, H, D)

            ours_fwd = ms(lambda: flash_attention(q, k, v, cu, max_len))
            out = flash_attention(q, k, v, cu, max_len)
            ours_bwd = ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))

            qp, kp, vp, dop = padded_sdpa_inputs(q, k, v, do, lengths, gqa_ok)
            extra = dict(enable_gqa=True) if gqa_ok and H != H_kv else {}
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                sdpa_fwd = ms(lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, **extra))
                ref_out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, **extra)
                sdpa_bwd = ms(lambda: torch.autograd.grad(ref_out, (qp, kp, vp), dop, retain_graph=True))

            def tflops(flops, t_ms):
                return flops / (t_ms * 1e-3) / 1e12

            rows.append((layout, total, len(lengths), max_len, err,
                         tflops(fwd_flops, ours_fwd), tflops(fwd_flops, sdpa_fwd),
                         tflops(bwd_flops, ours_bwd), tflops(bwd_flops, sdpa_bwd), ours_fwd, ours_bwd))
            del q, k, v, do, out, qp, kp, vp, dop, ref_out
            torch.cuda.empty_cache()

    print(f"\n{'layout':<13}{'tokens':>7}{'seqs':>6}{'max_len':>8}{'rel_err':>9}"
          f"{'fwd ours':>10}{'fwd sdpa':>10}{'bwd ours':>10}{'bwd sdpa':>10}{'fwd ms':>8}{'bwd ms':>8}")
    print(f"{'':<43}{'(TFLOP/s, median of do_bench)':^40}")
    for r in rows:
        print(f"{r[0]:<13}{r[1]:>7}{r[2]:>6}{r[3]:>8}{r[4]:>9.1e}{r[5]:>10.1f}{r[6]:>10.1f}{r[7]:>10.1f}"
              f"{r[8]:>10.1f}{r[9]:>8.3f}{r[10]:>8.3f}")

    # Sliding window against full causal attention on the same 16k-token sequence.
    q, k, v, do, cu = make_inputs([WINDOW_TOKENS], H, H_kv, D, device)
    window_rows = []
    for window in (None, WINDOW):
        err = check(q, k, v, do, cu, WINDOW_TOKENS, window)
        failed |= not err < MAX_REL_ERR
        fwd = ms(lambda: flash_attention(q, k, v, cu, WINDOW_TOKENS, window=window))
        out = flash_attention(q, k, v, cu, WINDOW_TOKENS, window=window)
        bwd = ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
        window_rows.append(("causal" if window is None else f"window {window}", err, fwd, bwd))
        del out
    ideal = (WINDOW - WINDOW ** 2 / (2 * WINDOW_TOKENS)) / (WINDOW_TOKENS / 2)
    print(f"\none sequence of {WINDOW_TOKENS} tokens, time against full causal (ideal {ideal:.2f}: the share "
          f"of (query, key) pairs in the window)")
    print(f"{'attention':<13}{'rel_err':>9}{'fwd ms':>8}{'bwd ms':>8}{'fwd x':>7}{'bwd x':>7}")
    for name, err, fwd, bwd in window_rows:
        print(f"{name:<13}{err:>9.1e}{fwd:>8.3f}{bwd:>8.3f}{fwd / window_rows[0][2]:>7.2f}"
              f"{bwd / window_rows[0][3]:>7.2f}")
    if failed:
        print(f"FAILED: a relative error is over {MAX_REL_ERR} (or NaN); the timings above are of wrong results")
        sys.exit(1)


# (block_m, block_n, warps, stages) candidates per kernel; the sweep keeps the other kernels at the default.
SWEEP = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (128, 32, 4, 4),
            (64, 64, 4, 3), (128, 128, 8, 2), (256, 64, 8, 3)],
    "dkdv": [(64, 128, 8, 2), (64, 128, 4, 2), (64, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
             (32, 64, 4, 3), (32, 128, 8, 3), (16, 64, 4, 3)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (128, 128, 8, 2), (128, 32, 8, 3),
           (64, 64, 4, 4), (128, 64, 8, 4), (128, 128, 8, 3)],
}


def sweep(args):
    """Time each candidate config of one kernel (others at the default) on 8k tokens, both layouts."""
    import triton.testing

    import crlft_kernels.attention as attention

    default_config = attention.kernel_config
    H, H_kv, D = args.heads, args.kv_heads, args.head_dim
    print(f"{torch.cuda.get_device_name()}: config sweep, H={H} H_kv={H_kv} D={D} bf16 causal, 8192 tokens; "
          f"default {default_config(D, torch.bfloat16, 'cuda')}")
    cases = [("one sequence", [8192]), ("packed", sharegpt_like_lengths(8192, seed=8192))]
    inputs = [(name, lengths, *make_inputs(lengths, H, H_kv, D, "cuda")) for name, lengths in cases]
    print(f"{'kernel':<6}{'block_m':>8}{'block_n':>8}{'warps':>6}{'stages':>7}"
          + "".join(f"{name + ' ms':>18}" for name, _ in cases) + f"{'rel_err':>9}")
    try:
        for kernel, candidates in SWEEP.items():
            for cand in candidates:
                base = default_config(D, torch.bfloat16, "cuda")
                cfg = base._replace(**{kernel: attention.Tiles(*cand)})
                attention.kernel_config = lambda *a, _cfg=cfg: _cfg
                times, err = [], 0.0
                try:
                    for _, lengths, q, k, v, do, cu in inputs:
                        max_len = max(lengths)
                        err = max(err, check(q, k, v, do, cu, max_len))
                        if kernel == "fwd":
                            fn = lambda: flash_attention(q, k, v, cu, max_len)  # noqa: E731
                        else:  # the whole backward (delta + dK/dV + dQ): only one of them changes
                            out = flash_attention(q, k, v, cu, max_len)
                            fn = lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)  # noqa: E731
                        times.append(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
                    row = "".join(f"{t:>18.3f}" for t in times) + f"{err:>9.1e}"
                except Exception as e:  # e.g. out of shared memory for this tile size
                    row = f"   failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                print(f"{kernel:<6}{cand[0]:>8}{cand[1]:>8}{cand[2]:>6}{cand[3]:>7}{row}", flush=True)
    finally:
        attention.kernel_config = default_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--sweep", action="store_true", help="time other launch configs of each kernel")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention: no CUDA GPU here, nothing to time. The kernels are checked on the CPU by "
              "tests/test_attention.py (interpreter, and an ahead-of-time compile for sm_80/sm_90a).")
        return
    sweep(args) if args.sweep else bench(args)


if __name__ == "__main__":
    main()
