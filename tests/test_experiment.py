"""experiments/crlft_vs_sft.py end to end, shortened: every method trains (tiny model, 3 steps) and is scored."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_crlft_vs_sft_runs_every_method_and_writes_table_and_pictures(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        sys.executable,
        os.path.join(ROOT, "experiments", "crlft_vs_sft.py"),
        "--seeds=2",
        "--max_steps=3",
        "--toy_train=300",
        "--toy_eval=20",
        f"--out_dir={tmp_path}",
        "--dim=32",
        "--n_layers=1",
        "--n_heads=2",
        "--n_kv_heads=1",
        "--batch_tokens=512",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    methods = ["sft_mix", "sft_expert", "crlft", "condition_only", "weights_only"]
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {m} |" in table for m in methods)
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(results) == sorted(methods) and all(len(runs) == 2 for runs in results.values())
    for m in methods:
        for r in results[m]:
            assert 0.0 <= r["accuracy"] <= 1.0
    # the ablations really differ in what they train on
    for seed in (1000, 1001):
        mix = json.loads(
            (tmp_path / f"sft_mix_seed{seed}" / "log.jsonl").read_text().splitlines()[0]
        )
        expert = json.loads(
            (tmp_path / f"sft_expert_seed{seed}" / "log.jsonl").read_text().splitlines()[0]
        )
        assert "Novice" in mix["loss_per_class"]
        assert set(expert["loss_per_class"]) == {"Expert"}
    for name in ("accuracy.svg", "curves.svg"):
        assert (tmp_path / name).read_text().startswith("<svg")


def test_plot_draws_a_runs_log(tmp_path):
    """experiments/plot.py LOG: one curve each for the weighted loss, the validation loss and every class's CE."""
    records = [
        {"step": s, "loss": 1.0 / s, "loss_per_class": {"A": 2.0 / s, "B": 0.5 / s}}
        for s in (1, 2, 3)
    ]
    records.insert(
        2, {"step": 2, "epoch": 0, "val_loss": 0.7, "val_loss_per_class": {"A": 0.9, "B": 0.4}}
    )
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "plot.py"), str(tmp_path / "log.jsonl")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    svg = (tmp_path / "loss.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 4
    assert all(
        f">{name}</text>" in svg for name in ("loss (weighted)", "validation loss", "CE A", "CE B")
    )


def test_learning_curves_scores_every_k_steps_and_rebuilds_the_report_from_the_logs(tmp_path):
    """experiments/learning_curves.py, shortened: two methods train (tiny model, 4 steps), scored at steps 2 and
    4 (the last on every problem); --report_only then writes the same tables and picture from scores.jsonl."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        sys.executable,
        os.path.join(ROOT, "experiments", "learning_curves.py"),
        "--seeds=1",
        "--max_steps=4",
        "--every=2",
        "--toy_train=200",
        "--toy_eval=12",
        "--eval_subset=6",
        "--settings=mild_novice",
        "--methods=sft_mix,crlft",
        f"--out_dir={tmp_path}",
        "--dim=32",
        "--n_layers=1",
        "--n_heads=2",
        "--n_kv_heads=1",
        "--batch_tokens=512",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for method in ("sft_mix", "crlft"):
        run = tmp_path / "mild_novice" / f"{method}_seed1000"
        scores = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
        assert [r["step"] for r in scores] == [2, 4]
        assert set(scores[-1]) >= {"expert", "novice", "expert_full", "novice_full"}
        assert not (run / "ckpt").exists()  # scored in place of the checkpoints: nothing written
        assert json.loads((run / "job.json").read_text())["error_rate"] == 0.3
    table = (tmp_path / "results.md").read_text()
    assert "| sft_mix | no | 1 / 1 |" in table and "| crlft | yes | 1 / 0.1 |" in table
    # one row per method
    summary = [row.split(" | ") for row in table.splitlines() if " | 1 / " in row]
    # the expert share of sum(w)
    shares = {cells[0].strip("| "): float(cells[3].rstrip("%")) for cells in summary}
    assert shares["crlft"] > shares["sft_mix"] > 0
    svg = (tmp_path / "curves.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 4  # 2 methods x (expert, novice)
    (tmp_path / "results.md").unlink()
    (tmp_path / "curves.svg").unlink()
    proc = subprocess.run(
        cmd + ["--report_only"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "results.md").read_text() == table and (
        tmp_path / "curves.svg"
    ).read_text() == svg
