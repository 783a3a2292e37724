"""IO audit: the bytes each memory-bound Triton kernel really loads and stores, against its floor.

Runs the kernels in Triton's interpreter (TRITON_INTERPRET=1) with the interpreter's memory ops
wrapped: every masked load / store (and atomic) passes its pointer array through `Recorder`, which
keeps the addresses the mask lets through. Per audited op it reports two figures:

  unique / ideal  distinct bytes read + distinct bytes written, over the floor (each input read once,
                  each output written once). The DRAM traffic if every re-read hits the cache: above
                  1.0 means a hidden intermediate buffer or an extra pass through memory.
  total / ideal   every byte every load and store touched. The traffic if no re-read hits the cache
                  (e.g. LayerNorm weights loaded again by every row's program).

Only traffic of Triton kernels is seen: a torch op the wrapper runs around a kernel (a `.sum()`
over partial results, a `.float()` copy) is not. Shapes are small and GPT-2-like (256 x 768).

    python -m bench.io_audit            # table (re-runs itself under TRITON_INTERPRET=1 if needed)
    python -m bench.io_audit --json     # rows as JSON (what `bench/run.py --static` reads)
"""
import json
import os
import subprocess
import sys

import numpy as np
import torch

LIMIT = 1.05  # unique/ideal above this fails tests/test_bench.py


class Recorder:
    """Context manager: records the addresses of every interpreter load/store/atomic while active."""

    def __init__(self):
        self.reads, self.writes, self.launches = [], [], []

    def _add(self, where, ptrs, mask):
        addrs = np.asarray(ptrs.data)
        if mask is not None:
            addrs = addrs[np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)]
        ty = ptrs.get_element_ty() if hasattr(ptrs, "get_element_ty") else ptrs.dtype.element_ty
        size = ty.primitive_bitwidth // 8
        where.append((addrs.astype(np.uint64).ravel(), size))

    def __enter__(self):
        from triton.runtime import interpreter as ti

        b, rec = ti.interpreter_builder, self
        self._saved = [(b, name, b.__dict__.get(name)) for name in
                       ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")]
        self._saved.append((ti.GridExecutor, "__call__", ti.GridExecutor.__call__))
        load, store = b.create_masked_load, b.create_masked_store
        rmw, cas = b.create_atomic_rmw, b.create_atomic_cas
        call = ti.GridExecutor.__call__

        def masked_load(ptrs, mask, *args, **kwargs):
            rec._add(rec.reads, ptrs, mask)
            return load(ptrs, mask, *args, **kwargs)

        def masked_store(ptrs, value, mask, *args, **kwargs):
            rec._add(rec.writes, ptrs, mask)
            return store(ptrs, value, mask, *args, **kwargs)

        def atomic_rmw(op, ptr, val, mask, *args, **kwargs):  # read-modify-write: counted as both
            rec._add(rec.reads, ptr, mask)
            rec._add(rec.writes, ptr, mask)
            return rmw(op, ptr, val, mask, *args, **kwargs)

        def atomic_cas(ptr, cmp, val, *args, **kwargs):
            rec._add(rec.reads, ptr, None)
            rec._add(rec.writes, ptr, None)
            return cas(ptr, cmp, val, *args, **kwargs)

        def grid_call(executor, *args, **kwargs):
            rec.launches.append(executor.fn.__name__)
            return call(executor, *args, **kwargs)

        b.create_masked_load, b.create_masked_store = masked_load, masked_store
        b.create_atomic_rmw, b.create_atomic_cas = atomic_rmw, atomic_cas
        ti.GridExecutor.__call__ = grid_call
        return self

    def __exit__(self, *exc):
        for obj, name, old in self._saved:
            if old is None:
                delattr(obj, name)  # instance attribute we added: the class method shows through again
            else:
                setattr(obj, name, old)

    @staticmethod
    def _unique(accesses):
        """{element size: sorted distinct addresses} (sorting beats np.unique's hashing here)."""
        by_size = {}
        for addrs, size in accesses:
            by_size.setdefault(size, []).append(addrs)
        out = {}
        for size, parts in by_size.items():
            a = np.sort(np.concatenate(parts))
            out[size] = a[np.concatenate(([True], a[1:] != a[:-1]))] if a.size else a
        return out

    def unique_bytes(self):
        return sum(a.size * s for acc in (self.reads, self.writes) for s, a in self._unique(acc).items())

    def total_bytes(self):
        return sum(a.size * s for acc in (self.reads, self.writes) for a, s in acc)

    def per_tensor(self, tensors):
        """{name: {"read", "written"}: distinct bytes} for the named tensors; the rest lands in "other"."""
        out = {}
        for key, acc in (("read", self.reads), ("written", self.writes)):
            uniq = self._unique(acc)
            claimed = 0
            for name, t in tensors.items():
                lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
                n = sum(int(np.searchsorted(a, hi) - np.searchsorted(a, lo)) * s for s, a in uniq.items())
                out.setdefault(name, {})[key] = n
                claimed += n
            out.setdefault("other", {})[key] = sum(a.size * s for s, a in uniq.items()) - claimed
        return out


# ---- the audited ops ---------------------------------------------------------------------------
# Each returns (tensors by name, ideal bytes, the function to record). Anything before the returned
# function runs unrecorded (e.g. the forward whose backward is audited).

def _ln_inputs(N, C):
    x = torch.randn(N, C, dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(C)).requires_grad_()  # fp32 parameters, as in the model
    b = (0.1 * torch.randn(C)).requires_grad_()
    return x, w, b


def _layer_norm_fwd(fn, N=256, C=768):
    x, w, b = _ln_inputs(N, C)
    box = {}

    def run():
        box["y"] = fn(x, w, b)
    return run, lambda: ({"x": x, "w": w, "b": b, "y": box["y"]},
                         ["x", "w", "b"], ["y"])


def _layer_norm_bwd(fn, N=256, C=768):
    x, w, b = _ln_inputs(N, C)
    y = fn(x, w, b)
    dy = torch.randn_like(y)
    box = {}

    def run():
        box["dx"], box["dw"], box["db"] = torch.autograd.grad(y, (x, w, b), dy)
    return run, lambda: ({"dy": dy, "x": x, "w": w, "dx": box["dx"], "dw": box["dw"], "db": box["db"]},
                         ["dy", "x", "w"], ["dx", "dw", "db"])


def _add_ln_inputs(N, C):
    x = torch.randn(N, C, requires_grad=True)  # the fp32 residual stream under autocast
    r = torch.randn(N, C, dtype=torch.bfloat16, requires_grad=True)  # a bf16 branch output
    return x, r, *_ln_inputs(N, C)[1:]


def _add_layer_norm_fwd(fn, N=256, C=768):
    x, r, w, b = _add_ln_inputs(N, C)
    box = {}

    def run():
        box["s"], box["y"] = fn(x, r, w, b)
    return run, lambda: ({"x": x, "r": r, "w": w, "b": b, "s": box["s"], "y": box["y"]},
                         ["x", "r", "w", "b"], ["s", "y"])


def _add_layer_norm_bwd(fn, N=256, C=768):
    x, r, w, b = _add_ln_inputs(N, C)
    s, y = fn(x, r, w, b)
    ds, dy = torch.randn_like(s), torch.randn_like(y)
    box = {}

    def run():  # the kernel reads s, dy, ds and writes d(x + r) once in x's dtype (fp32) and once in r's (bf16)
        box["dx"], box["dr"], box["dw"], box["db"] = torch.autograd.grad((s, y), (x, r, w, b), (ds, dy))
    return run, lambda: ({"dy": dy, "ds": ds, "s": s, "w": w, "dx": box["dx"], "dr": box["dr"], "dw": box["dw"],
                          "db": box["db"]}, ["dy", "ds", "s", "w"], ["dx", "dr", "dw", "db"])


def _gelu_fwd(fn, N=256, C=3072):
    x = torch.randn(N, C, dtype=torch.bfloat16, requires_grad=True)
    box = {}

    def run():
        box["y"] = fn(x)
    return run, lambda: ({"x": x, "y": box["y"]}, ["x"], ["y"])


def _gelu_bwd(fn, N=256, C=3072):
    x = torch.randn(N, C, dtype=torch.bfloat16, requires_grad=True)
    y = fn(x)
    dy = torch.randn_like(y)
    box = {}

    def run():
        (box["dx"],) = torch.autograd.grad(y, (x,), dy)
    return run, lambda: ({"dy": dy, "x": x, "dx": box["dx"]}, ["dy", "x"], ["dx"])


def _adamw_step(AdamW):
    shapes = [(256, 768), (768,), (2304,), (768, 64)]
    params = [torch.randn(s) * 0.02 for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape) * 1e-3
    opt = AdamW([{"params": params[0::2], "weight_decay": 0.1}, {"params": params[1::2], "weight_decay": 0.0}],
                lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
    opt.step()  # the first step allocates the state (unrecorded)

    def tensors():
        named = {}
        for i, p in enumerate(params):
            st = opt.state[p]
            named.update({f"p{i}": p, f"g{i}": p.grad, f"m{i}": st["exp_avg"], f"v{i}": st["exp_avg_sq"]})
        reads = [f"{k}{i}" for i in range(len(params)) for k in "pgmv"]
        writes = [f"{k}{i}" for i in range(len(params)) for k in "pmv"]
        return named, reads, writes
    return opt.step, tensors


def _cross_entropy(fn, N=32, V=50304, V_real=50257):
    logits = (2 * torch.randn(N, V)).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V_real, (N,))
    targets[3] = -1  # one ignored row
    box = {}

    def run():  # forward and backward together: a fused kernel may write the gradient in the forward
        loss = fn(logits, targets, -1, V_real)
        (box["dlogits"],) = torch.autograd.grad(loss, (logits,))
        box["loss"] = loss

    def tensors():
        real = logits.detach()[:, :V_real]  # the padded columns need not be read
        named = {"logits": logits, "targets": targets, "dlogits": box["dlogits"], "loss": box["loss"]}
        return named, ["logits", "targets"], ["dlogits", "loss"], {"logits": real.numel() * real.element_size()}
    return run, tensors


# name -> (op, triton backend module, builder taking the op's triton implementation)
_OPS = {
    "layer_norm fwd": ("layer_norm", "kernels.layernorm", _layer_norm_fwd),
    "layer_norm bwd": ("layer_norm", "kernels.layernorm", _layer_norm_bwd),
    "add_layer_norm fwd": ("layer_norm", "kernels.layernorm", _add_layer_norm_fwd, "add_layer_norm"),
    "add_layer_norm bwd": ("layer_norm", "kernels.layernorm", _add_layer_norm_bwd, "add_layer_norm"),
    "gelu fwd": ("gelu", "kernels.gelu", _gelu_fwd),
    "gelu bwd": ("gelu", "kernels.gelu", _gelu_bwd),
    "AdamW step": ("AdamW", "kernels.adamw", _adamw_step),
    "cross_entropy fwd+bwd": ("cross_entropy", "kernels.cross_entropy", _cross_entropy),
}


def _module_exists(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def audit_one(name):
    """One audit row (dict); status "ok", "missing" (module not written yet) or "error"."""
    import kernels

    op, module, build, *attr = AUDITS[name]  # attr: a companion function of the op (add_layer_norm)
    row = {"kernel": name, "op": op, "module": module}
    if name.startswith("calibration"):
        return _calibration(name, row)
    if not _module_exists(module):
        return {**row, "status": "missing", "reason": f"{module} does not exist yet"}
    try:
        impl = getattr(kernels.get_ops(f"torch,{op}=triton"), attr[0] if attr else op)
        run, tensors = build(impl)
        with Recorder() as rec:
            run()
        named, reads, writes, *sizes = tensors()
        sizes = sizes[0] if sizes else {}
        nbytes = {k: sizes.get(k, t.numel() * t.element_size()) for k, t in named.items()}
        ideal = sum(nbytes[k] for k in reads) + sum(nbytes[k] for k in writes)
    except Exception as e:  # reported as a row; the test fails on it
        return {**row, "status": "error", "reason": f"{type(e).__name__}: {e}"[:2000]}
    return _finish(row, rec, ideal, named)


def _finish(row, rec, ideal, named):
    unique, total = rec.unique_bytes(), rec.total_bytes()
    return {**row, "status": "ok", "ideal_bytes": ideal, "unique_bytes": unique, "total_bytes": total,
            "unique_ratio": unique / ideal, "total_ratio": total / ideal,
            "launches": rec.launches, "per_tensor": rec.per_tensor(named)}


# ---- calibration: two tiny kernels whose answers are known, so the audit itself can be trusted ----

def _calibration(name, row):
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, READS: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc = tl.load(x_ptr + offs, mask=mask)
        for _ in tl.static_range(READS - 1):  # re-read the same addresses
            acc += tl.load(x_ptr + offs, mask=mask)
        tl.store(y_ptr + offs, acc, mask=mask)

    reads = 1 if name == "calibration copy" else 2
    x = torch.randn(1000)
    y = torch.empty_like(x)
    with Recorder() as rec:
        copy_kernel[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), BLOCK=256, READS=reads)
    return _finish(row, rec, 2 * x.numel() * 4, {"x": x, "y": y})


# Calibration first (expected: copy -> unique 1.0 total 1.0; double read -> unique 1.0 total 1.5),
# then the kernels.
AUDITS = {"calibration copy": ("-", "-", None), "calibration double read": ("-", "-", None), **_OPS}


def interpreting():
    """True when this process's Triton runs kernels in the interpreter."""
    if "triton" in sys.modules:
        try:
            import triton

            return bool(triton.knobs.runtime.interpret)
        except AttributeError:
            pass
    return os.environ.get("TRITON_INTERPRET") == "1"


def audit(names=None, timeout=900):
    """Rows for the given audits (default all). Runs in a TRITON_INTERPRET=1 subprocess unless this
    process already interprets (e.g. under tests/conftest.py without a GPU)."""
    names = list(AUDITS) if names is None else list(names)
    if interpreting():
        return [audit_one(n) for n in names]
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "bench.io_audit", "--json", *names], capture_output=True,
                         text=True, env=env, timeout=timeout, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode != 0:
        raise RuntimeError(f"io audit subprocess failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows):
    lines = ["| kernel | unique/ideal | total/ideal | ideal | launches | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['kernel']} | - | - | - | - | {r['status']}: {r['reason'].splitlines()[0][:120]} |")
            continue
        flag = "OVER 1.05" if r["unique_ratio"] > LIMIT else ""
        other = r["per_tensor"]["other"]
        if other["read"] or other["written"]:
            flag += f" other buffers: {other['read']} B read, {other['written']} B written"
        launches = ", ".join(sorted(set(r["launches"])))
        lines.append(f"| {r['kernel']} | {r['unique_ratio']:.3f} | {r['total_ratio']:.3f} | {r['ideal_bytes']:,} B "
                     f"| {launches} | {flag.strip()} |")
    return "\n".join(lines)


def main(argv):
    as_json = "--json" in argv
    names = [a for a in argv if a != "--json"] or None
    torch.manual_seed(0)
    rows = audit(names)
    print(json.dumps(rows) if as_json else table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
