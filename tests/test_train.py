"""train.py end to end on the CPU: distributed equivalence, resume, SIGTERM, corrupted checkpoints, config.

Each run is a real `python train.py` / `torchrun` subprocess on a tiny model and a small toy set.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

import packing
import tokenized_data
import tokenizing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--toy_train=240",
    "--toy_eval=20",
    "--batch_tokens=600",
    "--dim=32",
    "--n_layers=2",
    "--n_heads=4",
    "--n_kv_heads=2",
    "--epochs=2",
    "--export=false",
]


def env():
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)
    e["OMP_NUM_THREADS"] = "1"
    return e


def train(args, out_dir, launcher=(sys.executable,), check=True, **kwargs):
    cmd = [*launcher, os.path.join(ROOT, "train.py"), *TINY, f"--out_dir={out_dir}", *args]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300, **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out_dir):
    steps = [r["step"] for r in log(out_dir) if "loss" in r]
    assert len(steps) == len(set(steps)), "a step logged twice"
    return {r["step"]: r["loss"] for r in log(out_dir) if "loss" in r}


def test_learning_rate_schedule_matches_hand_computation():
    sys.path.insert(0, ROOT)
    import train as T
    import train_config

    cfg = train_config.TrainConfig(lr=1.0, warmup_ratio=0.05, min_lr_ratio=0.1)
    total = 200  # warmup = 10 steps
    assert T.learning_rate(0, total, cfg) == pytest.approx(0.1)
    assert T.learning_rate(9, total, cfg) == pytest.approx(1.0)
    assert T.learning_rate(10, total, cfg) == pytest.approx(1.0)
    mid = 10 + (total - 10) / 2  # half-way down the cosine: 0.1 + 0.9 * 0.5
    assert T.learning_rate(int(mid), total, cfg) == pytest.approx(0.55, abs=1e-3)
    assert T.learning_rate(total, total, cfg) == pytest.approx(0.1)


def test_two_ranks_match_one_process_on_the_same_global_batch(tmp_path):
    # One process with 2 micro-batches sees exactly the bins that 2 ranks with 1 micro-batch each see.
    train(["--grad_accum=2", "--max_steps=6"], tmp_path / "one")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    train(["--grad_accum=1", "--max_steps=6"], tmp_path / "two", launcher=torchrun)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:  # fp32; only the order of the gradient reductions differs
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step
    assert one[6] < one[1]  # and it learns


def test_first_step_loss_is_weighted_mean_over_the_global_batch(tmp_path):
    """The logged loss of step 1 equals sum(w * CE) / sum(w) recomputed by hand from the initial model."""
    sys.path.insert(0, ROOT)
    import data
    import train_config
    import train_job
    from model import Transformer

    train(["--grad_accum=2", "--max_steps=1"], tmp_path / "run")
    cfg = train_config.parse_config([*TINY, "--grad_accum=2"])
    tokenizer, args = train_job.tokenizer_and_args(cfg)
    dataset = tokenized_data.TokenizedDataset.load(str(tmp_path / "run" / "data"))
    train_ids, _ = data.split_holdout(dataset.class_ids, cfg.val_fraction, cfg.val_max, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = Transformer(args)
    model.init_weights()
    bins = packing.pack_epoch(dataset.lengths[train_ids], cfg.batch_tokens, 2, cfg.seed, 0)[0]
    num, den = 0.0, 0.0
    for bin_ in bins:
        # each conversation on its own: no packing involved in the reference
        for i in train_ids[bin_]:
            b = packing.make_batch(dataset, [i])
            logits = model(b.tokens[None]).squeeze(0)
            ce = torch.nn.functional.cross_entropy(logits.double(), b.targets, reduction="none")
            num += (ce * b.loss_weights.double()).sum().item()
            den += b.loss_weights.double().sum().item()
    assert losses(tmp_path / "run")[1] == pytest.approx(num / den, rel=1e-5)


def test_kill_and_resume_continues_the_same_loss_curve(tmp_path):
    train(["--max_steps=8", "--ckpt_every=1000"], tmp_path / "full")
    reference = losses(tmp_path / "full")
    # A real crash: SIGKILL once step 5 is logged (checkpoints every 2 steps, so step 4's is the latest).
    out = tmp_path / "crash"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        *TINY,
        f"--out_dir={out}",
        "--max_steps=8",
        "--ckpt_every=2",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    log = out / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and any(
            json.loads(line)["step"] >= 5 for line in log.read_text().splitlines() if line
        ):
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    train(["--max_steps=8", "--ckpt_every=2"], out)
    # each step once: the steps after the checkpoint were logged again, not twice
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step


def test_sigterm_saves_a_checkpoint_and_exits_non_zero(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        *TINY,
        f"--out_dir={out}",
        "--max_steps=500",
        "--ckpt_every=1000",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    log = out / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]  # stopped, not finished
    latest = (out / "ckpt" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert 2 <= step < 500
    assert (out / "ckpt" / latest / "manifest.json").exists()
    assert f"stopped by SIGTERM after step {step}" in output and "Traceback" not in output


def test_corrupted_or_half_written_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    train(["--max_steps=2", "--ckpt_every=2"], out)
    ckpt = out / "ckpt" / (out / "ckpt" / "latest").read_text().strip()
    shard = next(p for p in ckpt.iterdir() if p.suffix == ".distcp")
    data_bytes = bytearray(shard.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF  # a flipped byte: same size, different content
    shard.write_bytes(bytes(data_bytes))
    proc = train(["--max_steps=4", "--ckpt_every=2"], out, check=False)
    assert proc.returncode != 0
    assert "is corrupted" in proc.stderr and shard.name in proc.stderr and "SHA-256" in proc.stderr
    shard.write_bytes(bytes(data_bytes[: len(data_bytes) // 3]))  # half-written
    proc = train(["--max_steps=4", "--ckpt_every=2"], out, check=False)
    assert "half-written" in proc.stderr
    (ckpt / "manifest.json").unlink()
    proc = train(["--max_steps=4", "--ckpt_every=2"], out, check=False)
    assert "incomplete or corrupted" in proc.stderr
    assert math.isfinite(losses(out)[2])  # the log of the run that wrote it is untouched


def test_toy_evaluation_matches_one_prompt_at_a_time_generation():
    """toy_task.evaluate decodes prompts of equal length together with the KV cache; sample.generate
    decodes one prompt at a time: the same answers, the same accuracy (scored by hand here)."""
    sys.path.insert(0, ROOT)
    import data
    import sample
    import toy_task
    from model import Transformer
    from model_args import ModelArgs

    tok = data.load_tokenizer(toy_task.TOKENIZER_PATH)
    torch.manual_seed(0)
    model = Transformer(
        ModelArgs(
            dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, max_seq_len=64
        )
    ).eval()
    model.init_weights()
    problems = toy_task.make_toy_eval(40, seed=5) + [("7+5=", "21")]  # prompts of two lengths
    accuracy, answers = toy_task.evaluate(
        model,
        tok,
        problems,
        lambda m: data.encode_prompt(tok, m, "Expert"),
        max_new_tokens=6,
        batch_size=16,
    )
    expected = []
    for question, _ in problems:
        prompt = data.encode_prompt(tok, [{"role": "user", "content": question}], "Expert")
        ids = list(sample.generate(model, prompt, 6, sample.GREEDY))
        ids = ids[: ids.index(tok.eot_id)] if tok.eot_id in ids else ids
        expected.append((question, tok.decode(ids)))
    assert sorted(answers) == sorted(expected)  # evaluate() groups the prompts by length
    right = sum(text.strip() == str(sum(map(int, q[:-1].split("+"))))[::-1] for q, text in expected)
    assert accuracy == right / len(problems)


def tokenize_toy(cache):
    """`python data_cli.py tokenize` of the toy data train.py makes by default (240 conversations, seed 1337)."""
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "data_cli.py"),
            "tokenize",
            "--input=toy",
            "--toy-n=240",
            "--seed=1337",
            "--class-weights=Expert=1,Novice=0.1",
            f"--out={cache}",
            "--max-seq-len=256",
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_trains_from_a_tokenized_cache_directory(tmp_path):
    """`python data_cli.py tokenize` once, then train.py --data=DIR memory-maps it: the same losses as tokenizing
    the same conversations in train.py."""
    cache = tmp_path / "cache"
    tokenize_toy(cache)
    train(["--max_steps=3"], tmp_path / "direct")  # the same toy defaults as data.py's
    train([f"--data={cache}", "--max_steps=3"], tmp_path / "cached")
    direct, cached = losses(tmp_path / "direct"), losses(tmp_path / "cached")
    assert sorted(direct) == sorted(cached) == [1, 2, 3]
    for step in direct:
        assert cached[step] == pytest.approx(direct[step], rel=1e-6), step


def test_compile_and_profile_match_eager(tmp_path):
    """--compile=true (per-block torch.compile, the attention kernel outside the graphs) trains the same
    steps as eager to rounding, and --profile_step writes the profiler's table."""
    train(["--max_steps=3"], tmp_path / "eager")
    train(["--max_steps=3", "--compile=true", "--profile_step=1"], tmp_path / "compiled")
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == [1, 2, 3]
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4), step
    with open(tmp_path / "compiled" / "profile.txt") as f:
        table = f.read()
    # the profiler's operator table (which operators lead depends on how much compiling the steps held: a cold
    # inductor cache can push the matmuls out of its 40 rows)
    assert table.startswith("steps 1..3") and "Self CPU time total" in table and "aten::" in table


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def test_data_is_prepared_once_per_job_and_reused(tmp_path):
    """Under torchrun, rank 0 tokenizes and rank 1 memory-maps the same files; a restart with the same inputs
    reuses them (file times unchanged); another class weight tokenizes again."""
    out = tmp_path / "run"
    proc = train(["--max_steps=1", "--ckpt_every=1"], out, launcher=TORCHRUN)
    assert proc.stdout.count("tokenized") == 1 and "rank 0 tokenized" in proc.stdout, proc.stdout
    files = {p: p.stat().st_mtime_ns for p in (out / "data").iterdir()}
    proc = train(["--max_steps=1"], out, launcher=TORCHRUN)  # resumes at step 1, the last
    assert "tokenized" not in proc.stdout and f"reusing {out / 'data'}" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "data").iterdir()} == files
    assert sorted(losses(out)) == [1]
    proc = train(
        ["--max_steps=1", "--class_weights=Expert=1,Novice=0.2", "--resume=false"],
        out,
        launcher=TORCHRUN,
    )
    assert proc.stdout.count("rank 0 tokenized") == 1
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["summary"]["classes"]["Novice"]["weight_sum"] == pytest.approx(
        0.2 * meta["summary"]["classes"]["Novice"]["supervised_tokens"], rel=1e-5
    )


def test_validation_loss_is_the_held_out_weighted_mean_and_every_epoch_is_exported(tmp_path):
    """2 epochs: 2 validation records, whose losses equal sum(w * CE) / sum(w) over the held-out conversations
    computed by transformers from each epoch's export (overall and per class); the held-out conversations are
    in no training bin; epoch_1, epoch_2 and the final export."""
    sys.path.insert(0, ROOT)
    from transformers import LlamaForCausalLM

    import data
    import train_config

    out = tmp_path / "run"
    train(["--val_fraction=0.1", "--export=true"], out)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("epoch_")) == [
        "epoch_1",
        "epoch_2",
    ]
    assert (out / "export" / "model.safetensors").exists()
    cfg = train_config.parse_config([*TINY, "--val_fraction=0.1"])
    dataset = tokenized_data.TokenizedDataset.load(str(out / "data"))
    train_ids, held_out = data.split_holdout(
        dataset.class_ids, cfg.val_fraction, cfg.val_max, cfg.seed
    )
    # both classes validated
    assert len(held_out) >= 20 and set(dataset.class_ids[held_out]) == {0, 1}
    trained = {
        int(train_ids[i])
        for epoch in [
            packing.pack_epoch(dataset.lengths[train_ids], cfg.batch_tokens, 1, cfg.seed, e)
            for e in range(cfg.epochs)
        ]
        for step in epoch
        for b in step
        for i in b
    }
    assert trained == set(train_ids.tolist()) and not trained & set(held_out.tolist())
    records = [r for r in log(out) if "val_loss" in r]
    assert [r["epoch"] for r in records] == [0, 1]
    for epoch, record in enumerate(records, 1):
        hf = LlamaForCausalLM.from_pretrained(
            str(out / f"epoch_{epoch}"), dtype=torch.float64
        ).eval()
        num, den = np.zeros(2), np.zeros(2)
        for i in held_out:
            tokens = torch.from_numpy(
                dataset.tokens[dataset.offsets[i] : dataset.offsets[i + 1]].astype(np.int64)
            )
            w = dataset.weights[dataset.offsets[i] + 1 : dataset.offsets[i + 1]].astype(np.float64)
            with torch.no_grad():
                ce = torch.nn.functional.cross_entropy(
                    hf(input_ids=tokens[None, :-1]).logits[0], tokens[1:], reduction="none"
                ).numpy()
            num[dataset.class_ids[i]] += (w * ce).sum()
            den[dataset.class_ids[i]] += w.sum()
        assert record["val_loss"] == pytest.approx(num.sum() / den.sum(), rel=1e-5)
        for c, name in enumerate(dataset.class_names):
            assert record["val_loss_per_class"][name] == pytest.approx(num[c] / den[c], rel=1e-5)


def test_resume_refuses_a_changed_setting_by_name(tmp_path):
    out = tmp_path / "run"
    train(["--max_steps=4", "--ckpt_every=1"], out)
    assert sorted(p.name for p in (out / "ckpt" / "step_0000004").iterdir() if "rng" in p.name) == [
        "rng_rank0.safetensors"
    ]  # read back without unpickling
    for change, says in [
        ("--batch_tokens=700", "batch_tokens was 600"),
        ("--seed=1", "seed was 1337"),
        ("--class_weights=Expert=1,Novice=0.5", "class_weights was"),
        ("--dim=64", "model was"),
        ("--grad_accum=2", "grad_accum was 1"),
        ("--max_steps=6", "max_steps was 4"),
    ]:  # the learning-rate schedule
        proc = train(["--max_steps=4", change], out, check=False)
        assert proc.returncode != 0 and says in proc.stderr and "--resume=false" in proc.stderr, (
            change,
            proc.stderr,
        )
        assert proc.stderr.count("\n") == 1
    # resume from the checkpoint before the last
    (out / "ckpt" / "latest").write_text("step_0000003")
    # safe to change: it continues
    train(["--max_steps=4", "--ckpt_every=7", "--keep_ckpts=1"], out)
    assert sorted(losses(out)) == [1, 2, 3, 4] and sorted(os.listdir(out / "ckpt")) == [
        "latest",
        "step_0000004",
    ]
    # starting over is allowed
    train(["--max_steps=1", "--batch_tokens=700", "--resume=false"], out)
    assert sorted(losses(out)) == [1]


def test_fine_tunes_a_transformers_checkpoint_with_its_own_tokenizer_on_two_class_files(tmp_path):
    """A tiny Llama written by transformers, with a tokenizer that is not Mistral's (the toy one), fine-tuned at
    2 ranks on two files given two classes: the export holds that tokenizer, the summary names both classes."""
    sys.path.insert(0, ROOT)
    from transformers import LlamaConfig, LlamaForCausalLM

    import toy_task

    checkpoint = tmp_path / "tiny-llama"
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=120,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    ).save_pretrained(checkpoint)
    (checkpoint / "tokenizer.model").write_bytes(open(toy_task.TOKENIZER_PATH, "rb").read())
    for name, answer in (("a", lambda x, y: x + y), ("b", toy_task.carry_free_sum)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for x in range(10, 40):
                items = [
                    {"role": "user", "content": f"{x}+{x + 7}="},
                    {"role": "assistant", "content": toy_task.write_sum(answer(x, x + 7))},
                ]
                f.write(json.dumps({"items": items}) + "\n")
    proc = train(
        [
            f"--model={checkpoint}",
            f"--data=A={tmp_path / 'a.jsonl'},B={tmp_path / 'b.jsonl'}",
            "--class_weights=A=1,B=0.1",
            "--expert_condition=A",
            "--max_steps=2",
            "--export=true",
            "--dim=0",
            "--n_layers=0",
            "--n_heads=0",
            "--n_kv_heads=0",
        ],
        tmp_path / "run",
        launcher=TORCHRUN,
    )
    assert (
        "class 'A'" in proc.stdout and "class 'B'" in proc.stdout and "plain SFT" not in proc.stdout
    )
    assert f"tokenizer: {checkpoint / 'tokenizer.model'}" in proc.stdout
    export = tmp_path / "run" / "export"
    assert (export / "tokenizer.model").read_bytes() == (
        checkpoint / "tokenizer.model"
    ).read_bytes()
    # + <|end_of_turn|>
    assert json.loads((export / "config.json").read_text())["vocab_size"] == 121
    assert json.loads((export / "tokenizer_config.json").read_text())["crlft_condition"] == "A"

    # Mistral's tokenizer does not fit this checkpoint
    proc = train(
        [
            f"--model={checkpoint}",
            "--max_steps=1",
            f"--tokenizer={tokenizing.default_tokenizer_path()}",
        ],
        tmp_path / "bad",
        check=False,
    )
    assert (
        proc.returncode != 0 and "32000 pieces" in proc.stderr and "vocab_size=120" in proc.stderr
    )


def _two_class_files(tmp_path):
    """Two OpenChat JSONL files of toy sums: A's answers right, B's carry-free."""
    sys.path.insert(0, ROOT)
    import toy_task

    for name, answer in (("a", lambda x, y: x + y), ("b", toy_task.carry_free_sum)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for x in range(10, 70):
                items = [
                    {"role": "user", "content": f"{x}+{x + 7}="},
                    {"role": "assistant", "content": toy_task.write_sum(answer(x, x + 7))},
                ]
                f.write(json.dumps({"items": items}) + "\n")
    return f"--data=GPT4 Correct={tmp_path / 'a.jsonl'},GPT3={tmp_path / 'b.jsonl'}"


def test_the_expert_condition_follows_the_class_weights(tmp_path):
    """No --expert_condition: the class of the largest weight is the expert, named in the summary before the first
    step and as the export's default condition (not the toy's 'Expert', never trained here)."""
    sys.path.insert(0, ROOT)
    import toy_task

    data_flag = _two_class_files(tmp_path)
    proc = train(
        [
            data_flag,
            "--class_weights=GPT3=0.1,GPT4 Correct=1",
            f"--tokenizer={toy_task.TOKENIZER_PATH}",
            "--max_steps=1",
            "--export=true",
        ],
        tmp_path / "run",
    )
    assert "expert condition (evaluation, exported chat template): 'GPT4 Correct'" in proc.stdout
    config = json.loads((tmp_path / "run" / "export" / "tokenizer_config.json").read_text())
    assert config["crlft_condition"] == "GPT4 Correct"
    # the other way round: the weights decide, not the order of the files
    proc = train(
        [
            data_flag,
            "--class_weights=GPT3=1,GPT4 Correct=0.5",
            f"--tokenizer={toy_task.TOKENIZER_PATH}",
            "--max_steps=1",
            "--resume=false",
        ],
        tmp_path / "swapped",
    )
    assert "expert condition (evaluation, exported chat template): 'GPT3'" in proc.stdout


def test_a_tie_for_the_largest_weight_is_refused_naming_the_flag(tmp_path):
    sys.path.insert(0, ROOT)
    import toy_task

    # no --class_weights: every class weighs 1
    proc = train(
        [_two_class_files(tmp_path), f"--tokenizer={toy_task.TOKENIZER_PATH}", "--max_steps=1"],
        tmp_path / "run",
        check=False,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(
        "error: --expert_condition: classes 'GPT3', 'GPT4 Correct' share the largest weight 1"
    )
    assert not (tmp_path / "run").exists()  # nothing of the failed run left


def test_plan_with_max_steps_packs_only_the_epochs_it_reaches():
    """--max_steps stops the plan after the epoch it ends in: the same steps as packing every epoch with
    packing.pack_epoch (the reference), cut there, and the plan line says which epoch that is."""
    import types

    import train_config
    import train_job
    from train_progress import _steps

    rng = np.random.default_rng(0)
    dataset = types.SimpleNamespace(lengths=rng.integers(5, 60, size=300))
    train_ids = np.arange(10, 300)
    cfg = train_config.TrainConfig(epochs=50, batch_tokens=512, seed=3)
    reference = [
        (e, [[int(train_ids[i]) for i in b] for b in bins])
        for e in range(4)
        for bins in packing.pack_epoch(dataset.lengths[train_ids], 512, 2, 3, e)
    ]
    per_epoch = sum(e == 0 for e, _ in reference)
    max_steps = 2 * per_epoch + 1  # in the third epoch
    cut = train_job.plan_steps(dataset, train_ids, replace(cfg, max_steps=max_steps), 2)
    assert cut == [s for s in reference if s[0] <= 2]
    assert _steps(replace(cfg, max_steps=max_steps), cut) == (
        f"{max_steps} steps (--max_steps: in epoch 3 of 50; the first epoch is {per_epoch} steps)"
    )
    # on an epoch's last step: that epoch is the last packed (its end is seen as one)
    assert train_job.plan_steps(dataset, train_ids, replace(cfg, max_steps=per_epoch), 2) == [
        s for s in reference if s[0] == 0
    ]
    full = train_job.plan_steps(dataset, train_ids, replace(cfg, epochs=3), 2)
    assert full == [s for s in reference if s[0] <= 2]
    assert _steps(replace(cfg, epochs=3), full) == f"{len(full)} steps in 3 epochs"
