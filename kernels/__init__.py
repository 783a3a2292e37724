"""Kernel backends, chosen by a spec string.

    ops = kernels.get_ops("triton,cross_entropy=cuda")
    y = ops.layer_norm(x, w, b); opt = ops.AdamW(params, lr=6e-4)

A spec is a default backend followed by per-op overrides: "torch", "triton", "cuda",
"torch,attention=triton", "triton,cross_entropy=cuda". `get_ops` resolves and checks every op up
front: an unknown name raises ValueError listing the valid ones, and a backend that cannot run
here (no GPU, no compiler, op not implemented by that backend) raises BackendUnavailable with the
reason. Nothing ever falls back silently to another backend: a benchmark that asked for triton
must time triton.

The registry is data: op -> backend -> "module:attribute". An implementing module may define
`unavailable_reason() -> str | None`, called before it is used.
"""
import importlib
import os

BACKENDS = ("torch", "triton", "cuda")

OPS = ("layer_norm", "gelu", "attention", "cross_entropy", "linear_cross_entropy", "AdamW")

_REGISTRY = {
    "layer_norm": {
        "torch": "kernels.reference:layer_norm",
        "triton": "kernels.layernorm:layer_norm",
    },
    "gelu": {
        "torch": "kernels.reference:gelu",
        "triton": "kernels.gelu:gelu",
    },
    "attention": {
        "torch": "kernels.reference:attention",
        "triton": "kernels.attention:attention",
    },
    "cross_entropy": {
        "torch": "kernels.reference:cross_entropy",
        "triton": "kernels.cross_entropy:cross_entropy",
        "cuda": "kernels.classifier:cross_entropy",
    },
    "linear_cross_entropy": {
        "torch": "kernels.reference:linear_cross_entropy",
        "triton": "kernels.cross_entropy:linear_cross_entropy",
        "cuda": "kernels.classifier:linear_cross_entropy",
    },
    "AdamW": {
        "torch": "kernels.reference:AdamW",
        "triton": "kernels.adamw:AdamW",
    },
}


# Functions that come with an op from the same backend module (not ops of their own in a spec):
# layer_norm=triton also gives the model kernels.layernorm.add_layer_norm (residual add + LayerNorm), and
# attention=triton kernels.attention.attention_qkv (attention straight from the (B, T, 3C) projection).
COMPANIONS = {"layer_norm": ("add_layer_norm",), "attention": ("attention_qkv",)}


class BackendUnavailable(RuntimeError):
    """A backend was asked for that cannot run on this machine (the message says why)."""


def parse_spec(spec):
    """"triton,cross_entropy=cuda" -> {op: backend} for every op in OPS. Raises ValueError."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"kernel spec must be a non-empty string like 'torch' or 'triton,cross_entropy=cuda', got {spec!r}")
    parts = [p.strip() for p in spec.split(",")]
    default, overrides = parts[0], parts[1:]
    if "=" in default:
        raise ValueError(f"kernel spec {spec!r} must start with a default backend ({', '.join(BACKENDS)}), then op=backend overrides")
    _check_backend(default, spec)
    chosen = {op: default for op in OPS}
    explicit = set()
    for part in overrides:
        if part.count("=") != 1:
            raise ValueError(f"kernel spec {spec!r}: override {part!r} is not of the form op=backend")
        op, backend = (s.strip() for s in part.split("="))
        if op not in OPS:
            raise ValueError(f"kernel spec {spec!r}: unknown op {op!r}; valid ops: {', '.join(OPS)}")
        _check_backend(backend, spec)
        if op in explicit:
            raise ValueError(f"kernel spec {spec!r}: op {op!r} is given twice")
        chosen[op] = backend
        explicit.add(op)
    return chosen, explicit


def _check_backend(backend, spec):
    if backend not in BACKENDS:
        raise ValueError(f"kernel spec {spec!r}: unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")


def _version(text):
    """'2.4.1' / '3.6.0+git..' -> (2, 4)."""
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in text.split(".")[:2])


def interpreter_incompatibility():
    """Why Triton's interpreter cannot run our kernels with the installed packages, or None. Known case:
    Triton before 3.7 converts a loop bound held in a 1-element NumPy array with int(), which NumPy 2.4
    made an error, so every kernel with a `range(lo, hi)` loop fails inside the interpreter with
    "only 0-dimensional arrays can be converted to Python scalars" (Triton 3.7 fixed it)."""
    import numpy
    import triton

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) fails with NumPy "
                f"{numpy.__version__} (int() of a 1-element array, an error since NumPy 2.4); install "
                "numpy<2.4, or a PyTorch whose Triton is 3.7 or newer")
    return None


def _triton_runtime_reason():
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton cannot be imported ({e}); install PyTorch with its bundled triton"
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1":
        return interpreter_incompatibility()
    if torch.cuda.is_available():
        return None
    return "no CUDA GPU is visible; set TRITON_INTERPRET=1 before starting Python to run Triton kernels on the CPU in Triton's interpreter (slow)"


def _resolve(op, backend):
    """Return (implementation, None) or (None, reason)."""
    target = _REGISTRY[op].get(backend)
    if target is None:
        have = ", ".join(_REGISTRY[op])
        return None, f"op {op!r} is not implemented by backend {backend!r} (backends that implement it: {have})"
    if backend == "triton":
        reason = _triton_runtime_reason()
        if reason:
            return None, reason
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            return None, f"op {op!r} is not implemented yet by backend {backend!r} ({module_name} does not exist)"
        raise
    check = getattr(module, "unavailable_reason", None)
    reason = check() if check is not None else None
    if reason:
        return None, reason
    return getattr(module, attr), None


class Ops:
    """The resolved ops of one spec. Attributes: one per op in OPS, plus the COMPANIONS of each from the
    same backend (add_layer_norm with layer_norm, attention_qkv with attention); `backends` maps op -> backend."""

    def __init__(self, spec, backends, explicit, impls):
        self.spec = spec
        self.backends = backends
        self.explicit = explicit  # ops named in the spec's overrides
        for op, fn in impls.items():
            setattr(self, op, fn)

    @property
    def fused_classifier(self):
        """True when the spec asks for linear_cross_entropy by name: the model then never builds the
        full logits in training (forward returns logits=None with the loss)."""
        return "linear_cross_entropy" in self.explicit

    def __repr__(self):
        return f"Ops({self.spec!r}: " + ", ".join(f"{op}={b}" for op, b in self.backends.items()) + ")"


def get_ops(spec="torch"):
    """Resolve a spec into an Ops object. Raises ValueError (bad spec) or BackendUnavailable."""
    backends, explicit = parse_spec(spec)
    impls, problems = {}, []
    for op, backend in backends.items():
        # linear_cross_entropy is only used when asked for by name; a default backend that lacks it
        # is not an error, the attribute then raises when called.
        fn, reason = _resolve(op, backend)
        if fn is None:
            if op == "linear_cross_entropy" and op not in explicit:
                fn = _Unavailable(op, backend, reason)
            else:
                problems.append(f"{op}={backend}: {reason}")
        impls[op] = fn
    if problems:
        raise BackendUnavailable(f"kernel spec {spec!r} cannot run here:\n  " + "\n  ".join(problems))
    for op, names in COMPANIONS.items():
        module = importlib.import_module(_REGISTRY[op][backends[op]].split(":")[0])
        for name in names:
            impls[name] = getattr(module, name)
    return Ops(spec, backends, explicit, impls)


class _Unavailable:
    def __init__(self, op, backend, reason):
        self.op, self.backend, self.reason = op, backend, reason

    def __call__(self, *args, **kwargs):
        raise BackendUnavailable(f"{self.op}={self.backend}: {self.reason}")


def set_loss_row_checks(enabled):
    """The fused cross-entropies (triton and cuda, and linear_cross_entropy) raise ValueError on an
    invalid row (every real logit -inf, NaN, or a target outside the vocab) by reading one scalar back
    per call: a host-device sync. A caller that checks the loss itself (gpt2.train reads it once per
    optimizer step and stops on NaN) turns this off; invalid rows then make the loss NaN. Returns the
    previous setting."""
    import kernels.classifier
    import kernels.linear_cross_entropy

    previous = kernels.linear_cross_entropy.CHECK_ROWS
    kernels.linear_cross_entropy.CHECK_ROWS = bool(enabled)
    kernels.classifier.CHECK_ROWS = bool(enabled)
    return previous


def available():
    """{backend: {op: (ok, reason_or_None)}} for every backend and op: what can run on this machine."""
    table = {}
    for backend in BACKENDS:
        table[backend] = {}
        for op in OPS:
            try:
                fn, reason = _resolve(op, backend)
            except Exception as e:  # an implementation that fails to import is reported, not hidden
                fn, reason = None, f"{type(e).__name__}: {e}"
            table[backend][op] = (fn is not None, reason)
    return table
