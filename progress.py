"""What a user watches while train.py runs: a progress bar (loss, loss per class, lr, tokens/s, MFU on GPU),
out_dir/log.jsonl (a record per step and per validation), the profiler's table, and out_dir/loss.svg, drawn
here as a tiny SVG chart (no plotting library: the runtime packages stay torch, numpy, sentencepiece,
triton, tqdm and safetensors).
"""
import json
import math
import os
import time
from html import escape

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import parse_class_weights


def say(*args):
    """Print on rank 0, above the progress bar."""
    if dist.get_rank() == 0:
        tqdm.write(" ".join(str(a) for a in args))


def describe(cfg, tokenizer, args, n_params, dataset, n_held_out, n_steps, world_size):
    """Say what is about to be trained (rank 0): tokenizer, model, each class with its weight, the expert
    condition, the plan; and warn when one class only makes it plain SFT."""
    if dist.get_rank() != 0:
        return
    summary, weights = dataset.meta.get("summary", {}), parse_class_weights(cfg.class_weights)
    lines = [f"tokenizer: {tokenizer.model_path} ({tokenizer.sp.get_piece_size()} pieces, <|end_of_turn|> = "
             f"{tokenizer.eot_id})", f"model: {cfg.model} ({args.model_type}, {args.n_layers} layers, dim {args.dim}, "
             f"{n_params / 1e6:,.1f}M parameters, context {args.max_seq_len}"
             f"{f', sliding window {args.sliding_window}' if args.sliding_window else ''})",
             f"data: {len(dataset)} conversations in {len(dataset.class_names)} class(es), {n_held_out} held out for "
             f"validation; dropped {summary.get('dropped', {})}, truncated {summary.get('truncated_to_context', 0)}"]
    lines += [f"  class {name!r:16} weight {weights.get(name, 'per message')!s:5}  {c['conversations']:>9,} "
              f"conversations  {c['supervised_tokens']:>13,} supervised tokens" for name, c in
              summary.get("classes", {}).items()]
    lines += [f"expert condition (evaluation, exported chat template): "
              f"{cfg.expert_condition if cfg.use_condition else '(none)'!r}", f"plan: {n_steps} steps in "
              f"{cfg.epochs} epochs, {world_size} rank(s) x {cfg.grad_accum} micro-batch(es) of {cfg.batch_tokens} "
              f"tokens, peak lr {cfg.lr:.3g}"]
    if len(dataset.class_names) == 1:
        lines.append("warning: one class only: every conversation gets the same condition and weight, so this is "
                     "plain SFT, not C-RLFT (give each source its class: --data=\"GPT4 Correct=a.jsonl,GPT3=b.jsonl\")")
    tqdm.write("\n".join(lines))


class Progress:
    """Rank 0 writes; every rank joins the all-reduce of each step's statistics."""

    def __init__(self, cfg, start_step, total_steps, class_names, n_params, args, device):
        self.cfg, self.classes, self.n_params, self.args, self.device = cfg, class_names, n_params, args, device
        self.rank, self.world_size, self.profiler = dist.get_rank(), dist.get_world_size(), None
        self.log_path = os.path.join(cfg.out_dir, "log.jsonl")
        self.peak = next((f for key, f in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40", 181e12))
                          if device.type == "cuda" and key in torch.cuda.get_device_name(device)), None)  # bf16
        if self.rank == 0:  # a fresh run starts a new log; a resumed one keeps the steps up to its checkpoint, once
            os.makedirs(cfg.out_dir, exist_ok=True)
            kept = []
            if start_step and os.path.exists(self.log_path):
                with open(self.log_path) as f:
                    kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
            with open(self.log_path, "w") as f:
                f.writelines(kept)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=self.rank != 0, dynamic_ncols=True)

    def start_step(self, step):
        if self.cfg.profile_step and step + 1 == self.cfg.profile_step:  # not when resuming past it
            self.profiler = torch.profiler.profile(with_stack=False)
            self.profiler.start()
        self.t0 = time.perf_counter()

    def end_step(self, step, epoch, lr, grad_norm, batches, outputs, weight_sum):
        """Log the step: sum(w * CE) / sum(w), per class the mean CE of supervised tokens, tokens/s, MFU."""
        n = len(self.classes)
        stats = torch.zeros(3 + 2 * n, dtype=torch.float64, device=self.device)  # sums, tokens, sum(len^2)
        for b, (loss_sum, token_ce) in zip(batches, outputs):
            supervised = b.loss_weights > 0
            stats[:3] += torch.stack([loss_sum.double(), torch.tensor(float(len(b.tokens)), device=self.device),
                                      ((b.cu_seqlens[1:] - b.cu_seqlens[:-1]).double() ** 2).sum()]).double()
            stats[3:3 + n].index_add_(0, b.class_ids[supervised], token_ce[supervised].double())
            stats[3 + n:].index_add_(0, b.class_ids[supervised], supervised[supervised].double())
        dist.all_reduce(stats)
        dt = time.perf_counter() - self.t0
        loss = (stats[0] / weight_sum.double().clamp_min(1e-8)).item()
        per_class = {name: (stats[3 + c] / stats[3 + n + c]).item() for c, name in enumerate(self.classes)
                     if stats[3 + n + c] > 0}
        record = {"step": step, "epoch": epoch, "loss": loss, "loss_per_class": per_class, "lr": lr,
                  "grad_norm": float(grad_norm), "tokens_per_s": stats[1].item() / dt, "time_s": dt}
        if self.peak:  # 6 N FLOPs per token for the matmuls, 6 * layers * dim * sum(len^2) for attention
            flops = 6 * self.n_params * stats[1].item() + 6 * self.args.n_layers * self.args.dim * stats[2].item()
            record["mfu"] = flops / dt / (self.peak * self.world_size)
        self.log(record)
        self.bar.set_postfix({"loss": f"{loss:.4f}", **{k[:12]: f"{v:.3f}" for k, v in per_class.items()},
                              "lr": f"{lr:.2e}", "tok/s": f"{record['tokens_per_s']:.0f}",
                              **({"mfu": f"{record['mfu']:.1%}"} if self.peak else {})}, refresh=False)
        self.bar.update(1)
        if self.profiler is not None and step == self.cfg.profile_step + 2:
            profiler, self.profiler = self.profiler, None
            profiler.stop()  # on every rank; rank 0 writes the table
            if self.rank == 0:
                table = profiler.key_averages().table(sort_by=f"self_{self.device.type}_time_total", row_limit=40,
                                                      max_name_column_width=70)
                with open(os.path.join(self.cfg.out_dir, "profile.txt"), "w") as f:
                    f.write(f"steps {self.cfg.profile_step}..{step}\n{table}\n")
                say(f"profile of steps {self.cfg.profile_step}..{step} in {self.cfg.out_dir}/profile.txt")
        return loss

    def log(self, record):
        if self.rank == 0:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")


    def close(self):
        if self.profiler is not None:  # the run ended inside the profiled steps
            self.profiler.stop()
        self.bar.close()


PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
W, H, LEFT, RIGHT, TOP, BOTTOM = 640, 400, 70, 170, 40, 50  # canvas and margins, in pixels


def _ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _frame(title, xlabel, ylabel, x0, x1, y0, y1, log_y=False):
    """The SVG header, axes, ticks and labels; returns (parts, to_px) where to_px maps data to pixels."""
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    ly0, ly1 = fy(y0), fy(y1)
    if ly1 <= ly0:
        ly1 = ly0 + 1.0
    x1 = x1 if x1 > x0 else x0 + 1.0
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def to_px(x, y):
        return LEFT + (x - x0) / (x1 - x0) * pw, TOP + ph - (fy(y) - ly0) / (ly1 - ly0) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
             f'<text x="{LEFT + pw / 2}" y="{H - 10}" text-anchor="middle">{escape(xlabel)}</text>',
             f'<text x="16" y="{TOP + ph / 2}" transform="rotate(-90 16 {TOP + ph / 2})" '
             f'text-anchor="middle">{escape(ylabel)}</text>',
             f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>']
    yt = [10 ** e for e in range(math.floor(ly0), math.ceil(ly1) + 1)] if log_y else _ticks(y0, y1)
    for v in yt:
        if not (ly0 - 1e-9 <= fy(v) <= ly1 + 1e-9):
            continue
        _, py = to_px(x0, v)
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{py:.1f}" y2="{py:.1f}" stroke="#ddd"/>'
                     f'<text x="{LEFT - 6}" y="{py + 4:.1f}" text-anchor="end">{v:g}</text>')
    return parts, to_px


def _legend(parts, names):
    for i, name in enumerate(names):
        y = TOP + 10 + 18 * i
        parts.append(f'<rect x="{W - RIGHT + 12}" y="{y - 9}" width="12" height="12" '
                     f'fill="{PALETTE[i % len(PALETTE)]}"/><text x="{W - RIGHT + 30}" y="{y + 1}">'
                     f'{escape(name)}</text>')


def line_chart(path, series, title="", xlabel="step", ylabel="", log_y=False):
    """series: {name: [(x, y), ...]}. Writes an SVG line chart to `path`."""
    points = [(x, y) for pts in series.values() for x, y in pts if not log_y or y > 0]
    if not points:
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    parts, to_px = _frame(title, xlabel, ylabel, min(xs), max(xs), min(ys), max(ys), log_y)
    for v in _ticks(min(xs), max(xs)):
        px, _ = to_px(v, min(ys))
        parts.append(f'<text x="{px:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{v:g}</text>')
    for i, pts in enumerate(series.values()):
        coords = " ".join("%.1f,%.1f" % to_px(x, y) for x, y in pts if not log_y or y > 0)
        parts.append(f'<polyline points="{coords}" fill="none" stroke-width="1.5" '
                     f'stroke="{PALETTE[i % len(PALETTE)]}"/>')
    _legend(parts, list(series))
    with open(path, "w") as f:
        f.write("\n".join(parts + ["</svg>"]))


def loss_chart(log_path, svg_path):
    """train.py's log.jsonl as loss curves: the weighted loss, the validation loss, the CE of each class.
    Returns the last step's CE per class."""
    with open(log_path) as f:
        log = [json.loads(line) for line in f]
    steps = [r for r in log if "loss" in r]
    last = steps[-1]["loss_per_class"] if steps else {}
    curves = {"loss (weighted)": [(r["step"], r["loss"]) for r in steps],
              "validation loss": [(r["step"], r["val_loss"]) for r in log if "val_loss" in r],
              **{f"CE {name}": [(r["step"], r["loss_per_class"][name]) for r in steps if name in r["loss_per_class"]]
                 for name in last}}
    line_chart(svg_path, {k: v for k, v in curves.items() if v}, title="C-RLFT training loss",
               ylabel="cross-entropy (nats/token)", log_y=True)
    return last
