"""kernels/_eager.py: eager calls of the public functions skip the dispatcher (a plain autograd.Function
over each custom op's own implementation and autograd formula). The fast path must give bitwise the
same outputs and gradients as the custom-op path, and must really be the path taken (grad_fn names).
Host-time effect: python -m bench.host_overhead."""
import contextlib

import pytest
import torch

from kernels import _eager
from tests.conftest import HAS_CUDA, requires_cuda


def _layer_norm(device):
    from kernels.layernorm import layer_norm

    x = torch.randn(3, 5, 40, device=device)
    w, b = torch.randn(40, device=device), torch.randn(40, device=device)
    return layer_norm, (x, w, b), "_EagerLayerNorm"


def _add_layer_norm(device):
    from kernels.layernorm import add_layer_norm

    x, r = torch.randn(3, 5, 40, device=device), torch.randn(3, 5, 40, device=device).to(torch.bfloat16)
    w, b = torch.randn(40, device=device), torch.randn(40, device=device)
    return (lambda x, r, w, b: add_layer_norm(x, r, w, b)[1]), (x, r, w, b), "_EagerAddLayerNorm"


def _gelu(device):
    from kernels.gelu import gelu

    return gelu, (torch.randn(7, 33, device=device) * 3,), "_EagerGelu"


def _attention(device):
    from kernels.attention import attention

    q, k, v = (torch.randn(1, 2, 37, 32, device=device, dtype=torch.float16) for _ in range(3))
    return attention, (q, k, v), "_EagerAttention"


def _attention_qkv(device):
    from kernels.attention import attention_qkv

    return (lambda qkv: attention_qkv(qkv, 2)), (torch.randn(2, 37, 3 * 64, device=device, dtype=torch.float16),), \
        "_EagerAttentionQKV"


def _cross_entropy(device):
    from kernels.cross_entropy import cross_entropy

    logits, targets = torch.randn(9, 48, device=device), torch.randint(0, 45, (9,), device=device)
    targets[2] = -1
    return (lambda x: cross_entropy(x, targets, -1, 45)), (logits,), "_EagerCrossEntropy"


def _cross_entropy_cuda(device):
    from kernels import classifier

    reason = classifier.unavailable_reason()
    if reason:
        pytest.skip(f"classifier extension: {reason}")
    logits, targets = torch.randn(9, 48, device=device), torch.randint(0, 45, (9,), device=device)
    targets[2] = -1
    return (lambda x: classifier.cross_entropy(x, targets, -1, 45)), (logits,), "_EagerCrossEntropy"


def _ops():
    return pytest.mark.parametrize(
        "make", [_layer_norm, _add_layer_norm, _gelu, _attention, _attention_qkv, _cross_entropy, _cross_entropy_cuda],
        ids=["layer_norm", "add_layer_norm", "gelu", "attention", "attention_qkv", "cross_entropy_triton",
             "cross_entropy_cuda"])


def _run(fn, inputs):
    inputs = [t.clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    grad_fn = type(out.grad_fn).__name__
    out.backward(torch.randn_like(out))
    return [out.detach()] + [t.grad for t in inputs], grad_fn


@_ops()
def test_fast_path_is_taken_and_equals_the_op(make, device, monkeypatch):
    fn, inputs, eager_name = make(device)
    torch.manual_seed(1)
    fast, fast_grad_fn = _run(fn, inputs)
    monkeypatch.setattr(_eager, "ENABLED", False)
    torch.manual_seed(1)
    via_op, op_grad_fn = _run(fn, inputs)
    assert fast_grad_fn.startswith(eager_name), fast_grad_fn  # the fast path ran...
    assert not op_grad_fn.startswith(eager_name), op_grad_fn  # ...and switching it off reaches the op
    for i, (a, b) in enumerate(zip(fast, via_op)):
        assert not torch.isnan(a).any()
        assert torch.equal(a, b), f"output {i} differs between the fast path and the custom op"


def test_int_helpers_match_triton():
    import triton

    for n in (1, 2, 3, 7, 8, 1000, 1024, 1025, 50304):
        assert _eager.next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 7, 64):
            assert _eager.cdiv(n, d) == triton.cdiv(n, d)


@_ops()
@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "custom_op"])
def test_backward_gets_no_zero_filled_gradients(make, fast, device, monkeypatch):
    """Auxiliary outputs (LayerNorm's mean / rstd, attention's lse, the losses' dlogits; add_layer_norm's s
    when only y is used) get no zero-filled gradient from autograd: at GPT-2 shapes that was a 1.65 GB
    allocation and memset per cross-entropy backward, and a memset launch per LayerNorm / attention call."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setattr(_eager, "ENABLED", fast)
    fn, inputs, _ = make(device)
    warm = [t.clone().requires_grad_() for t in inputs]
    fn(*warm).sum().backward()  # compiles (and on a GPU autotunes: do_bench zeroes a buffer) before profiling
    inputs = [t.clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    dy = torch.randn_like(out)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out.backward(dy)
    zeros = [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zeros_like", "aten::zero_")]
    assert not zeros, zeros
    assert all(t.grad is not None for t in inputs)


# ---- double backward: both paths raise (the Triton backward kernels have no derivative) ------------------

_MINE = pytest.mark.parametrize("make", [_layer_norm, _add_layer_norm, _gelu, _attention, _attention_qkv],
                                ids=["layer_norm", "add_layer_norm", "gelu", "attention", "attention_qkv"])


@_MINE
@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "custom_op"])
@pytest.mark.parametrize("loss", ["sum", "square"])
def test_double_backward_raises(make, fast, loss, device, monkeypatch):
    """A derivative of a gradient (create_graph=True) raises on both paths. The fast path used to return
    first derivatives without a graph: a second derivative through them silently dropped every
    higher-order term (e.g. gelu's second derivative came out as 0). `sum`: the incoming gradient is a
    constant (torch's own once_differentiable would not catch that case); `square`: it requires grad."""
    monkeypatch.setattr(_eager, "ENABLED", fast)
    fn, inputs, eager_name = make(device)
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    assert type(out.grad_fn).__name__.startswith(eager_name) == fast
    f = out.float().sum() if loss == "sum" else (out.float() ** 2).sum()
    grads = torch.autograd.grad(f, leaves, create_graph=True)
    first = torch.autograd.grad((fn(*leaves).float().sum() if loss == "sum" else (fn(*leaves).float() ** 2).sum()),
                                leaves)
    for g, want in zip(grads, first):  # the first derivatives themselves are right
        assert torch.equal(g.detach(), want)
    with pytest.raises(RuntimeError, match="double backward|no autograd formula"):
        sum((g.float() ** 2).sum() for g in grads).backward()


# ---- devices: every launch on its tensors' device; meta tensors for shape inference ---------------------

def test_on_device_switches_only_when_needed(monkeypatch):
    """Triton launches on the *current* CUDA device: on_device(t) makes t's device current, and is a shared
    no-op context when it already is (or t is not on a GPU)."""
    from types import SimpleNamespace

    assert isinstance(_eager.on_device(torch.zeros(1)), contextlib.nullcontext)
    assert isinstance(_eager.on_device(torch.zeros(1, device="meta")), contextlib.nullcontext)
    on_gpu1 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = _eager.on_device(on_gpu1)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert isinstance(_eager.on_device(on_gpu1), contextlib.nullcontext)


@pytest.mark.skipif(HAS_CUDA, reason="records the interpreter's launches (CPU)")
def test_every_launch_runs_under_the_device_guard(monkeypatch):
    """Each kernel launch of layer_norm, add_layer_norm, gelu, attention, the Triton cross-entropy (fwd + bwd)
    and AdamW (step and grad check) happens inside on_device(t) for one of its own tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    from kernels import adamw, attention, cross_entropy, gelu, layernorm

    depth, guarded, launches = [0], [], []

    @contextlib.contextmanager
    def recording(t):
        guarded.append(t.device)
        depth[0] += 1
        try:
            with _eager.on_device(t):
                yield
        finally:
            depth[0] -= 1

    for mod in (layernorm, gelu, attention, adamw, cross_entropy):
        monkeypatch.setattr(mod, "on_device", recording)
    run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run",
                        lambda self, *a, **k: (launches.append((self.__name__, depth[0])), run(self, *a, **k))[1])
    for make in (_layer_norm, _add_layer_norm, _gelu, _attention, _attention_qkv, _cross_entropy):
        for fast in (True, False):
            monkeypatch.setattr(_eager, "ENABLED", fast)
            fn, inputs, _ = make("cpu")
            _run(fn, inputs)
    p = torch.randn(10, requires_grad=True)
    p.grad = torch.randn(10)
    adamw.AdamW([p], skip_nonfinite=True).step()
    names = {name for name, _ in launches}
    assert {"_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_gelu_fwd_kernel", "_gelu_bwd_kernel",
            "_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
            "_adamw_kernel", "_nonfinite_kernel", "_ce_kernel", "_scale_kernel"} <= names, names
    unguarded = [name for name, d in launches if d == 0]
    assert not unguarded, unguarded
    assert guarded and all(d == torch.device("cpu") for d in guarded)


requires_two_gpus = pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@requires_cuda
@requires_two_gpus
@_MINE
@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "custom_op"])
def test_tensors_on_a_gpu_that_is_not_current(make, fast, monkeypatch):
    """Tensors on cuda:1 while cuda:0 is current: the launches go to cuda:1 (and its stream), same results
    as on cuda:0. Before, Triton launched them on the current device: an illegal access, or a race."""
    monkeypatch.setattr(_eager, "ENABLED", fast)
    fn, inputs, _ = make("cuda:0")
    with torch.cuda.device(0):
        torch.manual_seed(1)
        want, _ = _run(fn, inputs)
        torch.manual_seed(1)
        got, _ = _run(fn, [t.to("cuda:1") for t in inputs])
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    for a, b in zip(got, want):
        assert a.device == torch.device("cuda:1")
        torch.testing.assert_close(a.cpu(), b.cpu())


@_MINE
@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "custom_op"])
def test_meta_tensors_forward_and_backward(make, fast, device, monkeypatch):
    """Shape inference on meta tensors (`with torch.device("meta"): model(idx)`): the fast path used to run
    the real kernel (attention: a crash; layer_norm, gelu: 'tensors on meta are not supported'), and gelu's
    fake implementation rejected meta. Now meta takes the op, whose fake implementation runs. The reference
    runs on `device`: on a GPU machine (no TRITON_INTERPRET) the Triton kernels refuse CPU tensors."""
    monkeypatch.setattr(_eager, "ENABLED", fast)
    fn, inputs, _ = make(device)
    metas = [t.to("meta").requires_grad_() for t in inputs]
    out = fn(*metas)
    ref = fn(*[t.clone() for t in inputs])
    assert out.is_meta and out.shape == ref.shape and out.dtype == ref.dtype
    out.backward(torch.empty_like(out))
    for m in metas:
        assert m.grad is not None and m.grad.is_meta and m.grad.shape == m.shape



# ---- the helpers themselves (mutation testing: nothing pinned these directly) ---------------------------

def test_fast_path_only_in_eager_mode(monkeypatch):
    x = torch.zeros(2)
    assert _eager.fast_path(x)
    assert not _eager.fast_path(x.to("meta"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # while torch.compile traces
    assert not _eager.fast_path(x)
    monkeypatch.undo()
    monkeypatch.setattr(_eager, "ENABLED", False)
    assert not _eager.fast_path(x)


def test_check_devices(monkeypatch):
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _eager.check_devices("op", cpu, cpu)
    _eager.check_devices("op", meta, meta, meta_ok=True)
    with pytest.raises(ValueError, match=r"op \(triton\): tensors on different devices \(cpu and meta\)"):
        _eager.check_devices("op", cpu, meta, meta_ok=True)
    with pytest.raises(ValueError, match="different devices"):
        _eager.check_devices("op", cpu, cpu, meta)
    with pytest.raises(ValueError, match="tensors on meta are not supported"):
        _eager.check_devices("op", meta, meta)
    monkeypatch.delenv("TRITON_INTERPRET")  # the CPU only in Triton's interpreter
    with pytest.raises(ValueError, match="tensors on cpu are not supported.*TRITON_INTERPRET=1"):
        _eager.check_devices("op", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="tensors on cpu are not supported"):
        _eager.check_devices("op", cpu, cpu)
