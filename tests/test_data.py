"""data.py and toy_task.py: the OpenChat template token for token, bad input, ShareGPT, packing, batches.

Expected ids come from the facts file and from sentencepiece's own encode of each piece (an independent
SentencePieceProcessor), assembled by hand here.
"""

import collections
import json
import os
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_readers import GOOD, _write

import chat_readers
import chat_sources
import data
import data_cli
import packing
import tokenized_data
import tokenizing
import toy_task
from data import DataError

BOS, EOT = 1, 32000


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer()


@pytest.fixture(scope="module")
def sp():  # the reference: plain sentencepiece on the same file
    return spm.SentencePieceProcessor(model_file=tokenizing.default_tokenizer_path())


# ------------------------------------------------------------------------------------------------ template


def test_role_prefix_ids_match_the_facts(tok):
    t = data.TEMPLATES["openchat_3.5"]
    assert tok.encode_special(t.head("User", "GPT4")) == [420, 6316, 28781, 1247, 28747]
    assert tok.encode_special(t.head("Assistant", "GPT4")) == [420, 6316, 28781, 21631, 28747]
    assert t.head("User") == "User:" and tok.template == "openchat_3.5" and tok.word_start
    assert (tok.bos_id, tok.eot_id, tok.vocab_size) == (1, 32000, 32001)


def test_hand_written_conversation(tok, sp):
    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "weight": 0.5},
    ]
    tokens, weights = data.encode_conversation(tok, messages, "GPT4", weight=0.1)
    # facts file
    user, assistant = [420, 6316, 28781, 1247, 28747], [420, 6316, 28781, 21631, 28747]
    hello, hi, q, four = (
        sp.encode("Hello"),
        sp.encode("Hi there!"),
        sp.encode("2+2?"),
        sp.encode("4"),
    )
    assert hello == [22557]
    expected = (
        [BOS]
        + user
        + hello
        + [EOT]
        + assistant
        + hi
        + [EOT]
        + user
        + q
        + [EOT]
        + assistant
        + four
        + [EOT]
    )
    expected_w = (
        [0.0] * (1 + 5 + 1 + 1 + 5)
        + [0.1] * (len(hi) + 1)
        + [0.0] * (5 + len(q) + 1 + 5)
        + [0.5] * (len(four) + 1)
    )
    assert tokens == expected
    assert weights == pytest.approx(expected_w)


def test_pieces_equal_the_hf_text_template(tok, sp):
    # "GPT4 Correct User: Hello" as one text gives the same ids as the prefix and the content on their own
    tokens, _ = data.encode_conversation(
        tok,
        [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Yes."}],
        "GPT4 Correct",
    )
    assert tokens == (
        [BOS]
        + sp.encode("GPT4 Correct User: Hello world")
        + [EOT]
        + sp.encode("GPT4 Correct Assistant: Yes.")
        + [EOT]
    )


def test_special_token_text_stays_text(tok, sp):
    content = "a <s> b </s> c <|end_of_turn|> <unk>"
    tokens, weights = data.encode_conversation(
        tok,
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": content}],
        "GPT4 Correct",
    )
    body = sp.encode(content)
    assert BOS not in body and 2 not in body and EOT not in body
    assert tokens[-len(body) - 1 :] == body + [EOT]
    assert tokens.count(EOT) == 2 and tokens.count(BOS) == 1
    assert tok.encode("<s>") == [523, 28713, 28767]  # "▁<", "s", ">": not the BOS control symbol
    assert tok.decode(tokens[1:]).endswith("Assistant: " + content + "<|end_of_turn|>")
    # a whole message (or system prompt) that is exactly a special token's text is text too
    messages = [
        {"role": "user", "content": "<|end_of_turn|>"},
        {"role": "assistant", "content": "<s>"},
    ]
    tokens, _ = data.encode_conversation(tok, messages, "GPT4 Correct", system="<s>")
    assert tokens.count(EOT) == 3 and tokens.count(BOS) == 1 and tokens[1:4] == sp.encode("<s>")
    assert data.encode_prompt(tok, messages, "GPT4 Correct", "<s>") == tokens + sp.encode(
        "GPT4 Correct Assistant:"
    )


def test_system_prompt_and_empty_condition(tok, sp):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    tokens, weights = data.encode_conversation(tok, msgs, "", system="Be brief.")
    system = sp.encode("Be brief.")
    expected = (
        [BOS]
        + system
        + [EOT]
        + sp.encode("User:")
        + sp.encode("Hi")
        + [EOT]
        + sp.encode("Assistant:")
        + sp.encode("Hello")
        + [EOT]
    )
    assert sp.encode("User:") == [1247, 28747]
    assert tokens == expected
    n_hello = len(sp.encode("Hello")) + 1
    assert weights == [0.0] * (len(expected) - n_hello) + [1.0] * n_hello


def test_encode_prompt_ends_with_the_assistant_prefix(tok, sp):
    prompt = data.encode_prompt(tok, [{"role": "user", "content": "Hello"}], "GPT4 Correct")
    assert prompt == [BOS] + sp.encode("GPT4 Correct User:") + [22557, EOT] + sp.encode(
        "GPT4 Correct Assistant:"
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=" a b\n\t1é▁👍\u3000.", max_size=12), max_size=6))
def test_encode_batch_equals_sentencepiece(texts):
    tok = _mistral()
    assert [ids.tolist() for ids in tok.encode_batch(texts)] == [tok.sp.encode(t) for t in texts]


def test_encode_batch_equals_sentencepiece_on_real_text(tok, sharegpt_head):
    texts = [m["content"] for c in sharegpt_head[:300] for m in c.messages]
    got = tok.encode_batch(texts)
    assert all(a.tolist() == b for a, b in zip(got, tok.sp.encode(texts)))
    assert tok._segments is not None  # the fast path was the one tested


_MISTRAL = []


def _mistral():
    if not _MISTRAL:
        _MISTRAL.append(data.load_tokenizer())
    return _MISTRAL[0]


def test_decode_writes_eot_as_text(tok):
    assert tok.decode([BOS, 22557, EOT, 22557]) == "Hello<|end_of_turn|>Hello"
    with pytest.raises(ValueError):
        tok.decode([32001])


def test_parse_class_weights():
    assert chat_sources.parse_class_weights("GPT4 Correct=1, GPT3=0.1") == {
        "GPT4 Correct": 1.0,
        "GPT3": 0.1,
    }
    for bad, says in [
        ("GPT4", "NAME=WEIGHT"),
        ("GPT4=x", "not a number"),
        ("GPT4=-1", ">= 0"),
        ("GPT4=1,GPT4=2", "twice"),
        ("GPT4=nan", "finite"),
    ]:
        with pytest.raises(ValueError, match=says):
            chat_sources.parse_class_weights(bad)


# ------------------------------------------------------------------------------------------ reading input


@pytest.fixture(scope="module")
def sharegpt_head():
    stats = collections.Counter()
    convs = chat_sources.read_sources("sharegpt", skip_bad=True, stats=stats)
    assert stats["records read"] > 17000
    assert sum(v for k, v in stats.items() if k.startswith("incomplete last record")) == 1
    return convs


# ------------------------------------------------------------------------------------------- tokenization


def _conv(*pairs, cls="GPT4 Correct", weight=None):
    messages = []
    for q, a in pairs:
        messages.append({"role": "user", "content": q})
        messages.append(
            {"role": "assistant", "content": a} | ({} if weight is None else {"weight": weight})
        )
    return chat_readers.Conversation(messages, cls, None, cls, "test")


def test_truncation_trailing_cut_and_drops(tok, sp):
    long = "word " * 40
    # truncated after its first exchange
    convs = [
        _conv(("Q", "A"), ("Q2", long)),
        # dropped: first exchange too long
        _conv(("Q", long)),
        chat_readers.Conversation(
            [
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"},
                {"role": "user", "content": "trailing"},
            ],
            "GPT3",
            None,
            "GPT3",
        ),
        _conv(("Q", "A"), weight=0.0),
    ]  # dropped: nothing to learn
    ds = data.tokenize_dataset(
        convs, tok, max_seq_len=30, class_weights={"GPT4 Correct": 1.0, "GPT3": 0.1}
    )
    first = (
        [BOS]
        + sp.encode("GPT4 Correct User:")
        + sp.encode("Q")
        + [EOT]
        + sp.encode("GPT4 Correct Assistant:")
        + sp.encode("A")
        + [EOT]
    )
    third = (
        [BOS]
        + sp.encode("GPT3 User:")
        + sp.encode("Q")
        + [EOT]
        + sp.encode("GPT3 Assistant:")
        + sp.encode("A")
        + [EOT]
    )
    assert len(ds) == 2 and ds.class_names == ["GPT3", "GPT4 Correct"]
    assert ds.tokens[ds.offsets[0] : ds.offsets[1]].tolist() == first
    assert ds.tokens[ds.offsets[1] : ds.offsets[2]].tolist() == third
    assert ds.weights[ds.offsets[2] - 2 :].tolist() == pytest.approx([0.1, 0.1])
    assert ds.class_ids.tolist() == [1, 0]
    s = ds.meta["summary"]
    assert s["truncated_to_context"] == 1
    assert s["dropped"] == {
        "its first exchange is longer than the context": 1,
        "no supervised tokens (all weights 0)": 1,
    }
    assert s["classes"]["GPT3"]["supervised_tokens"] == 2


def test_class_weights_errors_and_message_override(tok):
    with pytest.raises(DataError, match="test: class 'GPT3' has no weight"):
        data.tokenize_dataset(
            [_conv(("Q", "A"), cls="GPT3")], tok, 100, class_weights={"GPT4 Correct": 1.0}
        )
    ds = data.tokenize_dataset(
        [_conv(("Q", "A"), cls="GPT3", weight=0.3)], tok, 100, class_weights={}
    )
    assert ds.weights.tolist() == pytest.approx([0.0] * (len(ds.weights) - 2) + [0.3, 0.3])


def test_tokenize_workers_save_load(tok, sharegpt_head, tmp_path):
    convs = sharegpt_head[: 2 * data.CHUNK + 7]
    one = data.tokenize_dataset(convs, tok, 8192, workers=1)
    two = data.tokenize_dataset(convs, tok, 8192, workers=2)
    for name in ("tokens", "weights", "offsets", "class_ids"):
        assert np.array_equal(getattr(one, name), getattr(two, name))
    one.save(str(tmp_path / "ds"))
    back = tokenized_data.TokenizedDataset.load(str(tmp_path / "ds"))
    assert np.array_equal(back.tokens, one.tokens) and back.meta["summary"] == one.meta["summary"]
    c = convs[5]
    tokens, weights = data.encode_conversation(tok, c.messages, c.condition, c.system)
    assert (
        back.tokens[back.offsets[5] : back.offsets[6]].tolist()
        == tokens[: back.offsets[6] - back.offsets[5]]
    )


# ---------------------------------------------------------------------------------------------- toy task


def score_toy_answer(question, answer_text):
    """Exact match of the stripped answer with the true sum of a toy question "A+B="."""
    a, b = question.removesuffix("=").split("+")  # ValueError for anything else
    return answer_text.strip() == toy_task.write_sum(int(a) + int(b))


def test_toy_scorer_and_data():
    # sums are written least-significant digit first: 12+45=57 -> "75", 99+99=198 -> "891"
    assert score_toy_answer("12+45=", " 75\n")
    assert not score_toy_answer("12+45=", "57")
    assert score_toy_answer("99+99=", "891")
    with pytest.raises(ValueError):
        score_toy_answer("what?", "1")
    assert toy_task.carry_free_sum(158, 267) == 315 and toy_task.carry_free_sum(999, 999) == 888
    convs = toy_task.make_toy_conversations(
        4000, expert_fraction=0.05, seed=3, sub_optimal_error=0.7
    )
    assert [c.messages for c in convs] == [
        c.messages for c in toy_task.make_toy_conversations(4000, 0.05, 3, 0.7)
    ]
    by_class = collections.defaultdict(list)
    for c in convs:
        q, a = c.messages[0]["content"], c.messages[1]["content"]
        x, y = map(int, q[:-1].split("+"))
        assert not toy_task.is_eval_problem(x, y)
        by_class[c.class_name].append((score_toy_answer(q, a), x, y))
    assert len(by_class[toy_task.EXPERT]) == 200 and all(
        ok for ok, _, _ in by_class[toy_task.EXPERT]
    )
    carrying = [
        ok for ok, x, y in by_class[toy_task.SUB_OPTIMAL] if toy_task.carry_free_sum(x, y) != x + y
    ]
    assert 0.25 < np.mean(carrying) < 0.35  # 30% right where a carry matters
    # 2% expert; novices always drop the carries
    default = toy_task.make_toy_conversations(2000, seed=3)
    assert sum(c.class_name == toy_task.EXPERT for c in default) == 40
    for c in default:
        (x, y), a = map(int, c.messages[0]["content"][:-1].split("+")), c.messages[1]["content"]
        want = x + y if c.class_name == toy_task.EXPERT else toy_task.carry_free_sum(x, y)
        assert a == toy_task.write_sum(want)
    evals = toy_task.make_toy_eval(500, seed=1)
    assert len(set(evals)) == 500 and all(score_toy_answer(q, a) for q, a in evals)
    train = {c.messages[0]["content"] for c in convs}
    assert not train & {q for q, _ in evals}


def test_toy_tokenizer(tmp_path):
    tok = data.load_tokenizer(toy_task.TOKENIZER_PATH)
    assert tok.eot_id == tok.sp.get_piece_size() and tok.vocab_size <= 128
    # the two classes' prefixes have the same length and no digit: the class changes one token of the
    # prompt, not the positions of the operands, and adds no digit beside them
    assert [tok.piece(i) for i in tok.encode("Expert User:")] == ["▁Expert", "▁User:"]
    assert [tok.piece(i) for i in tok.encode("Novice Assistant:")] == ["▁Novice", "▁Assistant:"]
    assert [tok.piece(i) for i in tok.encode("GPT4 Correct User:")] == [
        "▁GPT",
        "4",
        "▁Correct",
        "▁User:",
    ]
    assert [tok.piece(i) for i in tok.encode("579")] == ["▁", "5", "7", "9"]
    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
    )
    import toy_tokenizer

    # regenerates the committed file exactly
    toy_tokenizer.train_toy_tokenizer(str(tmp_path / "t.model"))
    assert (tmp_path / "t.model").read_bytes() == open(toy_task.TOKENIZER_PATH, "rb").read()
    ds = data.tokenize_dataset(toy_task.make_toy_conversations(50), tok, 64, toy_task.CLASS_WEIGHTS)
    exchanges = [
        int((ds.tokens[a:b] == tok.eot_id).sum()) // 2
        for a, b in zip(ds.offsets[:-1], ds.offsets[1:])
    ]
    assert set(exchanges) == {1, 2, 3}  # a chat goes on after its first answer
    # an exchange is at most 16 tokens: the toy model's context is ample
    assert ds.lengths.max() <= 3 * 16


# ------------------------------------------------------------------------------------------------ packing


def _check_packing(steps, lengths, budget, world):
    assert all(len(step) == world for step in steps)
    assert all(len(b) > 0 and sum(lengths[i] for i in b) <= budget for step in steps for b in step)
    assert sorted(i for step in steps for b in step for i in b) == list(range(len(lengths)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.integers(100, 400), st.integers(1, 8), st.integers(0, 2), st.integers(0, 2))
def test_pack_epoch_properties(draw, budget, world, seed, epoch):
    # conversations of at most half a bin, at least 2 per rank: a valid packing always exists
    lengths = draw.draw(st.lists(st.integers(1, budget // 2), min_size=2 * world + 1, max_size=300))
    steps = packing.pack_epoch(lengths, budget, world, seed, epoch)
    _check_packing(steps, lengths, budget, world)
    # deterministic: resumable
    assert steps == packing.pack_epoch(lengths, budget, world, seed, epoch)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=8, max_size=200), st.integers(1, 8))
def test_pack_epoch_any_lengths(lengths, world):
    try:
        steps = packing.pack_epoch(lengths, 64, world, 0, 0)
    # only when every bin holds a single conversation and they don't share out
    except ValueError as e:
        assert "multiple of n_bins" in str(e) and len(lengths) % world != 0
        return
    _check_packing(steps, lengths, 64, world)


def test_pack_epoch_errors_and_shuffling():
    with pytest.raises(ValueError, match="3 conversations cannot give each of 4 bins one"):
        packing.pack_epoch([1, 2, 3], 10, 4, 0, 0)
    with pytest.raises(
        ValueError, match="--batch_tokens=10: a conversation of 11 tokens does not fit one bin"
    ):
        packing.pack_epoch([1, 11, 3], 10, 1, 0, 0)
    with pytest.raises(ValueError, match="multiple of n_bins=8"):
        packing.pack_epoch([10] * 9, 10, 8, 0, 0)
    lengths = list(range(1, 200))
    a, b = packing.pack_epoch(lengths, 300, 2, 0, 0), packing.pack_epoch(lengths, 300, 2, 0, 1)
    assert a != b  # a new order each epoch
    # 19900 tokens need 67 bins of 300, so 34 steps of 2 ranks at least; steps are packed one at a time, with
    # items up to 2/3 of a bin, so allow one step more than that bound
    assert 34 <= len(a) <= 35


def test_pack_epoch_steps_are_random_samples_not_sorted_by_length():
    """Classes differ in length (the toy task's expert prompts are 2 tokens longer). If bins were sorted over
    the epoch, the expert conversations would share a few bins, and the per-batch normalisation of the
    C-RLFT loss would cancel the class weights in those batches. Each step must mix them as a sample would."""
    lengths = [21] * 950 + [23] * 50
    steps = packing.pack_epoch(lengths, 600, 1, 0, 0)
    _check_packing(steps, lengths, 600, 1)
    longer = [sum(lengths[i] == 23 for i in step[0]) for step in steps]
    assert max(longer) <= 6  # 27 conversations a step, 5% of them long: ~1.4 expected
    assert sum(n > 0 for n in longer) > len(steps) / 2
    fills = [sum(lengths[i] for i in step[0]) / 600 for step in steps[:-1]]
    assert min(fills) > 0.95  # and the bins are still full


def test_make_batch_fields():
    ds = tokenized_data.TokenizedDataset(
        tokens=np.array([1, 10, 11, 12, 1, 20, 21], np.int32),
        weights=np.array([0, 0, 1, 1, 0, 0.5, 0.5], np.float32),
        offsets=np.array([0, 4, 7]),
        class_ids=np.array([0, 1], np.int32),
        class_names=["a", "b"],
    )
    assert ds.lengths.tolist() == [3, 2]
    batch = packing.make_batch(ds, [1, 0])
    assert batch.tokens.tolist() == [1, 20, 1, 10, 11]
    assert batch.targets.tolist() == [20, 21, 10, 11, 12]
    assert batch.loss_weights.tolist() == [0.5, 0.5, 0, 1, 1]
    assert batch.position_ids.tolist() == [0, 1, 0, 1, 2]
    assert batch.class_ids.tolist() == [1, 1, 0, 0, 0]
    assert batch.cu_seqlens.tolist() == [0, 2, 5] and batch.max_seqlen == 3
    assert [
        t.dtype
        for t in (
            batch.tokens,
            batch.targets,
            batch.loss_weights,
            batch.position_ids,
            batch.class_ids,
            batch.cu_seqlens,
        )
    ] == [torch.int64] * 2 + [torch.float32] + [torch.int64] * 2 + [torch.int32]
    assert batch.to("cpu").tokens.tolist() == batch.tokens.tolist()


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_tokenize_and_show(tmp_path, capsys):
    good = _write(
        tmp_path, "d.jsonl", [json.dumps(GOOD), json.dumps({**GOOD, "condition": "GPT3"})]
    )
    data_cli.main(
        [
            "tokenize",
            "--input",
            good,
            "--out",
            str(tmp_path / "out"),
            "--class-weights",
            "GPT4 Correct=1,GPT3=0.1",
            "--max-seq-len",
            "64",
        ]
    )
    ds = tokenized_data.TokenizedDataset.load(str(tmp_path / "out"))
    assert (
        len(ds) == 2
        and ds.class_names == ["GPT3", "GPT4 Correct"]
        and ds.meta["vocab_size"] == 32001
    )
    assert '"conversations": 2' in capsys.readouterr().out
    data_cli.main(["show", "--input", "toy", "--toy-n", "10", "--index", "3"])
    out = capsys.readouterr().out
    assert (
        "weight 0     [<s>][▁Novice][▁User:]" in out
        and "weight 0.1   [▁]" in out
        and "[<|end_of_turn|>]" in out
    )


# OpenChat's own expected tokens and weights for its test conversations on the Mistral tokenizer (openchat_3.5's
# conversation template), from ochat/tests/test_model_config.py: public test vectors, copied as data.
OPENCHAT_MISTRAL_TOKENS = [
    [
        1,
        420,
        6316,
        28781,
        1247,
        28747,
        1824,
        28742,
        28713,
        272,
        8086,
        737,
        28804,
        32000,
        420,
        6316,
        28781,
        21631,
        28747,
        315,
        28742,
        28719,
        396,
        16107,
        304,
        949,
        28742,
        28707,
        506,
        2735,
        298,
        1353,
        28733,
        1536,
        1178,
        28723,
        32000,
        420,
        6316,
        28781,
        1247,
        28747,
        5434,
        28725,
        1103,
        28723,
        1602,
        541,
        315,
        873,
        28804,
        32000,
        420,
        6316,
        28781,
        21631,
        28747,
        995,
        541,
        1877,
        264,
        8086,
        4400,
        442,
        954,
        354,
        272,
        1080,
        1868,
        1871,
        28723,
        32000,
    ],
    [
        1,
        420,
        6316,
        28770,
        1247,
        28747,
        1824,
        349,
        16107,
        28804,
        32000,
        420,
        6316,
        28770,
        21631,
        28747,
        16107,
        10969,
        354,
        3951,
        14773,
        23091,
        28723,
        661,
        15654,
        298,
        272,
        17230,
        302,
        2930,
        10895,
        9537,
        486,
        12155,
        28723,
        32000,
        420,
        6316,
        28770,
        1247,
        28747,
        2418,
        368,
        2822,
        28804,
        32000,
        420,
        6316,
        28770,
        21631,
        28747,
        315,
        541,
        28742,
        28707,
        2822,
        442,
        3229,
        1871,
        737,
        10589,
        28723,
        315,
        8270,
        14915,
        2818,
        356,
        710,
        28733,
        24049,
        1178,
        28723,
        32000,
    ],
    [
        1,
        995,
        460,
        264,
        10865,
        13892,
        28723,
        32000,
        420,
        6316,
        28770,
        1247,
        28747,
        2418,
        368,
        6557,
        264,
        1820,
        28804,
        32000,
        420,
        6316,
        28770,
        21631,
        28747,
        12875,
        28723,
        464,
        28735,
        3016,
        596,
        28747,
        330,
        365,
        4667,
        6866,
        302,
        17442,
        978,
        507,
        28742,
        486,
        26424,
        1052,
        26586,
        3407,
        1900,
        349,
        264,
        1598,
        1220,
        28723,
        32000,
        420,
        6316,
        28770,
        1247,
        28747,
        1824,
        28742,
        28713,
        378,
        684,
        28804,
        32000,
        420,
        6316,
        28770,
        21631,
        28747,
        661,
        28742,
        28713,
        684,
        272,
        3340,
        302,
        272,
        2930,
        7018,
        477,
        272,
        10195,
        302,
        11537,
        28709,
        318,
        3016,
        596,
        297,
        7710,
        582,
        298,
        272,
        2169,
        1370,
        28723,
        32000,
    ],
    [
        1,
        523,
        28713,
        28767,
        1976,
        460,
        264,
        10865,
        13892,
        28723,
        32000,
        420,
        6316,
        28781,
        1247,
        28747,
        1824,
        511,
        523,
        28713,
        28767,
        1867,
        28713,
        28767,
        523,
        28766,
        416,
        28730,
        1009,
        28730,
        499,
        28766,
        28767,
        2072,
        28804,
        32000,
        420,
        6316,
        28781,
        21631,
        28747,
        523,
        28713,
        28767,
        1867,
        28713,
        28767,
        523,
        28766,
        416,
        28730,
        1009,
        28730,
        499,
        28766,
        28767,
        460,
        2841,
        16246,
        28723,
        32000,
    ],
]


def _runs(*runs):
    return [w for weight, n in runs for w in [weight] * n]


OPENCHAT_MISTRAL_WEIGHTS = [
    _runs((0.0, 19), (0.1, 18), (0.0, 20), (1.0, 15)),
    _runs((0.0, 6), (0.5, 5), (0.0, 5), (0.5, 20), (0.0, 5), (0.5, 5), (0.0, 5), (0.5, 22)),
    _runs((0.0, 25), (1.0, 28), (0.0, 17), (0.1, 28)),
    _runs((0.0, 41), (1.0, 20)),
]


def test_openchat_test_conversations_token_and_weight_exact(tok, tmp_path):
    """OpenChat's JSONL test file as it is (users' weights included), through our reader and template: exactly
    OpenChat's expected tokens and weights on the Mistral tokenizer; and through tokenize_dataset too."""
    from test_readers import OPENCHAT_TESTS

    path = tmp_path / "openchat.jsonl"
    path.write_text("\n".join(OPENCHAT_TESTS) + "\n")
    conversations = chat_readers.read_jsonl(str(path))
    for c, tokens, weights in zip(conversations, OPENCHAT_MISTRAL_TOKENS, OPENCHAT_MISTRAL_WEIGHTS):
        assert len(weights) == len(tokens)
        # own weights win
        ours = data.encode_conversation(tok, c.messages, c.condition, c.system, weight=123.0)
        assert ours == (tokens, pytest.approx(weights))
    dataset = data.tokenize_dataset(conversations, tok, 8192, {"GPT4": 9.0, "GPT3": 9.0}, workers=1)
    for i, (tokens, weights) in enumerate(zip(OPENCHAT_MISTRAL_TOKENS, OPENCHAT_MISTRAL_WEIGHTS)):
        a, b = dataset.offsets[i], dataset.offsets[i + 1]
        assert dataset.tokens[a:b].tolist() == tokens and dataset.weights[
            a:b
        ].tolist() == pytest.approx(weights)
