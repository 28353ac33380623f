"""Forward and backward TFLOP/s of crlft_kernels/attention.py's flash_attention against PyTorch's
F.scaled_dot_product_attention (flash backend) and FlexAttention: causal, bfloat16, head_dim 128, on a CUDA GPU.

    python benchmarks/bench_attention.py [--heads 32] [--kv-heads 8] [--head-dim 128]
    python benchmarks/bench_attention.py --dry     # CPU: tiny shapes, the Triton interpreter, the same code path

First Mistral's sliding window: forward and backward time with a window of 4096 against full causal attention on
the same inputs, on one sequence of 16k tokens and on a pack of two 8k ones. The window kernels skip the key
blocks out of reach, so the ideal ratio is the share of (query, key) pairs left (printed: 0.44 and 0.75; the
masked blocks at the window's edge cost a little more).

Then, per layout, for total tokens 1k .. 16k:
  - one sequence of all the tokens (the 1k row: the backward against SDPA's, issue #26);
  - packed: ShareGPT-like lengths (lognormal, mean ~600 tokens) concatenated up to the total.
FLOPs: a causal sequence of length L costs 2 matmuls (QK^T, PV) x 2 flops per multiply-add x L^2/2 x H x D
in the forward (half of full attention: the masked half is not counted); the backward counts 2.5x the
forward (five matmuls: QK^T recomputed, dP, dV, dQ, dK), the FlashAttention papers' convention. Our
backward really does seven (the dQ kernel recomputes QK^T and dP to avoid atomics): not counted.
Packs sum this over their sequences. The baselines are credited with the same useful FLOPs. SDPA runs packs on
the padded (n_seqs, max_len) batch (one call; padding sits after each sequence, so is_causal hides it), so its
padding waste shows as lower TFLOP/s; FlexAttention (torch.compile'd, the variable-length baseline) runs them
unpadded with a causal document mask built from cu_seqlens.

Before timing, every case is checked in bf16 against attention_reference run in float32 on the same
inputs (relative error ||x - ref|| / ||ref|| of the output and all three gradients, bound 2e-2), and
FlexAttention's output against the same reference. Times are triton.testing.do_bench medians. Lines starting
SUMMARY (printed as they come) are the figures issue #26 asks for. Without a CUDA GPU (and no --dry) the
script says so and exits 0.

    python benchmarks/bench_attention.py --sweep

times other launch configs (tile sizes, warps, stages) of each kernel on 8k tokens, one stage at a time
with the others at crlft_kernels/attention_fwd_kernels.py's kernel_config(), to pick it from measurements.
"""

import argparse
import math
import os
import sys
import time

# the Triton kernels in the CPU interpreter: set before triton
if __name__ == "__main__" and "--dry" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crlft_kernels.attention import attention_reference, flash_attention  # noqa: E402

TOTALS = (1024, 2048, 4096, 8192, 16384)
WINDOW, WINDOW_TOKENS = 4096, 16384  # Mistral-7B's sliding window, over one sequence of 16k tokens
MAX_REL_ERR = 2e-2  # bf16 operands: errors of 1e-3 .. 1e-2 expected


def sharegpt_like_lengths(total, seed, mean=600):
    """Lognormal lengths (sigma 1, mean `mean`), each at least 1, cut so they sum to `total`."""
    g = torch.Generator().manual_seed(seed)
    sigma = 1.0
    mu = math.log(mean) - sigma**2 / 2
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


def make_inputs(lengths, n_heads, n_kv_heads, head_dim, device, dtype=torch.bfloat16):
    n_tokens = sum(lengths)
    q = torch.randn(n_tokens, n_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(n_tokens, n_kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(n_tokens, n_kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    do = torch.randn(n_tokens, n_heads, head_dim, device=device, dtype=dtype)
    cu_seqlens = torch.tensor(
        [0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device
    )
    return q, k, v, do, cu_seqlens


def check(q, k, v, do, cu_seqlens, max_seqlen, window=None):
    """Max relative error of (out, dq, dk, dv) against the float32 reference on the same bf16 inputs, and the
    reference's output (to check a baseline against)."""
    out = flash_attention(q, k, v, cu_seqlens, max_seqlen, window=window)
    got = (out, *torch.autograd.grad(out, (q, k, v), do))
    q32, k32, v32 = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = attention_reference(q32, k32, v32, cu_seqlens, max_seqlen, window=window)
    want = (ref, *torch.autograd.grad(ref, (q32, k32, v32), do.float()))
    assert all(torch.isfinite(x).all() for x in got), "non-finite values in the kernel's results"
    return max(rel_err(x, y) for x, y in zip(got, want)), ref.detach()


def padded_sdpa_inputs(q, k, v, do, lengths, gqa_ok):
    """(n_seqs, heads, max_len, D) copies for SDPA; K/V repeated per query head unless enable_gqa works."""
    n_seqs, max_len = len(lengths), max(lengths)
    valid = (
        torch.arange(max_len, device=q.device)[None, :]
        < torch.tensor(lengths, device=q.device)[:, None]
    )

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


def timer(device):
    """Milliseconds of fn(): triton's do_bench median on a GPU; on the CPU (--dry) one call after a warm-up."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    def once(fn):
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return once


def flex_baseline(q, k, v, do, cu_seqlens, device):
    """FlexAttention (compiled on a GPU; eager on the CPU) with a causal document mask from cu_seqlens, on
    (1, heads, tokens, D) copies: the variable-length baseline. Returns (forward fn, backward fn, its output)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = q.shape[0]
    doc = torch.searchsorted(
        cu_seqlens[1:], torch.arange(n, device=device, dtype=torch.int32), right=True
    )

    def causal_same_document(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    mask = create_block_mask(causal_same_document, None, None, n, n, device=device)
    # FlexAttention has no backward on the CPU (--dry): there it runs forward only.
    qf, kf, vf = [
        x.detach().transpose(0, 1)[None].contiguous().requires_grad_(device == "cuda")
        for x in (q, k, v)
    ]
    dof = do.transpose(0, 1)[None].contiguous()
    attend = torch.compile(flex_attention, dynamic=False) if device == "cuda" else flex_attention
    gqa = dict(enable_gqa=True) if q.shape[1] != k.shape[1] else {}
    out = attend(qf, kf, vf, block_mask=mask, **gqa)
    backward = (
        (lambda: torch.autograd.grad(out, (qf, kf, vf), dof, retain_graph=True))
        if device == "cuda"
        else None
    )
    return lambda: attend(qf, kf, vf, block_mask=mask, **gqa), backward, out[0].transpose(0, 1)


def window_pairs(lengths, window):
    """(query, key) pairs a causal attention computes, within `window` keys or not (None)."""

    def pairs(L):
        if window is None or L <= window:
            return L * (L + 1) // 2
        return window * (window + 1) // 2 + (L - window) * window

    return sum(pairs(L) for L in lengths)


def bench(args):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # --dry: fp32 (the interpreter's bf16 dots are not bf16's: TRITON_ON_CPU.md), packs of ~40-token sequences
    device, dtype = ("cpu", torch.float32) if args.dry else ("cuda", torch.bfloat16)
    H, H_kv, D = args.heads, args.kv_heads, args.head_dim
    totals, window_size, window_tokens, mean_len = (128, 256), 64, 256, 40
    if not args.dry:
        totals, window_size, window_tokens, mean_len = TOTALS, WINDOW, WINDOW_TOKENS, 600
    gqa_ok = sdpa_gqa_works(device)
    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else "CPU (--dry: tiny shapes, one timed call)"
    )
    print(
        f"{name}, torch {torch.__version__}; H={H} H_kv={H_kv} D={D} {str(dtype)[6:]} causal; SDPA flash backend, "
        f"{'enable_gqa' if gqa_ok else 'K/V repeated per query head (enable_gqa not available on flash)'}; "
        f"triton {'interpreter' if os.environ.get('TRITON_INTERPRET') == '1' else 'compiled'}"
    )
    ms, failed = timer(device), []

    def checked(name, err):
        if not err < MAX_REL_ERR:
            failed.append(f"{name}: relative error {err:.1e}")

    # at once: a time limit that stops the run leaves the lines printed so far
    def print_summary(line):
        print(f"SUMMARY {line}", flush=True)

    def tflops(flops, t_ms):
        return flops / (t_ms * 1e-3) / 1e12

    # The sliding window against full causal attention on the same inputs: one sequence, and a pack of two.
    print(
        f"\nwindow {window_size} against full causal attention, {window_tokens} tokens; ideal = the share of "
        f"(query, key) pairs left in the window"
    )
    print(
        f"{'layout':<22}{'attention':<13}{'rel_err':>9}{'fwd ms':>8}{'bwd ms':>8}{'fwd x':>7}{'f+b x':>7}"
        f"{'ideal':>7}"
    )
    for layout, lengths in (
        ("one sequence", [window_tokens]),
        ("pack of two", [window_tokens // 2] * 2),
    ):
        q, k, v, do, cu = make_inputs(lengths, H, H_kv, D, device, dtype)
        base = None
        for window in (None, window_size):
            err, _ = check(q, k, v, do, cu, max(lengths), window)
            checked(f"{layout} window {window}", err)
            fwd = ms(lambda: flash_attention(q, k, v, cu, max(lengths), window=window))
            out = flash_attention(q, k, v, cu, max(lengths), window=window)
            bwd = ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
            base = base or (fwd, fwd + bwd)
            ideal = window_pairs(lengths, window) / window_pairs(lengths, None)
            label, kind = (
                f"{layout} {'+'.join(map(str, lengths))}",
                f"window {window}" if window else "causal",
            )
            print(
                f"{label:<22}{kind:<13}{err:>9.1e}{fwd:>8.3f}{bwd:>8.3f}{fwd / base[0]:>7.2f}"
                f"{(fwd + bwd) / base[1]:>7.2f}{ideal:>7.2f}",
                flush=True,
            )
            if window:
                print_summary(
                    f"window {window} at {window_tokens} tokens, {layout}: fwd {fwd / base[0]:.2f}x, "
                    f"fwd+bwd {(fwd + bwd) / base[1]:.2f}x full causal (ideal {ideal:.2f})"
                )
            out = None  # freed before the next one is made
    print(
        "\nTFLOP/s (median of do_bench); 'x sdpa', 'x flex' = the baseline's time / ours (> 1: ours is faster); "
        "flex = FlexAttention compiled, with a causal document mask (packed rows only)"
    )
    print(
        f"{'layout':<13}{'tokens':>7}{'seqs':>6}{'max_len':>8}{'rel_err':>9}{'fwd ours':>9}{'sdpa':>7}{'flex':>7}"
        f"{'bwd ours':>9}{'sdpa':>7}{'flex':>7}{'fwd ms':>8}{'bwd ms':>8}{'bwd x sdpa':>11}{'f+b x flex':>11}"
    )
    for layout in ("one sequence", "packed"):
        for total in totals:
            lengths = (
                [total]
                if layout == "one sequence"
                else sharegpt_like_lengths(total, total, mean_len)
            )
            max_len = max(lengths)
            q, k, v, do, cu = make_inputs(lengths, H, H_kv, D, device, dtype)
            err, ref = check(q, k, v, do, cu, max_len)
            checked(f"{layout} {total}", err)
            fwd_flops, bwd_flops = causal_flops(lengths, H, D)

            ours_fwd = ms(lambda: flash_attention(q, k, v, cu, max_len))
            out = flash_attention(q, k, v, cu, max_len)
            ours_bwd = ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))

            qp, kp, vp, dop = padded_sdpa_inputs(q, k, v, do, lengths, gqa_ok)
            extra = dict(enable_gqa=True) if gqa_ok and H != H_kv else {}
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                sdpa_fwd = ms(
                    lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, **extra)
                )
                ref_out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, **extra)
                sdpa_bwd = ms(
                    lambda: torch.autograd.grad(ref_out, (qp, kp, vp), dop, retain_graph=True)
                )

            flex = (float("nan"),) * 2
            if layout == "packed":
                try:
                    flex_fwd, flex_bwd, flex_out = flex_baseline(q, k, v, do, cu, device)
                    # the baseline's document mask is right
                    checked(f"flex {total}", rel_err(flex_out, ref))
                    flex = ms(flex_fwd), ms(flex_bwd) if flex_bwd else float("nan")
                except Exception as e:  # a baseline that fails is reported, not fatal
                    print(
                        f"flex at {total}: {type(e).__name__}: {str(e).splitlines()[0][:150]}",
                        flush=True,
                    )
            print(
                f"{layout:<13}{total:>7}{len(lengths):>6}{max_len:>8}{err:>9.1e}{tflops(fwd_flops, ours_fwd):>9.1f}"
                f"{tflops(fwd_flops, sdpa_fwd):>7.1f}{tflops(fwd_flops, flex[0]):>7.1f}"
                f"{tflops(bwd_flops, ours_bwd):>9.1f}{tflops(bwd_flops, sdpa_bwd):>7.1f}"
                f"{tflops(bwd_flops, flex[1]):>7.1f}{ours_fwd:>8.3f}{ours_bwd:>8.3f}{sdpa_bwd / ours_bwd:>11.2f}"
                f"{sum(flex) / (ours_fwd + ours_bwd):>11.2f}",
                flush=True,
            )
            if total == totals[0] and layout == "one sequence":
                print_summary(
                    f"attention backward, one sequence of {total}: ours {ours_bwd:.3f} ms, SDPA "
                    f"{sdpa_bwd:.3f} ms: {sdpa_bwd / ours_bwd:.2f}x SDPA's speed"
                )
            if total == totals[-1] and layout == "packed":
                print_summary(
                    f"attention packed {total}: fwd+bwd ours {ours_fwd + ours_bwd:.3f} ms, FlexAttention "
                    f"{sum(flex):.3f} ms, padded SDPA {sdpa_fwd + sdpa_bwd:.3f} ms"
                )
            q = k = v = do = out = qp = kp = vp = dop = ref_out = ref = (
                None  # freed before the next row's
            )
            if device == "cuda":
                torch.cuda.empty_cache()

    if failed:
        print(
            f"FAILED: over {MAX_REL_ERR} (or NaN): {'; '.join(failed)}: the timings of those rows are of wrong "
            f"results"
        )
        sys.exit(1)


# (block_m, block_n, warps, stages) candidates per kernel; the sweep keeps the other kernels at the default.
SWEEP = {
    "fwd": [
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (128, 64, 4, 3),
        (128, 64, 8, 4),
        (128, 32, 4, 4),
        (64, 64, 4, 3),
        (128, 128, 8, 2),
        (256, 64, 8, 3),
    ],
    "dkdv": [
        (64, 128, 8, 2),
        (64, 128, 4, 2),
        (64, 128, 8, 3),
        (128, 128, 8, 2),
        (64, 64, 4, 3),
        (32, 64, 4, 3),
        (32, 128, 8, 3),
        (16, 64, 4, 3),
    ],
    "dq": [
        (128, 64, 8, 3),
        (128, 64, 8, 2),
        (64, 32, 4, 3),
        (128, 128, 8, 2),
        (128, 32, 8, 3),
        (64, 64, 4, 4),
        (128, 64, 8, 4),
        (128, 128, 8, 3),
    ],
}


def sweep(args):
    """Time each candidate config of one kernel (others at the default) on 8k tokens, both layouts."""
    import triton.testing

    from crlft_kernels import attention_bwd_kernels
    from crlft_kernels.attention_fwd_kernels import Tiles, kernel_config

    H, H_kv, D = args.heads, args.kv_heads, args.head_dim
    print(
        f"{torch.cuda.get_device_name()}: config sweep, H={H} H_kv={H_kv} D={D} bf16 causal, 8192 tokens; "
        f"default {kernel_config(D, torch.bfloat16, 'cuda')}"
    )
    cases = [("one sequence", [8192]), ("packed", sharegpt_like_lengths(8192, seed=8192))]
    inputs = [(name, lengths, *make_inputs(lengths, H, H_kv, D, "cuda")) for name, lengths in cases]
    print(
        f"{'kernel':<6}{'block_m':>8}{'block_n':>8}{'warps':>6}{'stages':>7}"
        + "".join(f"{name + ' ms':>18}" for name, _ in cases)
        + f"{'rel_err':>9}"
    )
    try:
        for kernel, candidates in SWEEP.items():
            for cand in candidates:
                base = kernel_config(D, torch.bfloat16, "cuda")
                cfg = base._replace(**{kernel: Tiles(*cand)})
                # launch_specs (attention_bwd_kernels.py) looks kernel_config up in its own module
                attention_bwd_kernels.kernel_config = lambda *a, _cfg=cfg: _cfg
                times, err = [], 0.0
                try:
                    for _, lengths, q, k, v, do, cu in inputs:
                        max_len = max(lengths)
                        err = max(err, check(q, k, v, do, cu, max_len)[0])
                        if kernel == "fwd":
                            fn = lambda: flash_attention(q, k, v, cu, max_len)  # noqa: E731
                        else:  # the whole backward (delta + dK/dV + dQ): only one of them changes
                            out = flash_attention(q, k, v, cu, max_len)
                            fn = lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)  # noqa: E731
                        times.append(
                            triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
                        )
                    row = "".join(f"{t:>18.3f}" for t in times) + f"{err:>9.1e}"
                except Exception as e:  # e.g. out of shared memory for this tile size
                    row = f"   failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                print(
                    f"{kernel:<6}{cand[0]:>8}{cand[1]:>8}{cand[2]:>6}{cand[3]:>7}{row}", flush=True
                )
    finally:
        attention_bwd_kernels.kernel_config = kernel_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument(
        "--sweep", action="store_true", help="time other launch configs of each kernel"
    )
    parser.add_argument(
        "--dry",
        action="store_true",
        help="CPU check of the code path: tiny shapes, the Triton interpreter, one timed call",
    )
    args = parser.parse_args()
    if args.dry:
        args.heads, args.kv_heads, args.head_dim = 2, 1, 16
        return bench(args)
    if not torch.cuda.is_available():
        print(
            "bench_attention: no CUDA GPU here, nothing to time (--dry checks the code path on the CPU). The "
            "kernels are checked on the CPU by tests/test_attention.py (interpreter, and an ahead-of-time compile "
            "for sm_80/sm_90a)."
        )
        return
    sweep(args) if args.sweep else bench(args)


if __name__ == "__main__":
    main()
