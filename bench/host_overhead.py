"""Host (CPU) time of one fwd+bwd call of each op, with every Triton kernel launch stubbed out.

    python -m bench.host_overhead [--json]

Why: at GPT-2 124M shapes eager training with our kernels is host-bound on an H100 (bench/NOTES.md):
the Python work around a launch costs more than the kernel's device time. This measures that Python
work on any machine, without a GPU: CPU tensors of tiny shapes, each Triton kernel in the op's module
replaced by a stub whose launch does nothing, so what is timed is our wrapper (checks, allocations,
autograd) and PyTorch's dispatch, not the kernel and not Triton's own launcher (which a GPU adds on top).
Three paths per op: the eager fast path (kernels/_eager.py), the same call through the custom op
(dispatcher + the op's registered autograd), and the `torch` backend on the same tiny tensors (real
but tiny CPU compute: a rough eager-PyTorch yardstick, not a like-for-like figure).
The last column estimates the host time of one GPT-2 124M micro-step's calls of that op (fast path).
The last row is a whole micro-step: the 12-layer model, forward + backward, at tiny widths. With --compiled,
one more: the same micro-step of the model under torch.compile, where our ops are custom ops called from the
compiled graph (the "custom op" column) against the torch backend compiled (its tiny CPU compute included).
"""
import argparse
import json
import os
import statistics
import sys
import time

# GPT-2 124M: block 0's ln_1 is a plain LayerNorm, the other 24 add a residual (add_layer_norm); the model
# calls attention_qkv (attention on the qkv projection's views); `attention` itself is listed for comparison.
CALLS_PER_STEP = {"layer_norm": 1, "add_layer_norm": 24, "gelu": 12, "attention": 0, "attention_qkv": 12,
                  "cross_entropy (triton)": 1}


def _stub_kernels(modules):
    """Replace every Triton kernel object (JIT function, autotuner, interpreter function) in `modules`
    with one whose launch `kernel[grid](...)` does nothing."""
    class Stub:
        fn = property(lambda self: self)

        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    stubbed = 0
    for mod in modules:
        for name, obj in list(vars(mod).items()):
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction", "Autotuner", "Heuristics"):
                setattr(mod, name, Stub())
                stubbed += 1
    return stubbed


def _time_us(fn, reps=7, number=300):
    for _ in range(30):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number * 1e6)
    return statistics.median(samples), min(samples), max(samples)


def measure(number=300, compiled=False):
    # The triton backend accepts CPU tensors only in interpreter mode (checked at each call); with the
    # kernels stubbed it does not matter whether triton was imported in that mode.
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from kernels import _eager
    from kernels import attention as at
    from kernels import cross_entropy as ce
    from kernels import gelu as ge
    from kernels import layernorm as ln
    from kernels import reference as ref

    import kernels

    # As gpt2.train runs: no per-call row check of the loss (a host sync on a GPU); the stubbed kernels
    # also leave the per-row losses unset, which the check would reject.
    kernels.set_loss_row_checks(False)
    for mod in (ln, ge, at, ce):
        if not _stub_kernels((mod,)):
            raise RuntimeError(f"bench.host_overhead: found no Triton kernel to stub in {mod.__name__}")
    torch.set_num_threads(1)
    x, w, b = torch.randn(8, 768), torch.randn(768), torch.randn(768)
    r = torch.randn(8, 768).to(torch.bfloat16)
    g = torch.randn(8, 3072)
    q = torch.randn(1, 2, 16, 64, dtype=torch.float16)
    qkv = torch.randn(1, 16, 3 * 128, dtype=torch.float16)
    logits, targets = torch.randn(8, 128), torch.randint(0, 100, (8,))
    cases = {  # op -> (ours, reference, inputs that need grad)
        "layer_norm": (lambda x, w, b: ln.layer_norm(x, w, b), ref.layer_norm, (x, w, b)),
        "add_layer_norm": (lambda x, r, w, b: ln.add_layer_norm(x, r, w, b)[1],
                           lambda x, r, w, b: ref.add_layer_norm(x, r, w, b)[1], (x, r, w, b)),
        "gelu": (ge.gelu, ref.gelu, (g,)),
        "attention": (lambda q: at.attention(q, q, q), lambda q: ref.attention(q, q, q), (q,)),
        "attention_qkv": (lambda t: at.attention_qkv(t, 2), lambda t: ref.attention_qkv(t, 2), (qkv,)),
        "cross_entropy (triton)": (lambda lg: ce.cross_entropy(lg, targets, -1, 100),
                                   lambda lg: ref.cross_entropy(lg, targets, -1, 100), (logits,)),
    }
    rows = []
    for op, (ours, reference, inputs) in cases.items():
        leaves = [t.clone().requires_grad_() for t in inputs]

        def fwd_bwd(fn=None):
            y = fn(*leaves)
            y.backward(torch.ones_like(y))

        result = {"op": op}
        for path, fn, enabled in (("fast_path", ours, True), ("custom_op", ours, False), ("torch_backend", reference, True)):
            _eager.ENABLED = enabled
            med, lo, hi = _time_us(lambda fn=fn: fwd_bwd(fn), number=number)
            result[path] = {"us": med, "us_min": lo, "us_max": hi}
        _eager.ENABLED = True
        result["calls_per_step"] = CALLS_PER_STEP[op]
        result["ms_per_step_fast_path"] = CALLS_PER_STEP[op] * result["fast_path"]["us"] / 1e3
        rows.append(result)
    rows.append(_model_row(torch, _eager, number))
    if compiled:
        rows.append(_compiled_row(torch, number))
    return {"what": "host time per fwd+bwd call, Triton launches stubbed, CPU tensors", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "rows": rows}


def _micro_step_us(torch, spec, number, compiled=False):
    """Host time of one GPT-2 micro-step, forward + backward: the 124M model's 12 layers and every op call,
    at widths so small (C = 64, 2 heads of 32, vocab 128, B = 1, T = 8) that the CPU compute is negligible;
    kernels=spec, under torch.compile (default mode) when compiled. -> {"us", "us_min", "us_max"}."""
    from gpt2.model import GPT, GPTConfig

    config = GPTConfig(block_size=8, vocab_size=128, n_layer=12, n_head=2, n_embd=64)
    idx = torch.randint(0, 128, (1, 8))
    torch.manual_seed(0)
    model = GPT(config, kernels=spec)
    model = torch.compile(model) if compiled else model

    def step():
        _, loss = model(idx, idx)
        loss.backward()
    med, lo, hi = _time_us(step, reps=5, number=max(1, number // 10))
    return {"us": med, "us_min": lo, "us_max": hi}


def _model_row(torch, _eager, number):
    """One GPT-2 micro-step's host time (_micro_step_us): kernels=triton (stubbed launches) through the fast
    path and through the custom ops, against kernels=torch."""
    result = {"op": "GPT-2 micro-step (12 layers, tiny widths)"}
    for path, spec, enabled in (("fast_path", "triton", True), ("custom_op", "triton", False), ("torch_backend", "torch", True)):
        _eager.ENABLED = enabled
        result[path] = _micro_step_us(torch, spec, number)
    _eager.ENABLED = True
    result["calls_per_step"] = 1
    result["ms_per_step_fast_path"] = result["fast_path"]["us"] / 1e3
    return result


def _compiled_row(torch, number):
    """The micro-step of _model_row under torch.compile (default mode): kernels=triton, whose ops the compiled
    graph calls as custom ops (the eager fast path does not apply there), against kernels=torch compiled."""
    return {"op": "GPT-2 micro-step under torch.compile (12 layers, tiny widths)", "fast_path": None,
            "custom_op": _micro_step_us(torch, "triton", number, compiled=True),
            "torch_backend": _micro_step_us(torch, "torch", number, compiled=True),
            "calls_per_step": 1, "ms_per_step_fast_path": None}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.host_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--number", type=int, default=300, help="calls per timing sample (7 samples, median)")
    p.add_argument("--compiled", action="store_true",
                   help="also the micro-step under torch.compile (compiles both models: about a minute on a CPU)")
    args = p.parse_args(argv)
    if args.number < 1:
        p.error(f"--number must be >= 1, got {args.number}")
    doc = measure(args.number, args.compiled)
    if args.json:
        print(json.dumps(doc))
        return 0
    print(f"# {doc['what']} (torch {doc['torch']}, {doc['threads']} thread); medians of 7 samples, us")
    print("| op | fast path | custom op | torch backend (tiny CPU compute) | calls/step | fast path ms/step |")
    print("|---|---|---|---|---|---|")
    for r in doc["rows"]:
        fast = "-" if r["fast_path"] is None else f"{r['fast_path']['us']:.1f}"
        per_step = "-" if r["ms_per_step_fast_path"] is None else f"{r['ms_per_step_fast_path']:.2f}"
        print(f"| {r['op']} | {fast} | {r['custom_op']['us']:.1f} | {r['torch_backend']['us']:.1f} | "
              f"{r['calls_per_step']} | {per_step} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
