"""--data and --class_weights as the user writes them: a comma-separated list of sources, each optionally
`CLASS=path` (every conversation of the file gets that class and condition), checked before anything is read; the
class weights `CLASS=WEIGHT,...`; and every source read in order (chat_readers.py's readers)."""

import collections
import dataclasses
import math
import os

from chat_readers import (
    EXPERT_CONDITION,
    Conversation,
    DataError,
    expect,
    read_jsonl,
    read_sharegpt,
    shortened,
)


def parse_sources(spec: str) -> list[tuple[str | None, str]]:
    """--data: "GPT4 Correct=gpt4.jsonl,GPT3=gpt35.json" -> [("GPT4 Correct", "gpt4.jsonl"), ("GPT3", ...)];
    a source without "CLASS=" gives (None, path). A path that exists is never split at "," or "="."""
    sources = []
    for k, item in enumerate([spec] if os.path.exists(spec) else spec.split(","), 1):
        class_name, path = None, item.strip()
        if "=" in item and not os.path.exists(path):
            class_name, path = (part.strip() for part in item.split("=", 1))
        expect(
            path != "" and class_name != "",
            f"--data {shortened(spec)}: item {k}",
            item,
            "PATH or CLASS=PATH",
            "bad source",
        )
        if not (path == "sharegpt" or path.endswith((".jsonl", ".json"))):
            raise DataError(
                path,
                "found an unknown extension, expected a .jsonl (OpenChat's) or .json (ShareGPT) "
                "file, or 'sharegpt'",
                "bad source",
            )
        sources.append((class_name, path))
    return sources


def check_sources(spec: str) -> list[tuple[str | None, str]]:
    """parse_sources, and every file there: before anything is read, one line naming --data."""
    sources = parse_sources(spec)
    for _, path in sources:
        if path != "sharegpt" and not os.path.isfile(path):
            problem = "is a directory" if os.path.isdir(path) else "no such file"
            raise DataError(
                f"--data: {path}",
                f"{problem} (from {os.getcwd()}): give an existing .jsonl or .json "
                "file, 'sharegpt', 'toy', or a directory of `python data_cli.py tokenize`",
                "unreadable",
            )
    return sources


def same_files(spec: str) -> list[str]:
    """Files given as more than one source of --data (e.g. as two classes): for a warning."""
    seen = collections.Counter(
        path if path == "sharegpt" else os.path.realpath(path) for _, path in parse_sources(spec)
    )
    return [path for path, n in seen.items() if n > 1]


def parse_class_weights(spec: str) -> dict[str, float]:
    """ "GPT4 Correct=1,GPT3=0.1" -> {"GPT4 Correct": 1.0, "GPT3": 0.1} (names are stripped)."""
    weights = {}
    for part in spec.split(","):
        name, eq, value = (x.strip() for x in part.partition("="))
        try:
            w, problem = float(value), None
        except ValueError:
            w, problem = 0.0, f"weight {value!r} is not a number"
        if not (math.isfinite(w) and w >= 0):
            problem = "needs a weight that is finite and >= 0"
        if not eq:
            problem = "is not NAME=WEIGHT"
        elif name in weights:
            problem = "is given twice"
        if problem:
            raise ValueError(f"class weights {spec!r}: {part.strip()!r} {problem}")
        weights[name] = w
    return weights


def check_class_weights(
    conversations: list[Conversation], weights: dict[str, float] | None
) -> None:
    """Before tokenizing: every class needs a weight in --class_weights, unless its assistant messages carry their
    own. One line naming the flag and how to give a source its class."""
    for c in conversations:
        if (
            weights is None
            or c.class_name in weights
            or all("weight" in m for m in c.messages if m["role"] == "assistant")
        ):
            continue
        path = c.source.split(":")[0] if c.source else "a source"
        has = (
            f"class {c.class_name!r}"
            if c.class_name
            else "no class (no CLASS= before it, no condition in it)"
        )
        raise DataError(
            "--class_weights",
            f"{path} gives its conversations {has}, and --class_weights names only "
            f"{', '.join(map(repr, weights))}: give the file its class with the CLASS=path form, "
            f'--data="{next(iter(weights))}={path}", or add the class to --class_weights',
            "class without weight",
        )


def read_sources(
    spec: str,
    condition: str | None = EXPERT_CONDITION,
    skip_bad: bool = False,
    stats: collections.Counter | None = None,
    classes: tuple[str, list] | None = None,
) -> list[Conversation]:
    """Every source of --data in order (all checked before any is read); one with a class gives all its
    conversations that class and condition, else JSONL records keep their own and ShareGPT's get `condition`,
    or the class of a field (`classes`, read_sharegpt; condition=None: the paper's split by "model")."""
    conversations = []
    for class_name, path in check_sources(spec):
        # a class needs no field to class it by
        given = condition if class_name is None else class_name
        found = (
            read_jsonl(path, skip_bad, stats)
            if path.endswith(".jsonl")
            else read_sharegpt(
                path, given, skip_bad, stats, classes if class_name is None else None
            )
        )
        conversations += (
            found
            if class_name is None
            else [
                dataclasses.replace(c, condition=class_name, class_name=class_name) for c in found
            ]
        )
    return conversations
