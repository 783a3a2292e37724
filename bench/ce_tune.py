"""A/B of the CUDA cross-entropy's two row kernels on a GPU, and where its backward time goes.

    python bench/ce_tune.py [--out DIR] [--rows 16384] [--dtypes bf16,fp16,fp32]

Why: on an H100 the fused forward (loss + dlogits, 16384 x 50304 bf16) took 1.68 ms for a 1.10 ms floor
(read the logits once, write dlogits once, at the measured copy bandwidth): its second sweep re-read the
row from DRAM, not L2. The staged kernel (csrc/classifier.cu) keeps the row in shared memory between
the sweeps instead. Prediction: DRAM traffic at the floor, ~1.2 ms (1.1-1.2x floor) where it stages (bf16
and fp16 at GPT-2's vocab on an H100; fp32 rows are too wide and keep two sweeps).
Also: the bench's fwd+bwd (2.19 ms) was 0.5 ms above the forward: autograd zero-filled a gradient for the
unused dlogits output (fixed since: set_materialize_grads(False)); `--profile` prints the kernels of one
fwd+bwd to confirm that only the loss kernels and the no-op scale run.

Timing: device only, CUDA-graph replay of 10 calls alternating two input copies, median of 5 replays,
CUDA events (as bench/ln_tune.py). Each pair of kernels is checked for bitwise-equal loss and dlogits.
The staged kernel is the default; GPT2K_CE_STAGE=0 selects the two-sweep one (read at each call).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

V, VP = 50257, 50304
SETS, CALLS = 2, 10
VARIANTS = {"staged": "1", "two sweeps": "0"}  # GPT2K_CE_STAGE


def measure(N, dtype, copy_gbps, say, device="cuda", timer=None):
    """One row per (variant, with or without dlogits): ms, GB/s against the ideal bytes, % of copy
    bandwidth, x floor; the two variants' outputs compared bit for bit. `timer(calls) -> ms` defaults to
    CUDA-graph replay (the tests pass a stand-in on CPU, where the C++ op runs and the variable is moot)."""
    import torch

    from bench.ln_tune import graph_ms
    from kernels import classifier as C

    timer = timer or (lambda calls: graph_ms(calls, torch, n=CALLS))
    C._load()  # builds / loads the extension: its ops exist from here on
    op = torch.ops.gpt2k_cuda.cross_entropy_fwd
    gen = torch.Generator(device=device).manual_seed(0)
    sets = [((torch.randn(N, VP, device=device, generator=gen) * 2.0).to(dtype),
             torch.randint(0, V, (N,), device=device, generator=gen)) for _ in range(SETS)]
    rows, outs = [], {}
    previous = os.environ.get("GPT2K_CE_STAGE")
    try:
        for name, flag in VARIANTS.items():
            os.environ["GPT2K_CE_STAGE"] = flag
            outs[name] = [t.clone() for t in op(*sets[0], -1, V, True, False)]
        same = all(torch.equal(a, b) for a, b in zip(outs["staged"], outs["two sweeps"]))
        for name, flag in VARIANTS.items():
            os.environ["GPT2K_CE_STAGE"] = flag
            for grad in (True, False):
                calls = [lambda s=s, grad=grad: op(*s, -1, V, grad, False) for s in sets]
                ms = timer(calls)
                ideal = N * VP * dtype.itemsize * (2 if grad else 1) + N * 8
                gbps = ideal / ms / 1e6
                rows.append({"variant": name, "dtype": str(dtype).replace("torch.", ""), "N": N, "V": V, "Vp": VP,
                             "dlogits": grad, "ms": ms, "gbps": gbps, "pct_copy": 100 * gbps / copy_gbps,
                             "x_floor": copy_gbps / gbps, "bitwise_equal": same})
                say(rows[-1])
    finally:
        if previous is None:
            os.environ.pop("GPT2K_CE_STAGE", None)
        else:
            os.environ["GPT2K_CE_STAGE"] = previous
    return rows


def profile_fwd_bwd(N, dtype, device="cuda"):
    """The kernels one bench-style fwd+bwd launches (leaf logits, loss.backward()), with device times."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from kernels import classifier as C

    logits = (torch.randn(N, VP, device=device) * 2.0).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device)
    for _ in range(2):
        C.cross_entropy(logits, targets, -1, V).backward()
        logits.grad = None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        C.cross_entropy(logits, targets, -1, V).backward()
        torch.cuda.synchronize()
    try:
        return prof.key_averages().table(sort_by="self_device_time_total", row_limit=15)
    except (KeyError, AttributeError, ValueError):  # an older torch's name for the column
        return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15)


def _fmt(r):
    what = "loss+dlogits" if r["dlogits"] else "loss only"
    return (f"{r['variant']:10s} {r['dtype']:8s} N={r['N']} {what:12s} {1e3 * r['ms']:8.1f} us {r['gbps']:7.0f} GB/s "
            f"{r['pct_copy']:5.1f}% copy  {r['x_floor']:.2f}x floor  bitwise_equal={r.get('bitwise_equal')}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python bench/ce_tune.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for ce_tune.json")
    p.add_argument("--rows", default="16384", help="comma-separated row counts (B*T)")
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--profile", action="store_true", help="also print the kernels of one bf16 fwd+bwd")
    args = p.parse_args(argv)
    import torch

    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    try:
        rows_list = [int(n) for n in args.rows.split(",")]
        dtypes = [names[d] for d in args.dtypes.split(",")]
    except (ValueError, KeyError):
        p.error("--rows: comma-separated integers; --dtypes: a comma-separated subset of bf16,fp16,fp32")
    if any(n < 1 for n in rows_list):
        p.error("--rows must be >= 1")
    if not torch.cuda.is_available():
        print("bench/ce_tune.py needs a CUDA GPU; without one: python bench/run.py --static (ptxas report)")
        return 2
    from bench.run import measure_limits

    limits = measure_limits(quick=True)
    print(f"# {torch.cuda.get_device_name()}: copy {limits['copy_gbps']:.0f} GB/s", flush=True)
    rows = []
    for N in rows_list:
        for dtype in dtypes:
            rows += measure(N, dtype, limits["copy_gbps"], lambda r: print(_fmt(r), flush=True))
            torch.cuda.empty_cache()
    for r in rows:
        if not r["bitwise_equal"]:
            print(f"WRONG: the staged and two-sweep kernels differ ({r['dtype']}, N={r['N']})")
    table = profile_fwd_bwd(rows_list[0], torch.bfloat16) if args.profile else None
    if table:
        print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "limits": limits,
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows, "profile": table}
        with open(os.path.join(args.out, "ce_tune.json"), "w") as f:
            json.dump(doc, f, indent=1)
    return 0 if all(r["bitwise_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
