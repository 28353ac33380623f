"""When do C-RLFT's reward weights matter? Condition-only vs C-RLFT across model capacities, then a sweep of the
sub-optimal class's reward where the two differ most. One command, ~30 minutes on 2 CPU cores:

    python experiments/reward_weights.py
    python experiments/reward_weights.py --seeds=1 --max_steps=20 --toy_train=500 --toy_eval=50 --sizes=micro \
        --rewards=1,0 --out_dir=out/smoke   # a smoke run

The prediction (README, "Where the weights act"): under condition c the optimum of the KL-regularised objective is
the class's own behaviour pi_c, whatever the reward r_c, so with capacity to spare the weights change little;
they act through what the classes share, deciding which class a model that cannot fit both gets right.

Every run: the toy task (toy_task.py: 2% expert conversations, novices always drop carries), the same data per
seed, the same number of steps; a model size from `SIZES`; conditions on; the novice class's reward r (the
expert's is 1). Scored on held-out problems, greedy: under the expert condition against the true sums, and
under the novice condition against the novices' own carry-free sums (what that class was taught).
Writes results.md, results.json, capacity.svg and sweep.svg in --out_dir.
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

# model shapes, from clearly too small for 2-digit addition with carries to the default toy model
SIZES = {
    "micro": dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1),
    "small": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2),
    "toy": dict(dim=128, n_layers=3, n_heads=4, n_kv_heads=2),
}
EXPERT, NOVICE = "Expert", "Novice"


def job(size, reward, seed, args):
    """One run in its own process: train (train.py's train(), no export of epochs), then score the final model."""
    run_dir = os.path.join(args.out_dir, f"{size}_r{reward:g}_seed{seed}")
    cmd = [
        sys.executable,
        __file__,
        "--job",
        json.dumps([size, reward, seed, vars(args)]),
        "--out_dir",
        run_dir,
    ]
    # small models: one core each, two runs side by side
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(
            f"{size} r={reward} seed {seed} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    with open(os.path.join(run_dir, "scores.json")) as f:
        result = json.load(f)
    print(
        f"  {size:6s} r={reward:<5g} seed {seed}: expert {result['expert']:.1%}, novice (carry-free) "
        f"{result['novice']:.1%} ({(time.time() - t0) / 60:.1f} min)",
        flush=True,
    )
    return result


def run_job(spec, run_dir):
    import data
    import sample
    import toy_task
    import train
    import train_config

    size, reward, seed, args = json.loads(spec)
    overrides = dict(
        SIZES[size],
        class_weights=f"{EXPERT}=1,{NOVICE}={reward}",
        expert_condition=EXPERT,
        seed=seed,
        out_dir=run_dir,
        max_steps=args["max_steps"],
        epochs=1000,
        toy_train=args["toy_train"],
        toy_eval=0,
        resume=False,
        ckpt_every=10**9,
        export=True,
    )
    train.train(train_config.parse_config([f"--{k}={v}" for k, v in overrides.items()]))
    model, tokenizer = sample.load(os.path.join(run_dir, "export"))
    scores = {}
    for condition, carry_free in ((EXPERT, False), (NOVICE, True)):
        problems = toy_task.make_toy_eval(args["toy_eval"], seed, carry_free=carry_free)
        scores[condition.lower()], _ = toy_task.evaluate(
            model,
            tokenizer,
            problems,
            lambda messages: data.encode_prompt(tokenizer, messages, condition),
        )
    with open(os.path.join(run_dir, "scores.json"), "w") as f:
        json.dump(scores, f)


def summary(results, key):
    values = [r[key] for r in results]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, default=3)
    # the data, steps and seeds of crlft_vs_sft.py
    p.add_argument("--max_steps", type=int, default=600)
    p.add_argument("--toy_train", type=int, default=12000)
    p.add_argument("--toy_eval", type=int, default=500)
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument(
        "--rewards", default="1,0.3,0.1,0.03,0", help="the sweep of the novice class's reward"
    )
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (one per core)")
    p.add_argument("--out_dir", default=os.path.join(ROOT, "out", "reward_weights"))
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.job:
        return run_job(args.job, args.out_dir)
    t0 = time.time()
    sizes, seeds = args.sizes.split(","), [1000 + s for s in range(args.seeds)]
    rewards = [float(r) for r in args.rewards.split(",")]
    runs = {}
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on the subprocesses
        # 1. capacity: condition only (r = 1) vs C-RLFT (r = 0.1) at every size
        specs = [(size, r, seed) for seed in seeds for size in sizes for r in (1.0, 0.1)]
        for spec, result in zip(specs, pool.map(lambda s: job(*s, args), specs)):
            runs[spec] = result
        # 2. the reward sweep at the size where the two differ most (expert accuracy, mean over seeds)
        gap = {
            size: abs(
                summary([runs[(size, 0.1, s)] for s in seeds], "expert")[0]
                - summary([runs[(size, 1.0, s)] for s in seeds], "expert")[0]
            )
            for size in sizes
        }
        sweep_size = max(gap, key=gap.get)
        specs = [
            (sweep_size, r, seed)
            for seed in seeds
            for r in rewards
            if (sweep_size, r, seed) not in runs
        ]
        for spec, result in zip(specs, pool.map(lambda s: job(*s, args), specs)):
            runs[spec] = result
    minutes = (time.time() - t0) / 60

    def row(size, r):
        e, n = (
            summary([runs[(size, r, s)] for s in seeds], "expert"),
            summary([runs[(size, r, s)] for s in seeds], "novice"),
        )
        per_seed = ", ".join(f"{runs[(size, r, s)]['expert']:.1%}" for s in seeds)
        return (
            f"| {size} | {r:g} | {e[0]:.1%} ± {e[1]:.1%} ({per_seed}) | {n[0]:.1%} ± {n[1]:.1%} |",
            e,
            n,
        )

    head = (
        "| size | novice reward r | expert condition: true sums, mean ± sd (per seed) | "
        "novice condition: carry-free sums |\n|---|---|---|---|"
    )
    capacity = [row(size, r) for size in sizes for r in (1.0, 0.1)]
    sweep = [row(sweep_size, r) for r in rewards]
    text = (
        f"Toy task, {args.toy_train} training conversations (2% expert), {args.max_steps} steps, seeds "
        f"{seeds}, {args.toy_eval} held-out problems; {minutes:.1f} minutes in all.\n\n"
        f"Capacity (r = 1: condition only; r = 0.1: C-RLFT):\n\n{head}\n"
        + "\n".join(r for r, _, _ in capacity)
        + f"\n\nReward sweep at size {sweep_size!r} (the largest expert-accuracy gap):\n\n{head}\n"
        + "\n".join(r for r, _, _ in sweep)
        + "\n"
    )
    print("\n" + text)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({f"{size} r={r:g} seed={s}": v for (size, r, s), v in runs.items()}, f, indent=1)
    plot.line_chart(
        os.path.join(args.out_dir, "capacity.svg"),
        {
            f"{label}, {cond}": [
                (k, 100 * summary([runs[(size, r, s)] for s in seeds], cond)[0])
                for k, size in enumerate(sizes)
            ]
            for r, label in ((0.1, "C-RLFT"), (1.0, "condition only"))
            for cond in ("expert", "novice")
        },
        title=f"Accuracy by model size ({', '.join(f'{k}={s}' for k, s in enumerate(sizes))})",
        xlabel="model size",
        ylabel="held-out accuracy (%)",
    )
    plot.line_chart(
        os.path.join(args.out_dir, "sweep.svg"),
        {
            cond: [
                (r, 100 * summary([runs[(sweep_size, r, s)] for s in seeds], cond)[0])
                for r in rewards
            ]
            for cond in ("expert", "novice")
        },
        title=f"Accuracy by the novice class's reward ({sweep_size})",
        xlabel="novice reward r",
        ylabel="held-out accuracy (%)",
    )
    print(f"wrote {args.out_dir}/results.md, results.json, capacity.svg, sweep.svg")


if __name__ == "__main__":
    main()
