#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root: bash bundle/run.sh [tests|bench|probe|memlinear|memlinear-tests|fsdp|fsdp-tests|fsdp-bench|fsdp-baselines|all]
# Written by `cargo xtask gpu-bundle`. Results go to $OUT (the device tool's output folder).
set -uo pipefail
B="$(cd "$(dirname "$0")" && pwd)"
R="$(dirname "$B")"
OUT="${OUT:-$R/.device-out}"
mkdir -p "$OUT"
export REQUIRE_GPU=1 NF4_FIXTURES="${NF4_FIXTURES:-$R/nf4/tests/fixtures}" PYTHONUNBUFFERED=1
export PYTHONPATH="$B/py${PYTHONPATH:+:$PYTHONPATH}"
what="${1:-all}"
status=0

if [[ $what == all || $what == probe ]]; then
    echo "== probe: GPU's approximate reciprocal (bitsandbytes' fast-math quantizer uses it)"
    python3 "$B/py/rcp_probe.py" "$OUT" || status=1
    echo "MUFU.RCP in bitsandbytes' kQuantizeBlockwise kernels (sm_90 SASS):"
    cuobjdump -sass -arch sm_90 "$B/py/bitsandbytes/libbitsandbytes_cuda130.so" 2>/dev/null \
        | awk '/Function : .*kQuantizeBlockwise/{f=1} /Function : /&&!/kQuantizeBlockwise/{f=0} f&&/MUFU.RCP/{c++} END{print c+0}'
fi

run_tests() {  # $1: glob of test executables
    for t in $1; do
        echo "-- $(basename "$t")"
        timeout -k 5 "${TEST_TIMEOUT:-900}" "$t" > /tmp/one-test.log 2>&1
        rc=$?
        cat /tmp/one-test.log >> "$OUT/tests.log"
        grep -E "^test |test result|panicked|SKIPPED" /tmp/one-test.log
        [[ $rc == 0 ]] || { echo "FAILED: $(basename "$t")"; status=1; }
    done
}
if [[ $what == all || $what == tests ]]; then
    echo "== GPU tests (REQUIRE_GPU=1)"
    run_tests "$B/tests/*"
fi
if [[ $what == memlinear-tests ]]; then
    echo "== memlinear GPU tests (REQUIRE_GPU=1)"
    run_tests "$B/tests/memlinear--*"
fi

if [[ $what == all || $what == bench ]]; then
    echo "== nf4 kernel sweep"
    "$B/bin/nf4-bench" gpu --json "$OUT/nf4-gpu-sweep.json" || status=1
    echo "== nf4: ours vs bitsandbytes vs Unsloth-style"
    python3 "$B/py/bench_dequant.py" "$B/lib/libnf4.so" "$OUT/nf4-gpu-vs-bnb.json" || status=1
    echo "== interop: our checkpoints loaded by bitsandbytes"
    "$B/bin/interop" /tmp/nf4-interop.safetensors && python3 "$B/py/interop_check.py" /tmp/nf4-interop.safetensors "$OUT/nf4-interop.json" || status=1
fi
if [[ $what == all || $what == memlinear ]]; then
    if [[ -f $B/lib/libmemlinear.so ]]; then
        echo "== memlinear: our CUDA implementation alone (modes x workspace budgets)"
        "$B/bin/memlinear-bench" gpu --json "$OUT/memlinear-gpu-sweep.json" || status=1
        echo "== memlinear: parity of the C ABI against torch references"
        python3 "$B/py/parity_lce.py" "$B/lib/libmemlinear.so" "$OUT/memlinear-gpu-parity.json" || status=1
        echo "== memlinear: ours vs torch eager vs Liger vs Cut Cross-Entropy"
        python3 "$B/py/bench_lce.py" "$B/lib/libmemlinear.so" "$OUT/memlinear-gpu-vs-baselines.json" || status=1
    elif [[ $what == memlinear ]]; then
        echo "memlinear: $B/lib/libmemlinear.so is missing (no memlinear crate when the bundle was built)"
        status=1
    else
        echo "== memlinear: skipped (no memlinear crate when the bundle was built)"
    fi
fi
# Unsloth and transformers+peft+bitsandbytes QLoRA on the Llama-3.2-1B shape (batch 4 x 2048,
# LoRA r16 on 7 projections): the peers of the fsdp benchmark. Not part of `all` (about 5
# minutes). Each mode is its own process under `timeout`; JSON in $OUT/fsdp/<impl>-<ckpt>.json,
# every mode's output in $OUT/fsdp/baselines.log. Knobs: FSDP_BASELINE_MODES ("impl:ckpt[:timeout_s]
# ..."), FSDP_BASELINE_STEPS, FSDP_BASELINE_WARMUP, FSDP_BASELINE_TIMEOUT (default seconds per mode), and for
# smoke tests FSDP_BASELINE_SHAPE (tiny) and FSDP_BASELINE_ARGS (e.g. "--batch 2 --seq 64", or "--loop sft"
# to run TRL's SFTTrainer instead of the plain loop), FSDP_BASELINE_TAG (appended to the JSON names).
run_fsdp_baselines() {
    local zip="$B/py/fsdp-baselines-site.zip" site=/tmp/fsdp-baselines-site dir="$OUT/fsdp"
    local shape="${FSDP_BASELINE_SHAPE:-llama-3.2-1b}" extra="${FSDP_BASELINE_ARGS:-}" tag="${FSDP_BASELINE_TAG:-}"
    local model="/tmp/fsdp-baselines/$shape-random" log="$OUT/fsdp/baselines.log"
    local modes="${FSDP_BASELINE_MODES:-unsloth:none unsloth:unsloth-offload hf:on}"
    local steps="${FSDP_BASELINE_STEPS:-20}" warmup="${FSDP_BASELINE_WARMUP:-5}" limit="${FSDP_BASELINE_TIMEOUT:-150}"
    echo "== fsdp-baselines: Unsloth / HF+peft+bnb QLoRA, shape $shape ${extra:-(batch 4 x 2048)}, modes: $modes"
    if [[ ! -f $zip || ! -f $B/py/bench_baselines.py ]]; then
        echo "fsdp-baselines: $zip or bench_baselines.py missing (run cargo xtask gpu-bundle)"
        status=1
        return
    fi
    mkdir -p "$dir"
    rm -rf "$site" && python3 -m zipfile -e "$zip" "$site" || { echo "fsdp-baselines: cannot unpack $zip"; status=1; return; }
    # The site first (Unsloth, TRL, ...), then bundle/py (bitsandbytes, Cut Cross-Entropy).
    local pp="$site:$PYTHONPATH"
    # Unsloth writes its compiled modules (unsloth_compiled_cache/) into the working directory.
    mkdir -p /tmp/fsdp-baselines
    # One GPU. Named, because where NVIDIA_VISIBLE_DEVICES pins a card and CUDA_VISIBLE_DEVICES
    # is unset, Unsloth limits Inductor to one compile thread (slow warm-up, same steps).
    export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
    echo "-- model folder $model"
    echo "==== build" >> "$log"
    if ! PYTHONPATH="$pp" timeout -k 10 300 python3 "$B/py/bench_baselines.py" --build-only --model-dir "$model" \
            --shape "$shape" >> "$log" 2>&1; then
        echo "fsdp-baselines: building the model folder failed:"
        tail -20 "$log"
        status=1
        return
    fi
    awk '$0=="==== build"{f=1;next} /^==== /{f=0} f&&/^\[bench_baselines/' "$log"
    local m impl ckpt lim rc
    for m in $modes; do
        IFS=: read -r impl ckpt lim <<< "$m"
        lim="${lim:-$limit}"
        echo "-- $impl, checkpointing $ckpt ($warmup warm-up + $steps measured steps, timeout $lim s)"
        echo "==== $impl $ckpt" >> "$log"
        # FSDP_BASELINE_DUMP: the first Unsloth run without checkpointing also writes its batches
        # and initial adapter there (the loss-curve comparison of `run.sh fsdp`).
        local dump=()
        if [[ -n ${FSDP_BASELINE_DUMP:-} && $impl == unsloth && $ckpt == none && ! -f $FSDP_BASELINE_DUMP/batches.json ]]; then
            dump=(--dump "$FSDP_BASELINE_DUMP")
        fi
        (cd /tmp/fsdp-baselines && PYTHONPATH="$pp" timeout -k 10 "$lim" python3 "$B/py/bench_baselines.py" \
            --impl "$impl" --ckpt "$ckpt" --steps "$steps" --warmup "$warmup" --model-dir "$model" \
            --shape "$shape" --json "$dir/$impl-$ckpt$tag.json" "${dump[@]}" $extra) >> "$log" 2>&1
        rc=$?
        awk -v m="==== $impl $ckpt" '$0==m{f=1;next} /^==== /{f=0} f&&/^\[bench_baselines/' "$log"
        if [[ $rc != 0 ]]; then
            echo "FAILED ($rc): $impl $ckpt; the end of its output:"
            awk -v m="==== $impl $ckpt" '$0==m{f=1;next} /^==== /{f=0} f' "$log" | tail -25
            status=1
        fi
    done
    echo "-- summary (card, tokens/s, median step, peak allocated/reserved, MFU vs bf16 GEMM in the same process)"
    # Only the modes that ran (FSDP_BASELINE_MODES may leave some out).
    local ran=()
    for f in "$dir"/{unsloth,hf}-*.json; do [[ -f $f ]] && ran+=("$f"); done
    if (( ${#ran[@]} )); then python3 "$B/py/bench_baselines.py" --summary "${ran[@]}" || status=1; fi
}
if [[ $what == fsdp-baselines ]]; then
    run_fsdp_baselines
fi
# fsdp: the GPU tests of the training runtime, then `qlora bench` (Llama-3.2-1B shape,
# batch 4 x 2048, LoRA r16 on 7 projections) in each checkpointing mode, then (part `fsdp`)
# the Unsloth / HF baselines in the same call. Knobs: FSDP_MODES, FSDP_STEPS, FSDP_WARMUP.
if [[ $what == fsdp || $what == fsdp-tests ]]; then
    echo "== fsdp GPU tests (REQUIRE_GPU=1)"
    run_tests "$B/tests/fsdp--*"
fi
if [[ $what == fsdp || $what == fsdp-bench ]]; then
    mkdir -p "$OUT/fsdp"
    echo "== fsdp: qlora bench (ours), checkpointing ${FSDP_MODES:-off,on,offload}"
    timeout -k 10 "${FSDP_BENCH_TIMEOUT:-300}" "$B/bin/qlora" bench --checkpointing "${FSDP_MODES:-off,on,offload}" --phases \
        --steps "${FSDP_STEPS:-10}" --warmup "${FSDP_WARMUP:-3}" --json "$OUT/fsdp/ours.json" 2> "$OUT/fsdp/ours.log" || {
        echo "FAILED: qlora bench; the end of its log:"; tail -30 "$OUT/fsdp/ours.log"; status=1; }
fi
if [[ $what == fsdp ]]; then
    export FSDP_BASELINE_DUMP=/tmp/fsdp-baselines/dump
    rm -rf "$FSDP_BASELINE_DUMP"
    run_fsdp_baselines
    # The loss curve: ours from Unsloth's model folder, initial adapter and batches, with its
    # optimizer settings, step by step (compared in bench/RESULTS.md).
    if [[ -f $FSDP_BASELINE_DUMP/batches.json ]]; then
        echo "== fsdp: qlora on Unsloth's model, adapter and batches (loss curve)"
        timeout -k 10 "${FSDP_BENCH_TIMEOUT:-300}" "$B/bin/qlora" bench --model /tmp/fsdp-baselines/llama-3.2-1b-random \
            --adapter "$FSDP_BASELINE_DUMP" --batches "$FSDP_BASELINE_DUMP/batches.json" --checkpointing off \
            --warmup "${FSDP_BASELINE_WARMUP:-5}" --steps "${FSDP_BASELINE_STEPS:-20}" --json "$OUT/fsdp/ours-parity.json" \
            2> "$OUT/fsdp/ours-parity.log" || { echo "FAILED: qlora parity run:"; tail -20 "$OUT/fsdp/ours-parity.log"; status=1; }
        grep -E "step +[0-9]+:" "$OUT/fsdp/ours-parity.log" | head -3
    else
        echo "fsdp: no dump from the Unsloth run: loss-curve comparison skipped"; status=1
    fi
fi
echo "run.sh: exit $status"
exit $status
