"""Trim a TORCH_TRACE log to the records compile-audit reads, for committed fixtures.

Usage: python3 trim_trace.py IN.log OUT.log
Keeps, verbatim (payloads and their md5 intact): `str` interning, `dynamo_start`,
`dynamo_output_graph`, `compilation_metrics` (minus its bulky `dynamo_config` string,
which has no payload to checksum), `artifact`s named dynamo_graph_break_reason /
recompile_reasons, and `dynamo_guards`. Drops everything else (chromium events, tensor
descriptions, inductor code), which the auditor only counts as "other events".
"""
import json
import sys

KEEP = {"str", "dynamo_start", "dynamo_output_graph", "compilation_metrics", "dynamo_guards"}
KEEP_ARTIFACTS = {"dynamo_graph_break_reason", "recompile_reasons"}

out = []
keep = False
with open(sys.argv[1]) as f:
    for line in f:
        if line.startswith("\t"):
            if keep:
                out.append(line)
            continue
        keep = False
        i = line.find("] {")
        if i < 0:
            continue
        try:
            rec = json.loads(line[i + 2:])
        except json.JSONDecodeError:
            continue
        key = next((k for k in rec if k not in ("frame_id", "frame_compile_id", "attempt", "has_payload", "rank")), None)
        if key in KEEP or (key == "artifact" and rec["artifact"].get("name") in KEEP_ARTIFACTS):
            keep = True
            if key == "compilation_metrics":
                rec["compilation_metrics"].pop("dynamo_config", None)
                line = line[: i + 2] + json.dumps(rec) + "\n"
            out.append(line)
with open(sys.argv[2], "w") as f:
    f.writelines(out)
