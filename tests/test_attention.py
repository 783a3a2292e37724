"""kernels/attention.py (Triton FlashAttention-2, causal) against float64 and kernels.reference.attention.

In the interpreter (no GPU) Triton runs each program in numpy: shapes stay tiny (B*H = 2) and bf16 is
left to the GPU (Triton 3.8's interpreter gets tl.dot on bf16 wrong). The rule (tests/numerics.py): the
kernel's max error against float64 is at most 2x the reference op's error in the same dtype + atol.
"""
import math

import pytest
import torch

import kernels
from kernels import attention as A
from kernels import reference
from kernels.attention import attention, attention_bwd, attention_fwd
from tests.conftest import HAS_CUDA, INTERPRET, requires_cuda
from tests.numerics import assert_close

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def attention64(q, k, v):
    """softmax(QK^T / sqrt(D) + causal mask) V in float64, written out (independent of both backends)."""
    q, k, v = q.double(), k.double(), v.double()
    T, D = q.shape[-2], q.shape[-1]
    s = q @ k.transpose(-2, -1) / math.sqrt(D)
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def run(fn, q, k, v, do):
    """fn's output and (dq, dk, dv) for upstream gradient do, on fresh leaves with the inputs' strides
    (detach, not clone: a clone would make the model's strided views contiguous)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return (out.detach(), *(t.grad for t in leaves))


def inputs(B, H, T, D, dtype, device):
    q, k, v = (torch.randn(B, H, T, D, device=device).to(dtype) for _ in range(3))
    return q, k, v, torch.randn(B, H, T, D, device=device).to(dtype)


def check_against_float64(q, k, v, do):
    got = run(attention, q, k, v, do)
    base = run(reference.attention, q, k, v, do)
    truth = run(attention64, q, k, v, do.double())
    atol = ATOL[q.dtype]
    for name, g, b, t in zip(("out", "dq", "dk", "dv"), got, base, truth):
        assert g.dtype == q.dtype, f"{name}: dtype {g.dtype}"
        assert_close(g, t, b, atol=atol, name=name)


# T: 1, below one tile, exactly tiles, uneven, many tiles. D: all supported at an uneven T.
CASES = ([(T, 64, torch.float16) for T in (1, 17, 64, 100, 257)]
         + [(100, 32, torch.float16), (100, 128, torch.float16)]
         + [(17, 64, torch.float32), (100, 32, torch.float32), (257, 128, torch.float32)])


@pytest.mark.parametrize("T,D,dtype", CASES, ids=[f"T{T}-D{D}-{str(dt)[6:]}" for T, D, dt in CASES])
def test_matches_float64(T, D, dtype, device):
    check_against_float64(*inputs(1, 2, T, D, dtype, device))


@pytest.mark.skipif(HAS_CUDA, reason="the GPU autotunes over its own configs")
@pytest.mark.parametrize("tiles", [
    {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)},  # square tiles, as the GPU's 64x64 configs
    {"fwd": (64, 16), "dkdv": (16, 64), "dq": (64, 16)},  # ratio 4, as the GPU's 128x32 / 32x128 configs
], ids=["square", "ratio4"])
def test_tile_shapes(tiles, monkeypatch, device):
    """The diagonal stage with 1 and 4 steps per tile (the default interpreter config has 2)."""
    import kernels.attention as mod

    monkeypatch.setattr(mod, "_INTERPRETER_CONFIG", tiles)
    check_against_float64(*inputs(1, 2, 91, 32, torch.float16, device))


@requires_cuda
@pytest.mark.parametrize("T", [1, 100, 1024, 4096])
def test_bf16_gpu(T, device):
    check_against_float64(*inputs(1, 4, T, 64, torch.bfloat16, device))


@requires_cuda
@pytest.mark.parametrize("D", [32, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_head_dims_gpu(D, dtype, device):
    check_against_float64(*inputs(2, 3, 1000, D, dtype, device))


def model_views(B, H, T, D, dtype, device):
    """q, k, v as the model makes them: (B, T, 3C).split(C, 2) -> view (B, T, H, D) -> transpose(1, 2)."""
    C = H * D
    qkv = torch.randn(B, T, 3 * C, device=device).to(dtype)
    return [t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(C, dim=2)]


def test_strided_inputs_not_copied_and_same_result(device):
    """The model's non-contiguous views give bitwise the same values as contiguous copies, and the
    outputs come back in (B, T, H, D) memory (so the model's transpose + reshape after it is free)."""
    B, H, T, D = 1, 2, 45, 32
    q, k, v = model_views(B, H, T, D, torch.float16, device)
    assert not q.is_contiguous()
    do = torch.randn(B, T, H, D, device=device).to(torch.float16).transpose(1, 2)  # as the model's backward
    strided = run(attention, q, k, v, do)
    dense = run(attention, q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous())
    for name, a, b in zip(("out", "dq", "dk", "dv"), strided, dense):
        assert torch.equal(a, b), name
    # Layout of what the kernels return (a leaf's .grad would not show it: autograd makes the .grad of a
    # non-dense leaf contiguous).
    out, lse = attention_fwd(q, k, v)
    dq = attention_bwd(do, q, k, v, out, lse)[0]
    assert out.stride() == (T * H * D, D, H * D, 1) and dq.stride() == (T * H * D, D, H * D, 1)
    assert out.transpose(1, 2).reshape(B, T, H * D).data_ptr() == out.data_ptr()
    check_against_float64(q, k, v, do)


def test_non_unit_last_stride_and_broadcast_grad(device):
    """A last dim that is not contiguous is copied; `out.sum().backward()` gives an expanded (stride 0) dO."""
    q, k, v, _ = inputs(1, 2, 20, 32, torch.float32, device)
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, last-dim stride T
    assert qt.stride(-1) != 1
    leaves = [t.clone().requires_grad_() for t in (qt, k, v)]
    attention(*leaves).sum().backward()
    want = run(attention64, q, k, v, torch.ones(1, 2, 20, 32, dtype=torch.float64, device=device))
    for got, ref64 in zip((t.grad for t in leaves), want[1:]):
        assert (got.double() - ref64).abs().max() < 1e-5


def test_deterministic_backward(device):
    q, k, v, do = inputs(1, 2, 70, 64, torch.float16, device)
    first, second = run(attention, q, k, v, do), run(attention, q, k, v, do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_lse_is_the_log_sum_exp(device):
    q, k, v, _ = inputs(1, 2, 33, 32, torch.float32, device)
    _, lse = attention_fwd(q, k, v)
    s = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(32)
    s = s.masked_fill(~torch.ones(33, 33, dtype=torch.bool, device=device).tril(), float("-inf"))
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 33)
    assert (lse.double() - torch.logsumexp(s, dim=-1)).abs().max() < 1e-5


def test_opcheck(device):
    q, k, v, do = inputs(1, 2, 19, 32, torch.float32, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(attention_fwd, (q, k, v))
    out, lse = attention_fwd(q.detach(), k.detach(), v.detach())
    torch.library.opcheck(attention_bwd, (do, q.detach(), k.detach(), v.detach(), out, lse))


def test_eager_path_is_the_op(device):
    """attention() in eager skips the dispatcher (autograd.Function over the ops' implementations): bitwise
    the same output and gradients as going through gpt2k::attention_fwd / _bwd and their autograd."""
    q, k, v, do = inputs(1, 2, 37, 32, torch.float16, device)
    fast = run(attention, q, k, v, do)
    via_op = run(lambda *x: attention_fwd(*x)[0], q, k, v, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, via_op):
        assert torch.equal(a, b), name


def test_torch_compile(device):
    """Traced through the op's fake (meta) implementation, runs the real kernel: same values as eager."""
    q, k, v, do = inputs(1, 2, 24, 32, torch.float32, device)
    eager = run(attention, q, k, v, do)
    compiled = run(torch.compile(attention, backend="aot_eager", fullgraph=True), q, k, v, do)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


@pytest.mark.parametrize("change,match", [
    (lambda q, k, v: (q[..., :16], k[..., :16], v[..., :16]), "head dim D = 16 not supported; supported: 32, 64, 128"),
    (lambda q, k, v: (q, k[:, :, :3], v), "same shape"),
    (lambda q, k, v: (q[0], k[0], v[0]), "must be 4-D"),
    (lambda q, k, v: (q, k.half(), v), "same dtype"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "supported: bfloat16, float16, float32"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), "supported: bfloat16, float16, float32"),
    (lambda q, k, v: (q, k, v.to("meta")), "different devices"),
])
def test_bad_input_errors(change, match, device):
    q, k, v, _ = inputs(1, 1, 4, 32, torch.float32, device)
    with pytest.raises((ValueError, TypeError), match=match):
        attention(*change(q, k, v))


@pytest.mark.skipif(HAS_CUDA, reason="the error is for CPU tensors without the interpreter")
def test_cpu_without_interpreter_errors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q = torch.randn(1, 1, 4, 32)
    with pytest.raises(ValueError, match="supported: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1"):
        attention(q, q, q)


def test_empty_batch(device):
    q = torch.randn(0, 2, 5, 32, device=device, requires_grad=True)
    out = attention(q, q, q)
    out.sum().backward()
    assert out.shape == q.shape and q.grad.shape == q.shape


def test_compiles_for_sm80_sm90_without_spills():
    """Every kept autotune config (and fallback config) of every kernel, at D=64, T=1024, bf16: zero spills,
    shared memory fits, and the dots on tensor cores: wgmma on sm_90 for every autotune config (AotSpec.mma),
    mma.sync on sm_80."""
    from concurrent.futures import ThreadPoolExecutor

    from kernels import attention as mod
    from kernels._triton_utils import check_report, static_report

    with ThreadPoolExecutor(2) as pool:  # one compiler subprocess per architecture
        rows = [r for rs in pool.map(lambda arch: static_report(["kernels.attention"], archs=(arch,)), (80, 90))
                for r in rs]
    fallbacks = sum(len(c) for c in mod._FALLBACK_CONFIGS.values())  # compiled too: no spills at this shape
    assert len(rows) == 2 * (len(mod._FWD_CONFIGS) + len(mod._DKDV_CONFIGS) + len(mod._DQ_CONFIGS) + fallbacks + 1)
    problems = [f"{r['name']} {r['arch']}: {r.get('error') or check_report(r)}" for r in rows
                if "error" in r or check_report(r)]
    assert not problems, "\n".join(problems)


def test_model_matches_torch_backend():
    """Tiny GPT with attention=triton vs the torch backend in fp32: loss and every gradient against a
    float64 run of the torch backend, by the numerical rule."""
    from gpt2.model import GPT, GPTConfig

    device = "cuda" if HAS_CUDA else "cpu"
    config = GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    base = GPT(config, kernels="torch").to(device)
    idx = torch.randint(0, 100, (2, 29), device=device)
    targets = torch.randint(0, 100, (2, 29), device=device)

    def loss_and_grads(model):
        model.zero_grad(set_to_none=True)
        _, loss = model(idx, targets)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ours = GPT(config, kernels="torch,attention=triton").to(device)
    ours.load_state_dict(base.state_dict())
    truth = GPT(config, kernels="torch").to(device).double()
    truth.load_state_dict(base.state_dict())
    loss, grads = loss_and_grads(ours)
    loss_b, grads_b = loss_and_grads(base)
    loss_t, grads_t = loss_and_grads(truth)
    assert_close(loss, loss_t, loss_b, atol=1e-6, name="loss")
    assert grads.keys() == grads_b.keys() and len(grads) > 10
    for name in grads:
        assert_close(grads[name], grads_t[name], grads_b[name], atol=1e-6, name=name)


def test_backward_rejects_a_wrong_lse(device):
    q, k, v, do = inputs(1, 2, 17, 32, torch.float32, device)
    out, lse = attention_fwd(q, k, v)
    for bad in (lse[..., :-1], lse.double(), lse.unsqueeze(-1)):
        with pytest.raises(ValueError, match="lse"):
            attention_bwd(do, q, k, v, out, bad)


@pytest.mark.skipif(not INTERPRET, reason="about Triton's interpreter (CPU)")
def test_bf16_in_the_interpreter_raises_instead_of_computing_garbage():
    """Triton 3.8's interpreter computes tl.dot on bf16 wrongly: a probe (one 16x16 tl.dot against
    torch.matmul) decides, and bf16 attention on the CPU then raises, naming what works, instead of
    returning garbage. Where the probe passes (a fixed Triton), bf16 must be right."""
    q, k, v = (torch.randn(1, 2, 16, 32).to(torch.bfloat16) for _ in range(3))
    reason = A._interpreter_bf16_dot_error()
    if reason is None:
        check_against_float64(q, k, v, torch.randn(1, 2, 16, 32).to(torch.bfloat16))
        return
    assert "tl.dot on bfloat16" in reason and "float16 or float32" in reason
    with pytest.raises(kernels.BackendUnavailable, match="interpreter computes tl.dot on bfloat16 wrongly"):
        attention(q, k, v)
    for dtype in (torch.float16, torch.float32):  # the probe does not block what works
        attention(q.to(dtype), k.to(dtype), v.to(dtype))


# ---- int32 row offsets, gridDim.y, shared-memory fallback (review fixes) ----------------------------------

def _huge_stride_views(T, D, dtype, n, device):
    """n (1, 1, T, D) views into one buffer with row stride S = 2^27: the last row starts at element
    (T - 1) * 2^27 >= 2^31 for T >= 17, past int32 row offsets. The buffer is ~4 GiB of address space,
    but only the rows' pages are ever touched (torch.empty does not write it)."""
    S = 1 << 27
    store = torch.empty((T - 1) * S + n * D, dtype=dtype, device=device)
    views = [store[i * D:].as_strided((1, 1, T, D), (0, 0, S, 1)) for i in range(n)]
    for v in views:
        v.copy_(torch.randn(1, 1, T, D, device=device).to(dtype))
    return views


def check_rows_past_int32_offsets(T, device):
    q, k, v, do = _huge_stride_views(T, 32, torch.float16, 4, device)
    assert T * q.stride(2) >= 2**31
    out, lse = attention_fwd(q, k, v)
    dq, dk, dv = attention_bwd(do, q, k, v, out, lse)
    want = run(attention64, *(t.contiguous() for t in (q, k, v)), do.contiguous().double())
    base = run(reference.attention, *(t.contiguous() for t in (q, k, v)), do.contiguous())
    for name, g, t, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want, base):
        assert g.is_contiguous(), name
        assert_close(g, t, b, atol=ATOL[torch.float16], name=name)


def test_rows_past_int32_offsets_are_copied(device):
    """A view whose rows lie 2^27 elements apart: T * stride_t >= 2^31 used to wrap the kernels' int32 row
    offsets (wrong rows or an illegal address on a GPU; a segfault in the interpreter). The launcher now hands
    the kernels a contiguous copy of such an input: forward and backward match float64, outputs come back
    contiguous. In a subprocess: a regression crashes it, not the test session (or the CUDA context)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("from tests.test_attention import check_rows_past_int32_offsets as check\n"
            f"for T in (17, 40):\n    check(T, {device!r})\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.returncode, out.stderr[-3000:])


def test_int32_row_limit_decides_the_layout(monkeypatch, device):
    """The rule itself, with the limit lowered: an input whose T * stride_t + D reaches it is copied to
    (B, H, T, D) memory, and an output that would (the model's (B, T, H, D) layout) is allocated contiguous;
    the real fake implementation agrees (torch.compile / meta)."""
    B, H, T, D = 1, 2, 45, 32
    q, k, v = model_views(B, H, T, D, torch.float16, device)  # stride_t = 3 * H * D = 192
    assert A._kernel_layout(q) is q and A._like(q).stride(2) == H * D
    monkeypatch.setattr(A, "_INT32_ROWS", T * 3 * H * D)  # q's rows reach it, a (B, T, H, D) output's do not
    qk = A._kernel_layout(q)
    assert qk is not q and qk.stride() == (H * T * D, T * D, D, 1) and torch.equal(qk, q)
    assert A._like(q).stride(2) == H * D
    monkeypatch.setattr(A, "_INT32_ROWS", T * H * D)  # now a (B, T, H, D) output's rows reach it too
    assert A._like(q).is_contiguous()
    out = attention_fwd(q, k, v)[0]
    assert out.is_contiguous()
    fake = attention_fwd(*(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in (q, k, v)))[0]
    assert fake.stride() == out.stride()
    monkeypatch.undo()
    assert torch.equal(out, attention_fwd(q, k, v)[0])


@pytest.mark.parametrize("B,H,limit", [(3, 2, 4), (2, 5, 3)], ids=["batch_chunks", "head_chunks"])
def test_launches_respect_the_grid_y_limit(B, H, limit, monkeypatch, device):
    """Each launch puts its (batch, head) pairs on the grid's y axis, which CUDA caps at 65535. With the
    limit lowered, a bigger B * H is launched in chunks (of the batch; of the heads when H alone is over
    it), every launch within the limit, with bitwise the results of one launch."""
    q, k, v, do = inputs(B, H, 37, 32, torch.float16, device)
    whole = run(attention, q, k, v, do)
    grids = []
    launch = A._launch
    monkeypatch.setattr(A, "_launch", lambda fn, kind, rows, bh, args, consts: (
        grids.append(bh), launch(fn, kind, rows, bh, args, consts)))
    monkeypatch.setattr(A, "MAX_GRID_Y", limit)
    chunked = run(attention, q, k, v, do)
    assert len(grids) > 3 and max(grids) <= limit and sum(grids) == 3 * B * H  # fwd, dK/dV, dQ kernels
    for name, a, b in zip(("out", "dq", "dk", "dv"), chunked, whole):
        assert torch.equal(a, b), name


_SMEM = {"A100": 166912, "H100": 232448, "RTX 4090": 101376}


@pytest.mark.parametrize("gpu", list(_SMEM))
def test_prune_never_returns_a_config_over_shared_memory(gpu, monkeypatch):
    """For every dtype and head dim at short and long T, the pruned configs fit the GPU's shared memory by
    the estimate. fp32 at D=128 on an A100 used to fall back to the forward's 64x64 s3 tile (180,480 B of
    shared memory on sm_80 > 166,912: OutOfResources at launch)."""
    from types import SimpleNamespace

    props = SimpleNamespace(shared_memory_per_block_optin=_SMEM[gpu])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    for kind, table in (("fwd", A._FWD_CONFIGS), ("dkdv", A._DKDV_CONFIGS), ("dq", A._DQ_CONFIGS)):
        for dtype in A.DTYPES:
            for D in A.HEAD_DIMS:
                for t_bucket in (1, 16, 1024):
                    q = torch.empty(1, 1, 1, D, dtype=dtype)
                    kept = A._prune(kind)(A._configs(table), {"T_BUCKET": t_bucket, "Q": q}, HEAD_DIM=D)
                    assert kept
                    for c in kept:
                        assert A._smem_bytes(kind, c, D, q.element_size()) <= _SMEM[gpu], (kind, dtype, D, c)


def test_prune_raises_when_nothing_fits(monkeypatch):
    from types import SimpleNamespace

    props = SimpleNamespace(shared_memory_per_block_optin=16 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    q = torch.empty(1, 1, 1, 128, dtype=torch.float32)
    with pytest.raises(kernels.BackendUnavailable, match="shared memory.*16384 B"):
        A._prune("fwd")(A._configs(A._FWD_CONFIGS), {"T_BUCKET": 1024, "Q": q}, HEAD_DIM=128)


def test_fp32_d128_configs_fit_an_a100():
    """What the prune picks for fp32 at D=128 on an A100, compiled for sm_80 (no GPU needed): its real
    shared memory is within the 166,912 B limit (register spills are expected: fp32 is the slow path)."""
    import json
    import os
    import subprocess
    import sys
    from types import SimpleNamespace
    from unittest import mock

    picked = {}
    props = SimpleNamespace(shared_memory_per_block_optin=_SMEM["A100"])
    with mock.patch.object(torch.cuda, "get_device_properties", lambda device: props):
        q = torch.empty(1, 1, 1, 128, dtype=torch.float32)
        for kind, table in (("fwd", A._FWD_CONFIGS), ("dkdv", A._DKDV_CONFIGS), ("dq", A._DQ_CONFIGS)):
            kept = A._prune(kind)(A._configs(table), {"T_BUCKET": 1024, "Q": q}, HEAD_DIM=128)
            picked[kind] = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
    script = f"""
import dataclasses, json
from kernels import attention as A
from kernels._triton_utils import aot_compile
picked = {picked!r}
rows = []
for s in A.compile_specs():
    kind = s.name.split()[0].replace("attention_", "").replace("bwd_", "")
    if kind in picked and any(f"BLOCK_M={{bm}} BLOCK_N={{bn}} w{{w}} s{{st}}" in s.name for bm, bn, w, st in picked[kind]):
        sig = {{k: v.replace("bf16", "fp32") for k, v in s.signature.items()}}
        spec = dataclasses.replace(s, signature=sig, constexprs=dict(s.constexprs, HEAD_DIM=128, DOT_PREC="ieee"))
        r = aot_compile(spec, 80)
        rows.append((s.name, r["shared_bytes"], r["shared_limit"]))
print(json.dumps(rows))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(rows) == sum(len(v) for v in picked.values()), (rows, picked)
    for name, shared, limit in rows:
        assert limit == _SMEM["A100"] and shared <= limit, (name, shared)


# ---- gaps found by mutation testing (each test names the bug it catches) ----------------------------------

def test_q_k_v_do_each_in_its_own_layout(device):
    """q, k, v and dO in four different layouts, B = 2: each kernel must read every tensor through its own
    strides and write each gradient in its own input's layout. With the model's views all four share one
    layout, so reading v with k's strides, or writing dK with dV's, went unnoticed."""
    B, H, T, D = 2, 2, 37, 32
    dt = torch.float16
    q = torch.randn(B, T, H, D, device=device).to(dt).transpose(1, 2)  # (B, T, H, D) memory
    k = model_views(B, H, T, D, dt, device)[1]  # rows 3C apart
    v = torch.randn(B, H, T, D, device=device).to(dt)  # contiguous
    do = torch.randn(H, B, T, D, device=device).to(dt).transpose(0, 1)  # (H, B, T, D) memory
    assert len({q.stride(), k.stride(), v.stride(), do.stride()}) == 4
    dense = run(attention, *(t.contiguous() for t in (q, k, v, do)))
    out, lse = attention_fwd(q, k, v)
    dq, dk, dv = attention_bwd(do, q, k, v, out, lse)
    btHd = (T * H * D, D, H * D, 1)
    assert out.stride() == dq.stride() == dk.stride() == btHd and dv.is_contiguous()
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), dense):
        assert torch.equal(a, b), name


def test_fake_implementations_match_the_real_ops(device):
    """The fake implementations (what torch.compile traces with; run here on meta tensors) give the real ops'
    shapes, dtypes and strides, in fp16 with the model's strided views and differing layouts. opcheck's fp32
    contiguous inputs cannot tell an lse in q's dtype, or contiguous outputs, from the right ones."""
    B, H, T, D = 2, 2, 19, 32
    q, k, v = model_views(B, H, T, D, torch.float16, device)
    v = v.contiguous()  # dv then differs from dk in layout
    do = torch.randn(B, T, H, D, device=device).to(torch.float16).transpose(1, 2)
    out, lse = attention_fwd(q, k, v)
    real = (out, lse, *attention_bwd(do, q, k, v, out, lse))
    meta = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in (do, q, k, v, out, lse)]
    fake_out, fake_lse = attention_fwd(*meta[1:4])
    fake = (fake_out, fake_lse, *attention_bwd(*meta))
    for name, r, f in zip(("out", "lse", "dq", "dk", "dv"), real, fake):
        assert f.is_meta and (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride()), name


def test_backward_rejects_a_wrong_do_or_o(device):
    """attention_bwd checks dO and O against q (shape and dtype), not only the lse. (Bigger shapes than q's
    where the check is about shape: without it the kernels would read them in bounds, not crash.)"""
    q, k, v, do = inputs(1, 2, 17, 32, torch.float32, device)
    out, lse = attention_fwd(q, k, v)
    for bad_do, bad_o in ((do.half(), out), (torch.cat([do, do[..., :1, :]], 2), out),
                          (do, out.half()), (do, torch.cat([out, out], 0))):
        with pytest.raises(ValueError, match=r"do .* and o .* must match q"):
            attention_bwd(bad_do, q, k, v, bad_o, lse)


def test_backward_rejects_tensors_on_another_device(device):
    """A meta tensor among real ones makes the dispatcher call the fake implementation: it runs the op's checks
    too, instead of returning uninitialized gradients. On a GPU, a CPU lse beside CUDA tensors is caught as well."""
    q, k, v, do = inputs(1, 2, 17, 32, torch.float32, device)
    out, lse = attention_fwd(q, k, v)
    others = [lambda t: t.to("meta")] + ([lambda t: t.cpu()] if HAS_CUDA else [])
    for other in others:
        for i in range(6):  # each of do, q, k, v, o, lse in turn
            args = [do, q, k, v, out, lse]
            args[i] = other(args[i])
            with pytest.raises(ValueError, match="different devices"):
                attention_bwd(*args)
    with pytest.raises(ValueError, match="do .* must match q"):  # dtype checks reach the fake as well
        attention_bwd(do.half(), q, k, v, out, lse.to("meta"))


def test_backward_reads_a_strided_lse(device):
    """An lse of the right shape and dtype in another layout ((B, T, H) memory) gives bitwise the gradients of
    the contiguous one: the kernels index the lse as contiguous (bh * T + t), so the launcher must make it so."""
    q, k, v, do = inputs(2, 2, 17, 32, torch.float32, device)
    out, lse = attention_fwd(q, k, v)
    strided = torch.empty(2, 17, 2, device=device).transpose(1, 2).copy_(lse)
    assert not strided.is_contiguous() and torch.equal(strided, lse)
    for name, a, b in zip(("dq", "dk", "dv"), attention_bwd(do, q, k, v, out, strided),
                          attention_bwd(do, q, k, v, out, lse)):
        assert torch.equal(a, b), name


def test_too_long_T_is_rejected(monkeypatch, device):
    """With the int32 limit lowered: T * D + D reaching it raises (real and fake implementations alike); one
    row less runs."""
    monkeypatch.setattr(A, "_INT32_ROWS", 20 * 32 + 32)
    q = torch.randn(1, 1, 20, 32, device=device)
    for t in (q, q.to("meta")):
        with pytest.raises(ValueError, match="T = 20 is too long at D = 32"):
            attention_fwd(t, t, t)
    short = q[:, :, :19]
    assert torch.isfinite(attention(short, short, short)).all()


def test_kernel_layout_copies_a_single_row_with_a_huge_stride(monkeypatch):
    """T = 1 with a row stride past the (lowered) int32 limit: .contiguous() would keep that stride (a size-1
    dim's stride is free), so the launcher copies explicitly. Every tensor it hands the kernels has
    T * stride_t + D below the limit."""
    monkeypatch.setattr(A, "_INT32_ROWS", 1000)
    x = torch.randn(1, 1, 2000, 32)[:, :, ::2000]  # (1, 1, 1, 32), row stride 2000 * 32
    assert x.is_contiguous() and x.stride(2) == 64000
    y = A._kernel_layout(x)
    assert y.stride(2) * 1 + 32 < 1000 and torch.equal(x, y)


# The interpreter (numpy) warns on exp2 overflows to inf in entries that the causal mask then zeroes (key rows
# past T load as 0: score 0 against an lse of -200): selected away by tl.where, never in a sum.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
def test_large_scores_need_the_running_max(device):
    """Every score of one head shifted by about -200, of the other by about +200 (a shared component of q and
    k): softmax does not change, but exp of the raw scores underflows / overflows in fp32. The online softmax
    must start its running max at -inf and subtract it; e.g. a max that starts at 0 underflows every exp2 of
    the negative head to 0 (0 / 0)."""
    B, H, T, D = 1, 2, 40, 32
    q, k, v, do = inputs(B, H, T, D, torch.float32, device)
    shift = 200 * math.sqrt(D) / 10  # q[..., 0] * k[..., 0] / sqrt(D) = +-200
    q[:, 0, :, 0], q[:, 1, :, 0], k[..., 0] = -shift, shift, 10.0
    s = q.double() @ k.double().transpose(-2, -1) / math.sqrt(D)
    assert s[:, 0].max() < -150 and s[:, 1].min() > 150
    check_against_float64(q, k, v, do)


# ---- attention_qkv: straight from the (B, T, 3C) projection --------------------------------------------

def _qkv_split(fn, H):
    """attention_qkv's reference path written out: split / view / transpose around fn(q, k, v)."""
    def call(qkv):
        B, T, C3 = qkv.shape
        C = C3 // 3
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=2))
        return fn(q, k, v).transpose(1, 2).reshape(B, T, C)
    return call


def _run_qkv(fn, qkv, dy):
    leaf = qkv.detach().requires_grad_()
    y = fn(leaf)
    y.backward(dy.to(y.dtype))
    return y.detach(), leaf.grad


@pytest.mark.parametrize("T,H,D,dtype", [
    (1, 2, 32, torch.float16), (37, 3, 32, torch.float16), (100, 2, 64, torch.float16), (29, 2, 128, torch.float32),
    pytest.param(1024, 12, 64, torch.bfloat16, marks=requires_cuda),  # GPT-2's heads, as the model runs them
])
def test_attention_qkv_matches_float64_and_the_split_path(T, H, D, dtype, device):
    """y and dqkv against float64 (the numerical rule, the reference op as baseline), and bitwise those of
    attention() on the split views with autograd's concatenation of dq, dk, dv: the same kernels, only
    written into one gradient. y and dqkv come back contiguous, in qkv's dtype."""
    qkv = torch.randn(2, T, 3 * H * D, device=device).to(dtype)
    dy = torch.randn(2, T, H * D, device=device).to(dtype)
    got = _run_qkv(lambda t: A.attention_qkv(t, H), qkv, dy)
    split = _run_qkv(_qkv_split(attention, H), qkv, dy)
    base = _run_qkv(lambda t: reference.attention_qkv(t, H), qkv, dy)
    truth = _run_qkv(_qkv_split(attention64, H), qkv.double(), dy.double())
    for name, g, s, b, t in zip(("y", "dqkv"), got, split, base, truth):
        assert g.dtype == dtype and g.is_contiguous(), name
        assert torch.equal(g, s), name
        assert_close(g, t, b, atol=ATOL[dtype], name=name)


def test_attention_qkv_reference_is_the_model_s_old_path(device):
    """kernels.reference.attention_qkv is GPT-2's usual split / view / transpose around reference.attention:
    bitwise the same output and gradient (so the torch backend's model did not change)."""
    qkv, dy = torch.randn(2, 21, 3 * 64, device=device), torch.randn(2, 21, 64, device=device)
    for a, b in zip(_run_qkv(lambda t: reference.attention_qkv(t, 2), qkv, dy),
                    _run_qkv(_qkv_split(reference.attention, 2), qkv, dy)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("start", [0, 1], ids=["offset0", "offset"])
def test_attention_qkv_strided_qkv_and_fast_path(start, device):
    """A qkv that is itself a strided view (every other row of a bigger buffer, from row `start`: a storage
    offset, as is dy's) and the eager fast path vs the custom op: bitwise equal, and the fast path is the one
    taken."""
    from kernels import _eager

    big = torch.randn(2, 40, 3 * 64, device=device).to(torch.float16)
    qkv, dy = big[:, start::2], torch.randn(2, 21, 64, device=device).to(torch.float16)[:, start:start + 20]
    assert not qkv.is_contiguous() and qkv.storage_offset() == 3 * dy.storage_offset() == start * 3 * 64
    leaf = qkv.detach().requires_grad_()
    assert type(A.attention_qkv(leaf, 2).grad_fn).__name__.startswith("_EagerAttentionQKV")
    fast = _run_qkv(lambda t: A.attention_qkv(t, 2), qkv, dy)
    _eager.ENABLED = False
    try:
        via_op = _run_qkv(lambda t: A.attention_qkv(t, 2), qkv, dy)
    finally:
        _eager.ENABLED = True
    contiguous = _run_qkv(lambda t: A.attention_qkv(t, 2), qkv.contiguous(), dy)
    for a, b, c in zip(fast, via_op, contiguous):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_attention_qkv_past_int32_rows_copies_once(monkeypatch, device):
    """When the (B, T, 3C) rows would overflow the kernels' int32 row offsets (limit lowered here), the
    backward computes dq, dk, dv apart and copies them into dqkv: the same values."""
    qkv, dy = torch.randn(1, 45, 3 * 64, device=device).to(torch.float16), torch.randn(1, 45, 64, device=device).to(torch.float16)
    want = _run_qkv(lambda t: A.attention_qkv(t, 2), qkv, dy)
    monkeypatch.setattr(A, "_INT32_ROWS", 45 * 3 * 64)
    slices = A._split_heads(torch.empty(1, 45, 3 * 64, device=device), 2)
    assert A._kernel_layout(slices[0]) is not slices[0]  # the case this test is about
    got = _run_qkv(lambda t: A.attention_qkv(t, 2), qkv, dy)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_attention_qkv_opcheck_compile_and_meta(device):
    qkv = torch.randn(1, 19, 3 * 64, device=device)
    torch.library.opcheck(A.attention_qkv_fwd, (qkv.clone().requires_grad_(), 2))
    y, lse = A.attention_qkv_fwd(qkv, 2)
    torch.library.opcheck(A.attention_qkv_bwd, (torch.randn_like(y), qkv, y, lse, 2))
    dy = torch.randn_like(y)
    eager = _run_qkv(lambda t: A.attention_qkv(t, 2), qkv, dy)
    compiled = _run_qkv(torch.compile(lambda t: A.attention_qkv(t, 2), backend="aot_eager", fullgraph=True), qkv, dy)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    meta = qkv.to("meta").requires_grad_()
    out = A.attention_qkv(meta, 2)
    assert out.is_meta and out.shape == (1, 19, 64)
    out.backward(torch.empty_like(out))
    assert meta.grad.is_meta and meta.grad.shape == qkv.shape


@pytest.mark.parametrize("make,match", [
    (lambda qkv: (qkv[0], 2), r"qkv must be a \(B, T, 3C\) tensor"),
    (lambda qkv: (qkv[..., :-1], 2), "last dim 191 must be 3 x n_head x head_dim"),
    (lambda qkv: (qkv, 0), "n_head must be an int >= 1"),
    (lambda qkv: (qkv, 2.0), "n_head must be an int >= 1"),
    (lambda qkv: (qkv[..., :96], 2), "head dim D = 16 not supported"),
    (lambda qkv: (qkv.double(), 2), "supported: bfloat16, float16, float32"),
    (lambda qkv: (qkv[None], 2), r"qkv must be a \(B, T, 3C\) tensor"),  # 4-D
    (lambda qkv: (qkv.tolist(), 2), r"qkv must be a \(B, T, 3C\) tensor"),  # not a tensor
    (lambda qkv: (qkv, True), "n_head must be an int >= 1"),  # a bool is not a head count
    (lambda qkv: (qkv[..., :128], 2), "last dim 128 must be 3 x n_head x head_dim"),  # n_head divides, 3 x n_head not
])
def test_attention_qkv_bad_input(make, match, device):
    """Each error says what is expected, from both backends; our op's fake implementation (meta tensors, as
    torch.compile and `with torch.device("meta")` use it) rejects the same inputs as the real call."""
    qkv = torch.randn(1, 4, 3 * 64, device=device)
    for fn in (A.attention_qkv, reference.attention_qkv):
        if fn is reference.attention_qkv and "head dim" in match or fn is reference.attention_qkv and "supported:" in match:
            continue  # kernel limits: the reference (SDPA) takes any head dim and float64
        with pytest.raises((ValueError, TypeError), match=match):
            fn(*make(qkv))
    if isinstance(make(qkv)[0], torch.Tensor):
        with pytest.raises((ValueError, TypeError), match=match):
            A.attention_qkv(*make(qkv.to("meta")))


@pytest.mark.parametrize("fake", [False, True], ids=["real", "meta"])
def test_attention_qkv_bwd_checks_its_inputs(fake, device):
    """attention_qkv_bwd (and its fake implementation) rejects a dy or y of the wrong shape or dtype and a wrong
    lse with a message, and returns dqkv contiguous in qkv's dtype (not fp32 left for autograd to cast)."""
    qkv = torch.randn(1, 6, 3 * 64, device=device).to(torch.float16)
    y, lse = A.attention_qkv_fwd(qkv, 2)
    dy = torch.randn_like(y)
    if fake:
        qkv, y, lse, dy = (t.to("meta") for t in (qkv, y, lse, dy))
    dqkv = A.attention_qkv_bwd(dy, qkv, y, lse, 2)
    assert dqkv.shape == qkv.shape and dqkv.dtype == torch.float16 and dqkv.is_contiguous()
    bad = [((dy[..., :-1], qkv, y, lse), r"dy has shape \(1, 6, 63\), expected \(1, 6, 64\)"),
           ((dy, qkv, y[:, :-1], lse), r"y has shape \(1, 5, 64\), expected \(1, 6, 64\)"),
           ((dy, qkv, y.float(), lse), r"and o \(1, 2, 6, 32\) torch.float32 must match q \(1, 2, 6, 32\) torch.float16"),
           ((dy.float(), qkv, y, lse), r"do \(1, 2, 6, 32\) torch.float32 and o \(1, 2, 6, 32\) torch.float16 must match"),
           ((dy, qkv, y, lse[:, :1]), r"lse \(1, 1, 6\) torch.float32 must be float32 of shape \(1, 2, 6\)")]
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            A.attention_qkv_bwd(*args, 2)


@pytest.mark.parametrize("limit", [None, 45 * 3 * 64], ids=["in_place", "past_int32_rows"])
def test_attention_qkv_bwd_writes_dqkv_in_place_unless_rows_pass_int32(limit, monkeypatch, device):
    """The backward's kernels write dq, dk, dv straight into dqkv's slices (no copy) while dqkv's rows fit the
    kernels' int32 offsets; past that (limit lowered here) into separate tensors, then copied: same values."""
    qkv = torch.randn(1, 45, 3 * 64, device=device).to(torch.float16)
    y, lse = A.attention_qkv_fwd(qkv, 2)
    dy = torch.randn_like(y)
    want = A._qkv_backward_launch(dy, qkv, y, lse, 2)
    if limit is not None:
        monkeypatch.setattr(A, "_INT32_ROWS", limit)
    written = []
    backward_into = A._backward_into
    monkeypatch.setattr(A, "_backward_into", lambda *args: (
        written.append([g.untyped_storage().data_ptr() for g in args[-3:]]), backward_into(*args))[1])
    got = A._qkv_backward_launch(dy, qkv, y, lse, 2)
    assert torch.equal(got, want)
    (ptrs,) = written
    in_place = [p == got.untyped_storage().data_ptr() for p in ptrs]
    assert in_place == [limit is None] * 3, in_place


def test_empty_inputs_launch_no_kernel(monkeypatch, device):
    """A batch or a sequence of length 0: outputs and gradients of the right (empty) shape, and not one kernel
    launch (forward or backward), through attention and attention_qkv, fast path and custom op."""
    from kernels import _eager

    launches = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *a, **k: launches.append(grid)
    monkeypatch.setattr(A, "_launch", lambda *a, **k: launches.append(a[1]))
    monkeypatch.setattr(A, "_attn_bwd_preprocess_kernel", Spy())
    for fast in (True, False):
        monkeypatch.setattr(_eager, "ENABLED", fast)
        for shape in ((0, 2, 5, 32), (1, 2, 0, 32)):
            q = torch.randn(shape, device=device, dtype=torch.float16, requires_grad=True)
            out = attention(q, q, q)
            out.backward(torch.ones_like(out))
            assert out.shape == q.shape and q.grad.shape == q.shape
        for shape in ((0, 5, 3 * 64), (1, 0, 3 * 64)):
            qkv = torch.randn(shape, device=device, dtype=torch.float16, requires_grad=True)
            y = A.attention_qkv(qkv, 2)
            y.backward(torch.ones_like(y))
            assert y.shape == shape[:2] + (64,) and qkv.grad.shape == qkv.shape
    assert launches == []
