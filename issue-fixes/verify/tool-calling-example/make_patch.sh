#!/usr/bin/env bash
# Writes issue-fixes/patches/tool-calling-example/0001-*.patch from a working copy of the files
# it adds (default target/dev-tools/work, laid out like the upstream repository):
#
#   bash issue-fixes/verify/tool-calling-example/make_patch.sh [WORKDIR]
#
# `git diff --no-index` only reads: it writes the diff, nothing in any repository changes.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
WORK=${1:-$ROOT/target/dev-tools/work}
PATCH=$ROOT/issue-fixes/patches/tool-calling-example/0001-examples-tool-calling-fine-tuning.patch
FILES=(examples/tool_calling/train_tool_calling.py tests/python/test_tool_calling_example.py)
{
    cat "$ROOT/issue-fixes/verify/tool-calling-example/commit-message.txt"
    echo "---"
    cd "$WORK"
    for f in "${FILES[@]}"; do
        git diff --no-index --no-color --no-ext-diff /dev/null "$f" || [ $? -eq 1 ]
    done
} > "$PATCH"
echo "wrote $PATCH ($(wc -l < "$PATCH") lines)"
