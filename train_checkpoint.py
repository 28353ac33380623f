"""Checkpoints that survive crashes: CKPT_DIR/step_XXXXXXX (--ckpt_dir, default out_dir/ckpt) holds every rank's
DCP shard of model and optimizer, its RNG (safetensors) and a manifest of each file's size and SHA-256 and of the
run settings; written as .tmp and renamed when complete, then CKPT_DIR/latest is replaced atomically. The step is
the whole data position (data order and learning rate are functions of it), so a resume that changes a run setting
is refused by name. Every rank writes into the same directory and rank 0 lists it: on several nodes it must be a
directory that every node shares, checked at start (check_shared)."""

import json
import os
import secrets
import shutil
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from prepare import file_digest, on_rank0


def save_checkpoint(model, optimizer, step, ckpt_dir, keep=2, config=None, run=None):
    """Write ckpt_dir/step_XXXXXXX as above; this run's newest `keep` stay. `config` for the reader, `run` for
    check_same_run."""
    rank = dist.get_rank()
    final = os.path.join(ckpt_dir, f"step_{step:07d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, os.path.join(tmp, f"rng_rank{rank}.safetensors"))
    dist.barrier()
    if rank == 0:
        paths = {f: os.path.join(tmp, f) for f in sorted(os.listdir(tmp))}
        files = {f: [os.path.getsize(p), file_digest(p)] for f, p in paths.items()}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(
                {
                    "step": step,
                    "world_size": dist.get_world_size(),
                    "run": run,
                    "config": config,
                    "files": files,
                },
                f,
                indent=1,
            )
        shutil.rmtree(final, ignore_errors=True)
        # atomic: a crash before this line leaves the previous checkpoint as latest
        os.rename(tmp, final)
        with open(os.path.join(ckpt_dir, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(ckpt_dir, "latest.tmp"), os.path.join(ckpt_dir, "latest"))
        # Pruned by step, not by name alone: a checkpoint above `step` is from an attempt that crashed before it
        # became latest (this one replaces it), and a .tmp from one that crashed while writing.
        steps = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step_"))
        done = [d for d in steps if not d.endswith(".tmp") and _step(d) <= step]
        for d in done[:-keep] + [d for d in steps if d.endswith(".tmp") or _step(d) > step]:
            shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
    dist.barrier()


def _step(name):
    return int(name.removeprefix("step_").removesuffix(".tmp"))


def check_shared(ckpt_dir, group):
    """Several nodes: each node's first rank must see a file that rank 0 writes where the checkpoints go (the
    nearest existing directory of ckpt_dir, so nothing is created). On node-local disks the shards of the other
    nodes would never reach rank 0's manifest; refused in one line on every rank."""

    def write_probe():
        where = os.path.abspath(ckpt_dir)
        while not os.path.isdir(where):
            where = os.path.dirname(where)
        path = os.path.join(where, f".crlft-shared-{secrets.token_hex(8)}")
        with open(path, "w") as f:
            f.write("train.py checks that every node sees this file; it is removed at once\n")
        return path

    probe = on_rank0(write_probe, group)
    blind = [False] * dist.get_world_size()
    dist.all_gather_object(
        blind, int(os.environ.get("LOCAL_RANK", 0)) == 0 and not os.path.exists(probe), group=group
    )
    if dist.get_rank() == 0:
        os.remove(probe)
    if any(blind):
        raise ValueError(
            f"--ckpt_dir={ckpt_dir}: rank {blind.index(True)} (another node) does not see the "
            "files rank 0 writes there; checkpoints of several nodes need a directory that every "
            "node shares: --ckpt_dir=/shared/path (--out_dir may stay node-local)"
        )


def resume_point(ckpt_dir, resume, run):
    """(rank 0) The checkpoint a run starts from: ckpt_dir's latest when resuming (verified, of the same run), else
    None. Checkpoints without a latest are refused rather than mixed with a new run's."""
    if not resume:
        return None
    if not os.path.isfile(os.path.join(ckpt_dir, "latest")):
        old = (
            sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step_"))
            if os.path.isdir(ckpt_dir)
            else []
        )
        if any(not d.endswith(".tmp") for d in old):
            raise ValueError(
                f"{ckpt_dir} holds checkpoints ({', '.join(old)}) but no `latest`: resume from one by "
                "writing its name into latest, or start over with --resume=false (moves them aside)"
            )
        return None
    with open(os.path.join(ckpt_dir, "latest")) as f:
        latest = os.path.join(ckpt_dir, f.read().strip())
    check_same_run(latest, run)
    return latest


def move_aside(ckpt_dir):
    """(rank 0) --resume=false: an earlier run's checkpoints are renamed ckpt_dir.old-TIME before this run writes
    any, so that the two never mix (a later resume or pruning would take one run's for the other's). Returns the
    new name, or None when ckpt_dir holds no checkpoint."""
    if not os.path.isdir(ckpt_dir) or not any(
        d == "latest" or d.startswith("step_") for d in os.listdir(ckpt_dir)
    ):
        return None
    aside = f"{os.path.normpath(ckpt_dir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    while os.path.exists(aside):  # two starts within a second
        aside += "+"
    os.rename(ckpt_dir, aside)
    return aside


def check_same_run(path, run):
    """Refuse to resume from `path` if it is not a complete, intact checkpoint (naming the file), or if `run` would
    change its model, data order or schedule (naming the field)."""
    manifest = os.path.join(path, "manifest.json")
    try:
        with open(manifest) as f:
            state = json.load(f)
        files = state["files"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(
            f"checkpoint {path} is incomplete or corrupted: cannot read {manifest} ({e}). "
            f"Write an earlier checkpoint's name into {os.path.dirname(path)}/latest to resume "
            "from it, or start over with --resume=false"
        ) from e
    for name, (size, digest) in files.items():
        p = os.path.join(path, name)
        if not os.path.exists(p):
            raise ValueError(f"checkpoint {path} is corrupted: {name} is missing")
        if os.path.getsize(p) != size:
            raise ValueError(
                f"checkpoint {path} is corrupted: {name} has {os.path.getsize(p)} bytes, "
                f"the manifest says {size} (half-written?)"
            )
        if file_digest(p) != digest:
            raise ValueError(f"checkpoint {path} is corrupted: {name} fails its SHA-256 check")
    saved = state.get("run")
    if saved is None:
        raise ValueError(
            f"{path}: written by an earlier version of train.py (no run settings in its "
            "manifest); start over with --resume=false or another --ckpt_dir"
        )
    # as the manifest stores it: tuples are lists
    for field, value in json.loads(json.dumps(run)).items():
        if field in saved and saved[field] != value:
            short = [
                v if len(v) <= 120 else v[:120] + "..."
                for v in (json.dumps(saved[field]), json.dumps(value))
            ]
            raise ValueError(
                f"{path}: {field} was {short[0]} in the run that wrote this checkpoint, now "
                f"{short[1]}: the model, the data order or the learning-rate schedule would "
                "differ. Resume with the same value, or start over with --resume=false"
            )


def load_checkpoint(path, model, optimizer):
    """Model, optimizer and this rank's RNG from `path` (verified by check_same_run); returns its step."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)  # in place
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    rng = load_file(os.path.join(path, f"rng_rank{dist.get_rank()}.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return int(os.path.basename(path).removeprefix("step_"))
