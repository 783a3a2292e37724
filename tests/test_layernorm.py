"""kernels/layernorm.py (Triton LayerNorm) against kernels/reference.py and float64, forward and every gradient.

Rule (tests/numerics.py): the kernel's max error against float64 may be at most 2x that of the reference
op run in the same dtypes, plus a small atol. On CPU the kernels run in Triton's interpreter.
float64 is not supported by the kernel (stats are fp32 by design): it raises, as do integer dtypes.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from kernels import layernorm as ln
from kernels import reference as ref
from numerics import assert_close, max_err

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
EPS = 1e-5


def truncate_bf16(t):
    """fp32 -> bf16 rounding toward zero, as Triton 3.8's interpreter casts (a GPU rounds to nearest)."""
    return (t.float().contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _grads(fn, x, w, b, dy, eps=EPS):
    """Run fn forward and backward on fresh leaves; -> (y, dx, dw, db)."""
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))  # detach keeps the strides
    y = fn(x, w, b, eps)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad


def _ln64(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def check(x, w, b, dy=None, atol=1e-6, eps=EPS):
    """Kernel vs float64 truth, with the reference op in the same dtypes as the baseline."""
    dy = torch.randn_like(x) if dy is None else dy
    out = _grads(ln.layer_norm, x, w, b, dy, eps)
    base = _grads(ref.layer_norm, x, w, b, dy, eps)
    if INTERPRET and x.dtype == torch.bfloat16:
        # the interpreter truncates the kernel's fp32 -> bf16 stores of y and dx: the fair baseline is
        # the reference in fp32, truncated the same way
        up = _grads(ref.layer_norm, x.float(), w.float(), b.float(), dy.float(), eps)
        base = (truncate_bf16(up[0]), truncate_bf16(up[1])) + base[2:]
    truth = _grads(_ln64, x.double(), w.double(), b.double(), dy.double(), eps)
    assert out[0].dtype == x.dtype and out[1].dtype == x.dtype
    assert out[2].dtype == w.dtype and out[3].dtype == b.dtype
    for name, o, bl, t in zip(("y", "dx", "dweight", "dbias"), out, base, truth):
        # gradients summed over many rows grow with sqrt(rows): scale the atol with their size
        assert_close(o, t, bl, atol=atol * max(1.0, t.abs().max().item()), name=name)
    return out


def _inputs(shape, dtype, wdtype=None, device="cpu"):
    C = shape[-1]
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    w = (torch.randn(C, device=device) * 0.5 + 1).to(wdtype or dtype)
    b = (torch.randn(C, device=device) * 0.1).to(wdtype or dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [1, 7, 768, 1000, 3072, 4099])
def test_parity_three_rows(dtype, C, device):
    check(*_inputs((3, C), dtype, device=device))


@pytest.mark.parametrize("shape", [(1, 7), (1, 4099), (2, 5, 1000), (2, 8192)])
def test_parity_shapes(shape, device):
    check(*_inputs(shape, torch.float32, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_4096_rows(dtype, device):
    check(*_inputs((4096, 768), dtype, device=device))


@pytest.mark.parametrize("offset,scale", [(300.0, 1.0), (5.0, 1e-3)])
def test_large_mean_and_eps_dominated_rows(offset, scale, device):
    """A large mean (two-pass variance needed) and rows so flat that eps dominates var + eps."""
    x = offset + scale * torch.randn(5, 768, device=device)
    check(x, torch.randn(768, device=device), torch.randn(768, device=device))


@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16])
def test_mixed_dtype_fp32_weights(xdtype, device):
    """Autocast case: bf16/fp16 activations, fp32 parameters; y and dx in x's dtype, dw/db in fp32."""
    check(*_inputs((2, 37, 768), xdtype, torch.float32, device=device))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_out_dtype_fp32_stream(out_dtype, device):
    """The model under autocast: fp32 x and parameters, y written in the next matmul's dtype (out_dtype)
    and dy coming back in it; dx fp32. Baseline: the reference's fp32 y cast to out_dtype (what the
    matmul's autocast cast does)."""
    x, w, b = _inputs((2, 37, 768), torch.float32, device=device)
    dy = torch.randn(x.shape, device=device).to(out_dtype)
    out = _grads(lambda *a: ln.layer_norm(*a, out_dtype=out_dtype), x, w, b, dy)
    base = _grads(lambda *a: ref.layer_norm(*a, out_dtype=out_dtype), x, w, b, dy)
    if INTERPRET and out_dtype == torch.bfloat16:  # the interpreter truncates the bf16 store of y
        base = (truncate_bf16(ref.layer_norm(x, w, b, EPS)),) + base[1:]
    truth = _grads(_ln64, x.double(), w.double(), b.double(), dy.double())
    assert out[0].dtype == out_dtype and out[1].dtype == torch.float32 and out[2].dtype == torch.float32
    for name, o, bl, t in zip(("y", "dx", "dweight", "dbias"), out, base, truth):
        assert_close(o, t, bl, atol=1e-6 * max(1.0, t.abs().max().item()), name=name)
    with pytest.raises(TypeError, match=r"out_dtype torch.float64 not supported; supported: None \(x's dtype\)"):
        ln.layer_norm(x, w, b, EPS, torch.float64)


def test_non_contiguous(device):
    wide = torch.randn(6, 1100, device=device)
    x = wide[:, 50:1050]  # strided rows, unit column stride: read in place
    w, b = torch.randn(1000, device=device), torch.randn(1000, device=device)
    dy = torch.randn(1000, 6, device=device).t()  # non-unit column stride: copied
    assert not x.is_contiguous() and not dy.is_contiguous()
    check(x, w, b, dy)
    x, w = torch.randn(768, 5, device=device).t(), torch.randn(2 * 768, device=device)[::2]
    b = torch.randn(2 * 768, device=device)[1::2]
    assert x.stride(-1) != 1 and not w.is_contiguous() and not b.is_contiguous()
    check(x, w, b)


def test_zero_rows(device):
    x, w, b = _inputs((0, 768), torch.float32, device=device)
    y, dx, dw, db = _grads(ln.layer_norm, x, w, b, torch.zeros_like(x))
    assert y.shape == (0, 768) and dx.shape == (0, 768)
    assert not dw.any() and not db.any()


def test_backward_is_deterministic(device):
    x, w, b = _inputs((1000, 768), torch.bfloat16, torch.float32, device=device)
    dy = torch.randn_like(x)
    first = _grads(ln.layer_norm, x, w, b, dy)
    second = _grads(ln.layer_norm, x, w, b, dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_rows_fill_neither_the_last_tile_nor_the_last_program(device):
    """The backward gives each program tiles_per_program row tiles: with one tile more than the programs
    target, the last program gets a partly filled tile and one past the end. Every row must still get its
    dx and reach dweight / dbias (the other tests' row counts divide evenly or fit one program)."""
    C = 40
    block_r = ln._tile(C, device == "cuda")[0]
    target = ln._programs_target(torch.device(device))
    N = (target + 1) * block_r - 3
    tiles = -(-N // block_r)
    programs = ln._bwd_programs(tiles, target)
    tiles_per_program = -(-tiles // programs)  # as the kernel derives it from its grid
    assert tiles % tiles_per_program != 0 and N % block_r != 0  # the case this test is about
    assert (programs - 1) * tiles_per_program < tiles <= programs * tiles_per_program  # no program without a tile
    check(*_inputs((N, C), torch.float32, device=device))


@pytest.mark.parametrize("tiles,target", [(1, 4), (5, 4), (9, 4), (10, 4), (4096, 528), (4097, 528), (100, 40),
                                          (7, 1), (3, 8)])
def test_backward_grid_leaves_no_program_without_a_tile(tiles, target):
    """_bwd_programs: at most `target` programs, and the kernel's partition (cdiv(tiles, programs) tiles
    each) covers every tile with none left empty (an empty program would still write a zero partial row)."""
    programs = ln._bwd_programs(tiles, target)
    per = -(-tiles // programs)
    assert 1 <= programs <= min(tiles, target)
    assert (programs - 1) * per < tiles <= programs * per


# ---- autotuning (GPU, large inputs): the configs, and the launch path run here with a stand-in timer -------

@pytest.mark.parametrize("block_c", [1 << k for k in range(15)])
def test_autotune_configs_rescale_the_tables(block_c):
    """Each width gets the tables' configs with the same elements per tile and per thread as at 1024 where
    the limits (1..64 rows, 1..16 warps) allow; the first entry is the fixed launch (_tile) at every width, so
    autotuning can only pick something measured faster than it."""
    C = block_c  # any C with this next power of two
    r, bc, w = ln._tile(C)
    assert bc == block_c
    fwd = [(c.kwargs["BLOCK_R"], c.num_warps) for c in ln._fwd_configs(block_c)]
    bwd = [(c.kwargs["BLOCK_R"], c.num_warps, c.kwargs["STAGES"], c.kwargs["PER_SM"]) for c in ln._bwd_configs(block_c)]
    assert ln._scaled(*ln.FWD_TUNE[0], block_c) == (r, w) and (r, w) in fwd
    assert (r, w, ln.BWD_STAGES, ln.BWD_PROGRAMS_PER_SM) in bwd
    assert len(set(fwd)) == len(fwd) and len(set(bwd)) == len(bwd)
    assert 1 <= len(fwd) <= len(ln.FWD_TUNE) and 1 < len(bwd) <= len(ln.BWD_TUNE)
    assert len(fwd) > 1 or block_c <= 4 or block_c >= 8192  # only the limits merge the forward's configs
    for rows, warps in ln.FWD_TUNE + [t[:2] for t in ln.BWD_TUNE]:
        r2, w2 = ln._scaled(rows, warps, block_c)
        assert 1 <= r2 <= 64 and 1 <= w2 <= 16
        if 1024 * rows // 64 <= block_c <= 1024 * rows and rows * 1024 // block_c * block_c == rows * 1024:
            assert r2 * block_c == rows * 1024  # the same elements per tile ...
            if w2 == warps * r2 * block_c // (rows * 1024):
                assert r2 * block_c // w2 == rows * 1024 // warps  # ... and per warp
    if block_c == 1024:  # the tables are written for GPT-2's width: taken as they are
        assert sorted(fwd) == sorted(ln.FWD_TUNE) and sorted(bwd) == sorted(ln.BWD_TUNE)


def test_autotune_applies_from_the_threshold_and_tunes_each_kernel_variant_apart(monkeypatch):
    """Autotuned: CUDA tensors of at least AUTOTUNE_MIN_ELEMENTS (GPT-2's 16384 x 768 is over it), unless
    GPT2K_LN_AUTOTUNE=0 turned AUTOTUNE off. Each autotuner keys on C, the row bucket and the kernel's
    variant flags (with a residual / ds / the narrow gradient: different kernels, each tuned for itself)."""
    cuda, cpu = type("T", (), {"is_cuda": True})(), type("T", (), {"is_cuda": False})()
    limit = ln.AUTOTUNE_MIN_ELEMENTS
    assert ln._autotuned(cuda, limit // 1024, 1024) and not ln._autotuned(cuda, limit // 1024 - 1, 1024)
    assert ln._autotuned(cuda, 16384, 768) and not ln._autotuned(cpu, 16384, 768)
    monkeypatch.setattr(ln, "AUTOTUNE", False)
    assert not ln._autotuned(cuda, 16384, 768)
    assert ln._layer_norm_fwd_tuned.keys == ["C", "ROWS_BUCKET", "HAS_RESIDUAL"]
    assert ln._layer_norm_bwd_tuned.keys == ["C", "ROWS_BUCKET", "HAS_DS", "HAS_DR"]

@pytest.mark.parametrize("C", [40, 768])
def test_every_autotune_config_is_correct(C, device):
    """Whatever the autotuner picks on a GPU must be right: every forward and backward config of the tables,
    rescaled to C, against float64 (bench/ln_tune.py's sweep with a stand-in timer), on rows that fill
    neither the last tile nor the last program."""
    from bench import ln_tune

    block_c = 1 << (C - 1).bit_length()
    fwd = [(c.kwargs["BLOCK_R"], c.num_warps) for c in ln._fwd_configs(block_c)]
    bwd = [(c.kwargs["BLOCK_R"], c.num_warps, c.kwargs["STAGES"], c.kwargs["PER_SM"]) for c in ln._bwd_configs(block_c)]

    def timer(fns):
        fns[0]()
        return 1.0

    rows = ln_tune.sweep(37, C, fwd, bwd, 1.0, lambda r: None, device=device, timer=timer)
    rows += ln_tune.sweep(37, C, fwd, bwd, 1.0, lambda r: None, device=device, timer=timer, add=True)
    assert len(rows) == 2 * (len(fwd) + len(bwd))
    for r in rows:
        assert "error" not in r and r["bad"] == [], r
        assert all(math.isfinite(e) for e in r["max_err"].values()), r


@pytest.mark.skipif(not INTERPRET, reason="drives triton.autotune with a stand-in timer in the interpreter")
@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("winner", ["last", "first"])
def test_autotuned_launch_path(add, winner, monkeypatch):
    """The GPU's autotuned launches, run in the interpreter: the real triton.autotune objects, their prune hook
    (tables rescaled to BLOCK_C), a stand-in benchmark that runs each config once (as the real one does,
    each writing its own rows of the shared partial-sum buffer) and ranks the last one fastest (C = 40: a
    backward config with fewer programs than the buffer has rows, so summing rows the chosen launch did not
    write would be wrong) or the first (C = 768: one row per tile, so a grid not taken from the chosen config
    would leave rows out). Each launch's grid is the chosen config's; forward and backward match the fixed
    launch's results, and a second call reuses the choice."""
    C, N = (40, 203) if winner == "last" else (768, 203)
    sms = 2
    block_c = 1 << (C - 1).bit_length()
    monkeypatch.setattr(ln, "_autotuned", lambda x, n, c: True)
    monkeypatch.setattr(ln, "_sm_count", lambda device: sms)
    benched = []
    for tuner in (ln._layer_norm_fwd_tuned, ln._layer_norm_bwd_tuned):
        monkeypatch.setattr(tuner, "cache", {})

        def bench(fn, quantiles=None, benched=benched):
            fn()
            benched.append(1)
            # later configs "faster" (the last benchmarked wins), or slower (the first wins)
            return [1000.0 + (len(benched) if winner == "first" else -len(benched))] * 3
        monkeypatch.setitem(tuner.__dict__, "do_bench", bench)
    grids = {}  # the last launch's grid per kernel, recorded on the class (an instance attribute would outlive
    names = {id(getattr(ln, n)): n for n in ("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel")}  # the undo)
    cls = type(ln._layer_norm_fwd_kernel)
    run_ = cls.run

    def spy(self, *args, grid, **kwargs):
        if id(self) in names:
            grids[names[id(self)]] = grid(kwargs) if callable(grid) else grid
        return run_(self, *args, grid=grid, **kwargs)
    monkeypatch.setattr(cls, "run", spy)
    key = lambda c: (c.kwargs["BLOCK_R"], c.num_warps, c.kwargs.get("STAGES", 0), c.kwargs.get("PER_SM", 0))  # noqa: E731
    pick = max if winner == "last" else min  # configs are benchmarked in sorted order
    bwd_configs, fwd_best = ln._bwd_configs(block_c), pick(ln._fwd_configs(block_c), key=key)
    best = pick(bwd_configs, key=key)
    chosen = ln._tuned_bwd_programs(best.kwargs, N, sms)
    if winner == "last":
        assert chosen < max(ln._tuned_bwd_programs(c.kwargs, N, sms) for c in bwd_configs)  # the case at issue
    else:
        assert fwd_best.kwargs["BLOCK_R"] == best.kwargs["BLOCK_R"] == 1  # the case at issue

    x, w, b = _inputs((N, C), torch.float32)
    r = torch.randn(N, C).to(torch.bfloat16)

    def run():  # check() against float64, with the same upstream gradients each time
        torch.manual_seed(1)
        return check_add(x, r, w, b) if add else check(x, w, b)
    tuned = run()
    assert len(benched) == len(ln._fwd_configs(block_c)) + len(bwd_configs)
    assert ln._layer_norm_bwd_tuned.best_config.kwargs == best.kwargs
    assert ln._layer_norm_fwd_tuned.best_config.kwargs == fwd_best.kwargs
    tiles = -(-N // best.kwargs["BLOCK_R"])  # the chosen configs' grids, computed here from their parameters
    assert grids["_layer_norm_fwd_kernel"] == (-(-N // fwd_best.kwargs["BLOCK_R"]),)
    assert grids["_layer_norm_bwd_kernel"] == (-(-tiles // -(-tiles // (best.kwargs["PER_SM"] * sms))),)
    n = len(benched)
    again = run()
    assert len(benched) == n  # the cached choice: no second tuning
    monkeypatch.setattr(ln, "_autotuned", lambda x, n, c: False)
    fixed = run()
    for a, t, f in zip(tuned, again, fixed):
        assert torch.equal(a, t)  # the same config twice: bitwise the same
        torch.testing.assert_close(a, f, rtol=1e-5, atol=1e-5)


def test_none_weight_and_bias(device):
    x = torch.randn(4, 100, device=device)
    torch.testing.assert_close(ln.layer_norm(x, None, None), F.layer_norm(x, (100,)), rtol=1e-5, atol=1e-5)


# ---- add_layer_norm: s = x + residual, then LayerNorm(s), one kernel each way -------------------------

def _add_grads(fn, x, r, w, b, ds, dy, eps=EPS):
    """fn(x, r, w, b, eps) -> (s, y); backward with gradients ds for s and dy for y -> (s, y, dx, dr, dw, db)."""
    x, r, w, b = (t.detach().requires_grad_() for t in (x, r, w, b))
    s, y = fn(x, r, w, b, eps)
    torch.autograd.backward((s, y), (ds, dy))
    return s.detach(), y.detach(), x.grad, r.grad, w.grad, b.grad


def _add64(x, r, w, b, eps):
    s = x + r
    return s, F.layer_norm(s, (s.shape[-1],), w, b, eps)


def check_add(x, r, w, b, atol=1e-6, eps=EPS):
    sdtype = torch.promote_types(x.dtype, r.dtype)
    ds, dy = (torch.randn(x.shape, device=x.device).to(sdtype) for _ in range(2))
    out = _add_grads(ln.add_layer_norm, x, r, w, b, ds, dy, eps)
    base = _add_grads(ref.add_layer_norm, x, r, w, b, ds, dy, eps)
    truth = _add_grads(_add64, *(t.double() for t in (x, r, w, b, ds, dy)), eps)
    if INTERPRET and torch.bfloat16 in (x.dtype, r.dtype):
        # the interpreter truncates the kernel's bf16 stores (s, y and the summed gradient when s is bf16; the
        # narrower input's gradient, written by the same kernel, when only x or r is): for each output stored
        # in bf16, allow the larger error of the bf16 reference and of the fp32 reference truncated the same way
        up = _add_grads(ref.add_layer_norm, *(t.float() for t in (x, r, w, b, ds, dy)), eps)
        trunc = tuple(truncate_bf16(t) if o.dtype == torch.bfloat16 else a for t, o, a in zip(up, out, base))
        base = tuple(a if max_err(a, t) >= max_err(c, t) else c for a, c, t in zip(base, trunc, truth))
    assert out[0].dtype == sdtype and out[1].dtype == sdtype
    assert out[2].dtype == x.dtype and out[3].dtype == r.dtype and out[4].dtype == w.dtype and out[5].dtype == b.dtype
    for name, o, bl, t in zip(("s", "y", "dx", "dresidual", "dweight", "dbias"), out, base, truth):
        assert_close(o, t, bl, atol=atol * max(1.0, t.abs().max().item()), name=name)
    return out


@pytest.mark.parametrize("xdtype,rdtype,wdtype", [
    (torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.float32),  # the model under bf16 autocast: fp32 stream + bf16 branch
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float32, torch.float32),  # x narrower than the residual: s (and y) in fp32
    (torch.float16, torch.float16, torch.float16),
], ids=str)
@pytest.mark.parametrize("shape", [(3, 1), (3, 7), (2, 5, 768), (1, 1000), (3, 4099)])
def test_add_layer_norm_parity(xdtype, rdtype, wdtype, shape, device):
    x, w, b = _inputs(shape, xdtype, wdtype, device=device)
    r = (torch.randn(shape, device=device) * 3).to(rdtype)
    check_add(x, r, w, b)


def test_add_layer_norm_4096_rows_and_strided(device):
    x, w, b = _inputs((4096, 768), torch.float32, device=device)
    check_add(x, torch.randn(4096, 768, device=device).to(torch.bfloat16), w, b)
    wide = torch.randn(6, 1100, device=device)
    check_add(wide[:, 50:1050], torch.randn(1000, 6, device=device).t(), *_inputs((1000,), torch.float32, device=device)[1:])


def test_add_layer_norm_is_the_two_ops_and_deterministic(device):
    """s is exactly x + residual (PyTorch's add), y is exactly layer_norm(s); backward twice: bitwise equal."""
    x, w, b = _inputs((64, 768), torch.float32, device=device)
    r = torch.randn(64, 768, device=device).to(torch.bfloat16)
    s, y = ln.add_layer_norm(x, r, w, b)
    assert torch.equal(s, x + r)
    assert torch.equal(y, ln.layer_norm(s, w, b))
    s16, y16 = ln.add_layer_norm(x, r, w, b, EPS, torch.bfloat16)  # y in the matmul's dtype, s still fp32
    assert s16.dtype == torch.float32 and torch.equal(s16, s)
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, ln.layer_norm(s, w, b, EPS, torch.bfloat16))
    ds, dy = torch.randn_like(s), torch.randn_like(s)
    first = _add_grads(ln.add_layer_norm, x, r, w, b, ds, dy)
    second = _add_grads(ln.add_layer_norm, x, r, w, b, ds, dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "custom_op"])
@pytest.mark.parametrize("used", ["s", "y"])
def test_add_layer_norm_one_output_used(used, fast, device, monkeypatch):
    """Only s (or only y) gets a gradient: the other one's is None in backward (not materialized as zeros),
    and the result equals passing an explicit zero gradient for it."""
    from kernels import _eager

    monkeypatch.setattr(_eager, "ENABLED", fast)
    x, w, b = _inputs((5, 7, 40), torch.float32, device=device)
    r = torch.randn(5, 7, 40, device=device).to(torch.bfloat16)
    g = torch.randn(5, 7, 40, device=device)
    zero = torch.zeros_like(g)
    ds, dy = (g, zero) if used == "s" else (zero, g)
    explicit = _add_grads(ln.add_layer_norm, x, r, w, b, ds, dy)[2:]
    leaves = [t.detach().requires_grad_() for t in (x, r, w, b)]
    s, y = ln.add_layer_norm(*leaves, EPS)
    (s if used == "s" else y).backward(g)
    for name, a, e in zip(("dx", "dresidual", "dweight", "dbias"), (t.grad for t in leaves), explicit):
        assert a is not None and torch.equal(a, e), name


@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "custom_op"])
def test_eps_and_out_dtype_reach_the_kernel(fast, device, monkeypatch):
    """eps (the model takes GPT-2's layer_norm_epsilon from its config) and out_dtype get through both the
    eager fast path and the custom ops to the kernel: rows whose variance (~0.09) is close to eps = 0.1."""
    from kernels import _eager

    monkeypatch.setattr(_eager, "ENABLED", fast)
    eps = 0.1
    x, w, b = _inputs((4, 40), torch.float32, device=device)
    x, r = x * 0.15, torch.randn(4, 40, device=device) * 0.1
    check(x, w, b, eps=eps)
    check_add(x, r, w, b, eps=eps)
    y16 = ln.layer_norm(x, w, b, eps, torch.bfloat16)
    base = ref.layer_norm(x, w, b, eps)
    base = truncate_bf16(base) if INTERPRET else base.to(torch.bfloat16)  # the interpreter truncates
    assert y16.dtype == torch.bfloat16
    assert_close(y16, _ln64(x.double(), w.double(), b.double(), eps), base, name="y in out_dtype")
    s, y16 = ln.add_layer_norm(x, r, w, b, eps, torch.bfloat16)
    assert s.dtype == torch.float32 and y16.dtype == torch.bfloat16
    assert torch.equal(y16, ln.layer_norm(s, w, b, eps, torch.bfloat16))


@pytest.mark.parametrize("wdtype,bdtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)], ids=str)
def test_weight_and_bias_dtypes_differ(wdtype, bdtype, device):
    """weight and bias in different dtypes: each gradient comes back in its own parameter's dtype."""
    x, w, b = _inputs((3, 40), torch.float32, device=device)
    w, b = w.to(wdtype), b.to(bdtype)
    check(x, w, b)
    check_add(x, torch.randn(3, 40, device=device), w, b)



@pytest.mark.skipif(not HAS_CUDA, reason="autotuning runs on a GPU only")
@pytest.mark.parametrize("case", ["bf16 rows, fp32 weights", "fp32 rows, bf16 y", "add_layer_norm"])
def test_autotuned_gpt2_shapes_on_gpu(case):
    """At GPT-2's 16384 x 768 (autotuned on a GPU): parity with float64 as everywhere, the choice was made
    (best_config set), and a second run gives bitwise the same outputs and gradients."""
    assert ln.AUTOTUNE and 16384 * 768 >= ln.AUTOTUNE_MIN_ELEMENTS
    x, w, b = _inputs((16384, 768), torch.bfloat16 if case.startswith("bf16") else torch.float32,
                      torch.float32, device="cuda")
    dy = torch.randn(16384, 768, device="cuda").to(torch.bfloat16 if case != "bf16 rows, fp32 weights" else x.dtype)

    def run():
        torch.manual_seed(3)
        if case == "add_layer_norm":
            return check_add(x, torch.randn(16384, 768, device="cuda").to(torch.bfloat16), w, b)
        if case == "fp32 rows, bf16 y":
            return _grads(lambda *a: ln.layer_norm(*a, out_dtype=torch.bfloat16), x, w, b, dy)
        return check(x, w, b, dy)
    first, second = run(), run()
    assert ln._layer_norm_bwd_tuned.best_config is not None
    for a, c in zip(first, second):
        assert torch.isfinite(a).all() and torch.equal(a, c)
    if case == "fp32 rows, bf16 y":  # y in bf16: against the reference op with the same out_dtype
        base = _grads(lambda *a: ref.layer_norm(*a, out_dtype=torch.bfloat16), x, w, b, dy)
        truth = _grads(_ln64, x.double(), w.double(), b.double(), dy.double())
        for name, o, bl, t in zip(("y", "dx", "dweight", "dbias"), first, base, truth):
            assert_close(o, t, bl, atol=1e-6 * max(1.0, t.abs().max().item()), name=name)

def test_backward_op_reads_strided_statistics_and_ds(device):
    """layer_norm_bwd accepts any mean / rstd / ds of the right shape and dtype, not only contiguous ones
    (the forward's outputs): strided views give bitwise the results of contiguous copies."""
    x, w, b = _inputs((5, 40), torch.float32, device=device)
    _, mean, rstd = torch.ops.gpt2k.layer_norm_fwd(x, w, b, EPS)
    stats = torch.stack([mean, rstd], -1)  # columns: views with stride 2
    ds = torch.randn(5, 100, device=device)[:, 10:50]  # rows 100 apart: read in place
    dy = torch.randn_like(x)
    assert not stats[:, 0].is_contiguous() and ds.stride(0) == 100
    expect = torch.ops.gpt2k.layer_norm_bwd(dy, x, w, mean, rstd, ds.contiguous())
    got = torch.ops.gpt2k.layer_norm_bwd(dy, x, w, stats[:, 0], stats[:, 1], ds)
    for a, c in zip(got, expect):
        assert torch.equal(a, c)


def test_add_layer_norm_bad_input(device):
    x, w, b = _inputs((3, 16), torch.float32, device=device)
    with pytest.raises(ValueError, match=r"residual has shape \(3, 8\), x has \(3, 16\)"):
        ln.add_layer_norm(x, x[:, :8], w, b)
    with pytest.raises(TypeError, match="residual has dtype torch.float64; supported"):
        ln.add_layer_norm(x, x.double(), w, b)
    y, mean, rstd = torch.ops.gpt2k.layer_norm_fwd(x, w, b, EPS)
    with pytest.raises(ValueError, match="ds .* must have x's shape"):
        torch.ops.gpt2k.layer_norm_bwd(y, x, w, mean, rstd, y[:2])


@pytest.mark.parametrize("xdtype,rdtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                           (torch.bfloat16, torch.float32)], ids=str)
def test_add_layer_norm_opcheck_and_compile(xdtype, rdtype, device):
    x, w, b = _inputs((2, 3, 40), xdtype, torch.float32, device=device)
    r = torch.randn(2, 3, 40, device=device).to(rdtype)
    args = [t.clone().requires_grad_() for t in (x, r, w, b)]
    torch.library.opcheck(torch.ops.gpt2k.add_layer_norm_fwd.default, (*args, EPS))
    torch.library.opcheck(torch.ops.gpt2k.add_layer_norm_fwd.default, (*args, EPS, torch.bfloat16))
    s, y, mean, rstd = torch.ops.gpt2k.add_layer_norm_fwd(x, r, w, b, EPS)
    torch.library.opcheck(torch.ops.gpt2k.layer_norm_bwd.default, (torch.randn_like(y), s, w, mean, rstd, torch.randn_like(s)))
    for ds in (torch.randn_like(s), None):
        torch.library.opcheck(torch.ops.gpt2k.add_layer_norm_bwd.default,
                              (torch.randn_like(y), s, w, mean, rstd, ds, torch.bfloat16))
    ds, dy = torch.randn_like(s), torch.randn_like(s)
    compiled = torch.compile(ln.add_layer_norm, backend="aot_eager", fullgraph=True)
    for a, c in zip(_add_grads(compiled, x, r, w, b, ds, dy), _add_grads(ln.add_layer_norm, x, r, w, b, ds, dy)):
        assert torch.equal(a, c)



@pytest.mark.parametrize("xdtype,rdtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                           (torch.float16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "custom_op"])
def test_add_layer_norm_backward_writes_the_narrow_gradient_itself(xdtype, rdtype, fast, device, monkeypatch):
    """x and residual in different dtypes (the model: fp32 stream + bf16 branch): the backward kernel writes
    the summed gradient in s's dtype and, in the same pass, in the narrower input's dtype, with no cast
    kernel after it (aten::_to_copy: it would read the fp32 gradient again, 50 MB per call at GPT-2's
    shape). fp16 + bf16 (s fp32): one of the two still needs a cast. Values: the parity tests above."""
    from torch.profiler import ProfilerActivity, profile

    from kernels import _eager

    monkeypatch.setattr(_eager, "ENABLED", fast)
    x, w, b = _inputs((3, 5, 40), xdtype, torch.float32, device=device)
    leaves = [t.detach().requires_grad_() for t in (x, torch.randn(3, 5, 40, device=device).to(rdtype), w, b)]
    s, y = ln.add_layer_norm(*leaves)
    (s.float().sum() + y.float().sum()).backward()  # compiles (and on a GPU autotunes) before profiling
    for t in leaves:
        t.grad = None
    s, y = ln.add_layer_norm(*leaves)
    loss = (s * torch.randn_like(s)).sum() + (y * torch.randn_like(y)).sum()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    casts = [e.name for e in prof.events() if e.name == "aten::_to_copy"]
    assert len(casts) == (1 if {xdtype, rdtype} == {torch.float16, torch.bfloat16} else 0), casts
    assert leaves[0].grad.dtype == xdtype and leaves[1].grad.dtype == rdtype
    wide, narrow = (leaves[0].grad, leaves[1].grad) if xdtype == torch.float32 else (leaves[1].grad, leaves[0].grad)
    if torch.float32 in (xdtype, rdtype):  # the narrow gradient is the wide one rounded (the interpreter truncates)
        want = truncate_bf16(wide) if INTERPRET and narrow.dtype == torch.bfloat16 else wide.to(narrow.dtype)
        assert torch.equal(narrow, want)



@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "custom_op"])
def test_add_layer_norm_gradient_only_where_needed(fast, device, monkeypatch):
    """Only the inputs that need a gradient get one (the fp32 x alone: the plain backward, no bf16 copy written;
    the bf16 residual alone: the kernel's bf16 copy), each equal to its part of the full backward."""
    from kernels import _eager

    monkeypatch.setattr(_eager, "ENABLED", fast)
    x, w, b = _inputs((4, 40), torch.float32, device=device)
    r = torch.randn(4, 40, device=device).to(torch.bfloat16)
    ds, dy = torch.randn(4, 40, device=device), torch.randn(4, 40, device=device)

    def grads(need_x, need_r):
        xs, rs = x.clone().requires_grad_(need_x), r.clone().requires_grad_(need_r)
        s, y = ln.add_layer_norm(xs, rs, w, b)
        return torch.autograd.grad((s, y), [t for t, n in ((xs, need_x), (rs, need_r)) if n], (ds, dy))
    full = grads(True, True)
    (gx,), (gr,) = grads(True, False), grads(False, True)
    assert torch.equal(gx, full[0]) and torch.equal(gr, full[1]) and gr.dtype == torch.bfloat16

def test_add_layer_norm_bwd_rejects_a_bad_narrow_dtype(device):
    x, w, b = _inputs((3, 16), torch.float32, device=device)
    s, y, mean, rstd = torch.ops.gpt2k.add_layer_norm_fwd(x, x, w, b, EPS)
    with pytest.raises(TypeError, match="narrow_dtype torch.float64 not supported"):
        torch.ops.gpt2k.add_layer_norm_bwd(y, s, w, mean, rstd, None, torch.float64)

@pytest.mark.parametrize("xdtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_opcheck(xdtype, wdtype, device):
    x, w, b = _inputs((2, 3, 40), xdtype, wdtype, device=device)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    torch.library.opcheck(torch.ops.gpt2k.layer_norm_fwd.default, (x, w, b, EPS))
    torch.library.opcheck(torch.ops.gpt2k.layer_norm_fwd.default, (x, w, b, EPS, torch.float16))
    y, mean, rstd = torch.ops.gpt2k.layer_norm_fwd(x.detach(), w.detach(), b.detach(), EPS)
    torch.library.opcheck(torch.ops.gpt2k.layer_norm_bwd.default, (torch.randn_like(y), x.detach(), w.detach(), mean, rstd))


def test_torch_compile_traces_the_ops(device):
    x, w, b = _inputs((3, 64), torch.float32, device=device)
    compiled = torch.compile(ln.layer_norm, backend="aot_eager", fullgraph=True)
    out = _grads(compiled, x, w, b, torch.ones_like(x))
    expect = _grads(ln.layer_norm, x, w, b, torch.ones_like(x))
    for a, c in zip(out, expect):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["float64", "int32", "weight_shape", "bias_shape", "C=0", "C>MAX", "scalar"])
def test_bad_input_raises(bad, device):
    x, w, b = _inputs((3, 16), torch.float32, device=device)
    if bad == "float64":
        x, match = x.double(), "supported: float32, bfloat16, float16"
    elif bad == "int32":
        x, match = x.to(torch.int32), "supported: float32, bfloat16, float16"
    elif bad == "weight_shape":
        w, match = w[:8], r"weight has shape \(8,\), expected \(16,\)"
    elif bad == "bias_shape":
        b, match = b[None], r"bias has shape \(1, 16\), expected \(16,\)"
    elif bad == "C=0":
        x, w, b, match = x[:, :0], w[:0], b[:0], "supported: 1 to"
    elif bad == "C>MAX":
        C = ln.MAX_C + 1
        x, w, b, match = torch.zeros(1, C, device=device), torch.ones(C, device=device), torch.zeros(C, device=device), "supported: 1 to"
    else:
        x, match = torch.tensor(1.0, device=device), "at least one dimension"
    with pytest.raises((TypeError, ValueError), match=match):
        ln.layer_norm(x, w, b)


def test_bad_backward_input_raises(device):
    x, w, b = _inputs((3, 16), torch.float32, device=device)
    y, mean, rstd = torch.ops.gpt2k.layer_norm_fwd(x, w, b, EPS)
    with pytest.raises(ValueError, match="must have x's shape"):
        torch.ops.gpt2k.layer_norm_bwd(y[:2], x, w, mean, rstd)
    with pytest.raises(ValueError, match="rstd .* must be float32"):
        torch.ops.gpt2k.layer_norm_bwd(y, x, w, mean, rstd.double())
    with pytest.raises(ValueError, match=r"dy \(3, 16\) torch.float64 must have x's shape"):
        torch.ops.gpt2k.layer_norm_bwd(y.double(), x, w, mean, rstd)
    with pytest.raises(ValueError, match=r"ds \(3, 16\) torch.float64 must have x's shape"):
        torch.ops.gpt2k.layer_norm_bwd(y, x, w, mean, rstd, y.double())


def test_a_meta_tensor_among_real_ones_raises(device):
    """A meta argument sends the call to the op's fake implementation: it checks the devices as the op does,
    instead of returning uninitialized outputs."""
    x, w, b = _inputs((3, 16), torch.float32, device=device)
    y, mean, rstd = torch.ops.gpt2k.layer_norm_fwd(x, w, b, EPS)
    calls = [(torch.ops.gpt2k.layer_norm_fwd, [x, w, b], (EPS,)),
             (torch.ops.gpt2k.add_layer_norm_fwd, [x, x, w, b], (EPS,)),
             (torch.ops.gpt2k.layer_norm_bwd, [y, x, w, mean, rstd, y], ())]
    for op, tensors, rest in calls:
        for i in range(len(tensors)):
            args = list(tensors)
            args[i] = args[i].to("meta")
            with pytest.raises(ValueError, match="different devices"):
                op(*args, *rest)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: CPU tensors are refused outside the interpreter")
def test_cpu_tensor_refused_on_gpu_machine():
    with pytest.raises(ValueError, match="supported: CUDA tensors"):
        ln.layer_norm(torch.randn(2, 8), torch.ones(8), torch.zeros(8))


def test_aot_compile_for_sm80_sm90():
    """Every kernel of layernorm.py and gelu.py compiles for real GPUs (no GPU needed) at GPT-2 shapes
    with no register spills, fitting shared memory, and 128-bit global loads."""
    from kernels._triton_utils import check_report, static_report

    rows = static_report(["kernels.layernorm", "kernels.gelu"])
    specs = len(ln.compile_specs()) + len(__import__("kernels.gelu").gelu.compile_specs())
    assert len(rows) == 2 * specs
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for row in rows:
        assert "error" not in row, f"{row['name']} {row['arch']}: {row.get('error')}"
        assert check_report(row) == [], f"{row['name']} {row['arch']}: {check_report(row)}"


def test_model_triton_layer_norm_and_gelu_match_torch(device):
    """The whole model (fp32) with our LayerNorm and GELU: loss and every parameter gradient match the
    torch backend from the same weights."""
    from gpt2.model import GPT, GPTConfig

    config = GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=2, n_embd=64)
    ref_model = GPT(config, kernels="torch").to(device)
    model = GPT(config, kernels="torch,layer_norm=triton,gelu=triton").to(device)
    model.load_state_dict(ref_model.state_dict())
    idx = torch.randint(0, 100, (2, 32), device=device)
    targets = torch.randint(0, 100, (2, 32), device=device)
    losses = []
    for m in (ref_model, model):
        _, loss = m(idx, targets)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-6 * abs(losses[0]), losses
    grads = dict(model.named_parameters())
    for name, p in ref_model.named_parameters():
        g, g_ref = grads[name].grad, p.grad
        assert g is not None and torch.isfinite(g).all(), name
        scale = g_ref.abs().max().item()
        err = (g - g_ref).abs().max().item()
        assert err <= 1e-5 * scale + 1e-8, f"{name}: max |grad diff| {err:.3g} (max |grad| {scale:.3g})"


def test_tuner_candidates_are_correct(device):
    """bench/ln_tune.py's sweep (what a GPU session runs to pick the launch configs): every forward and
    backward candidate's output checked against float64, here in the interpreter with a stand-in timer
    (one call each, no timing), including a shape whose rows do not fill the last tile."""
    from bench import ln_tune

    calls = []

    def timer(fns):
        for f in fns:
            f()
        calls.append(len(fns))
        return 1.0

    rows = ln_tune.sweep(37, 40, [(1, 1), (4, 8), (16, 16)], [(4, 8, 1, 4), (2, 4, 2, 2), (1, 2, 3, 8)], 1.0,
                         lambda r: None, device=device, timer=timer)
    assert len(rows) == 6 and calls == [ln_tune.SETS] * 6
    rows += ln_tune.sweep(37, 40, [(1, 1), (4, 8)], [(4, 8, 1, 4), (1, 2, 2, 8)], 1.0, lambda r: None, device=device,
                          timer=timer, add=True)  # add_layer_norm: fp32 rows + a bf16 residual
    assert len(rows) == 10 and calls == [ln_tune.SETS] * 10
    for r in rows:
        assert "error" not in r, r
        assert r["bad"] == [], r
        assert all(math.isfinite(e) for e in r["max_err"].values()), r
        # the sweep checks candidates against the default config; this checks the default against float64:
        # fp32 rows here, errors ~1e-6, except y, written in bf16 as the model does (out_dtype), and the bf16
        # residual's gradient dr (add_layer_norm)
        assert all(e < (6e-2 if k in ("y", "dr") else 1e-3) for k, e in r["max_err"].items()), r
    compiled = {s.name for s in ln_tune.compile_specs()}
    assert len(compiled) == 2 * (len(ln_tune.FWD) + len({c[:3] for c in ln_tune.BWD}))
