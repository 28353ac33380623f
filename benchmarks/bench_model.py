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
    """Median seconds per call of each function, called in turns so that a busy machine slows all alike."""
    for _ in range(n_warmup):
        for step in steps:
            step()
    times = [[] for _ in steps]
    for _ in range(n_steps):
        for step, record in zip(steps, times):
            start = time.perf_counter()
            step()
            record.append(time.perf_counter() - start)
    return [sorted(record)[len(record) // 2] for record in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    # Ours predicts tokens[:, 1:] (last position weight 0), the same positions as HF's shifted labels.
    targets = torch.cat([tokens[:, 1:], torch.full((opts.batch, 1), -100)], dim=1)
    loss_weights = (targets != -100).float()
    n_targets = loss_weights.sum()

    def ours_step():
        loss_sum, _ = ours(tokens, targets=targets, loss_weights=loss_weights)
        (loss_sum / n_targets).backward()
        ours.zero_grad(set_to_none=True)
        return loss_sum / n_targets

    def theirs_step():
        loss = theirs(input_ids=tokens, labels=tokens).loss
        loss.backward()
        theirs.zero_grad(set_to_none=True)
        return loss

    loss_ours, loss_theirs = ours_step().item(), theirs_step().item()
    assert abs(loss_ours - loss_theirs) < 1e-4, (loss_ours, loss_theirs)
    t_theirs, t_ours = time_interleaved([theirs_step, ours_step], opts.steps)

    n_tokens = opts.batch * opts.seq
    print(f"preset {opts.preset} ({ours.num_params() / 1e6:.1f}M params), batch {opts.batch} x {opts.seq} tokens, "
          f"float32, CPU, torch {torch.__version__}, {opts.threads} threads, "
          f"HF attention {theirs.config._attn_implementation}; loss {loss_ours:.4f} (ours) vs {loss_theirs:.4f}")
    print(f"| {'forward+backward':<36} | {'ms/step':>8} | {'tokens/s':>9} | {'speed-up':>8} |")
    print(f"|{'-' * 38}|{'-' * 10}|{'-' * 11}|{'-' * 10}|")
    for name, t in [("transformers LlamaForCausalLM", t_theirs), ("model.py (fused linear CE)", t_ours)]:
        print(f"| {name:<36} | {t * 1e3:8.1f} | {n_tokens / t:9.0f} | {t_theirs / t:7.2f}x |")


if __name__ == "__main__":
    main()
