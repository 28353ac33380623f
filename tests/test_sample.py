"""sample.py: KV-cache generation against transformers' generate, sampling, and the chat loop's prompts.

References: transformers (greedy generate with its own cache, on our weights saved by save_pretrained),
torch's RNG for the sampling distribution, and prompts assembled by hand from sentencepiece ids.
"""

import io
import os

import pytest
import torch

import data
import sample
import tokenizing
import toy_task
from model import Transformer
from model_args import PRESETS, ModelArgs

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


MHA = dict(n_heads=4, n_kv_heads=4)
GQA = dict(n_heads=4, n_kv_heads=2)


def random_model(vocab_size=300, max_seq_len=128, seed=0, **heads):
    torch.manual_seed(seed)
    args = ModelArgs(
        dim=64,
        n_layers=2,
        vocab_size=vocab_size,
        multiple_of=32,
        max_seq_len=max_seq_len,
        **(heads or GQA),
    )
    model = Transformer(args)
    model.init_weights()
    # larger weights than init's: well separated logits, so greedy has no near-ties
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("heads", [MHA, GQA], ids=["mha", "gqa"])
def test_greedy_matches_transformers_generate(tmp_path, heads):
    model = random_model(**heads)
    model.save_pretrained(str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32
    ).eval()
    hf.generation_config.eos_token_id = None  # no early stop: both produce exactly n tokens
    hf.generation_config.pad_token_id = 0
    long_prompt = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    prompts = [[1], [1, 5, 7, 100, 200], long_prompt]
    for prompt, n in zip(prompts, (30, 50, 60)):
        ours = list(sample.generate(model, prompt, n, sample.GREEDY))
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[
                0, len(prompt) :
            ]
        assert len(ours) == n
        assert ours == theirs.tolist(), prompt


def test_generate_stops_at_stop_id_and_at_the_context():
    model = random_model(max_seq_len=48)
    prompt = [1, 2, 3, 4]
    free = list(sample.generate(model, prompt, 20, sample.GREEDY))
    stop = free[5]
    first = free.index(stop)
    assert (
        list(sample.generate(model, prompt, 20, sample.GREEDY, stop_ids={stop}))
        == free[: first + 1]
    )
    # The context holds 48 positions: 44 more after the prompt, the last one not fed back.
    assert len(list(sample.generate(model, prompt, 1000, sample.GREEDY))) == 48 - len(prompt) + 1
    with pytest.raises(ValueError, match="context"):
        list(sample.generate(model, list(range(49)), 5))


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy():
    model = random_model()
    prompt = [1, 9, 8, 7]

    def run(seed, **kw):
        return list(
            sample.generate(
                model,
                prompt,
                40,
                sample.Sampling(generator=torch.Generator().manual_seed(seed), **kw),
            )
        )

    assert run(0, temperature=1.0) == run(0, temperature=1.0)
    assert run(0, temperature=1.0) != run(1, temperature=1.0)
    assert run(0, temperature=1.0, top_p=0.9, top_k=50) == run(
        0, temperature=1.0, top_p=0.9, top_k=50
    )
    greedy = list(sample.generate(model, prompt, 40, sample.GREEDY))
    assert run(3, temperature=1.0, top_k=1) == greedy
    assert run(4, temperature=5.0, top_p=1e-6) == greedy  # the nucleus is the top token alone


def test_sample_token_distribution():
    """Empirical frequencies against softmax(logits / T), restricted and renormalised by top-k / top-p."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    g = torch.Generator().manual_seed(0)
    n = 5000

    def freq(**kw):
        counts = torch.zeros(6)
        for _ in range(n):
            counts[sample.sample_token(logits, sample.Sampling(generator=g, **kw))] += 1
        return counts / n

    p = torch.softmax(logits / 0.7, -1)
    torch.testing.assert_close(freq(temperature=0.7), p, atol=0.03, rtol=0)
    top3 = torch.zeros(6)
    top3[:3] = p[:3] / p[:3].sum()
    torch.testing.assert_close(freq(temperature=0.7, top_k=3), top3, atol=0.03, rtol=0)
    # top_p: the smallest set of most likely tokens whose probability reaches top_p.
    cut = int((p.cumsum(0) < 0.8).sum()) + 1
    nucleus = torch.zeros(6)
    nucleus[:cut] = p[:cut] / p[:cut].sum()
    torch.testing.assert_close(freq(temperature=0.7, top_p=0.8), nucleus, atol=0.03, rtol=0)


# ----------------------------------------------------------------------------- the chat loop


class Recorder:
    """Wraps sample.generate and keeps every prompt the chat asks it to continue."""

    def __init__(self, monkeypatch):
        self.prompts = []
        original = sample.generate

        def recording(model, prompt_ids, *args, **kwargs):
            self.prompts.append(list(prompt_ids))
            return original(model, prompt_ids, *args, **kwargs)

        monkeypatch.setattr(sample, "generate", recording)


def run_chat(model, tok, lines, **settings):
    it = iter(lines)
    out = io.StringIO()
    history = sample.chat(model, tok, read_line=lambda: next(it, None), out=out, **settings)
    return history, out.getvalue()


def by_hand(tok, condition, turns, system=None):
    """The OpenChat prompt from sentencepiece ids: BOS [system EOT] (prefix content EOT)* assistant-prefix."""
    sp, eot = tok.sp, tok.eot_id
    p = f"{condition} " if condition else ""
    ids = [sp.bos_id()] + ([] if system is None else sp.encode(system) + [eot])
    for role, text in turns:
        ids += sp.encode(f"{p}{role}:") + sp.encode(text) + [eot]
    return ids + sp.encode(f"{p}Assistant:")


@pytest.fixture(scope="module")
def toy():
    tok = data.load_tokenizer(toy_task.TOKENIZER_PATH)
    return tok, random_model(vocab_size=tok.vocab_size, max_seq_len=256)


@pytest.mark.parametrize(
    "condition,system", [("GPT4 Correct", None), ("GPT3", "be brief"), ("", None)]
)
def test_chat_prompts_token_for_token(monkeypatch, toy, condition, system):
    tok, model = toy
    rec = Recorder(monkeypatch)
    history, out = run_chat(
        model,
        tok,
        ["12+34=", "  ", "and 5+6 ?", "/reset", "7+8=", "/exit", "never read"],
        condition=condition,
        system=system,
        max_new_tokens=6,
        how=sample.GREEDY,
    )
    assert len(rec.prompts) == 3
    first_reply = out.split("Assistant: ")[1].split("\n")[0]
    assert rec.prompts[0] == by_hand(tok, condition, [("User", "12+34=")], system)
    assert rec.prompts[1] == by_hand(
        tok,
        condition,
        [("User", "12+34="), ("Assistant", first_reply), ("User", "and 5+6 ?")],
        system,
    )
    assert rec.prompts[2] == by_hand(tok, condition, [("User", "7+8=")], system)  # after /reset
    # The history after /reset holds the last exchange, the reply being the decoded greedy ids; a random
    # model may answer nothing, and an empty exchange is not kept (with a notice).
    stops = {tok.eot_id, tok.eos_id}
    reply_ids = list(sample.generate(model, rec.prompts[2], 6, sample.GREEDY, stop_ids=stops))
    reply_ids = reply_ids[:-1] if reply_ids and reply_ids[-1] in stops else reply_ids
    reply = tok.decode(reply_ids)
    if reply.strip():
        assert history == [
            {"role": "user", "content": "7+8="},
            {"role": "assistant", "content": reply},
        ]
    else:
        assert history == [] and "(the model produced no text in" in out


def test_chat_drops_the_oldest_turns_when_the_context_is_full(monkeypatch):
    tok = data.load_tokenizer(toy_task.TOKENIZER_PATH)
    model = random_model(vocab_size=tok.vocab_size, max_seq_len=64)
    rec = Recorder(monkeypatch)
    questions = [f"{100 + i}+{200 + i}=" for i in range(6)]
    history, out = run_chat(model, tok, questions, max_new_tokens=8, how=sample.GREEDY)
    assert "dropped the oldest" in out
    for prompt in rec.prompts:
        assert len(prompt) + 8 <= 64  # room for the reply
    # The last prompt is the newest turns only, oldest dropped first, rebuilt by hand from the kept history.
    kept = [(m["role"].title(), m["content"]) for m in history[:-1]]
    assert kept[-1] == ("User", questions[-1]) and len(kept) < 2 * len(questions) - 1
    assert kept[0] == ("User", questions[len(questions) - (len(kept) + 1) // 2])
    assert rec.prompts[-1] == by_hand(tok, "GPT4 Correct", kept)


def test_stream_text_handles_multibyte_characters_and_spaces():
    tok = data.load_tokenizer()  # Mistral's: byte fallback for rare characters, "▁" word starts
    text = "Hi there,  naïve 🙂 日本語 x"
    ids = tok.encode(text)
    pieces = list(sample.stream_text(tok, iter(ids + [tok.eot_id, 5, 6]), stop_ids={tok.eot_id}))
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 5  # streamed, not decoded at the end in one go


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        sample.load(str(missing))
    model = random_model(vocab_size=50)
    model.save_pretrained(str(tmp_path / "m"))
    # no tokenizer of its own, none given
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        sample.load(str(tmp_path / "m"))
    # not this model's tokenizer
    with pytest.raises(ValueError, match="32000 pieces .* vocab_size=50"):
        sample.load(str(tmp_path / "m"), tokenizer_path=tokenizing.default_tokenizer_path())
    os.remove(tmp_path / "m" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        sample.load(str(tmp_path / "m"), tokenizer_path=toy_task.TOKENIZER_PATH)
    with pytest.raises(FileNotFoundError, match="config.json"):
        sample.load(str(tmp_path))


def test_a_base_model_without_the_templates_token_is_one_line(tmp_path):
    """A base checkpoint (the toy tokenizer's 120 pieces, 120 rows) has no row for the <|end_of_turn|> that OpenChat
    3.5's template adds: one line naming it, not an index error in the embedding. Padded rows would hold it."""
    import shutil

    for rows in (120, 128):
        random_model(vocab_size=rows).save_pretrained(str(tmp_path / str(rows)))
        shutil.copyfile(toy_task.TOKENIZER_PATH, tmp_path / str(rows) / "tokenizer.model")
    with pytest.raises(
        ValueError, match=r"no row for '<\|end_of_turn\|>' \(id 120\) of template openchat_3.5"
    ):
        sample.load(str(tmp_path / "120"))
    _, tok = sample.load(str(tmp_path / "128"))  # the first free id, a padded row
    assert (tok.eot_id, tok.vocab_size, tok.template) == (120, 121, "openchat_3.5")
    with pytest.raises(
        SystemExit, match="template 'chatml' needs <\\|im_start\\|>, <\\|im_end\\|>, which"
    ):
        sample.main(["--model", str(tmp_path / "128"), "--template", "chatml", "--prompt", "1+1="])


def test_command_line_answers_prompts_from_an_export(tmp_path, capsys, monkeypatch):
    from hf_export import export_hf

    tok = data.load_tokenizer(toy_task.TOKENIZER_PATH)
    model = random_model(vocab_size=tok.vocab_size, max_seq_len=128)
    export_hf(model, tok, str(tmp_path))
    # its tokenizer.json, and both stop ids of its generation_config.json
    _, loaded = sample.load(str(tmp_path))
    assert loaded.path == str(tmp_path / "tokenizer.json")
    assert (loaded.eot_id, loaded.eos_id) == (tok.eot_id, tok.eos_id)
    (tmp_path / "prompts.txt").write_text("1+2=\n\n3+4=\n")
    sample.main(
        [
            "--model",
            str(tmp_path),
            "--prompt",
            "5+6=",
            "--prompt_file",
            str(tmp_path / "prompts.txt"),
            "--temperature",
            "0",
            "--max_new_tokens",
            "5",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert [line[len("User: ") :] for line in out.splitlines() if line.startswith("User: ")] == [
        "5+6=",
        "1+2=",
        "3+4=",
    ]
    expected = list(
        sample.generate(
            model,
            by_hand(tok, "GPT4 Correct", [("User", "5+6=")]),
            5,
            sample.GREEDY,
            stop_ids={tok.eot_id, tok.eos_id},
        )
    )
    expected = expected[:-1] if expected[-1] in (tok.eot_id, tok.eos_id) else expected
    # decoded as sample.py does, the export's tokenizer.json
    assert f"Assistant: {loaded.decode(expected)}\n" in out
    monkeypatch.chdir(tmp_path)  # no out/default/export here
    with pytest.raises(SystemExit, match="python train.py"):
        sample.main([])


def test_ctrl_c_stops_the_reply_not_the_session(monkeypatch, toy):
    tok, model = toy
    rec = Recorder(monkeypatch)
    recording = sample.generate
    partial = tok.encode("42")

    def interrupted(model, prompt_ids, *args, **kwargs):
        if not rec.prompts:  # the first reply: two tokens, then Ctrl-C
            rec.prompts.append(list(prompt_ids))
            yield from partial
            raise KeyboardInterrupt
        yield from recording(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(sample, "generate", interrupted)
    lines = iter(["1+2=", KeyboardInterrupt, "3+4="])

    def read_line():
        line = next(lines, None)
        if line is KeyboardInterrupt:  # Ctrl-C at the input prompt
            raise KeyboardInterrupt
        return line

    out = io.StringIO()
    history = sample.chat(
        model, tok, read_line=read_line, out=out, max_new_tokens=4, how=sample.GREEDY
    )
    assert "(stopped)" in out.getvalue() and len(rec.prompts) == 2
    # What was shown of the interrupted reply stays in the history.
    assert rec.prompts[1] == by_hand(
        tok, "GPT4 Correct", [("User", "1+2="), ("Assistant", "42"), ("User", "3+4=")]
    )
    assert [m["content"] for m in history[:3]] == ["1+2=", "42", "3+4="]


def test_default_condition_is_the_one_the_export_names(tmp_path, capsys):
    from hf_export import export_hf

    tok = data.load_tokenizer(toy_task.TOKENIZER_PATH)
    model = random_model(vocab_size=tok.vocab_size, max_seq_len=128)
    export_hf(model, tok, str(tmp_path / "gpt4"), condition="GPT4")
    assert sample.trained_with(str(tmp_path / "gpt4")) == {
        "condition": "GPT4",
        "template": "openchat_3.5",
        "stops": [tok.eot_id, tok.eos_id],
    }
    # then OpenChat 3.5's condition, GPT4 Correct
    assert sample.trained_with(str(tmp_path / "nowhere")) == {}
    sample.main(
        [
            "--model",
            str(tmp_path / "gpt4"),
            "--prompt",
            "5+6=",
            "--temperature",
            "0",
            "--max_new_tokens",
            "5",
            "--device",
            "cpu",
        ]
    )
    expected = list(
        sample.generate(
            model, by_hand(tok, "GPT4", [("User", "5+6=")]), 5, sample.GREEDY, stop_ids={tok.eot_id}
        )
    )
    expected = expected[:-1] if expected[-1] == tok.eot_id else expected
    _, loaded = sample.load(str(tmp_path / "gpt4"))
    assert f"Assistant: {loaded.decode(expected)}\n" in capsys.readouterr().out


def test_command_line_on_an_openchat_3_5_shaped_directory(tmp_path, capsys):
    """A directory shaped like openchat_3.5, written by transformers: MistralForCausalLM whose sliding window is
    shorter than max_position_embeddings, vocab 32002, <|end_of_turn|> = 32000 and <|pad_0|> = 32001 as added
    tokens, the Mistral tokenizer.model. `sample.py --model=DIR` loads it as it is (no max_seq_len argument, the
    tokenizer not grown) and answers with transformers' greedy tokens, 60 of them, well past the window."""
    import json
    import shutil

    config = transformers.MistralConfig(
        vocab_size=32002,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=32000,
    )
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(config).eval()
    with torch.no_grad():  # well separated logits: greedy has no near-ties
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    hf.save_pretrained(tmp_path)
    shutil.copyfile(tokenizing.default_tokenizer_path(), tmp_path / "tokenizer.model")
    (tmp_path / "added_tokens.json").write_text(
        json.dumps({"<|end_of_turn|>": 32000, "<|pad_0|>": 32001})
    )
    decoder = {
        str(i): {"content": t, "special": True}
        for i, t in [
            (0, "<unk>"),
            (1, "<s>"),
            (2, "</s>"),
            (32000, "<|end_of_turn|>"),
            (32001, "<|pad_0|>"),
        ]
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))

    model, tok = sample.load(str(tmp_path))
    assert (tok.eot_id, tok.vocab_size, model.args.vocab_size) == (32000, 32001, 32002)
    assert (model.args.max_seq_len, model.args.sliding_window) == (256, 16)
    sample.main(
        [
            "--model",
            str(tmp_path),
            "--prompt",
            "What is 7 * 6?",
            "--temperature",
            "0",
            "--max_new_tokens",
            "60",
            "--device",
            "cpu",
        ]
    )
    reply = capsys.readouterr().out.split("Assistant: ", 1)[1].rstrip("\n")
    prompt = data.encode_prompt(
        tok, [{"role": "user", "content": "What is 7 * 6?"}], "GPT4 Correct"
    )
    hf.generation_config.eos_token_id = [32000, 2]
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        theirs = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=60,
            do_sample=False,
        )[0, len(prompt) :].tolist()
    theirs = theirs[: next((k for k, t in enumerate(theirs) if t in (32000, 2)), len(theirs))]
    # decoded well past the window
    assert len(prompt) + len(theirs) > 2 * 16 and reply == tok.decode(theirs)


# ----------------------------------------------------------------------------- replies without text


def rigged(tok, favourite):
    """A model whose every greedy token is `favourite`: every residual stream is the same vector (each embedding row
    all ones, the blocks' outputs zero), and only `favourite`'s row of lm_head points along it."""
    model = random_model(vocab_size=tok.vocab_size, max_seq_len=128)
    with torch.no_grad():
        model.tok_embeddings.weight.fill_(1.0)
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.output.weight.zero_()
        model.output.weight[favourite] = 1.0
    return model


def test_a_model_that_answers_whitespace_is_stopped_and_says_so(tmp_path, capsys, monkeypatch):
    from hf_export import export_hf

    tok = data.load_tokenizer(toy_task.TOKENIZER_PATH)
    space = tok.sp.piece_to_id("▁")
    model = rigged(tok, space)
    greedy = list(sample.generate(model, [1, 5], 40, sample.GREEDY))
    # whitespace, and it would go on
    assert greedy == [space] * 40 and not tok.decode(greedy).strip()
    export_hf(model, tok, str(tmp_path))
    said = (
        "(the model produced no text in 32 token(s): only whitespace, stopped after 32 tokens of it; this "
        "exchange is not kept in the history)"
    )
    sample.main(
        ["--model", str(tmp_path), "--prompt", "1+2=", "--temperature", "0", "--device", "cpu"]
    )
    out, err = capsys.readouterr()
    assert out == f"User: 1+2=\nAssistant: \n{said}\n"  # not 512 blank tokens
    assert "condition 'GPT4 Correct' (the export's default; --condition to change)" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("1+2=\n"))  # the chat: says its condition too
    sample.main(
        ["--model", str(tmp_path), "--temperature", "0", "--device", "cpu", "--condition", "GPT3"]
    )
    out, err = capsys.readouterr()
    assert said in out and "condition 'GPT3' (--condition)" in err
    assert f"{model.size_text()} on cpu" in err


@pytest.mark.parametrize(
    "reply,shown,kept",
    [
        ([], "\n(the model produced no text in 0 token(s): it ended its turn at once;", None),
        (
            ["▁"] * 3,
            "\n(the model produced no text in 3 token(s): only whitespace, then the end of its turn;",
            None,
        ),
        (["4", "2"] + ["▁"] * 40, "42\n(stopped: 32 tokens of whitespace in a row)\n", "42"),
        # whitespace that ends a reply is the model's: shown and kept
        (["4", "2", "▁", "▁"], "42  \n", "42  "),
    ],
    ids=["end-of-turn", "whitespace", "text-then-whitespace", "trailing-spaces"],
)
def test_replies_without_text(monkeypatch, toy, reply, shown, kept):
    tok, model = toy
    ids = [tok.sp.piece_to_id(p) for p in reply] + [tok.eot_id]
    # a generator, as ours
    monkeypatch.setattr(sample, "generate", lambda *args, **kwargs: (i for i in ids))
    out = io.StringIO()
    history = sample.respond(
        model, tok, [{"role": "user", "content": "1+2="}], out, how=sample.GREEDY
    )
    assert out.getvalue().startswith("Assistant: " + shown)
    if kept is None:
        assert history == []
    else:
        assert history[-1] == {"role": "assistant", "content": kept}


def test_flags_take_train_pys_spelling_and_the_dashed_one(tmp_path, capsys):
    from hf_export import export_hf

    tok = data.load_tokenizer(toy_task.TOKENIZER_PATH)
    export_hf(random_model(vocab_size=tok.vocab_size), tok, str(tmp_path))
    (tmp_path / "prompts.txt").write_text("1+2=\n")
    outs = []
    for dash in ("_", "-"):
        flags = [
            f"--{name.replace('_', dash)}"
            for name in ("prompt_file", "max_new_tokens", "top_k", "top_p")
        ]
        sample.main(
            [
                "--model",
                str(tmp_path),
                flags[0],
                str(tmp_path / "prompts.txt"),
                flags[1],
                "4",
                flags[2],
                "3",
                flags[3],
                "0.9",
                "--seed",
                "0",
                "--device",
                "cpu",
                "--max_seq_len",
                "64",
            ]
        )
        outs.append(capsys.readouterr())
    assert outs[0].out == outs[1].out and outs[0].out.startswith("User: 1+2=\nAssistant: ")
    assert "context 64" in outs[0].err and "context 64" in outs[1].err


def test_parameter_count_says_whether_embeddings_are_in_it():
    """The `tiny` preset by hand: 4 blocks of q, k, v, o (256 x 256, 128, 128, 256), SwiGLU 3 x 256 x 768 and two
    norms; the 32,000 x 256 embedding and lm_head; the final norm."""
    with torch.device("meta"):
        model = Transformer(PRESETS["tiny"])
    block = 256 * (256 + 128 + 128 + 256) + 3 * 256 * 768 + 2 * 256
    total = 4 * block + 2 * 32000 * 256 + 256
    assert (model.num_params(), model.num_params(exclude_embeddings=True)) == (
        total,
        total - 32000 * 256,
    )
    assert model.size_text() == "19.5M parameters (11.3M without the input embedding table)"
