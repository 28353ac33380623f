"""Llama-3-8B- and Mistral-7B-shaped training steps on one GPU: tokens/s, MFU, peak memory, and the memory per
rank they imply at 8 ranks (the README's 8-GPU recipe).

    python benchmarks/bench_shapes.py [--layers 8] [--tokens 16384] [--steps 10] [--compile true]
    python benchmarks/bench_shapes.py --dry      # CPU: tiny shapes, 3 steps, the same code path

What runs is train.py's own: build_model (FSDP2 over a world of one, bf16 compute over fp32 master weights,
activation checkpointing, each block compiled), crlft_step, gradient clipping and fused AdamW, each step timed and
logged by train_progress.Progress (its tokens/s and MFU: 6 N tokens + 6 layers dim sum(len^2) FLOPs over the bf16
peak it names for the device). Weights are random (the model's init); the batches are packs (packing.pack_epoch,
packing.make_batch) of random tokens in conversations of ShareGPT-like lengths (lognormal, mean 600 tokens:
bench_attention.sharegpt_like_lengths), the first 40% of each conversation weight 0 (a prompt), the rest weight 1.
The first two steps compile (static shapes, then dynamic ones): tokens/s and MFU are medians of steps 3+.

Memory at 8 ranks. The full 32-layer 8B model with fp32 master weights, gradients and AdamW's two moments
(16 bytes a parameter, 128 GB) does not fit one 141 GB H200 beside its activations, so the run keeps --layers of
the 32 and derives the 8-rank figure from its own measurements:
    S     = memory allocated right after optimizer.step(): parameters, gradients and moments (~16 bytes x P_run)
    M     = S - the gradients' bytes: what stays allocated through every step (parameters and moments)
    peak  = torch.cuda.max_memory_allocated() over steps 2+ (the moments exist from step 1's update on)
    extra = (32 - layers) x tokens x dim x 2 bytes: the bf16 input each further block keeps for its recompute
    per rank (32 layers, 8 ranks) = S x P_32 / (8 P_run) + (peak - R) + extra,   R = S (low) or M (high)
FSDP shards parameters, gradients and moments 8 ways; the rest (activations, the gathered bf16 copy of a block,
the loss's chunks) belongs to each rank's own tokens and does not shrink. peak - S assumes every gradient was
allocated at the peak, peak - M that none was: the two bound the answer.
"""

import argparse
import dataclasses
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench_attention import sharegpt_like_lengths  # noqa: E402

import data  # noqa: E402
import packing  # noqa: E402
import tokenized_data  # noqa: E402
import train  # noqa: E402
from model import Transformer  # noqa: E402
from model_args import PRESETS, ModelArgs  # noqa: E402
from train_config import TrainConfig  # noqa: E402
from train_progress import Progress  # noqa: E402

FULL_LAYERS, RANKS = 32, 8
# the released checkpoints' config.json (CRLFT_FACTS.md); max_seq_len is set to the pack size below
SHAPES = {
    # dim 4096, 32 heads, 8 KV heads, hidden 14336, vocab 128256, rope_theta 500000
    "llama3-8b": PRESETS["8b"],
    "mistral-7b": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        hidden_dim=14336,
        vocab_size=32000,
        sliding_window=4096,
        model_type="mistral",
    ),
}
PROMPT_SHARE = 0.4  # the leading share of each random conversation that carries weight 0


def random_packs(n_steps, batch_tokens, vocab_size, seed):
    """n_steps packs (packing.PackedBatch) of random conversations of ShareGPT-like lengths, as train.py makes them."""
    lengths = [
        min(n, batch_tokens) for n in sharegpt_like_lengths(int(1.2 * n_steps * batch_tokens), seed)
    ]
    # a conversation of L inputs has L+1 tokens
    offsets = np.cumsum([0] + [n + 1 for n in lengths], dtype=np.int64)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, offsets[-1], dtype=np.int32)
    position = np.arange(offsets[-1]) - np.repeat(offsets[:-1], np.diff(offsets))
    weights = (position > PROMPT_SHARE * np.repeat(np.diff(offsets), np.diff(offsets))).astype(
        np.float32
    )
    dataset = tokenized_data.TokenizedDataset(
        tokens, weights, offsets, np.zeros(len(lengths), np.int32), ["random"]
    )
    steps = packing.pack_epoch(dataset.lengths, batch_tokens, 1, seed, 0)
    assert len(steps) >= n_steps, f"{len(steps)} packs for {n_steps} steps"
    return [packing.make_batch(dataset, step[0]) for step in steps[:n_steps]]


def run_shape(name, args, opts, compiled, device, mesh):
    """Train `opts.steps` steps of `args`; returns the row of figures (see the docstring)."""
    out_dir = tempfile.mkdtemp(prefix=f"bench_shapes_{name}_")
    cfg = TrainConfig(
        model="8b",
        dtype=opts.dtype,
        activation_checkpointing=True,
        compile=compiled,
        # any preset name: build_model draws fresh weights of shape `args`
        out_dir=out_dir,
        lr=3e-5,
    )
    # Built on the GPU: rank 0's full copy of the fresh weights is drawn there, not by the CPU (seconds, not minutes).
    with torch.device(device):
        model = train.build_model(cfg, args, device, mesh)
    optimizer = train.make_optimizer(model, cfg, device)
    n_params = model.num_params(exclude_embeddings=True)  # as train_loop counts them for the MFU
    batches = [
        b.to(device)
        for b in random_packs(opts.steps, opts.tokens, args.vocab_size, seed=opts.tokens)
    ]
    progress = Progress(cfg, 0, opts.steps, ["random"], n_params, args, device)
    cuda = device.type == "cuda"
    state_bytes = grad_bytes = 0
    try:
        # train_loop's step, without its data, checkpoints and exports
        for step, batch in enumerate(batches):
            if step == 1 and cuda:
                torch.cuda.reset_peak_memory_stats()
            progress.start_step(step)
            weight_sum, outputs = train.crlft_step(model, [batch], 1)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            optimizer.step()
            if step == 0:
                state_bytes = torch.cuda.memory_allocated() if cuda else 0
                grad_bytes = sum(
                    p.grad.to_local().numel() * p.grad.element_size() for p in model.parameters()
                )
            optimizer.zero_grad(set_to_none=True)
            progress.end_step(step + 1, 0, cfg.lr, grad_norm, [batch], outputs, weight_sum)
    finally:
        progress.close()
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    shutil.rmtree(out_dir)
    late = records[2:] or records
    row = dict(
        shape=name,
        layers=args.n_layers,
        tokens=opts.tokens,
        compiled=compiled,
        params=model.num_params(),
        step_s=statistics.median(r["time_s"] for r in late),
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in late),
        mfu=statistics.median(r.get("mfu", float("nan")) for r in late),
        loss=records[-1]["loss"],
        peak=peak,
        state=state_bytes,
        grads=grad_bytes,
    )
    row.update(per_rank_at_8(row, args, opts.tokens))
    return row


def per_rank_at_8(row, args, tokens):
    """The docstring's formula: (low, high) bytes per rank for the full 32 layers on 8 ranks."""
    full = dataclasses.replace(args, n_layers=FULL_LAYERS)
    with torch.device("meta"):
        p_full = Transformer(full).num_params()
    scale = p_full / (RANKS * row["params"])
    extra = (FULL_LAYERS - args.n_layers) * tokens * args.dim * 2
    resident = row["state"] - row["grads"]
    return dict(
        params_32=p_full,
        at8_low=row["state"] * scale + row["peak"] - row["state"] + extra,
        at8_high=row["state"] * scale + row["peak"] - resident + extra,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="blocks kept of the 32")
    parser.add_argument("--tokens", type=int, default=16384, help="packed tokens a step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--compile",
        type=lambda s: s.lower() in ("1", "true", "yes"),
        default=None,
        help="torch.compile each block (default: on a GPU, not with --dry)",
    )
    parser.add_argument(
        "--shapes", default=",".join(SHAPES), help="comma-separated, of " + ", ".join(SHAPES)
    )
    parser.add_argument(
        "--dry", action="store_true", help="CPU check of the code path: tiny shapes, 3 steps"
    )
    opts = parser.parse_args()
    unknown = set(opts.shapes.split(",")) - set(SHAPES)
    if unknown or opts.steps < 3 or not 1 <= opts.layers <= FULL_LAYERS:
        raise SystemExit(
            f"bench_shapes.py: --shapes {sorted(unknown)} unknown, or --steps < 3, or --layers outside "
            f"1..{FULL_LAYERS}: change the flag"
        )
    if opts.dry:  # tiny widths, the real vocabularies; fp32 on a CPU
        opts = argparse.Namespace(**{**vars(opts), "layers": 2, "tokens": 256, "steps": 3})
        shrink = dict(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128, sliding_window=64)
    elif not torch.cuda.is_available():
        print("bench_shapes: no CUDA GPU here; --dry checks the code path on the CPU")
        return
    opts.dtype = "fp32" if opts.dry else "bf16"
    opts.compile = not opts.dry if opts.compile is None else opts.compile
    rank, world_size, device, mesh = train.setup_distributed()
    assert world_size == 1, "bench_shapes.py runs one process (FSDP over a world of one)"
    rows = []
    try:
        for name in opts.shapes.split(","):
            args = dataclasses.replace(SHAPES[name], n_layers=opts.layers, max_seq_len=opts.tokens)
            if opts.dry:
                args = dataclasses.replace(
                    args,
                    **{
                        k: v
                        for k, v in shrink.items()
                        if k != "sliding_window" or args.sliding_window
                    },
                    head_dim=None,
                )
            print(
                f"{name}: {args.n_layers} of {FULL_LAYERS} layers, dim {args.dim}, vocab {args.vocab_size}, "
                f"window {args.sliding_window}, {opts.tokens} tokens a step, {opts.steps} steps, "
                f"compile {opts.compile}",
                flush=True,
            )
            for compiled in (True, False) if opts.compile else (False,):
                try:
                    rows.append(run_shape(name, args, opts, compiled, device, mesh))
                    print(json.dumps(rows[-1]), flush=True)
                    break
                except torch.OutOfMemoryError as e:  # the other shape still runs
                    print(f"{name}: out of memory: {data.one_line(e)[:300]}", flush=True)
                    break
                # e.g. torch.compile failing: rows without it rather than none
                except Exception as e:
                    print(
                        f"{name}: {'compiled ' * compiled}run failed: {type(e).__name__}: {data.one_line(e)[:300]}"
                        f"{'; again without torch.compile, and the next shapes too' * compiled}",
                        flush=True,
                    )
                    opts.compile = False
                # the failed run's model and optimizer state, before the next run allocates its own
                finally:
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()
    gb = 1e9
    print(
        f"\n{'':8}{'shape':<11}{'layers':>7}{'tokens':>7}{'compile':>8}{'params':>8}{'step s':>8}{'tok/s':>8}"
        f"{'MFU':>7}{'peak GB':>9}{'state GB':>9}   per rank at {FULL_LAYERS} layers x {RANKS} ranks, GB (low..high)"
    )
    for r in rows:
        print(
            f"SUMMARY {r['shape']:<11}{r['layers']:>7}{r['tokens']:>7}{str(r['compiled']):>8}"
            f"{r['params'] / 1e9:>7.2f}B{r['step_s']:>8.3f}{r['tokens_per_s']:>8.0f}{r['mfu']:>7.1%}"
            f"{r['peak'] / gb:>9.1f}{r['state'] / gb:>9.1f}"
            f"   {r['at8_low'] / gb:.1f}..{r['at8_high'] / gb:.1f} ({r['params_32'] / 1e9:.2f}B params)"
        )
    if len(rows) < len(opts.shapes.split(",")):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
