"""Checkpoints that survive crashes: sharded (torch.distributed.checkpoint), atomic, verified on load.

out_dir/ckpt/step_XXXXXXX holds every rank's shard of the model and optimizer (DCP), each rank's RNG state,
and a manifest of every file's size and CRC32. It is written as step_XXXXXXX.tmp and renamed when complete,
then out_dir/ckpt/latest is replaced (also atomically) to name it: a crash at any point leaves the previous
checkpoint as the latest. The data order and the learning rate are functions of the step, so the step is all
the "data position" and "scheduler state" a resumed run needs.
"""
import json
import os
import shutil
import zlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


class CheckpointError(RuntimeError):
    pass


def _crc32(path):
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def save_checkpoint(model, optimizer, step, out_dir, keep=2, config=None):
    """Write out_dir/ckpt/step_XXXXXXX (every rank its shard), then point ckpt/latest at it; keep the newest
    `keep`. `config` (a dict) is stored in the manifest for the reader."""
    rank = dist.get_rank()
    root = os.path.join(out_dir, "ckpt")
    final = os.path.join(root, f"step_{step:07d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save({"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(tmp, f"rng_rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        files = sorted(os.listdir(tmp))
        state = {"step": step, "world_size": dist.get_world_size(), "config": config,
                 "files": {f: [os.path.getsize(os.path.join(tmp, f)), _crc32(os.path.join(tmp, f))]
                           for f in files}}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(state, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)  # atomic: a crash before this line leaves the previous checkpoint as latest
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        old = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
        for d in old[:-keep]:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    dist.barrier()


def verify_checkpoint(path):
    """Raise CheckpointError with a clear message if `path` is not a complete, intact checkpoint."""
    manifest = os.path.join(path, "manifest.json")
    try:
        with open(manifest) as f:
            state = json.load(f)
        files = state["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupted: cannot read {manifest} ({e}). "
                              "Delete it (or point --out_dir elsewhere) to start from an earlier one.") from e
    for name, (size, crc) in files.items():
        p = os.path.join(path, name)
        if not os.path.exists(p):
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} is missing")
        if os.path.getsize(p) != size:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} has {os.path.getsize(p)} bytes, "
                                  f"the manifest says {size} (half-written?)")
        if _crc32(p) != crc:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} fails its CRC32 check")
    return state


def latest_checkpoint(out_dir):
    """The newest complete checkpoint of out_dir, or None."""
    root = os.path.join(out_dir, "ckpt")
    try:
        with open(os.path.join(root, "latest")) as f:
            return os.path.join(root, f.read().strip())
    except FileNotFoundError:
        return None


def load_checkpoint(path, model, optimizer, world_size):
    state = verify_checkpoint(path)
    if state["world_size"] != world_size:
        raise CheckpointError(f"checkpoint {path} was written by {state['world_size']} ranks, this run has "
                              f"{world_size}: the data order would differ. Resume with the same world size.")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    rng = torch.load(os.path.join(path, f"rng_rank{dist.get_rank()}.pt"), weights_only=False)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state["step"]


