"""Triton fused cross-entropy (kernels/cross_entropy.py): loss and dlogits vs kernels.reference and
float64, ignored targets, padded vocab, large and -inf logits, errors, opcheck, AOT compile report."""
import pytest
import torch
import torch.nn.functional as F

from kernels import reference as R
from conftest import HAS_CUDA, INTERPRET, requires_cuda
from numerics import assert_close

ce = pytest.importorskip("kernels.cross_entropy")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def truth64(logits, targets, ignore_index, vocab_size):
    """float64 (mean loss, dloss/dlogits): softmax - onehot over the real columns / count."""
    x = logits.detach().double()
    n, width = x.shape
    keep = targets != ignore_index
    count = max(int(keep.sum()), 1)
    lsm = torch.log_softmax(x[:, :vocab_size], dim=-1)
    t = torch.where(keep, targets, 0)
    picked = lsm.gather(1, t[:, None]).squeeze(1)
    loss = -torch.where(keep, picked, torch.zeros_like(picked)).sum() / count
    grad = torch.zeros(n, width, dtype=torch.float64, device=x.device)
    g = lsm.exp() - F.one_hot(t, vocab_size).double()
    grad[:, :vocab_size] = torch.where(keep[:, None], g, torch.zeros_like(g)) / count
    return loss, grad


def run(fn, logits, targets, ignore_index, vocab_size, grad_output=1.0):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, targets, ignore_index, vocab_size)
    (loss * grad_output).backward()
    return loss.detach(), x.grad


def grad_factor(dtype):
    """Triton's interpreter converts fp32 -> bf16 by truncation (up to 1 ulp), the GPU rounds to
    nearest (1/2 ulp) like the reference: allow twice the usual factor there, and only there."""
    return 4.0 if INTERPRET and dtype == torch.bfloat16 else 2.0


def check(logits, targets, ignore_index=-1, vocab_size=None, grad_output=1.0):
    """Kernel vs float64, with the reference op in the same dtype as the error baseline."""
    vocab_size = logits.shape[1] if vocab_size is None else vocab_size
    loss, grad = run(ce.cross_entropy, logits, targets, ignore_index, vocab_size, grad_output)
    ref_loss, ref_grad = run(R.cross_entropy, logits, targets, ignore_index, vocab_size, grad_output)
    loss64, grad64 = truth64(logits, targets, ignore_index, vocab_size)
    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype
    # Loss: fp32 everywhere; allow a few fp32 ulps of its magnitude (sums in another order).
    assert_close(loss, loss64, ref_loss, atol=8 * 2**-23 * max(1.0, abs(loss64.item())), name="loss")
    assert_close(grad, grad64 * grad_output, ref_grad, factor=grad_factor(logits.dtype), atol=1e-6, name="dlogits")
    return loss, grad


def make(n, width, vocab, dtype, device, scale=3.0, ignore_frac=0.25):
    logits = (torch.randn(n, width, device=device) * scale).to(dtype)
    targets = torch.randint(0, vocab, (n,), device=device)
    targets[torch.rand(n, device=device) < ignore_frac] = -1
    return logits, targets


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,width,vocab", [(1, 10, 10), (3, 10, 10), (7, 128, 100), (33, 1000, 999)])
def test_matches_reference(n, width, vocab, dtype, device):
    check(*make(n, width, vocab, dtype, device), vocab_size=vocab)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpt2_padded_vocab(dtype, device):
    """V = 50257 real columns in GPT-2's 50304-wide buffer: padded columns get probability 0, grad 0."""
    logits, targets = make(3, 50304, 50257, dtype, device, ignore_frac=0.0)
    logits[:, 50257:] = 30.0  # would dominate the softmax if the padding were counted
    targets[0] = 50256  # the last real column
    _, grad = check(logits, targets, vocab_size=50257)
    assert (grad[:, 50257:] == 0).all()


def test_many_rows(device):
    check(*make(1000, 16, 11, torch.float32, device), vocab_size=11)  # one program per row: slow interpreted


def test_ignored_rows(device):
    logits, targets = make(9, 40, 40, torch.float32, device, ignore_frac=0.0)
    targets[1:] = -1  # all but one ignored: the mean is over one row
    loss, grad = check(logits, targets)
    assert (grad[1:] == 0).all()
    targets[:] = -1  # all ignored: loss 0, not NaN
    loss, grad = check(logits, targets)
    assert loss.item() == 0.0 and (grad == 0).all()
    targets = torch.randint(0, 40, (9,), device=device)
    targets[::2] = 7  # a non-default ignore_index, which is also a valid class
    check(logits, targets, ignore_index=7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits(dtype, device):
    scale = 1e4 if dtype != torch.float16 else 6e3  # fp16's max is 65504
    check(*make(5, 300, 300, dtype, device, scale=scale, ignore_frac=0.2))


def test_neg_inf_entries(device):
    logits, targets = make(6, 64, 60, torch.float32, device, ignore_frac=0.0)
    mask = torch.rand(6, 64, device=device) < 0.5
    mask[torch.arange(6), targets] = False
    logits[mask] = float("-inf")
    _, grad = check(logits, targets, vocab_size=60)
    assert (grad[mask] == 0).all()


def test_neg_inf_target_gives_inf_like_reference(device):
    logits, targets = make(2, 16, 16, torch.float32, device, ignore_frac=0.0)
    logits[0, targets[0]] = float("-inf")
    loss = ce.cross_entropy(logits, targets)
    assert loss.item() == float("inf") == R.cross_entropy(logits, targets).item()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's log(0) and inf - inf in the interpreter
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_all_neg_inf_row_raises(dtype, device):
    logits, targets = make(4, 50, 40, dtype, device, ignore_frac=0.0)
    logits[2, :40] = float("-inf")  # padded columns stay finite: they must not rescue the row
    targets[0] = -1  # an ignored row beside it: its target (-1) is not the invalid one to name
    with pytest.raises(ValueError, match="all -inf"):
        ce.cross_entropy(logits, targets, vocab_size=40)
    with pytest.raises(ValueError, match="all -inf"):
        ce.cross_entropy(logits.requires_grad_(), targets, vocab_size=40)
    targets[2] = -1  # an ignored row is never read
    assert torch.isfinite(ce.cross_entropy(logits.detach(), targets, vocab_size=40))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_and_bad_target_raise(device):
    logits, targets = make(4, 20, 20, torch.float32, device, ignore_frac=0.0)
    with pytest.raises(ValueError, match="outside"):
        ce.cross_entropy(logits, torch.where(targets == targets[0], 20, targets), vocab_size=20)
    negative = targets.clone()
    negative[2] = -5  # negative but not ignore_index: invalid too (no column matches it)
    with pytest.raises(ValueError, match="target -5 is outside"):
        ce.cross_entropy(logits, negative, vocab_size=20)
    assert torch.isnan(ce.fused_ce_(logits.clone(), negative, -1, 20))
    logits[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ce.cross_entropy(logits, targets)


def test_strided_targets(device):
    """targets as a strided view (a column of a (N, 2) tensor): the kernel read them with unit stride."""
    logits, targets = make(6, 32, 32, torch.float32, device)
    pairs = torch.stack([torch.zeros_like(targets), targets], dim=1)
    strided = pairs[:, 1]
    assert not strided.is_contiguous()
    assert torch.equal(ce.cross_entropy(logits, strided), ce.cross_entropy(logits, targets))
    torch.testing.assert_close(ce.cross_entropy(logits, strided), R.cross_entropy(logits, targets), rtol=1e-6, atol=1e-6)


def test_bad_input(device):
    logits, targets = make(4, 20, 20, torch.float32, device)
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        ce.cross_entropy(logits.double(), targets)
    with pytest.raises(ValueError, match="2-D"):
        ce.cross_entropy(logits[None], targets)
    with pytest.raises(ValueError, match="int64"):
        ce.cross_entropy(logits, targets.int())
    with pytest.raises(ValueError, match="vocab_size"):
        ce.cross_entropy(logits, targets, vocab_size=21)


def test_grad_output_and_no_grad(device):
    logits, targets = make(5, 30, 30, torch.float32, device)
    check(logits, targets, grad_output=-2.5)
    with torch.no_grad():
        no_grad_loss = ce.cross_entropy(logits.requires_grad_(), targets)
    assert torch.equal(no_grad_loss, run(ce.cross_entropy, logits, targets, -1, 30)[0])
    strided = torch.randn(30, 5, device=device).t()  # column stride != 1
    check(strided, targets)


def test_row_strided_view(device):
    """A column slice of a wider buffer (unit column stride, row stride != width) is read in place with its
    row stride; fused_ce_, which overwrites its input, refuses a non-contiguous one."""
    logits, targets = make(6, 40, 37, torch.float32, device)
    wide = torch.randn(6, 56, device=device)
    wide[:, 8:48] = logits
    grads = []
    for fn in (ce.cross_entropy, R.cross_entropy):
        w = wide.clone().requires_grad_()  # (run() would clone the view itself: contiguous)
        view = w[:, 8:48]
        assert view.stride() == (56, 1)
        loss = fn(view, targets, -1, 37)
        loss.backward()
        grads.append((loss.detach(), w.grad))
    (loss, grad), (ref_loss, ref_grad) = grads
    loss64, grad64 = truth64(logits, targets, -1, 37)
    assert_close(loss, loss64, ref_loss, atol=8 * 2**-23 * max(1.0, abs(loss64.item())), name="loss")
    assert_close(grad[:, 8:48], grad64, ref_grad[:, 8:48], atol=1e-6, name="dlogits")
    assert (grad[:, :8] == 0).all() and (grad[:, 48:] == 0).all()
    with pytest.raises(ValueError, match="contiguous"):
        ce.fused_ce_(wide[:, 8:48], targets, -1, 37)


def test_second_backward_is_an_error(device):
    """backward scales the saved dlogits in place, so retain_graph + a second backward must not
    silently return a twice-scaled gradient."""
    logits, targets = make(4, 12, 12, torch.float32, device)
    x = logits.requires_grad_()
    loss = ce.cross_entropy(x, targets) * 3.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_ce_contract(dtype, device):
    """fused_ce_: sum of losses, logits overwritten by the UNSCALED softmax - onehot; 0 on padding."""
    logits, targets = make(6, 48, 45, dtype, device)
    targets[0] = -1
    loss64, grad64 = truth64(logits, targets, -1, 45)
    count = max(int((targets != -1).sum()), 1)
    buf = logits.clone()
    loss_sum = ce.fused_ce_(buf, targets, -1, 45)
    assert loss_sum.dtype == torch.float32 and loss_sum.dim() == 0
    torch.testing.assert_close(loss_sum.double(), loss64 * count, rtol=1e-6, atol=1e-5)
    ref_grad = run(R.cross_entropy, logits, targets, -1, 45)[1] * count
    assert_close(buf, grad64 * count, ref_grad, factor=grad_factor(dtype), atol=1e-6, name="dlogits")
    assert (buf[0] == 0).all() and (buf[:, 45:] == 0).all()


def test_deterministic(device):
    logits, targets = make(64, 500, 500, torch.bfloat16, device)
    a, b = run(ce.cross_entropy, logits, targets, -1, 500), run(ce.cross_entropy, logits, targets, -1, 500)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("compute_grad,dtype", [(True, torch.float32), (False, torch.float32),
                                                (True, torch.bfloat16)])  # half: the fake's loss is fp32 too
def test_opcheck(compute_grad, dtype, device):
    logits, targets = make(5, 24, 20, dtype, device)
    logits.requires_grad_(compute_grad)
    torch.library.opcheck(torch.ops.gpt2k.cross_entropy_triton.default, (logits, targets, -1, 20, compute_grad))
    grad_buffer = torch.randn(5, 24, device=device).to(dtype)
    for g in (1.0, -0.5):
        torch.library.opcheck(torch.ops.gpt2k.cross_entropy_triton_scale_.default,
                              (grad_buffer, torch.tensor(g, device=device)))


def test_a_meta_tensor_among_real_ones_raises(device):
    """The dispatcher sends a call with one meta argument to the fake implementation: it checks the arguments
    as the real op does (here: the devices differ) instead of returning an uninitialized loss."""
    logits, targets = make(5, 24, 20, torch.float32, device)
    for args in ((logits, targets.to("meta")), (logits.to("meta"), targets)):
        with pytest.raises(ValueError, match="targets on .* but logits on"):
            torch.ops.gpt2k.cross_entropy_triton(*args, -1, 20, True)


@pytest.mark.parametrize("grad_output", (1.0, -2.5))
def test_torch_compile(grad_output, device):
    """The traced backward (out of place) scales by grad_output as the eager one (in place) does."""
    logits, targets = make(6, 24, 20, torch.float32, device)
    fn = torch.compile(ce.cross_entropy, backend="aot_eager", fullgraph=True)
    loss, grad = run(fn, logits, targets, -1, 20, grad_output)
    ref_loss, ref_grad = run(ce.cross_entropy, logits, targets, -1, 20, grad_output)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
    _, grad64 = truth64(logits, targets, -1, 20)
    torch.testing.assert_close(grad.double(), grad64 * grad_output, rtol=0, atol=1e-6)


def test_registry():
    from kernels import get_ops

    assert get_ops("torch,cross_entropy=triton").cross_entropy is ce.cross_entropy


def test_aot_compile_report():
    """The kernels compile for sm_80 and sm_90 with no spills and 128-bit loads (no GPU needed)."""
    from kernels._triton_utils import check_report, static_report

    rows = static_report(["kernels.cross_entropy"])
    assert len(rows) == 2 * len(ce.compile_specs())
    for row in rows:
        assert "error" not in row, row
        assert not check_report(row), (row["name"], row["arch"], check_report(row))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_gpt2_shape(dtype):
    """GPU: 4099 rows of GPT-2's padded vocab (the shape the model trains on), run twice: bitwise equal."""
    logits, targets = make(4099, 50304, 50257, dtype, "cuda", ignore_frac=0.05)
    loss, grad = check(logits, targets, vocab_size=50257)
    loss2, grad2 = run(ce.cross_entropy, logits, targets, -1, 50257)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only check")
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA GPU"):
        ce.cross_entropy(torch.randn(2, 5), torch.tensor([0, 1]))
