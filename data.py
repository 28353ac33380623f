"""Data for C-RLFT: mixed-quality conversations -> class-conditioned, weighted, packed batches.

The chat template, token for token (TEMPLATES below spells each one; the tokenizer's special tokens choose):

    openchat_3.5  <s>[{system}<|end_of_turn|>]GPT4 Correct User: Hi<|end_of_turn|>
                  GPT4 Correct Assistant: Hello<|end_of_turn|>
    openchat_3.6  <|begin_of_text|>[<|start_header_id|>System<|end_header_id|>\n\n{system}<|eot_id|>]
                  <|start_header_id|>GPT4 Correct User<|end_header_id|>\n\nHi<|eot_id|>
                  <|start_header_id|>GPT4 Correct Assistant<|end_header_id|>\n\nHello<|eot_id|>

The condition names the conversation's class ("GPT4 Correct", "GPT3"): the policy learns pi(y | x, c). Every token
carries the weight of predicting it, C-RLFT's coarse reward: the class weight on assistant content and its end of
turn (so the model learns to stop), 0 elsewhere; a message's own "weight" (OpenChat's JSONL) overrides it; OpenChat's
options (refusals at weight 0, per-sequence weights) are loss_weighting.py's. Records come from chat_readers.py or
toy_task.py; a tokenized dataset is a few flat numpy arrays, memory-mapped (tokenized_data.py); each step packs
conversations into bins of `batch_tokens` (packing.py). Its command line: `python data_cli.py tokenize|show ...`.
"""

import collections
import contextlib
import multiprocessing
import os
import re
import sys
from dataclasses import dataclass

import numpy as np

import chat_sources
import loss_weighting
import tokenized_data
import toy_task
from chat_readers import EXPERT_CONDITION, Conversation, DataError, check_messages
from tokenizing import Tokenizer, open_tokenizer

# part of a prepared dataset's key: bump when the template or the weights change
TEMPLATE_VERSION = 3


# ----------------------------------------------------------------------------------------------- template
@dataclass(frozen=True)
class Template:
    # before each message's content: {role} is "{condition} {Role}", "GPT4 Correct User"
    header: str
    # the end-of-turn token after the content: an assistant's carries its weight
    end: str
    after: str = ""  # text after the end token, weight 0
    # the system prompt has a header of its own, role "System" with no condition
    system_role: bool = False
    # a tokenizer without the end token gets it (at the first free id), as OpenChat's did
    add_end: bool = False

    def head(self, role: str, condition: str = "") -> str:
        """A header as a piece: without its closing space, which goes with the content (see `template`)."""
        return self.header.replace("{role}", f"{condition} {role}".strip()).removesuffix(" ")

    def specials(self) -> list[str]:
        return re.findall(r"<[^<>\s]+>", self.header + self.end + self.after)


# The templates, each spelled once as the text the model reads. Chosen by the first whose special tokens the
# tokenizer has (none: OpenChat 3.5, <|end_of_turn|> added), or by name (--template).
TEMPLATES = {
    # system: "{system}<|end_of_turn|>"
    "openchat_3.5": Template("{role}: ", "<|end_of_turn|>", add_end=True),
    "openchat_3.6": Template(
        "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", system_role=True
    ),
    # OpenChat 3.5's, Gemma's end of turn
    "openchat_3.5_gemma": Template("{role}: ", "<end_of_turn>"),
    # Ours: the idea of 3.6 on ChatML's tokens (SmolLM2, Qwen). OpenChat's chatml template drops the condition.
    "chatml": Template("<|im_start|>{role}\n", "<|im_end|>", after="\n", system_role=True),
}
# how a piece is encoded: see `template`
CONTENT, MARKUP, TURN_END = "content", "markup", "turn end"


def use_template(tokenizer: Tokenizer, name: str | None = None) -> Tokenizer:
    """Give `tokenizer` its chat template: `name`, else the first of TEMPLATES whose special tokens it has, else
    OpenChat 3.5 (add_end: its <|end_of_turn|> is added to the tokenizer)."""
    name = name or next(
        (
            n
            for n, t in TEMPLATES.items()
            if all(tokenizer.special_id(s) is not None for s in t.specials())
        ),
        "openchat_3.5",
    )
    if name not in TEMPLATES:
        raise ValueError(f"template {name!r}: not one of {', '.join(TEMPLATES)}")
    t = TEMPLATES[name]
    if t.add_end and tokenizer.special_id(t.end) is None:
        tokenizer.add_special(t.end)
    if missing := [s for s in t.specials() if tokenizer.special_id(s) is None]:
        raise ValueError(
            f"{tokenizer.path}: template {name!r} needs {', '.join(missing)}, which the tokenizer lacks"
        )
    tokenizer.template, tokenizer.eot_id = name, tokenizer.special_id(t.end)
    # the ids it produces: the template's special tokens too
    tokenizer.vocab_size = max(
        tokenizer.vocab_size, *(tokenizer.special_id(s) + 1 for s in t.specials())
    )
    return tokenizer


def load_tokenizer(path: str | None = None, template: str | None = None) -> Tokenizer:
    """A tokenizer file or directory (tokenizing.open_tokenizer; default Mistral v1's) with its template."""
    return use_template(open_tokenizer(path), template)


def template(
    tokenizer: Tokenizer,
    messages,
    condition: str,
    system: str | None = None,
    weight: float = 1.0,
    generation_prompt: bool = False,
) -> list[tuple[str, float, str]]:
    """The tokenizer's template as (text, weight, kind) pieces, each encoded on its own: MARKUP (the template's text:
    special tokens in it are ids; a TURN_END closes an assistant turn) or CONTENT (special-token text in it stays text).
    A header's closing space ("GPT4 Correct User: Hi") is encoded with the content, the word start it is; a tokenizer
    that starts every text with its own word-start marker (sentencepiece's "▁") has it there already."""
    t = TEMPLATES[tokenizer.template]
    space = "" if tokenizer.word_start else " " * t.header.endswith(" ")

    # header (None: none), content, the end of turn and what follows it
    def turn(head, content, w, end_kind):
        if head is None:
            pieces = [(content, w, CONTENT)]
        else:
            pieces = [(head, 0.0, MARKUP), (space + content, w, CONTENT)]
        # an assistant's end of turn carries its weight: the model learns to stop
        pieces.append((t.end, w, end_kind))
        if t.after:
            pieces.append((t.after, 0.0, MARKUP))
        return pieces

    pieces = (
        [(tokenizer.piece(tokenizer.bos_id), 0.0, MARKUP)] if tokenizer.bos_id is not None else []
    )
    if system is not None:
        pieces += turn(t.head("System") if t.system_role else None, system, 0.0, MARKUP)
    for m in messages:
        # The class weight on assistant content, 0 on the user's. A message's own "weight" (OpenChat's JSONL) is its
        # weight: train.py refuses a --class_weights that disagrees with it (prepare.check_own_weights).
        if "weight" in m:
            w = float(m["weight"])
        else:
            w = weight if m["role"] == "assistant" else 0.0
        pieces += turn(
            t.head(m["role"].title(), condition),
            m["content"],
            w,
            TURN_END if m["role"] == "assistant" else MARKUP,
        )
    return pieces + ([(t.head("Assistant", condition), 0.0, MARKUP)] if generation_prompt else [])


def encode_pieces(
    tokenizer: Tokenizer, conversations: list[list], per_sequence: bool = False
) -> list[tuple]:
    """Each conversation's template pieces -> (tokens (L,) int32, weights (L,) float32, [(token count after an
    assistant turn: where a long conversation may be cut, that turn's tokens: content and end)]). The one place
    where a message's weight becomes its tokens': per_sequence divides it by their count (loss_weighting.py).
    All content of the batch is encoded in one call."""
    contents = iter(
        tokenizer.encode_batch(
            [text for pieces in conversations for text, _, kind in pieces if kind == CONTENT]
        )
    )
    markup, out = {}, []  # markup: the template's few distinct pieces, each encoded once
    for pieces in conversations:
        for text, _, kind in pieces:
            if kind != CONTENT and text not in markup:
                markup[text] = np.array(tokenizer.encode_special(text), np.int32)
        # each piece's token ids: content from the batch encode, in order; markup from the table
        ids = []
        for text, _, kind in pieces:
            ids.append(next(contents) if kind == CONTENT else markup[text])
        lengths, weights = [len(i) for i in ids], np.array([w for _, w, _ in pieces], np.float32)
        # each after its content piece
        ends = [j for j, (_, _, kind) in enumerate(pieces) if kind == TURN_END]
        if per_sequence:
            weights = loss_weighting.per_sequence(weights, lengths, ends)
        cumulative = np.cumsum(lengths)
        out.append(
            (
                np.concatenate(ids),
                np.repeat(weights, lengths),
                [(int(cumulative[j]), lengths[j - 1] + lengths[j]) for j in ends],
            )
        )
    return out


def encode_conversation(
    tokenizer: Tokenizer,
    messages,
    condition: str,
    system: str | None = None,
    weight: float = 1.0,
    per_sequence: bool = False,
) -> tuple[list[int], list[float]]:
    """Tokens and weights[i], the weight of predicting tokens[i]; `weight` is the class weight."""
    check_messages(messages)
    tokens, weights, _ = encode_pieces(
        tokenizer, [template(tokenizer, messages, condition, system, weight)], per_sequence
    )[0]
    return tokens.tolist(), weights.tolist()


def encode_prompt(
    tokenizer: Tokenizer, messages, condition: str, system: str | None = None
) -> list[int]:
    """The history, then the assistant's header with nothing after it: what the model continues."""
    check_messages(messages, need_assistant=False)
    return encode_pieces(
        tokenizer, [template(tokenizer, messages, condition, system, generation_prompt=True)]
    )[0][0].tolist()


# ------------------------------------------------------------------------------------------- tokenization
def tokenize_dataset(
    conversations: list[Conversation],
    tokenizer: Tokenizer,
    max_seq_len: int = 8192,
    class_weights: dict[str, float] | None = None,
    workers: int | None = None,
    progress: bool = False,
    per_sequence: bool = False,
) -> tokenized_data.TokenizedDataset:
    """Encode and weight every conversation (a message's own "weight", else class_weights[class]; None: 1.0 for all,
    plain SFT; per_sequence: divided by each reply's length), cut its trailing zero-weight tokens and fit it to the
    context: a conversation longer than max_seq_len + 1 keeps its leading turns up to the last assistant turn that
    fits, or is dropped (counted per class in meta["summary"]). Chunks of CHUNK conversations go to `workers`
    processes (default: one per core, up to 8)."""
    from tqdm import tqdm

    class_names = sorted({c.class_name for c in conversations})
    chunks = [
        (conversations[s : s + CHUNK], s, max_seq_len, class_weights, class_names, per_sequence)
        for s in range(0, len(conversations), CHUNK)
    ]
    workers = min(workers or os.cpu_count() or 1, 8, len(chunks))
    parts, counts = [], collections.Counter()
    # fork: workers start at once, without importing torch again (spawn where fork is missing)
    pool = (
        multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(
            workers, _start_worker, (tokenizer,)
        )
        if workers > 1
        else None
    )
    # disable=None: a bar on a terminal only, so that logs and piped stderr hold messages, not bar frames
    bar = tqdm(
        total=len(conversations), disable=None if progress else True, unit="conv", desc="tokenize"
    )
    # a Pool's exit terminates its workers, on errors too
    with pool or contextlib.nullcontext(), bar:
        for chunk, result in zip(
            chunks,
            pool.imap(_tokenize_chunk, chunks)
            if pool
            else (_tokenize_chunk(c, tokenizer) for c in chunks),
        ):
            parts += result[0]
            counts.update(result[1])
            bar.update(len(chunk[0]))
    if not parts:
        dropped = collections.Counter()
        for (why, _), n in counts.items():
            if why in (tokenized_data.NOTHING_TO_LEARN, tokenized_data.TOO_LONG):
                dropped[why] += n
        raise DataError("--data", f"no conversation left to train on ({dict(dropped)})", "empty")
    offsets = np.cumsum([0] + [len(t) for t, _, _ in parts], dtype=np.int64)
    data = tokenized_data.TokenizedDataset(
        np.concatenate([t for t, _, _ in parts]),
        np.concatenate([w for _, w, _ in parts]),
        offsets,
        np.array([c for _, _, c in parts], np.int32),
        class_names,
    )
    data.meta = {
        "tokenizer": tokenizer.path,
        "template": tokenizer.template,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eot_id": tokenizer.eot_id,
        "max_seq_len": max_seq_len,
        "class_weights": class_weights,
        "per_sequence_weights": per_sequence,
        "summary": tokenized_data.summarize(data, len(conversations), counts),
    }
    return data


CHUNK = 256  # conversations per call of the tokenizer (and per task of a worker)
_worker_tokenizer: Tokenizer | None = None  # each worker process's own copy


def _start_worker(tokenizer: Tokenizer) -> None:
    """Forked: the parent's tokenizer as it is; spawned: rebuilt from its files and added tokens (its pickle)."""
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    tokenizer.one_thread()


def _tokenize_chunk(job, tokenizer: Tokenizer | None = None):
    """-> ([(tokens, weights, class id)], Counter of (what, class): drops, truncations, replies and refusals)."""
    conversations, start, max_seq_len, class_weights, class_names, per_sequence = job
    # The records were checked where they came in (chat_readers.py, toy_task.py): not again here, per message.
    tokenizer = tokenizer or _worker_tokenizer
    pieces = [
        template(
            tokenizer,
            c.messages,
            c.condition,
            c.system,
            class_weight(c, class_weights, c.source or f"conversation {start + k}"),
        )
        for k, c in enumerate(conversations)
    ]
    parts, counts = [], collections.Counter()
    for c, (tokens, weights, turns) in zip(
        conversations, encode_pieces(tokenizer, pieces, per_sequence)
    ):
        n, why = tokenized_data.fit_to_context(weights, [end for end, _ in turns], max_seq_len)
        if why:
            counts[why, c.class_name] += 1
        counts["replies", c.class_name] += len(turns)
        counts["supervised replies", c.class_name] += sum(
            int(end <= n and weights[end - 1] > 0) for end, _ in turns
        )
        counts["refusals zeroed", c.class_name] += len(c.refusals)
        counts["refusal tokens zeroed", c.class_name] += sum(turns[k][1] for k in c.refusals)
        if n:
            parts.append((tokens[:n], weights[:n], class_names.index(c.class_name)))
    return parts, counts


def class_weight(c: Conversation, class_weights, where: str = "") -> float:
    if class_weights is None:
        return 1.0
    if c.class_name in class_weights:
        return class_weights[c.class_name]
    if all("weight" in m for m in c.messages if m["role"] == "assistant"):
        return 0.0  # never used: every assistant message brings its own weight
    raise DataError(
        where or c.source,
        f"class {c.class_name!r} has no weight in --class_weights "
        f"({', '.join(map(repr, class_weights))}): add it, or give the source a class, CLASS=path",
        "class without weight",
    )


def load_conversations(
    sources: str,
    condition: str | None = EXPERT_CONDITION,
    skip_bad: bool = False,
    stats: collections.Counter | None = None,
    toy: tuple = (20_000, 0.02, 0, 1.0),
    classes: tuple[str, list] | None = None,
    refusals: tuple[str, ...] | None = None,
):
    """The one source loader of train.py and `python data.py`: "toy" (toy_task.py; toy = (n, expert fraction,
    seed, error rate)) or chat_readers.py's comma-separated [CLASS=]path list (`classes`: ShareGPT's records classed
    by a field; condition "from_model": by "model", the default map); `refusals`: phrases whose replies get weight 0."""
    if sources == "toy":
        conversations = toy_task.make_toy_conversations(
            toy[0], toy[1], toy[2], sub_optimal_error=toy[3]
        )
    else:
        conversations = chat_sources.read_sources(
            sources, None if condition == "from_model" else condition, skip_bad, stats, classes
        )
    return (
        conversations if refusals is None else loss_weighting.zero_refusals(conversations, refusals)
    )


def split_holdout(
    class_ids, fraction: float, max_conversations: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices), sorted: per class a random (seeded) round(fraction * n), so every
    class is validated; the total capped at max_conversations by scaling every class's share alike."""
    class_ids = np.asarray(class_ids)
    shares = np.floor(np.bincount(class_ids, minlength=1) * fraction + 0.5)
    if shares.sum() > max_conversations:
        shares = np.floor(shares * max_conversations / shares.sum())
    rng = np.random.default_rng([seed, 0xC1A55])
    held_out = np.sort(
        np.concatenate(
            [
                rng.choice(np.flatnonzero(class_ids == c), int(k), replace=False)
                for c, k in enumerate(shares)
            ]
        )
    ).astype(np.int64)
    return np.setdiff1d(np.arange(len(class_ids)), held_out), held_out


def one_line(error: BaseException | str) -> str:
    """An error as the one line a user sees: messages from elsewhere (the OS, sentencepiece) folded."""
    return " ".join(str(error).splitlines())
