"""train.py's configuration: one dataclass, presets, and the command line `--preset=NAME --key=value ...` read
into it, checked where it comes in (unknown keys, bad types and out-of-range values are one line naming the flag).
The comment beside each field is its `--help` text."""

import dataclasses
import inspect
import os
import re
from dataclasses import dataclass

import torch

import chat_sources
import loss_weighting
import prepare
import toy_task
from chat_readers import EXPERT_CONDITION
from model_args import PRESETS


# -----------------------------------------------------------------------------------------------------------
# Configuration: one dataclass; `--preset=NAME` then `--key=value` on the command line
@dataclass
class TrainConfig:
    # data
    # "toy" | comma-separated [CLASS=]path (.jsonl, .json, "sharegpt") | tokenized dir
    data: str = "toy"
    # tokenizer.json, tokenizer.model or a folder; "" = --model's, toy's, Mistral v1
    tokenizer: str = ""
    # openchat_3.5|openchat_3.6|openchat_3.5_gemma|chatml; "" = the tokenizer's tokens
    template: str = ""
    # reward of each class, "NAME=W,...": "" = the toy's for toy data, else 1 each
    class_weights: str = ""
    # class of ShareGPT sources without one; "from_model": by their model
    sharegpt_condition: str = EXPERT_CONDITION
    # class each ShareGPT record by this field of it, e.g. model ("" = off)
    class_from_field: str = ""
    # its VALUE=CLASS,... (globs, first match) or a .json; "" = *gpt-4*=GPT4,*=GPT3
    class_map: str = ""
    # weight 0 on assistant replies with refusal boilerplate (loss_weighting.py)
    zero_refusals: bool = False
    refusal_phrases: str = ""  # with --zero_refusals: a file of your own phrases, one a line
    # each reply's weight divided by its tokens (OpenChat's option; off: per token)
    per_sequence_weights: bool = False
    # put the class condition in the prompts (False: plain "User:" prefixes)
    use_condition: bool = True
    only_classes: str = ""  # comma-separated: train on these classes only ("" = all)
    # condition of evaluation, sample.py, the export ("" = the top-weighted class's)
    expert_condition: str = ""
    skip_bad: bool = False  # skip and count bad records instead of stopping at the first
    # conversations held out per class for the validation loss (0 = off)
    val_fraction: float = 0.01
    val_max: int = 2000  # at most this many held out in all
    toy_train: int = 20000  # toy task: training conversations (1-3 sums each)
    toy_expert_fraction: float = 0.02  # toy task: share of the expert class
    toy_error_rate: float = 1.0  # toy task: how often a sub-optimal answer is wrong
    toy_eval: int = 500  # toy task: held-out problems scored at the end
    # model
    # a preset of model.py, or a Hugging Face directory to fine-tune
    model: str = "toy"
    dim: int = 0  # overrides of the preset (0 = keep)
    n_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    max_seq_len: int = 0  # context (0 = the model's)
    # optimisation (the public OpenChat recipe)
    epochs: int = 5
    # the schedule's length in steps (0 = all epochs): warmup and cosine span it
    max_steps: int = 0
    batch_tokens: int = 2048  # tokens per rank per micro-batch (bin size of the packer)
    grad_accum: int = 1  # micro-batches per rank per step
    lr: float = 1e-3  # peak learning rate (the toy model's)
    # > 0: lr = lr_base * sqrt(supervised tokens per step / 4M) (OpenChat's rule)
    lr_base: float = 0.0
    min_lr_ratio: float = 0.1  # cosine decays to 10% of the peak
    warmup_ratio: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # system
    dtype: str = "auto"  # bf16 compute on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    # torch.compile each block (GPU): fuses RMSNorm, RoPE, SwiGLU's elementwise ops
    compile: bool = False
    seed: int = 1337
    # log, exports, prepared data (on several nodes: shared or node-local)
    out_dir: str = "out/default"
    # checkpoints ("" = out_dir/ckpt); on several nodes one that every node shares
    ckpt_dir: str = ""
    ckpt_every: int = 200  # steps between checkpoints (and one at the end)
    keep_ckpts: int = 2
    # continue from ckpt_dir's latest; false: start over, old checkpoints moved aside
    resume: bool = True
    # a Hugging Face directory per epoch (out_dir/epoch_N) and at the end
    export: bool = True
    # >0: profile this step and the next two (torch.profiler), table in out_dir
    profile_step: int = 0


# OpenChat's recipes for released checkpoints (8 x 80 GB): GPT-4's answers the expert class, GPT-3.5's weighted 0.1.
_RELEASED = dict(
    data="",
    class_weights=f"{EXPERT_CONDITION}=1,GPT3=0.1",
    batch_tokens=77824,
    max_seq_len=8192,
    lr_base=3e-4 / 6,
    dtype="bf16",
    activation_checkpointing=True,
    ckpt_every=500,
    toy_eval=0,
)
PRESETS_TRAIN = {
    "toy": {},
    "mistral-7b": dict(_RELEASED, model="<Mistral-7B-v0.1 directory>"),
    # its <|end_of_turn|> is kept
    "openchat_3.5": dict(_RELEASED, model="<openchat_3.5 directory>"),
    "llama2-13b": dict(
        _RELEASED,
        model="<Llama-2-13b directory>",
        class_weights="GPT4=1,GPT3=0.1",
        lr_base=3e-4,
        sharegpt_condition="GPT4",
        batch_tokens=32768,
        max_seq_len=4096,
    ),
    # OpenChat 3.6's base and template (Llama 3's header tokens); its learning rate was not published: Mistral's rule
    "llama3-8b": dict(_RELEASED, model="<Meta-Llama-3-8B directory>"),
    # Throughput check on one GPU: a ~1B model from scratch on packed ShareGPT (one class), tokens/s and MFU.
    "1b-throughput": dict(
        model="1b",
        data="sharegpt",
        skip_bad=True,
        class_weights=f"{EXPERT_CONDITION}=1",
        toy_eval=0,
        val_fraction=0.0,
        batch_tokens=16384,
        max_seq_len=4096,
        lr=3e-4,
        dtype="bf16",
        max_steps=30,
        ckpt_every=10**9,
        export=False,
        compile=True,
    ),
}
PRESETS_TRAIN["8b-throughput"] = dict(
    PRESETS_TRAIN["1b-throughput"],
    model="8b",
    batch_tokens=8192,
    max_seq_len=8192,
    # one H200: --tokenizer=Llama 3's
    activation_checkpointing=True,
    max_steps=10,
)


def parse_config(argv):
    """Unknown keys, bad values and missing directories are a ValueError naming the option."""
    cfg, fields, overrides = (
        TrainConfig(),
        {f.name: f.type for f in dataclasses.fields(TrainConfig)},
        {},
    )
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        key = key.replace("-", "_")
        if not arg.startswith("--") or not eq:
            raise ValueError(f"expected --key=value, got {arg!r}")
        # the preset's values first, whatever the order: the other options override them
        if key == "preset":
            if value not in PRESETS_TRAIN:
                raise ValueError(
                    f"--preset: unknown preset {value!r}; choose from {sorted(PRESETS_TRAIN)}"
                )
            cfg = dataclasses.replace(cfg, **PRESETS_TRAIN[value])
            continue
        if key not in fields:
            raise ValueError(f"unknown config key --{key}; known keys: {', '.join(sorted(fields))}")
        typ = {"int": int, "float": float, "bool": bool, "str": str}.get(fields[key], fields[key])
        if typ is bool and value.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError(f"--{key} must be true or false, got {value!r}")
        try:
            overrides[key] = value.lower() in ("1", "true", "yes") if typ is bool else typ(value)
        except ValueError:
            raise ValueError(f"--{key} must be {typ.__name__}, got {value!r}") from None
    cfg = dataclasses.replace(cfg, **overrides)
    for (
        key
    ) in "epochs batch_tokens grad_accum ckpt_every keep_ckpts val_max lr eps grad_clip".split():
        if not getattr(cfg, key) > 0:
            raise ValueError(f"--{key} must be > 0, got {getattr(cfg, key)}")
    for key, lo, hi in [
        ("warmup_ratio", 0, 0.999),
        ("min_lr_ratio", 0, 1),
        ("val_fraction", 0, 0.5),
        ("toy_expert_fraction", 1e-9, 1),
        ("toy_error_rate", 0, 1),
    ]:
        if not lo <= getattr(cfg, key) <= hi:
            raise ValueError(f"--{key} must be in [{lo:g}, {hi:g}], got {getattr(cfg, key)}")
    if cfg.dtype not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--dtype must be auto, bf16 or fp32, got {cfg.dtype!r}")
    # bf16 compute wherever the GPU path runs (setup_distributed picks the device alike)
    if cfg.dtype == "auto":
        cfg = dataclasses.replace(cfg, dtype="bf16" if torch.cuda.is_available() else "fp32")
    if not cfg.ckpt_dir:
        cfg = dataclasses.replace(cfg, ckpt_dir=os.path.join(cfg.out_dir, "ckpt"))
    if cfg.model.startswith("<"):
        raise ValueError(
            f"--model: this preset fine-tunes a released checkpoint: pass its Hugging Face directory, "
            f"--model=/path/to/{cfg.model.strip('<>').split()[0]}"
        )
    if cfg.model not in PRESETS and not os.path.isdir(cfg.model):
        raise ValueError(
            f"--model={cfg.model!r} is neither a preset ({', '.join(PRESETS)}) nor a directory"
        )
    if not cfg.data:
        raise ValueError(
            '--data is required: e.g. --data="GPT4 Correct=gpt4.jsonl,GPT3=gpt35.json"'
        )
    if not cfg.class_weights and cfg.data == "toy":
        cfg = dataclasses.replace(
            cfg, class_weights=",".join(f"{k}={w:g}" for k, w in toy_task.CLASS_WEIGHTS.items())
        )
    check_data_options(cfg)
    return cfg


def check_data_options(cfg) -> None:
    """What can be checked before anything is read: the files of --data, the class map against --class_weights,
    the refusal phrases, and that a conversation as long as the context fits one bin."""
    # an explicit one; the model's own once train_job.setup has read it
    prepare.check_context(cfg, cfg.max_seq_len)
    if cfg.data != "toy" and not os.path.isdir(cfg.data):
        chat_sources.check_sources(cfg.data)
    weights, rule = prepare.class_weights(cfg), prepare.class_rule(cfg)
    for _, name in rule[1] if rule and weights else []:
        if name not in weights:
            raise ValueError(
                f"--class_map gives class {name!r}, which --class_weights names no weight for "
                f"({', '.join(map(repr, weights))}): add {name}=W to --class_weights, or map to those"
            )
    loss_weighting.refusal_phrases(cfg.zero_refusals, cfg.refusal_phrases)


def help_text(doc: str) -> str:
    """`python train.py --help`: every option with its default and the comment beside its field, in the groups of
    TrainConfig (data, model, optimisation, system)."""
    lines, source = (
        [doc, "options, --name=value (the value of --preset first, then the others over it):"],
        inspect.getsource(TrainConfig),
    )
    for line in source.splitlines()[2:]:
        group = re.fullmatch(r"\s*# (\w[\w ]*)", line)
        field = re.fullmatch(r"\s*(\w+): \w+ = (.*?)\s*(?:# (.*))?", line)
        if group:
            lines.append(f"\n{group[1]}:")
        elif field:
            default = getattr(TrainConfig, field[1])
            lines.append(f"  {f'--{field[1]}={default}':<34} {field[3] or ''}".rstrip())
    return "\n".join(lines + [f"\n  {'--preset=NAME':<34} one of {', '.join(PRESETS_TRAIN)}"])
