#!/usr/bin/env bash
# The QLoRA compile recipe on the GPU machine, every configuration eager and compiled.
# From the repo root, after `cargo xtask gpu-bundle` here:
#   run(command="PYTHONPATH=bundle/py bash compile-audit/recipe/run_all.sh", carry=["bundle"], ...)
# Args: configurations to run (default: all five). Environment knobs:
#   STEPS (20)  LAYERS (16)  SCOPE (layers | model)  BUDGET_S (whole script, 560)
#   EAGER_LIMIT_S (100)  COMPILED_LIMIT_S (200)  TAG (folder name under $D, default SCOPE-LAYERS)
#   EXTRA_ARGS (passed to every run_recipe.py, e.g. "--tiny --backend aot_eager" for a CPU dry run)
# Each run is its own process under `timeout`; a failure or timeout in one does not stop
# the others, and a run that would start with too little budget left is skipped. The eager
# runs are stock (no recipe patches): the reference the compiled recipe must match.
# Output: $OUT/recipe-$TAG.tar.gz with, per config, eager/ and compiled/ folders holding
# losses.jsonl, timing.json, stdout.txt, torch_logs.txt (stderr: TORCH_LOGS) and, for
# compiled runs, trace/ (TORCH_TRACE, trimmed to what compile-audit reads by
# compile-audit/py/trim_trace.py); the untrimmed traces go to $OUT/recipe-$TAG-raw.tar.gz
# when that stays under 15 MB.
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="$(dirname "$HERE")/py"
OUT="${OUT:-/tmp/recipe-out}"
STEPS="${STEPS:-20}"
LAYERS="${LAYERS:-16}"
SCOPE="${SCOPE:-layers}"
BUDGET_S="${BUDGET_S:-560}"
EAGER_LIMIT_S="${EAGER_LIMIT_S:-100}"
COMPILED_LIMIT_S="${COMPILED_LIMIT_S:-200}"
TAG="${TAG:-$SCOPE-$LAYERS}"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
D="/tmp/recipe/$TAG"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

configs=("$@")
# cache-friendly and most-wanted first: sdpa_ckpt reuses sdpa's compiled layer, flex_packed flex_pad's
[[ ${#configs[@]} -gt 0 ]] || configs=(sdpa flex_pad sdpa_ckpt flex_packed sdpa_pad)

rm -rf "$D" && mkdir -p "$D" "$OUT"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    python3 -c 'import torch, transformers, peft, accelerate, triton, bitsandbytes as b; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__, "triton", triton.__version__, "bitsandbytes", b.__version__, b.__file__)' 2>&1
    echo "steps=$STEPS layers=$LAYERS scope=$SCOPE configs=${configs[*]}"
} | tee "$D/env.txt"

echo "== checkpoint (random weights, Llama-3.2-1B shape, $LAYERS layers)"
t0=$(date +%s)
timeout -k 10 150 python3 "$HERE/run_recipe.py" sdpa "$D/prep" --prepare-only --layers "$LAYERS" "${EXTRA[@]}" 2>&1 | tail -3
echo "checkpoint: $(( $(date +%s) - t0 )) s"

run_one() {  # config mode
    local c=$1 mode=$2 dir="$D/$1/$2" limit rc t0
    limit=$([[ $mode == eager ]] && echo "$EAGER_LIMIT_S" || echo "$COMPILED_LIMIT_S")
    local l; l=$(left)
    (( l - 5 < limit )) && limit=$(( l - 5 ))
    mkdir -p "$dir"
    if (( limit < 45 )); then
        echo "$c $mode: SKIPPED (budget: ${l}s left)"
        echo "{\"config\": \"$c\", \"mode\": \"$mode\", \"status\": \"skipped: budget\"}" > "$dir/timing.json"
        return
    fi
    t0=$(date +%s)
    if [[ $mode == eager ]]; then
        timeout -k 10 "$limit" python3 "$HERE/run_recipe.py" "$c" "$dir" --steps "$STEPS" --layers "$LAYERS" \
            --eager --stock "${EXTRA[@]}" > "$dir/stdout.txt" 2> "$dir/torch_logs.txt"
    else
        TORCH_TRACE="$dir/trace" TORCH_LOGS="graph_breaks,recompiles" \
            timeout -k 10 "$limit" python3 "$HERE/run_recipe.py" "$c" "$dir" --steps "$STEPS" --layers "$LAYERS" \
            --scope "$SCOPE" "${EXTRA[@]}" > "$dir/stdout.txt" 2> "$dir/torch_logs.txt"
    fi
    rc=$?
    echo "$c $mode: exit $rc in $(( $(date +%s) - t0 ))s (limit ${limit}s); $(tail -1 "$dir/stdout.txt" 2>/dev/null)"
    [[ $rc == 0 ]] || tail -5 "$dir/torch_logs.txt" | cut -c1-300
}

for c in "${configs[@]}"; do
    run_one "$c" compiled
    run_one "$c" eager
done

echo "== pack ($(( $(date +%s) - START )) s so far)"
for t in "$D"/*/compiled/trace/*.log; do
    [[ -f $t ]] || continue
    mkdir -p "$(dirname "$t")/../raw"
    python3 "$PY/trim_trace.py" "$t" "$t.trim" && mv "$t" "$(dirname "$t")/../raw/" && mv "$t.trim" "$t"
done
tar -C "$D" --exclude='*/raw' --exclude='prep' -czf "$OUT/recipe-$TAG.tar.gz" .
tar -C "$D" -czf /tmp/recipe-raw.tar.gz $(cd "$D" && ls -d */compiled/raw 2>/dev/null)
if (( $(stat -c %s /tmp/recipe-raw.tar.gz) < 15000000 )); then mv /tmp/recipe-raw.tar.gz "$OUT/recipe-$TAG-raw.tar.gz"; fi
ls -la "$OUT"
echo "done in $(( $(date +%s) - START )) s"
