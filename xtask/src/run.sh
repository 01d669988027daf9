#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root: bash bundle/run.sh [tests|bench|probe|memlinear|memlinear-tests|all]
# Written by `cargo xtask gpu-bundle`. Results go to $OUT (the device tool's output folder).
set -uo pipefail
B="$(cd "$(dirname "$0")" && pwd)"
R="$(dirname "$B")"
OUT="${OUT:-$R/.device-out}"
mkdir -p "$OUT"
export REQUIRE_GPU=1 NF4_FIXTURES="$R/nf4/tests/fixtures" PYTHONUNBUFFERED=1
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
        "$t" > /tmp/one-test.log 2>&1
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
echo "run.sh: exit $status"
exit $status
