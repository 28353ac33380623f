"""Issue #23's must-show, per family: one C-RLFT run of train.py on a tiny checkpoint written by transformers' own
class (random weights, norms and biases away from init) with its tokenizer, two class files ("GPT4 Correct" at 1,
"GPT3" at 0.1), exported; then transformers' greedy reply through the export's chat template (default condition, and
condition="GPT3") is `python sample.py --model=EXPORT --prompt ... --temperature 0`'s, word for word.

    Qwen2 and Qwen3: a ChatML tokenizer.json (template chatml); Gemma: a Gemma-like one with <start_of_turn> /
    <end_of_turn> (openchat_3.5_gemma); Llama 3.2: the real Llama 3.2 tokenizer files (openchat_3.6), 128256 rows.
Qwen2's run is under torchrun with 2 ranks, the others a single process."""

import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_families import LLAMA3_ROPE
from test_model import randomize_
from test_tokenizer_json import LLAMA3, _train

import data
from test_train import env

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_NEW = 12
QUESTION = "What is 23 plus 19?"
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
# name: (config class, model class, config, tokenizer, template the special tokens choose, launcher)
FAMILIES = {
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters={"rope_theta": 1e6},
            use_sliding_window=False,
            max_position_embeddings=256,
        ),
        "chatml",
        "chatml",
        TORCHRUN,
    ),
    "qwen3": (
        Qwen3Config,
        Qwen3ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            tie_word_embeddings=False,
            rope_parameters={"rope_theta": 1e6},
            sliding_window=None,
            max_position_embeddings=256,
        ),
        "chatml",
        "chatml",
        (sys.executable,),
    ),
    "gemma": (
        GemmaConfig,
        GemmaForCausalLM,
        dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            hidden_act="gelu_pytorch_tanh",
            max_position_embeddings=256,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        ),
        "gemma",
        "openchat_3.5_gemma",
        (sys.executable,),
    ),
    # 128256 rows at dim 32: a 4.1M-parameter embedding (tied), 16 MB in fp32
    "llama3.2": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            tie_word_embeddings=True,
            max_position_embeddings=256,
            rope_parameters=LLAMA3_ROPE,
            bos_token_id=128000,
            eos_token_id=[128001, 128009],
        ),
        "llama3",
        "openchat_3.6",
        (sys.executable,),
    ),
}


def conversations(kind, n=30, seed=0):
    """n one-exchange chats about sums: the expert's right, the other's wrong and chattier."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        a, b = rng.randrange(10, 90), rng.randrange(10, 90)
        wrong = a + b + rng.choice([-2, 1, 3])
        answer = f"{a} plus {b} is {a + b}." if kind == "expert" else f"Hmm, I think it is {wrong}!"
        out.append(
            [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": answer},
            ]
        )
    return out


def write_jsonl(path, chats):
    with open(path, "w", encoding="utf-8") as f:
        for items in chats:
            f.write(json.dumps({"items": items}) + "\n")
    return str(path)


def qwen_chatml(directory, texts):
    """A small BPE tokenizer.json as Qwen2's is built (NFC, Qwen's split of the text, then bytes; ChatML specials) with
    a Qwen base model's tokenizer_config.json (no BOS, <|endoftext|> the end of text). Qwen's pre-tokenizer and not
    GPT-2's (test_tokenizer_json's ChatML one): for a config.json with model_type qwen2, transformers 5's AutoTokenizer
    is Qwen2Tokenizer whatever tokenizer_class says, and it puts Qwen's pre-tokenizer over the file's."""
    import tokenizers
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = tokenizers.Tokenizer(models.BPE())
    tk.normalizer, tk.decoder = normalizers.NFC(), decoders.ByteLevel()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=1500,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
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
        json.dump(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "bos_token": None,
                "eos_token": "<|endoftext|>",
                "added_tokens_decoder": decoder,
            },
            f,
        )


def write_tokenizer(kind, directory):
    """The tokenizer files into the checkpoint's directory; returns (the number of ids they produce, the ids of
    single bytes that are no text on their own: byte-level or byte-fallback pieces of non-ASCII bytes)."""
    if kind == "llama3":
        # not tokenizer.model: tiktoken's, unused
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(LLAMA3, name), directory)
        return 128256, []
    texts = [m["content"] for kind_ in ("expert", "other") for c in conversations(kind_) for m in c]
    texts += [
        "GPT4 Correct User",
        "GPT4 Correct Assistant",
        "GPT3 User",
        "GPT3 Assistant",
        QUESTION,
    ] * 3
    if kind == "chatml":
        qwen_chatml(str(directory), texts)
    # test_tokenizer_json's Gemma-like one; Gemma's order of its first ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3
    else:
        _train(
            str(directory),
            texts,
            ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
            {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>"},
            False,
        )
    import tokenizers

    tk = tokenizers.Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    n_ids = tk.get_vocab_size()
    return n_ids, [i for i in range(n_ids) if "\ufffd" in tk.decode([i], skip_special_tokens=False)]


def write_checkpoint(name, directory):
    config_cls, model_cls, kwargs, kind, _, _ = FAMILIES[name]
    n_ids, partial_bytes = write_tokenizer(kind, directory)
    # padded past the tokenizer, as released ones
    vocab = n_ids if kind == "llama3" else -(-n_ids // 64) * 64 + 64
    torch.manual_seed(0)
    # norms, biases: 1 + 0.1 * noise
    hf = randomize_(model_cls(config_cls(vocab_size=vocab, **kwargs)))
    with torch.no_grad():
        # the blocks' matrices at std 0.2: at 0.1 the token embedding
        for param_name, p in hf.named_parameters():
            # decides the next token
            if p.ndim == 2 and "embed" not in param_name and "lm_head" not in param_name:
                # and greedy replies repeat one token whatever the condition; at 0.2 they vary
                p.mul_(2)
        # rows past the tokenizer's ids as in released checkpoints, never trained: 0, never the greedy choice (a
        # random one can be, and sample.py then fails: test_sample_py_reply_reaching_a_padded_row)
        hf.get_input_embeddings().weight[n_ids:] = 0
        hf.get_output_embeddings().weight[n_ids:] = 0
        # and the pieces of non-ASCII bytes, which the sums never use (else half the replies decode to "\ufffd"s,
        # the same text from different ids): the replies compared are text
        hf.get_input_embeddings().weight[partial_bytes] = 0
        hf.get_output_embeddings().weight[partial_bytes] = 0
    hf.save_pretrained(str(directory))
    return vocab, n_ids


def run(cmd, timeout=300):
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_crlft_run_export_and_sample_py_equal_transformers(name, tmp_path):
    config_cls, model_cls, _, kind, template, launcher = FAMILIES[name]
    ckpt, out = tmp_path / "ckpt", tmp_path / "run"
    ckpt.mkdir()
    t0 = time.perf_counter()
    vocab, _ = write_checkpoint(name, ckpt)
    gpt4 = write_jsonl(tmp_path / "gpt4.jsonl", conversations("expert", seed=1))
    gpt3 = write_jsonl(tmp_path / "gpt3.jsonl", conversations("other", seed=2))

    # --------------------------------------------------------------------------------------- train.py
    t1 = time.perf_counter()
    proc = run(
        [
            *launcher,
            os.path.join(ROOT, "train.py"),
            f"--model={ckpt}",
            f"--data=GPT4 Correct={gpt4},GPT3={gpt3}",
            "--class_weights=GPT4 Correct=1,GPT3=0.1",
            "--max_steps=2",
            "--epochs=1",
            "--export=true",
            f"--out_dir={out}",
            "--batch_tokens=256",
            "--max_seq_len=128",
            "--val_fraction=0",
        ]
    )
    t2 = time.perf_counter()
    summary = proc.stdout
    assert f", template {template}, end of turn" in summary, summary
    assert "expert condition (evaluation, exported chat template): 'GPT4 Correct'" in summary, (
        summary
    )
    assert (
        "class 'GPT4 Correct'" in summary
        and "class 'GPT3'" in summary
        and "plain SFT" not in summary
    )
    assert f"{2 if launcher is TORCHRUN else 1} rank(s)" in summary
    with open(out / "log.jsonl") as f:
        assert [r["step"] for r in map(json.loads, f) if "loss" in r] == [1, 2]

    # ------------------------------------------------------------------------------------ the export
    export = str(out / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    # no row added: the template's tokens exist
    assert type(hf) is model_cls and hf.config.vocab_size == vocab
    trained, start = (
        load_file(os.path.join(export, "model.safetensors")),
        load_file(str(ckpt / "model.safetensors")),
    )
    assert trained.keys() == start.keys()
    # 2 steps taken
    assert not torch.equal(trained["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    with open(os.path.join(export, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["chat_template"] and (config["crlft_template"], config["crlft_condition"]) == (
        template,
        "GPT4 Correct",
    )
    with open(os.path.join(export, "generation_config.json")) as f:
        eos = json.load(f)["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    tok = transformers.AutoTokenizer.from_pretrained(export)
    ours = data.load_tokenizer(export)
    assert tok.eos_token_id == eos[0] == ours.eot_id  # the template's end of turn

    # ------------------------------------------------- transformers' greedy reply = python sample.py's
    sample = [
        sys.executable,
        os.path.join(ROOT, "sample.py"),
        f"--model={export}",
        "--prompt",
        QUESTION,
        "--temperature",
        "0",
        "--max-new-tokens",
        str(N_NEW),
        "--device",
        "cpu",
    ]
    procs = {
        condition: subprocess.Popen(
            sample + ([] if condition is None else ["--condition", condition]),
            cwd=ROOT,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for condition in (None, "GPT3")
    }  # both at once: each mostly waits on its imports
    try:
        replies = transformers_replies(hf, tok, ours, eos)
        t3 = time.perf_counter()
        differ = {}
        for condition, p in procs.items():
            stdout, stderr = p.communicate(timeout=300)
            assert p.returncode == 0, stderr[-3000:]
            assert stdout.startswith(f"User: {QUESTION}\nAssistant: "), stdout
            # sample.py ends the reply with a newline
            mine = stdout.split("Assistant: ", 1)[1].removesuffix("\n")
            ids, theirs = replies[condition]
            assert ids, f"{condition}: the model ends its turn at once: nothing to compare"
            if mine != theirs:
                differ[condition or "default"] = (
                    f"sample.py {mine!r}, transformers {theirs!r} (ids {ids})"
                )
        # both conditions seen before failing; a stop id of generation_config.json that sample.py's lacks shows here
        assert not differ, (
            f"{differ}; stop ids: generation_config {eos}, sample.py's {[ours.eot_id, ours.eos_id]}"
        )
    finally:
        for p in procs.values():  # after a failed assertion: not left running
            if p.poll() is None:
                p.kill()
                p.communicate()
    t4 = time.perf_counter()
    print(
        f"{name}: checkpoint {t1 - t0:.1f} s, train.py {t2 - t1:.1f} s, transformers {t3 - t2:.1f} s, "
        f"sample.py wait {t4 - t3:.1f} s; replies {replies[None][1]!r} / {replies['GPT3'][1]!r}"
    )


def transformers_replies(hf, tok, ours, eos):
    """{condition: (ids, text)}: transformers' greedy reply through the export's chat template, up to a stop id of
    its generation_config.json; condition None: the template's default. Its prompt is training's (data.py's)."""
    messages = [{"role": "user", "content": QUESTION}]
    replies, prompts = {}, {}
    for condition in (None, "GPT3"):
        extra = {} if condition is None else {"condition": condition}
        prompt = tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False, **extra
        )
        # training's
        assert prompt == data.encode_prompt(ours, messages, condition or "GPT4 Correct"), condition
        text = tok.decode(prompt)
        assert f"{condition or 'GPT4 Correct'} Assistant" in text and QUESTION in text
        assert ("GPT3" in text) == (condition == "GPT3")
        with torch.no_grad():
            ids = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=N_NEW,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos[0],
            )[0, len(prompt) :].tolist()
        ids = ids[: next((k for k, t in enumerate(ids) if t in eos), len(ids))]
        prompts[condition], replies[condition] = (
            prompt,
            (ids, tok.decode(ids, skip_special_tokens=False)),
        )
    assert prompts[None] != prompts["GPT3"]
    return replies


def test_sample_py_reply_reaching_a_padded_row(tmp_path):
    """Qwen3's checkpoint above (rows padded past the tokenizer's ids), its lm_head set so that the first greedy
    token is the first padded row: every row h/|h| (h: the prompt's last hidden state), that row 2 h/|h|."""
    import io

    import sample

    _, n_ids = write_checkpoint("qwen3", tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32
    ).eval()
    tok = data.load_tokenizer(str(tmp_path))
    assert tok.vocab_size == n_ids < hf.config.vocab_size
    prompt = data.encode_prompt(tok, [{"role": "user", "content": QUESTION}], "GPT4 Correct")
    with torch.no_grad():
        h = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0, -1]
        hf.lm_head.weight[:] = h / h.norm()
        hf.lm_head.weight[n_ids] = 2 * h / h.norm()
        assert int(hf(torch.tensor([prompt])).logits[0, -1].argmax()) == n_ids
    hf.save_pretrained(str(tmp_path))
    model, tokenizer = sample.load(str(tmp_path), dtype=torch.float32)
    out = io.StringIO()
    sample.respond(
        model,
        tokenizer,
        [{"role": "user", "content": QUESTION}],
        out,
        condition="GPT4 Correct",
        max_new_tokens=3,
        how=sample.GREEDY,
    )
    # the padded row is never sampled: a token of the tokenizer's
    assert out.getvalue().startswith("Assistant: ")


def test_sample_py_on_an_export_stops_where_its_generation_config_does(tmp_path):
    """Gemma-like: <end_of_turn> 5 the end of turn, <eos> 1 the end of text; both in generation_config.json."""
    import sample
    from hf_export import export_hf
    from model import Transformer
    from model_args import ModelArgs

    write_tokenizer("gemma", tmp_path)
    tokenizer = data.load_tokenizer(str(tmp_path))
    assert (tokenizer.eot_id, tokenizer.eos_id) == (5, 1)
    model = Transformer(
        ModelArgs(
            dim=32,
            n_layers=1,
            n_heads=2,
            n_kv_heads=1,
            vocab_size=tokenizer.vocab_size,
            multiple_of=32,
            max_seq_len=64,
        )
    )
    model.init_weights()
    export_hf(model, tokenizer, str(tmp_path / "export"), condition="GPT4 Correct")
    with open(tmp_path / "export" / "generation_config.json") as f:
        assert json.load(f)["eos_token_id"] == [5, 1]
    _, again = sample.load(str(tmp_path / "export"))
    assert {again.eot_id, again.eos_id} == {5, 1}  # sample.respond's stop ids
