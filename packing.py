"""Packing for C-RLFT: each step, n_bins bins of `batch_tokens` tokens filled with whole conversations (no padding,
position ids restarting per conversation, cu_seqlens for the attention), every conversation once an epoch
(../shared/CRLFT_FACTS.md, "Packing and batches"). Reads a tokenized dataset's flat arrays (tokenized_data.TokenizedDataset)."""

import collections
from dataclasses import dataclass

import numpy as np
import torch


def pack_epoch(
    lengths, batch_tokens: int, n_bins: int, seed: int, epoch: int
) -> list[list[list[int]]]:
    """steps x bins x conversation indices: every conversation exactly once, no bin over batch_tokens, every bin
    non-empty at every step. n_bins: the bins of one global step, world_size x grad_accum (train.py; 1 for the
    held-out set). Deterministic in (seed, epoch): resume by skipping steps. Each step is a random
    sample of the epoch: a window from the front of a shuffled queue, placed first-fit-decreasing; what did not fit
    goes back to the front. Never sorted over the epoch: the loss is normalised by the global batch's weight, so a
    batch of one class alone (classes often differ in length) would cancel that class's weight."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) < n_bins:
        raise ValueError(f"{len(lengths)} conversations cannot give each of {n_bins} bins one")
    assert lengths.min() >= 1, "pack_epoch: an empty conversation"
    # the context was longer than a bin: prepare.check_context refuses it first
    if lengths.max() > batch_tokens:
        raise ValueError(
            f"--batch_tokens={batch_tokens}: a conversation of {lengths.max()} tokens does not fit one "
            f"bin: raise --batch_tokens to at least the context, or lower --max_seq_len to it"
        )
    queue = collections.deque(
        np.random.default_rng([seed, epoch]).permutation(len(lengths)).tolist()
    )
    length, steps = lengths.tolist(), []
    while queue:
        window, total = [], 0  # ~1.5 steps' worth of tokens, and a few conversations more than bins
        while queue and (total < 1.5 * n_bins * batch_tokens or len(window) < n_bins + 8):
            window.append(queue.popleft())
            total += length[window[-1]]
        bins, free, left = [[] for _ in range(n_bins)], [batch_tokens] * n_bins, set()
        for i in sorted(window, key=lambda i: -length[i]):  # first-fit decreasing
            b = next((b for b in range(n_bins) if free[b] >= length[i]), None)
            if b is None:
                left.add(i)
            else:
                bins[b].append(i)
                free[b] -= length[i]
        queue.extendleft(i for i in reversed(window) if i in left)  # front, in queue order
        steps.append(bins)
    # Only the last step can have empty bins (fewer conversations left than bins): each takes the shortest
    # conversation of the latest bin that holds two or more.
    for empty in [b for b in steps[-1] if not b]:
        donor = next((b for step in reversed(steps) for b in step if len(b) > 1), None)
        if donor is None:
            raise ValueError(
                f"{len(lengths)} conversations of up to {batch_tokens} tokens fill one bin each, "
                f"not a multiple of n_bins={n_bins}: use more data or larger bins"
            )
        shortest = min(donor, key=length.__getitem__)
        donor.remove(shortest)
        empty.append(shortest)
    return steps


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # (T,) int64 inputs, conversations end to end
    targets: torch.Tensor  # (T,) int64 the next token of each input
    loss_weights: torch.Tensor  # (T,) float32 weight of predicting each target
    position_ids: torch.Tensor  # (T,) int64, restarting at 0 for each conversation
    class_ids: torch.Tensor  # (T,) int64 class index of each token's conversation
    cu_seqlens: torch.Tensor  # (n+1,) int32 conversation boundaries
    max_seqlen: int

    def to(self, device) -> "PackedBatch":
        return PackedBatch(
            **{n: v.to(device) if torch.is_tensor(v) else v for n, v in vars(self).items()}
        )


def make_batch(dataset, indices) -> PackedBatch:
    """Pack conversations `indices` of a tokenized_data.TokenizedDataset: each of length L+1 gives L inputs, L targets
    (shifted by one)."""
    indices = np.asarray(indices, dtype=np.int64)
    assert len(indices), "make_batch: no conversations"
    starts = dataset.offsets[indices]
    lengths = dataset.offsets[indices + 1] - starts - 1  # (n,)
    cu_seqlens = np.cumsum(np.concatenate([[0], lengths]))
    position_ids = np.arange(cu_seqlens[-1]) - np.repeat(cu_seqlens[:-1], lengths)  # (T,)
    src = np.repeat(starts, lengths) + position_ids  # (T,) where each input sits in the flat arrays
    as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return PackedBatch(
        as_long(dataset.tokens[src]),
        as_long(dataset.tokens[src + 1]),
        torch.from_numpy(np.ascontiguousarray(dataset.weights[src + 1], dtype=np.float32)),
        as_long(position_ids),
        as_long(np.repeat(dataset.class_ids[indices], lengths)),
        torch.from_numpy(cu_seqlens.astype(np.int32)),
        int(lengths.max()),
    )
