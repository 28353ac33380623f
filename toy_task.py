"""The toy task: C-RLFT on CPU in minutes, with answers that can be checked exactly.

Two-digit addition in the chat format: user "27+58=", assistant "58" (the sum 85, written least-significant
digit first; see write_sum), one to three sums a conversation, so that a chat goes on after its first answer.
Two classes of data:
  - "Expert": always right, but only 2% of the records (240 of 12,000): too few to learn addition from
    alone (SFT on them alone scores ~5% on held-out problems);
  - "Novice" (sub-optimal): the other 98%; with probability `sub_optimal_error` (default 1) it drops every
    carry (27+58 -> 75, written "57"). Its answers teach the format and the digit-by-digit sums; plain SFT
    on the mix learns to drop carries, wrong wherever a carry matters (about three problems in four).
C-RLFT conditions on the class and weights it (CLASS_WEIGHTS); prompted with "Expert", the model should carry.
The two condition prefixes ("Expert User:", "Novice User:") have the same length and no digit: the class
changes one token of the prompt, not the positions of the operands. (With the paper's "GPT4"/"GPT3" the
digit tokens 4 and 3 sit right before the answer, and a small model learned the addition much later.)
Evaluation problems are a fixed tenth of the problem space that training never sees.

The tokenizer is a tiny sentencepiece BPE model (digits split, 120 pieces), committed as
assets/toy_tokenizer.model; `python toy_task.py` regenerates it, deterministically.
"""
import io
import itertools
import os
import random
import re

import sentencepiece as spm

import torch

from data import Conversation, Tokenizer, encode_prompt

EXPERT, SUB_OPTIMAL = "Expert", "Novice"
CLASS_WEIGHTS = {EXPERT: 1.0, SUB_OPTIMAL: 0.1}
TOKENIZER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy_tokenizer.model")
DIGITS = 2  # operands have this many digits
_QUESTION = re.compile(r"\s*(\d+)\s*\+\s*(\d+)\s*=\s*")


def is_eval_problem(a: int, b: int) -> bool:
    """A fixed tenth of the problems, by a multiplicative hash: held out from every training set."""
    return ((a * 10**DIGITS + b) * 2654435761 % 2**32) * 10 >> 32 == 0


def carry_free_sum(a: int, b: int) -> int:
    """The sub-optimal class's systematic mistake: add digit by digit and drop every carry."""
    total, place = 0, 1
    while a or b:
        total += (a % 10 + b % 10) % 10 * place
        a, b, place = a // 10, b // 10, place * 10
    return total


def _problems(rng: random.Random, n: int, held_out: bool, distinct: bool = False) -> list[tuple[int, int]]:
    problems, seen = [], set()
    while len(problems) < n:
        a, b = rng.randint(10 ** (DIGITS - 1), 10**DIGITS - 1), rng.randint(10 ** (DIGITS - 1), 10**DIGITS - 1)
        if is_eval_problem(a, b) == held_out and not (distinct and (a, b) in seen):
            problems.append((a, b))
            seen.add((a, b))
    return problems


def write_sum(total: int) -> str:
    """Answers are written least-significant digit first (579 -> "975"): each digit then depends only on
    digits already written and the carry from the previous one, so a small model learns carrying in a few
    hundred steps on a CPU. The sub-optimal class's mistake (dropping the carry) stays just as systematic."""
    return str(total)[::-1]


def make_toy_conversations(n: int, expert_fraction: float = 0.02, seed: int = 0, sub_optimal_error: float = 1.0,
                           max_exchanges: int = 3) -> list[Conversation]:
    """n conversations of 1 to max_exchanges sums each (a chat goes on after its first answer), every answer
    by the conversation's class; round(n * expert_fraction) of them expert, in a shuffled order."""
    if not 0 <= expert_fraction <= 1 or not 0 <= sub_optimal_error <= 1 or max_exchanges < 1:
        raise ValueError("expert_fraction and sub_optimal_error must be in [0, 1], max_exchanges >= 1")
    rng = random.Random(seed)
    n_expert = round(n * expert_fraction)
    classes = [EXPERT] * n_expert + [SUB_OPTIMAL] * (n - n_expert)
    rng.shuffle(classes)
    exchanges = [rng.randint(1, max_exchanges) for _ in range(n)]
    problems = iter(_problems(rng, sum(exchanges), held_out=False))
    conversations = []
    for i, (cls, k) in enumerate(zip(classes, exchanges)):
        messages = []
        for a, b in itertools.islice(problems, k):
            wrong = cls == SUB_OPTIMAL and rng.random() < sub_optimal_error
            answer = carry_free_sum(a, b) if wrong else a + b
            messages += [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": write_sum(answer)}]
        conversations.append(Conversation(messages, cls, None, cls, f"toy:{i}"))
    return conversations


def make_toy_eval(n: int, seed: int = 0, carry_free: bool = False) -> list[tuple[str, str]]:
    """n distinct held-out problems as (question, answer): the true sum, or the novices' carry-free one."""
    add = carry_free_sum if carry_free else (lambda a, b: a + b)
    return [(f"{a}+{b}=", write_sum(add(a, b))) for a, b in _problems(random.Random(seed), n, held_out=True,
                                                                     distinct=True)]


def score_toy_answer(question: str, answer_text: str) -> bool:
    """Exact match of the stripped answer with the true sum."""
    match = _QUESTION.fullmatch(question)
    if match is None:
        raise ValueError(f"not a toy question: {question!r}")
    return answer_text.strip() == write_sum(int(match[1]) + int(match[2]))


@torch.no_grad()
def evaluate(model, tokenizer, problems, condition, max_new_tokens=12, batch_size=250, turn=1):
    """Share of greedy answers equal to the answers of `problems` (question, answer), each asked as the
    `turn`-th question of a chat after turn - 1 exchanges of other problems with their answers. Prompts of
    equal length are decoded together."""
    model.eval()
    device = next(model.parameters()).device
    groups = {}
    for k, (question, answer) in enumerate(problems):
        history = []
        for q, a in (problems[(k + j + 1) % len(problems)] for j in range(turn - 1)):
            history += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        ids = encode_prompt(tokenizer, history + [{"role": "user", "content": question}], condition)
        groups.setdefault(len(ids), []).append((ids, question, answer))
    correct, answers = 0, []
    for length, group in groups.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            tokens = torch.tensor([ids for ids, _, _ in chunk], device=device)  # (B, T)
            model.setup_kv_cache(len(chunk), length + max_new_tokens, device=device)
            logits = model(tokens, start_pos=0, last_only=True)[:, -1]
            generated = []
            for t in range(max_new_tokens):
                next_ids = logits.argmax(-1)  # (B,)
                generated.append(next_ids)
                logits = model(next_ids[:, None], start_pos=length + t)[:, -1]
            generated = torch.stack(generated, 1).tolist()  # (B, max_new_tokens)
            for (_, question, answer), ids in zip(chunk, generated):
                ids = ids[:ids.index(tokenizer.eot_id)] if tokenizer.eot_id in ids else ids
                text = tokenizer.decode(ids)
                correct += text.strip() == answer
                answers.append((question, text))
    model.clear_kv_cache()
    return correct / max(1, len(problems)), answers


def train_toy_tokenizer(path: str = TOKENIZER_PATH) -> None:
    """Train the toy vocabulary from fixed text (no randomness in sentencepiece's BPE trainer)."""
    rng = random.Random(0)
    prefixes = [f"{c} {r}:" for c in (EXPERT, SUB_OPTIMAL, "GPT4 Correct", "GPT3") for r in ("User", "Assistant")]
    lines = prefixes * 500 + ["User:", "Assistant:"] * 100
    lines += [f"{a}+{b}={write_sum(a + b)}" for a, b in _problems(rng, 1000, held_out=False)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=120,
        required_chars="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'-*/()",  # so that short English text mostly encodes
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Mistral's
        split_digits=True, split_by_unicode_script=False, character_coverage=1.0, byte_fallback=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(model.getvalue())


def toy_tokenizer() -> Tokenizer:
    if not os.path.isfile(TOKENIZER_PATH):
        raise FileNotFoundError(f"{TOKENIZER_PATH} is missing: run `python toy_task.py` to regenerate it")
    return Tokenizer(TOKENIZER_PATH)


if __name__ == "__main__":
    train_toy_tokenizer()
    tok = toy_tokenizer()
    print(f"wrote {TOKENIZER_PATH}: {tok.vocab_size} ids")
    for text in ["GPT4 Correct User:", "GPT3 Assistant:", "123+456=", "579"]:
        print(f"{text!r:24} -> {[tok.piece(i) for i in tok.encode(text)]}")
