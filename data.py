"""Data for C-RLFT: mixed-quality conversations -> class-conditioned, weighted, packed batches.

The chat template, token for token (TEMPLATES below spells each one; the tokenizer's special tokens choose):

    openchat_3.5  <s>[{system}<|end_of_turn|>]GPT4 Correct User: Hi<|end_of_turn|>
                  GPT4 Correct Assistant: Hello<|end_of_turn|>
    openchat_3.6  <|begin_of_text|>[<|start_header_id|>System<|end_header_id|>\n\n{system}<|eot_id|>]
                  <|start_header_id|>GPT4 Correct User<|end_header_id|>\n\nHi<|eot_id|>
                  <|start_header_id|>GPT4 Correct Assistant<|end_header_id|>\n\nHello<|eot_id|>

The condition names the conversation's class ("GPT4 Correct", "GPT3"): the policy learns pi(y | x, c). Every token
carries the weight of predicting it, C-RLFT's coarse reward: the class weight on assistant content and its end of
turn (so the model learns to stop), 0 elsewhere; a message's own "weight" (OpenChat's JSONL) overrides it. Records
come from chat_readers.py or toy_task.py; tokenized data is a few flat numpy arrays, memory-mapped; each step packs
conversations into world_size bins of `batch_tokens`. `python data.py tokenize|show ...`.
"""
import argparse
import collections
import contextlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

import chat_readers
import toy_task
from chat_readers import EXPERT_CONDITION, Conversation, DataError, check_messages  # noqa: F401 (re-exported)
from tokenizing import Tokenizer, default_tokenizer_path, open_tokenizer  # noqa: F401

TEMPLATE_VERSION = 3  # part of a prepared dataset's key: bump when the template or the weights change


# ----------------------------------------------------------------------------------------------- template
@dataclass(frozen=True)
class Template:
    header: str                # before each message's content: {role} is "{condition} {Role}", "GPT4 Correct User"
    end: str                   # the end-of-turn token after the content: an assistant's carries its weight
    after: str = ""            # text after the end token, weight 0
    system_role: bool = False  # the system prompt has a header of its own, role "System" with no condition
    add_end: bool = False      # a tokenizer without the end token gets it (at the first free id), as OpenChat's did

    def head(self, role: str, condition: str = "") -> str:
        """A header as a piece: without its closing space, which goes with the content (see `template`)."""
        return self.header.replace("{role}", f"{condition} {role}".strip()).removesuffix(" ")

    def specials(self) -> list[str]:
        return re.findall(r"<[^<>\s]+>", self.header + self.end + self.after)


# The templates, each spelled once as the text the model reads. Chosen by the first whose special tokens the
# tokenizer has (none: OpenChat 3.5, <|end_of_turn|> added), or by name (--template).
TEMPLATES = {
    "openchat_3.5": Template("{role}: ", "<|end_of_turn|>", add_end=True),  # system: "{system}<|end_of_turn|>"
    "openchat_3.6": Template("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", system_role=True),
    "openchat_3.5_gemma": Template("{role}: ", "<end_of_turn>"),  # OpenChat 3.5's, Gemma's end of turn
    # Ours: the idea of 3.6 on ChatML's tokens (SmolLM2, Qwen). OpenChat's chatml template drops the condition.
    "chatml": Template("<|im_start|>{role}\n", "<|im_end|>", after="\n", system_role=True),
}
CONTENT, MARKUP, TURN_END = "content", "markup", "turn end"  # how a piece is encoded: see `template`


def use_template(tokenizer: Tokenizer, name: str | None = None) -> Tokenizer:
    """Give `tokenizer` its chat template: `name`, else the first of TEMPLATES whose special tokens it has, else
    OpenChat 3.5 (add_end: its <|end_of_turn|> is added to the tokenizer)."""
    name = name or next((n for n, t in TEMPLATES.items()
                         if all(tokenizer.special_id(s) is not None for s in t.specials())), "openchat_3.5")
    if name not in TEMPLATES:
        raise ValueError(f"template {name!r}: not one of {', '.join(TEMPLATES)}")
    t = TEMPLATES[name]
    if t.add_end and tokenizer.special_id(t.end) is None:
        tokenizer.add_special(t.end)
    if missing := [s for s in t.specials() if tokenizer.special_id(s) is None]:
        raise ValueError(f"{tokenizer.path}: template {name!r} needs {', '.join(missing)}, which the tokenizer lacks")
    tokenizer.template, tokenizer.eot_id = name, tokenizer.special_id(t.end)
    # the ids it produces: the template's special tokens too
    tokenizer.vocab_size = max(tokenizer.vocab_size, *(tokenizer.special_id(s) + 1 for s in t.specials()))
    return tokenizer


def load_tokenizer(path: str | None = None, template: str | None = None) -> Tokenizer:
    """A tokenizer file or directory (tokenizing.open_tokenizer; default Mistral v1's) with its template."""
    return use_template(open_tokenizer(path), template)


def template(tokenizer: Tokenizer, messages, condition: str, system: str | None = None, weight: float = 1.0,
             generation_prompt: bool = False) -> list[tuple[str, float, str]]:
    """The tokenizer's template as (text, weight, kind) pieces, each encoded on its own: MARKUP (the template's text:
    special tokens in it are ids; a TURN_END closes an assistant turn) or CONTENT (special-token text in it stays text).
    A header's closing space ("GPT4 Correct User: Hi") is encoded with the content, the word start it is; a tokenizer
    that starts every text with its own word-start marker (sentencepiece's "▁") has it there already."""
    t = TEMPLATES[tokenizer.template]
    space = "" if tokenizer.word_start else " " * t.header.endswith(" ")

    def turn(head, content, w, end_kind):  # header (None: none), content, the end of turn and what follows it
        return ([(head, 0.0, MARKUP), (space + content, w, CONTENT)] if head is not None else [(content, w, CONTENT)]) \
            + [(t.end, w, end_kind)] + ([(t.after, 0.0, MARKUP)] if t.after else [])

    pieces = [(tokenizer.piece(tokenizer.bos_id), 0.0, MARKUP)] if tokenizer.bos_id is not None else []
    if system is not None:
        pieces += turn(t.head("System") if t.system_role else None, system, 0.0, MARKUP)
    for m in messages:
        w = float(m.get("weight", weight if m["role"] == "assistant" else 0.0))
        pieces += turn(t.head(m["role"].title(), condition), m["content"], w,
                       TURN_END if m["role"] == "assistant" else MARKUP)
    return pieces + ([(t.head("Assistant", condition), 0.0, MARKUP)] if generation_prompt else [])


def _encode(tokenizer: Tokenizer, conversations: list[list]) -> list[tuple[np.ndarray, np.ndarray, list[int]]]:
    """Each conversation's template pieces -> (tokens (L,) int32, weights (L,) float32, token count after each
    assistant turn: where a long conversation may be cut). All content of the batch is encoded in one call."""
    contents = iter(tokenizer.encode_batch([text for pieces in conversations for text, _, kind in pieces
                                            if kind == CONTENT]))
    markup, out = {}, []  # markup: the template's few distinct pieces, each encoded once
    for pieces in conversations:
        for text, _, kind in pieces:
            if kind != CONTENT and text not in markup:
                markup[text] = np.array(tokenizer.encode_special(text), np.int32)
        ids = [next(contents) if kind == CONTENT else markup[text] for text, _, kind in pieces]
        lengths = [len(i) for i in ids]
        out.append((np.concatenate(ids), np.repeat(np.array([w for _, w, _ in pieces], np.float32), lengths),
                    [int(e) for e, (_, _, kind) in zip(np.cumsum(lengths), pieces) if kind == TURN_END]))
    return out


def encode_conversation(tokenizer: Tokenizer, messages, condition: str, system: str | None = None,
                        weight: float = 1.0) -> tuple[list[int], list[float]]:
    """Tokens and weights[i], the weight of predicting tokens[i]; `weight` is the class weight."""
    check_messages(messages)
    tokens, weights, _ = _encode(tokenizer, [template(tokenizer, messages, condition, system, weight)])[0]
    return tokens.tolist(), weights.tolist()


def encode_prompt(tokenizer: Tokenizer, messages, condition: str, system: str | None = None) -> list[int]:
    """The history, then the assistant's header with nothing after it: what the model continues."""
    check_messages(messages, need_assistant=False)
    return _encode(tokenizer, [template(tokenizer, messages, condition, system, generation_prompt=True)])[0][0].tolist()


# ------------------------------------------------------------------------------------------- tokenization
@dataclass
class TokenizedDataset:
    tokens: np.ndarray        # (N,) int32: every conversation's tokens, end to end
    weights: np.ndarray       # (N,) float32: weight of predicting tokens[i]
    offsets: np.ndarray       # (n+1,) int64: conversation i is tokens[offsets[i]:offsets[i+1]]
    class_ids: np.ndarray     # (n,) int32: index into class_names
    class_names: list[str]
    meta: dict = field(default_factory=dict)  # tokenizer, max_seq_len, summary
    ARRAYS = ("tokens", "weights", "offsets", "class_ids")

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
            raise DataError(os.path.join(directory, "meta.json"),
                            f"not a tokenized dataset (`python data.py tokenize`): {type(e).__name__}") from None
        arrays = {n: np.load(os.path.join(directory, f"{n}.npy"), mmap_mode="r") for n in cls.ARRAYS}
        return cls(**arrays, class_names=meta.pop("class_names"), meta=meta)


def tokenize_dataset(conversations: list[Conversation], tokenizer: Tokenizer, max_seq_len: int = 8192,
                     class_weights: dict[str, float] | None = None, workers: int | None = None,
                     progress: bool = False) -> TokenizedDataset:
    """Encode and weight every conversation (a message's own "weight", else class_weights[class]; None: 1.0 for all,
    plain SFT), cut its trailing zero-weight tokens and fit it to the context: a conversation longer than max_seq_len
    + 1 keeps its leading turns up to the last assistant turn that fits, or is dropped (counted in meta["summary"]).
    Chunks of CHUNK conversations go to `workers` processes (default: one per core, up to 8)."""
    from tqdm import tqdm

    class_names = sorted({c.class_name for c in conversations})
    chunks = [(conversations[s:s + CHUNK], s, max_seq_len, class_weights, class_names)
              for s in range(0, len(conversations), CHUNK)]
    workers = min(workers or os.cpu_count() or 1, 8, len(chunks))
    parts, dropped = [], collections.Counter()
    # fork: workers start at once, without importing torch again (spawn where fork is missing)
    pool = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(
        workers, _start_worker, (tokenizer,)) if workers > 1 else None
    # disable=None: a bar on a terminal only, so that logs and piped stderr hold messages, not bar frames
    bar = tqdm(total=len(conversations), disable=None if progress else True, unit="conv", desc="tokenize")
    with pool or contextlib.nullcontext(), bar:  # a Pool's exit terminates its workers, on errors too
        for chunk, result in zip(chunks, pool.imap(_tokenize_chunk, chunks) if pool else
                                 (_tokenize_chunk(c, tokenizer) for c in chunks)):
            parts += result[0]
            dropped.update(result[1])
            bar.update(len(chunk[0]))
    if not parts:
        raise DataError("tokenize_dataset", f"no conversation left ({dict(dropped)})", "empty")
    offsets = np.cumsum([0] + [len(t) for t, _, _ in parts], dtype=np.int64)
    data = TokenizedDataset(np.concatenate([t for t, _, _ in parts]), np.concatenate([w for _, w, _ in parts]),
                            offsets, np.array([c for _, _, c in parts], np.int32), class_names)
    data.meta = {"tokenizer": tokenizer.path, "template": tokenizer.template, "vocab_size": tokenizer.vocab_size,
                 "bos_id": tokenizer.bos_id, "eot_id": tokenizer.eot_id, "max_seq_len": max_seq_len,
                 "summary": _summary(data, len(conversations), dropped)}
    return data


CHUNK = 256  # conversations per call of the tokenizer (and per task of a worker)
_worker_tokenizer: Tokenizer | None = None  # each worker process's own copy


def _start_worker(tokenizer: Tokenizer) -> None:
    """Forked: the parent's tokenizer as it is; spawned: rebuilt from its files and added tokens (its pickle)."""
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    tokenizer.one_thread()


def _tokenize_chunk(job, tokenizer: Tokenizer | None = None):
    """-> ([(tokens, weights, class id)], Counter of drops and truncations)."""
    conversations, start, max_seq_len, class_weights, class_names = job
    # The records were checked where they came in (chat_readers.py, toy_task.py): not again here, per message.
    tokenizer = tokenizer or _worker_tokenizer
    pieces = [template(tokenizer, c.messages, c.condition, c.system,
                       _class_weight(c, class_weights, c.source or f"conversation {start + k}"))
              for k, c in enumerate(conversations)]
    parts, counts = [], collections.Counter()
    for c, (tokens, weights, turn_ends) in zip(conversations, _encode(tokenizer, pieces)):
        n, why = _fit(weights, turn_ends, max_seq_len)
        if why:
            counts[why] += 1
        if n:
            parts.append((tokens[:n], weights[:n], class_names.index(c.class_name)))
    return parts, counts


def _class_weight(c: Conversation, class_weights, where: str = "") -> float:
    if class_weights is None:
        return 1.0
    if c.class_name in class_weights:
        return class_weights[c.class_name]
    if all("weight" in m for m in c.messages if m["role"] == "assistant"):
        return 0.0  # never used: every assistant message brings its own weight
    raise DataError(where or c.source, f"class {c.class_name!r} has no weight (class weights: {class_weights})",
                    "class without weight")


def _fit(weights: np.ndarray, turn_ends: list[int], max_seq_len: int) -> tuple[int, str | None]:
    """(tokens to keep, None | "truncated" | why it is dropped): a conversation of n tokens is n - 1 inputs."""
    supervised = np.flatnonzero(weights)
    if len(supervised) == 0:
        return 0, "no supervised tokens (all weights 0)"
    if supervised[-1] <= max_seq_len:
        return int(supervised[-1]) + 1, None
    ends = [e for e in turn_ends if e - 1 <= max_seq_len]
    supervised = supervised[supervised < (ends[-1] if ends else 0)]
    if len(supervised) == 0:
        return 0, "its first exchange is longer than the context"
    return int(supervised[-1]) + 1, "truncated"


def _summary(data: TokenizedDataset, n_in: int, dropped) -> dict:
    token_class = np.repeat(data.class_ids, np.diff(data.offsets))  # (N,) class of each token
    n = len(data.class_names)
    conversations, supervised = np.bincount(data.class_ids, minlength=n), np.bincount(token_class[data.weights > 0],
                                                                                      minlength=n)
    weight_sums = np.bincount(token_class, weights=data.weights.astype(np.float64), minlength=n)
    classes = {name: {"conversations": int(conversations[i]), "supervised_tokens": int(supervised[i]),
                      "weight_sum": float(weight_sums[i])} for i, name in enumerate(data.class_names)}
    return {"conversations_in": n_in, "conversations": len(data), "tokens": int(len(data.tokens)),
            "truncated_to_context": dropped.pop("truncated", 0), "dropped": dict(dropped), "classes": classes}


def load_conversations(sources: str, condition: str | None = EXPERT_CONDITION, skip_bad: bool = False,
                       stats: collections.Counter | None = None, toy: tuple = (20_000, 0.02, 0, 1.0)):
    """The one source loader of train.py and `python data.py`: "toy" (toy_task.py; toy = (n, expert fraction,
    seed, error rate)) or chat_readers.py's comma-separated [CLASS=]path list ("from_model": ShareGPT's field)."""
    if sources == "toy":
        return toy_task.make_toy_conversations(toy[0], toy[1], toy[2], sub_optimal_error=toy[3])
    return chat_readers.read_sources(sources, None if condition == "from_model" else condition, skip_bad, stats)


def split_holdout(class_ids, fraction: float, max_conversations: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices), sorted: per class a random (seeded) round(fraction * n), so every
    class is validated; the total capped at max_conversations by scaling every class's share alike."""
    class_ids = np.asarray(class_ids)
    shares = np.floor(np.bincount(class_ids, minlength=1) * fraction + 0.5)
    if shares.sum() > max_conversations:
        shares = np.floor(shares * max_conversations / shares.sum())
    rng = np.random.default_rng([seed, 0xC1A55])
    held_out = np.sort(np.concatenate([rng.choice(np.flatnonzero(class_ids == c), int(k), replace=False)
                                       for c, k in enumerate(shares)])).astype(np.int64)
    return np.setdiff1d(np.arange(len(class_ids)), held_out), held_out


def one_line(error: BaseException | str) -> str:
    """An error as the one line a user sees: messages from elsewhere (the OS, sentencepiece) folded."""
    return " ".join(str(error).splitlines())


# ------------------------------------------------------------------------------------------------ packing
def pack_epoch(lengths, batch_tokens: int, world_size: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """steps x ranks x conversation indices: every conversation exactly once, no bin over batch_tokens, every rank
    a non-empty bin at every step. Deterministic in (seed, epoch): resume by skipping steps. Each step is a random
    sample of the epoch: a window from the front of a shuffled queue, placed first-fit-decreasing; what did not fit
    goes back to the front. Never sorted over the epoch: the loss is normalised by the global batch's weight, so a
    batch of one class alone (classes often differ in length) would cancel that class's weight."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) < world_size:
        raise ValueError(f"{len(lengths)} conversations cannot give each of {world_size} ranks a bin")
    if len(bad := np.flatnonzero((lengths < 1) | (lengths > batch_tokens))):
        raise ValueError(f"conversation {bad[0]} has length {lengths[bad[0]]}, outside [1, batch_tokens="
                         f"{batch_tokens}]: truncate to the context first (tokenize_dataset's max_seq_len)")
    queue = collections.deque(np.random.default_rng([seed, epoch]).permutation(len(lengths)).tolist())
    length, steps = lengths.tolist(), []
    while queue:
        window, total = [], 0  # ~1.5 steps' worth of tokens, and a few conversations more than bins
        while queue and (total < 1.5 * world_size * batch_tokens or len(window) < world_size + 8):
            window.append(queue.popleft())
            total += length[window[-1]]
        bins, free, left = [[] for _ in range(world_size)], [batch_tokens] * world_size, set()
        for i in sorted(window, key=lambda i: -length[i]):  # first-fit decreasing
            b = next((b for b in range(world_size) if free[b] >= length[i]), None)
            if b is None:
                left.add(i)
            else:
                bins[b].append(i)
                free[b] -= length[i]
        queue.extendleft(i for i in reversed(window) if i in left)  # front, in queue order
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

    def to(self, device) -> "PackedBatch":
        return PackedBatch(**{n: v.to(device) if torch.is_tensor(v) else v for n, v in vars(self).items()})


def make_batch(dataset: TokenizedDataset, indices) -> PackedBatch:
    """Pack conversations `indices`: each of length L+1 gives L inputs, L targets (shifted by one)."""
    indices = np.asarray(indices, dtype=np.int64)
    assert len(indices), "make_batch: no conversations"
    starts = dataset.offsets[indices]
    lengths = dataset.offsets[indices + 1] - starts - 1  # (n,)
    cu_seqlens = np.cumsum(np.concatenate([[0], lengths]))
    position_ids = np.arange(cu_seqlens[-1]) - np.repeat(cu_seqlens[:-1], lengths)  # (T,)
    src = np.repeat(starts, lengths) + position_ids  # (T,) where each input sits in the flat arrays
    as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return PackedBatch(as_long(dataset.tokens[src]), as_long(dataset.tokens[src + 1]),
                       torch.from_numpy(np.ascontiguousarray(dataset.weights[src + 1], dtype=np.float32)),
                       as_long(position_ids), as_long(np.repeat(dataset.class_ids[indices], lengths)),
                       torch.from_numpy(cu_seqlens.astype(np.int32)), int(lengths.max()))


# ---------------------------------------------------------------------------------------------------- CLI
def _show(c: Conversation, tokenizer: Tokenizer, class_weights) -> None:
    tokens, weights = encode_conversation(tokenizer, c.messages, c.condition, c.system, _class_weight(c, class_weights))
    print(f"{c.source}  class {c.class_name!r}  condition {c.condition!r}  {len(tokens)} tokens, "
          f"{sum(w > 0 for w in weights)} supervised")
    grey, green, reset = ("\033[90m", "\033[32m", "\033[0m") if sys.stdout.isatty() else ("", "", "")
    for w, run in itertools.groupby(zip(tokens, weights), key=lambda tw: tw[1]):  # grey: not trained on; green: is
        print(f"{green if w else grey}weight {w:<5g} " + "".join(f"[{tokenizer.piece(t)}]" for t, _ in run) + reset)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("tokenize", "show"):
        p = commands.add_parser(name)
        p.add_argument("--input", required=True, help="comma-separated sources, each [CLASS=]path: .jsonl "
                       "(ours, OpenChat's), .json (ShareGPT), 'sharegpt' (the package's file); or 'toy'")
        p.add_argument("--tokenizer", help="tokenizer.json, sentencepiece tokenizer.model or a model directory "
                       "(default: Mistral v1's; toy's for toy)")
        p.add_argument("--template", choices=list(TEMPLATES), help="default: chosen by the tokenizer's special tokens")
        p.add_argument("--class-weights", type=chat_readers.parse_class_weights, help='e.g. "GPT4 Correct=1,GPT3=0.1"')
        p.add_argument("--condition", default=EXPERT_CONDITION, help="condition of ShareGPT sources without a class")
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
        toy = args.input == "toy"
        tokenizer = load_tokenizer(args.tokenizer or (toy_task.TOKENIZER_PATH if toy else None), args.template)
        conversations = load_conversations(args.input, "from_model" if args.condition_from_model else args.condition,
                                           args.skip_bad, stats, toy=(args.toy_n, 0.02, args.seed, 1.0))
        class_weights = args.class_weights or (toy_task.CLASS_WEIGHTS if toy else None)
        if args.command == "show":
            if not 0 <= args.index < len(conversations):
                raise DataError(args.input, f"--index {args.index}: there are {len(conversations)} conversations")
            return _show(conversations[args.index], tokenizer, class_weights)
        data = tokenize_dataset(conversations, tokenizer, args.max_seq_len, class_weights, progress=True)
        data.meta["summary"]["read"] = dict(stats)
        data.save(args.out)
    except (ValueError, OSError, ImportError) as e:  # bad input (or sharegpt's package missing): one line
        hint = "" if args.skip_bad or not isinstance(e, DataError) else " (--skip-bad skips and counts bad records)"
        print(f"error: {one_line(e)}{hint}", file=sys.stderr)
        raise SystemExit(1)
    print(json.dumps(data.meta["summary"], indent=1))
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
