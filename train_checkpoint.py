"""Checkpoints that survive crashes: ckpt/step_XXXXXXX holds every rank's DCP shard of model and optimizer, its RNG
(safetensors) and a manifest of each file's size and SHA-256 and of the run settings; written as .tmp and renamed when
complete, then ckpt/latest is replaced atomically. The step is the whole data position (data order and learning rate
are functions of it), so a resume that changes a run setting is refused by name."""
import json
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from prepare import file_digest


class CheckpointError(ValueError):  # bad input: on_rank0 hands it to every rank, train.py prints one line
    pass


def save_checkpoint(model, optimizer, step, out_dir, keep=2, config=None, run=None):
    """Write ckpt/step_XXXXXXX as above; the newest `keep` stay. `config` for the reader, `run` for check_same_run."""
    rank, root = dist.get_rank(), os.path.join(out_dir, "ckpt")
    final = os.path.join(root, f"step_{step:07d}")
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
            json.dump({"step": step, "world_size": dist.get_world_size(), "run": run, "config": config,
                       "files": files}, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)  # atomic: a crash before this line leaves the previous checkpoint as latest
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        for d in sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))[:-keep]:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    dist.barrier()


def verify_checkpoint(path):
    """The manifest of `path`; CheckpointError naming the file if it is not a complete, intact checkpoint."""
    manifest = os.path.join(path, "manifest.json")
    try:
        with open(manifest) as f:
            state = json.load(f)
        files = state["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupted: cannot read {manifest} ({e}). "
                              "Delete it (or point --out_dir elsewhere) to start from an earlier one.") from e
    for name, (size, digest) in files.items():
        p = os.path.join(path, name)
        if not os.path.exists(p):
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} is missing")
        if os.path.getsize(p) != size:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} has {os.path.getsize(p)} bytes, "
                                  f"the manifest says {size} (half-written?)")
        if file_digest(p) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} fails its SHA-256 check")
    return state


def latest_checkpoint(out_dir):
    """The newest complete checkpoint of out_dir, or None."""
    try:
        with open(os.path.join(out_dir, "ckpt", "latest")) as f:
            return os.path.join(out_dir, "ckpt", f.read().strip())
    except FileNotFoundError:
        return None


def check_same_run(path, run):
    """Refuse to resume from `path` a run whose model or data order `run` would change, naming the field."""
    saved = verify_checkpoint(path).get("run")
    if saved is None:
        raise CheckpointError(f"{path}: written by an earlier version of train.py (no run settings in its "
                              "manifest); start over with --resume=false or another --out_dir")
    for field, value in json.loads(json.dumps(run)).items():  # as the manifest stores it: tuples are lists
        if field in saved and saved[field] != value:
            short = [v if len(v) <= 120 else v[:120] + "..." for v in (json.dumps(saved[field]), json.dumps(value))]
            raise CheckpointError(f"{path}: {field} was {short[0]} in the run that wrote this checkpoint, now "
                                  f"{short[1]}: the model or the data order would differ. Resume with the same "
                                  "value, or start over with --resume=false")


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
