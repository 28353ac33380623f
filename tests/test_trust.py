"""Trust at scale (issue 29): several nodes, resumes, stops, and weights that say what they do.

Real `train.py` runs under torchrun on a tiny model: a kill -9 of one rank, or of a node, then a restart continues
the loss curve of an uninterrupted run step for step, on one node and on two "nodes" of this machine (each with its
own private disk: a mount namespace, root only); SIGTERM and Ctrl-C save once on every rank and exit non-zero with
one line; --max_steps is part of the run; --resume=false never mixes two runs' checkpoints; --class_weights that a
file's own weights (or a prepared directory's) would override is refused; a failed start leaves nothing new.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import tokenized_data
from test_train import TINY, env, log, losses, tokenize_toy, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
RUN = ["--max_steps=14", "--ckpt_every=2"]  # both epochs of TINY at 2 ranks: a validation at step 7


def one_line(stderr, prefix="error: "):
    lines = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and 'train.py", line' not in stderr, stderr[-3000:]
    return lines[0]


def same_curve(out_dir, reference):
    resumed = losses(out_dir)  # each step once
    assert sorted(resumed) == sorted(reference)
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run at 2 ranks: its loss for each step."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(RUN, out, launcher=TORCHRUN)
    return losses(out)


def start(cmd, **kwargs):
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def wait_for_step(log_path, step, procs, timeout=240):
    """Until `log_path` holds `step` (the run must still be going)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(log_path):
            with open(log_path) as f:
                if any(json.loads(line)["step"] >= step for line in f if line.strip()):
                    return
        assert all(p.poll() is None for p in procs), "the run ended before it could be stopped"
        time.sleep(0.02)
    raise AssertionError(f"step {step} never logged in {log_path}")


def worker(out_dir, rank):
    """The pid of train.py's rank `rank` whose --out_dir is `out_dir` (not torchrun's, not a wrapper's)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if (
            f"--out_dir={out_dir}".encode() in cmd
            and b"torch.distributed.run" not in cmd
            and f"RANK={rank}".encode() in environ
        ):
            return int(pid)
    raise AssertionError(f"no rank {rank} of {out_dir}")


def finish(procs, timeout=240):
    """(return codes, stderr of each) once every process ended; a hang fails the test."""
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [p.returncode for p in procs], [err for _, err in outs]


# ------------------------------------------------------------------------------------------ one node, two ranks
def test_kill_9_of_one_rank_then_restart_continues_the_same_loss_curve(tmp_path, reference):
    out = tmp_path / "run"
    cmd = [*TORCHRUN, os.path.join(ROOT, "train.py"), *TINY, f"--out_dir={out}", *RUN]
    proc = start(cmd)
    wait_for_step(out / "log.jsonl", 5, [proc])  # step 4's checkpoint is the latest
    os.kill(worker(out, 1), signal.SIGKILL)
    codes, _ = finish([proc])
    assert codes[0] != 0
    train(RUN, out, launcher=TORCHRUN)
    same_curve(out, reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_once_on_every_rank_and_exit_non_zero(tmp_path, reference, sig):
    """SIGTERM to torchrun (a scheduler's preemption), or Ctrl-C (SIGINT to the terminal's whole process group):
    the step finishes, both ranks save it, one line says where and how to resume, the exit code is not 0; the same
    command then continues the uninterrupted run's loss curve."""
    out = tmp_path / "run"
    proc = start(
        [*TORCHRUN, os.path.join(ROOT, "train.py"), *TINY, f"--out_dir={out}", *RUN],
        start_new_session=True,
    )
    wait_for_step(out / "log.jsonl", 3, [proc])
    if sig == signal.SIGTERM:
        proc.send_signal(sig)
    else:
        os.killpg(proc.pid, sig)
    codes, (stderr,) = finish([proc])
    assert codes[0] != 0
    line = one_line(stderr, "stopped by ")
    step = int((out / "ckpt" / "latest").read_text().strip().removeprefix("step_"))
    assert 3 <= step < 14
    assert line == (
        f"stopped by {sig.name} after step {step} of 14: checkpoint {out / 'ckpt' / f'step_{step:07d}'};"
        " the same command resumes from it"
    )
    ckpt = out / "ckpt" / f"step_{step:07d}"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert {"rng_rank0.safetensors", "rng_rank1.safetensors"} <= set(manifest["files"])
    assert max(losses(out)) == step  # saved at the step it stopped after, not later
    if sig == signal.SIGTERM:
        train(RUN, out, launcher=TORCHRUN)
        same_curve(out, reference)


# ------------------------------------------------------------------------------------- two nodes on this machine
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(disk, state, args, private=True):
    """torchrun --nnodes=2 twice (node ranks 0 and 1, one process each). private: each node in its own mount
    namespace where `disk` is its own directory state/nodeN, as on two machines with local disks (what
    ../shared/two_nodes.sh does); else both see the same `disk`."""
    port, procs = free_port(), []
    for n in range(2):
        torchrun = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            f"--node_rank={n}",
            "--nproc_per_node=1",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            os.path.join(ROOT, "train.py"),
            *TINY,
            *args,
        ]
        if private:
            os.makedirs(state / f"node{n}", exist_ok=True)
            torchrun = [
                "unshare",
                "-m",
                "bash",
                "-c",
                'mount --bind "$1" "$2" && shift 2 && exec "$@"',
                "_",
                str(state / f"node{n}"),
                str(disk),
                *torchrun,
            ]
        procs.append(start(torchrun))
    return procs


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a mount namespace per node needs root and unshare",
)


@needs_root
@pytest.mark.slow
def test_two_nodes_with_node_local_disks(tmp_path, reference):
    """Checkpoints on node-local disks are refused at start in one line (node 1's shards would never reach rank 0's
    manifest); with --ckpt_dir on a shared directory, a kill -9 of node 1's rank and a restart of both nodes
    continue the uninterrupted run's loss curve."""
    disk, state = tmp_path / "disk", tmp_path / "state"
    disk.mkdir()
    codes, errs = finish(two_nodes(disk, state, [f"--out_dir={disk / 'out'}", *RUN]), timeout=120)
    assert codes[0] != 0 and codes[1] != 0
    line = one_line(errs[0])
    assert (
        f"--ckpt_dir={disk / 'out' / 'ckpt'}: rank 1 (another node) does not see the files" in line
    )
    assert "--ckpt_dir=/shared/path" in line
    # nothing left
    assert not (state / "node0" / "out").exists() and not (state / "node1" / "out").exists()
    shared = tmp_path / "shared_ckpt"
    args = [f"--out_dir={disk / 'out'}", f"--ckpt_dir={shared}", *RUN]
    procs = two_nodes(disk, state, args)
    wait_for_step(state / "node0" / "out" / "log.jsonl", 5, procs)
    os.kill(worker(disk / "out", 1), signal.SIGKILL)
    codes, _ = finish(procs, timeout=120)
    assert codes != [0, 0]
    # every rank's shard reached the shared directory
    latest = shared / (shared / "latest").read_text()
    assert {
        "rng_rank0.safetensors",
        "rng_rank1.safetensors",
        "__0_0.distcp",
        "__1_0.distcp",
    } <= set(json.loads((latest / "manifest.json").read_text())["files"])
    codes, errs = finish(two_nodes(disk, state, args), timeout=120)
    assert codes == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    same_curve(state / "node0" / "out", reference)
    # node 1 prepared its own copy of the data
    assert (state / "node1" / "out" / "data" / "meta.json").exists()


@needs_root
@pytest.mark.slow
def test_two_nodes_sharing_one_disk(tmp_path, reference):
    out = tmp_path / "out"
    procs = two_nodes(None, None, [f"--out_dir={out}", *RUN], private=False)
    wait_for_step(out / "log.jsonl", 5, procs)
    os.kill(worker(out, 1), signal.SIGKILL)
    codes, _ = finish(procs, timeout=120)
    assert codes != [0, 0]
    codes, errs = finish(
        two_nodes(None, None, [f"--out_dir={out}", *RUN], private=False), timeout=120
    )
    assert codes == [0, 0], errs[0][-3000:]
    same_curve(out, reference)


# ---------------------------------------------------------------------------------------- the run's own settings
def test_max_steps_defines_the_schedule_and_a_resume_keeps_it(tmp_path):
    sys.path.insert(0, ROOT)
    import train as T
    import train_config

    out = tmp_path / "run"
    train(["--max_steps=6", "--ckpt_every=3"], out)
    cfg = train_config.parse_config(TINY)
    records = [r for r in log(out) if "lr" in r]
    # warmup and cosine over the 6 steps, not over the epochs' 26
    assert [r["lr"] for r in records] == pytest.approx(
        [T.learning_rate(r["step"] - 1, 6, cfg) for r in records]
    )
    before = (out / "log.jsonl").read_text()
    for other in ("--max_steps=10", "--max_steps=0"):  # longer, or all epochs: another schedule
        proc = train([other], out, check=False)
        assert proc.returncode != 0
        line = one_line(proc.stderr)
        assert (
            f"max_steps was 6 in the run that wrote this checkpoint, now {other.split('=')[1]}"
            in line
        )
        assert "--resume=false" in line
    assert (out / "log.jsonl").read_text() == before


def test_resume_false_moves_the_earlier_run_aside_and_never_mixes_checkpoints(tmp_path):
    """The issue's case: an earlier run's higher steps stayed beside a new run's, pruning (by name) deleted the new
    run's latest. Now the earlier run's checkpoints are moved aside, and the new run resumes from its own."""
    out = tmp_path / "run"
    train(["--max_steps=4", "--ckpt_every=1", "--batch_tokens=500"], out)  # step_3, step_4
    # another run, not asked to start over
    proc = train(["--max_steps=2", "--ckpt_every=1"], out, check=False)
    assert proc.returncode != 0 and "batch_tokens was 500" in one_line(proc.stderr)
    proc = train(["--max_steps=2", "--ckpt_every=1", "--resume=false"], out)
    aside = [p for p in out.iterdir() if p.name.startswith("ckpt.old-")]
    assert len(aside) == 1
    assert (
        f"moved the checkpoints of the earlier run in {out / 'ckpt'} to {aside[0]}" in proc.stdout
    )
    assert sorted(os.listdir(aside[0])) == ["latest", "step_0000003", "step_0000004"]
    assert sorted(os.listdir(out / "ckpt")) == ["latest", "step_0000001", "step_0000002"]
    assert (out / "ckpt" / "latest").read_text() == "step_0000002"
    proc = train(["--max_steps=2", "--ckpt_every=1"], out)  # the new run's own checkpoint, intact
    assert f"resumed from {out / 'ckpt' / 'step_0000002'} at step 2" in proc.stdout
    assert sorted(losses(out)) == [1, 2]
    (out / "ckpt" / "latest").unlink()  # checkpoints without a latest: refused, not overwritten
    proc = train(["--max_steps=2", "--ckpt_every=1"], out, check=False)
    assert proc.returncode != 0 and "no `latest`" in one_line(proc.stderr)


def test_pruning_keeps_this_runs_newest_checkpoints(tmp_path):
    """save_checkpoint at step 6 beside steps 20 and 21 (left by an attempt that crashed before they became
    latest) keeps step 6 and its predecessor, and removes the others and stale .tmp directories."""
    import torch.distributed as dist

    from train_checkpoint import save_checkpoint

    ckpt = tmp_path / "ckpt"
    for name in (
        "step_0000002",
        "step_0000004",
        "step_0000005.tmp",
        "step_0000020",
        "step_0000021",
    ):
        (ckpt / name).mkdir(parents=True)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        model = torch.nn.Linear(2, 2)
        save_checkpoint(model, torch.optim.AdamW(model.parameters()), 6, str(ckpt), keep=2)
    finally:
        dist.destroy_process_group()
    assert sorted(os.listdir(ckpt)) == ["latest", "step_0000004", "step_0000006"]


# ------------------------------------------------------------------------------------------------- weights
def _weighted_files(tmp_path, weight):
    """OpenChat's JSONL: a weight on every message (the assistant's `weight`), two classes' files."""
    sys.path.insert(0, ROOT)
    import toy_task

    for name, answer in (("a", lambda x, y: x + y), ("b", toy_task.carry_free_sum)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for x in range(10, 70):
                items = [
                    {"role": "user", "content": f"{x}+{x + 7}=", "weight": 0.0},
                    {
                        "role": "assistant",
                        "content": toy_task.write_sum(answer(x, x + 7)),
                        "weight": weight,
                    },
                ]
                f.write(json.dumps({"items": items}) + "\n")
    return [
        f"--data=GPT4 Correct={tmp_path / 'a.jsonl'},GPT3={tmp_path / 'b.jsonl'}",
        f"--tokenizer={toy_task.TOKENIZER_PATH}",
        "--expert_condition=GPT4 Correct",
    ]


def test_class_weights_that_a_files_own_weights_override_are_refused(tmp_path):
    flags = _weighted_files(tmp_path, 1.0)
    proc = train(
        [*flags, "--class_weights=GPT4 Correct=1,GPT3=0.1", "--max_steps=1"],
        tmp_path / "run",
        check=False,
    )
    assert proc.returncode != 0 and not (tmp_path / "run").exists()
    assert one_line(proc.stderr) == (
        f"error: --class_weights: GPT3=0.1, but {tmp_path / 'b.jsonl'}:1 gives its assistant messages of class "
        "'GPT3' their own weight 1, which wins: drop 'GPT3' from --class_weights to train the file's weights, or "
        "take the weights out of the file"
    )
    # GPT3: the file's
    proc = train([*flags, "--class_weights=GPT4 Correct=1", "--max_steps=1"], tmp_path / "agrees")
    assert f"class {'GPT3'!r:16} {60:>9,} conversations: " in proc.stdout
    meta = json.loads((tmp_path / "agrees" / "data" / "meta.json").read_text())
    assert [w for w, _ in meta["trained_weights"]["GPT3"]] == [1.0]


def test_an_own_weight_0_only_masks_its_message_and_is_no_conflict():
    sys.path.insert(0, ROOT)
    import prepare
    from chat_readers import Conversation

    turns = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "weight": 0.0},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    prepare.check_own_weights(
        [Conversation(turns, "GPT3", class_name="GPT3", source="f.jsonl:3")], {"GPT3": 0.1}
    )
    turns[3]["weight"] = 0.5
    with pytest.raises(
        ValueError, match=r"GPT3=0.1, but f.jsonl:3 gives .* their own weight 0.5, which wins"
    ):
        prepare.check_own_weights(
            [Conversation(turns, "GPT3", class_name="GPT3", source="f.jsonl:3")], {"GPT3": 0.1}
        )


def test_a_prepared_directory_keeps_its_weights_and_the_summary_prints_them(tmp_path):
    sys.path.insert(0, ROOT)
    import numpy as np

    cache = tmp_path / "cache"
    tokenize_toy(cache)
    proc = train(
        [f"--data={cache}", "--class_weights=Expert=1,Novice=0.3", "--max_steps=1"],
        tmp_path / "run",
        check=False,
    )
    assert proc.returncode != 0 and not (tmp_path / "run").exists()
    assert one_line(proc.stderr) == (
        f"error: --class_weights: Novice=0.3, but --data={cache} was tokenized with weight 0.1 for class 'Novice', "
        "and prepared data keeps its weights: drop 'Novice' from --class_weights, or tokenize again with "
        "--class-weights"
    )
    proc = train(
        [f"--data={cache}", "--class_weights=Expert=1,Novice=0.1", "--max_steps=1"],
        tmp_path / "agrees",
    )
    # the summary's weights are those of the prepared arrays
    dataset = tokenized_data.TokenizedDataset.load(str(cache))
    token_class = np.repeat(dataset.class_ids, np.diff(dataset.offsets))
    for c, name in enumerate(dataset.class_names):
        weights, counts = np.unique(
            dataset.weights[(token_class == c) & (dataset.weights > 0)], return_counts=True
        )
        said = ", ".join(
            f"{n:,} tokens at weight {float(w):.3g}" for w, n in zip(weights[::-1], counts[::-1])
        )
        assert (
            f"class {name!r:16} {(dataset.class_ids == c).sum():>9,} conversations: {said}\n"
            in proc.stdout
        )


# ------------------------------------------------------------------------------------ a failed run leaves nothing
def test_a_run_failing_after_it_tokenized_leaves_nothing_new_in_an_existing_out_dir(tmp_path):
    """The expert-condition tie is found after the data is prepared: out_dir/data must go too."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    # no --expert_condition, no --class_weights: a tie at weight 1
    flags = _weighted_files(tmp_path, 1.0)[:2]
    proc = train([*flags, "--max_steps=1"], out, check=False)
    assert proc.returncode != 0 and "share the largest weight" in one_line(proc.stderr)
    assert sorted(os.listdir(out)) == ["notes.txt"]
