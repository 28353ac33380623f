"""SVG line charts for the experiments' pictures and for a training run's log (no plotting library: the
project's packages stay torch, numpy, sentencepiece, triton, tqdm and safetensors).

    python experiments/plot.py out/default/log.jsonl     # -> out/default/loss.svg: loss, validation, CE per class
"""

import json
import math
import os
import sys
from html import escape

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

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
        f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
        f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
        f'<text x="{LEFT + pw / 2}" y="{H - 10}" text-anchor="middle">{escape(xlabel)}</text>',
        f'<text x="16" y="{TOP + ph / 2}" transform="rotate(-90 16 {TOP + ph / 2})" '
        f'text-anchor="middle">{escape(ylabel)}</text>',
        f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>',
    ]
    yt = [10**e for e in range(math.floor(ly0), math.ceil(ly1) + 1)] if log_y else _ticks(y0, y1)
    for v in yt:
        if not (ly0 - 1e-9 <= fy(v) <= ly1 + 1e-9):
            continue
        _, py = to_px(x0, v)
        parts.append(
            f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{py:.1f}" y2="{py:.1f}" stroke="#ddd"/>'
            f'<text x="{LEFT - 6}" y="{py + 4:.1f}" text-anchor="end">{v:g}</text>'
        )
    return parts, to_px


def _legend(parts, names):
    for i, name in enumerate(names):
        y = TOP + 10 + 18 * i
        parts.append(
            f'<rect x="{W - RIGHT + 12}" y="{y - 9}" width="12" height="12" '
            f'fill="{PALETTE[i % len(PALETTE)]}"/><text x="{W - RIGHT + 30}" y="{y + 1}">'
            f"{escape(name)}</text>"
        )


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
        parts.append(
            f'<polyline points="{coords}" fill="none" stroke-width="1.5" '
            f'stroke="{PALETTE[i % len(PALETTE)]}"/>'
        )
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
    curves = {
        "loss (weighted)": [(r["step"], r["loss"]) for r in steps],
        "validation loss": [(r["step"], r["val_loss"]) for r in log if "val_loss" in r],
        **{
            f"CE {name}": [
                (r["step"], r["loss_per_class"][name]) for r in steps if name in r["loss_per_class"]
            ]
            for name in last
        },
    }
    line_chart(
        svg_path,
        {k: v for k, v in curves.items() if v},
        title="C-RLFT training loss",
        ylabel="cross-entropy (nats/token)",
        log_y=True,
    )
    return last


if __name__ == "__main__":
    log_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join("out", "default", "log.jsonl")
    svg_path = os.path.join(os.path.dirname(log_path), "loss.svg")
    loss_chart(log_path, svg_path)
    print(f"wrote {svg_path}")
