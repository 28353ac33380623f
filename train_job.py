"""The job train.py runs, made from the user's inputs and checked before anything is written: the tokenizer and the
model's shape (`tokenizer_and_args`), the checkpoint to resume from, the data (prepared once: prepare.py), the
held-out split, every global step's bins (`plan_steps`) and the expert condition. `setup` returns it as a `Job`."""

import dataclasses
import math
import os

import numpy as np

import data
import packing
import prepare
import tokenized_data
import toy_task
from model_args import PRESETS, ModelArgs
from tokenizing import Tokenizer, checkpoint_tokenizer
from train_checkpoint import check_shared, move_aside, resume_point
from train_config import TrainConfig
from train_progress import say


# Tokenizer and model: the checkpoint's own tokenizer and its template; a row for a token the template adds where the
# checkpoint has none (its padded rows serve first: the added token takes the first free id).
def tokenizer_source(
    model: str, data_source: str, tokenizer: str = ""
) -> tuple[str | None, str | None]:
    """Where a run's tokenizer comes from (train.py, export_checkpoint.py), and the template that comes with it:
    --tokenizer, else a fine-tuned checkpoint's directory, the toy's for toy data, a `python data_cli.py tokenize`
    directory's own (with its template); None: Mistral v1's, a from-scratch preset's default."""
    if tokenizer:
        return tokenizer, None
    if model not in PRESETS:
        return model, None
    if data_source == "toy":
        return toy_task.TOKENIZER_PATH, None
    if os.path.isdir(data_source):
        meta = tokenized_data.TokenizedDataset.load(data_source).meta
        return meta["tokenizer"], meta.get("template")
    return None, None


def tokenizer_and_args(cfg):
    template = cfg.template or None
    if cfg.model in PRESETS:
        path, own_template = tokenizer_source(cfg.model, cfg.data, cfg.tokenizer)
        tokenizer = data.load_tokenizer(path, template or own_template)
        args = dataclasses.replace(PRESETS[cfg.model], vocab_size=tokenizer.vocab_size)
    else:
        args = ModelArgs.from_pretrained(cfg.model, max_seq_len=cfg.max_seq_len or None)
        tokenizer = data.use_template(
            checkpoint_tokenizer(cfg.model, args.vocab_size, cfg.tokenizer or None), template
        )
    overrides = {
        k: getattr(cfg, k)
        for k in "dim n_layers n_heads n_kv_heads max_seq_len".split()
        if getattr(cfg, k)
    }
    # let ModelArgs derive these again from the new shape
    if "dim" in overrides or "n_heads" in overrides:
        # Qwen3, Gemma: their own
        head_dim = None if args.head_dim == args.dim // args.n_heads else args.head_dim
        overrides.update(
            head_dim=head_dim, hidden_dim=None if "dim" in overrides else args.hidden_dim
        )
    return tokenizer, dataclasses.replace(
        args, **overrides, vocab_size=max(args.vocab_size, tokenizer.vocab_size)
    )


@dataclasses.dataclass
class Job:
    """What setup() makes of the user's inputs, checked, and the training loop consumes."""

    cfg: TrainConfig
    tokenizer: Tokenizer
    args: ModelArgs  # the model's shape
    dataset: tokenized_data.TokenizedDataset  # every conversation, tokenized with its loss weights
    held_out: np.ndarray  # dataset indices of the validation conversations
    # every global step: (epoch, its bins), a bin a list of dataset indices
    steps: list
    # what a resume must not change (train_checkpoint.check_same_run)
    run: dict
    resume_from: str | None  # the checkpoint to start from; None: a fresh start


def plan_steps(dataset, train_ids, cfg, n_bins):
    """Each epoch's global steps, as (epoch, bins): packing.pack_epoch shuffles the training conversations with the
    epoch's seed and packs them into n_bins bins a step (every rank's micro-batches: world_size x grad_accum).
    With --max_steps, the epochs up to the one it stops in (that epoch whole: its end is still told apart)."""
    steps = []
    for epoch in range(cfg.epochs):
        if cfg.max_steps and len(steps) >= cfg.max_steps:
            break
        for bins in packing.pack_epoch(
            dataset.lengths[train_ids], cfg.batch_tokens, n_bins, cfg.seed, epoch
        ):
            # positions -> dataset indices
            steps.append((epoch, [[int(train_ids[i]) for i in b] for b in bins]))
    return steps


def setup(cfg, rank, world_size, group, written=None) -> Job:
    """Everything that reads the user's inputs, checked before anything is written: tokenizer and model shape,
    the checkpoint directory and the resume guard, the data (prepared once), the held-out split, the plan.
    `written` (a list) gets what this rank wrote meanwhile (the prepared data), for train() to remove on an error."""
    tokenizer, args = tokenizer_and_args(cfg)
    # a conversation as long as the context must fit one bin
    prepare.check_context(cfg, args.max_seq_len)
    key = prepare.on_rank0(lambda: prepare.inputs_key(cfg, tokenizer, args.max_seq_len), group)
    # What decides the model, the data order and the schedule: a resume that changes one is refused by name.
    settings = (
        "batch_tokens",
        "grad_accum",
        "seed",
        "epochs",
        "class_weights",
        "val_fraction",
        "val_max",
        "use_condition",
        "only_classes",
    )
    run = {
        "model": dataclasses.asdict(args),
        "tokenizer": [os.path.basename(tokenizer.path), tokenizer.template, tokenizer.eot_id],
        "world_size": world_size,
        **{k: getattr(cfg, k) for k in settings},
        "data_hash": key,
        "max_steps": cfg.max_steps,
    }  # the learning-rate schedule's length
    # several nodes: one checkpoint directory
    if world_size > int(os.environ.get("LOCAL_WORLD_SIZE", world_size)):
        check_shared(cfg.ckpt_dir, group)
    # Rank 0 decides where every rank starts: ranks that each read `latest` could start from different steps.
    resume_from = prepare.on_rank0(lambda: resume_point(cfg.ckpt_dir, cfg.resume, run), group)
    dataset, tokenized = prepare.prepare_data(cfg, tokenizer, args.max_seq_len, key, group)
    if tokenized and written is not None:
        written.append(os.path.join(cfg.out_dir, "data"))
    train_ids, held_out = data.split_holdout(
        dataset.class_ids, cfg.val_fraction, cfg.val_max, cfg.seed
    )
    if len(train_ids) < world_size * cfg.grad_accum:
        raise ValueError(
            f"--data: only {len(train_ids)} training conversations for {world_size * cfg.grad_accum} bins"
        )
    steps = plan_steps(dataset, train_ids, cfg, world_size * cfg.grad_accum)
    cfg = dataclasses.replace(cfg, expert_condition=expert_condition(cfg, dataset))
    # OpenChat's rule: the learning rate grows with the supervised tokens of a step
    if cfg.lr_base > 0:
        supervised = (np.asarray(dataset.weights) > 0).sum() * len(train_ids) / len(dataset)
        steps_per_epoch = sum(epoch == 0 for epoch, _ in steps)
        cfg = dataclasses.replace(
            cfg, lr=cfg.lr_base * math.sqrt(supervised / steps_per_epoch / 4e6)
        )
    # everything checked: an earlier run's checkpoints go aside, never mixed with this run's
    if not cfg.resume:
        aside = prepare.on_rank0(lambda: move_aside(cfg.ckpt_dir), group)
        if aside:
            say(
                f"--resume=false: moved the checkpoints of the earlier run in {cfg.ckpt_dir} to {aside}"
            )
    return Job(cfg, tokenizer, args, dataset, held_out, steps, run, resume_from)


def expert_condition(cfg, dataset) -> str:
    """The condition of evaluation, sample.py's default and the exported chat template: --expert_condition, else
    that of the class trained with the largest weight (prepare.class_rewards: its mean weight per supervised token,
    or per reply with --per_sequence_weights; a message's own weight counts as trained); a tie is refused: the run
    cannot tell which class is the expert."""
    if not cfg.use_condition or cfg.expert_condition:
        return cfg.expert_condition if cfg.use_condition else ""
    weight = prepare.class_rewards(dataset)
    top = [name for name in weight if math.isclose(weight[name], max(weight.values()))]
    if len(top) > 1:
        raise ValueError(
            f"--expert_condition: classes {', '.join(map(repr, top))} share the largest weight "
            f"{weight[top[0]]:g}: name the expert's condition, --expert_condition={top[0]!r}, or give "
            f"the classes different --class_weights"
        )
    # a prepared directory: class = condition
    conditions = dataset.meta.get("conditions", {}).get(top[0], [top[0]])
    if len(conditions) != 1:
        raise ValueError(
            f"--expert_condition: the top-weighted class {top[0]!r} has several conditions "
            f"({', '.join(map(repr, conditions))}): name one, --expert_condition=..."
        )
    return conditions[0]
