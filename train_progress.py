"""What a user watches while train.py runs: what is about to be trained, a progress bar (loss, loss per class,
lr, tokens/s, MFU on GPU), out_dir/log.jsonl (a record per step and per validation; `python experiments/plot.py
LOG` draws it) and the profiler's table."""

import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import chat_sources
import tokenized_data


def say(text):
    """Print on rank 0, above the progress bar."""
    if dist.get_rank() == 0:
        tqdm.write(text)


def describe(cfg, tokenizer, args, size_text, dataset, held_out, steps, world_size):
    """Say what is about to be trained (rank 0): tokenizer, model, each class with the weights its tokens carry in
    the prepared data (and how many tokens carry each), what the data lost on the way and the flag that changes
    each, the expert condition, the plan; and warn when one class only makes it plain SFT, when a file is given
    for two classes, and when the validation set is too small to mean anything."""
    summary = dataset.meta.get("summary", {})
    lines = [
        f"tokenizer: {tokenizer.path} ({tokenizer.vocab_size} ids, template {tokenizer.template}, end of turn "
        f"{tokenizer.piece(tokenizer.eot_id)} = {tokenizer.eot_id})",
        f"model: {cfg.model} ({args.model_type}, {args.n_layers} layers, dim {args.dim}, "
        f"{size_text}, context {args.max_seq_len}"
        f"{f', sliding window {args.sliding_window}' if args.sliding_window else ''})",
        f"data: {len(dataset)} conversations in {len(dataset.class_names)} class(es), {len(held_out)} held out "
        f"for validation",
    ]
    # prepare.trained_weights: a message's own weight counts
    trained = dataset.meta.get("trained_weights", {})
    for name, c in summary.get("classes", {}).items():
        weights = trained.get(name, [])
        lines.append(
            f"  class {name!r:16} {c['conversations']:>9,} conversations: "
            + (
                ", ".join(f"{n:,} tokens at weight {w:g}" for w, n in weights)
                if len(weights) <= 3
                else f"{sum(n for _, n in weights):,} tokens at weights {weights[-1][0]:g} to {weights[0][0]:g} "
                f"(--per_sequence_weights: a reply's weight over its length)"
            )
        )
        lines += [f"    {line}" for line in _losses(c, args.max_seq_len)]
    lines += _read(dataset.meta.get("read") or summary.get("read", {}))
    lines += [
        f"expert condition (evaluation, exported chat template): "
        f"{cfg.expert_condition if cfg.use_condition else '(none)'!r}",
        f"plan: {_steps(cfg, steps)}, {world_size} rank(s) x {cfg.grad_accum} micro-batch(es) of "
        f"{cfg.batch_tokens} tokens, peak lr {cfg.lr:.3g}",
    ]
    if len(dataset.class_names) == 1:
        lines.append(
            "warning: one class only: every conversation gets the same condition and weight, so this is "
            'plain SFT, not C-RLFT (give each source its class: --data="GPT4 Correct=a.jsonl,GPT3=b.jsonl")'
        )
    if cfg.data != "toy" and not os.path.isdir(cfg.data):
        lines += [
            f"warning: {path} is given for more than one class in --data: its conversations are trained once in "
            "each, under each condition (meant another file?)"
            for path in chat_sources.same_files(cfg.data)
        ]
    lines += _small_validation(cfg, dataset, held_out)
    say("\n".join(lines))


def _steps(cfg, steps) -> str:
    """steps: train_job.plan_steps' (epoch, bins) per step, cut after the epoch that --max_steps stops in."""
    if cfg.max_steps and cfg.max_steps < len(steps):
        first_epoch = sum(epoch == 0 for epoch, _ in steps)
        return (
            f"{cfg.max_steps} steps (--max_steps: in epoch {steps[cfg.max_steps - 1][0] + 1} of {cfg.epochs}; "
            f"the first epoch is {first_epoch} steps)"
        )
    return f"{len(steps)} steps in {cfg.epochs} epochs"


def _losses(c, context) -> list[str]:
    """A class's conversations dropped, truncated and replies zeroed, each with the flag that changes it."""
    flags = {
        tokenized_data.TOO_LONG: f"{context} tokens: a larger --max_seq_len keeps them, with --batch_tokens >= it",
        tokenized_data.NOTHING_TO_LEARN: "the weights of --class_weights, of the file, --zero_refusals",
    }
    out = [
        f"dropped {n:,}: {why} ({flags.get(why, '')})" for why, n in c.get("dropped", {}).items()
    ]
    if c.get("truncated"):
        out.append(
            f"truncated {c['truncated']:,} to their turns that fit the context, {context} (--max_seq_len)"
        )
    if c.get("refusals_zeroed"):
        out.append(
            f"zeroed {c['refusals_zeroed']:,} of {c['replies']:,} replies as refusals, "
            f"{c['refusal_tokens_zeroed']:,} tokens (--zero_refusals, --refusal_phrases)"
        )
    return out


def _read(read: dict) -> list[str]:
    """What reading the files skipped or left out (chat_readers.py's counts), with the flag that changes it."""
    skipped = {k.removeprefix("skipped: "): n for k, n in read.items() if k.startswith("skipped: ")}
    out = (
        [
            f"skipped {sum(skipped.values()):,} bad records (--skip_bad; without it the first stops the run, "
            f"naming its file and line): " + ", ".join(f"{n:,} {why}" for why, n in skipped.items())
        ]
        if skipped
        else []
    )
    for what, n in read.items():
        if what.startswith("left out: "):
            out.append(f"left out {n:,} conversations: {what.removeprefix('left out: ')}")
        elif not what.startswith("skipped: ") and what != "records read":
            out.append(f"read: {n:,} {what}")
    return out


def _small_validation(cfg, dataset, held_out) -> list[str]:
    """A validation loss over fewer than 20 conversations, or fewer than 2 of a class, is mostly the noise of which
    ones were drawn (its standard error shrinks only as 1/sqrt(n)); per class, one conversation is an anecdote."""
    if cfg.val_fraction == 0:
        return []
    per_class = np.bincount(
        np.asarray(dataset.class_ids)[held_out], minlength=len(dataset.class_names)
    )
    few = [f"{name!r} {n}" for name, n in zip(dataset.class_names, per_class) if n < 2]
    if len(held_out) >= 20 and not few:
        return []
    return [
        f"warning: the validation set is too small to mean anything ({len(held_out)} conversations"
        f"{'; ' + ', '.join(few) if few else ''}): raise --val_fraction (up to 0.5) or use more data"
    ]


class Progress:
    """Rank 0 writes; every rank joins the all-reduce of each step's statistics."""

    def __init__(self, cfg, start_step, total_steps, class_names, n_params, args, device):
        self.cfg, self.classes, self.n_params, self.args, self.device = (
            cfg,
            class_names,
            n_params,
            args,
            device,
        )
        self.rank, self.world_size, self.profiler = dist.get_rank(), dist.get_world_size(), None
        self.log_path = os.path.join(cfg.out_dir, "log.jsonl")
        self.peak = next(
            (
                f
                for key, f in (
                    ("H100", 989e12),
                    ("H200", 989e12),
                    ("A100", 312e12),
                    ("L40", 181e12),
                )
                # bf16
                if device.type == "cuda" and key in torch.cuda.get_device_name(device)
            ),
            None,
        )
        # a fresh run starts a new log; a resumed one keeps the steps up to its checkpoint, once
        if self.rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
            kept = []
            if start_step and os.path.exists(self.log_path):
                with open(self.log_path) as f:
                    kept = [
                        line
                        for line in f
                        if line.strip() and json.loads(line)["step"] <= start_step
                    ]
            with open(self.log_path, "w") as f:
                f.writelines(kept)
        self.bar = tqdm(
            total=total_steps, initial=start_step, disable=self.rank != 0, dynamic_ncols=True
        )

    def start_step(self, step):
        if self.cfg.profile_step and step + 1 == self.cfg.profile_step:  # not when resuming past it
            self.profiler = torch.profiler.profile(with_stack=False)
            self.profiler.start()
        self.t0 = time.perf_counter()

    def end_step(self, step, epoch, lr, grad_norm, batches, outputs, weight_sum):
        """Log the step: sum(w * CE) / sum(w), per class the mean CE of supervised tokens, tokens/s, MFU."""
        n, f64 = len(self.classes), dict(dtype=torch.float64, device=self.device)
        # this rank's sums
        weighted_ce, n_tokens, attention_pairs = (torch.zeros(1, **f64) for _ in range(3))
        # per class: sum of CE, supervised tokens
        class_ce, class_tokens = torch.zeros(n, **f64), torch.zeros(n, **f64)
        for b, (loss_sum, token_ce) in zip(batches, outputs):
            supervised = b.loss_weights > 0
            weighted_ce += loss_sum.double()
            n_tokens += len(b.tokens)
            # sum of len^2
            attention_pairs += ((b.cu_seqlens[1:] - b.cu_seqlens[:-1]).double() ** 2).sum()
            class_ce.index_add_(0, b.class_ids[supervised], token_ce[supervised].double())
            class_tokens.index_add_(0, b.class_ids[supervised], supervised[supervised].double())
        stats = torch.cat([weighted_ce, n_tokens, attention_pairs, class_ce, class_tokens])
        dist.all_reduce(stats)  # one collective for all of them
        weighted_ce, n_tokens, attention_pairs, class_ce, class_tokens = stats.split(
            [1, 1, 1, n, n]
        )
        dt = time.perf_counter() - self.t0
        loss = (weighted_ce / weight_sum.double().clamp_min(1e-8)).item()
        per_class = {
            name: (class_ce[c] / class_tokens[c]).item()
            for c, name in enumerate(self.classes)
            if class_tokens[c] > 0
        }
        record = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "loss_per_class": per_class,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": n_tokens.item() / dt,
            "time_s": dt,
        }
        # 6 N FLOPs per token for the matmuls, 6 * layers * dim * sum(len^2) for attention
        if self.peak:
            flops = (
                6 * self.n_params * n_tokens.item()
                + 6 * self.args.n_layers * self.args.dim * attention_pairs.item()
            )
            record["mfu"] = flops / dt / (self.peak * self.world_size)
        self.log(record)
        self.bar.set_postfix(
            {
                "loss": f"{loss:.4f}",
                **{k[:12]: f"{v:.3f}" for k, v in per_class.items()},
                "lr": f"{lr:.2e}",
                "tok/s": f"{record['tokens_per_s']:.0f}",
                **({"mfu": f"{record['mfu']:.1%}"} if self.peak else {}),
            },
            refresh=False,
        )
        self.bar.update(1)
        if self.profiler is not None and step == self.cfg.profile_step + 2:
            profiler, self.profiler = self.profiler, None
            profiler.stop()  # on every rank; rank 0 writes the table
            if self.rank == 0:
                table = profiler.key_averages().table(
                    sort_by=f"self_{self.device.type}_time_total",
                    row_limit=40,
                    max_name_column_width=70,
                )
                with open(os.path.join(self.cfg.out_dir, "profile.txt"), "w") as f:
                    f.write(f"steps {self.cfg.profile_step}..{step}\n{table}\n")
                say(
                    f"profile of steps {self.cfg.profile_step}..{step} in {self.cfg.out_dir}/profile.txt"
                )
        return loss

    def log(self, record):
        if self.rank == 0:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self):
        if self.profiler is not None:  # the run ended inside the profiled steps
            self.profiler.stop()
        self.bar.close()
