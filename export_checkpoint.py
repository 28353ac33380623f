"""Export any checkpoint of a run as the Hugging Face directory that the end of training writes (hf_export.export_hf),
with the run's expert condition as the chat template's default. One process, no torchrun, no GPU.

    python export_checkpoint.py --run=out/default                # the latest checkpoint -> out/default/export_step_N
    python export_checkpoint.py --run=out/default --step=200 --out=DIR --condition=GPT3

Everything comes from the checkpoint's manifest.json (train_checkpoint.save_checkpoint): the model's shape, the
run's config (the tokenizer as train.py found it, the template, the expert condition, the dtype) and the SHA-256 of
every file, checked before anything is read. The weights are read from the torch.distributed.checkpoint shards
without a process group (dcp.load with no_dist=True), under the names FSDP saved them: the model's own."""

import argparse
import dataclasses
import json
import os
import shutil
import sys
import warnings

import torch
import torch.distributed.checkpoint as dcp

import data
import hf_export
import train_job
from model import Transformer
from model_args import ModelArgs
from tokenizing import open_tokenizer
from train_checkpoint import check_same_run
from train_config import TrainConfig


def checkpoint_path(ckpt_dir: str, step: int | None) -> str:
    """ckpt_dir/step_NNNNNNN: `step`, else the one `latest` names."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(
            f"--run / --ckpt_dir: {ckpt_dir} is not a directory (the run's checkpoints are in "
            "its --ckpt_dir, by default OUT_DIR/ckpt)"
        )
    steps = sorted(
        int(d.removeprefix("step_"))
        for d in os.listdir(ckpt_dir)
        if d.startswith("step_") and d.removeprefix("step_").isdigit()
    )
    if step is None:
        latest = os.path.join(ckpt_dir, "latest")
        if not os.path.isfile(latest):
            raise FileNotFoundError(
                f"--run / --ckpt_dir: {ckpt_dir} has no `latest` checkpoint; choose one with "
                f"--step (found steps: {', '.join(map(str, steps)) or 'none'})"
            )
        with open(latest) as f:
            return os.path.join(ckpt_dir, f.read().strip())
    if step not in steps:
        raise ValueError(
            f"--step={step}: no checkpoint step_{step:07d} in {ckpt_dir}; it holds steps "
            f"{', '.join(map(str, steps)) or 'none'} (the run keeps its --keep_ckpts newest)"
        )
    return os.path.join(ckpt_dir, f"step_{step:07d}")


def read_manifest(path: str) -> dict:
    """The checkpoint's manifest, after checking every file's size and SHA-256 against it (as a resume does)."""
    check_same_run(path, {})
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    if not manifest.get("config"):
        raise ValueError(
            f"{path}/manifest.json: no run config (written by an earlier train.py): re-export by "
            "resuming the run with `python train.py` and the same options"
        )
    return manifest


def run_tokenizer(config: dict, recorded: list, path: str | None = None):
    """The run's tokenizer with its template, found as train.py found it (train_job.tokenizer_source),
    or --tokenizer. It must be the one the manifest records (file name, template, end-of-turn id)."""
    name, template, _ = recorded
    path = (
        path or train_job.tokenizer_source(config["model"], config["data"], config["tokenizer"])[0]
    )
    tokenizer = data.use_template(open_tokenizer(path), template)  # path None: Mistral v1's
    found = [os.path.basename(tokenizer.path), tokenizer.template, tokenizer.eot_id]
    if found != recorded:
        raise ValueError(
            f"--tokenizer: {tokenizer.path} gives {found} (file, template, end of turn id), the run "
            f"trained with {recorded}: pass the run's tokenizer file, --tokenizer=.../{name}"
        )
    return tokenizer


def load_model(path: str, args: ModelArgs) -> Transformer:
    """The checkpoint's model weights into a Transformer on the CPU, in the dtype they were saved in (FSDP's fp32
    master weights); the optimizer's state is not read."""
    with torch.device("meta"):
        model = Transformer(args)
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    wanted = {
        name for name in model.state_dict() if not (args.tie_embeddings and name == "output.weight")
    }
    if missing := sorted(name for name in wanted if f"model.{name}" not in saved):
        raise ValueError(
            f"{path}: the checkpoint has no {', '.join(missing[:3])}: not this model's checkpoint"
        )
    state = {
        name: torch.empty(
            saved[f"model.{name}"].size, dtype=saved[f"model.{name}"].properties.dtype
        )
        for name in wanted
    }
    # "torch.distributed is ... uninitialized, assuming ... a single process": yes
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": state}, checkpoint_id=path, no_dist=True)  # in place, by name
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, assign=True)
    # load_state_dict(assign=True) gave the two names two Parameters: tie again
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def export_checkpoint(
    path: str, out: str, condition: str | None = None, tokenizer_path: str | None = None
) -> dict:
    """Write checkpoint `path` as a Hugging Face directory `out` (must not exist, or be empty), as train.export does
    at the end of the run: its dtype, its tokenizer and template, `condition` (None: the run's expert condition).
    Returns {"step", "condition", "out"}. On an error nothing is left in `out`."""
    manifest = read_manifest(path)
    config, run = manifest["config"], manifest["run"]
    fields = {f.name for f in dataclasses.fields(ModelArgs)}
    args = ModelArgs(**{k: v for k, v in run["model"].items() if k in fields})
    tokenizer = run_tokenizer(config, run["tokenizer"], tokenizer_path)
    # the manifest's config is the run's after set-up: its expert condition chosen
    if condition is None:
        condition = config["expert_condition"] if config["use_condition"] else ""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(
            f"--out={out} exists and is not an empty directory: choose another or delete it"
        )
    model = load_model(path, args)
    dtype = torch.bfloat16 if config["dtype"] == "bf16" else torch.float32  # as train.export writes
    made = not os.path.exists(out)
    try:
        hf_export.export_hf(model.to(dtype), tokenizer, out, condition=condition)
    except BaseException:  # nothing left behind: the directory as it was (absent, or empty)
        shutil.rmtree(out, ignore_errors=True)
        if not made:
            os.makedirs(out)
        raise
    return {"step": manifest["step"], "condition": condition, "out": out}


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--run", default=TrainConfig.out_dir, help="the run's --out_dir (default: %(default)s)"
    )
    p.add_argument("--ckpt_dir", "--ckpt-dir", help="the run's --ckpt_dir (default: RUN/ckpt)")
    p.add_argument("--step", type=int, help="the checkpoint's step (default: the latest)")
    p.add_argument("--out", help="the new export's directory (default: RUN/export_step_NNNNNNN)")
    p.add_argument(
        "--condition",
        help="the chat template's default condition ('' for none; default: the run's "
        "expert condition)",
    )
    p.add_argument(
        "--tokenizer",
        help="the run's tokenizer file, where it has moved (default: as train.py found it)",
    )
    opts = p.parse_args(argv)
    try:
        path = checkpoint_path(opts.ckpt_dir or os.path.join(opts.run, "ckpt"), opts.step)
        out = opts.out or os.path.join(opts.run, f"export_{os.path.basename(path)}")
        done = export_checkpoint(path, out, opts.condition, opts.tokenizer)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {data.one_line(e)}")
    print(
        f"exported step {done['step']} ({path}) to {out}, default condition {done['condition']!r}: "
        f"python sample.py --model={out}"
    )


if __name__ == "__main__":
    main()
