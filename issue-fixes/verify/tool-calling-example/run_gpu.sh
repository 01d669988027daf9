#!/usr/bin/env bash
# Runs the tool-calling example on the GPU machine, from the repository root:
#
#   python3 issue-fixes/verify/tool-calling-example/bundle.py        # here, first
#   bash issue-fixes/verify/tool-calling-example/run_gpu.sh          # there, carrying target/dev-tools/tool-calling
#
# Installs the carried Unsloth stack into /tmp/tc-site, runs the example's CPU tests, then the
# example itself with its defaults (tiny random Llama built on the spot, offline), and leaves
# versions.txt, pytest.log, train.log and metrics.json in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/tc-results}
mkdir -p "$OUT"
BUNDLE=$PWD/target/dev-tools/tool-calling
SITE=/tmp/tc-site
rm -rf "$SITE" && mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$BUNDLE"/wheels/*.whl || exit 1
cp -r "$BUNDLE"/site/. "$SITE"/
export PYTHONPATH=$SITE HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 - <<'EOF'
import importlib.metadata as m
for p in ["torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo", "triton", "tokenizers"]:
    try:
        print(p, m.version(p))
    except Exception as e:
        print(p, "MISSING", e)
EOF
} 2>&1 | tee "$OUT/versions.txt"

HERE=$PWD/issue-fixes/verify/tool-calling-example
cd "$BUNDLE/upstream"
python3 -m pytest -q -p no:cacheprovider tests/python/test_tool_calling_example.py 2>&1 | tee "$OUT/pytest.log"
start=$(date +%s)
# TRAIN_SECONDS (default 150) caps training so the evaluation after it fits the call's limit.
python3 "$HERE/run_example.py" examples/tool_calling/train_tool_calling.py "${TRAIN_SECONDS:-150}" \
    --output-dir /tmp/tc-out "$@" 2>&1 | tee "$OUT/train.log"
status=${PIPESTATUS[0]}
echo "train_tool_calling.py exit $status after $(( $(date +%s) - start )) s" | tee -a "$OUT/train.log"
cp /tmp/tc-out/metrics.json "$OUT/" 2>/dev/null
exit "$status"
