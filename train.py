"""C-RLFT training: class-conditioned, reward-weighted supervised fine-tuning with FSDP2.

    python train.py                                    # embedded default: the toy mixed-quality task, on CPU
    torchrun --nproc_per_node=8 train.py --preset=mistral-7b --model=/models/Mistral-7B-v0.1 \\
        --data="GPT4 Correct=gpt4.jsonl,GPT3=gpt35.json" --class_weights="GPT4 Correct=1,GPT3=0.1"

Each data source is a coarse reward class c with reward r_c, named in the prompt (data.py); the loss weights every
assistant token by r_c and normalises over the global batch, L = sum_t w_t CE_t / sum_t w_t: `crlft_step` below.
"""

import dataclasses
import datetime
import json
import math
import os
import shutil
import signal
import socket
import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import data
import hf_export
import packing
import toy_task
import train_job
from model import Transformer
from model_args import PRESETS
from train_checkpoint import load_checkpoint, save_checkpoint
from train_config import help_text, parse_config
from train_progress import Progress, describe, say


# -----------------------------------------------------------------------------------------------------------
# Distributed set-up: always a process group (of one under plain `python train.py`), so that one code path
# (FSDP2, distributed checkpoints) serves a laptop and 8 GPUs alike.
def setup_distributed():
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(
                RANK="0",
                WORLD_SIZE="1",
                LOCAL_RANK="0",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(s.getsockname()[1]),
            )
    device = (
        torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (
        dist.get_rank(),
        dist.get_world_size(),
        device,
        init_device_mesh(device.type, (dist.get_world_size(),)),
    )


# -----------------------------------------------------------------------------------------------------------
def build_model(cfg, args, device, mesh):
    """Built on the meta device, sharded block by block, then filled with weights broadcast from rank 0 (a fresh
    init with the seed, or the checkpoint with its new <|end_of_turn|> row the mean embedding, as OpenChat)."""
    with torch.device("meta"):
        model = Transformer(args)
    # Parameters stay fp32 (the optimizer's master copy); compute in bf16, reduce gradients in fp32.
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if cfg.dtype == "bf16" else None, reduce_dtype=torch.float32
    )
    for i, block in enumerate(model.layers):
        if cfg.activation_checkpointing:
            model.layers[i] = block = checkpoint_wrapper(block)
        # per block, as torchtitan does; the attention kernels are custom ops inside its graph
        if cfg.compile:
            block.compile()
        # The last block's parameters are gathered again by the root right away: keep them unsharded.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(model.layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)
    full = {}
    if dist.get_rank() == 0:
        if cfg.model in PRESETS:
            torch.manual_seed(cfg.seed)
            weights = Transformer(args)
            weights.init_weights()
        else:
            weights = Transformer.from_pretrained(cfg.model, max_seq_len=args.max_seq_len)
            weights.grow_vocab(args.vocab_size)
        full = weights.state_dict()
    set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    return model


# -----------------------------------------------------------------------------------------------------------
# The C-RLFT step
def crlft_step(model, batches, world_size):
    """Gradients of L = sum(w * CE) / sum(w) over the global batch: every rank's micro-batches `batches`.
    Returns the global sum(w) and, per micro-batch, (sum(w * CE), per-token CE) for reporting."""
    # The denominator is the weight of the whole global batch, known before any backward: a micro-batch or a
    # rank normalised by its own weight would count the 0.1-weighted tokens differently in every batch.
    weight_sum = torch.stack([b.loss_weights.sum() for b in batches]).sum().float().reshape(1)
    dist.all_reduce(weight_sum)
    results = []
    for i, b in enumerate(batches):
        # reduce the gradients once per step
        model.set_requires_gradient_sync(i == len(batches) - 1)
        loss_sum, token_ce = model(
            b.tokens[None],
            position_ids=b.position_ids[None],
            cu_seqlens=b.cu_seqlens,
            max_seqlen=b.max_seqlen,
            targets=b.targets[None],
            loss_weights=b.loss_weights[None],
        )
        # FSDP averages gradients over ranks; each rank's part of the global sum is multiplied back. The fused
        # cross-entropy already holds d(sum w*CE)/d(hidden, lm_head) from its forward (crlft_kernels/cross_entropy.py):
        # this backward only scales them by world_size / sum(w), then flows through the blocks as usual.
        (loss_sum * world_size / weight_sum.clamp_min(1e-8)).backward()
        results.append((loss_sum.detach(), token_ce.detach()))
    return weight_sum, results


def make_optimizer(model, cfg, device):
    """AdamW with the recipe's betas, eps and weight decay (the facts file's public recipe). fused: the whole update
    in one kernel per device on GPU, instead of many multi-tensor launches."""
    betas = (cfg.beta1, cfg.beta2)
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=device.type == "cuda",
    )


def learning_rate(step, total_steps, cfg):
    """Linear warmup over 5% of the steps, then cosine down to 10% of the peak (public recipe). total_steps is the
    schedule's length, --max_steps or all epochs: part of the run, so a resume cannot move the schedule."""
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    )


@torch.no_grad()
def validate(model, dataset, my_bins, device):
    """sum(w * CE) / sum(w) over the held-out conversations, overall and per class. Every rank runs the same
    number of forward passes (FSDP gathers weights in each); a rank short of bins scores one with weight 0."""
    n = len(dataset.class_names)
    sums = torch.zeros(2 * n, dtype=torch.float64, device=device)  # per class: sum(w * CE), sum(w)
    for bin_ in my_bins:
        b = packing.make_batch(dataset, bin_ or [0]).to(device)
        weights = b.loss_weights.double() * bool(bin_)
        _, token_ce = model(
            b.tokens[None],
            position_ids=b.position_ids[None],
            cu_seqlens=b.cu_seqlens,
            max_seqlen=b.max_seqlen,
            targets=b.targets[None],
            loss_weights=weights[None].float(),
        )
        sums[:n].index_add_(0, b.class_ids, weights * token_ce.double())
        sums[n:].index_add_(0, b.class_ids, weights)
    dist.all_reduce(sums)
    per_class = {
        name: (sums[c] / sums[n + c]).item()
        for c, name in enumerate(dataset.class_names)
        if sums[n + c] > 0
    }
    return (sums[:n].sum() / sums[n:].sum().clamp_min(1e-12)).item(), per_class


def export(model, cfg, args, tokenizer, directory):
    """Gather the full weights (a collective: every rank calls this); rank 0 writes a Hugging Face directory
    and returns the model."""
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        local = Transformer(args)
    local.load_state_dict(full, assign=True)
    # load_state_dict(assign=True) gave the two names two Parameters: tie again
    if args.tie_embeddings:
        local.output.weight = local.tok_embeddings.weight
    if cfg.export:
        hf_export.export_hf(
            local.to(torch.bfloat16 if cfg.dtype == "bf16" else torch.float32),
            tokenizer,
            directory,
            condition=cfg.expert_condition if cfg.use_condition else "",
        )
        say(f"exported a Hugging Face model to {directory} (python sample.py --model={directory})")
    return local


def train(cfg):
    """Run one training job; returns a dict of results (rank 0) for experiments and tests."""
    new_out_dir = not os.path.isdir(cfg.out_dir)  # looked at before any rank writes
    rank, world_size, device, mesh = setup_distributed()
    torch.manual_seed(cfg.seed)
    # data preparation's waits
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=6))
    written = []
    try:
        try:
            job = train_job.setup(cfg, rank, world_size, group, written)
        except (ValueError, OSError, KeyboardInterrupt) as e:
            if rank == 0 and not isinstance(e, KeyboardInterrupt):  # one line, once
                print(f"error: {data.one_line(e)}", file=sys.stderr)
            # each node's disk: nothing of this run left behind
            if int(os.environ.get("LOCAL_RANK", 0)) == 0:
                for path in [cfg.out_dir] if new_out_dir else written:
                    shutil.rmtree(path, ignore_errors=True)
            if isinstance(e, KeyboardInterrupt):
                raise
            raise SystemExit(1)
        cfg = job.cfg
        model = build_model(cfg, job.args, device, mesh)
        optimizer = make_optimizer(model, cfg, device)
        start_step = load_checkpoint(job.resume_from, model, optimizer) if job.resume_from else 0
        if job.resume_from:
            say(f"resumed from {job.resume_from} at step {start_step}")
        return train_loop(job, model, optimizer, start_step, device)
    finally:
        dist.barrier()  # before teardown, or gloo aborts now and then
        dist.destroy_process_group()


def validation_bins(dataset, held_out, cfg, rank, world_size):
    """This rank's share of the held-out conversations, packed once into bins of batch_tokens; every rank gets as
    many (some empty), since each forward pass is a collective under FSDP."""
    packed = (
        packing.pack_epoch(dataset.lengths[held_out], cfg.batch_tokens, 1, cfg.seed, 0)
        if len(held_out)
        else []
    )
    # one bin a step; positions -> dataset indices
    bins = [[int(held_out[i]) for i in step[0]] for step in packed]
    bins += [[]] * (-len(bins) % world_size)
    return bins[rank::world_size]


def train_loop(job, model, optimizer, start_step, device):
    cfg, dataset, steps = job.cfg, job.dataset, job.steps
    rank, world_size = dist.get_rank(), dist.get_world_size()
    total_steps = min(len(steps), cfg.max_steps or len(steps))
    val_bins = validation_bins(dataset, job.held_out, cfg, rank, world_size)
    # SIGTERM (a scheduler's preemption) and Ctrl-C (SIGINT) only note the request: the step in flight finishes,
    # then every rank saves and exits, non-zero (stopped is not finished: `train.py && evaluate` must not go on).
    stop = {}
    previous = {
        s: signal.signal(s, lambda signum, _: stop.setdefault("signal", signum))
        for s in (signal.SIGTERM, signal.SIGINT)
    }
    # matmul weights: 6N FLOPs a token
    n_params = model.num_params(exclude_embeddings=not job.args.tie_embeddings)
    describe(
        cfg, job.tokenizer, job.args, model.size_text(), dataset, job.held_out, steps, world_size
    )
    progress = Progress(
        cfg, start_step, total_steps, dataset.class_names, n_params, job.args, device
    )
    step, stopped = start_step, 0
    try:
        while step < total_steps:
            progress.start_step(step)
            epoch, bins = steps[step]
            batches = [
                packing.make_batch(dataset, b).to(device)
                for b in bins[rank * cfg.grad_accum :][: cfg.grad_accum]
            ]
            lr = learning_rate(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            weight_sum, outputs = crlft_step(model, batches, world_size)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss = progress.end_step(step, epoch, lr, grad_norm, batches, outputs, weight_sum)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss} at step {step}; the last checkpoint is intact"
                )
            # an epoch ends: the validation loss, an export to keep
            if step == len(steps) or steps[step][0] != epoch:
                if val_bins:
                    val_loss, per_class = validate(model, dataset, val_bins, device)
                    progress.log(
                        {
                            "step": step,
                            "epoch": epoch,
                            "val_loss": val_loss,
                            "val_loss_per_class": per_class,
                        }
                    )
                    say(
                        f"epoch {epoch + 1}: validation loss {val_loss:.4f} ("
                        + ", ".join(f"{name} {v:.4f}" for name, v in per_class.items())
                        + ")"
                    )
                if cfg.export:
                    export(
                        model,
                        cfg,
                        job.args,
                        job.tokenizer,
                        os.path.join(cfg.out_dir, f"epoch_{epoch + 1}"),
                    )
            # A signal on any rank: every rank saves this step, once, and all leave together.
            flag = torch.tensor([float(stop.get("signal", 0))], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stopped = int(flag.item())
            if stopped or step % cfg.ckpt_every == 0 or step == total_steps:
                save_checkpoint(
                    model,
                    optimizer,
                    step,
                    cfg.ckpt_dir,
                    cfg.keep_ckpts,
                    dataclasses.asdict(cfg),
                    job.run,
                )
            if stopped:
                break
    finally:
        progress.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopped:
        if rank == 0:
            print(
                f"stopped by {signal.Signals(stopped).name} after step {step} of {total_steps}: checkpoint "
                f"{os.path.join(cfg.ckpt_dir, f'step_{step:07d}')}; the same command resumes from it",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(128 + stopped)
    # the full model is gathered only to export or to score it
    scored = cfg.data == "toy" and cfg.toy_eval
    final = None
    if cfg.export or scored:
        final = export(model, cfg, job.args, job.tokenizer, os.path.join(cfg.out_dir, "export"))
    results = {"interrupted": False, "steps": step}
    if rank != 0:
        return results
    if scored:  # the toy task's score, then results.json (rank 0)
        condition = cfg.expert_condition if cfg.use_condition else ""
        problems = toy_task.make_toy_eval(cfg.toy_eval, cfg.seed)
        prompt = lambda messages: data.encode_prompt(job.tokenizer, messages, condition)  # noqa: E731
        results["accuracy"], answers = toy_task.evaluate(
            final.float(), job.tokenizer, problems, prompt
        )
        results["accuracy_turn3"], _ = toy_task.evaluate(
            final, job.tokenizer, problems, prompt, turn=3
        )
        say(
            f"toy task: {results['accuracy']:.1%} of {cfg.toy_eval} held-out problems answered correctly as the "
            f"first question of a chat, {results['accuracy_turn3']:.1%} as the third (greedy, condition "
            f"{condition!r}); e.g. {answers[0][0]} -> {answers[0][1]!r}"
        )
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def main(argv):
    if {"-h", "--help"} & set(argv):
        return print(help_text(__doc__))
    try:
        cfg = parse_config(argv)
    except ValueError as e:
        # under torchrun every rank parses: one of them says it
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    try:
        return train(cfg)
    # Ctrl-C outside the training steps (during those it saves first: train_loop)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print("interrupted: nothing saved since the last checkpoint", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
