"""Time (forward + backward) and peak extra memory: fused chunked linear cross-entropy vs the naive path.

    python benchmarks/bench_cross_entropy.py            # CPU: small shapes, < 1 minute; GPU: full shapes
    python benchmarks/bench_cross_entropy.py --full     # N in {8k, 32k}, V = 32001, D = 4096 (GPU shapes)

Paths: "naive" = linear_cross_entropy_reference (all N x V logits in fp32), "fused" =
fused_linear_cross_entropy, "liger" = Liger-Kernel's LigerFusedLinearCrossEntropyLoss (GPU, when importable;
reduction="sum" with target -100 on zero-weight tokens: it has no per-token weights, same matmul work).
All loss weights are nonzero (0.1 .. 1), so the fused path gets no help from skipping prompt tokens.

    python benchmarks/bench_cross_entropy.py --packs [--dry]   # GPU; --dry: CPU, tiny shapes, 64 conversations

times instead the weight pattern of real packs (issue #26): the ShareGPT file of --data tokenized, weighted and
packed by data.py as train.py does (context 4096, packs of 16,384 tokens: the 1b-throughput preset), the share of
weight-0 tokens (user turns, template markup) measured over every pack, and the pack nearest that share timed with
its own targets and weights, hidden states and lm_head random (D = 4096): V = 32001 with Mistral's tokenizer, V =
128256 with Llama 3's; naive, fused, and fused with every weight 1 (what skipping weight-0 tokens buys). Each is
checked against the fp32 naive path first (relative error of loss and both gradients, bound 2e-2).

Peak extra memory = the most memory in use during forward + backward minus what was in use just before
(inputs and parameters already allocated):
  GPU: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before.
  CPU: each measurement runs in a fresh process; after one warm-up run the kernel's peak-RSS mark is reset
       (write 5 to /proc/self/clear_refs) and peak extra = VmHWM after the run - VmRSS before it. glibc is
       told to serve every allocation >= 128 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors leave
       RSS at once and RSS follows live tensor memory rather than the malloc heap's high-water mark.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import packing  # noqa: E402
from crlft_kernels.cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference  # noqa: E402

try:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
except ImportError:
    LigerFusedLinearCrossEntropyLoss = None


def make_inputs(N, D, V, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(N, D, generator=g, device=device, dtype=dtype)).requires_grad_()
    weight = (torch.randn(V, D, generator=g, device=device, dtype=dtype) * D**-0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g, device=device)
    loss_weights = torch.rand(N, generator=g, device=device) * 0.9 + 0.1
    return hidden, weight, targets, loss_weights


def step_fn(path):
    """A function (hidden, weight, targets, loss_weights) that runs forward + backward of one path."""
    if path == "naive":
        return lambda h, w, y, lw: linear_cross_entropy_reference(h, w, y, lw).backward()
    if path == "fused":
        return lambda h, w, y, lw: fused_linear_cross_entropy(h, w, y, lw).backward()
    if path == "liger":
        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        return lambda h, w, y, lw: loss_fn(w, h, y).backward()
    raise ValueError(f"benchmarks/bench_cross_entropy.py: unknown path {path!r}")


def clear_grads(*tensors):
    for t in tensors:
        t.grad = None


def timed(path, inputs, repeats=5):
    """(median ms, peak extra bytes) of forward + backward of `path` on `inputs`; the peak on a GPU only (else 0)."""
    cuda = inputs[0].is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step = step_fn(path)
    step(*inputs)  # warm-up: compiles the kernel
    clear_grads(*inputs[:2])
    sync()
    before = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        clear_grads(*inputs[:2])
        sync()
        start = time.perf_counter()
        step(*inputs)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() - before if cuda else 0
    return sorted(times)[len(times) // 2], peak


def measure_gpu(path, N, D, V, dtype, repeats=5):
    return timed(path, make_inputs(N, D, V, dtype, "cuda"), repeats)


def check(h, w, y, lw):
    """Relative error of the fused path's loss and both gradients against the naive path run in fp32 on the
    same (half-precision) inputs. bf16 inputs: ~1e-3 expected; bound 2e-2."""
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    fused_linear_cross_entropy(h, w, y, lw).backward()
    got = [fused_linear_cross_entropy(h.detach(), w.detach(), y, lw), h.grad, w.grad]
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    loss = linear_cross_entropy_reference(h32, w32, y, lw)
    loss.backward()
    want = [loss.detach(), h32.grad, w32.grad]
    return max(((a.float() - b).norm() / b.norm()).item() for a, b in zip(got, want))


def check_gpu(N, D, V, dtype):
    return check(*make_inputs(N, D, V, dtype, "cuda"))


def rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"benchmarks/bench_cross_entropy.py: no {field} in /proc/self/status")


def measure_cpu_worker(path, N, D, V, dtype):
    """Runs inside a fresh process (see module docstring); returns (ms, peak extra bytes)."""
    step = step_fn(path)
    # warm-up on a tiny shape: thread pools, library buffers
    step(*make_inputs(64, D, 512, dtype, "cpu"))
    inputs = make_inputs(N, D, V, dtype, "cpu")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    before = rss_kib("VmRSS")
    start = time.perf_counter()
    step(*inputs)
    ms = (time.perf_counter() - start) * 1e3
    return ms, (rss_kib("VmHWM") - before) * 1024


def measure_cpu(path, N, D, V, dtype):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        path,
        str(N),
        str(D),
        str(V),
        str(dtype),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["ms"], result["peak"]


def sharegpt_packs(path, tokenizer_path, batch_tokens, context, max_conversations):
    """ShareGPT conversations tokenized, weighted and packed as train.py does (data.py's functions: one class of
    weight 1, user turns and template markup weight 0): every pack of one epoch on one rank."""
    conversations = data.load_conversations(path, skip_bad=True)[:max_conversations]
    tokenizer = data.load_tokenizer(tokenizer_path)
    dataset = data.tokenize_dataset(conversations, tokenizer, max_seq_len=context)
    steps = packing.pack_epoch(dataset.lengths, batch_tokens, 1, seed=0, epoch=0)
    return (
        [packing.make_batch(dataset, step[0]) for step in steps],
        len(conversations),
        tokenizer.path,
    )


def bench_packs(args):
    """Fused vs naive on the weights of real packs: their zero-weight share measured, then one pack timed; V=32001
    with Mistral's tokenizer (OpenChat 3.5's vocabulary), V=128256 with Llama 3's (OpenChat 3.6's template)."""
    cuda = torch.cuda.is_available() and not args.dry
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    batch_tokens, context, dim, limit = (16384, 4096, 4096, None) if cuda else (1024, 512, 32, 64)
    print(
        f"{'GPU ' + torch.cuda.get_device_name() if cuda else 'CPU (tiny shapes)'}: {args.data} tokenized "
        f"and packed as train.py does (context {context}, packs of <= {batch_tokens} tokens); timed: the pack "
        f"nearest the share of weight 0 over all packs, hidden and lm_head random, D={dim}, {str(dtype)[6:]}, median "
        f"of 5. 'dense' = the same pack with every weight 1 (what skipping weight-0 tokens buys)"
    )
    print(f"{'V':>7} {'path':>12} {'ms':>8} {'peak MiB':>9} {'time/naive':>10} {'rel_err':>8}")
    failed, summary = False, []
    for V, tokenizer_path in ((32001, args.tokenizer), (128256, args.llama3_tokenizer)):
        packs, n_conversations, tokenizer = sharegpt_packs(
            args.data, tokenizer_path, batch_tokens, context, limit
        )
        zero = sum(int((b.loss_weights == 0).sum()) for b in packs) / sum(
            len(b.tokens) for b in packs
        )
        # the typical one
        pack = min(packs, key=lambda b: abs(float((b.loss_weights == 0).float().mean()) - zero))
        print(
            f"{tokenizer}: {n_conversations} conversations in {len(packs)} packs, {zero:.1%} of the packed tokens "
            f"weight 0; timed: a pack of {len(pack.tokens)} tokens, {(pack.loss_weights == 0).float().mean():.1%}"
        )
        g = torch.Generator(device=device).manual_seed(V)
        hidden = torch.randn(
            len(pack.tokens), dim, generator=g, device=device, dtype=dtype
        ).requires_grad_()
        weight = (
            torch.randn(V, dim, generator=g, device=device, dtype=dtype) * dim**-0.5
        ).requires_grad_()
        targets, weights = pack.targets.to(device), pack.loss_weights.to(device)
        assert int(targets.max()) < V, f"{tokenizer}: an id over V={V}"
        err = check(hidden, weight, targets, weights)
        failed |= not err < 2e-2
        base = None
        for label, path, w in (
            ("naive", "naive", weights),
            ("fused", "fused", weights),
            ("fused dense", "fused", torch.ones_like(weights)),
        ):
            ms, peak = timed(path, (hidden, weight, targets, w))
            base = base or ms
            print(
                f"{V:>7} {label:>12} {ms:>8.1f} {peak / 2**20:>9.1f} {ms / base:>10.2f} "
                f"{f'{err:.1e}' if label == 'fused' else '':>8}",
                flush=True,
            )
            if label == "fused":
                summary.append(
                    f"cross-entropy V={V}, N={len(pack.tokens)}, a real pack ({zero:.1%} weight 0 over "
                    f"all packs): fused {ms:.1f} ms = {ms / base:.2f}x naive, rel_err {err:.1e}"
                )
        del hidden, weight
    print("\n".join(["", *(f"SUMMARY {line}" for line in summary)]))
    if failed:
        print("FAILED: fused vs fp32 naive over 2e-2: the timings are of wrong results")
        sys.exit(1)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="N in {8k, 32k}, V=32001, D=4096 in bf16 (the default on GPU)",
    )
    parser.add_argument(
        "--packs",
        action="store_true",
        help="time on the weight pattern of real ShareGPT packs (--data, --tokenizer)",
    )
    parser.add_argument(
        "--data", default=".gpu/sharegpt_head.json", help="--packs: a ShareGPT JSON file"
    )
    parser.add_argument(
        "--tokenizer", default=".gpu/tokenizer.model.v1", help="--packs: Mistral's tokenizer"
    )
    parser.add_argument(
        "--llama3-tokenizer", default=".gpu/llama3/tokenizer.json", help="--packs: Llama 3's"
    )
    parser.add_argument(
        "--dry", action="store_true", help="--packs on the CPU: tiny shapes, 64 conversations"
    )
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.packs:
        for flag, path in (
            ("--data", args.data),
            ("--tokenizer", args.tokenizer),
            ("--llama3-tokenizer", args.llama3_tokenizer),
        ):
            if not os.path.isfile(path):
                raise SystemExit(
                    f"bench_cross_entropy.py: {flag}={path}: no such file (benchmarks/gpu_check.sh's "
                    f"header makes .gpu/)"
                )
        return bench_packs(args)

    if args.worker:
        path, N, D, V, dtype = args.worker
        ms, peak = measure_cpu_worker(
            path, int(N), int(D), int(V), getattr(torch, dtype.split(".")[-1])
        )
        print(json.dumps({"ms": ms, "peak": peak}))
        return

    on_gpu = torch.cuda.is_available()
    if args.full or on_gpu:
        shapes, dtype = [(8192, 4096, 32001), (32768, 4096, 32001)], torch.bfloat16
    else:  # CPU default: fp32 (CPU half matmuls are slow), D small enough to finish in < 1 minute
        shapes, dtype = [(2048, 64, 32001), (8192, 64, 32001)], torch.float32
    paths = ["naive", "fused"] + (["liger"] if on_gpu and LigerFusedLinearCrossEntropyLoss else [])
    measure = measure_gpu if on_gpu else measure_cpu

    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    print(
        f"device: {device}   dtype: {str(dtype).split('.')[-1]}   time = forward + backward"
        + ("" if LigerFusedLinearCrossEntropyLoss else "   (liger_kernel not importable: skipped)")
    )
    if on_gpu:
        print(
            "peak = torch.cuda.max_memory_allocated() during forward+backward - memory allocated before it;"
            " goal: fused peak <= 1/8 naive at <= 1.1x its time"
        )
    else:
        print(
            "peak = peak RSS (VmHWM) during forward+backward - RSS before it, in a fresh process per row,"
            " mmap for every allocation >= 128 KiB (see the docstring).\nCPU times are noisy on a shared"
            " machine; --full is meant for a GPU."
        )
    if on_gpu:
        err = check_gpu(*shapes[0], dtype)
        print(
            f"check: fused vs fp32 naive at N={shapes[0][0]}: max relative error (loss, grad_hidden, "
            f"grad_weight) {err:.1e} {'ok' if err < 2e-2 else 'FAILED'}"
        )
        torch.cuda.empty_cache()
    print(
        f"{'N':>6} {'D':>5} {'V':>6} {'path':>6} {'ms':>9} {'peak MiB':>9} {'time/naive':>10} "
        f"{'mem/naive':>9}"
    )
    for N, D, V in shapes:
        base = None
        for path in paths:
            ms, peak = measure(path, N, D, V, dtype)
            base = base or (ms, peak)
            print(
                f"{N:>6} {D:>5} {V:>6} {path:>6} {ms:>9.1f} {peak / 2**20:>9.1f} {ms / base[0]:>10.2f} "
                f"{peak / base[1]:>9.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
