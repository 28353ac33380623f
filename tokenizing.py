"""Tokenizers behind one interface: a tokenizer.json read with the `tokenizers` library (ids exactly those of
transformers' fast tokenizer on the same directory), or a sentencepiece tokenizer.model with a batched encode exactly
like sentencepiece's, only faster. A special token the chat template needs and the tokenizer lacks (OpenChat 3.5's
<|end_of_turn|>, data.use_template) is added at the id the checkpoint's files give it, else the first free id."""

import importlib.util
import itertools
import json
import os
import re

import numpy as np
import sentencepiece as spm
import tokenizers


def default_tokenizer_path() -> str:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        raise FileNotFoundError(
            "--tokenizer: a from-scratch model's default tokenizer is Mistral v1's tokenizer.model "
            "from the package mistral-common: `pip install mistral-common`, or pass "
            "--tokenizer=PATH (a tokenizer.json, a tokenizer.model or a model directory)"
        )
    return os.path.join(os.path.dirname(spec.origin), "data", "tokenizer.model.v1")


class Tokenizer:
    """What data.py, sample.py and the export use, whichever the kind (the two classes below):

    encode(text)          content: text that looks like a special token ("<|eot_id|>", "<s>") stays text. No BOS
    encode_batch(texts)   [encode(t) for t in texts] as int32 arrays, fast
    encode_special(text)  template text: the special tokens in it are their ids. No BOS
    special_id(text)      the id of special (added) token `text`, None when the tokenizer has no such token
    add_special(text)     add special token `text` (not yet one of the tokenizer's) at the first free id
    decode(ids), piece(i) text of ids; the piece of one id
    one_thread()          in a worker process: the processes are the parallelism

    path, files   its file (tokenizer.json or tokenizer.model); every file it read (the data key hashes them)
    bos_id        what it puts before a text, as it does for "" (Llama 3: <|begin_of_text|>; None: nothing)
    eos_id        its end of text (</s>, <|end_of_text|>; None: none): a stop id
    vocab_size    1 + the largest id it produces: its pieces, BOS, EOS, the special tokens of its template
    word_start    it encodes every text as if a space preceded it (sentencepiece's dummy prefix "▁")
    added         {text: id} of the special tokens added for the template (exported with it)
    template, eot_id   the chat template's name (data.TEMPLATES) and its end-of-turn id: set by data.use_template
    """

    template: str | None = None
    eot_id: int | None = None

    def special_id(self, text: str) -> int | None:
        return self.specials.get(text)

    def _next_id(self) -> int:
        return max(self._n_pieces, *(i + 1 for i in self.specials.values()))

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        if any(i < 0 or i >= self._next_id() for i in ids):
            raise ValueError(f"{self.path}: token id out of range [0, {self._next_id()}): {ids}")
        return ids

    # Worker processes started by spawn (not fork) get a pickled tokenizer: rebuilt from its files, with `added`.
    def __getstate__(self):
        return {k: v for k, v in vars(self).items() if k not in self._NATIVE}

    def __setstate__(self, state):
        vars(self).update(state)
        self._open()


class JsonTokenizer(Tokenizer):
    """A tokenizer.json with the tokens tokenizer_config.json adds (its added_tokens_decoder), as transformers reads
    them (transformers 5 does not read added_tokens.json beside a tokenizer.json)."""

    _NATIVE = ("tk", "specials")  # attributes rebuilt from the files, not pickled

    def __init__(self, path: str):
        self.path, self.added = path, {}
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        self.config = _read_json(config_path) if os.path.isfile(config_path) else {}
        self.files = [path] + ([config_path] if self.config else [])
        self._open()
        self._n_pieces = self.tk.get_vocab_size(with_added_tokens=False)
        # what the post-processor puts around a text
        bos = self.tk.encode("", add_special_tokens=True).ids
        if len(bos) > 1:
            raise ValueError(
                f"{path}: the tokenizer puts {len(bos)} tokens around a text (need BOS or nothing)"
            )
        self.bos_id = bos[0] if bos else None
        eos = self.config.get("eos_token")  # a string, or an added token's {"content": ...}
        if isinstance(eos, dict):
            eos = eos["content"]
        self.eos_id = self.tk.token_to_id(eos) if eos else None
        # content makes them
        in_text = [i for i, t in self.tk.get_added_tokens_decoder().items() if not t.special]
        self.vocab_size = max(
            self._n_pieces, *(i + 1 for i in in_text + [self.bos_id, self.eos_id] if i is not None)
        )
        self.word_start = self.encode("a b") == self.encode("a") + self.encode("b")

    def _open(self):
        try:
            self.tk = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # the library's own exception type, one for every problem
            raise ValueError(
                f"{self.path}: not a tokenizers tokenizer.json ({str(e).splitlines()[0][:100]})"
            ) from None
        mine = {i: {"content": text, "special": True} for text, i in self.added.items()}
        config = _added_tokens(self.config.get("added_tokens_decoder", {}), self.files[-1])
        for i, t in sorted({**config, **mine}.items()):
            if self.tk.token_to_id(t["content"]) is None:  # as transformers adds them
                special = t.get("special", False)
                (self.tk.add_special_tokens if special else self.tk.add_tokens)(
                    [
                        tokenizers.AddedToken(
                            t["content"],
                            special=special,
                            normalized=t.get("normalized", not special),
                            **{k: t.get(k, False) for k in ("single_word", "lstrip", "rstrip")},
                        )
                    ]
                )
            if self.tk.token_to_id(t["content"]) != i:
                raise ValueError(
                    f"{self.path}: added token {t['content']!r} has id {self.tk.token_to_id(t['content'])}"
                    f", but tokenizer_config.json beside it gives it {i}"
                )
        self.specials = {t.content: i for i, t in self.tk.get_added_tokens_decoder().items()}
        # content; encode_special turns it off for template text
        self.tk.encode_special_tokens = True

    # not encode_batch's threads: a process that forks workers later must not have used them
    def encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [
            np.array(e.ids, np.int32)
            for e in self.tk.encode_batch_fast(list(texts), add_special_tokens=False)
        ]

    def encode_special(self, text):
        self.tk.encode_special_tokens = False
        try:
            return self.tk.encode(text, add_special_tokens=False).ids
        finally:
            self.tk.encode_special_tokens = True

    def add_special(self, text):
        self.added[text] = self._next_id()
        self._open()
        return self.added[text]

    def decode(self, ids):
        return self.tk.decode(self._check_ids(ids), skip_special_tokens=False)

    def piece(self, i):
        return self.tk.id_to_token(int(i))

    def one_thread(self):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the library at each call


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model, with the special tokens its directory adds (added_tokens.json, tokenizer_config.json's
    added_tokens_decoder: openchat_3.5's <|end_of_turn|> = 32000) and those added for the template, after its pieces."""

    _NATIVE = ("sp", "_segments", "_special_re")

    def __init__(self, path: str):
        # known: the directory's
        self.path, self.files, self.added, self.known = path, [path], {}, {}
        for name in ("added_tokens.json", "tokenizer_config.json"):
            file = os.path.join(os.path.dirname(path), name)
            if os.path.isfile(file):
                config = _read_json(file)
                decoder = (
                    {i: {"content": text} for text, i in config.items()}
                    if name == "added_tokens.json"
                    # {text: id} or {id: {"content": text, ...}}
                    else config.get("added_tokens_decoder", {})
                )
                self.known.update(
                    {t["content"]: i for i, t in _added_tokens(decoder, file).items()}
                )
                self.files.append(file)
        self.num_threads = os.cpu_count() or 1
        self._open()
        self._n_pieces = self.sp.get_piece_size()
        self.bos_id, self.eos_id = (
            i if i >= 0 else None for i in (self.sp.bos_id(), self.sp.eos_id())
        )
        self.vocab_size = self._n_pieces
        self.word_start = self.sp.normalize("a").startswith("▁")

    def _open(self):
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"{self.path}: not a sentencepiece model ({str(e).splitlines()[0][:100]})"
            ) from None
        # segment -> its ids as int32 bytes
        self._segments = {} if _segments_are_independent(self.sp) else None
        controls = {
            self.sp.id_to_piece(i): i
            for i in range(self.sp.get_piece_size())
            if self.sp.is_control(i)
        }
        self.specials = {**controls, **self.known, **self.added}
        self._special_re = re.compile(
            "(" + "|".join(map(re.escape, sorted(self.specials, key=len)[::-1])) + ")"
        )

    def encode(self, text):
        return self.sp.encode(text)

    def encode_batch(self, texts):
        """Each segment (_SEGMENT) is encoded once, then looked up. Exact because no piece spans a boundary between a
        non-space character and a space, and the normaliser only turns spaces into "▁" (both checked in
        _segments_are_independent): sentencepiece's output is then the concatenation of its encodings of the segments
        of " " + text (" ": its dummy prefix). See tests/test_data.py."""
        if self._segments is None:
            return [
                np.array(ids, np.int32)
                for ids in self.sp.encode(list(texts), num_threads=self.num_threads)
            ]
        if len(self._segments) > 1_000_000:  # bound the memory on huge corpora
            self._segments.clear()
        # sentencepiece reads a literal "▁" as a space: such rare texts are encoded whole (no segments)
        split = [None if "▁" in text else _SEGMENT.findall(" " + text) for text in texts]
        new = list(
            {s for segments in split if segments for s in segments if s not in self._segments}
        )
        # one threaded call; segment " foo" is encode("foo"): sentencepiece adds the "▁" itself
        for s, ids in zip(new, self.sp.encode([s[1:] for s in new], num_threads=self.num_threads)):
            self._segments[s] = np.array(ids, np.int32).tobytes()
        return [
            np.array(self.sp.encode(text), np.int32)
            if segments is None
            else np.frombuffer(b"".join(map(self._segments.__getitem__, segments)), np.int32)
            for text, segments in zip(texts, split)
        ]

    def encode_special(self, text):
        """Each text between special tokens is encoded on its own (with its word-start marker), as the exported
        tokenizer.json does (hf_export.tokenizer_json)."""
        # text, special, text, ...
        parts = self._special_re.split(text) if self.specials else [text]
        return [
            i
            for k, part in enumerate(parts)
            if part
            for i in ([self.specials[part]] if k % 2 else self.sp.encode(part))
        ]

    def add_special(self, text):
        self.added[text] = next(
            i for i in itertools.count(self._n_pieces) if i not in self.specials.values()
        )
        self._open()
        return self.added[text]

    def decode(self, ids):
        ids = self._check_ids(ids)
        # added tokens are no pieces of sentencepiece's
        cuts = [k for k, i in enumerate(ids) if i >= self._n_pieces]
        names = {i: text for text, i in self.specials.items()}
        return "".join(
            self.sp.decode(ids[a + 1 : b]) + (names[ids[b]] if b < len(ids) else "")
            for a, b in zip([-1] + cuts, cuts + [len(ids)])
        )

    def piece(self, i):
        return next((t for t, j in self.specials.items() if j == i), None) or self.sp.id_to_piece(
            int(i)
        )

    def one_thread(self):
        self.num_threads = 1


# A segment is a run of spaces and the word after it; trailing spaces stay with the last word.
_SEGMENT = re.compile(r" *[^ ]+(?: +\Z)?| +")


def _segments_are_independent(sp) -> bool:
    if any("▁" in sp.id_to_piece(i).lstrip("▁") for i in range(sp.get_piece_size())):
        return False  # a piece like "a▁b" could span two segments
    probes = ["a  b", " a", "a ", "\u3000x", "\xa0y", "ｆ", "e\u0301", "\t\n", "A\r\nB"]
    return all(sp.normalize(t) == "▁" + t.replace(" ", "▁") for t in probes)  # identity normaliser


def _added_tokens(decoder: dict, path: str) -> dict[int, dict]:
    """tokenizer_config.json's added_tokens_decoder, checked: {id: {"content": text, "special": ..., ...}}."""
    try:
        return {int(i): {**t, "content": str(t["content"])} for i, t in decoder.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(
            f"{path}: unreadable added tokens ({type(e).__name__}: {str(e)[:80]})"
        ) from None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


def open_tokenizer(path: str | None = None) -> Tokenizer:
    """A tokenizer.json, a sentencepiece tokenizer.model, or a directory holding one (its tokenizer.json first: a
    tokenizer.model beside it may be tiktoken's, as Llama 3's is). Default: Mistral v1's tokenizer.model."""
    path = str(path or default_tokenizer_path())
    if os.path.isdir(path):
        found = [
            f
            for f in ("tokenizer.json", "tokenizer.model")
            if os.path.isfile(os.path.join(path, f))
        ]
        if not found:
            raise FileNotFoundError(
                f"{path}: no tokenizer.json or tokenizer.model (pass --tokenizer)"
            )
        path = os.path.join(path, found[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such tokenizer file (pass --tokenizer)")
    return JsonTokenizer(path) if path.endswith(".json") else SentencePieceTokenizer(path)


def checkpoint_tokenizer(model_dir: str, vocab_size: int, path: str | None = None) -> Tokenizer:
    """A checkpoint's tokenizer: `path` (--tokenizer) or its directory's own. Every id it produces needs a row of the
    model's embedding; more rows than ids are fine (released checkpoints pad their vocabularies)."""
    tokenizer = open_tokenizer(path or model_dir)
    if tokenizer.vocab_size > vocab_size:
        i = tokenizer.vocab_size - 1
        raise ValueError(
            f"{tokenizer.path}: its {tokenizer.vocab_size} pieces do not fit vocab_size={vocab_size} of "
            f"{model_dir}/config.json (token {tokenizer.piece(i)!r} has id {i}): not this model's "
            "tokenizer (pass its own with --tokenizer)"
        )
    return tokenizer
