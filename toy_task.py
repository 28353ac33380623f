"""The toy task: C-RLFT on CPU in minutes, with answers that can be checked exactly.

Two-digit sums in the chat format (user "27+58=", assistant "58": 85 written backwards, see write_sum), one to three
a conversation, so that a chat goes on after its first answer. "Expert" answers are right but only 2% of the data
(SFT on them alone scores ~5%); "Novice" answers drop every carry (27+58 -> "57"): plain SFT on the mix learns to
drop carries; C-RLFT, conditioned on the class and weighted by it (CLASS_WEIGHTS), should carry when prompted
"Expert". Both prefixes have the same length and no digit, so the class changes one prompt token, not the operands'
positions. The tokenizer (assets/toy_tokenizer.model: BPE, 120 pieces, digits split): experiments/toy_tokenizer.py."""

import itertools
import os
import random

import torch

from chat_readers import Conversation

EXPERT, SUB_OPTIMAL = "Expert", "Novice"
CLASS_WEIGHTS = {EXPERT: 1.0, SUB_OPTIMAL: 0.1}
TOKENIZER_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "assets", "toy_tokenizer.model"
)
DIGITS = 2  # operands have this many digits


def is_eval_problem(a: int, b: int) -> bool:
    """A fixed tenth of the problems, by a multiplicative hash: held out from every training set."""
    return ((a * 10**DIGITS + b) * 2654435761 % 2**32) * 10 >> 32 == 0


def carry_free_sum(a: int, b: int) -> int:
    """The sub-optimal class's systematic mistake: add digit by digit and drop every carry."""
    return sum((a // 10**i % 10 + b // 10**i % 10) % 10 * 10**i for i in range(len(str(max(a, b)))))


def write_sum(total: int) -> str:
    """Least-significant digit first (579 -> "975"): each digit then depends only on digits already written and
    the carry, so a small model learns carrying in a few hundred CPU steps; dropping it stays as systematic."""
    return str(total)[::-1]


def _problems(
    rng: random.Random, n: int, held_out: bool, distinct: bool = False
) -> list[tuple[int, int]]:
    problems, seen, low, high = [], set(), 10 ** (DIGITS - 1), 10**DIGITS - 1
    while len(problems) < n:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if is_eval_problem(a, b) == held_out and not (distinct and (a, b) in seen):
            problems.append((a, b))
            seen.add((a, b))
    return problems


def _chat(exchanges) -> list[dict]:
    return [
        m
        for q, a in exchanges
        for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
    ]


def make_toy_conversations(
    n: int,
    expert_fraction: float = 0.02,
    seed: int = 0,
    sub_optimal_error: float = 1.0,
    max_exchanges: int = 3,
) -> list[Conversation]:
    """n conversations of 1 to max_exchanges sums each, every answer by the conversation's class;
    round(n * expert_fraction) of them expert, in a shuffled order."""
    # checked by train.py
    assert 0 <= expert_fraction <= 1 and 0 <= sub_optimal_error <= 1 and max_exchanges >= 1
    rng, n_expert = random.Random(seed), round(n * expert_fraction)
    classes = [EXPERT] * n_expert + [SUB_OPTIMAL] * (n - n_expert)
    rng.shuffle(classes)
    exchanges = [rng.randint(1, max_exchanges) for _ in range(n)]
    problems = iter(_problems(rng, sum(exchanges), held_out=False))

    def answer(a: int, b: int, cls: str) -> str:
        wrong = cls == SUB_OPTIMAL and rng.random() < sub_optimal_error  # a draw for novices only
        return write_sum(carry_free_sum(a, b) if wrong else a + b)

    return [
        Conversation(
            _chat((f"{a}+{b}=", answer(a, b, cls)) for a, b in itertools.islice(problems, k)),
            cls,
            None,
            cls,
            f"toy:{i}",
        )
        for i, (cls, k) in enumerate(zip(classes, exchanges))
    ]


def make_toy_eval(n: int, seed: int = 0, carry_free: bool = False) -> list[tuple[str, str]]:
    """n distinct held-out problems as (question, answer): the true sum, or the novices' carry-free one."""
    add = carry_free_sum if carry_free else (lambda a, b: a + b)
    return [
        (f"{a}+{b}=", write_sum(add(a, b)))
        for a, b in _problems(random.Random(seed), n, True, distinct=True)
    ]


@torch.no_grad()
def evaluate(model, tokenizer, problems, prompt_ids, max_new_tokens=12, batch_size=250, turn=1):
    """(share of greedy answers equal to those of `problems` [(question, answer)], [(question, text)]), each
    asked as the `turn`-th question of a chat after turn - 1 other problems; prompt_ids(messages) -> ids is the
    template and condition (data.encode_prompt). Prompts of equal length are decoded together (KV cache)."""
    device, groups = next(model.parameters()).device, {}
    for k, (question, answer) in enumerate(problems):
        history = _chat(problems[(k + j + 1) % len(problems)] for j in range(turn - 1))
        ids = prompt_ids(history + [{"role": "user", "content": question}])
        groups.setdefault(len(ids), []).append((ids, question, answer))
    correct, answers = 0, []
    for length, group in groups.items():
        for chunk in (group[i : i + batch_size] for i in range(0, len(group), batch_size)):
            model.setup_kv_cache(len(chunk), length + max_new_tokens, device=device)
            tokens = torch.tensor([ids for ids, _, _ in chunk], device=device)  # (B, T)
            generated = [model.decode(tokens, 0, last_only=True)[:, -1].argmax(-1)]  # (B,) each
            for t in range(max_new_tokens - 1):
                generated.append(model.decode(generated[-1][:, None], length + t)[:, -1].argmax(-1))
            for (_, question, answer), ids in zip(chunk, torch.stack(generated, 1).tolist()):
                text = tokenizer.decode(
                    ids[: ids.index(tokenizer.eot_id)] if tokenizer.eot_id in ids else ids
                )
                correct += text.strip() == answer
                answers.append((question, text))
    model.clear_kv_cache()
    return correct / max(1, len(problems)), answers
