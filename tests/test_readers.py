"""chat_readers.py: OpenChat's JSONL as written, ShareGPT (also cut off mid-record), sources with classes, and
one-line errors that name file, line and field, what was found and what was expected."""

import collections
import json
import pickle

import pytest

import chat_readers
import chat_sources
from chat_readers import DataError


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = {
    "condition": "GPT4 Correct",
    "system": None,
    "items": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
}


def _with(**changes):
    record = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is None and key != "system":
            record.pop(key)
        else:
            record[key] = value
    return json.dumps(record)


def _items(*messages):
    return _with(items=list(messages))


U, A = {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}

# (line 2 of a file, the field named, found, expected, reason counted with skip_bad)
BAD_JSONL = [
    (
        '{"condition": "GPT4", "items": [',
        "malformed JSON",
        "at column 33",
        "Expecting value",
        "malformed JSON",
    ),
    ("[1, 2]", "record", "found [1, 2] (a list)", "expected an object", "bad field"),
    (
        _with(conditon="GPT4"),
        "'conditon'",
        "found unknown field",
        "expected one of items, condition",
        "bad field",
    ),
    (
        _with(item=GOOD["items"], items=None),
        "'item'",
        "found unknown field",
        "expected one of items",
        "bad field",
    ),
    (
        _with(items=None),
        "items",
        "missing",
        "expected a non-empty list of messages",
        "missing field",
    ),
    (_with(items="Hi"), "items", "found 'Hi' (a string)", "expected a non-empty list", "bad field"),
    (_with(items=[]), "items", "found [] (a list)", "expected a non-empty list", "bad field"),
    (_items(U, "y"), "items[1]", "found 'y' (a string)", "expected an object", "bad field"),
    (
        _items(U, {"content": "y"}),
        "items[1].role",
        "missing",
        'expected "user" or "assistant"',
        "missing field",
    ),
    (
        _items(U, {"role": "assistant"}),
        "items[1].content",
        "missing",
        "expected a string",
        "missing field",
    ),
    (
        _items({"role": "bot", "content": "x"}, A),
        "items[0].role",
        "found 'bot' (a string)",
        'expected "user" or "assistant"',
        "unknown role",
    ),
    (
        _items(U, {"role": "assistant", "content": 42}),
        "items[1].content",
        "found 42 (a number)",
        "expected a string",
        "bad field",
    ),
    (
        _items({"role": "user", "content": "  "}, A),
        "items[0].content",
        "found '  ' (a string)",
        "expected text that is not blank",
        "empty content",
    ),
    (
        _items(U, {**A, "contnet": "y"}),
        "items[1]",
        "found unknown field 'contnet'",
        "expected one of role, content",
        "bad field",
    ),
    (
        _items(U, {**A, "weight": "1"}),
        "items[1].weight",
        "found '1' (a string)",
        "expected a finite number >= 0",
        "bad weight",
    ),
    (
        _items(U, {**A, "weight": True}),
        "items[1].weight",
        "found True (a boolean)",
        "expected a finite number",
        "bad weight",
    ),
    (
        _items(U, {**A, "weight": -1}),
        "items[1].weight",
        "found -1 (a number)",
        "expected a finite number >= 0",
        "bad weight",
    ),
    (
        _items({**U, "weight": float("nan")}, A),
        "items[0].weight",
        "found nan (a number)",
        "expected a finite",
        "bad weight",
    ),
    (
        _items(U, {**A, "weight": float("inf")}),
        "items[1].weight",
        "found inf (a number)",
        "expected a finite",
        "bad weight",
    ),
    (_with(condition=1), "condition", "found 1 (a number)", "expected a string", "bad field"),
    (
        json.dumps({**GOOD, "condition": None}),
        "condition",
        "found None (null)",
        "expected a string",
        "bad field",
    ),
    (
        json.dumps({**GOOD, "class": ["a"]}),
        "class",
        "found ['a'] (a list)",
        "expected a string",
        "bad field",
    ),
    (_with(system=7), "system", "found 7 (a number)", "expected a string", "bad field"),
    (
        _with(system=" "),
        "system",
        "found ' ' (a string)",
        "expected text that is not blank",
        "empty content",
    ),
    (
        _items(U),
        "items",
        "found only user messages",
        "expected an assistant message",
        "no assistant turn",
    ),
]


def _one_line_error(call, where, *says):
    with pytest.raises(DataError) as e:
        call()
    message = str(e.value)
    assert (
        "\n" not in message and message.startswith(where + ": ") and len(message) < 200 + len(where)
    ), message
    for text in says:
        assert text in message, (text, message)
    return e.value


@pytest.mark.parametrize("line,field,found,expected,reason", BAD_JSONL)
def test_bad_jsonl_line_says_file_line_field_found_expected(
    tmp_path, line, field, found, expected, reason
):
    path = _write(tmp_path, "d.jsonl", [json.dumps(GOOD), line, json.dumps(GOOD)])
    error = _one_line_error(
        lambda: chat_readers.read_jsonl(path), f"{path}:2", field, found, expected
    )
    assert error.reason == reason
    stats = collections.Counter()
    assert len(chat_readers.read_jsonl(path, skip_bad=True, stats=stats)) == 2
    assert stats == {f"skipped: {reason}": 1}


def test_bad_files(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    _one_line_error(lambda: chat_readers.read_jsonl(missing), missing, "cannot open: No such file")
    _one_line_error(
        lambda: chat_readers.read_sharegpt(str(tmp_path)),
        str(tmp_path),
        "cannot open: Is a directory",
    )
    for name, says in [
        ("e.jsonl", "empty file, expected one JSON conversation a line"),
        ("e.json", "empty file, expected a JSON array"),
    ]:
        path = _write(tmp_path, name, ["", "  "])
        # skip_bad: still an error
        _one_line_error(lambda: chat_sources.read_sources(path, skip_bad=True), path, says)
    # bytes that are not UTF-8, at byte 14 of line 2 (binary: cut short)
    path = tmp_path / "b.jsonl"
    path.write_bytes(
        json.dumps(GOOD).encode() + b'\n{"condition": "\xff\xfe' + bytes(range(256)) * 50 + b'"}\n'
    )
    error = _one_line_error(
        lambda: chat_readers.read_jsonl(str(path)),
        f"{path}:2: byte 16",
        "found 0xff",
        "expected UTF-8 text",
    )
    assert error.reason == "undecodable bytes"
    assert len(chat_readers.read_jsonl(str(path), skip_bad=True)) == 1
    path = tmp_path / "b.json"
    path.write_bytes(b'[\n {"id": "a\xc3("}]')
    _one_line_error(
        lambda: chat_readers.read_sharegpt(str(path)), f"{path}:2: byte 11", "found 0xc3", "UTF-8"
    )


def test_long_and_unprintable_values_are_cut_short(tmp_path):
    content = ["x" * 1000] * 100  # a long value is shown by its start, never dumped
    odd = "a\nb\u2028c\x00" * 100  # newlines and other separators stay escaped on the one line
    path = _write(
        tmp_path,
        "d.jsonl",
        [_items(U, {**A, "content": content}), _with(system=123, condition=odd)],
    )
    error = _one_line_error(
        lambda: chat_readers.read_jsonl(path),
        f"{path}:1: items[1].content",
        "found ['xxx",
        "(a list), expected a string",
    )
    assert len(str(error)) < 150 + len(path) + len(chat_readers.SKIP_BAD_HINT)
    path = _write(tmp_path, "e.jsonl", [json.dumps({**GOOD, odd: 1})])
    error = _one_line_error(
        lambda: chat_readers.read_jsonl(path), f"{path}:1", "found unknown field 'a\\nb\\u2028c"
    )
    assert len(str(error).splitlines()) == 1


# OpenChat's own test conversations (ochat/tests/test_model_config.py), as written
OPENCHAT_TESTS = [
    '{"condition": "GPT4", "items": [{"role": "user", "content": "What\'s the weather like?", "weight": 0.0}, {"role": "assistant", "content": "I\'m an AI and don\'t have access to real-time data.", "weight": 0.1}, {"role": "user", "content": "Oh, right. How can I know?", "weight": 0.0}, {"role": "assistant", "content": "You can check a weather website or app for the most current information.", "weight": 1.0}]}',  # noqa: E501
    '{"condition": "GPT3", "items": [{"role": "user", "content": "What is AI?", "weight": 0.5}, {"role": "assistant", "content": "AI stands for Artificial Intelligence. It refers to the simulation of human intelligence processes by machines.", "weight": 0.5}, {"role": "user", "content": "Can you learn?", "weight": 0.5}, {"role": "assistant", "content": "I can\'t learn or remember information like humans. I generate responses based on pre-existing data.", "weight": 0.5}]}',  # noqa: E501
    '{"system": "You are a helpful assistant.", "condition": "GPT3", "items": [{"role": "user", "content": "Can you recommend a book?", "weight": 0.0}, {"role": "assistant", "content": "Sure. \'Sapiens: A Brief History of Humankind\' by Yuval Noah Harari is a great read.", "weight": 1.0}, {"role": "user", "content": "What\'s it about?", "weight": 0.0}, {"role": "assistant", "content": "It\'s about the history of the human species from the evolution of Homo Sapiens in Africa up to the present day.", "weight": 0.1}]}',  # noqa: E501
    '{"system": "<s>You are a helpful assistant.", "condition": "GPT4", "items": [{"role": "user", "content": "What do <s> </s> <|end_of_turn|> mean?", "weight": 0.0}, {"role": "assistant", "content": "<s> </s> <|end_of_turn|> are special tokens.", "weight": 1.0}]}',  # noqa: E501
]


def test_openchat_test_conversations(tmp_path):
    path = _write(tmp_path, "openchat.jsonl", OPENCHAT_TESTS)
    convs = chat_readers.read_jsonl(path)
    assert [c.condition for c in convs] == ["GPT4", "GPT3", "GPT3", "GPT4"]
    assert [c.class_name for c in convs] == ["GPT4", "GPT3", "GPT3", "GPT4"]
    assert [c.system for c in convs] == [
        None,
        None,
        "You are a helpful assistant.",
        "<s>You are a helpful assistant.",
    ]
    assert [[m["weight"] for m in c.messages] for c in convs] == [
        [0.0, 0.1, 0.0, 1.0],
        [0.5, 0.5, 0.5, 0.5],
        [0.0, 1.0, 0.0, 0.1],
        [0.0, 1.0],
    ]
    assert [m["role"] for m in convs[0].messages] == ["user", "assistant"] * 2
    assert convs[3].messages[1]["content"] == "<s> </s> <|end_of_turn|> are special tokens."
    assert [c.source for c in convs] == [f"{path}:{k}" for k in range(1, 5)]


def test_jsonl_fields(tmp_path):
    path = _write(
        tmp_path,
        "d.jsonl",
        [
            json.dumps({**GOOD, "class": "expert", "system": "S"}),
            "",
            json.dumps({**GOOD, "condition": ""}),
        ],
    )
    a, b = chat_readers.read_jsonl(path)
    assert (a.class_name, a.condition, a.system, a.source) == (
        "expert",
        "GPT4 Correct",
        "S",
        f"{path}:1",
    )
    assert (b.class_name, b.condition, b.source) == ("", "", f"{path}:3")
    # condition absent = none; system absent, null or "" = none; an id is kept out of the way
    path = tmp_path / "e.jsonl"  # with a UTF-8 byte-order mark and Windows line ends
    path.write_bytes(
        b"\xef\xbb\xbf"
        + "\r\n".join(
            [
                json.dumps({"items": GOOD["items"]}),
                json.dumps({"items": GOOD["items"], "system": ""}),
                json.dumps(
                    {"items": GOOD["items"], "system": None, "condition": "GPT3", "id": [1]}
                ),
            ]
        ).encode()
    )
    convs = chat_readers.read_jsonl(str(path))
    assert [(c.condition, c.class_name, c.system) for c in convs] == [
        ("", "", None),
        ("", "", None),
        ("GPT3", "GPT3", None),
    ]


def _sharegpt_records():
    return [
        {
            "id": "a",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
        },
        {
            "id": "b",
            "conversations": [
                {"from": "gpt", "value": "leftover"},
                {"from": "human", "value": "Q"},
                {"from": "gpt", "value": "A"},
            ],
            "model": "gpt-4",
        },
        {
            "id": "c",
            "conversations": [
                {"from": "system", "value": "Be nice."},
                {"from": "human", "value": "Q"},
                {"from": "gpt", "value": "A"},
            ],
        },
    ]


def test_sharegpt_cut_off_mid_record(tmp_path):
    text = json.dumps(_sharegpt_records(), indent=2)
    cut = text.index('"Be nice."') + 5  # inside the third record's string
    path = tmp_path / "cut.json"
    path.write_text(text[:cut])
    stats = collections.Counter()
    convs = chat_readers.read_sharegpt(str(path), stats=stats)
    assert [c.messages for c in convs] == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
    ]
    assert stats["records read"] == 2 and stats["leading 'gpt' turns dropped"] == 1
    [note] = [k for k in stats if k.startswith("incomplete last record")]
    start_c = text.index('{\n    "id": "c"')  # ASCII: characters are bytes
    assert f"line {text[:start_c].count(chr(10)) + 1}, byte {start_c})" in note
    # cut between records, and a complete file: the system turn becomes the system prompt
    path.write_text(text[: text.index('"id": "b"')])
    assert len(chat_readers.read_sharegpt(str(path))) == 1
    path.write_text(text)
    convs = chat_readers.read_sharegpt(
        str(path), condition=None, skip_bad=True, stats=(stats := collections.Counter())
    )
    # "b" has model gpt-4; "a" and "c" have none: skipped
    assert [c.condition for c in convs] == ["GPT4"]
    assert stats["skipped: missing field"] == 2 and convs[0].messages[0]["content"] == "Q"
    convs = chat_readers.read_sharegpt(str(path), condition="GPT4 Correct")
    assert convs[2].system == "Be nice." and convs[2].messages[0] == {
        "role": "user",
        "content": "Q",
    }


def test_sharegpt_cut_off_inside_a_character(tmp_path):
    text = json.dumps(
        _sharegpt_records()[:1] + [{"id": "é", "conversations": []}], ensure_ascii=False
    ).encode()
    path = tmp_path / "cut.json"
    path.write_bytes(text[: text.index("é".encode()) + 1])  # the file ends with half of "é"
    stats = collections.Counter()
    assert (
        len(chat_readers.read_sharegpt(str(path), stats=stats)) == 1 and stats["records read"] == 1
    )


@pytest.mark.parametrize(
    "turns,field,reason",
    [
        (
            [{"from": "human", "value": "Q"}, {"from": "bing", "value": "A"}],
            "conversations[1].from",
            "unknown role",
        ),
        (
            [{"from": "human", "value": "Q"}, {"from": "gpt", "value": ""}],
            "conversations[1].value",
            "empty content",
        ),
        ([{"from": "human", "value": "Q"}], "conversations", "no assistant turn"),
        ([{"from": "gpt", "value": "A"}], "conversations", "no assistant turn"),
        (
            [
                {"from": "human", "value": "Q"},
                {"from": "system", "value": "S"},
                {"from": "gpt", "value": "A"},
            ],
            "conversations[1].from",
            "unknown role",
        ),
        ([{"from": "human"}], "conversations[0]", "missing field"),
    ],
)
def test_bad_sharegpt_names_file_line_and_field(tmp_path, turns, field, reason):
    records = _sharegpt_records()[:1] + [{"id": "x", "conversations": turns}]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(records, indent=1))
    # where the second record starts
    line = json.dumps(records, indent=1).split("\n").index(" {", 2) + 1
    with pytest.raises(DataError, match=f"s.json:{line} \\(record 1, id 'x'\\)") as e:
        chat_readers.read_sharegpt(str(path))
    assert field in str(e.value) and e.value.reason == reason
    stats = collections.Counter()
    assert len(chat_readers.read_sharegpt(str(path), skip_bad=True, stats=stats)) == 1
    assert stats[f"skipped: {reason}"] == 1


HI = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]

# (the second record, the field named, found, expected, reason)
BAD_SHAREGPT = [
    (
        "oops",
        "record",
        "found 'oops' (a string)",
        'expected an object {"id", "conversations"',
        "bad field",
    ),
    ({"id": "x"}, "conversations", "missing", "expected a list of turns", "missing field"),
    (
        {"id": "x", "conversations": {"from": "human"}},
        "conversations",
        "found {'from': 'human'} (an object)",
        "expected a list of turns",
        "bad field",
    ),
    (
        {"id": "x", "conversations": [HI[0], "A"]},
        "conversations[1]",
        "found 'A' (a string)",
        'expected an object {"from", "value"}',
        "bad field",
    ),
    (
        {"id": "x", "conversations": [{"from": ["human"], "value": "Q"}]},
        "conversations[0].from",
        "found ['human'] (a list)",
        'expected "human" or "gpt"',
        "unknown role",
    ),
    (
        {"id": "x", "conversations": [{"value": "Q"}]},
        "conversations[0].from",
        "missing",
        'expected "human"',
        "missing field",
    ),
    (
        {"id": "x", "conversations": [HI[0], {"from": "gpt", "value": 42}]},
        "conversations[1].value",
        "found 42 (a number)",
        "expected a string",
        "bad field",
    ),
    (
        {"id": "x", "conversations": [HI[0], {"from": "gpt", "value": " \n"}]},
        "conversations[1].value",
        "found ' \\n' (a string)",
        "expected text that is not blank",
        "empty content",
    ),
    (
        {"id": "x", "conversations": HI, "model": None},
        "model",
        "found None (null)",
        "expected a string for --class_map",
        "missing field",
    ),
    (
        {"id": "x", "conversations": HI},
        "model",
        "missing",
        "expected a string for --class_map (or give the source its class, CLASS=path)",
        "missing field",
    ),
]


@pytest.mark.parametrize("record,field,found,expected,reason", BAD_SHAREGPT)
def test_bad_sharegpt_record_says_file_line_field_found_expected(
    tmp_path, record, field, found, expected, reason
):
    records = [{"id": "a", "conversations": HI, "model": "gpt-4"}, record]
    # record 1: line 3
    path = _write(tmp_path, "s.json", ["[", ",\n".join(json.dumps(r) for r in records), "]"])
    where = f"{path}:3 (record 1, id {'None' if record == 'oops' else repr('x')})"
    error = _one_line_error(
        lambda: chat_readers.read_sharegpt(path, condition=None), where, field, found, expected
    )
    assert error.reason == reason
    stats = collections.Counter()
    assert len(chat_readers.read_sharegpt(path, condition=None, skip_bad=True, stats=stats)) == 1
    assert stats[f"skipped: {reason}"] == 1


def test_bad_sharegpt_files(tmp_path):
    path = _write(tmp_path, "o.json", ["", json.dumps({"id": "a", "conversations": HI})])
    _one_line_error(
        lambda: chat_readers.read_sharegpt(path),
        f"{path}:2",
        'found \'{"id": "a"',
        "expected a JSON array '[...]'",
    )
    path = _write(tmp_path, "e.json", ["[ ]"])
    _one_line_error(
        lambda: chat_readers.read_sharegpt(path), path, "found no record, expected a JSON array"
    )
    path = _write(
        tmp_path, "j.json", [json.dumps([{"id": "a", "conversations": HI}]).rstrip("]") + " x]"]
    )
    _one_line_error(
        lambda: chat_readers.read_sharegpt(path), f"{path}:1", "found 'x]", "expected ',' or ']'"
    )


def test_sharegpt_malformed_json_in_the_middle(tmp_path):
    text = json.dumps(_sharegpt_records(), indent=1).replace('"Hello"', '"Hello" oops', 1)
    path = tmp_path / "m.json"
    path.write_text(text)
    line = text[: text.index("oops")].count("\n") + 1
    with pytest.raises(DataError, match=f"m.json:{line}: malformed JSON"):
        chat_readers.read_sharegpt(str(path))
    column = text.index("oops") - text.rindex("\n", 0, text.index("oops"))
    _one_line_error(
        lambda: chat_readers.read_sharegpt(str(path)),
        f"{path}:{line}",
        f"malformed JSON: Expecting ',' delimiter at column {column}",
    )


def test_real_sharegpt_file():
    stats = collections.Counter()
    convs = chat_sources.read_sources("sharegpt", skip_bad=True, stats=stats)
    assert stats["records read"] > 17000
    assert sum(v for k, v in stats.items() if k.startswith("incomplete last record")) == 1
    assert len(convs) > 17000
    assert all(c.messages[0]["role"] == "user" for c in convs)
    assert stats["records read"] == 17_671 and len(convs) == 17_309  # as read before the rewrite


# ------------------------------------------------------------------------------------------------ sources


def test_parse_sources(tmp_path):
    assert chat_sources.parse_sources("GPT4 Correct=gpt4.jsonl, GPT3 = gpt35.json,sharegpt") == [
        ("GPT4 Correct", "gpt4.jsonl"),
        ("GPT3", "gpt35.json"),
        (None, "sharegpt"),
    ]
    assert chat_sources.parse_sources("a.jsonl") == [(None, "a.jsonl")]
    assert chat_sources.parse_sources("X=a=b.json") == [("X", "a=b.json")]  # split at the first "="
    odd = _write(tmp_path, "a=b.jsonl", [])  # a path that exists is a path, "=" and "," and all
    assert chat_sources.parse_sources(f"{odd},C={odd}") == [(None, odd), ("C", odd)]
    comma = _write(tmp_path, "x,y.json", [])
    assert chat_sources.parse_sources(comma) == [(None, comma)]


@pytest.mark.parametrize(
    "spec,where,found",
    [
        ("a.jsonl,,b.jsonl", "--data 'a.jsonl,,b.jsonl': item 2", "found ''"),
        ("a.jsonl,", "--data 'a.jsonl,': item 2", "found ''"),
        ("=a.jsonl", "--data '=a.jsonl': item 1", "found '=a.jsonl'"),
        ("a.jsonl, GPT3= ", "--data 'a.jsonl, GPT3= ': item 2", "found ' GPT3= '"),
    ],
)
def test_bad_source_specs(spec, where, found):
    error = _one_line_error(
        lambda: chat_sources.parse_sources(spec), where, found, "expected PATH or CLASS=PATH"
    )
    assert error.reason == "bad source"


def test_unknown_extension(tmp_path):
    _one_line_error(
        lambda: chat_sources.parse_sources("a.jsonl,X=b.csv"),
        "b.csv",
        "found an unknown extension",
        "expected a .jsonl (OpenChat's) or .json (ShareGPT) file, or 'sharegpt'",
    )
    good = _write(tmp_path, "g.jsonl", [json.dumps(GOOD)])
    _one_line_error(
        lambda: chat_sources.read_sources(f"{good},X=b.txt"), "b.txt", "unknown extension"
    )


def test_read_sources_classes_override_conditions(tmp_path):
    gpt4 = _write(
        tmp_path,
        "gpt4.jsonl",
        [
            json.dumps({**GOOD, "condition": "GPT3", "class": "c"}),
            json.dumps({"items": GOOD["items"], "system": "S"}),
        ],
    )
    gpt35 = tmp_path / "gpt35.json"  # no "model" field: with a class, none is needed
    gpt35.write_text(
        json.dumps([{"id": "a", "conversations": HI}, {"id": "b", "conversations": HI}])
    )
    convs = chat_sources.read_sources(f"GPT4 Correct={gpt4},GPT3={gpt35}", condition=None)
    assert [(c.condition, c.class_name) for c in convs] == [
        ("GPT4 Correct", "GPT4 Correct")
    ] * 2 + [("GPT3", "GPT3")] * 2
    assert [c.source for c in convs][:2] == [f"{gpt4}:1", f"{gpt4}:2"] and convs[1].system == "S"
    assert "(record 1, id 'b')" in convs[3].source
    # order kept, and without a class each source keeps its own: the JSONL's fields, ShareGPT's `condition`
    convs = chat_sources.read_sources(f"{gpt35},{gpt4}", condition="Human")
    assert [(c.condition, c.class_name) for c in convs] == [("Human", "Human")] * 2 + [
        ("GPT3", "c"),
        ("", ""),
    ]
    assert chat_sources.read_sources(f"Z={gpt4}")[0].condition == "Z"
    with pytest.raises(DataError, match="model: missing"):
        chat_sources.read_sources(str(gpt35), condition=None)


def test_data_error_survives_pickling():  # as when raised in a tokenizer worker process
    error = pickle.loads(
        pickle.dumps(DataError("f.jsonl:3: items", "found 1 (a number), expected a list", "x"))
    )
    assert (str(error), error.reason) == (
        "f.jsonl:3: items: found 1 (a number), expected a list",
        "x",
    )


def test_check_messages_allows_user_weights():
    chat_readers.check_messages(
        [{"role": "user", "content": "Q", "weight": 0.5}, {"role": "assistant", "content": "A"}]
    )
    chat_readers.check_messages([{"role": "user", "content": "Q"}], need_assistant=False)
    _one_line_error(
        lambda: chat_readers.check_messages([{"role": "user", "content": "Q"}]),
        "messages",
        "found only user messages",
    )
