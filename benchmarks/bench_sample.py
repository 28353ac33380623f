"""Decode speed of sample.generate against transformers' generate (its KV cache) on the same weights, CPU.

    python benchmarks/bench_sample.py                 # micro, tiny and ~100M configs, 2 threads
    python benchmarks/bench_sample.py --configs tiny --threads 2 --new-tokens 128 --prompt-len 32

Both decode greedily from the same random prompt and the same weights (ours saved with save_pretrained, loaded
with AutoModelForCausalLM), the same number of new tokens (transformers' eos is switched off, so neither stops
early). Decode tokens/s = (new_tokens - 1) / (time for new_tokens - time for 1 new token): the prompt pass is
measured apart. Best of --repeats runs, the two alternating. The table also says whether the two produced the same
tokens, and the weight-read bound: tokens/s if a step only read each weight it uses once (summing it), the
ceiling that memory bandwidth sets for any fp32 decoder on these weights. On a CPU shared with other work, compare at --threads 1: with 2 threads, waiting threads stall each other.
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import Transformer  # noqa: E402
from model_args import PRESETS, ModelArgs  # noqa: E402
from sample import GREEDY, generate  # noqa: E402

CONFIGS = {
    # Python overhead dominates: what a decode loop itself costs per token.
    "micro": ModelArgs(
        dim=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=512,
        multiple_of=32,
        max_seq_len=1024,
    ),
    "tiny": PRESETS["tiny"],
    "100M": ModelArgs(
        dim=768, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000, max_seq_len=1024
    ),
}


def bench(name, args, prompt_len, new_tokens, repeats):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    model.eval()
    prompt = torch.randint(3, args.vocab_size, (prompt_len,)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    # decode exactly new_tokens, like ours with no stop ids
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf_input = torch.tensor([prompt])

    def ours(n):
        return lambda: list(generate(model, prompt, n, GREEDY))

    def theirs(n):
        def run():
            with torch.inference_mode():
                out = hf.generate(hf_input, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return out[0, prompt_len:].tolist()

        return run

    ours(8)(), theirs(8)()  # warm-up
    # Alternate the two, best of `repeats`: the CPUs may be shared, and load drifts.
    times = {(label, n): [] for label in ("ours", "transformers") for n in (1, new_tokens)}
    tokens = {}
    for _ in range(repeats):
        for label, make in (("ours", ours), ("transformers", theirs)):
            for n in (1, new_tokens):
                run = make(n)
                start = time.perf_counter()
                tokens[label] = run()
                times[label, n].append(time.perf_counter() - start)
    rows = {}
    for label in ("ours", "transformers"):
        t1, tn = min(times[label, 1]), min(times[label, new_tokens])
        rows[label] = (t1, (new_tokens - 1) / (tn - t1), tokens[label])
    same = rows["ours"][2] == rows["transformers"][2]
    ratio = rows["ours"][1] / rows["transformers"][1]
    params = model.num_params() / 1e6
    print(
        f"| {name} ({params:.3g}M) | {rows['ours'][0] * 1e3:.1f} | {rows['transformers'][0] * 1e3:.1f} | "
        f"{rows['ours'][1]:.1f} | {rows['transformers'][1]:.1f} | {ratio:.2f}x | {'yes' if same else 'NO'} | "
        f"{weight_read_bound(model):.0f} |",
        flush=True,
    )


def weight_read_bound(model, repeats=5):
    """Tokens/s if a decoding step did nothing but read every weight it uses once (all but the embedding
    table, of which a step reads one row): the memory-bandwidth ceiling of any fp32 decoder on these weights."""
    weights = [p for name, p in model.named_parameters() if name != "tok_embeddings.weight"]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            w.sum()
        best = min(best, time.perf_counter() - start)
    return 1 / best


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(
        f"CPU, {a.threads} threads, fp32, greedy, prompt {a.prompt_len} tokens, {a.new_tokens} new tokens, "
        f"torch {torch.__version__}"
    )
    print(
        "| config | prompt+1st token ms (ours) | (transformers) | decode tok/s (ours) | (transformers) "
        "| ratio | same tokens | weight-read bound, tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in a.configs:
        bench(name, CONFIGS[name], a.prompt_len, a.new_tokens, a.repeats)


if __name__ == "__main__":
    main()
