"""C-RLFT vs SFT as learning curves: held-out accuracy every K steps, in three mixes of expert and novice data.

    python experiments/learning_curves.py                  # 3 settings x 4 methods x 3 seeds, two runs side by side
    python experiments/learning_curves.py --report_only    # tables and picture again from the runs' logs in --out_dir
    python experiments/learning_curves.py --seeds=1 --max_steps=20 --every=10 --toy_train=500 --toy_eval=40 \
        --eval_subset=20 --out_dir=out/learning_curves_smoke   # a smoke run

What it measures. experiments/crlft_vs_sft.py scores each method once, after a fixed budget, which cannot tell a
method that learns slower from one that learns worse. Here every run is scored along the way: every --every
steps on the first --eval_subset of its held-out problems, and at the last step on all --toy_eval of them
(problems from the fixed held-out tenth of toy_task.py, never trained on; greedy, batched, with the KV cache).
Two scores each time, as in experiments/reward_weights.py:
  expert  prompted with the expert condition (the plain template for runs without conditions), against the true
          sums: what C-RLFT is for;
  novice  prompted with the novice condition (the plain template again for runs without conditions), against
          the novices' own carry-free sums: whether the model kept the sub-optimal class's behaviour apart.
Methods (crlft_vs_sft.METHODS): sft_mix (no condition, weights 1 / 1), crlft (condition, 1 / 0.1),
condition_only (condition, 1 / 1), weights_only (no condition, 1 / 0.1). Settings (SETTINGS): the toy task as it
is (2% expert, novices always drop carries), the paper's share of expert data (about 9%: 6k GPT-4 conversations of
ShareGPT's ~70k), and a milder novice (9% expert, novices drop carries on 30% of their answers). Every run of a
setting trains the same model on the same data per seed for the same number of steps, so the learning-rate
schedule (5% warmup, cosine to 10%: a function of the total steps) is the same for every method.

The budgets, per setting (SETTINGS): every run of a setting has the same, so the same schedule; they differ
between settings because the settings flatten at different budgets and the whole command must fit an hour on
2 CPU cores: ~0.16 s a `toy` step (2,048 tokens, one thread) with two runs side by side, scoring included, so 36
runs of 2,000 steps (~95 minutes) do not fit. `ours` 1,800 steps: at 1,000 C-RLFT was still rising (73% -> 79%
over the last 100 steps), at 1,600 condition only's slowest seed was (72% -> 80% over the last 300), at 1,800
every curve is flat over the last 300 steps. paper_share 1,000: flat from step 800. mild_novice 700: the curves
of SFT on the mix, condition only and weights only are flat from step 600, C-RLFT's slowest seed still rises
(`--settings=mild_novice --max_steps=1000`, the same seeds, ends it at 99.4% +- 0.6%); at 1,000 the whole
command would take ~61 minutes. 42,000 steps in all: 55.8 minutes when nothing else ran.

How. Each run is train.py's own training (train.train, in a process of its own, one thread). train_loop saves a
checkpoint every --ckpt_every steps and at the last step; this script sets ckpt_every to K and, in the run's
process only, puts the scoring in place of the checkpoint (nothing is written to disk): the full weights are
gathered as for an export (train.export) and scored by toy_task.evaluate. Each score is a line of the run's
scores.jsonl; --report_only reads them back. Writes results.md (a table per setting), results.json and curves.svg
(a panel per setting: expert-condition accuracy above, novice-condition accuracy below; a line per method, the mean
over seeds, its band the seeds' range) in --out_dir.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from html import escape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import plot  # noqa: E402 (experiments/plot.py: the SVG frame, ticks, palette, legend)
from crlft_vs_sft import METHODS as ALL_METHODS  # noqa: E402 (one definition of each method's config)

EXPERT, NOVICE = "Expert", "Novice"  # toy_task.py's classes, named by their conditions
METHODS = {m: ALL_METHODS[m] for m in ("sft_mix", "crlft", "condition_only", "weights_only")}
# name: (share of expert conversations, how often a novice answer drops its carries, steps, description);
# the steps: each setting's budget (the docstring says why)
SETTINGS = {
    "ours": (0.02, 1.0, 1800, "2% expert, novices always drop carries"),
    "paper_share": (0.09, 1.0, 1000, "9% expert (the paper's share), novices always drop carries"),
    "mild_novice": (0.09, 0.3, 700, "9% expert, novices drop carries on 30% of answers"),
}
THRESHOLDS = (0.5, 0.9)  # the table's "steps to reach" columns, on the expert score


# ----------------------------------------------------------------------------------------------- one run
def run_dir(args, setting, method, seed):
    return os.path.join(args.out_dir, setting, f"{method}_seed{seed}")


def budget(args, setting):
    """The setting's steps, or --max_steps for every setting."""
    return args.max_steps or SETTINGS[setting][2]


def job_spec(args, setting, method, seed):
    """Everything that decides a run's curve: a finished run with the same spec is not trained again."""
    fraction, error_rate, _, _ = SETTINGS[setting]
    return dict(
        setting=setting,
        method=method,
        seed=seed,
        max_steps=budget(args, setting),
        every=args.every,
        toy_train=args.toy_train,
        toy_eval=args.toy_eval,
        eval_subset=args.eval_subset,
        expert_fraction=fraction,
        error_rate=error_rate,
        extra=args.extra,
    )


def read_scores(directory):
    path = os.path.join(directory, "scores.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def finished(directory, spec):
    """The run's scores if it ran to its last step with this spec, else None."""
    try:
        with open(os.path.join(directory, "job.json")) as f:
            same = json.load(f) == spec
    except (OSError, ValueError):
        return None
    scores = read_scores(directory)
    return scores if same and scores and scores[-1]["step"] == spec["max_steps"] else None


def launch(args, setting, method, seed):
    """One run in its own process (a process group of one, one thread); returns its scores."""
    directory, spec = run_dir(args, setting, method, seed), job_spec(args, setting, method, seed)
    scores = finished(directory, spec)
    if scores is None:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        env.pop("TRITON_INTERPRET", None)
        t0 = time.time()
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--job",
            json.dumps(spec),
            "--out_dir",
            directory,
        ]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(
                f"{setting} {method} seed {seed} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            )
        scores = finished(directory, spec)
        print(
            f"  {setting:12s} {method:15s} seed {seed}: expert {scores[-1]['expert']:.1%}, novice "
            f"{scores[-1]['novice']:.1%} at step {scores[-1]['step']} ({(time.time() - t0) / 60:.1f} min)",
            flush=True,
        )
    return scores


def run_job(spec, directory):
    """In the run's process: train.py's training, scored in place of each checkpoint."""
    import data
    import toy_task
    import train
    import train_config
    import train_job

    method = METHODS[spec["method"]]
    overrides = dict(
        method,
        expert_condition=EXPERT,
        seed=spec["seed"],
        out_dir=directory,
        max_steps=spec["max_steps"],
        epochs=1000,
        toy_train=spec["toy_train"],
        toy_expert_fraction=spec["expert_fraction"],
        toy_error_rate=spec["error_rate"],
        toy_eval=0,
        resume=False,
        export=False,
        ckpt_every=spec["every"],
    )
    cfg = train_config.parse_config([f"--{k}={v}" for k, v in overrides.items()] + spec["extra"])
    tokenizer, args = train_job.tokenizer_and_args(cfg)
    # the same held-out problems under both conditions, against the true and the carry-free sums
    problems = {
        EXPERT: toy_task.make_toy_eval(spec["toy_eval"], spec["seed"]),
        NOVICE: toy_task.make_toy_eval(spec["toy_eval"], spec["seed"], carry_free=True),
    }
    # a prefix: the same questions at every point
    subset = {q for q, _ in problems[EXPERT][: spec["eval_subset"]]}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "job.json"), "w") as f:
        json.dump(spec, f)
    log = open(os.path.join(directory, "scores.jsonl"), "w")

    # train_loop's save_checkpoint(model, optimizer, step, ...)
    def score(model, optimizer, step, *_, **__):
        t0 = time.time()
        # the full weights (export=False: no files)
        local = train.export(model, cfg, args, tokenizer, directory)
        last = step == spec["max_steps"]
        record = {"step": step}
        for condition, key in ((EXPERT, "expert"), (NOVICE, "novice")):
            prompt = lambda messages: data.encode_prompt(  # noqa: E731
                tokenizer, messages, condition if cfg.use_condition else ""
            )
            chosen = problems[condition] if last else problems[condition][: spec["eval_subset"]]
            accuracy, answers = toy_task.evaluate(local, tokenizer, chosen, prompt)
            right = dict(chosen)
            # the curve's point always on the subset (at the last step, from the full set's answers)
            record[key] = sum(right[q] == a.strip() for q, a in answers if q in subset) / len(
                subset
            )
            if last:
                record[f"{key}_full"] = accuracy
        record.update(
            n_subset=len(subset), n_full=len(problems[EXPERT]), eval_s=round(time.time() - t0, 2)
        )
        log.write(json.dumps(record) + "\n")
        log.flush()

    # train_loop calls it every cfg.ckpt_every steps and at the last step
    train.save_checkpoint = score
    train.train(cfg)
    log.close()
    if not (scores := read_scores(directory)) or scores[-1]["step"] != spec["max_steps"]:
        raise SystemExit(
            "train.py did not call save_checkpoint at its last step: the scoring hook is stale"
        )


# ----------------------------------------------------------------------------------------------- the report
def mean_sd(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pct(values):
    """mean ± sd (each value), as percentages"""
    m, s = mean_sd(values)
    return f"{m:.1%} ± {s:.1%} (" + ", ".join(f"{v:.1%}" for v in values) + ")"


def expert_weight_share(directory):
    """The expert answers' share of the loss weight sum(w) in the run's training data (train.py's prepared data,
    meta.json), or None: the denominator of C-RLFT's loss, what the normalisation argument is about."""
    try:
        with open(os.path.join(directory, "data", "meta.json")) as f:
            classes = json.load(f)["summary"]["classes"]
        return classes[EXPERT]["weight_sum"] / sum(c["weight_sum"] for c in classes.values())
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def steps_to(curve, threshold):
    """The first scored step whose expert accuracy (on the subset) reaches `threshold`, else None."""
    return next((r["step"] for r in curve if r["expert"] >= threshold), None)


def steps_text(steps, max_steps):
    if all(s is None for s in steps):
        return f"not within {max_steps}"
    seeds = ", ".join(str(s) if s is not None else f"not within {max_steps}" for s in steps)
    if any(s is None for s in steps):
        return seeds
    m, sd = mean_sd(steps)
    return f"{m:.0f} ± {sd:.0f} ({seeds})"


def table(setting, curves, seeds, args):
    """curves: {method: [scores of each seed]} -> the setting's markdown tables: the summary, then the curves."""
    fraction, error_rate, _, description = SETTINGS[setting]
    max_steps = budget(args, setting)
    rows = [
        f"**{setting}**: {description} ({args.toy_train} conversations, expert share {fraction:g}, novice "
        f"error rate {error_rate:g}); {max_steps} steps; seeds {', '.join(map(str, seeds))}.",
        "",
        "| method | condition | weights (expert / novice) | expert share of Σw | expert: steps to 50% | "
        "expert: steps to 90% | expert: best, mean ± sd (at step) | expert: final, mean ± sd (per seed) | "
        "novice condition, carry-free: final |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, runs in curves.items():
        cfg = METHODS[method]
        shares = [expert_weight_share(run_dir(args, setting, method, seed)) for seed in seeds]
        share = f"{statistics.mean(shares):.1%}" if None not in shares else "—"
        weights = (
            cfg["class_weights"]
            .replace(f"{EXPERT}=", "")
            .replace(f"{NOVICE}=", "")
            .replace(",", " / ")
        )
        reach = [steps_text([steps_to(c, t) for c in runs], max_steps) for t in THRESHOLDS]
        # the earliest of equal bests
        best = [max(c, key=lambda r: (r["expert"], -r["step"])) for c in runs]
        m, sd = mean_sd([b["expert"] for b in best])
        rows.append(
            f"| {method} | {'yes' if cfg['use_condition'] else 'no'} | {weights} | {share} | {reach[0]} | "
            f"{reach[1]} | {m:.1%} ± {sd:.1%} (at {', '.join(str(b['step']) for b in best)}) | "
            f"{pct([c[-1]['expert_full'] for c in runs])} | {pct([c[-1]['novice_full'] for c in runs])} |"
        )
    steps = [r["step"] for r in next(iter(curves.values()))[0]]
    for key, label in (
        ("expert", "expert condition, true sums"),
        ("novice", "novice condition, carry-free sums"),
    ):
        rows += [
            "",
            f"The curves, {label}: accuracy (%) on the {args.eval_subset}-problem subset, mean over seeds "
            "[lowest seed – highest seed], at step",
            "",
            "| method | " + " | ".join(map(str, steps)) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for method, runs in curves.items():
            cells = [[100 * c[k][key] for c in runs] for k in range(len(steps))]
            rows.append(
                f"| {method} | "
                + " | ".join(f"{statistics.mean(v):.0f} [{min(v):.0f}–{max(v):.0f}]" for v in cells)
                + " |"
            )
    return "\n".join(rows) + "\n"


def band_chart(path, settings, curves, args):
    """One SVG: a column per setting; the expert score above, the novice score below (runs without conditions:
    the plain prompt both times); per method the mean over seeds as a line and the seeds' range as a band."""
    panels, width, height = [], plot.W * len(settings), plot.H * 2
    for col, setting in enumerate(settings):
        max_steps = budget(args, setting)
        for row, key, label in ((0, "expert", "true sums"), (1, "novice", "carry-free sums")):
            title = (
                f"{setting}: {SETTINGS[setting][3]}"
                if row == 0
                else f"{setting}: novice (or plain) prompt, carry-free sums"
            )
            parts, to_px = plot._frame(
                title, "step", f"held-out accuracy (%): {label}", 0, max_steps, 0, 100
            )
            parts[0] = parts[0].replace("<svg ", f'<svg x="{col * plot.W}" y="{row * plot.H}" ', 1)
            for v in plot._ticks(0, max_steps):
                x, _ = to_px(v, 0)
                parts.append(
                    f'<text x="{x:.1f}" y="{plot.H - plot.BOTTOM + 16}" text-anchor="middle">{v:g}</text>'
                )
            for i, runs in enumerate(curves[setting].values()):
                color = plot.PALETTE[i % len(plot.PALETTE)]
                steps = [r["step"] for r in runs[0]]
                values = [[100 * c[k][key] for c in runs] for k in range(len(steps))]
                upper = [to_px(s, max(v)) for s, v in zip(steps, values)]
                lower = [to_px(s, min(v)) for s, v in zip(steps, values)]
                band = " ".join("%.1f,%.1f" % p for p in upper + lower[::-1])
                line = " ".join(
                    "%.1f,%.1f" % to_px(s, statistics.mean(v)) for s, v in zip(steps, values)
                )
                parts.append(
                    f'<polygon points="{band}" fill="{color}" fill-opacity="0.15" stroke="none"/>'
                    f'<polyline points="{line}" fill="none" stroke-width="1.8" stroke="{color}"/>'
                )
            plot._legend(parts, list(curves[setting]))
            panels.append("\n".join(parts + ["</svg>"]))
    with open(path, "w") as f:
        f.write(
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
            f'font-size="12"><title>{escape("C-RLFT vs SFT: held-out accuracy against training steps")}</title>\n'
            + "\n".join(panels)
            + "\n</svg>\n"
        )


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--max_steps",
        type=int,
        default=0,
        help="every run's budget (and so its schedule); 0: each setting's own (SETTINGS)",
    )
    p.add_argument("--every", type=int, default=100, help="score every this many steps (K)")
    p.add_argument("--toy_train", type=int, default=12000)
    p.add_argument(
        "--toy_eval", type=int, default=500, help="held-out problems scored at the last step"
    )
    p.add_argument(
        "--eval_subset",
        type=int,
        default=200,
        help="the first this many of them, scored every K steps",
    )
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--jobs", type=int, default=2, help="runs side by side")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out_dir", default=os.path.join(ROOT, "out", "learning_curves"))
    p.add_argument(
        "--report_only", action="store_true", help="tables and picture from the runs in --out_dir"
    )
    p.add_argument("--job", help=argparse.SUPPRESS)
    # unknown --key=value go to train.py (e.g. a model shape)
    args, args.extra = p.parse_known_args(argv)
    if args.job:
        return run_job(json.loads(args.job), args.out_dir)
    settings, methods = args.settings.split(","), args.methods.split(",")
    seeds = [1000 + s for s in range(args.seeds)]
    # the longest runs first, so that the two workers end together; seeds last within a budget: a first look early
    jobs = sorted(
        ((st, m, s) for s in seeds for st in settings for m in methods),
        key=lambda job: -budget(args, job[0]),
    )
    os.makedirs(args.out_dir, exist_ok=True)
    timing = os.path.join(args.out_dir, "timing.json")
    if args.report_only:
        done = {job: finished(run_dir(args, *job), job_spec(args, *job)) for job in jobs}
        if missing := [job for job, scores in done.items() if scores is None]:
            raise SystemExit(
                f"{len(missing)} run(s) missing or not finished with these options, e.g. {missing[0]}"
            )
        with open(timing) as f:  # the wall time of the command that ran them
            minutes = json.load(f)["minutes"]
    else:
        t0 = time.time()
        total = sum(budget(args, job[0]) for job in jobs)
        print(f"{len(jobs)} runs, {total:,} steps in all, {args.jobs} side by side", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:  # the threads only wait on the runs' processes
            done = dict(zip(jobs, pool.map(lambda job: launch(args, *job), jobs)))
        minutes = (time.time() - t0) / 60
        with open(timing, "w") as f:
            json.dump({"minutes": minutes, "jobs": args.jobs, "threads": args.threads}, f)
    curves = {st: {m: [done[(st, m, s)] for s in seeds] for m in methods} for st in settings}
    text = (
        f"C-RLFT vs SFT as learning curves (experiments/learning_curves.py): {len(jobs)} runs, {args.jobs} side "
        f"by side, {args.threads} thread(s) each; {minutes:.1f} minutes in all. Expert: accuracy under the expert "
        "condition against the true sums; novice: under the novice condition against the novices' carry-free "
        "sums (runs without conditions: the plain template both times). Steps to 50% / 90% and the best are on "
        f"the {args.eval_subset}-problem subset scored every {args.every} steps; final: all {args.toy_eval} "
        "problems at the last step.\n\n"
        + "\n".join(table(st, curves[st], seeds, args) for st in settings)
    )
    print("\n" + text)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(
            {
                st: {m: {str(s): c for s, c in zip(seeds, runs)} for m, runs in curves[st].items()}
                for st in settings
            },
            f,
            indent=1,
        )
    band_chart(os.path.join(args.out_dir, "curves.svg"), settings, curves, args)
    print(f"wrote {args.out_dir}/results.md, results.json, curves.svg")
    return curves


if __name__ == "__main__":
    main()
