"""sentencepiece plus `<|end_of_turn|>` (the id after the model's pieces, as OpenChat added it, or the one a
checkpoint gives it: openchat_3.5's 32000), and a batched encode exactly like sentencepiece's, only faster."""
import importlib.util
import json
import os
import re

import numpy as np
import sentencepiece as spm

EOT_TEXT = "<|end_of_turn|>"


def default_tokenizer_path() -> str:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        raise FileNotFoundError("the default tokenizer is mistral-common's tokenizer.model.v1: "
                                "`pip install mistral-common`, or pass your own tokenizer.model")
    return os.path.join(os.path.dirname(spec.origin), "data", "tokenizer.model.v1")


class Tokenizer:
    """encode() gives no special id ("<s>", "<|end_of_turn|>" in text stay text); decode() writes eot_id as text."""

    def __init__(self, model_path: str | None = None, eot_id: int | None = None):
        self.model_path = str(model_path or default_tokenizer_path())
        if not os.path.isfile(self.model_path):
            raise FileNotFoundError(f"{self.model_path}: no such sentencepiece tokenizer.model (pass --tokenizer)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.model_path}: not a sentencepiece model ({str(e).splitlines()[0][:100]})") from None
        self.bos_id = self.sp.bos_id()
        if self.bos_id < 0:
            raise ValueError(f"{self.model_path}: the tokenizer has no BOS piece")
        self.eot_id = self.sp.get_piece_size() if eot_id is None else eot_id
        if self.eot_id < self.sp.get_piece_size():
            raise ValueError(f"{self.model_path}: {EOT_TEXT} id {self.eot_id} is one of the model's own pieces")
        self.vocab_size = self.eot_id + 1
        self.num_threads = os.cpu_count() or 1
        self._segments: dict[str, bytes] | None = {} if _segments_are_independent(self.sp) else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """[encode(t) for t in texts] as int32 arrays, fast: each segment (_SEGMENT) is encoded once, then looked up.
        Exact because no piece spans a boundary between a non-space character and a space, and the normaliser only
        turns spaces into "▁" (both checked in _segments_are_independent): sentencepiece's output is then the
        concatenation of its encodings of the segments of " " + text (" ": its dummy prefix). See tests/test_data.py."""
        if self._segments is None:
            return [np.array(ids, np.int32) for ids in self.sp.encode(list(texts), num_threads=self.num_threads)]
        if len(self._segments) > 1_000_000:  # bound the memory on huge corpora
            self._segments.clear()
        cache = self._segments  # segment -> its ids as int32 bytes
        # sentencepiece reads a literal "▁" as a space: such rare texts are encoded whole (no segments)
        split = [None if "▁" in text else _SEGMENT.findall(" " + text) for text in texts]
        new = list({s for segments in split if segments for s in segments if s not in cache})
        # one threaded call; segment " foo" is encode("foo"): sentencepiece adds the "▁" itself
        for s, ids in zip(new, self.sp.encode([s[1:] for s in new], num_threads=self.num_threads)):
            cache[s] = np.array(ids, np.int32).tobytes()
        return [np.array(self.sp.encode(text), np.int32) if segments is None else
                np.frombuffer(b"".join(map(cache.__getitem__, segments)), np.int32)
                for text, segments in zip(texts, split)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if any(i < 0 or i >= self.vocab_size for i in ids):
            raise ValueError(f"token id out of range [0, {self.vocab_size}): {ids}")
        cuts = [k for k, i in enumerate(ids) if i == self.eot_id]  # decoded apart: eot_id is no piece of sp's
        return EOT_TEXT.join(self.sp.decode(ids[a + 1:b]) for a, b in zip([-1] + cuts, cuts + [len(ids)]))

    def piece(self, i: int) -> str:
        return EOT_TEXT if i == self.eot_id else self.sp.id_to_piece(int(i))


# A segment is a run of spaces and the word after it; trailing spaces stay with the last word.
_SEGMENT = re.compile(r" *[^ ]+(?: +\Z)?| +")


def _segments_are_independent(sp) -> bool:
    if any("▁" in sp.id_to_piece(i).lstrip("▁") for i in range(sp.get_piece_size())):
        return False  # a piece like "a▁b" could span two segments
    probes = ["a  b", " a", "a ", "\u3000x", "\xa0y", "ｆ", "e\u0301", "\t\n", "A\r\nB"]
    return all(sp.normalize(t) == "▁" + t.replace(" ", "▁") for t in probes)  # identity normaliser


def checkpoint_tokenizer(model_dir: str, vocab_size: int, path: str | None = None) -> Tokenizer:
    """A checkpoint's tokenizer: `path` (--tokenizer) or its own tokenizer.model. <|end_of_turn|> keeps the id the
    directory gives it (openchat_3.5: 32000), else the row after the pieces. vocab_size must fit: pieces + added ids."""
    path = path or os.path.join(model_dir, "tokenizer.model")
    added = {}  # text -> id
    for name in ("added_tokens.json", "tokenizer_config.json"):
        file = os.path.join(model_dir, name)
        if os.path.isfile(file):
            try:
                with open(file, encoding="utf-8") as f:
                    config = json.load(f)
                added.update({text: int(i) for text, i in config.items()} if name == "added_tokens.json" else
                             {t["content"]: int(i) for i, t in config.get("added_tokens_decoder", {}).items()})
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                raise ValueError(f"{file}: unreadable added tokens ({type(e).__name__}: {str(e)[:80]})") from None
    tokenizer = Tokenizer(path, added.get(EOT_TEXT))
    n_pieces = tokenizer.sp.get_piece_size()
    if not n_pieces <= vocab_size <= max([n_pieces, *(i + 1 for i in added.values())]):
        raise ValueError(f"{path}: the tokenizer has {n_pieces} pieces but {model_dir}/config.json has "
                         f"vocab_size={vocab_size}: not this model's tokenizer (pass its own with --tokenizer)")
    return tokenizer
