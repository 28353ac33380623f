"""OpenChat's data options (issue 27): per-sequence weights, refusals at weight 0, classes from a field of each
ShareGPT record by the user's map; and the data side of the command lines (one flag spelling, checks before any
reading). Expected tokens and weights are assembled by hand from sentencepiece's own encode of each piece (an
independent SentencePieceProcessor) and the template of the facts file."""

import collections
import json

import pytest
import sentencepiece as spm

import chat_readers
import chat_sources
import data
import data_cli
import loss_weighting
import prepare
import tokenized_data
import tokenizing
import train_config
from chat_readers import DataError

BOS, EOT = 1, 32000


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer()


@pytest.fixture(scope="module")
def sp():  # the reference: plain sentencepiece on the same file
    return spm.SentencePieceProcessor(model_file=tokenizing.default_tokenizer_path())


def _chat(*pairs):
    return [
        m
        for q, a in pairs
        for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
    ]


def _sharegpt(tmp_path, records, name="mix.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records, indent=1))
    return str(path)


# ---------------------------------------------------------------------------------------- per-sequence weights


def test_per_sequence_weights_of_three_replies_by_hand(tok, sp):
    """Three replies of different lengths, class weight 0.1: each reply's tokens (its content and its end of turn)
    carry 0.1 / (their count), so each reply sums to 0.1; everything else stays 0."""
    pairs = [
        ("Hello", "Hi there! How can I help you today?"),
        ("2+2?", "4"),
        ("Thanks", "You are welcome."),
    ]
    tokens, weights = data.encode_conversation(
        tok, _chat(*pairs), "GPT3", weight=0.1, per_sequence=True
    )
    user, assistant = sp.encode("GPT3 User:"), sp.encode("GPT3 Assistant:")
    expected_tokens, expected_weights = [BOS], [0.0]
    for q, a in pairs:
        reply = sp.encode(a) + [EOT]  # the reply's length in tokens: content plus end of turn
        expected_tokens += user + sp.encode(q) + [EOT] + assistant + reply
        prompt = len(user) + len(sp.encode(q)) + 1 + len(assistant)
        expected_weights += [0.0] * prompt + [0.1 / len(reply)] * len(reply)
    assert tokens == expected_tokens
    assert weights == pytest.approx(expected_weights, rel=1e-6)
    lengths = [len(sp.encode(a)) + 1 for _, a in pairs]
    # "4" is "▁", "4": the short reply weighs as much as the long
    assert len(set(lengths)) == 3 and lengths[1] == 3
    # off (the default): the class weight on every token, as before
    assert data.encode_conversation(tok, _chat(*pairs), "GPT3", weight=0.1)[1] == pytest.approx(
        [w and 0.1 for w in expected_weights]
    )


def test_per_sequence_weights_in_tokenize_dataset_and_the_expert_reward(tok):
    """Through tokenize_dataset: every kept reply sums to its weight, so sum(w) per class is weight x replies; the
    reward used to pick the expert is then per reply, not per token (per token, long expert replies would lose)."""
    convs = [
        chat_readers.Conversation(
            _chat(("Q", "A long answer of many words, " * 5)), "GPT4", None, "GPT4"
        ),
        chat_readers.Conversation(_chat(("Q", "Yes"), ("Q2", "No")), "GPT3", None, "GPT3"),
    ]
    ds = data.tokenize_dataset(
        convs, tok, 512, {"GPT4": 1.0, "GPT3": 0.1}, workers=1, per_sequence=True
    )
    classes = ds.meta["summary"]["classes"]
    assert classes["GPT4"]["weight_sum"] == pytest.approx(1.0, rel=1e-5)
    assert classes["GPT3"]["weight_sum"] == pytest.approx(0.2, rel=1e-5)
    assert classes["GPT3"]["supervised_replies"] == 2 and ds.meta["per_sequence_weights"] is True
    rewards = prepare.class_rewards(ds)
    assert rewards == pytest.approx({"GPT4": 1.0, "GPT3": 0.1}, rel=1e-5)


# ------------------------------------------------------------------------------------------------- refusals


def test_a_refusal_reply_gets_weight_0_and_the_reply_next_to_it_is_untouched(tok, sp):
    # curly apostrophes, as ShareGPT often has
    refusal = "I\u2019m sorry, but I can\u2019t help with that."
    # "as an aid": no AI
    pairs = [("Do my taxes", refusal), ("Then 2+2?", "2+2 is 4, as an aid to memory.")]
    [c] = loss_weighting.zero_refusals(
        [chat_readers.Conversation(_chat(*pairs), "GPT3", None, "GPT3")],
        loss_weighting.REFUSAL_PHRASES,
    )
    assert c.refusals == (0,) and c.messages[1]["weight"] == 0.0 and "weight" not in c.messages[3]
    tokens, weights = data.encode_conversation(tok, c.messages, "GPT3", weight=0.1)
    plain_tokens, plain_weights = data.encode_conversation(tok, _chat(*pairs), "GPT3", weight=0.1)
    zeroed = len(sp.encode(refusal)) + 1
    start = (
        1
        + len(sp.encode("GPT3 User:"))
        + len(sp.encode("Do my taxes"))
        + 1
        + len(sp.encode("GPT3 Assistant:"))
    )
    assert tokens == plain_tokens and plain_weights[start : start + zeroed] == pytest.approx(
        [0.1] * zeroed
    )
    assert weights == plain_weights[:start] + [0.0] * zeroed + plain_weights[start + zeroed :]
    # the summary counts the zeroed replies and tokens of each class
    ds = data.tokenize_dataset([c], tok, 512, {"GPT3": 0.1}, workers=1)
    gpt3 = ds.meta["summary"]["classes"]["GPT3"]
    assert (gpt3["refusals_zeroed"], gpt3["refusal_tokens_zeroed"], gpt3["replies"]) == (
        1,
        zeroed,
        2,
    )


def test_own_refusal_phrases_from_a_file(tmp_path):
    path = tmp_path / "phrases.txt"
    path.write_text("Not today\n\n  as A LANGUAGE model \n")
    phrases = loss_weighting.refusal_phrases(True, str(path))
    assert phrases == ("Not today", "as A LANGUAGE model")
    assert loss_weighting.is_refusal("Well, as a language model I...", phrases)
    assert not loss_weighting.is_refusal("As an AI language model, ...", ("Not today",))
    assert loss_weighting.refusal_phrases(False) is None
    assert loss_weighting.refusal_phrases(True) == loss_weighting.REFUSAL_PHRASES
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    for args, says in [
        ((True, str(empty)), "no phrase in it"),
        ((True, str(tmp_path / "no.txt")), "cannot read it"),
        ((False, str(path)), "needs --zero_refusals=true"),
    ]:
        with pytest.raises(ValueError, match="--refusal_phrases=") as e:
            loss_weighting.refusal_phrases(*args)
        assert says in str(e.value) and "\n" not in str(e.value)


def test_data_py_show_marks_refusals(tmp_path, capsys):
    path = _sharegpt(
        tmp_path,
        [
            {
                "id": "a",
                "conversations": [
                    {"from": "human", "value": "Q"},
                    {"from": "gpt", "value": "As an AI language model, I cannot."},
                    {"from": "human", "value": "Q2"},
                    {"from": "gpt", "value": "Sure."},
                ],
            }
        ],
    )
    data_cli.main(["show", "--data", path, "--zero_refusals"])
    out = capsys.readouterr().out
    assert "1 refusal(s) at weight 0" in out
    assert (
        "refusal, weight 0 (--zero_refusals) [▁As][▁an][▁AI]" in out
        and "weight 1     [▁Sure][.]" in out
    )


# ---------------------------------------------------------------------------------------- classes from a field


def _record(model):
    turns = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    return {"id": model, "model": model, "conversations": turns}


MIXED = [
    _record(model) for model in ("gpt-4", "gpt-3.5-turbo", "GPT-4", "claude-2", "text-davinci-002")
]


def test_a_mixed_sharegpt_file_splits_into_the_mapped_classes_and_counts_the_rest(tmp_path):
    path = _sharegpt(tmp_path, MIXED)
    rule = ("model", chat_readers.parse_class_map("gpt-4=GPT4 Correct, gpt-3.5-turbo=GPT3"))
    stats = collections.Counter()
    convs = chat_sources.read_sources(path, stats=stats, classes=rule)
    assert [(c.class_name, c.condition) for c in convs] == [
        ("GPT4 Correct", "GPT4 Correct"),
        ("GPT3", "GPT3"),
        # values ignore case
        ("GPT4 Correct", "GPT4 Correct"),
    ]
    assert (
        stats["left out: model value in no class of --class_map"] == 2
        and stats["records read"] == 5
    )
    # a JSON file, a glob, first match wins; the default map is the old fixed rule
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"gpt-4*": "GPT4", "*": "Other"}))
    convs = chat_sources.read_sources(
        path, classes=("model", chat_readers.parse_class_map(str(mapping)))
    )
    assert [c.class_name for c in convs] == ["GPT4", "Other", "GPT4", "Other", "Other"]
    convs = chat_sources.read_sources(path, condition=None)  # --sharegpt_condition=from_model
    assert [c.class_name for c in convs] == ["GPT4", "GPT3", "GPT4", "GPT3", "GPT3"]
    # a source with its class takes it, whatever the field says
    assert {c.class_name for c in chat_sources.read_sources(f"X={path}", classes=rule)} == {"X"}


def test_train_config_reads_the_class_flags_and_the_old_spelling(tmp_path):
    path = _sharegpt(tmp_path, MIXED)
    cfg = train_config.parse_config(
        [
            f"--data={path}",
            "--class_from_field=model",
            "--class_map=gpt-4=GPT4 Correct,gpt-3.5-turbo=GPT3",
            "--class_weights=GPT4 Correct=1,GPT3=0.1",
        ]
    )
    assert prepare.class_rule(cfg) == (
        "model",
        [("gpt-4", "GPT4 Correct"), ("gpt-3.5-turbo", "GPT3")],
    )
    old = train_config.parse_config([f"--data={path}", "--sharegpt_condition=from_model"])
    assert prepare.class_rule(old) == ("model", [("*gpt-4*", "GPT4"), ("*", "GPT3")])
    assert prepare.class_rule(train_config.parse_config([f"--data={path}"])) is None


@pytest.mark.parametrize(
    "flags, says",
    [
        (
            ["--class_map=gpt-4"],
            "--class_map 'gpt-4': found 'gpt-4' (an item), expected VALUE=CLASS items",
        ),
        (["--class_map=gpt-4=A,gpt-4=B"], "a value is given twice"),
        (["--class_map=gpt-4=A,=B"], "found '=B'"),
        (
            ["--class_map=MAP.json"],
            "--class_map MAP.json: found ['gpt-4'] (a list), expected a JSON object",
        ),
        (["--class_map=nope.json"], "--class_map nope.json: cannot read it: No such file"),
        (
            ["--class_map=gpt-4=GPT4 Correct,*=GPT3.5", "--class_weights=GPT4 Correct=1,GPT3=0.1"],
            "--class_map gives class 'GPT3.5', which --class_weights names no weight for",
        ),
        (
            ["--zero_refusals=false", "--refusal_phrases=x.txt"],
            "--refusal_phrases=x.txt needs --zero_refusals=true",
        ),
    ],
)
def test_bad_class_maps_and_phrases_are_one_line_naming_the_flag(
    tmp_path, monkeypatch, flags, says
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "MAP.json").write_text('["gpt-4"]')
    path = _sharegpt(tmp_path, MIXED)
    with pytest.raises(ValueError) as e:
        train_config.parse_config([f"--data={path}", "--class_from_field=model", *flags])
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


# --------------------------------------------------------------------------------------------- command lines


def test_data_py_takes_train_py_spellings_and_the_dashed_ones(tmp_path, capsys):
    path = _sharegpt(tmp_path, MIXED)
    for spelling in (
        [
            "--data",
            path,
            "--class_weights",
            "GPT4 Correct=1,GPT3=0.1",
            "--max_seq_len",
            "64",
            "--class_from_field",
            "model",
            "--class_map",
            "gpt-4=GPT4 Correct,*=GPT3",
            "--skip_bad",
        ],
        [
            "--input",
            path,
            "--class-weights",
            "GPT4 Correct=1,GPT3=0.1",
            "--max-seq-len",
            "64",
            "--class-from-field",
            "model",
            "--class-map",
            "gpt-4=GPT4 Correct,*=GPT3",
            "--skip-bad",
        ],
    ):
        out = tmp_path / "out"
        data_cli.main(["tokenize", *spelling, "--out", str(out)])
        ds = tokenized_data.TokenizedDataset.load(str(out))
        assert ds.class_names == ["GPT3", "GPT4 Correct"] and ds.class_ids.tolist() == [
            1,
            0,
            1,
            0,
            0,
        ]
        assert ds.meta["max_seq_len"] == 64 and ds.meta["class_weights"] == {
            "GPT4 Correct": 1.0,
            "GPT3": 0.1,
        }
    capsys.readouterr()


def test_a_missing_data_file_is_named_with_the_flag_before_anything_is_read(tmp_path):
    good = _sharegpt(tmp_path, MIXED)
    with pytest.raises(DataError) as e:
        chat_sources.read_sources(f"A={good},B={tmp_path / 'nope.json'}")
    assert str(e.value).startswith(
        f"--data: {tmp_path / 'nope.json'}: no such file"
    ) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="^--data: .*nope.jsonl: no such file"):
        train_config.parse_config([f"--data=GPT4 Correct={tmp_path / 'nope.jsonl'}"])


def test_a_file_without_its_class_is_refused_naming_the_class_path_form(tmp_path):
    path = tmp_path / "good.jsonl"
    path.write_text(json.dumps({"items": _chat(("Q", "A"))}) + "\n")
    convs = chat_sources.read_sources(str(path))
    with pytest.raises(DataError) as e:
        chat_sources.check_class_weights(convs, {"GPT4 Correct": 1.0, "GPT3": 0.1})
    message = str(e.value)
    assert (
        message.startswith("--class_weights: ")
        and f'CLASS=path form, --data="GPT4 Correct={path}"' in message
    )
    assert "no class (no CLASS= before it" in message
    chat_sources.check_class_weights(convs, None)  # no --class_weights: every class weighs 1
    chat_sources.check_class_weights(chat_sources.read_sources(f"GPT3={path}"), {"GPT3": 0.1})


def test_same_file_for_two_classes_is_found(tmp_path):
    path = _sharegpt(tmp_path, MIXED)
    other = _sharegpt(tmp_path, MIXED, "other.json")
    assert chat_sources.same_files(f"A={path},B={path},C={other}") == [path]
    assert chat_sources.same_files(f"A={path},C={other}") == []


def test_a_prepared_directory_keeps_its_per_sequence_weights(tok, tmp_path):
    """A directory of `python data_cli.py tokenize --per_sequence_weights`: the run's flag must agree with it, and
    --class_weights is checked against the class weights it was made with (its tokens carry them divided)."""
    convs = [
        chat_readers.Conversation(_chat(("Q", "A fairly long answer")), "A", None, "A"),
        chat_readers.Conversation(_chat(("Q", "Short")), "B", None, "B"),
    ]
    ds = data.tokenize_dataset(convs, tok, 256, {"A": 1.0, "B": 0.1}, workers=1, per_sequence=True)
    ds.meta["trained_weights"] = prepare.trained_weights(ds)
    config = train_config.TrainConfig
    prepare.check_prepared_weights(
        config(data="dir", class_weights="A=1,B=0.1", per_sequence_weights=True), ds
    )
    with pytest.raises(
        ValueError, match="^--per_sequence_weights=false, but --data=dir was tokenized with it on"
    ):
        prepare.check_prepared_weights(config(data="dir", class_weights="A=1,B=0.1"), ds)
    with pytest.raises(
        ValueError, match="^--class_weights: B=0.3, but --data=dir was tokenized with weight 0.1"
    ):
        prepare.check_prepared_weights(
            config(data="dir", class_weights="A=1,B=0.3", per_sequence_weights=True), ds
        )
