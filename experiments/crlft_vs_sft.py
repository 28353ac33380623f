"""C-RLFT vs SFT on the toy mixed-quality task: the paper's central claim, at CPU scale, in one command.

    python experiments/crlft_vs_sft.py                 # 5 methods x 3 seeds, ~30 minutes on 2 cores
    python experiments/crlft_vs_sft.py --seeds=1 --max_steps=20 --toy_train=500 --toy_eval=50   # smoke

Every method trains the same model size for the same number of steps on the same data and seed; only the
two ingredients of C-RLFT change (OpenChat, Section 3):
  sft_mix         no condition, every assistant token weight 1          (plain SFT on the mixture)
  sft_expert      the expert class only, no condition, weight 1         (SFT on the clean data alone)
  crlft           class-conditioned prompts + class rewards 1.0 / 0.1   (C-RLFT)
  condition_only  class-conditioned prompts, weights all 1              (ablation: no reward weights)
  weights_only    class rewards 1.0 / 0.1, no condition                 (ablation: no conditioning)
Each run is scored on held-out problems, greedy, with the expert condition where the run had conditions.
Writes a markdown table (results.md), accuracy bars (accuracy.svg) and learning curves (curves.svg).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import plot  # noqa: E402 (experiments/plot.py: SVG line charts)
from plot import BOTTOM, LEFT, PALETTE, RIGHT, H, W, _frame, escape  # noqa: E402

EXPERT, SUB = "Expert", "Novice"  # toy_task.py's classes, named by their conditions
METHODS = {
    "sft_mix": dict(use_condition=False, class_weights=f"{EXPERT}=1,{SUB}=1"),
    "sft_expert": dict(
        use_condition=False, class_weights=f"{EXPERT}=1,{SUB}=1", only_classes=EXPERT
    ),
    "crlft": dict(use_condition=True, class_weights=f"{EXPERT}=1,{SUB}=0.1"),
    "condition_only": dict(use_condition=True, class_weights=f"{EXPERT}=1,{SUB}=1"),
    "weights_only": dict(use_condition=False, class_weights=f"{EXPERT}=1,{SUB}=0.1"),
}


def run(method, seed, args, out_dir):
    """One training run in its own process (a fresh process group each time); returns its results."""
    run_dir = os.path.join(out_dir, f"{method}_seed{seed}")
    # one checkpoint, at the end
    overrides = dict(
        METHODS[method],
        expert_condition=EXPERT,
        seed=seed,
        out_dir=run_dir,
        max_steps=args.max_steps,
        epochs=1000,
        toy_train=args.toy_train,
        toy_eval=args.toy_eval,
        toy_expert_fraction=args.expert_fraction,
        resume=False,
        export=False,
        ckpt_every=10**9,
    )
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + [
        f"--{k}={v}" for k, v in overrides.items()
    ]
    cmd += args.extra
    t0 = time.time()
    # small models: one core each, runs side by side
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env.pop("TRITON_INTERPRET", None)
    if not args.report_only:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(
                f"{method} seed {seed} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        log = [r for r in map(json.loads, f) if "loss" in r]
    results["curve"] = [(r["step"], r["loss_per_class"].get(EXPERT)) for r in log]
    results["final_loss_per_class"] = log[-1]["loss_per_class"]
    # Every run first sits on a plateau (~1.2 nats: the format learned, not the digits); where it leaves it:
    # the first step with the trained-on class's CE under 0.5 (the novices', or the experts' when alone).
    watched = EXPERT if "only_classes" in METHODS[method] else SUB
    results["plateau_step"] = next(
        (r["step"] for r in log if r["loss_per_class"].get(watched, 9) < 0.5), None
    )
    results["minutes"] = (time.time() - t0) / 60
    print(
        f"  {method:15s} seed {seed}: accuracy {results['accuracy']:.1%} "
        f"({results['minutes']:.1f} min)",
        flush=True,
    )
    return results


def mean_spread(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def bar_chart(path, bars, title="", ylabel="", y_max=None):
    """bars: [(label, mean, spread)]; a bar per label with an error whisker of +-spread."""
    top = y_max if y_max is not None else max(m + s for _, m, s in bars) * 1.1 or 1.0
    parts, to_px = _frame(title, "", ylabel, 0, len(bars), 0, top)
    slot = (W - LEFT - RIGHT) / len(bars)
    for i, (label, mean, spread) in enumerate(bars):
        x, y = to_px(i + 0.2, mean)
        _, y_base = to_px(0, 0)
        color = PALETTE[i % len(PALETTE)]
        parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{0.6 * slot:.1f}" height="{y_base - y:.1f}" '
            f'fill="{color}"/><text x="{x + 0.3 * slot:.1f}" y="{y - 6:.1f}" '
            f'text-anchor="middle">{mean:.3g}</text>'
        )
        if spread > 0:
            cx = x + 0.3 * slot
            _, ylo = to_px(0, max(mean - spread, 0))
            _, yhi = to_px(0, mean + spread)
            parts.append(
                f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{ylo:.1f}" y2="{yhi:.1f}" stroke="black"/>'
            )
        parts.append(
            f'<text x="{x + 0.3 * slot:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle" '
            f'font-size="11">{escape(label)}</text>'
        )
    with open(path, "w") as f:
        f.write("\n".join(parts + ["</svg>"]))


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max_steps", type=int, default=600)
    p.add_argument("--toy_train", type=int, default=12000)
    p.add_argument("--toy_eval", type=int, default=500)
    p.add_argument("--expert_fraction", type=float, default=0.02)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (one per core)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out_dir", default=os.path.join(ROOT, "out", "crlft_vs_sft"))
    p.add_argument(
        "--report_only", action="store_true", help="tables and pictures from the runs in --out_dir"
    )
    args, args.extra = p.parse_known_args(argv)  # unknown --key=value go to train.py
    methods = args.methods.split(",")
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()
    jobs = [(m, 1000 + s) for s in range(args.seeds) for m in methods]
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on the training subprocesses
        finished = list(pool.map(lambda job: run(*job, args, args.out_dir), jobs))
    results = {m: [r for (m2, _), r in zip(jobs, finished) if m2 == m] for m in methods}
    minutes = (time.time() - t0) / 60

    rows = [
        "| method | condition | weights (expert / sub-optimal) | accuracy, mean ± sd (per seed) | "
        f"left the plateau at step | final CE {EXPERT} | final CE {SUB} |",
        "|---|---|---|---|---|---|---|",
    ]
    bars = []
    for m in methods:
        acc_mean, acc_sd = mean_spread([r["accuracy"] for r in results[m]])
        ce = {c: [r["final_loss_per_class"].get(c) for r in results[m]] for c in (EXPERT, SUB)}
        ce_text = {
            c: (f"{statistics.mean(v):.3f}" if all(x is not None for x in v) else "—")
            for c, v in ce.items()
        }
        weights = METHODS[m]["class_weights"].replace(f"{EXPERT}=", "").replace(f"{SUB}=", "")
        weights = (
            weights.replace(",", " / ") if "only_classes" not in METHODS[m] else "1 / (not trained)"
        )
        per_seed = ", ".join(f"{r['accuracy']:.1%}" for r in results[m])
        plateau = ", ".join(str(r["plateau_step"]) for r in results[m])
        rows.append(
            f"| {m} | {'yes' if METHODS[m]['use_condition'] else 'no'} | {weights} | "
            f"{acc_mean:.1%} ± {acc_sd:.1%} ({per_seed}) | {plateau} | {ce_text[EXPERT]} | {ce_text[SUB]} |"
        )
        bars.append((m, 100 * acc_mean, 100 * acc_sd))
    header = (
        f"Toy task: {args.toy_train} training conversations, {args.expert_fraction:.0%} expert; "
        f"{args.max_steps} steps; {args.seeds} seed(s); {args.toy_eval} held-out problems; "
        + (
            "tables from the runs in --out_dir.\n\n"
            if args.report_only
            else f"{minutes:.1f} minutes in all.\n\n"
        )
    )
    table = header + "\n".join(rows) + "\n"
    print("\n" + table)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(
            {
                m: [{k: v for k, v in r.items() if k != "curve"} for r in rs]
                for m, rs in results.items()
            },
            f,
            indent=1,
        )
    bar_chart(
        os.path.join(args.out_dir, "accuracy.svg"),
        bars,
        y_max=100,
        title="Held-out accuracy (greedy), mean ± sd over seeds",
        ylabel="accuracy (%)",
    )
    plot.line_chart(
        os.path.join(args.out_dir, "curves.svg"),
        {m: [(s, v) for s, v in results[m][0]["curve"] if v is not None] for m in methods},
        title=f"Training CE on the expert class ({EXPERT}), first seed",
        ylabel="nats/token",
        log_y=True,
    )
    print(f"wrote {args.out_dir}/results.md, accuracy.svg, curves.svg")
    return results


if __name__ == "__main__":
    main()
