"""A tokenized dataset as data.tokenize_dataset leaves it: every conversation's tokens and weights end to end in a
few flat numpy arrays, memory-mapped when loaded (`TokenizedDataset`, one directory: `python data_cli.py tokenize`),
what a conversation keeps when it is longer than the context (`fit_to_context`) and what tokenization counted per
class (`summarize`: the start-up summary's figures)."""

import collections
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np

from chat_readers import DataError


@dataclass
class TokenizedDataset:
    tokens: np.ndarray  # (N,) int32: every conversation's tokens, end to end
    weights: np.ndarray  # (N,) float32: weight of predicting tokens[i]
    offsets: np.ndarray  # (n+1,) int64: conversation i is tokens[offsets[i]:offsets[i+1]]
    class_ids: np.ndarray  # (n,) int32: index into class_names
    class_names: list[str]
    meta: dict = field(default_factory=dict)  # tokenizer, max_seq_len, summary
    ARRAYS = ("tokens", "weights", "offsets", "class_ids")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    # (n,) tokens each conversation takes in a pack: inputs are shifted
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets) - 1

    def save(self, directory: str) -> None:
        """Written beside `directory` and renamed into place: a crash or an error never leaves half a dataset."""
        directory = os.path.abspath(directory)
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        tmp = tempfile.mkdtemp(
            prefix=f".{os.path.basename(directory)}.tmp-", dir=os.path.dirname(directory)
        )
        try:
            for name in self.ARRAYS:
                np.save(os.path.join(tmp, f"{name}.npy"), getattr(self, name))
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({"class_names": self.class_names, **self.meta}, f, indent=1)
            shutil.rmtree(directory, ignore_errors=True)  # an earlier preparation from other inputs
            os.rename(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, directory: str) -> "TokenizedDataset":
        try:
            with open(os.path.join(directory, "meta.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(
                os.path.join(directory, "meta.json"),
                f"not a tokenized dataset (`python data_cli.py tokenize`): {type(e).__name__}",
            ) from None
        arrays = {
            n: np.load(os.path.join(directory, f"{n}.npy"), mmap_mode="r") for n in cls.ARRAYS
        }
        return cls(**arrays, class_names=meta.pop("class_names"), meta=meta)


def fit_to_context(
    weights: np.ndarray, turn_ends: list[int], max_seq_len: int
) -> tuple[int, str | None]:
    """(tokens to keep, None | "truncated" | why it is dropped): a conversation of n tokens is n - 1 inputs."""
    supervised = np.flatnonzero(weights)
    if len(supervised) == 0:
        return 0, NOTHING_TO_LEARN
    if supervised[-1] <= max_seq_len:
        return int(supervised[-1]) + 1, None
    ends = [e for e in turn_ends if e - 1 <= max_seq_len]
    supervised = supervised[supervised < (ends[-1] if ends else 0)]
    if len(supervised) == 0:
        return 0, TOO_LONG
    return int(supervised[-1]) + 1, "truncated"


NOTHING_TO_LEARN = "no supervised tokens (all weights 0)"
TOO_LONG = "its first exchange is longer than the context"


def summarize(data: TokenizedDataset, n_in: int, counts) -> dict:
    """Totals, and per class: conversations, supervised tokens and replies, sum(w), what was dropped (per reason),
    truncated, and how many replies (and their tokens) --zero_refusals set to 0."""
    token_class = np.repeat(data.class_ids, np.diff(data.offsets))  # (N,) class of each token
    n = len(data.class_names)
    conversations, supervised = (
        np.bincount(data.class_ids, minlength=n),
        np.bincount(token_class[data.weights > 0], minlength=n),
    )
    weight_sums = np.bincount(token_class, weights=data.weights.astype(np.float64), minlength=n)
    dropped = {
        name: {
            why: k
            for (why, c), k in counts.items()
            if c == name and why in (NOTHING_TO_LEARN, TOO_LONG) and k
        }
        for name in data.class_names
    }
    classes = {
        name: {
            "conversations": int(conversations[i]),
            "supervised_tokens": int(supervised[i]),
            "weight_sum": float(weight_sums[i]),
            "replies": counts["replies", name],
            "supervised_replies": counts["supervised replies", name],
            "dropped": dropped[name],
            "truncated": counts["truncated", name],
            "refusals_zeroed": counts["refusals zeroed", name],
            "refusal_tokens_zeroed": counts["refusal tokens zeroed", name],
        }
        for i, name in enumerate(data.class_names)
    }
    total = collections.Counter()
    for c in dropped.values():
        total.update(c)
    return {
        "conversations_in": n_in,
        "conversations": len(data),
        "tokens": int(len(data.tokens)),
        "truncated_to_context": sum(c["truncated"] for c in classes.values()),
        "dropped": dict(total),
        "classes": classes,
    }
