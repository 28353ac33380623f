"""OpenChat's data options that change a token's weight beyond its class (../shared/CRLFT_FACTS.md, "Weights and
loss"): refusal boilerplate at weight 0 (--zero_refusals, applied to the conversations as they are read) and
per-sequence weights (--per_sequence_weights, applied where data.py turns a message's weight into its tokens').
The loss stays sum(w * CE) / sum(w) over the global batch either way: only the w change."""

import dataclasses

import numpy as np

# --zero_refusals' default phrases. The paper-era preparation gave replies carrying refusal boilerplate weight 0
# (facts file: "As an AI", "I apologize, but", ...; OpenChat's list had "As an AI language model", "I'm sorry, but I
# cannot", "I cannot fulfill", ...). Ours are those refusals spelled out far enough not to catch ordinary replies
# ("as an aid", "I apologize for the confusion"). Matching: a case-insensitive substring of the reply, curly
# apostrophes read as straight ones. --refusal_phrases=FILE replaces the list (one phrase a line).
REFUSAL_PHRASES = (
    "As an AI language model",
    "As an AI assistant",
    "I'm sorry, but I cannot",
    "I'm sorry, but I can't",
    "I apologize, but I cannot",
    "I apologize, but I can't",
    "I cannot fulfill",
    "I can't fulfill",
    "I'm not able to provide",
    "I am not able to provide",
    "I'm unable to provide",
    "against my programming",
)


def _folded(text: str) -> str:
    return text.replace("\u2019", "'").lower()


def read_refusal_phrases(path: str) -> tuple[str, ...]:
    """--refusal_phrases=FILE: one phrase a line (blank lines skipped); a problem is one line naming the flag."""
    try:
        with open(path, encoding="utf-8") as f:
            phrases = tuple(line.strip() for line in f if line.strip())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(
            f"--refusal_phrases={path}: cannot read it ({getattr(e, 'strerror', None) or e}): give a "
            "UTF-8 text file with one phrase a line"
        ) from None
    if not phrases:
        raise ValueError(f"--refusal_phrases={path}: no phrase in it: give one phrase a line")
    return phrases


def refusal_phrases(zero: bool, path: str = "") -> tuple[str, ...] | None:
    """The phrases of the flags: None (--zero_refusals off), the file's, else REFUSAL_PHRASES."""
    if path and not zero:
        raise ValueError(f"--refusal_phrases={path} needs --zero_refusals=true")
    if not zero:
        return None
    return read_refusal_phrases(path) if path else REFUSAL_PHRASES


def is_refusal(text: str, phrases) -> bool:
    text = _folded(text)
    return any(_folded(p) in text for p in phrases)


def zero_refusals(conversations, phrases) -> list:
    """Each assistant reply that holds a phrase gets weight 0 (its own weight, which wins over its class's), and its
    conversation notes which replies (Conversation.refusals) for the summary's counts and `python data_cli.py show`."""
    out = []
    for c in conversations:
        replies = [m for m in c.messages if m["role"] == "assistant"]
        zeroed = tuple(k for k, m in enumerate(replies) if is_refusal(m["content"], phrases))
        if zeroed:
            ids = {id(replies[k]) for k in zeroed}
            c = dataclasses.replace(
                c,
                refusals=zeroed,
                messages=[{**m, "weight": 0.0} if id(m) in ids else m for m in c.messages],
            )
        out.append(c)
    return out


def per_sequence(piece_weights: np.ndarray, lengths: list[int], turn_ends: list[int]) -> np.ndarray:
    """OpenChat's per-sequence weighting: each assistant message's weight divided by its length in tokens, its
    content (the piece before its end of turn) plus its end of turn, so that every reply weighs its weight in all,
    long or short. piece_weights (P,) and lengths (P,) per template piece; turn_ends: the end-of-turn pieces."""
    w = piece_weights.copy()
    for j in turn_ends:
        n = lengths[j - 1] + lengths[j]
        w[j - 1] /= n
        w[j] /= n
    return w
