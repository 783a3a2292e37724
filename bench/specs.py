"""Benchmarks declared as data: which op, at which GPT-2 shapes, against which providers, and the
op's floor (ideal bytes moved and FLOPs) that every timing is related to.

A `Bench` is one op at one shape and dtype. `bench/run.py` times each of its `modes` for every
provider: the baselines (`BASELINES` below: eager reference, torch.compile of it, vendor paths)
and ours (the `triton` / `cuda` backends through `kernels.get_ops`, exactly what the model runs).

Ideal bytes: every input read once and every output written once, at the dtypes given (the
`(N,)` mean/rstd a LayerNorm saves for backward is an implementation choice, not counted). FLOPs:
2 per multiply-add of the matmuls only; causal attention does half the (T, T) work and its
backward counts as 2.5x the forward (5 matmuls, one a recompute, as FlashAttention counts it).

Modes: "fwd" runs with autograd on (as in training), "bwd" is the backward alone, "fwd+bwd" both. Our
fused losses (cross_entropy, linear_cross_entropy) compute the gradient inside the forward when one
is needed, so their "bwd" is almost free and their "fwd" does the backward's work: those providers
are listed in `Bench.grad_in_fwd`, and their fwd and bwd rows get timings only (no GB/s, TFLOP/s,
% of limit or speedup: bench/run.py writes null with a reason); compare those ops on fwd+bwd.
"""
from dataclasses import dataclass, field

import torch

import kernels

# Datasheet peaks used by `--static` for floor times (dense bf16 tensor-core FLOP/s, HBM bytes/s).
CARDS = {
    "H100 SXM": {"bytes_per_s": 3.35e12, "flops_per_s": 989e12},
    "A100 SXM 80GB": {"bytes_per_s": 2.039e12, "flops_per_s": 312e12},  # the 40GB card: 1.555e12 B/s
}

MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class Bench:
    op: str  # the kernels op name (kernels.OPS)
    shape: dict  # named sizes, e.g. {"N": 16384, "C": 768}
    dtype: str = "bfloat16"  # activations / logits dtype ("float32" for AdamW's state)
    out_dtype: str = None  # layer_norm: y's dtype when it differs from x's (the model's out_dtype under autocast)
    modes: tuple = MODES
    baselines: tuple = ()  # names in BASELINES
    ours: tuple = ("triton",)  # kernels backends
    bound: str = "memory"  # "memory" (GB/s vs copy bandwidth) or "compute" (TFLOP/s vs matmul)
    quick: bool = False  # part of `--quick`
    extra: dict = field(default_factory=dict)
    # Providers whose forward also computes the gradient (the fused losses): their fwd and bwd rows split
    # the work differently from the floor and the baselines, so only their fwd+bwd is compared.
    grad_in_fwd: tuple = ()

    @property
    def variant(self):
        dims = " ".join(f"{k}={v}" for k, v in self.shape.items())
        dtype = _SHORT[self.dtype] + (f"->{_SHORT[self.out_dtype]}" if self.out_dtype else "")
        return f"{dtype} {dims}"

    @property
    def providers(self):
        return self.baselines + self.ours


_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_SIZE = {"bfloat16": 2, "float16": 2, "float32": 4}

# GPT-2 124M training shapes: B=16, T=1024 -> 16384 rows, C=768, 12 heads of 64, vocab 50257 padded to 50304.
N, C, V, V_REAL = 16384, 768, 50304, 50257
ATTN = ("eager_math", "compile", "sdpa_flash", "sdpa_cudnn")

BENCHES = [
    Bench("layer_norm", {"N": N, "C": C}, "bfloat16", baselines=("eager", "compile"), quick=True),
    Bench("layer_norm", {"N": 4 * N, "C": C}, "bfloat16", baselines=("eager", "compile")),  # B=64 (issue 3's 2nd shape)
    # Under bf16 autocast the residual stream (the LayerNorm input) stays fp32.
    Bench("layer_norm", {"N": N, "C": C}, "float32", baselines=("eager", "compile")),
    # The model's one LayerNorm with no residual add before it (block 0's ln_1) under bf16 autocast: the
    # fp32 residual stream in, y in bf16 (out_dtype) for the next matmul, so dy comes back in bf16; dx fp32.
    Bench("layer_norm", {"N": N, "C": C}, "float32", out_dtype="bfloat16", baselines=("eager", "compile")),
    # The model's other 24 LayerNorms under bf16 autocast (ln_2: x + attn; ln_1 from block 1 on and ln_f:
    # x + mlp): fp32 residual stream x + a bf16 branch output (the dtype here), s in fp32, y in bf16
    # (out_dtype); eager = the add and the LayerNorm as two PyTorch ops, compile fuses them.
    Bench("add_layer_norm", {"N": N, "C": C}, "bfloat16", baselines=("eager", "compile", "triton_unfused"), quick=True),
    Bench("gelu", {"N": N, "C": 4 * C}, "bfloat16", baselines=("eager", "compile"), quick=True),
    Bench("attention", {"B": 16, "H": 12, "T": 1024, "D": 64}, baselines=ATTN, bound="compute", quick=True),
    Bench("attention", {"B": 64, "H": 12, "T": 1024, "D": 64}, baselines=ATTN, bound="compute"),
    Bench("attention", {"B": 8, "H": 12, "T": 2048, "D": 64}, baselines=ATTN, bound="compute"),
    Bench("attention", {"B": 4, "H": 12, "T": 4096, "D": 64}, baselines=ATTN, bound="compute"),
    Bench("cross_entropy", {"N": N, "V": V}, baselines=("eager", "compile", "vendor_ce"),
          ours=("triton", "cuda"), quick=True, extra={"vocab_size": V_REAL}, grad_in_fwd=("triton", "cuda")),
    Bench("linear_cross_entropy", {"N": N, "C": C, "V": V}, baselines=("eager", "compile"),
          ours=("triton", "cuda"), bound="compute", quick=True, extra={"vocab_size": V_REAL},
          grad_in_fwd=("triton", "cuda")),
    Bench("AdamW", {"params": 124_475_904}, "float32", modes=("step",),
          baselines=("foreach", "fused", "compile"), quick=True),
]

# Benched functions that are not ops of a spec but come with one: companion -> its op (kernels.COMPANIONS).
COMPANION_OF = {name: op for op, names in kernels.COMPANIONS.items() for name in names}

# --e2e: one run per single-op switch from the torch backend (what each kernel buys on its own).
E2E_ABLATIONS = [("layer_norm", "triton"), ("gelu", "triton"), ("attention", "triton"), ("cross_entropy", "triton"),
                 ("cross_entropy", "cuda"), ("linear_cross_entropy", "triton"), ("linear_cross_entropy", "cuda"),
                 ("AdamW", "triton")]


# ---- the floor: ideal bytes and FLOPs ------------------------------------------------------------

def gpt2_param_shapes(n_layer=12, C=C, V=V, T=1024):
    """The tensors of GPT-2 124M (tied lm_head counted once, padded vocab), as AdamW sees them."""
    shapes = [(V, C), (T, C)]
    for _ in range(n_layer):
        shapes += [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (4 * C, C), (4 * C,), (C, 4 * C), (C,)]
    return shapes + [(C,), (C,)]


def ideal_bytes(b, mode):
    """Bytes an ideal kernel moves: inputs read once, outputs written once."""
    s, sh = _SIZE[b.dtype], b.shape
    if b.op == "layer_norm":
        n, c, ws = sh["N"] * sh["C"], sh["C"], 4  # weight and bias are fp32 parameters
        so = _SIZE[b.out_dtype or b.dtype]  # y, and so dy
        fwd = n * (s + so) + 2 * c * ws  # x, w, b -> y
        bwd = n * (so + s + s) + 3 * c * ws  # dy, x, w -> dx (x's dtype), dw, db
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
    if b.op == "add_layer_norm":  # as the model under autocast: x, s, ds, dx fp32; r, y, dy, dr in b.dtype
        n, c, f = sh["N"] * sh["C"], sh["C"], 4
        fwd = n * (f + s + f + s) + 2 * c * f  # x, r, w, b -> s, y
        bwd = n * (2 * f + s + f + s) + 3 * c * f  # ds, s, dy, w -> dx, dr, dw, db
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
    if b.op == "gelu":
        n = sh["N"] * sh["C"]
        return {"fwd": 2 * n * s, "bwd": 3 * n * s, "fwd+bwd": 5 * n * s}[mode]
    if b.op == "attention":
        t = sh["B"] * sh["H"] * sh["T"] * sh["D"] * s
        return {"fwd": 4 * t, "bwd": 8 * t, "fwd+bwd": 12 * t}[mode]  # bwd: q k v o do -> dq dk dv
    if b.op == "cross_entropy":
        logits, targets = sh["N"] * sh["V"] * s, sh["N"] * 8
        # fwd+bwd fused: read the logits once, write their gradient once.
        return {"fwd": logits + targets, "bwd": 2 * logits + targets, "fwd+bwd": 2 * logits + targets}[mode]
    if b.op == "linear_cross_entropy":
        h, w = sh["N"] * sh["C"] * s, sh["V"] * sh["C"] * s
        return {"fwd": h + w, "bwd": 2 * (h + w), "fwd+bwd": 2 * (h + w)}[mode]
    if b.op == "AdamW":
        return 7 * 4 * sh["params"]  # read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq
    raise KeyError(b.op)


def flops(b, mode):
    """Matmul FLOPs (0 for the memory-bound ops)."""
    sh = b.shape
    if b.op == "attention":
        fwd = 2 * sh["B"] * sh["H"] * sh["T"] ** 2 * sh["D"]  # QK^T and PV, 2 FLOPs each, causal half
        return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]
    if b.op == "linear_cross_entropy":
        fwd = 2 * sh["N"] * sh["C"] * sh["V"]
        return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]
    return 0


def floor_seconds(b, mode, card):
    peak = CARDS[card]
    return max(ideal_bytes(b, mode) / peak["bytes_per_s"], flops(b, mode) / peak["flops_per_s"])


# ---- inputs --------------------------------------------------------------------------------------

def make_inputs(b, device):
    """(args, kwargs, leaves): the op's arguments at b's shapes, and the tensors that get gradients."""
    dt, sh = getattr(torch, b.dtype), b.shape
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*size, dtype=dt, grad=True, scale=1.0):
        t = torch.randn(*size, generator=g, device=device, dtype=torch.float32) * scale
        return t.to(dtype).requires_grad_(grad)

    if b.op == "layer_norm":
        x, w, bias = randn(sh["N"], sh["C"]), randn(sh["C"], dtype=torch.float32), randn(sh["C"], dtype=torch.float32)
        kwargs = {"out_dtype": getattr(torch, b.out_dtype)} if b.out_dtype else {}
        return (x, w, bias), kwargs, [x, w, bias]
    if b.op == "add_layer_norm":
        x, r = randn(sh["N"], sh["C"], dtype=torch.float32), randn(sh["N"], sh["C"])
        w, bias = randn(sh["C"], dtype=torch.float32), randn(sh["C"], dtype=torch.float32)
        # y in the autocast dtype, as the model asks for it (the next matmul's input)
        return (x, r, w, bias), {"out_dtype": r.dtype}, [x, r, w, bias]
    if b.op == "gelu":
        x = randn(sh["N"], sh["C"])
        return (x,), {}, [x]
    if b.op == "attention":
        q, k, v = (randn(sh["B"], sh["H"], sh["T"], sh["D"]) for _ in range(3))
        return (q, k, v), {}, [q, k, v]
    if b.op == "cross_entropy":
        logits = randn(sh["N"], sh["V"], scale=2.0)
        targets = torch.randint(0, b.extra["vocab_size"], (sh["N"],), generator=g, device=device)
        return (logits, targets), {"vocab_size": b.extra["vocab_size"]}, [logits]
    if b.op == "linear_cross_entropy":
        hidden, weight = randn(sh["N"], sh["C"]), randn(sh["V"], sh["C"], scale=0.02)
        targets = torch.randint(0, b.extra["vocab_size"], (sh["N"],), generator=g, device=device)
        return (hidden, weight, targets), {"vocab_size": b.extra["vocab_size"]}, [hidden, weight]
    if b.op == "AdamW":
        params = [torch.randn(s, generator=g, device=device) * 0.02 for s in gpt2_param_shapes()]
        assert sum(p.numel() for p in params) == sh["params"]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, device=device) * 1e-3
        return (params,), {}, []
    raise KeyError(b.op)


def adamw_groups(params):
    """GPT-2's two groups: matrices decay, vectors (biases, LayerNorm) don't."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


# ---- baseline providers --------------------------------------------------------------------------

def _sdpa(backend_name):
    def build(op):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F

        backend = getattr(SDPBackend, backend_name)

        def attention(q, k, v):
            with sdpa_kernel([backend]):  # raises instead of silently choosing another backend
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return attention
    return build


def _eager(op):
    from kernels import reference

    return reference.attention_math if op == "attention" else getattr(reference, op)


def no_donated_buffers():
    """Turn torch.compile's donated buffers off for this process; False on a torch without the setting.
    A backward compiled with donated buffers refuses retain_graph=True, which the CUDA-graph timing of
    "bwd" needs (bench/run.py time_graph); donation only saves memory. Set for the process rather than
    patched around the compile: the check runs again at each backward and reads the setting then (torch
    2.14 refuses retain_graph with the setting on even for a graph compiled with it off). Every
    torch.compile in a bench process is a baseline, so nothing else is affected."""
    try:
        from torch._functorch import config
    except ImportError:
        return False
    if not hasattr(config, "donated_buffer"):
        return False
    config.donated_buffer = False
    return True


def _compiled(op):
    if op == "AdamW":
        return _optimizer(compiled=True)
    no_donated_buffers()
    return torch.compile(_eager(op), dynamic=False)


def _triton_unfused(op):
    """add_layer_norm as two ops: PyTorch's add, then our Triton layer_norm (the model before the fusion)."""
    from kernels import layernorm

    def add_layer_norm(x, residual, weight, bias, eps=1e-5, out_dtype=None):
        s = x + residual
        return s, layernorm.layer_norm(s, weight, bias, eps, out_dtype)
    return add_layer_norm


def _vendor_ce(op):
    import torch.nn.functional as F

    def cross_entropy(logits, targets, ignore_index=-1, vocab_size=None):
        return F.cross_entropy(logits[:, :vocab_size], targets, ignore_index=ignore_index)
    return cross_entropy


def _optimizer(compiled=False, **kwargs):
    """An optimizer "op": a factory the runner turns into one timed step()."""
    def make(params, **kw):
        opt = torch.optim.AdamW(params, **kw, **kwargs)
        if compiled:
            opt.step = torch.compile(opt.step)
        return opt
    return make


# name -> (what it is, builder(op) -> callable with the reference op's signature)
BASELINES = {
    "eager": ("kernels.reference in eager PyTorch", _eager),
    "eager_math": ("textbook attention, (T, T) scores materialized (reference.attention_math)", _eager),
    "compile": ("torch.compile of the eager reference (no donated buffers: graph-timeable backward)", _compiled),
    "sdpa_flash": ("F.scaled_dot_product_attention, FLASH_ATTENTION backend only", _sdpa("FLASH_ATTENTION")),
    "sdpa_cudnn": ("F.scaled_dot_product_attention, CUDNN_ATTENTION backend only", _sdpa("CUDNN_ATTENTION")),
    "vendor_ce": ("F.cross_entropy on the bf16 logits (no fp32 copy)", _vendor_ce),
    "triton_unfused": ("x + residual in PyTorch, then our Triton layer_norm: what the fusion saves", _triton_unfused),
    # capturable=True (step counts on the device, no host sync): what a CUDA-graph captured training step
    # uses, and what lets time_graph capture them; the default (capturable=False) refuses capture.
    "foreach": ("torch.optim.AdamW(foreach=True, capturable=True), PyTorch's default on CUDA",
                lambda op: _optimizer(foreach=True, capturable=True)),
    "fused": ("torch.optim.AdamW(fused=True, capturable=True), the vendor kernel",
              lambda op: _optimizer(fused=True, capturable=True)),
}


def selected(ops=None, quick=False):
    """The benches to run: `ops` is a set of op names (None = all); quick keeps one shape per op."""
    return [b for b in BENCHES if (ops is None or b.op in ops) and (b.quick or not quick)]


def mib(n):
    return n / 2**20


def fmt_si(x, unit):
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"

