"""C-RLFT training: class-conditioned, reward-weighted supervised fine-tuning with FSDP2.

    python train.py                                    # embedded default: the toy mixed-quality task, on CPU
    torchrun --nproc_per_node=8 train.py --preset=mistral-7b --model=/models/Mistral-7B-v0.1 \\
        --data="GPT4 Correct=gpt4.jsonl,GPT3=gpt35.json" --class_weights="GPT4 Correct=1,GPT3=0.1"

The objective (OpenChat, Wang et al. 2023): every data source c is a coarse reward class with reward r_c.
The policy is conditioned on the class through its prompt ("GPT4 Correct User: ..." vs "GPT3 User: ..."),
and every supervised token is weighted by its class reward:

    L(theta) = sum_t w_t * CE(p_theta(. | x_<t, c), x_t) / sum_t w_t

where the sums run over every token of the global batch (all ranks, all micro-batches), w_t = r_c on
assistant tokens (and their <|end_of_turn|>) and 0 elsewhere. One stage, no reward model, no RL: the step
is `crlft_step` below. At inference the prompt carries the expert condition.
"""
import collections
import dataclasses
import datetime
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import data
import plot
import toy_task
from checkpoint import CheckpointError, check_same_run, latest_checkpoint, load_checkpoint, save_checkpoint
from model import PRESETS, Transformer, args_from_hf_config, read_hf_config


# -----------------------------------------------------------------------------------------------------------
# Configuration
@dataclass
class TrainConfig:
    # data
    data: str = "toy"                 # "toy" | comma-separated sources, each [CLASS=]path (.jsonl, .json,
    #                                   "sharegpt") | a directory of `python data.py tokenize`
    tokenizer: str = ""               # tokenizer.model; "" = the --model directory's, else toy's / Mistral v1
    class_weights: str = "Expert=1,Novice=0.1"  # reward of each class
    sharegpt_condition: str = "GPT4 Correct"  # condition of sources without a class; "from_model": GPT4/GPT3
    use_condition: bool = True        # put the class condition in the prompts (False: plain "User:" prefixes)
    only_classes: str = ""            # comma-separated: train on these classes only ("" = all)
    expert_condition: str = "Expert"  # the condition used at evaluation and in the exported template
    skip_bad: bool = False            # skip and count bad records instead of stopping at the first
    val_fraction: float = 0.01        # conversations held out per class for the validation loss (0 = off)
    val_max: int = 2000               # at most this many held out in all
    toy_train: int = 20000            # toy task: training conversations (1-3 sums each)
    toy_expert_fraction: float = 0.02  # toy task: share of the expert class
    toy_error_rate: float = 1.0       # toy task: how often a sub-optimal answer is wrong
    toy_eval: int = 500               # toy task: held-out problems scored at the end
    # model
    model: str = "toy"                # a preset of model.py, or a Hugging Face directory to fine-tune
    dim: int = 0                      # overrides of the preset (0 = keep)
    n_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    max_seq_len: int = 0              # context (0 = the model's)
    # optimisation (the public OpenChat recipe)
    epochs: int = 5
    max_steps: int = 0                # stop early after this many steps (0 = all epochs)
    batch_tokens: int = 2048          # tokens per rank per micro-batch (bin size of the packer)
    grad_accum: int = 1               # micro-batches per rank per step
    lr: float = 1e-3                  # peak learning rate (the toy model's)
    lr_base: float = 0.0              # > 0: lr = lr_base * sqrt(supervised tokens per step / 4M) (OpenChat's rule)
    min_lr_ratio: float = 0.1         # cosine decays to 10% of the peak
    warmup_ratio: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # system
    dtype: str = "auto"               # bf16 compute on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    compile: bool = False             # torch.compile each block (GPU): fuses RMSNorm, RoPE, SwiGLU's elementwise ops
    seed: int = 1337
    out_dir: str = "out/default"
    ckpt_every: int = 200             # steps between checkpoints (and one at the end)
    keep_ckpts: int = 2
    resume: bool = True               # continue from out_dir's latest checkpoint when there is one
    export: bool = True               # a Hugging Face directory per epoch (out_dir/epoch_N) and at the end
    profile_step: int = 0             # >0: profile this step and the next two (torch.profiler), table in out_dir


# Recipes for released checkpoints (8 x 80 GB): OpenChat's settings, C-RLFT with GPT-4 answers as the expert
# class and GPT-3.5's weighted 0.1. They need --model=DIR and --data.
_RELEASED = dict(data="", class_weights="GPT4 Correct=1,GPT3=0.1", expert_condition="GPT4 Correct",
                 batch_tokens=77824, max_seq_len=8192, lr_base=3e-4 / 6, dtype="bf16", activation_checkpointing=True,
                 ckpt_every=500, toy_eval=0)
PRESETS_TRAIN = {
    "toy": {},
    "mistral-7b": dict(_RELEASED, model="<Mistral-7B-v0.1 directory>"),
    "openchat_3.5": dict(_RELEASED, model="<openchat_3.5 directory>"),  # its <|end_of_turn|> is kept
    "llama2-13b": dict(_RELEASED, model="<Llama-2-13b directory>", class_weights="GPT4=1,GPT3=0.1",
                       expert_condition="GPT4", sharegpt_condition="GPT4", batch_tokens=32768, max_seq_len=4096,
                       lr_base=3e-4),
    # Throughput check on one GPU: a ~1B model from scratch on packed ShareGPT (one class), tokens/s and MFU.
    "1b-throughput": dict(model="1b", data="sharegpt", skip_bad=True, class_weights="GPT4 Correct=1",
                          expert_condition="GPT4 Correct", batch_tokens=16384, max_seq_len=4096, lr=3e-4,
                          dtype="bf16", max_steps=30, ckpt_every=10**9, export=False, toy_eval=0, compile=True,
                          val_fraction=0.0),
}


class ConfigError(ValueError):
    pass


def parse_config(argv):
    """`--preset=NAME` first, then `--key=value` overrides; unknown keys and bad values are errors."""
    cfg = TrainConfig()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"expected --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key == "preset":
            if value not in PRESETS_TRAIN:
                raise ConfigError(f"--preset: unknown preset {value!r}; choose from {sorted(PRESETS_TRAIN)}")
            cfg = dataclasses.replace(cfg, **PRESETS_TRAIN[value])
        elif key not in fields:
            raise ConfigError(f"unknown config key --{key}; known keys: {', '.join(sorted(fields))}")
        else:
            overrides[key] = _convert(key, value, fields[key].type)
    cfg = dataclasses.replace(cfg, **overrides)
    _check(cfg)
    return cfg


def _convert(key, value, typ):
    typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ)
    if typ is bool:
        if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ConfigError(f"--{key} must be true or false, got {value!r}")
        return value.lower() in ("1", "true", "yes")
    try:
        return typ(value)
    except ValueError:
        raise ConfigError(f"--{key} must be {typ.__name__}, got {value!r}") from None


def _check(cfg):
    for key in ["epochs", "batch_tokens", "grad_accum", "ckpt_every", "keep_ckpts", "val_max"]:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"--{key} must be > 0, got {getattr(cfg, key)}")
    for key in ["lr", "eps", "grad_clip"]:
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"--{key} must be > 0, got {getattr(cfg, key)}")
    for key, lo, hi in [("warmup_ratio", 0, 0.999), ("min_lr_ratio", 0, 1), ("val_fraction", 0, 0.5),
                        ("toy_expert_fraction", 1e-9, 1), ("toy_error_rate", 0, 1)]:
        if not lo <= getattr(cfg, key) <= hi:
            raise ConfigError(f"--{key} must be in [{lo:g}, {hi:g}], got {getattr(cfg, key)}")
    if cfg.dtype not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"--dtype must be auto, bf16 or fp32, got {cfg.dtype!r}")
    if cfg.model.startswith("<"):
        raise ConfigError(f"--model: this preset fine-tunes a released checkpoint: pass its Hugging Face "
                          f"directory, --model=/path/to/{cfg.model.strip('<>').split()[0]}")
    if cfg.model not in PRESETS and not os.path.isdir(cfg.model):
        raise ConfigError(f"--model={cfg.model!r} is neither a preset ({', '.join(PRESETS)}) nor a directory")
    if not cfg.data:
        raise ConfigError('--data is required: e.g. --data="GPT4 Correct=gpt4.jsonl,GPT3=gpt35.json"')
    data.parse_class_weights(cfg.class_weights)


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
# Tokenizer and model shape: the checkpoint's own tokenizer, grown by <|end_of_turn|> where it lacks it.
def tokenizer_and_args(cfg):
    if cfg.model in PRESETS:
        path = cfg.tokenizer or (toy_task.TOKENIZER_PATH if cfg.data == "toy" else None)
        if os.path.isdir(cfg.data) and not cfg.tokenizer:  # tokenized by `python data.py tokenize`: its own
            path = data.TokenizedDataset.load(cfg.data).meta["tokenizer"]
        tokenizer = data.Tokenizer(path)
        args = dataclasses.replace(PRESETS[cfg.model], vocab_size=tokenizer.vocab_size)
    else:
        args = args_from_hf_config(read_hf_config(cfg.model), max_seq_len=cfg.max_seq_len or None)
        tokenizer = data.checkpoint_tokenizer(cfg.model, args.vocab_size, cfg.tokenizer or None)
    overrides = {k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len")
                 if getattr(cfg, k)}
    if "dim" in overrides or "n_heads" in overrides:  # let ModelArgs derive these again from the new shape
        overrides.update(head_dim=None, hidden_dim=None if "dim" in overrides else args.hidden_dim)
    args = dataclasses.replace(args, **overrides)
    return tokenizer, dataclasses.replace(args, vocab_size=max(args.vocab_size, tokenizer.vocab_size))


# -----------------------------------------------------------------------------------------------------------
# Data, prepared once per job: rank 0 tokenizes into out_dir/data (all cores), the others memory-map it.
def data_inputs(cfg, tokenizer, args):
    """Everything that decides the tokenized data: a prepared dataset is reused only when its hash matches."""
    if cfg.data == "toy":
        sources = [cfg.toy_train, cfg.toy_expert_fraction, cfg.toy_error_rate, cfg.seed]
    else:
        sources = [[name, path, data.source_digest(path)] for name, path in data.parse_sources(cfg.data)]
    return {"sources": sources, "tokenizer": [data.file_digest(tokenizer.model_path), tokenizer.eot_id],
            "template": data.TEMPLATE_VERSION, "class_weights": data.parse_class_weights(cfg.class_weights),
            "max_seq_len": args.max_seq_len,
            **{k: getattr(cfg, k) for k in ("sharegpt_condition", "use_condition", "only_classes", "skip_bad")}}


def tokenize_sources(cfg, tokenizer, args, key, directory):
    t0, stats = time.time(), collections.Counter()
    conversations = data.load_conversations(cfg.data, cfg.sharegpt_condition, cfg.skip_bad, stats,
                                            toy=(cfg.toy_train, cfg.toy_expert_fraction, cfg.seed, cfg.toy_error_rate))
    if cfg.only_classes:
        keep = {c.strip() for c in cfg.only_classes.split(",")}
        conversations = [c for c in conversations if c.class_name in keep]
        if not conversations:
            raise ConfigError(f"--only_classes={cfg.only_classes!r} leaves no conversation")
    if not cfg.use_condition:  # ablation: same data, same weights, no class in the prompt
        conversations = [dataclasses.replace(c, condition="") for c in conversations]
    dataset = data.tokenize_dataset(conversations, tokenizer, args.max_seq_len,
                                    data.parse_class_weights(cfg.class_weights), progress=True)
    dataset.meta.update(inputs_key=key, read=dict(stats))
    dataset.save(directory)
    print(f"data: rank {dist.get_rank()} tokenized {len(conversations)} conversations into {directory} in "
          f"{time.time() - t0:.0f} s", flush=True)


def on_rank0(fn, group):
    """fn() on rank 0 only, its result (or its error's message) on every rank: the others wait meanwhile."""
    box = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except (ValueError, OSError) as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, src=0, group=group)
    if box[1] is not None:
        raise ConfigError(box[1])
    return box[0]


def data_key(cfg, tokenizer, args):
    if os.path.isdir(cfg.data):  # a directory of `python data.py tokenize`: its own meta names its inputs
        return data.file_digest(os.path.join(cfg.data, "meta.json"))
    return data.inputs_key(data_inputs(cfg, tokenizer, args))


def prepare_data(cfg, tokenizer, args, key, group):
    """Rank 0 tokenizes into out_dir/data, unless the same inputs are already there; every rank then
    memory-maps it. On node-local disks the first rank of each other node, not seeing rank 0's, makes its
    own. Returns (dataset, whether this run tokenized it). --data may be a tokenized directory itself."""
    if os.path.isdir(cfg.data):
        dataset = data.TokenizedDataset.load(cfg.data)
        if (dataset.meta.get("eot_id"), dataset.meta.get("vocab_size")) != (tokenizer.eot_id, tokenizer.vocab_size):
            raise ConfigError(f"--data={cfg.data}: tokenized with {dataset.meta.get('tokenizer')}, not with this "
                              f"run's {tokenizer.model_path}")
        if dataset.lengths.max() > args.max_seq_len:
            raise ConfigError(f"--data={cfg.data}: conversations of up to {dataset.lengths.max()} tokens, more than "
                              f"max_seq_len={args.max_seq_len}: tokenize it again with --max-seq-len")
        return dataset, False
    directory = os.path.join(cfg.out_dir, "data")

    def prepare():
        if data.load_prepared(directory, key) is not None:
            return False
        tokenize_sources(cfg, tokenizer, args, key, directory)
        return True

    tokenized = on_rank0(prepare, group)
    if not tokenized:
        log0(f"data: reusing {directory} (prepared earlier from the same inputs)")
    if dist.get_rank() != 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        prepare()
    dist.barrier(group=group)
    return data.load_prepared(directory, key), tokenized


def print_summary(cfg, tokenizer, args, dataset, n_val, steps):
    summary = dataset.meta.get("summary", {})
    log0(f"tokenizer: {tokenizer.model_path} ({tokenizer.sp.get_piece_size()} pieces, <|end_of_turn|> = "
         f"{tokenizer.eot_id})")
    log0(f"model: {cfg.model} ({args.model_type}, {args.n_layers} layers, dim {args.dim}, "
         f"{model_num_params(args) / 1e6:,.1f}M parameters, context {args.max_seq_len}"
         f"{f', sliding window {args.sliding_window}' if args.sliding_window else ''})")
    weights = data.parse_class_weights(cfg.class_weights)
    log0(f"data: {len(dataset)} conversations in {len(dataset.class_names)} class(es), {n_val} held out for "
         f"validation; dropped {summary.get('dropped', {})}, truncated {summary.get('truncated_to_context', 0)}")
    for name, c in summary.get("classes", {}).items():
        log0(f"  class {name!r:16} weight {weights.get(name, 'per message')!s:5}  {c['conversations']:>9,} "
             f"conversations  {c['supervised_tokens']:>13,} supervised tokens")
    log0(f"expert condition (evaluation, exported chat template): "
         f"{cfg.expert_condition if cfg.use_condition else '(none)'!r}")
    if len(dataset.class_names) == 1:
        log0("warning: one class only: every conversation gets the same condition and weight, so this is plain "
             "SFT, not C-RLFT (give each source its class: --data=\"GPT4 Correct=a.jsonl,GPT3=b.jsonl\")")
    log0(f"plan: {steps} steps in {cfg.epochs} epochs, {dist.get_world_size()} rank(s) x {cfg.grad_accum} "
         f"micro-batch(es) of {cfg.batch_tokens} tokens")


def plan_epochs(lengths, cfg, world_size):
    """Every epoch's bins, world_size * grad_accum of them per step (deterministic for seed and epoch)."""
    return [data.pack_epoch(lengths, cfg.batch_tokens, world_size * cfg.grad_accum, cfg.seed, epoch)
            for epoch in range(cfg.epochs)]


# -----------------------------------------------------------------------------------------------------------
# Model: built on the meta device, sharded block by block, then filled with weights broadcast from rank 0.
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
    # Parameters stay fp32 (the optimizer's master copy); compute in bf16, reduce gradients in fp32.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if is_bf16(cfg, device) else None,
                              reduce_dtype=torch.float32)
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


def is_bf16(cfg, device):
    return cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")


def model_num_params(args):
    """Parameters that do matmuls (the input embedding is a lookup), for 6 * N FLOPs per token."""
    with torch.device("meta"):
        return Transformer(args).num_params(exclude_embeddings=not args.tie_embeddings)


# -----------------------------------------------------------------------------------------------------------
# The C-RLFT step
def crlft_step(model, batches, world_size):
    """Gradients of L = sum(w * CE) / sum(w) over the global batch: every rank's micro-batches `batches`.
    Returns the global sum(w) and, per micro-batch, (sum(w * CE), per-token CE) for reporting."""
    # The denominator is the weight of the whole global batch, known before any backward: a micro-batch or
    # a rank normalised by its own weight would count 0.1-weighted tokens differently in every batch.
    weight_sum = torch.stack([b.loss_weights.sum() for b in batches]).sum().float().reshape(1)
    dist.all_reduce(weight_sum)
    results = []
    for i, b in enumerate(batches):
        model.set_requires_gradient_sync(i == len(batches) - 1)  # reduce the gradients once per step
        loss_sum, token_ce = model(b.tokens[None], position_ids=b.position_ids[None], cu_seqlens=b.cu_seqlens,
                                   max_seqlen=b.max_seqlen, targets=b.targets[None],
                                   loss_weights=b.loss_weights[None])
        # FSDP averages gradients over ranks; each rank's part of the global sum is multiplied back.
        (loss_sum * world_size / weight_sum.clamp_min(1e-8)).backward()
        results.append((loss_sum.detach(), token_ce.detach()))
    return weight_sum, results


def learning_rate(step, total_steps, cfg):
    """Linear warmup over 5% of the steps, then cosine down to 10% of the peak (public recipe)."""
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def validate(model, dataset, my_bins, device):
    """sum(w * CE) / sum(w) over the held-out conversations, overall and per class. Every rank runs the same
    number of forward passes (FSDP gathers weights in each); a rank short of bins scores one with weight 0."""
    n = len(dataset.class_names)
    sums = torch.zeros(2 * n, dtype=torch.float64, device=device)  # per class: sum(w * CE), sum(w)
    model.eval()
    for bin_ in my_bins:
        b = data.make_batch(dataset, bin_ or [0]).to(device)
        weights = b.loss_weights.double() * bool(bin_)
        _, token_ce = model(b.tokens[None], position_ids=b.position_ids[None], cu_seqlens=b.cu_seqlens,
                            max_seqlen=b.max_seqlen, targets=b.targets[None], loss_weights=weights[None].float())
        sums[:n].index_add_(0, b.class_ids, weights * token_ce.double())
        sums[n:].index_add_(0, b.class_ids, weights)
    model.train()
    dist.all_reduce(sums)
    per_class = {name: (sums[c] / sums[n + c]).item() for c, name in enumerate(dataset.class_names) if sums[n + c] > 0}
    return (sums[:n].sum() / sums[n:].sum().clamp_min(1e-12)).item(), per_class


def holdout_bins(dataset, held_out, cfg, rank, world_size):
    """This rank's bins of the held-out conversations (padded with [] so every rank has as many)."""
    if len(held_out) == 0:
        return []
    bins = [[int(held_out[i]) for i in step[0]]
            for step in data.pack_epoch(dataset.lengths[held_out], cfg.batch_tokens, 1, cfg.seed, 0)]
    bins += [[]] * (-len(bins) % world_size)
    return bins[rank::world_size]


# -----------------------------------------------------------------------------------------------------------
# Exports and progress
def export(model, cfg, args, tokenizer, directory):
    """Gather the full weights (a collective: every rank calls this) and write a Hugging Face directory."""
    from export import export_hf

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        local = Transformer(args)
    local.load_state_dict(full, assign=True)
    if args.tie_embeddings:  # load_state_dict(assign=True) gave the two names two Parameters: tie again
        local.output.weight = local.tok_embeddings.weight
    if cfg.export:
        dtype = torch.bfloat16 if is_bf16(cfg, next(model.parameters()).device) else torch.float32
        export_hf(local.to(dtype), tokenizer, directory, condition=cfg.expert_condition if cfg.use_condition else "")
        log0(f"exported a Hugging Face model to {directory} (python sample.py --model={directory})")
    return local


def report(record, bar, log_path):
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    postfix = {"loss": f"{record['loss']:.4f}", **{k[:12]: f"{v:.3f}" for k, v in record["loss_per_class"].items()},
               "lr": f"{record['lr']:.2e}", "tok/s": f"{record['tokens_per_s']:.0f}"}
    if "mfu" in record:
        postfix["mfu"] = f"{record['mfu']:.1%}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(1)


def peak_flops(device):
    """Dense bf16 peak of one GPU, for MFU (None when unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40", 181e12))
                 if key in name), None)


def plot_losses(cfg):
    with open(os.path.join(cfg.out_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    steps = [r for r in log if "loss" in r]
    curves = {"loss (weighted)": [(r["step"], r["loss"]) for r in steps],
              "validation loss": [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]}
    for name in steps[-1]["loss_per_class"] if steps else []:
        curves[f"CE {name}"] = [(r["step"], r["loss_per_class"][name]) for r in steps if name in r["loss_per_class"]]
    plot.line_chart(os.path.join(cfg.out_dir, "loss.svg"), {k: v for k, v in curves.items() if v},
                    title="C-RLFT training loss", ylabel="cross-entropy (nats/token)", log_y=True)
    return steps[-1]["loss_per_class"] if steps else {}


# -----------------------------------------------------------------------------------------------------------
def setup(cfg, rank, world_size, group):
    """Everything that reads the user's inputs, checked before anything is written: tokenizer and model
    shape, the resume guard, the data (prepared once), the held-out split and the plan."""
    tokenizer, args = tokenizer_and_args(cfg)
    key = on_rank0(lambda: data_key(cfg, tokenizer, args), group)
    run = {"model": dataclasses.asdict(args), "tokenizer": [os.path.basename(tokenizer.model_path), tokenizer.eot_id],
           "world_size": world_size,
           **{k: getattr(cfg, k) for k in ("batch_tokens", "grad_accum", "seed", "epochs", "class_weights",
                                           "val_fraction", "val_max", "use_condition", "only_classes")},
           "data_hash": key}  # last: the settings above name a change better than this hash of the inputs
    ckpt = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if ckpt is not None:
        on_rank0(lambda: check_same_run(ckpt, run), group)
    dataset, tokenized = prepare_data(cfg, tokenizer, args, key, group)
    train_ids, held_out = data.split_holdout(dataset.class_ids, cfg.val_fraction, cfg.val_max, cfg.seed)
    if len(train_ids) < world_size * cfg.grad_accum:
        raise ConfigError(f"--data: {len(train_ids)} training conversations cannot fill {world_size * cfg.grad_accum} bins")
    plans = [[[[int(train_ids[i]) for i in b] for b in step] for step in epoch]  # back to dataset indices
             for epoch in plan_epochs(dataset.lengths[train_ids], cfg, world_size)]
    if cfg.lr_base > 0:  # OpenChat's rule: the learning rate grows with the supervised tokens of a step
        supervised = (np.asarray(dataset.weights) > 0).sum() * len(train_ids) / len(dataset)
        cfg = dataclasses.replace(cfg, lr=cfg.lr_base * math.sqrt(supervised / len(plans[0]) / 4e6))
    print_summary(cfg, tokenizer, args, dataset, len(held_out), sum(map(len, plans)))
    return cfg, tokenizer, args, dataset, held_out, plans, run, ckpt, tokenized


def train(cfg):
    """Run one training job; returns a dict of results (rank 0) for experiments and tests."""
    rank, world_size, device, mesh = setup_distributed()
    torch.manual_seed(cfg.seed)
    # Rank 0 tokenizing a large corpus can take longer than the default collective timeout: a CPU group
    # with a long one for the waits of data preparation.
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=6))
    out_dir_existed = os.path.isdir(cfg.out_dir)
    tokenized = False
    try:
        try:
            cfg, tokenizer, args, dataset, held_out, plans, run, ckpt, tokenized = setup(cfg, rank, world_size, group)
        except (ValueError, OSError, CheckpointError) as e:
            if rank == 0:  # one line, once; nothing of this run left behind, no checkpoint touched
                print(f"error: {data.one_line(e)}", file=sys.stderr)
                if not out_dir_existed:
                    shutil.rmtree(cfg.out_dir, ignore_errors=True)
                elif tokenized:
                    shutil.rmtree(os.path.join(cfg.out_dir, "data"), ignore_errors=True)
            raise SystemExit(1)
        model = build_model(cfg, args, device, mesh)
        # fused: the whole AdamW update in one kernel per device on GPU, instead of many multi-tensor launches
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                      eps=cfg.eps, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
        start_step = load_checkpoint(ckpt, model, optimizer) if ckpt else 0
        if ckpt:
            log0(f"resumed from {ckpt} at step {start_step}")
        return train_loop(cfg, model, optimizer, dataset, held_out, plans, start_step, run, args, tokenizer, device)
    finally:
        if dist.is_initialized():
            dist.barrier()  # before teardown, or gloo aborts now and then
            dist.destroy_process_group()


def train_loop(cfg, model, optimizer, dataset, held_out, plans, start_step, run, args, tokenizer, device):
    rank, world_size = dist.get_rank(), dist.get_world_size()
    n_classes = len(dataset.class_names)
    epoch_ends = np.cumsum([len(p) for p in plans]).tolist()
    total_steps = min(epoch_ends[-1], cfg.max_steps or epoch_ends[-1])
    val_bins = holdout_bins(dataset, held_out, cfg, rank, world_size)
    stop = {"requested": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    n_params, flops_peak = model_num_params(args), peak_flops(device)
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if rank == 0:  # a fresh run starts a new log; a resumed one keeps the steps up to its checkpoint, once each
        os.makedirs(cfg.out_dir, exist_ok=True)
        kept = []
        if start_step and os.path.exists(log_path):
            with open(log_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        with open(log_path, "w") as f:
            f.writelines(kept)
    bar = tqdm(total=total_steps, initial=start_step, disable=rank != 0, dynamic_ncols=True)
    model.train()
    step, results, profiler = start_step, {"interrupted": False}, None
    try:
        while step < total_steps:
            if cfg.profile_step and step + 1 == cfg.profile_step:  # not when resuming past it
                profiler = torch.profiler.profile(with_stack=False)
                profiler.start()
            t0 = time.perf_counter()
            epoch = next(e for e, end in enumerate(epoch_ends) if step < end)
            bins = plans[epoch][step - (epoch_ends[epoch - 1] if epoch else 0)]
            batches = [data.make_batch(dataset, b).to(device)
                       for b in bins[rank * cfg.grad_accum:(rank + 1) * cfg.grad_accum]]
            lr = learning_rate(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            weight_sum, outputs = crlft_step(model, batches, world_size)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # report: sum(w * CE); per class the mean CE of supervised tokens; tokens and attention work
            stats = torch.zeros(3 + 2 * n_classes, dtype=torch.float64, device=device)
            for b, (loss_sum, token_ce) in zip(batches, outputs):
                supervised = b.loss_weights > 0
                stats[0] += loss_sum.double()
                stats[1] += len(b.tokens)
                stats[2] += ((b.cu_seqlens[1:] - b.cu_seqlens[:-1]).double() ** 2).sum()
                stats[3:3 + n_classes].index_add_(0, b.class_ids[supervised], token_ce[supervised].double())
                stats[3 + n_classes:].index_add_(0, b.class_ids[supervised], supervised[supervised].double())
            dist.all_reduce(stats)
            dt = time.perf_counter() - t0
            loss = (stats[0] / weight_sum.double().clamp_min(1e-8)).item()
            per_class = {name: (stats[3 + c] / stats[3 + n_classes + c]).item()
                         for c, name in enumerate(dataset.class_names) if stats[3 + n_classes + c] > 0}
            record = {"step": step, "epoch": epoch, "loss": loss, "loss_per_class": per_class, "lr": lr,
                      "grad_norm": float(grad_norm), "tokens_per_s": stats[1].item() / dt, "time_s": dt}
            if flops_peak:  # 6 N per token for the matmuls, 6 * layers * dim * sum(len^2) for attention
                flops = 6 * n_params * stats[1].item() + 6 * args.n_layers * args.dim * stats[2].item()
                record["mfu"] = flops / dt / (flops_peak * world_size)
            if rank == 0:
                report(record, bar, log_path)
            if profiler is not None and step == cfg.profile_step + 2:
                write_profile(profiler, cfg, step, device)
                profiler = None
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}; the last checkpoint is intact")

            if step in epoch_ends:  # the end of an epoch: validation loss, and an export to keep
                end_of_epoch(cfg, model, args, tokenizer, dataset, val_bins, step, epoch, log_path, device)
            # SIGTERM on any rank: everyone saves and leaves together.
            flag = torch.tensor([float(stop["requested"])], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0 or step % cfg.ckpt_every == 0 or step == total_steps:
                save_checkpoint(model, optimizer, step, cfg.out_dir, cfg.keep_ckpts, dataclasses.asdict(cfg), run)
            if flag.item() > 0:
                log0(f"SIGTERM: saved a checkpoint at step {step} in {cfg.out_dir}/ckpt; exiting")
                results["interrupted"] = True
                return results
    finally:
        if profiler is not None:  # the run ended inside the profiled steps
            profiler.stop()
        bar.close()
        signal.signal(signal.SIGTERM, previous_handler)
    results["steps"] = step
    final = export(model, cfg, args, tokenizer, os.path.join(cfg.out_dir, "export"))
    if rank == 0:
        results.update(finish(cfg, final, tokenizer))
    return results


def end_of_epoch(cfg, model, args, tokenizer, dataset, val_bins, step, epoch, log_path, device):
    if val_bins:
        val_loss, per_class = validate(model, dataset, val_bins, device)
        if dist.get_rank() == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "epoch": epoch, "val_loss": val_loss,
                                    "val_loss_per_class": per_class}) + "\n")
        log0(f"epoch {epoch + 1}: validation loss {val_loss:.4f} ("
             + ", ".join(f"{name} {v:.4f}" for name, v in per_class.items()) + ")")
    if cfg.export:
        export(model, cfg, args, tokenizer, os.path.join(cfg.out_dir, f"epoch_{epoch + 1}"))


def write_profile(profiler, cfg, step, device):
    profiler.stop()  # on every rank; rank 0 writes the table
    if dist.get_rank() == 0:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70)
        with open(os.path.join(cfg.out_dir, "profile.txt"), "w") as f:
            f.write(f"steps {cfg.profile_step}..{step}\n{table}\n")
        log0(f"profile of steps {cfg.profile_step}..{step} in {cfg.out_dir}/profile.txt")


def finish(cfg, model, tokenizer):
    """Rank 0, after training: loss curves, toy evaluation, results.json."""
    results = {"final_loss_per_class": plot_losses(cfg)}
    if cfg.data == "toy" and cfg.toy_eval:
        condition = cfg.expert_condition if cfg.use_condition else ""
        problems = toy_task.make_toy_eval(cfg.toy_eval, cfg.seed)
        results["accuracy"], answers = toy_task.evaluate(model.float(), tokenizer, problems, condition)
        results["accuracy_turn3"], _ = toy_task.evaluate(model, tokenizer, problems, condition, turn=3)
        log0(f"toy task: {results['accuracy']:.1%} of {cfg.toy_eval} held-out problems answered correctly as the "
             f"first question of a chat, {results['accuracy_turn3']:.1%} as the third (greedy, condition "
             f"{condition!r}); e.g. {answers[0][0]} -> {answers[0][1]!r}")
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def main(argv):
    try:
        cfg = parse_config(argv)
    except ValueError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank parses: one of them says it
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    return train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
