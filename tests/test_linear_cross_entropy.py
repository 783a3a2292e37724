"""Chunked lm_head + cross-entropy (kernels/linear_cross_entropy.py): loss and gradients of hidden and
weight vs the unfused reference (F.linear + reference.cross_entropy) and float64, for several chunk
sizes, both fused backends (cuda skips where kernels.classifier cannot run), autocast, and the model."""
import importlib

import pytest
import torch

from conftest import INTERPRET, requires_cuda
from numerics import assert_close

from kernels import reference as R
from kernels.linear_cross_entropy import chunked_linear_cross_entropy, default_chunk_rows

BACKENDS = ("triton", "cuda")


def need_backend(backend):
    """Skip (with the reason) when the backend's fused_ce_ cannot run here."""
    module = {"triton": "kernels.cross_entropy", "cuda": "kernels.classifier"}[backend]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        pytest.skip(f"{module} cannot be imported: {e}")
    reason = getattr(mod, "unavailable_reason", lambda: None)()
    if reason:
        pytest.skip(f"{module}: {reason}")
    if not hasattr(mod, "fused_ce_"):
        pytest.skip(f"{module} has no fused_ce_")


def truth64(hidden, weight, targets, ignore_index, vocab_size, grad_output=1.0):
    """float64 loss and gradients (of grad_output * loss) of hidden and weight."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    lsm = torch.log_softmax((h @ w.t())[:, :vocab_size], dim=-1)
    keep = targets != ignore_index
    picked = lsm.gather(1, torch.where(keep, targets, 0)[:, None]).squeeze(1)
    loss = -torch.where(keep, picked, torch.zeros_like(picked)).sum() / max(int(keep.sum()), 1)
    (loss * grad_output).backward()
    return loss.detach(), h.grad, w.grad


def run(fn, hidden, weight, targets, ignore_index, vocab_size, autocast=False, grad_output=1.0, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = fn(h, w, targets, ignore_index, vocab_size, **kw)
    loss.backward(torch.tensor(grad_output, device=loss.device))
    return loss.detach(), h.grad, w.grad


def factor(dtype, backend):
    # Triton's interpreter truncates fp32 -> bf16 (the GPU rounds to nearest): see test_cross_entropy.
    return 4.0 if INTERPRET and backend == "triton" and dtype == torch.bfloat16 else 2.0


def check(hidden, weight, targets, ignore_index=-1, vocab_size=None, backend="triton", chunk_rows=None,
          autocast=False, atol=1e-6, grad_output=1.0):
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    out = run(chunked_linear_cross_entropy, hidden, weight, targets, ignore_index, vocab_size, autocast,
              grad_output, backend=backend, chunk_rows=chunk_rows)
    ref = run(R.linear_cross_entropy, hidden, weight, targets, ignore_index, vocab_size, autocast, grad_output)
    t64 = truth64(hidden, weight, targets, ignore_index, vocab_size, grad_output)
    assert out[0].dtype == torch.float32
    assert out[1].dtype == hidden.dtype and out[2].dtype == weight.dtype
    f = factor(torch.bfloat16 if autocast else hidden.dtype, backend)
    assert_close(out[0], t64[0], ref[0], atol=atol + 8 * 2**-23 * max(1.0, abs(t64[0].item())), name="loss")
    assert_close(out[1], t64[1], ref[1], factor=f, atol=atol, name="grad hidden")
    assert_close(out[2], t64[2], ref[2], factor=f, atol=atol, name="grad weight")
    return out


def make(n, c, width, vocab, dtype, device, ignore_frac=0.25):
    hidden = torch.randn(n, c, device=device).to(dtype)
    weight = (torch.randn(width, c, device=device) * c**-0.5 * 2).to(dtype)
    targets = torch.randint(0, vocab, (n,), device=device)
    targets[torch.rand(n, device=device) < ignore_frac] = -1
    return hidden, weight, targets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 37, None])
def test_chunks_match_reference(chunk_rows, backend, device):
    need_backend(backend)
    hidden, weight, targets = make(37, 16, 40, 33, torch.float32, device)
    check(hidden, weight, targets, vocab_size=33, backend=backend, chunk_rows=chunk_rows)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_half_precision(dtype, backend, device):
    need_backend(backend)
    hidden, weight, targets = make(50, 32, 72, 70, dtype, device)
    check(hidden, weight, targets, vocab_size=70, backend=backend, chunk_rows=16, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_grad_output_scales_both_gradients(dtype, backend, device):
    """loss * g: dh and dW both scaled by g. fp32 stores dW as a sum (scaled by g / count in backward), a
    half weight stores it already divided by the count (scaled by g alone): both paths, g != 1."""
    need_backend(backend)
    hidden, weight, targets = make(30, 16, 40, 37, dtype, device)
    check(hidden, weight, targets, vocab_size=37, backend=backend, chunk_rows=8, grad_output=-2.5,
          atol=1e-6 if dtype == torch.float32 else 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast(backend, device):
    """fp32 hidden and weight under bf16 autocast, as the model calls it: bf16 matmuls like F.linear,
    fp32 gradients."""
    need_backend(backend)
    hidden, weight, targets = make(50, 32, 72, 70, torch.float32, device)
    check(hidden, weight, targets, vocab_size=70, backend=backend, chunk_rows=16, autocast=True, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored(backend, device):
    need_backend(backend)
    hidden, weight, targets = make(9, 8, 16, 16, torch.float32, device, ignore_frac=0.0)
    targets[1:] = -1
    check(hidden, weight, targets, backend=backend, chunk_rows=4)
    targets[:] = -1
    loss, dh, dw = check(hidden, weight, targets, backend=backend, chunk_rows=4)
    assert loss.item() == 0.0 and (dh == 0).all() and (dw == 0).all()


def test_grad_subsets_and_no_grad(device):
    hidden, weight, targets = make(20, 8, 24, 24, torch.float32, device)
    full = run(chunked_linear_cross_entropy, hidden, weight, targets, -1, 24, chunk_rows=7)
    h = hidden.clone().requires_grad_()
    chunked_linear_cross_entropy(h, weight, targets, chunk_rows=7).backward()  # frozen weight
    assert torch.equal(h.grad, full[1])
    w = weight.clone().requires_grad_()
    chunked_linear_cross_entropy(hidden, w, targets, chunk_rows=7).backward()  # frozen hidden
    assert torch.equal(w.grad, full[2])
    with torch.no_grad():
        assert torch.equal(chunked_linear_cross_entropy(h, w, targets, chunk_rows=7), full[0])
    h.grad = None
    (chunked_linear_cross_entropy(h, weight, targets, chunk_rows=7) * -3.0).backward()
    torch.testing.assert_close(h.grad, full[1] * -3.0)


def test_never_holds_more_than_a_chunk(monkeypatch, device):
    """fused_ce_ sees (chunk_rows, V) logits at most, once per chunk, covering every row once."""
    import kernels.cross_entropy as ce

    seen = []

    def spy(logits, targets, ignore_index, vocab_size):
        seen.append(tuple(logits.shape))
        return ce.fused_ce_(logits, targets, ignore_index, vocab_size)

    monkeypatch.setattr("kernels.linear_cross_entropy._fused_ce", lambda backend: spy)
    hidden, weight, targets = make(23, 8, 24, 24, torch.float32, device)
    check(hidden, weight, targets, chunk_rows=10)
    assert seen == [(10, 24), (10, 24), (3, 24)]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fp16_weight_gradient_does_not_overflow(backend, device):
    """dW summed over 8192 rows of |h| ~ 10 exceeds fp16's 65504 before the division by the count: it is
    divided in fp32 before it is rounded into the weight's dtype (it used to come back as -inf)."""
    need_backend(backend)
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(8192, 8, generator=g) + 10).half().to(device)
    weight = (torch.randn(16, 8, generator=g) * 0.01).half().to(device)
    targets = torch.full((8192,), 3, device=device)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    chunked_linear_cross_entropy(h, w, targets, backend=backend).backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    R.cross_entropy(h64 @ w64.t(), targets).backward()
    assert torch.isfinite(w.grad).all() and w64.grad.abs().max() > 9
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_strided_targets_and_transposed_hidden(backend, device):
    """Targets as a strided view (the cuda kernel refused them, the Triton one read them wrongly), and a
    transposed hidden under torch.compile (the real op's dh kept hidden's layout, the fake's did not)."""
    need_backend(backend)
    hidden_t, weight = torch.randn(8, 16, device=device), torch.randn(32, 8, device=device)
    targets = torch.randint(0, 32, (16, 2), device=device)[:, 1]
    assert not targets.is_contiguous()
    want = R.cross_entropy(hidden_t.t() @ weight.t(), targets)
    f = lambda h, w: chunked_linear_cross_entropy(h.t(), w, targets, backend=backend, chunk_rows=5) * 2.0  # noqa: E731
    grads = []
    for fn in (f, torch.compile(f, backend="inductor" if device == "cpu" else "aot_eager")):
        h, w = hidden_t.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w)
        torch.testing.assert_close(loss, want * 2.0, rtol=1e-5, atol=1e-5)
        loss.backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_errors(device):
    hidden, weight, targets = make(6, 8, 10, 10, torch.float32, device, ignore_frac=0.0)
    with pytest.raises(ValueError, match="same dtype"):
        chunked_linear_cross_entropy(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="unknown backend"):
        chunked_linear_cross_entropy(hidden, weight, targets, backend="torch")
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        chunked_linear_cross_entropy(hidden, weight[:, :4], targets)
    with pytest.raises(ValueError, match="chunk_rows"):
        chunked_linear_cross_entropy(hidden, weight, targets, chunk_rows=0)
    targets[3] = 10
    with pytest.raises(ValueError, match="outside"):
        chunked_linear_cross_entropy(hidden, weight, targets, chunk_rows=4)


def test_default_chunk_rows():
    rows = default_chunk_rows(50304, torch.bfloat16)
    assert rows % 128 == 0 and rows * 50304 * 2 <= 256 * 2**20
    assert default_chunk_rows(10, torch.float32) % 128 == 0


@pytest.mark.parametrize("grads,dtype", [((True, True), torch.float32), ((False, True), torch.float32),
                                         ((False, False), torch.float32),
                                         ((True, True), torch.bfloat16)])  # half: dW returned in weight's dtype
def test_opcheck(grads, dtype, device):
    hidden, weight, targets = make(7, 8, 12, 10, dtype, device)
    hidden.requires_grad_(grads[0])
    weight.requires_grad_(grads[1])
    torch.library.opcheck(torch.ops.gpt2k.linear_cross_entropy.default,
                          (hidden, weight, targets, -1, 10, "triton", 3, dtype, *grads))


def test_a_meta_tensor_among_real_ones_raises(device):
    """A meta argument sends the call to the fake implementation, which checks like the op (here: the devices
    differ) instead of returning an uninitialized loss and gradients."""
    hidden, weight, targets = make(7, 8, 12, 10, torch.float32, device)
    for i in range(3):
        args = [hidden, weight, targets]
        args[i] = args[i].to("meta")
        with pytest.raises(ValueError, match="must be on one device"):
            torch.ops.gpt2k.linear_cross_entropy(*args, -1, 10, "triton", 3, torch.float32, True, True)


def test_torch_compile(device):
    hidden, weight, targets = make(11, 8, 12, 10, torch.float32, device)
    fn = torch.compile(chunked_linear_cross_entropy, backend="aot_eager", fullgraph=True)
    out = run(fn, hidden, weight, targets, -1, 10, chunk_rows=4)
    ref = run(chunked_linear_cross_entropy, hidden, weight, targets, -1, 10, chunk_rows=4)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


def test_registry():
    from kernels import get_ops

    ops = get_ops("torch,linear_cross_entropy=triton")
    assert ops.fused_classifier and ops.linear_cross_entropy.__module__ == "kernels.cross_entropy"


@pytest.mark.parametrize("spec", ["torch,cross_entropy=triton", "torch,linear_cross_entropy=triton"])
def test_model_matches_torch(spec, device):
    """Tiny GPT in fp32: loss and every parameter's gradient match the all-torch model."""
    from gpt2.model import GPT, GPTConfig

    config = GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    ref_model = GPT(config, kernels="torch").to(device)
    model = GPT(config, kernels=spec).to(device)
    model.load_state_dict(ref_model.state_dict())
    idx = torch.randint(0, 100, (2, 32), device=device)
    targets = torch.randint(0, 100, (2, 32), device=device)
    targets[0, :5] = -1
    ref_logits, ref_loss = ref_model(idx, targets)
    logits, loss = model(idx, targets)
    assert (logits is None) == ("linear_cross_entropy" in spec)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    ref_loss.backward()
    loss.backward()
    ref_grads = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ---- GPU --------------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_gpt2_shape(backend):
    """GPT-2's lm_head under bf16 autocast (fp32 params), 2048 rows, default chunks plus a ragged one."""
    need_backend(backend)
    hidden, weight, targets = make(2048, 768, 50304, 50257, torch.float32, "cuda", ignore_frac=0.05)
    weight = weight * 0.05
    check(hidden, weight, targets, vocab_size=50257, backend=backend, autocast=True, atol=1e-4)
    check(hidden, weight, targets, vocab_size=50257, backend=backend, chunk_rows=700, autocast=True, atol=1e-4)


@requires_cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_peak_memory(backend):
    """Forward+backward peak memory <= 30% of the unfused lm_head + loss (B*T = 16384, GPT-2 vocab)."""
    need_backend(backend)
    hidden, weight, targets = make(16384, 768, 50304, 50257, torch.float32, "cuda", ignore_frac=0.0)

    def peak(fn, **kw):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h, w, targets, -1, 50257, **kw)
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    fused = peak(chunked_linear_cross_entropy, backend=backend)
    unfused = peak(R.linear_cross_entropy)
    print(f"peak memory: fused {fused / 2**20:.0f} MiB, unfused {unfused / 2**20:.0f} MiB ({fused / unfused:.1%})")
    assert fused <= 0.3 * unfused
