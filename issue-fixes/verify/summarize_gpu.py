"""Summarizes run_gpu.sh's job folder: python3 summarize_gpu.py OUT_DIR RESULTS.json RESULTS.md"""

import json
import pathlib
import re
import sys


def pytest_line(log):
    lines = [x for x in log.splitlines() if re.search(r"\d+ (passed|failed|error)", x)]
    return lines[-1].strip("= ") if lines else (log.strip().splitlines() or ["(no output)"])[-1]


def main():
    src, out_json, out_md = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    res = {"gpu": (src / "gpu.txt").read_text().strip() if (src / "gpu.txt").exists() else None}
    res["flex"], res["tests"] = {}, {}
    for f in sorted(src.glob("*.rc")):
        name = f.stem
        rc = f.read_text().strip()
        log = (src / f"{name}.log").read_text(errors = "replace")
        if name.startswith("flex-"):
            path = src / f"{name}.json"
            data = json.loads(path.read_text()) if path.exists() else {}
            res["flex"][name] = {
                "rc": rc,
                "summary": data.get("summary"),
                "versions": data.get("versions"),
                "error": data.get("error"),
                "calls": [
                    {
                        "qlen": c["qlen"],
                        "wall_s": round(c["call_s"] + c["mask_s"], 3),
                        "compiles": [
                            f"{m['co_name']} {m['compile_id']}"
                            + (" <- " + m["recompile_reason"][:160] if m["recompile_reason"] else "")
                            for m in c["compiles"]
                            if m["co_name"]
                        ],
                        "rel_err_flex_vs_sdpa_bf16": {
                            k: [round(v["flex"], 5), round(v["sdpa_bf16"], 5)]
                            for k, v in c["errors"].items()
                        },
                        "ok": c["within_bf16_tolerance"] and c["finite"],
                    }
                    for c in data.get("calls", [])
                ],
                "decode": data.get("decode"),
                "log_tail": log[-1500:] if rc != "0" else None,
            }
        else:
            res["tests"][name] = {"rc": rc, "result": pytest_line(log), "log_tail": log[-3000:]}
    pathlib.Path(out_json).write_text(json.dumps(res, indent = 1, default = str))

    md = [
        f"GPU: {res['gpu']}",
        "",
        "| flex job | rc | calls | flex compiles | mask-builder compiles | recompiles "
        "| within bf16 tol. | wall s (all calls) | wall s (calls 3+) |",
        "|---" * 9 + "|",
    ]
    for name, r in res["flex"].items():
        s = r["summary"] or {}
        builder = sum(
            1 for c in r["calls"] for m in c["compiles"] if m.startswith("create_block_mask")
        )
        cells = [
            name, r["rc"], s.get("calls"), s.get("flex_frames_compiled"), builder,
            s.get("recompiles"), s.get("all_within_bf16_tolerance"),
            f"{s.get('wall_s_all_calls', 0):.1f}", f"{s.get('wall_s_after_first_two', 0):.1f}",
        ]
        md.append("| " + " | ".join(str(c) for c in cells) + " |")
    md += ["", "| test job | rc | result |", "|---|---|---|"]
    for name, r in res["tests"].items():
        md.append(f"| {name} | {r['rc']} | {r['result']} |")
    pathlib.Path(out_md).write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
