"""Where a training step's time goes: `python -m gpt2.train --profile N` (and `bench/run.py --e2e`).

The trainer's last N steps run under torch.profiler. At the end, for those steps:

- device time per kernel category (matmul, attention, layer_norm, gelu, cross_entropy, optimizer, ...), from
  the GPU kernels' own start and end times: milliseconds per step, share of the device's busy time, kernels
  per step; and the kernels that took the most time;
- the device's busy time per step (the union of its kernels' intervals) against the step's wall time: the
  idle share is the time the GPU waited for the host (Python, launches, the loss read). A host-bound loop
  shows a large idle share; `--cuda-graph` or `--compile --compile-mode reduce-overhead` remove it;
- the device-bound rate: the tokens of a step over its busy time, and the MFU at that rate: what the
  step would reach if the host never made the device wait (with these kernels, in this order);
- the host operators with the most self CPU time per step (on a CPU run this is the whole breakdown).

Written to OUT/profile.json (and a Chrome / Perfetto trace, OUT/trace.json.gz); the log lines of those steps
say "profiled": true, since the profiler slows the host (a few us per launch): their tokens/s is not the
run's. Categories come from kernel names (CATEGORIES: our Triton and CUDA kernels, cuBLAS / CUTLASS,
PyTorch's own kernels; Inductor's generated `triton_*` kernels go by the ops their names list, e.g.
`triton_red_fused_add_native_layer_norm_0` is layer_norm work, and those that name none of the ops above
form the "inductor" category: fused casts, adds, sums). Only rank 0 profiles.
"""
import json
import re
import statistics

# (category, pattern searched in the lowercased kernel name); the first match wins, so the specific
# patterns come before the generic ones (PyTorch's GELU is a "vectorized_elementwise_kernel<..Gelu..>").
# "grad_clip" is the gradient norm; the clipping's scale and any other foreach op (a multi_tensor_apply
# kernel, e.g. --cuda-graph's in-place zeroing of the grads) count as "optimizer".
CATEGORIES = [
    ("attention", r"_attn_|flash|fmha|sdpa|cudnn.*(attn|mha|sdp)|efficient_attention|attention"),
    ("cross_entropy", r"ce_(row|prep|finish)_kernel|_ce_kernel|scale_kernel|softmax|nll_loss|cross_entropy"),
    ("layer_norm", r"layer_?norm|gammabeta"),
    ("gelu", r"gelu"),
    ("grad_clip", r"lpnorm|norm_kernel|foreach_norm"),
    ("optimizer", r"adam|_nonfinite_kernel|multi_tensor_apply"),
    ("matmul", r"gemm|cutlass|cublas|xmma|nvjet|splitk|hgmma|wgmma|s16816|s1688|^triton_tem_fused_(add|b)?mm"),
    ("embedding", r"embedding|index_?select|indexing_backward|radix|segment_?offsets|sum_and_scatter|compute_grad_weight"),
    ("inductor", r"^triton_(poi|red|per|tem|for)_"),
    ("copy/cast", r"copy|memcpy|convert|cast|catarray"),
    ("fill", r"fill|memset|zero"),
    ("reduction", r"reduce"),
    ("elementwise", r"elementwise|vectorized_|unrolled_"),
]
_COMPILED = [(name, re.compile(pattern)) for name, pattern in CATEGORIES]


def category(kernel_name):
    """The category of a GPU kernel (or memcpy / memset) by its name; "other" when nothing matches."""
    low = kernel_name.lower()
    for name, pattern in _COMPILED:
        if pattern.search(low):
            return name
    return "other"


def busy_time(intervals):
    """Total length of the union of (start, end) intervals: the time at least one kernel ran."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + (cur_end - cur_start if cur_end is not None else 0.0)


def summarize(kernels, step_times, host_ops=(), tokens_per_step=None, flops_per_token=None, peak_flops=None,
              note=None, top=12):
    """The profile of len(step_times) steps. kernels: (name, start_us, end_us) of every device kernel in
    them; step_times: the steps' wall times (s); host_ops: (name, calls, self_cpu_us) totals over the steps;
    tokens_per_step: tokens one device processed per step. -> a JSON-able dict (see the module docstring)."""
    steps = len(step_times)
    if steps < 1:
        raise ValueError("summarize: no profiled step")
    wall = statistics.median(step_times)
    by_cat, by_kernel = {}, {}
    for name, start, end in kernels:
        for table, key in ((by_cat, category(name)), (by_kernel, name)):
            entry = table.setdefault(key, [0.0, 0])
            entry[0] += end - start
            entry[1] += 1
    busy_s = busy_time([(s, e) for _, s, e in kernels]) / 1e6 / steps
    kernel_s = sum(t for t, _ in by_cat.values()) / 1e6 / steps
    summary = {
        "steps": steps, "step_time_s": wall, "kernels_per_step": len(kernels) / steps,
        "device_busy_s": busy_s if kernels else None,
        "device_idle_fraction": max(0.0, 1.0 - busy_s / wall) if kernels else None,
        "categories": {c: {"ms_per_step": t / 1e3 / steps,
                           "share_of_kernel_time": t / 1e6 / steps / kernel_s if kernel_s else 0.0,
                           "kernels_per_step": n / steps}
                       for c, (t, n) in sorted(by_cat.items(), key=lambda kv: -kv[1][0])},
        "top_kernels": [{"name": k[:160], "category": category(k), "ms_per_step": t / 1e3 / steps, "calls_per_step": n / steps}
                        for k, (t, n) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:top]],
        "host_top_ops": [{"name": k[:160], "self_cpu_ms_per_step": us / 1e3 / steps, "calls_per_step": n / steps}
                         for k, n, us in sorted(host_ops, key=lambda o: -o[2])[:top]],
        "tokens_per_step": tokens_per_step,
    }
    if kernels and tokens_per_step and busy_s:
        rate = tokens_per_step / busy_s
        summary["device_bound_tokens_per_sec"] = rate
        summary["device_bound_mfu"] = rate * flops_per_token / peak_flops if flops_per_token and peak_flops else None
    if note:
        summary["note"] = note
    return summary


def table(summary):
    """The console view of a summary."""
    lines = [f"profile of {summary['steps']} step(s): {summary['step_time_s'] * 1e3:.2f} ms per step (median wall time)"]
    if summary["device_busy_s"] is None:
        lines.append("no device kernels recorded (a CPU run): the host operators below are the breakdown")
    else:
        lines.append(f"device busy {summary['device_busy_s'] * 1e3:.2f} ms per step, idle "
                     f"{100 * summary['device_idle_fraction']:.1f}% of the step (waiting for the host); "
                     f"{summary['kernels_per_step']:.0f} kernels per step")
        if summary.get("device_bound_tokens_per_sec"):
            mfu = summary.get("device_bound_mfu")
            lines.append(f"device-bound: {summary['device_bound_tokens_per_sec']:,.0f} tokens/s per device"
                         + (f", MFU {100 * mfu:.1f}%" if mfu else ""))
        lines.append("| category | ms / step | share of kernel time | kernels / step |\n|---|---|---|---|")
        lines += [f"| {c} | {v['ms_per_step']:.3f} | {100 * v['share_of_kernel_time']:.1f}% | {v['kernels_per_step']:.0f} |"
                  for c, v in summary["categories"].items()]
        lines.append("| top kernel | category | ms / step | calls / step |\n|---|---|---|---|")
        lines += [f"| {k['name'][:90]} | {k['category']} | {k['ms_per_step']:.3f} | {k['calls_per_step']:.0f} |"
                  for k in summary["top_kernels"]]
    lines.append("| host op (self CPU) | ms / step | calls / step |\n|---|---|---|")
    lines += [f"| {o['name'][:90]} | {o['self_cpu_ms_per_step']:.3f} | {o['calls_per_step']:.0f} |" for o in summary["host_top_ops"]]
    if summary.get("note"):
        lines.append(f"note: {summary['note']}")
    return "\n".join(lines)


def device_kernels(events):
    """(name, start_us, end_us) of the GPU's own work among profiler events: kernels, memcpy, memset. Not the
    GPU-side spans of record_function ranges (user annotations, e.g. "Optimizer.step#AdamW.step"): they cover
    the gaps between their kernels, and would count those kernels twice."""
    import torch

    return [(e.name, e.time_range.start, e.time_range.end) for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


class StepProfiler:
    """Profiles the steps between start() and finish(): the trainer calls start() before the first profiled
    step, step_done(seconds) after each one's training work, and finish() after the last."""

    def __init__(self, device):
        self.device = device
        self.prof = None
        self.step_times = []

    @property
    def active(self):
        return self.prof is not None

    def start(self):
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # earlier steps' kernels stay out of the window
        self.prof = profile(activities=activities)
        self.prof.__enter__()

    def step_done(self, seconds):
        self.step_times.append(seconds)

    def finish(self, out, **kwargs):
        """Stop, write OUT/profile.json and OUT/trace.json.gz; return the summary (kwargs: see summarize)."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.prof.__exit__(None, None, None)
        host = [(a.key, a.count, a.self_cpu_time_total) for a in self.prof.key_averages()
                if a.device_type == torch.autograd.DeviceType.CPU]
        summary = summarize(device_kernels(self.prof.events()), self.step_times, host, **kwargs)
        (out / "profile.json").write_text(json.dumps(summary, indent=1) + "\n")
        self.prof.export_chrome_trace(str(out / "trace.json.gz"))
        self.prof = None
        return summary

