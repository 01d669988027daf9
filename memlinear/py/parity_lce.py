"""memlinear on the GPU: correctness of libmemlinear.so's C ABI against PyTorch references.

Usage: python3 parity_lce.py LIBMEMLINEAR OUT_JSON
       python3 parity_lce.py --selftest OUT_JSON   (no GPU, no torch: summary and JSON logic)

LIBMEMLINEAR: libmemlinear.so, or a `.py` stand-in module (see bench_lce.py).

Checks (every number goes to OUT_JSON; exit status 1 if any check fails):
 (i)   odd shapes x {float32, bfloat16 inputs} x chunk sizes {1, 7, 64, all tokens} x options
       {none, label smoothing 0.1, z-loss 1e-4, softcap 30, logit scale 0.5, all four} x dW dtype
       {float32, bfloat16 (bf16 inputs only)}, about 10% of targets = -100: loss, dx, dW against
       autograd through an unchunked float64 reference,
           z = logit_scale * x @ W^T;  z = softcap * tanh(z / softcap) (when on)
           loss = [F.cross_entropy(z, t, ignore_index=-100, label_smoothing=ls, reduction='sum')
                   + z_loss * sum over non-ignored of logsumexp(z)^2] / N,   N = non-ignored tokens
       Tolerance: float32 inputs (TF32 off) 1e-5, bfloat16 inputs 1e-2; relative error for the
       loss, relative L2 norm for dx and dW (max-abs error / max-abs of the reference is
       recorded too). Outputs are filled with NaN before every call (never tested on zeros).
       Also: dx only (dW NULL), dW only (dx NULL), accumulate=1 twice from zero = 2x the
       gradient, accumulate=0 then 1 over a NaN-poisoned dW = 2x.
 (iii) 50 Adam steps (lr 1e-2) of a head T=512, H=256, V=5003: bf16 x fixed, W trainable with an
       fp32 master copy cast to bf16 each step; memlinear vs the unchunked reference (float32
       logits from the same bf16 operands, gradient taken at the bf16 weights), each from the same
       init. x holds 128 distinct rows, each 4 times with different targets, so the loss floor is
       ln 4 and the per-step losses stay comparable (1e-2 relative) all the way; the loss must
       fall below half its first value.
 (ii)  bad inputs (run last: a library that crashes the context cannot spoil the others): a
       target = vocab and a target = -5 (not ignore_index) return nonzero with a message naming
       the token index; NaN in x and +inf in W return nonzero; too small a workspace,
       chunk_tokens = 0, an unknown dtype, a dW dtype that is neither float32 nor the input
       dtype return nonzero; memlinear_workspace_bytes with tokens = -1 returns -1; a good call
       afterwards still succeeds with the right loss.
"""
import json
import math
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lce import DTYPE_CODE, IGNORE_INDEX, MemLinear  # noqa: E402

SHAPES = [(1000, 257, 5003), (37, 128, 32000), (4096, 1024, 50257)]
CHUNKS = [1, 7, 64, None]  # None: all tokens
TOL = {"float32": 1e-5, "bfloat16": 1e-2}
OPTIONS = {
    "none": {},
    "label_smoothing=0.1": {"label_smoothing": 0.1},
    "z_loss=1e-4": {"z_loss": 1e-4},
    "softcap=30": {"softcap": 30.0},
    "logit_scale=0.5": {"logit_scale": 0.5},
    "all four": {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0, "logit_scale": 0.5},
}
# Logit standard deviation of the inputs: about 2 (a realistic spread); 10 where softcap is on, so
# tanh bends the logits (|z| reaches ~40 before the cap) without saturating them.
LOGIT_STD = 2.0
LOGIT_STD_SOFTCAP = 10.0
TRAIN = {"T": 512, "H": 256, "V": 5003, "distinct_rows": 128, "steps": 50, "lr": 1e-2, "chunk": 64, "rtol": 1e-2}


# ---------------------------------------------------------------------------------------------
# Summary and JSON: plain Python (no torch), so --selftest checks them anywhere.


def summarize(result):
    """Fills result['failures'], counts and per-dtype worst errors; returns the exit status."""
    failures = []
    for c in result["checks"]:
        if not c["pass"]:
            failures.append(f"{c['name']}: " + (c.get("error") or f"loss {c.get('loss_rel')}, dx {c.get('dx_rel')}, "
                                                                   f"dW {c.get('dw_rel')} > {c.get('tol')}"))
    for b in result["bad_inputs"]:
        if not b["pass"]:
            failures.append(f"bad input {b['name']}: {b.get('why', '')}")
    tr = result.get("training")
    if tr is not None and not tr.get("pass"):
        failures.append(f"training loop: {tr.get('why', '')}")
    worst = {}
    for c in result["checks"]:
        w = worst.setdefault(c.get("dtype", "?"), {"loss_rel": 0.0, "dx_rel": 0.0, "dw_rel": 0.0, "tol": c.get("tol")})
        for k in ("loss_rel", "dx_rel", "dw_rel"):
            v = c.get(k)
            if v is not None:
                w[k] = max(w[k], v) if not math.isnan(v) else float("nan")
    n_all = len(result["checks"]) + len(result["bad_inputs"]) + (1 if tr is not None else 0)
    result["summary"] = {"checks": n_all, "failed": len(failures), "passed": n_all - len(failures), "worst": worst}
    result["failures"] = failures
    print(f"\nparity: {n_all - len(failures)} passed, {len(failures)} failed")
    for dt, w in worst.items():
        print(f"  worst {dt}: loss {w['loss_rel']:.3g}, dx {w['dx_rel']:.3g}, dW {w['dw_rel']:.3g} (tolerance {w['tol']})")
    if tr is not None:
        print(f"  training loop: {'ok' if tr.get('pass') else 'FAILED'}; {tr.get('why', '')}")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


def write(result, path):
    status = summarize(result)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, allow_nan=True)
    print(f"wrote {path}")
    return status


def selftest(path):
    result = {
        "device": "selftest (no GPU)",
        "checks": [
            {"name": "a", "dtype": "float32", "tol": 1e-5, "loss_rel": 1e-7, "dx_rel": 2e-7, "dw_rel": 3e-7, "pass": True},
            {"name": "b", "dtype": "bfloat16", "tol": 1e-2, "loss_rel": 1e-4, "dx_rel": 0.02, "dw_rel": 3e-3, "pass": False},
            {"name": "c", "dtype": "bfloat16", "tol": 1e-2, "error": "RuntimeError: boom", "pass": False},
        ],
        "bad_inputs": [{"name": "target = vocab", "pass": True}, {"name": "nan", "pass": False, "why": "returned 0"}],
        "training": {"pass": True, "why": "ok"},
    }
    status = write(result, path)
    with open(path) as f:
        back = json.load(f)
    assert status == 1 and back["summary"]["failed"] == 3 and back["summary"]["passed"] == 3, back["summary"]
    assert back["summary"]["worst"]["bfloat16"]["dx_rel"] == 0.02
    print("selftest: ok")
    return 0


# ---------------------------------------------------------------------------------------------
# The GPU part.


def gpu_main(lib_path, out_path):
    import torch
    import torch.nn.functional as F

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "library": lib_path,
              "tolerances": TOL, "reference": "autograd through unchunked float64 logits (see parity_lce.py's docstring)",
              "checks": [], "bad_inputs": [], "training": None}
    lib = MemLinear(lib_path)  # a library that does not load fails the run here, loudly
    TORCH_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}

    def stream():
        return torch.cuda.current_stream().cuda_stream

    def rel_l2(a, ref):
        a, ref = a.double(), ref.double()
        return ((a - ref).norm() / ref.norm()).item()

    def rel_max(a, ref):
        a, ref = a.double(), ref.double()
        return ((a - ref).abs().max() / ref.abs().max()).item()

    def make_inputs(T, H, V, dtype, logit_std, seed):
        g = torch.Generator(device=dev).manual_seed(seed)
        x = torch.randn(T, H, device=dev, generator=g)
        w = torch.randn(V, H, device=dev, generator=g) * (logit_std / math.sqrt(H))
        t = torch.randint(0, V, (T,), device=dev, generator=g)
        t[torch.rand(T, device=dev, generator=g) < 0.1] = IGNORE_INDEX
        t[0] = IGNORE_INDEX  # at least one ignored token in every shape, and the first chunk
        return x.to(dtype).contiguous(), w.to(dtype).contiguous(), t

    def reference(x, w, t, opts):
        """Loss, dx, dW in float64 from autograd on the unchunked logits."""
        xd = x.double().requires_grad_()
        wd = w.double().requires_grad_()
        z = (xd @ wd.T) * opts.get("logit_scale", 1.0)
        cap = opts.get("softcap", 0.0)
        if cap:
            z = cap * torch.tanh(z / cap)
        valid = t != IGNORE_INDEX
        n = int(valid.sum().item())
        loss = F.cross_entropy(z, t, ignore_index=IGNORE_INDEX, label_smoothing=opts.get("label_smoothing", 0.0),
                               reduction="sum")
        zl = opts.get("z_loss", 0.0)
        if zl:
            loss = loss + zl * (torch.logsumexp(z, dim=-1)[valid] ** 2).sum()
        loss = loss / n
        loss.backward()
        out = (loss.item(), xd.grad.detach(), wd.grad.detach(), n)
        del xd, wd, z, loss
        return out

    def call(x, w, t, opts, n, chunk, dx, dw, dw_name, accumulate=0, ws_bytes=None, dtype_code=None):
        """One memlinear_cross_entropy; returns (rc, message, loss)."""
        T, H = x.shape
        V = w.shape[0]
        code = DTYPE_CODE[str(x.dtype).replace("torch.", "")] if dtype_code is None else dtype_code
        dw_code = DTYPE_CODE[dw_name] if dw_name else code
        need = lib.workspace_bytes(T, H, V, code, chunk, dw is not None, dw_code)
        if ws_bytes is None:
            if need < 0:
                return -1, f"memlinear_workspace_bytes returned {need}: {lib.last_error()}", None
            ws_bytes = need
        ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=dev)
        loss = torch.full((1,), float("nan"), device=dev)
        rc, msg = lib.cross_entropy(
            x.data_ptr(), w.data_ptr(), t.data_ptr(), T, H, V, code, loss.data_ptr(),
            dx.data_ptr() if dx is not None else None, dw.data_ptr() if dw is not None else None, dw_code, chunk,
            ws.data_ptr(), ws_bytes, stream(), label_smoothing=opts.get("label_smoothing", 0.0),
            z_loss=opts.get("z_loss", 0.0), softcap=opts.get("softcap", 0.0), logit_scale=opts.get("logit_scale", 1.0),
            normalizer=n, accumulate=accumulate)
        torch.cuda.synchronize()
        return rc, msg, loss.item()

    def record(name, **kw):
        c = {"name": name}
        c.update(kw)
        result["checks"].append(c)
        def e(k):
            return "-" if c.get(k) is None else f"{c[k]:.2e}"
        detail = c["error"].splitlines()[0] if c.get("error") else f"loss {e('loss_rel')}  dx {e('dx_rel')}  dW {e('dw_rel')}"
        print(f"{'ok  ' if c['pass'] else 'FAIL'} {name}: {detail}")

    def compare(name, meta, ref, tol, rc, msg, loss, dx=None, dw=None, scale=1.0):
        ref_loss, ref_dx, ref_dw, _ = ref
        c = dict(meta, tol=tol, loss=loss, loss_ref=ref_loss)
        if rc != 0:
            record(name, **c, error=f"returned {rc}: {msg}", **{"pass": False})
            return
        c["loss_rel"] = abs(loss - ref_loss) / abs(ref_loss) if loss is not None else float("nan")
        ok = c["loss_rel"] <= tol
        if dx is not None:
            c["dx_rel"], c["dx_max_rel"] = rel_l2(dx, ref_dx * scale), rel_max(dx, ref_dx * scale)
            ok = ok and c["dx_rel"] <= tol
        if dw is not None:
            c["dw_rel"], c["dw_max_rel"] = rel_l2(dw, ref_dw * scale), rel_max(dw, ref_dw * scale)
            ok = ok and c["dw_rel"] <= tol
        record(name, **c, **{"pass": bool(ok)})  # NaN compares False: a NaN anywhere fails

    def guarded(name, meta, fn):
        try:
            fn()
        except Exception as e:
            record(name, **meta, **{"pass": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})

    # (i) parity ---------------------------------------------------------------------------------
    seed = 0
    for (T, H, V) in SHAPES:
        for dt_name in ("float32", "bfloat16"):
            dtype = TORCH_DTYPE[dt_name]
            tol = TOL[dt_name]
            for opt_name, opts in OPTIONS.items():
                seed += 1
                std = LOGIT_STD_SOFTCAP if "softcap" in opts else LOGIT_STD
                x, w, t = make_inputs(T, H, V, dtype, std, seed)
                ref = reference(x, w, t, opts)
                n = ref[3]
                dw_names = ["float32"] if dt_name == "float32" else ["float32", "bfloat16"]
                for chunk in CHUNKS:
                    ch = T if chunk is None else chunk
                    for dw_name in dw_names:
                        name = f"{T}x{H}x{V} {dt_name} {opt_name} chunk {ch} dW {dw_name}"
                        meta = dict(kind="parity", T=T, H=H, V=V, dtype=dt_name, options=opt_name, chunk=ch, dw_dtype=dw_name)

                        def one():
                            dx = torch.full_like(x, float("nan"))
                            dw = torch.full((V, H), float("nan"), device=dev, dtype=TORCH_DTYPE[dw_name])
                            rc, msg, loss = call(x, w, t, opts, n, ch, dx, dw, dw_name)
                            compare(name, meta, ref, tol, rc, msg, loss, dx, dw)
                        guarded(name, meta, one)
                if opt_name == "none":
                    # Partial outputs and accumulation, at a chunk that leaves a tail.
                    ch = 7
                    base = dict(kind="outputs", T=T, H=H, V=V, dtype=dt_name, options=opt_name, chunk=ch)

                    def dx_only():
                        dx = torch.full_like(x, float("nan"))
                        rc, msg, loss = call(x, w, t, opts, n, ch, dx, None, None)
                        compare(f"{T}x{H}x{V} {dt_name} dx only (dW NULL)", dict(base, dw_dtype=None), ref, tol, rc, msg, loss, dx=dx)
                    guarded(f"{T}x{H}x{V} {dt_name} dx only (dW NULL)", base, dx_only)
                    for dw_name in dw_names:
                        meta = dict(base, dw_dtype=dw_name)

                        def dw_only():
                            dw = torch.full((V, H), float("nan"), device=dev, dtype=TORCH_DTYPE[dw_name])
                            rc, msg, loss = call(x, w, t, opts, n, ch, None, dw, dw_name)
                            compare(f"{T}x{H}x{V} {dt_name} dW {dw_name} only (dx NULL)", meta, ref, tol, rc, msg, loss, dw=dw)
                        guarded(f"{T}x{H}x{V} {dt_name} dW {dw_name} only (dx NULL)", meta, dw_only)

                        def acc_twice():
                            dw = torch.zeros((V, H), device=dev, dtype=TORCH_DTYPE[dw_name])
                            dx = torch.full_like(x, float("nan"))
                            rc, msg, loss = call(x, w, t, opts, n, ch, dx, dw, dw_name, accumulate=1)
                            if rc == 0:
                                rc, msg, loss = call(x, w, t, opts, n, ch, dx, dw, dw_name, accumulate=1)
                            compare(f"{T}x{H}x{V} {dt_name} dW {dw_name} accumulate=1 twice from 0 = 2x",
                                    meta, (ref[0], ref[1], ref[2], n), tol, rc, msg, loss, dw=dw, scale=2.0)
                        guarded(f"{T}x{H}x{V} {dt_name} dW {dw_name} accumulate=1 twice", meta, acc_twice)

                        def acc_over_poison():
                            dw = torch.full((V, H), float("nan"), device=dev, dtype=TORCH_DTYPE[dw_name])
                            dx = torch.full_like(x, float("nan"))
                            rc, msg, loss = call(x, w, t, opts, n, ch, dx, dw, dw_name, accumulate=0)
                            if rc == 0:
                                rc, msg, loss = call(x, w, t, opts, n, ch, dx, dw, dw_name, accumulate=1)
                            compare(f"{T}x{H}x{V} {dt_name} dW {dw_name} accumulate=0 over NaN then 1 = 2x",
                                    meta, ref, tol, rc, msg, loss, dw=dw, scale=2.0)
                        guarded(f"{T}x{H}x{V} {dt_name} dW {dw_name} accumulate=0 then 1", meta, acc_over_poison)
                del x, w, t, ref
                torch.cuda.empty_cache()

    # (iii) training loop ---------------------------------------------------------------------------
    try:
        result["training"] = training(torch, F, lib, dev, stream)
    except Exception as e:
        result["training"] = {"pass": False, "why": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    print(f"training loop: {result['training'].get('why')}")

    # (ii) bad inputs -----------------------------------------------------------------------------
    try:
        bad_inputs(torch, lib, dev, call, result["bad_inputs"])
    except Exception as e:
        result["bad_inputs"].append({"name": "bad-input checks", "pass": False,
                                     "why": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})
    return write(result, out_path)


def training(torch, F, lib, dev, stream):
    T, H, V, distinct = TRAIN["T"], TRAIN["H"], TRAIN["V"], TRAIN["distinct_rows"]
    g = torch.Generator(device=dev).manual_seed(77)
    x = torch.randn(distinct, H, device=dev, generator=g).repeat_interleave(T // distinct, 0).to(torch.bfloat16).contiguous()
    t = torch.randint(0, V, (T,), device=dev, generator=g)
    w0 = torch.randn(V, H, device=dev, generator=g) / math.sqrt(H)
    bf16 = DTYPE_CODE["bfloat16"]
    ours_p = torch.nn.Parameter(w0.clone())
    ref_p = torch.nn.Parameter(w0.clone())
    ours_opt = torch.optim.Adam([ours_p], lr=TRAIN["lr"])
    ref_opt = torch.optim.Adam([ref_p], lr=TRAIN["lr"])
    chunk = TRAIN["chunk"]
    ws_bytes = lib.workspace_bytes(T, H, V, bf16, chunk, True, DTYPE_CODE["float32"])
    if ws_bytes < 0:
        return {"pass": False, "why": f"memlinear_workspace_bytes returned {ws_bytes}: {lib.last_error()}"}
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=dev)
    loss_buf = torch.empty(1, device=dev)
    ours, ref = [], []
    for step in range(TRAIN["steps"]):
        wb = ours_p.detach().to(torch.bfloat16).contiguous()
        dw = torch.full((V, H), float("nan"), device=dev)
        loss_buf.fill_(float("nan"))
        rc, msg = lib.cross_entropy(x.data_ptr(), wb.data_ptr(), t.data_ptr(), T, H, V, bf16, loss_buf.data_ptr(), None,
                                    dw.data_ptr(), DTYPE_CODE["float32"], chunk, ws.data_ptr(), ws_bytes, stream(),
                                    normalizer=T)
        if rc != 0:
            return {"pass": False, "why": f"step {step}: returned {rc}: {msg}", "ours": ours, "reference": ref}
        ours.append(loss_buf.item())
        ours_p.grad = dw
        ours_opt.step()

        wr = ref_p.detach().to(torch.bfloat16).float().requires_grad_()
        loss = F.cross_entropy(x.float() @ wr.T, t)
        loss.backward()
        ref.append(loss.item())
        ref_p.grad = wr.grad
        ref_opt.step()
    rel = [abs(a - b) / abs(b) for a, b in zip(ours, ref)]
    worst = max(rel)
    falls = ours[-1] < 0.5 * ours[0]
    ok = worst <= TRAIN["rtol"] and falls and all(math.isfinite(v) for v in ours)
    why = (f"worst per-step relative difference {worst:.2e} (<= {TRAIN['rtol']}), loss {ours[0]:.4f} -> {ours[-1]:.4f} "
           f"(reference {ref[0]:.4f} -> {ref[-1]:.4f}; must fall below half; floor ln 4 = {math.log(4):.4f})")
    return {"pass": bool(ok), "why": why, "setup": TRAIN, "ours": ours, "reference": ref, "rel": rel, "worst_rel": worst,
            "loss_falls": falls}


def bad_inputs(torch, lib, dev, call, out):
    T, H, V = 1000, 257, 5003
    g = torch.Generator(device=dev).manual_seed(99)
    x = torch.randn(T, H, device=dev, generator=g).to(torch.bfloat16)
    w = (torch.randn(V, H, device=dev, generator=g) / math.sqrt(H)).to(torch.bfloat16)
    t = torch.randint(0, V, (T,), device=dev, generator=g)
    n = T
    dx = torch.empty_like(x)
    dw = torch.empty(V, H, device=dev)

    def expect_error(name, rc, msg, must_name=None):
        ok = rc != 0 and (must_name is None or must_name in msg)
        why = f"returned {rc}, message: {msg!r}" + (f" (must name token {must_name})" if must_name else "")
        out.append({"name": name, "pass": bool(ok), "rc": rc, "message": msg, "why": why})
        print(f"{'ok  ' if ok else 'FAIL'} bad input {name}: {why}")

    for bad_target, at in ((V, 777), (-5, 123)):
        tb = t.clone()
        tb[at] = bad_target
        rc, msg, _ = call(x, w, tb, {}, n, 64, dx, dw, "float32")
        expect_error(f"target {bad_target} at token {at}", rc, msg, str(at))
    xb = x.clone()
    xb[10, 3] = float("nan")
    rc, msg, _ = call(xb, w, t, {}, n, 64, dx, dw, "float32")
    expect_error("NaN in x", rc, msg)
    wb = w.clone()
    wb[t[5], 0] = float("inf")
    rc, msg, _ = call(x, wb, t, {}, n, 64, dx, dw, "float32")
    expect_error("+inf in W", rc, msg)
    need = lib.workspace_bytes(T, H, V, DTYPE_CODE["bfloat16"], 64, True, DTYPE_CODE["float32"])
    rc, msg, _ = call(x, w, t, {}, n, 64, dx, dw, "float32", ws_bytes=max(need - 1, 0))
    expect_error(f"workspace {need - 1} bytes, one short", rc, msg)
    rc, msg, _ = call(x, w, t, {}, n, 0, dx, dw, "float32", ws_bytes=max(need, 1))
    expect_error("chunk_tokens = 0", rc, msg)
    rc, msg, _ = call(x, w, t, {}, n, 64, dx, dw, "float32", ws_bytes=max(need, 1), dtype_code=7)
    expect_error("dtype code 7", rc, msg)
    dw16 = torch.empty(V, H, device=dev, dtype=torch.float16)
    rc, msg, _ = call(x, w, t, {}, n, 64, dx, dw16, "float16", ws_bytes=max(need, 1) * 2)
    expect_error("dW float16 with bfloat16 inputs", rc, msg)
    got = lib.workspace_bytes(-1, H, V, DTYPE_CODE["bfloat16"], 64, True, DTYPE_CODE["float32"])
    out.append({"name": "memlinear_workspace_bytes(tokens=-1)", "pass": got == -1, "value": got,
                "why": f"returned {got}, expected -1"})
    print(f"{'ok  ' if got == -1 else 'FAIL'} bad input memlinear_workspace_bytes(tokens=-1): returned {got}")
    # Still usable afterwards.
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(x.double() @ w.double().T, t).item()
    rc, msg, loss = call(x, w, t, {}, n, 64, dx, dw, "float32")
    ok = rc == 0 and loss is not None and abs(loss - ref) / abs(ref) <= TOL["bfloat16"]
    out.append({"name": "a good call after the errors", "pass": bool(ok), "rc": rc, "message": msg, "loss": loss,
                "loss_ref": ref, "why": f"returned {rc} {msg!r}, loss {loss} vs {ref}"})
    print(f"{'ok  ' if ok else 'FAIL'} a good call after the errors: returned {rc}, loss {loss} vs reference {ref}")


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    if argv[1] == "--selftest":
        return selftest(argv[2])
    return gpu_main(argv[1], argv[2])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
