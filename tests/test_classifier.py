"""The C++/CUDA fused classifier (csrc/classifier.*, kernels/classifier.py): the `cuda` backend's
cross_entropy and linear_cross_entropy.

On the CPU (always): the C++ op against kernels.reference and an independent float64 computation
(loss and dlogits) on awkward shapes, ignored targets, padded vocab, huge and -inf logits, invalid
rows; opcheck; torch.compile (aot_eager); linear_cross_entropy; the model with cross_entropy=cuda.
With nvcc: the .cu compiles for sm_80 and sm_90 with zero spills and 128-bit loads/stores.
With a GPU: the CUDA kernels against the same oracles, determinism, the in-place variant.
"""
import os

import pytest
import torch

from conftest import requires_cuda
from numerics import assert_close

from kernels import classifier as C
from kernels import reference as R

pytestmark = pytest.mark.skipif(C.unavailable_reason() is not None,
                                reason=f"kernels.classifier cannot build here: {C.unavailable_reason()}")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- oracles --------------------------------------------------------------------------------------

def ce64(logits, targets, ignore_index=-1, vocab_size=None):
    """float64 loss (mean over kept rows) and dlogits (N, Vp), computed directly (no torch loss op)."""
    n, vp = logits.shape
    v = vp if vocab_size is None else vocab_size
    x = logits.double()[:, :v]
    keep = targets != ignore_index
    count = keep.sum().clamp(min=1).double()
    t = torch.where(keep, targets, 0)
    lse = torch.logsumexp(x, dim=1)
    rows = torch.where(keep, lse - x.gather(1, t[:, None])[:, 0], 0.0)
    grad = torch.softmax(x, dim=1)
    grad[torch.arange(n), t] -= 1.0
    grad = torch.where(keep[:, None], grad, 0.0) / count
    full = torch.zeros(n, vp, dtype=torch.float64, device=logits.device)
    full[:, :v] = grad
    return rows.sum() / count, full


def loss_and_grad(fn, logits, targets, ignore_index=-1, vocab_size=None, grad_output=1.0):
    x = logits.detach().requires_grad_()  # not clone(): keep the caller's strides (views stay views)
    loss = fn(x, targets, ignore_index, vocab_size)
    loss.backward(torch.tensor(grad_output, device=loss.device))
    return loss.detach(), x.grad


def make(n, v, vp, dtype, device="cpu", ignore_frac=0.1, scale=3.0):
    logits = (torch.randn(n, vp, device=device) * scale).to(dtype)
    targets = torch.randint(0, v, (n,), device=device)
    targets[torch.rand(n, device=device) < ignore_frac] = -1
    return logits, targets


def check(logits, targets, ignore_index=-1, vocab_size=None, grad_output=1.0, loss_atol=1e-5):
    """Our loss and dlogits vs float64, allowed 2x the reference's error in the same dtype."""
    loss, grad = loss_and_grad(C.cross_entropy, logits, targets, ignore_index, vocab_size, grad_output)
    ref_loss, ref_grad = loss_and_grad(R.cross_entropy, logits, targets, ignore_index, vocab_size, grad_output)
    loss64, grad64 = ce64(logits, targets, ignore_index, vocab_size)
    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype
    assert_close(loss, loss64, ref_loss, atol=loss_atol * max(1.0, abs(loss64.item())), name="loss")
    assert_close(grad, grad64 * grad_output, ref_grad, atol=1e-7, name="dlogits")
    if vocab_size is not None and vocab_size < logits.shape[1]:
        assert (grad[:, vocab_size:] == 0).all(), "padded columns must get gradient 0"
    return loss, grad


# ---- CPU: parity --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v,vp", [(1, 10, 10), (3, 50257, 50304), (7, 1000, 1000), (4096, 10, 16), (33, 4099, 4104)])
def test_parity_cpu(n, v, vp, dtype):
    logits, targets = make(n, v, vp, dtype)
    check(logits, targets, -1, v)


def test_grad_output_scales_and_mean_counts_only_kept_rows():
    logits, targets = make(64, 300, 320, torch.float32, ignore_frac=0.5)
    check(logits, targets, -1, 300, grad_output=2.5)
    check(logits, targets, -1, 300, grad_output=0.0)


def test_all_but_one_ignored_and_all_ignored():
    logits, targets = make(9, 50, 64, torch.float32)
    targets[:] = -1
    targets[4] = 7
    loss, grad = check(logits, targets, -1, 50)
    assert (grad[torch.arange(9) != 4] == 0).all()
    targets[4] = -1
    loss, grad = loss_and_grad(C.cross_entropy, logits, targets, -1, 50)
    assert loss.item() == 0.0 and (grad == 0).all(), "all ignored: loss 0 and gradient 0 (not NaN)"


def test_other_ignore_index():
    logits, targets = make(20, 30, 32, torch.float32, ignore_frac=0.0)
    targets[::3] = -100
    check(logits, targets, -100, 30)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_large_logits(dtype):
    logits, targets = make(16, 1000, 1024, dtype, scale=1e4)
    targets[3] = logits[3, :1000].float().argmax()  # a row whose loss is ~0 next to 1e4 logits
    check(logits, targets, -1, 1000)


@pytest.mark.parametrize("dtype", DTYPES)
def test_minus_inf_logits(dtype):
    logits, targets = make(12, 500, 512, dtype, ignore_frac=0.0)
    mask = torch.rand(logits.shape) < 0.3
    mask[torch.arange(12), targets] = False
    logits[mask] = float("-inf")
    logits[5, :499] = float("-inf")  # one real logit left
    targets[5] = 499
    logits[5, 499] = 1.0
    check(logits, targets, -1, 500)


def test_minus_inf_at_target_is_inf_loss_like_reference():
    logits, targets = make(4, 20, 24, torch.float32, ignore_frac=0.0)
    logits[1, targets[1]] = float("-inf")
    loss = C.cross_entropy(logits, targets, -1, 20)
    assert loss.item() == R.cross_entropy(logits, targets, -1, 20).item() == float("inf")


def test_all_minus_inf_row_raises():
    logits, targets = make(6, 40, 48, torch.float32, ignore_frac=0.0)
    logits[4, :40] = float("-inf")  # padded columns stay finite: they must not count
    with pytest.raises(ValueError, match="row 4 has every real logit -inf"):
        C.cross_entropy(logits, targets, -1, 40)
    targets[4] = -1  # an ignored row may be anything (the reference's gradient is NaN there; ours 0)
    loss, grad = loss_and_grad(C.cross_entropy, logits, targets, -1, 40)
    loss64, grad64 = ce64(logits, targets, -1, 40)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), grad64, rtol=0, atol=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_plus_inf_logit_raises(bad):
    """As the Triton backend: a row with a NaN or +inf logit has no defined loss: an error, not a NaN."""
    logits, targets = make(5, 40, 48, torch.float32, ignore_frac=0.0)
    logits[3, 7] = bad
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        C.cross_entropy(logits, targets, -1, 40)


def unchecked_loss(logits, targets, vocab_size):
    """C.cross_entropy with the per-call row check off (as in training): an invalid row gives a NaN loss."""
    old, C.CHECK_ROWS = C.CHECK_ROWS, False
    try:
        return C.cross_entropy(logits, targets, -1, vocab_size)
    finally:
        C.CHECK_ROWS = old


@pytest.mark.parametrize("where", ["first chunk all NaN", "NaN among -inf at the start", "whole row NaN"])
def test_nan_where_the_running_max_is_still_minus_inf(where):
    """A NaN met while every logit so far is -inf (max() skips NaN) used to be dropped with its chunk: a
    finite loss and NaN gradients. Now the loss is NaN: raised with the check on, NaN with it off."""
    logits, targets = make(3, 200, 200, torch.float32, ignore_frac=0.0)
    targets[1] = 150
    if where == "first chunk all NaN":
        logits[1, :64] = float("nan")
    elif where == "NaN among -inf at the start":
        logits[1, :64] = float("-inf")
        logits[1, 5] = float("nan")
    else:
        logits[1] = float("nan")
    assert torch.isnan(R.cross_entropy(logits, targets, -1, 200))
    with pytest.raises(ValueError, match="NaN"):
        C.cross_entropy(logits, targets, -1, 200)
    assert torch.isnan(unchecked_loss(logits, targets, 200))
    assert torch.isnan(C.fused_ce_(logits.clone(), targets, -1, 200))


def test_invalid_target_raises_or_marks_nan():
    logits, targets = make(5, 40, 48, torch.float32, ignore_frac=0.0)
    targets[2] = 40  # a padded column is not a valid target
    with pytest.raises(ValueError, match="row 2 has target 40, outside"):
        C.cross_entropy(logits, targets, -1, 40)
    assert torch.isnan(unchecked_loss(logits, targets, 40))


def test_negative_target_raises_and_the_first_bad_row_is_named():
    """A negative target other than ignore_index is invalid too (it would read the row before it); with
    several invalid rows the error names the first one, whichever thread saw it."""
    logits, targets = make(6, 40, 48, torch.float32, ignore_frac=0.0)
    targets[1] = -5
    with pytest.raises(ValueError, match="row 1 has target -5, outside"):
        C.cross_entropy(logits, targets, -1, 40)
    assert torch.isnan(unchecked_loss(logits, targets, 40))
    assert torch.isnan(C.fused_ce_(logits.clone(), targets, -1, 40))
    targets[4] = 41
    with pytest.raises(ValueError, match="row 1 has target -5"):
        C.cross_entropy(logits, targets, -1, 40)
    targets[1], targets[4] = 3, 4
    logits[[2, 5], :40] = float("-inf")
    with pytest.raises(ValueError, match="row 2 has every real logit -inf"):
        C.cross_entropy(logits, targets, -1, 40)


def test_bad_inputs_name_what_is_supported():
    logits, targets = make(4, 10, 10, torch.float32)
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        C.cross_entropy(logits.double(), targets)
    with pytest.raises(ValueError, match="int64"):
        C.cross_entropy(logits, targets.int())
    with pytest.raises(ValueError, match="vocab_size 11"):
        C.cross_entropy(logits, targets, -1, 11)
    with pytest.raises(ValueError, match="targets"):
        C.cross_entropy(logits, targets[:3])


def test_views_and_batched_shapes():
    logits, targets = make(2 * 5, 70, 80, torch.float32)
    x = logits.view(2, 5, 80)
    t = targets.view(2, 5)
    assert torch.equal(C.cross_entropy(x, t, -1, 70), C.cross_entropy(logits, targets, -1, 70))
    wide = torch.randn(10, 100)
    strided = torch.stack([targets, targets], 1)[:, 0]
    check(wide[:, 10:90], strided, -1, 70)  # non-contiguous logits and targets: copied, same answer


def test_deterministic_and_no_grad_path():
    logits, targets = make(300, 1000, 1024, torch.bfloat16)
    a, ga = loss_and_grad(C.cross_entropy, logits, targets, -1, 1000)
    b, gb = loss_and_grad(C.cross_entropy, logits, targets, -1, 1000)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    with torch.no_grad():
        assert torch.equal(C.cross_entropy(logits, targets, -1, 1000), a)


def test_second_backward_raises_instead_of_scaling_twice():
    logits, targets = make(8, 30, 32, torch.float32)
    x = logits.clone().requires_grad_()
    loss = C.cross_entropy(x, targets, -1, 30)
    loss.backward(torch.tensor(2.0), retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward(torch.tensor(2.0))


def test_fused_ce_inplace_contract():
    """fused_ce_ (linear_cross_entropy's chunks): sum of row losses, logits overwritten by the
    unscaled softmax - onehot, 0 on padded columns and ignored rows; invalid rows -> NaN, no raise."""
    logits, targets = make(37, 300, 320, torch.float32, ignore_frac=0.2)
    loss64, grad64 = ce64(logits, targets, -1, 300)
    count = (targets != -1).sum().item()
    buf = logits.clone()
    total = C.fused_ce_(buf, targets, -1, 300)
    assert total.dtype == torch.float32 and total.dim() == 0
    torch.testing.assert_close(total.double(), loss64 * count, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(buf.double(), grad64 * count, rtol=0, atol=2e-7)
    bad = logits.clone()
    bad[3, :300] = float("-inf")
    targets[3] = 5
    assert torch.isnan(C.fused_ce_(bad, targets, -1, 300))
    with pytest.raises(ValueError, match="contiguous"):  # it would read and overwrite the wrong elements
        C.fused_ce_(torch.randn(37, 400)[:, :320], targets, -1, 300)


def test_opcheck():
    C._load()  # the ops exist once the extension is loaded (this test may run first, e.g. with -k)
    logits, targets = make(7, 20, 24, torch.float32)
    x = logits.clone().requires_grad_()
    ops = torch.ops.gpt2k_cuda
    for args in [(x, targets, -1, 20, True, True), (logits, targets, -1, 20, False, True)]:
        torch.library.opcheck(ops.cross_entropy_fwd.default, args)
    torch.library.opcheck(ops.cross_entropy_grad_.default, (logits.clone(), targets, -1, 20, False))
    torch.library.opcheck(ops.scale_grad_.default, (torch.randn(5, 8), torch.tensor(0.5)))
    # half logits: the loss stays fp32 in the real op and in its fake (an fp32 opcheck cannot tell)
    half = logits.bfloat16()
    torch.library.opcheck(ops.cross_entropy_fwd.default, (half.clone().requires_grad_(), targets, -1, 20, True, True))
    torch.library.opcheck(ops.cross_entropy_grad_.default, (half.clone(), targets, -1, 20, False))


def test_a_meta_tensor_among_real_ones_raises():
    """A meta argument sends the call to the fake implementation: it runs the C++ op's input checks too,
    instead of returning an uninitialized loss."""
    C._load()
    logits, targets = make(7, 20, 24, torch.float32)
    ops = torch.ops.gpt2k_cuda
    for x, t in ((logits, targets.to("meta")), (logits.to("meta"), targets)):
        with pytest.raises(ValueError, match="targets on .* but logits on"):
            ops.cross_entropy_fwd(x, t, -1, 20, True, True)
        with pytest.raises(ValueError, match="targets on .* but logits on"):
            ops.cross_entropy_grad_(x, t, -1, 20, False)
    with pytest.raises(ValueError, match="scale must be one element"):
        ops.scale_grad_(torch.randn(5, 8), torch.tensor(0.5, device="meta"))
    with pytest.raises(ValueError, match="must be contiguous"):  # the other checks reach the fake as well
        ops.cross_entropy_fwd(logits.t(), targets.to("meta"), -1, 20, True, True)


def test_torch_compile_aot_eager():
    logits, targets = make(33, 100, 128, torch.float32)
    fn = torch.compile(lambda x, t: C.cross_entropy(x, t, -1, 100) * 3.0, backend="aot_eager", fullgraph=True)
    x = logits.clone().requires_grad_()
    fn(x, targets).backward()
    loss64, grad64 = ce64(logits, targets, -1, 100)
    torch.testing.assert_close(x.grad.double(), grad64 * 3.0, rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype, grad_output", [(torch.float16, 65536.0), (torch.bfloat16, 1 / 3)])
def test_compiled_backward_scales_in_fp32(dtype, grad_output):
    """Traced backward: dlogits * grad_output in fp32, rounded once, as the eager kernel does. It used to
    round grad_output to the logits' dtype first: a GradScaler's 65536 became inf in fp16, 1/3 was off in bf16."""
    logits, targets = make(8, 64, 64, dtype)
    grads = []
    for fn in (lambda x: C.cross_entropy(x, targets, -1, 64) * grad_output,
               torch.compile(lambda x: C.cross_entropy(x, targets, -1, 64) * grad_output, backend="aot_eager")):
        x = logits.clone().requires_grad_()
        fn(x).backward()
        grads.append(x.grad)
    assert torch.isfinite(grads[1]).all()
    assert torch.equal(grads[0], grads[1])


# ---- toolchain ------------------------------------------------------------------------------------

def test_missing_compiler_says_what_to_install(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    reason = C.toolchain_reason()
    assert "no C++ compiler" in reason and "install" in reason


def test_cuda_home_found_from_nvcc_on_path(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    home = C.cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit on this machine")
    import os
    assert os.path.isfile(os.path.join(home, "bin", "nvcc"))


@pytest.mark.skipif(C.cuda_home() is None or torch.version.cuda is None,
                    reason="no CUDA compiler (nvcc) found, or torch is not a CUDA build")
def test_extension_is_built_with_its_cuda_kernels_when_a_toolkit_is_found():
    """With a toolkit the .cu is compiled and linked into the extension (for sm_80/sm_90 when no GPU is
    visible), so its CUDA kernels are registered even on a CPU-only machine such as CI's."""
    if os.environ.get("GPT2K_BUILD_CUDA") == "0":
        pytest.skip("GPT2K_BUILD_CUDA=0 asks for the CPU part alone")
    C._load()
    assert C._state["cuda"], C._state
    for op in ("cross_entropy_fwd", "cross_entropy_grad_", "scale_grad_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gpt2k_cuda::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gpt2k_cuda::{op}", "CPU"), op


@pytest.mark.skipif(C.cuda_home() is None, reason="no CUDA compiler (nvcc) found")
def test_cuda_compiles_for_sm80_sm90_without_spills():
    rows = C.ptxas_report((80, 90))
    names = {r["name"] for r in rows}
    for kernel in ("ce_row_kernel<__nv_bfloat16, 8, true>", "ce_row_kernel<__nv_bfloat16, 8, false>",
                   "ce_row_kernel<float, 4, true>", "ce_row_kernel<__half, 8, false>",
                   "ce_prep_kernel", "ce_finish_kernel", "scale_kernel<__nv_bfloat16, 8>"):
        assert kernel in names, f"{kernel} missing from {sorted(names)}"
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r
        assert r["shared_bytes"] <= 48 * 1024, r
        if r["expect_ld128"]:  # the 16-byte-vector versions
            assert r["ld128"] > 0 and r["st128"] > 0, f"no 128-bit loads/stores: {r}"
    # ce_row_kernel (staged and two sweeps) and scale_kernel, x 3 dtypes x 2 archs
    assert sum(r["expect_ld128"] for r in rows) == 2 * 9
    for arch in ("sm_80", "sm_90"):
        two = next(r for r in rows if r["name"] == "ce_row_kernel<__nv_bfloat16, 8, false>" and r["arch"] == arch)
        assert two["ld128"] >= 8 and two["st128"] >= 4, f"sweeps not unrolled x4 with 128-bit accesses: {two}"
        staged = next(r for r in rows if r["name"] == "ce_row_kernel<__nv_bfloat16, 8, true>" and r["arch"] == arch)
        # one sweep over global memory (the other reads shared memory), unrolled x4
        assert staged["ld128"] == 4 and staged["st128"] >= 4, f"staged row: {staged}"
        assert staged["shared_bytes"] == 256, staged  # static; _stages() below assumes it


# ---- linear_cross_entropy and the model ----------------------------------------------------------

@pytest.mark.parametrize("chunk_rows", [None, 8, 13, 64])
def test_linear_cross_entropy(chunk_rows):
    from kernels.linear_cross_entropy import chunked_linear_cross_entropy

    n, c, vp, v = 37, 24, 136, 130
    hidden = torch.randn(n, c)
    weight = torch.randn(vp, c) * 0.5
    targets = torch.randint(0, v, (n,))
    targets[::5] = -1

    def grads(fn, dtype):
        return _linear_grads(fn, hidden, weight, targets, v, dtype)

    if chunk_rows is None:
        ours = grads(C.linear_cross_entropy, torch.float32)
    else:
        ours = grads(lambda *a: chunked_linear_cross_entropy(*a, backend="cuda", chunk_rows=chunk_rows), torch.float32)
    ref = grads(R.linear_cross_entropy, torch.float32)
    ref64 = grads(lambda h, w, t, i, vv: _linear_ce64(h, w, t, i, vv), torch.float64)
    for name, a, b, b64 in zip(("loss", "d_hidden", "d_weight"), ours, ref, ref64):
        assert_close(a, b64, b, atol=1e-6, name=name)


def _linear_ce64(h, w, t, ignore_index, v):
    logits = h @ w.t()
    x = logits[:, :v]
    keep = t != ignore_index
    rows = torch.logsumexp(x, 1) - x.gather(1, torch.where(keep, t, 0)[:, None])[:, 0]
    return torch.where(keep, rows, 0.0).sum() / keep.sum().clamp(min=1)


@pytest.mark.parametrize("spec", ["torch,cross_entropy=cuda", "torch,linear_cross_entropy=cuda"])
def test_tiny_gpt_matches_torch_backend(spec):
    from gpt2.model import GPT, GPTConfig

    config = GPTConfig(block_size=16, vocab_size=250, n_layer=2, n_head=2, n_embd=32)
    ref = GPT(config, kernels="torch")
    ours = GPT(config, kernels=spec)
    ours.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 250, (2, 16))
    targets = torch.randint(0, 250, (2, 16))
    targets[0, :3] = -1
    _, loss_ref = ref(idx, targets)
    logits, loss = ours(idx, targets)
    assert (logits is None) == ("linear_cross_entropy" in spec)
    loss_ref.backward()
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ---- GPU ----------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v,vp", [(1, 10, 10), (7, 1000, 1000), (4099, 50257, 50304), (64, 4099, 4104)])
def test_parity_cuda(n, v, vp, dtype):
    logits, targets = make(n, v, vp, dtype, device="cuda")
    check(logits, targets, -1, v)
    check(logits, targets, -1, v, grad_output=0.5)


@requires_cuda
def test_cuda_matches_cpu_and_is_deterministic():
    logits, targets = make(2048, 50257, 50304, torch.bfloat16, device="cuda", ignore_frac=0.05)
    a, ga = loss_and_grad(C.cross_entropy, logits, targets, -1, 50257)
    b, gb = loss_and_grad(C.cross_entropy, logits, targets, -1, 50257)
    assert torch.equal(a, b) and torch.equal(ga, gb), "two runs must give the same bits"
    cpu, _ = loss_and_grad(C.cross_entropy, logits[:64].cpu(), targets[:64].cpu(), -1, 50257)
    gpu, _ = loss_and_grad(C.cross_entropy, logits[:64], targets[:64], -1, 50257)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cuda_edge_rows(dtype):
    logits, targets = make(40, 500, 512, dtype, device="cuda", scale=1e4)
    mask = torch.rand(logits.shape, device="cuda") < 0.3
    mask[torch.arange(40), targets.clamp(min=0)] = False
    logits[mask] = float("-inf")
    targets[:5] = -1
    check(logits, targets, -1, 500)
    targets[:] = -1
    loss, grad = loss_and_grad(C.cross_entropy, logits, targets, -1, 500)
    assert loss.item() == 0.0 and (grad == 0).all()


@requires_cuda
def test_cuda_row_check_is_a_sync_the_debug_mode_sees():
    """The per-call invalid-row check reads back with PyTorch's memcpy_and_sync (as .item() does), so
    torch.cuda.set_sync_debug_mode sees it: test_train's test_gpu_training_step_never_syncs would catch the
    check left on in training (a raw cudaStreamSynchronize would slip past it). Off, the op does not sync."""
    import kernels

    logits, targets = make(16, 1000, 1024, torch.bfloat16, device="cuda")
    C.cross_entropy(logits, targets, -1, 1000)  # warm-up: the extension loads, the staging limit is set
    torch.cuda.synchronize()
    checks = kernels.set_loss_row_checks(True)
    try:
        torch.cuda.set_sync_debug_mode("error")
        with pytest.raises(RuntimeError, match="synchronizing CUDA operation"):
            C.cross_entropy(logits, targets, -1, 1000)
        kernels.set_loss_row_checks(False)
        loss = C.cross_entropy(logits, targets, -1, 1000)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        kernels.set_loss_row_checks(checks)
    assert torch.isfinite(loss).item()


@requires_cuda
def test_cuda_invalid_rows():
    logits, targets = make(10, 40, 48, torch.float32, device="cuda", ignore_frac=0.0)
    logits[7, :40] = float("-inf")
    with pytest.raises(ValueError, match="row 7 has every real logit -inf"):
        C.cross_entropy(logits, targets, -1, 40)
    assert torch.isnan(C.fused_ce_(logits.clone(), targets, -1, 40))
    logits[7] = 0.0
    targets[3] = -5
    with pytest.raises(ValueError, match="row 3 has target -5"):
        C.cross_entropy(logits, targets, -1, 40)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_fused_ce_inplace(dtype):
    logits, targets = make(513, 50257, 50304, dtype, device="cuda")
    loss64, grad64 = ce64(logits, targets, -1, 50257)
    count = (targets != -1).sum().item()
    buf = logits.clone()
    total = C.fused_ce_(buf, targets, -1, 50257)
    ref = logits.clone().requires_grad_()
    ref_loss = R.cross_entropy(ref, targets, -1, 50257) * count
    ref_loss.backward()
    assert_close(total, loss64 * count, ref_loss.detach(), atol=1e-3, name="loss sum")
    assert_close(buf, grad64 * count, ref.grad, atol=1e-6, name="dlogits")


def test_ce_tune_measures_both_kernels(monkeypatch, capsys):
    """bench/ce_tune.py (what a GPU session runs to compare the staged and two-sweep kernels): both
    variants, with and without dlogits, outputs compared bit for bit, GPT2K_CE_STAGE restored after. On
    the CPU the C++ op runs (the variable is moot there) with a stand-in timer."""
    from bench import ce_tune

    monkeypatch.setattr(ce_tune, "V", 100)
    monkeypatch.setattr(ce_tune, "VP", 104)
    monkeypatch.setenv("GPT2K_CE_STAGE", "x")
    calls = []
    rows = ce_tune.measure(7, torch.float32, 1.0, lambda r: None, device="cpu",
                           timer=lambda c: calls.append(len(c)) or 2.0)
    assert [(r["variant"], r["dlogits"]) for r in rows] == [
        ("staged", True), ("staged", False), ("two sweeps", True), ("two sweeps", False)]
    assert calls == [ce_tune.SETS] * 4 and all(r["bitwise_equal"] for r in rows)
    assert rows[0]["gbps"] == pytest.approx((7 * 104 * 4 * 2 + 7 * 8) / 2e6)
    assert os.environ["GPT2K_CE_STAGE"] == "x"
    with pytest.raises(SystemExit):
        ce_tune.main(["--dtypes", "int8"])
    assert "--dtypes" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert ce_tune.main([]) == 2


def _row_kernels(fn):
    """Names of the ce_row_kernel instantiations that fn() launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if "ce_row_kernel" in e.name}


def _stages(vocab_size, dtype):
    """Whether the staged kernel should run (csrc/classifier.cu's stage_limit): two staged rows, each with
    the 1 KB the hardware reserves per block and the kernel's 256 B of static shared memory (ptxas), fit
    in one SM, and one fits the per-block limit."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    per_sm = getattr(props, "shared_memory_per_multiprocessor", None)
    per_block = getattr(props, "shared_memory_per_block_optin", None)
    if per_sm is None or per_block is None:
        pytest.skip("this torch does not report the device's shared memory sizes")
    e = 16 // dtype.itemsize
    return -(-vocab_size // e) * 16 <= min(per_sm // 2 - 1024, per_block) - 256


@requires_cuda
@pytest.mark.parametrize("dtype,n,v,vp", [(torch.bfloat16, 1000, 50257, 50304), (torch.float16, 300, 50257, 50304),
                                          (torch.float32, 257, 4099, 4104), (torch.bfloat16, 5, 10, 16)])
def test_cuda_staged_row_matches_two_sweeps_bitwise(dtype, n, v, vp, monkeypatch):
    """The staged row (sweep 2 reads shared memory) and the two-sweep kernel (GPT2K_CE_STAGE=0) give
    the same bits, for the loss and dlogits and for the in-place fused_ce_; the staged one really runs
    where two rows fit an SM's shared memory (an H100 at GPT-2's vocab in bf16)."""
    logits, targets = make(n, v, vp, dtype, device="cuda", ignore_frac=0.05)
    row = min(3, n - 1)  # half of one row's real logits -inf, not its target's (that loss would be inf)
    minus_inf = torch.arange(vp, device="cuda") < v // 2
    minus_inf[targets[row].clamp(min=0)] = False
    logits[row, minus_inf] = float("-inf")
    out = {}
    for stage in ("0", "1"):  # the default ("1") last: check() below runs it
        monkeypatch.setenv("GPT2K_CE_STAGE", stage)
        res = {}
        names = _row_kernels(lambda: res.update(ce=loss_and_grad(C.cross_entropy, logits, targets, -1, v, 0.5)))
        buf = logits.clone()
        res["fused"] = (C.fused_ce_(buf, targets, -1, v), buf)
        out[stage] = res
        staged = any(", true>" in name for name in names)
        assert staged == (stage == "1" and _stages(v, dtype)), (stage, names)
    for key in ("ce", "fused"):
        for a, b in zip(out["1"][key], out["0"][key]):
            assert torch.equal(a, b), f"{key}: the staged and two-sweep kernels differ"
    check(logits, targets, -1, v)  # and both are right (the default path; the other has its bits)


@requires_cuda
def test_cuda_linear_cross_entropy_bf16():
    n, c, vp, v = 1000, 64, 50304, 50257
    hidden = torch.randn(n, c, device="cuda").to(torch.bfloat16)
    weight = (torch.randn(vp, c, device="cuda") * 0.05).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda")
    targets[::7] = -1

    def grads(fn, dtype):
        return _linear_grads(fn, hidden, weight, targets, v, dtype)

    ours = grads(C.linear_cross_entropy, torch.bfloat16)
    ref = grads(R.linear_cross_entropy, torch.bfloat16)
    ref64 = grads(_linear_ce64, torch.float64)
    for name, a, b, b64 in zip(("loss", "d_hidden", "d_weight"), ours, ref, ref64):
        assert_close(a, b64, b, atol=1e-3 * b64.abs().max().item(), name=name)


@requires_cuda
def test_cuda_opcheck_and_graph_capture():
    C._load()
    logits, targets = make(64, 1000, 1024, torch.bfloat16, device="cuda")
    x = logits.clone().requires_grad_()
    torch.library.opcheck(torch.ops.gpt2k_cuda.cross_entropy_fwd.default, (x, targets, -1, 1000, True, True))
    torch.library.opcheck(torch.ops.gpt2k_cuda.scale_grad_.default,
                          (torch.randn(5, 8, device="cuda"), torch.tensor(0.5, device="cuda")))
    # Capturing a CUDA graph: the invalid-row check (a sync) is skipped, the result is the same.
    expect = C.cross_entropy(logits, targets, -1, 1000)
    g = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        out = C.cross_entropy(logits, targets, -1, 1000)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expect)


def _linear_grads(fn, hidden, weight, targets, v, dtype):
    """(loss, dhidden, dweight) of fn(hidden, weight, targets, -1, v) on fresh leaves in dtype."""
    h = hidden.to(dtype).clone().requires_grad_()
    w = weight.to(dtype).clone().requires_grad_()
    loss = fn(h, w, targets, -1, v)
    loss.backward()
    return loss.detach(), h.grad, w.grad
