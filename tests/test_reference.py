"""kernels/reference.py against independent float64 computations written out here."""
import math

import pytest
import torch

from kernels import reference as ref


def ln64(x, w, b, eps):
    x = x.double()
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w.double() + b.double()


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 768), (4, 4099)])
def test_layer_norm(shape):
    x = torch.randn(shape) * 3 + 1
    w, b = torch.randn(shape[-1]), torch.randn(shape[-1])
    out = ref.layer_norm(x, w, b, 1e-5)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out.double(), ln64(x, w, b, 1e-5), rtol=1e-5, atol=1e-5)


def test_layer_norm_mixed_dtype_keeps_input_dtype():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w, b = torch.randn(64), torch.randn(64)
    out = ref.layer_norm(x, w, b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ln64(x, w, b, 1e-5), rtol=0.05, atol=0.05)


def test_gelu_is_tanh_approximation():
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    expect = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(ref.gelu(x.float()).double(), expect, rtol=1e-6, atol=1e-6)
    exact = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    assert (ref.gelu(x.float()).double() - exact).abs().max() > 1e-5  # not the erf GELU


def attention64(q, k, v):
    q, k, v = q.double(), k.double(), v.double()
    T, D = q.shape[-2:]
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    mask = torch.arange(T)[:, None] >= torch.arange(T)[None, :]
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("T,D", [(1, 32), (17, 64), (100, 128)])
def test_attention(T, D):
    q, k, v = (torch.randn(2, 3, T, D) for _ in range(3))
    expect = attention64(q, k, v)
    torch.testing.assert_close(ref.attention(q, k, v).double(), expect, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ref.attention_math(q, k, v).double(), expect, rtol=1e-4, atol=1e-5)


def test_attention_is_causal():
    q, k, v = (torch.randn(1, 1, 8, 32) for _ in range(3))
    v2 = v.clone()
    v2[..., 5:, :] = 100.0  # future values must not change earlier outputs
    torch.testing.assert_close(ref.attention(q, k, v)[..., :5, :], ref.attention(q, k, v2)[..., :5, :])


def ce64(logits, targets, ignore_index=-1, vocab_size=None):
    V = vocab_size or logits.shape[-1]
    x = logits[:, :V].double()
    total, count = 0.0, 0
    for i, t in enumerate(targets.tolist()):
        if t == ignore_index:
            continue
        total += (torch.logsumexp(x[i], 0) - x[i, t]).item()
        count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_ignored_and_padded(dtype):
    N, V, Vp = 6, 10, 16
    logits = (torch.randn(N, Vp) * 4).to(dtype)
    logits[:, V:] = 50.0  # padded columns must never count
    targets = torch.tensor([0, 9, -1, 3, -1, 5])
    got = ref.cross_entropy(logits, targets, vocab_size=V)
    assert got.dtype == torch.float32
    assert abs(got.item() - ce64(logits, targets, vocab_size=V)) < 1e-5


def test_cross_entropy_all_but_one_and_all_ignored():
    logits = torch.randn(5, 7, requires_grad=True)
    targets = torch.tensor([-1, -1, 4, -1, -1])
    loss = ref.cross_entropy(logits, targets)
    assert abs(loss.item() - ce64(logits.detach(), targets)) < 1e-6
    loss.backward()
    assert logits.grad[[0, 1, 3, 4]].abs().max() == 0
    none = ref.cross_entropy(logits, torch.full((5,), -1))
    assert none.item() == 0.0 and torch.isfinite(none)


def test_cross_entropy_gradient_of_padding_is_zero():
    logits = torch.randn(4, 16, requires_grad=True)
    ref.cross_entropy(logits, torch.tensor([1, 2, 3, 4]), vocab_size=10).backward()
    assert logits.grad[:, 10:].abs().max() == 0
    p = torch.softmax(logits.detach()[:, :10].double(), -1)
    p[torch.arange(4), torch.tensor([1, 2, 3, 4])] -= 1
    torch.testing.assert_close(logits.grad[:, :10].double(), p / 4, rtol=1e-5, atol=1e-7)


def test_linear_cross_entropy_matches_unfused():
    h, w = torch.randn(8, 16), torch.randn(12, 16)
    t = torch.randint(0, 10, (8,))
    expect = ce64(h.double() @ w.double().T, t, vocab_size=10)
    assert abs(ref.linear_cross_entropy(h, w, t, vocab_size=10).item() - expect) < 1e-5


def test_adamw_step_matches_torch():
    torch.manual_seed(1)
    p0 = torch.randn(50)
    p_torch = p0.clone().requires_grad_()
    opt = torch.optim.AdamW([p_torch], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    p, m, v = p0.clone(), torch.zeros(50), torch.zeros(50)
    for step in range(1, 6):
        g = torch.randn(50)
        p_torch.grad = g.clone()
        opt.step()
        ref.adamw_step_(p, g, m, v, step, 1e-2, 0.9, 0.95, 1e-8, 0.1)
        torch.testing.assert_close(p, p_torch.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m, opt.state[p_torch]["exp_avg"])
    torch.testing.assert_close(v, opt.state[p_torch]["exp_avg_sq"])


def test_torch_backend_adamw_is_torchs():
    opt = ref.AdamW([torch.nn.Parameter(torch.randn(3))], lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    assert not opt.defaults.get("fused")  # CPU parameters: not fused


def test_torch_backend_adamw_takes_generators_in_groups():
    m = torch.nn.Linear(3, 2)
    opt = ref.AdamW([{"params": m.parameters(), "weight_decay": 0.0}], lr=1e-3)
    assert [len(g["params"]) for g in opt.param_groups] == [2]
    opt = ref.AdamW(m.parameters(), lr=1e-3)
    assert [len(g["params"]) for g in opt.param_groups] == [2]


def test_cross_entropy_vocab_size_out_of_range_raises():
    with pytest.raises(ValueError, match="vocab_size 20 must be in"):
        ref.cross_entropy(torch.randn(2, 16), torch.tensor([0, 1]), vocab_size=20)


# ---- arguments that every call above left at one value (mutation testing found them unpinned) -----------

def test_layer_norm_eps_default_and_out_dtype():
    """eps is used (a small-variance input, where eps dominates), defaults to GPT-2's 1e-5, and out_dtype
    sets the output's dtype."""
    x = torch.randn(4, 96) * 1e-3 + 0.5  # variance ~1e-6: eps 1e-5 vs 1e-6 changes the output ~3x
    w, b = torch.randn(96), torch.randn(96)
    for eps in (0.1, 1e-5):
        torch.testing.assert_close(ref.layer_norm(x, w, b, eps).double(), ln64(x, w, b, eps), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ref.layer_norm(x, w, b).double(), ln64(x, w, b, 1e-5), rtol=1e-4, atol=1e-4)
    out = ref.layer_norm(x, w, b, 0.1, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ln64(x, w, b, 0.1), rtol=0.02, atol=0.02)


def test_add_layer_norm_is_sum_then_layer_norm():
    x, r = torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(3, 64) * 1e-3
    w, b = torch.randn(64), torch.randn(64)
    s, y = ref.add_layer_norm(x, r, w, b, 0.1, out_dtype=torch.bfloat16)
    assert s.dtype == torch.float32 and torch.equal(s, x.float() + r)  # PyTorch's promoted dtype
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ln64(s, w, b, 0.1), rtol=0.02, atol=0.02)
    s, y = ref.add_layer_norm(r, r, w, b)  # default eps 1e-5 on a small-variance sum
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ln64(2 * r, w, b, 1e-5), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_cross_entropy_other_ignore_index(ignore_index):
    """ignore_index is honoured whatever its value (3: a real class id), in the loss and the mean."""
    logits = torch.randn(6, 12) * 3
    targets = torch.tensor([0, 3, 9, ignore_index, 5, ignore_index])
    got = ref.cross_entropy(logits, targets, ignore_index=ignore_index, vocab_size=10)
    assert abs(got.item() - ce64(logits, targets, ignore_index, vocab_size=10)) < 1e-5
    h, w = torch.randn(6, 8), torch.randn(12, 8)
    got = ref.linear_cross_entropy(h, w, targets, ignore_index=ignore_index, vocab_size=10)
    assert abs(got.item() - ce64(h.double() @ w.double().T, targets, ignore_index, vocab_size=10)) < 1e-5


def test_cross_entropy_vocab_size_range_is_inclusive():
    logits, targets = torch.randn(3, 16) * 2, torch.tensor([15, 0, 7])
    full = ref.cross_entropy(logits, targets)
    assert torch.equal(ref.cross_entropy(logits, targets, vocab_size=16), full)  # the whole width is valid
    assert abs(full.item() - ce64(logits, targets)) < 1e-5
    one = ref.cross_entropy(logits, torch.tensor([0, 0, 0]), vocab_size=1)  # one real class: loss 0
    assert one.item() == 0.0
    with pytest.raises(ValueError, match="vocab_size 0 must be in"):
        ref.cross_entropy(logits, targets, vocab_size=0)
