"""Forward + backward time per step: model.py (fused loss path) against transformers' LlamaForCausalLM
(loss via labels) on the same weights and batch. CPU, float32, the "tiny" preset (dim 256, 4 layers, 32k vocab,
the 19M LLaMA) on 4 x 256 tokens by default.

    python benchmarks/bench_model.py [--threads 2] [--batch 4] [--seq 256] [--steps 10]
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import model as M  # noqa: E402


def time_interleaved(steps, n_steps, n_warmup=1):
    """Per function: median wall seconds per call, and median CPU seconds of this process per call. They are
    called in turns so that a busy machine slows all alike; CPU time does not count time spent descheduled,
    so it is the steadier number on a shared machine (with 1 thread it is the compute time)."""
    for _ in range(n_warmup):
        for step in steps:
            step()
    wall, cpu = [[] for _ in steps], [[] for _ in steps]
    for _ in range(n_steps):
        for i, step in enumerate(steps):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            step()
            wall[i].append(time.perf_counter() - start_wall)
            cpu[i].append(time.process_time() - start_cpu)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return [(median(w), median(c)) for w, c in zip(wall, cpu)]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--preset", default="tiny")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    args = M.PRESETS[opts.preset]
    ours = M.Transformer(args)
    ours.init_weights()
    with tempfile.TemporaryDirectory() as tmp:  # the same weights, through our HF export
        ours.save_pretrained(tmp)
        theirs = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    ours.train(), theirs.train()

    tokens = torch.randint(0, args.vocab_size, (opts.batch, opts.seq))
    print(
        f"preset {opts.preset} ({ours.num_params() / 1e6:.1f}M params), batch {opts.batch} x {opts.seq} tokens, "
        f"float32, CPU, torch {torch.__version__}, {opts.threads} threads, "
        f"HF attention {theirs.config._attn_implementation}"
    )
    print(
        f"| {'forward+backward (median)':<46} | {'wall ms':>8} | {'tokens/s':>8} | {'speed-up':>8} | "
        f"{'CPU ms':>8} | {'speed-up':>8} |"
    )
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    # All targets, as in pre-training; then the first half of each row without a target, like the user turns
    # that C-RLFT gives weight 0 (HF: label -100; ours: loss weight 0, skipped by the fused loss).
    for case, masked in [("all targets", 0.0), ("1st half masked", 0.5)]:
        labels = tokens.clone()
        labels[:, : int(masked * opts.seq)] = -100
        # Ours predicts labels[:, 1:] at positions [0, T-1), the same pairs as HF's shifted labels.
        targets = torch.cat([labels[:, 1:], torch.full((opts.batch, 1), -100)], dim=1)
        loss_weights = (targets != -100).float()
        n_targets = loss_weights.sum()

        def ours_step():
            loss_sum, _ = ours(tokens, targets=targets, loss_weights=loss_weights)
            (loss_sum / n_targets).backward()
            ours.zero_grad(set_to_none=True)
            return loss_sum / n_targets

        def theirs_step():
            loss = theirs(input_ids=tokens, labels=labels).loss
            loss.backward()
            theirs.zero_grad(set_to_none=True)
            return loss

        loss_ours, loss_theirs = ours_step().item(), theirs_step().item()
        assert abs(loss_ours - loss_theirs) < 1e-4, (loss_ours, loss_theirs)
        t_theirs, t_ours = time_interleaved([theirs_step, ours_step], opts.steps)
        n_tokens = opts.batch * opts.seq
        for name, (wall, cpu) in [
            ("transformers LlamaForCausalLM", t_theirs),
            ("model.py (fused linear CE)", t_ours),
        ]:
            print(
                f"| {case + ': ' + name:<46} | {wall * 1e3:8.1f} | {n_tokens / wall:8.0f} | "
                f"{t_theirs[0] / wall:7.2f}x | {cpu * 1e3:8.1f} | {t_theirs[1] / cpu:7.2f}x |"
            )


if __name__ == "__main__":
    main()
