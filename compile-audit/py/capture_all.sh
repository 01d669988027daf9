#!/usr/bin/env bash
# On the GPU machine, from the repo root: bash compile-audit/py/capture_all.sh
# (PYTHONPATH must hold bitsandbytes, e.g. bundle/py). Packs traces into $OUT/traces.tar.gz.
set -u
D=/tmp/ca-traces
rm -rf "$D" && mkdir -p "$D"
for s in clean breaks qlora_gc; do
    mkdir -p "$D/$s"
    TORCH_TRACE="$D/$s" TORCH_LOGS="graph_breaks,recompiles" python3 "$(dirname "$0")/capture_traces.py" "$D" "$s" \
        > "$D/${s}_stdout.txt" 2> "$D/${s}_torch_logs.txt"
    echo "$s: exit $?, $(du -sh "$D/$s" | cut -f1), $(ls "$D/$s" | wc -l) file(s)"
    tail -2 "$D/${s}_stdout.txt"
done
tar -C "$D" -czf "${OUT:-/tmp}/traces.tar.gz" .
ls -la "${OUT:-/tmp}/traces.tar.gz"
