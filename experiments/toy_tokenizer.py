"""How assets/toy_tokenizer.model was made: a sentencepiece BPE vocabulary of 120 pieces (digits split) for the
toy task, trained from fixed text (sentencepiece's BPE trainer has no randomness), so this regenerates it exactly.

    python experiments/toy_tokenizer.py
"""

import io
import os
import random
import sys

import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from chat_readers import EXPERT_CONDITION  # noqa: E402
from data import load_tokenizer  # noqa: E402
from toy_task import EXPERT, SUB_OPTIMAL, TOKENIZER_PATH, _problems, write_sum  # noqa: E402


def train_toy_tokenizer(path: str = TOKENIZER_PATH) -> None:
    """Train the toy vocabulary from fixed text (no randomness in sentencepiece's BPE trainer)."""
    prefixes = [
        f"{c} {r}:"
        for c in (EXPERT, SUB_OPTIMAL, EXPERT_CONDITION, "GPT3")
        for r in ("User", "Assistant")
    ]
    lines = prefixes * 500 + ["User:", "Assistant:"] * 100
    lines += [
        f"{a}+{b}={write_sum(a + b)}" for a, b in _problems(random.Random(0), 1000, held_out=False)
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=120,
        # short English text
        required_chars="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'-*/()",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,  # as Mistral's
        split_digits=True,
        split_by_unicode_script=False,
        character_coverage=1.0,
        byte_fallback=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(model.getvalue())


if __name__ == "__main__":
    train_toy_tokenizer()
    tok = load_tokenizer(TOKENIZER_PATH)
    print(f"wrote {TOKENIZER_PATH}: {tok.vocab_size} ids")
    for text in [f"{EXPERT_CONDITION} User:", "GPT3 Assistant:", "123+456=", "579"]:
        print(f"{text!r:24} -> {[tok.piece(i) for i in tok.encode(text)]}")
