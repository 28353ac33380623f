"""Run by tests/test_objective.py under torchrun: one C-RLFT step of train.py on every rank, then rank 0 saves
what the test compares with its own float64 computation: the weights the step started from, the
conversations of every rank's micro-batches, and the gradients (gathered from the FSDP shards).

    torchrun --nproc_per_node=2 tests/crlft_harness.py OUT_FILE STEP --key=value ...   (train.py's options)

STEP is the 0-based global step whose bins are used; with a checkpoint in out_dir the step resumes from it,
exactly as train.py does (so STEP should then be the checkpoint's step).
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

import packing  # noqa: E402
import train  # noqa: E402
import train_config  # noqa: E402
import train_job  # noqa: E402
from train_checkpoint import load_checkpoint  # noqa: E402


def main(out_file, step, argv):
    cfg = train_config.parse_config(argv)
    rank, world_size, device, mesh = train.setup_distributed()
    group = dist.new_group(backend="gloo")
    try:
        job = train_job.setup(cfg, rank, world_size, group)
        cfg, args = job.cfg, job.args
        model = train.build_model(cfg, args, device, mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        if job.resume_from is not None:
            assert load_checkpoint(job.resume_from, model, optimizer) == step
        start = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        _, bins = job.steps[step]
        mine = bins[rank * cfg.grad_accum : (rank + 1) * cfg.grad_accum]
        weight_sum, _ = train.crlft_step(
            model, [packing.make_batch(job.dataset, b) for b in mine], world_size
        )
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        if rank == 0:
            torch.save(
                {
                    "args": args,
                    "weights": start,
                    "grads": grads,
                    "bins": bins,
                    "grad_accum": cfg.grad_accum,
                    "weight_sum": weight_sum.item(),
                    "data_dir": os.path.join(cfg.out_dir, "data"),
                },
                out_file,
            )
    finally:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
