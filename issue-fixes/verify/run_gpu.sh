#!/usr/bin/env bash
# GPU verification of the flex-attention-dynamic and attention-refactor patch series against
# unsloth / unsloth_zoo 2026.10.9, on the device machine (torch 2.11, transformers 5.17, no
# network). From the repo root, after `python3 issue-fixes/verify/make_bundle.py` here:
#
#   run(command="bash issue-fixes/verify/run_gpu.sh", kind="nvidia-h100-x1", timeout_s=300,
#       carry=["target/dev-issue6/site.zip", "target/dev-issue6/patched"])
#
# Optional arguments name the jobs to run (default: all but flex-after-long, in parallel):
# flex-{before,after}-{causal,padded,packed}, flex-after-long (one packed row of 12000 tokens:
# the compiled mask builder), zoo-test-{patched,pinned}, unsloth-test-{patched,pinned},
# unsloth-test-patched-nogpu. SEQUENTIAL=1 runs them one after the other (clean timings).
# Everything lands in $OUT: results.json and results.md (summarize_gpu.py) and all.tar.gz
# (every job's JSON and log), refreshed as each job ends, so a call cut off at its time limit
# still returns what finished. Each job has JOB_TIMEOUT_S (235 s): with SEQUENTIAL=1 keep the
# jobs' sum inside the call's limit (about 60 s a flex job, 90 s a test job on an H100).
set -u
REPO=$(pwd)
B=$REPO/target/dev-issue6
V=$REPO/issue-fixes/verify
OUT=${OUT:-/tmp/verify-out}
JOBS=${JOB_TIMEOUT_S:-235}
W=/tmp/issue6
rm -rf "$W" && mkdir -p "$W/out" "$W/run"
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2} PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1

python3 -m zipfile -e "$B/site.zip" "$W/site-pinned" || exit 1
for slug in flex-attention-dynamic attention-refactor; do
    cp -r "$W/site-pinned" "$W/site-$slug" && cp -r "$B/patched/$slug/." "$W/site-$slug/" || exit 1
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$W/out/gpu.txt"
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" >> "$W/out/gpu.txt" 2>&1

mkdir -p "$OUT"
publish() {
    (
        flock 9
        python3 "$V/summarize_gpu.py" "$W/out" "$OUT/results.json" "$OUT/results.md"
        tar -czf "$OUT/all.tar.gz" -C "$W" out
    ) 9> "$W/publish.lock"
}

# job NAME SITE [ENV=VALUE ...] -- COMMAND...: runs in its own folder (unsloth writes
# unsloth_compiled_cache/ into the working directory), log and exit code in $W/out.
job() {
    local name=$1 site=$2
    shift 2
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    mkdir -p "$W/run/$name"
    (
        cd "$W/run/$name" && env PYTHONPATH="$site" "${envs[@]}" timeout "$JOBS" "$@" \
            > "$W/out/$name.log" 2>&1
        echo $? > "$W/out/$name.rc"
        publish
    ) &
    [ -z "${SEQUENTIAL:-}" ] || wait
}

FLEX="$W/site-flex-attention-dynamic"
ATTN="$W/site-attention-refactor"
ZOO_TEST=$FLEX/tests/test_flex_attention_dynamic_lengths.py
UNSLOTH_TEST=$ATTN/tests/utils/test_xformers_fa3_misdispatch_guard.py
PYTEST="python3 -m pytest -q -rA -p no:cacheprovider"
wanted() { [ $# -eq 0 ] || [[ " $* " == *" $NAME "* ]]; }
for mode in before after; do
    for layout in causal padded packed; do
        NAME=flex-$mode-$layout
        site=$W/site-pinned
        [ $mode = after ] && site=$FLEX
        wanted "$@" && job $NAME "$site" -- python3 "$V/flex-attention-dynamic/verify_flex.py" \
            --mode $mode --layout $layout --out "$W/out/$NAME.json"
    done
done
NAME=flex-after-long; [ $# -gt 0 ] && wanted "$@" && job $NAME "$FLEX" -- \
    python3 "$V/flex-attention-dynamic/verify_flex.py" --mode after --layout packed \
    --lengths 12000 --batch 1 --out "$W/out/$NAME.json"
NAME=zoo-test-patched; wanted "$@" && job $NAME "$FLEX" UNSLOTH_IS_PRESENT=1 -- $PYTEST "$ZOO_TEST"
NAME=zoo-test-pinned; wanted "$@" && job $NAME "$W/site-pinned" UNSLOTH_IS_PRESENT=1 -- $PYTEST "$ZOO_TEST"
NAME=unsloth-test-patched; wanted "$@" && job $NAME "$ATTN" -- $PYTEST "$UNSLOTH_TEST"
NAME=unsloth-test-pinned; wanted "$@" && job $NAME "$W/site-pinned" -- $PYTEST "$UNSLOTH_TEST"
NAME=unsloth-test-patched-nogpu
wanted "$@" && job $NAME "$ATTN" CUDA_VISIBLE_DEVICES= UNSLOTH_ALLOW_CPU=1 -- $PYTEST "$UNSLOTH_TEST"
wait
publish
cat "$OUT/results.md"
