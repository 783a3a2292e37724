"""kernels/adamw.py: the fused AdamW against torch.optim.AdamW, step by step, and its state_dict both ways.

On the CPU the kernel runs in Triton's interpreter, whose loads and stores are per-element gathers
(several seconds per step for a 50304x768 tensor), so there the 50304x768 parameter takes 2 steps in
its own test; on a GPU it is part of the 20-step test.
"""
import io

import pytest
import torch

from tests.conftest import HAS_CUDA, requires_cuda

adamw = pytest.importorskip("kernels.adamw")
AdamW = adamw.AdamW

RTOL, ATOL = 1e-5, 1e-7  # fp32 rounding: both sides compute the same formula in a different order
SMALL = [(1,), (7,), (768,), (3, 1000), (4099,)]
BIG = (50304, 768)


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def _pair(shapes, device, groups, ours_kw=None, **kw):
    """The same params twice, one copy per optimizer, split into param groups by `groups(params)`."""
    init = [torch.randn(s, device=device) for s in shapes]
    ours = [p.clone().requires_grad_() for p in init]
    ref = [p.clone().requires_grad_() for p in init]
    return ours, ref, AdamW(groups(ours), **kw, **(ours_kw or {})), torch.optim.AdamW(groups(ref), **kw)


def _two_groups(ps):
    return [{"params": ps[0::2]}, {"params": ps[1::2], "weight_decay": 0.0}]


def _set_grads(ours, ref, scale=1.0):
    for a, b in zip(ours, ref):
        g = torch.randn_like(a) * scale
        a.grad, b.grad = g.clone(), g.clone()


def _compare(ours, ref, opt, ref_opt, what=""):
    for i, (a, b) in enumerate(zip(ours, ref)):
        _close(a, b, f"{what} param {i} {tuple(a.shape)}")
        sa, sb = opt.state[a], ref_opt.state[b]
        assert set(sa) == set(sb), f"state keys {set(sa)} != {set(sb)}"
        _close(sa["exp_avg"], sb["exp_avg"], f"{what} exp_avg {i}")
        _close(sa["exp_avg_sq"], sb["exp_avg_sq"], f"{what} exp_avg_sq {i}")
        assert sa["step"].dtype == torch.float32 and sa["step"].dim() == 0
        assert sa["step"].item() == sb["step"].item(), f"{what} step {i}"


def _run(ours, ref, opt, ref_opt, steps, lr0=1e-2):
    for t in range(steps):
        for o in (opt, ref_opt):  # an LR schedule: a different lr every step
            for j, group in enumerate(o.param_groups):
                group["lr"] = lr0 * (1 + j) * (0.8 ** t)
        _set_grads(ours, ref)
        opt.step()
        ref_opt.step()
        _compare(ours, ref, opt, ref_opt, f"step {t + 1}:")


def test_matches_torch_every_step(device):
    shapes = SMALL + ([BIG] if HAS_CUDA else [])
    ours, ref, opt, ref_opt = _pair(shapes, device, _two_groups, lr=1e-2, weight_decay=0.1)
    _run(ours, ref, opt, ref_opt, steps=20)


def test_large_param(device):
    # 2 steps in the interpreter (see the module docstring), each with its own lr, both groups
    ours, ref, opt, ref_opt = _pair([BIG, (768,)], device, _two_groups, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    _run(ours, ref, opt, ref_opt, steps=2, lr0=6e-4)


def test_tensors_of_many_blocks(device, monkeypatch):
    """1024-element blocks (the interpreter's blocks are otherwise at least as long as the longest tensor, so
    only the 50304x768 test had tensors of several blocks and full blocks): full blocks, tails and one-block
    tensors update like torch, and the non-finite check sees a bad grad wherever it is, in a full block, in
    a later block or at a tensor's very last element."""
    monkeypatch.setattr(adamw, "_block_size", lambda numels: 1024)
    shapes = [(7,), (1024,), (3, 1000), (2053,)]
    ours, ref, opt, ref_opt = _pair(shapes, device, _two_groups, {"skip_nonfinite": True}, lr=1e-2, weight_decay=0.1)
    _run(ours, ref, opt, ref_opt, steps=2)
    assert sum(ln.n_blocks for _, launches in opt._launches.values() for ln in launches) == 1 + 1 + 3 + 3
    for i, where in ((1, 1023), (2, 1500), (2, 2999), (0, 6)):
        saved = [(a.detach().clone(), {k: v.clone() for k, v in opt.state[a].items()}) for a in ours]
        _set_grads(ours, ref)
        ours[i].grad.view(-1)[where] = float("nan")
        opt.step()
        for a, (p0, s0) in zip(ours, saved):
            assert torch.equal(a.detach(), p0), f"NaN at {where} of param {i} not seen"
            assert all(torch.equal(opt.state[a][k], s0[k]) for k in s0), f"NaN at {where} of param {i} not seen"
    _run(ours, ref, opt, ref_opt, steps=1)  # afterwards: torch's third step


def test_betas_eps_and_grad_none(device):
    ours, ref, opt, ref_opt = _pair([(7,), (300,), (5, 9)], device, lambda ps: ps, lr=3e-3, betas=(0.5, 0.9),
                                    eps=1e-6, weight_decay=0.3)
    for t in range(6):
        _set_grads(ours, ref)
        if t % 2 == 0:  # param 1 has no grad on even steps: skipped, its step count falls behind
            ours[1].grad = ref[1].grad = None
        if t == 0:
            before = ours[1].detach().clone()
        opt.step()
        ref_opt.step()
        if t == 0:
            assert torch.equal(ours[1].detach(), before) and len(opt.state[ours[1]]) == 0
        else:
            _compare(ours, ref, opt, ref_opt, f"step {t + 1}:")
    assert opt.state[ours[0]]["step"].item() == 6 and opt.state[ours[1]]["step"].item() == 3


def test_param_groups_keys_match_torch():
    p = torch.zeros(3, requires_grad=True)
    ours, ref = AdamW([p]).param_groups[0], torch.optim.AdamW([p]).param_groups[0]
    assert {k: v for k, v in ours.items() if k != "params"} == {k: v for k, v in ref.items() if k != "params"}


@pytest.mark.parametrize("direction", ["ours->torch", "torch->ours"])
def test_state_dict_round_trip(device, direction):
    shapes = [(7,), (768,), (3, 100)]
    src_cls, dst_cls = (AdamW, torch.optim.AdamW) if direction == "ours->torch" else (torch.optim.AdamW, AdamW)
    init = [torch.randn(s, device=device) for s in shapes]
    src_p = [p.clone().requires_grad_() for p in init]
    src = src_cls(_two_groups(src_p), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(3):
        for p in src_p:
            p.grad = torch.randn_like(p)
        src.step()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)  # through a checkpoint file, as the trainer does
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    # continue from the checkpoint with both optimizers: the source and a fresh one of the other kind
    dst_p = [p.detach().clone().requires_grad_() for p in src_p]
    dst = dst_cls(_two_groups(dst_p), lr=1.0)  # hyperparameters come from the checkpoint
    dst.load_state_dict(saved)
    assert dst.param_groups[0]["lr"] == 2e-3 and dst.param_groups[1]["weight_decay"] == 0.0
    ours, ref = (dst_p, src_p) if dst_cls is AdamW else (src_p, dst_p)
    opt, ref_opt = (dst, src) if dst_cls is AdamW else (src, dst)
    _compare(ours, ref, opt, ref_opt, "after load:")
    _run(ours, ref, opt, ref_opt, steps=3)


def test_skip_nonfinite_keeps_params(device):
    ours, ref, opt, ref_opt = _pair([(7,), (1000,)], device, lambda ps: ps, {"skip_nonfinite": True}, lr=1e-2)
    _set_grads(ours, ref)
    opt.step()
    ref_opt.step()
    for bad in (float("nan"), float("inf"), -float("inf")):
        saved = [(a.detach().clone(), {k: v.clone() for k, v in opt.state[a].items()}) for a in ours]
        _set_grads(ours, ref)
        ours[1].grad[123] = bad  # one bad element in one tensor: the whole step is skipped
        opt.step()
        for a, (p0, s0) in zip(ours, saved):
            assert torch.equal(a.detach(), p0), f"grad {bad} changed a param"
            for k in s0:
                assert torch.equal(opt.state[a][k], s0[k]), f"grad {bad} changed state[{k!r}]"
    _set_grads(ours, ref)  # a good step afterwards is exactly torch's second step
    opt.step()
    ref_opt.step()
    _compare(ours, ref, opt, ref_opt, "after skipped steps:")


def test_found_inf_argument(device):
    ours, ref, opt, ref_opt = _pair([(7,), (1000,)], device, lambda ps: ps, lr=1e-2)
    _set_grads(ours, ref)
    opt.step(found_inf=torch.zeros((), device=device))  # 0: a normal step
    ref_opt.step()
    _compare(ours, ref, opt, ref_opt)
    saved = [a.detach().clone() for a in ours]
    _set_grads(ours, ref)
    opt.step(found_inf=torch.ones((), device=device))  # 1: no-op
    assert all(torch.equal(a.detach(), s) for a, s in zip(ours, saved))
    assert opt.state[ours[0]]["step"].item() == 1


def test_nan_grad_without_check_is_written_like_torch(device):
    # the default, as in torch: documented, so the trainer knows to pass found_inf or skip_nonfinite
    ours, ref, opt, ref_opt = _pair([(7,)], device, lambda ps: ps)
    _set_grads(ours, ref)
    ours[0].grad[2] = ref[0].grad[2] = float("nan")
    opt.step()
    ref_opt.step()
    assert torch.isnan(ours[0][2]) and torch.isnan(ref[0][2])


def test_lr_change_takes_effect(device):
    p = torch.randn(100, device=device, requires_grad=True)
    opt = AdamW([p], lr=0.0, weight_decay=0.5)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt.step()  # lr 0: no decay and no update
    assert torch.equal(p.detach(), before)
    opt.param_groups[0]["lr"] = 1e-1
    opt.step()
    assert (p.detach() - before).abs().max() > 1e-2


@requires_cuda
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("check", ["plain", "skip_nonfinite", "found_inf"])
def test_params_on_two_gpus_one_launch_each_on_its_device(check):
    """Params on cuda:0 and cuda:1 in one group, cuda:0 current: each device's bucket is launched under that
    device (Triton launches on the current device: before, cuda:1's update ran on cuda:0, an illegal access
    or a race with cuda:1's stream). Same as torch.optim.AdamW; a NaN on cuda:1 skips the step on both."""
    devices = ["cuda:0", "cuda:1", "cuda:1", "cuda:0"]
    init = [torch.randn(s, device=d) for s, d in zip(SMALL, devices)]
    ours = [p.clone().requires_grad_() for p in init]
    ref = [p.clone().requires_grad_() for p in init]
    kw = {"skip_nonfinite": True} if check == "skip_nonfinite" else {}
    opt, ref_opt = AdamW(ours, lr=1e-2, weight_decay=0.1, **kw), torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    with torch.cuda.device(0):
        for _ in range(3):
            _set_grads(ours, ref)
            opt.step(**({"found_inf": torch.zeros((), device="cuda:1")} if check == "found_inf" else {}))
            ref_opt.step()
        assert len(opt._launches[0][1]) == 2  # one launch per device
        for d in (0, 1):
            torch.cuda.synchronize(d)
        _compare(ours, ref, opt, ref_opt, "two GPUs:")
        if check != "plain":
            saved = [a.detach().clone() for a in ours]
            _set_grads(ours, ref)
            ours[1].grad[0] = float("nan")  # on cuda:1
            flag = torch.ones((), device="cuda:1") if check == "found_inf" else None
            opt.step(**({"found_inf": flag} if flag is not None else {}))
            assert all(torch.equal(a.detach(), s) for a, s in zip(ours, saved))


@requires_cuda
def test_no_recompile_when_lr_changes():
    p = [torch.randn(s, device="cuda", requires_grad=True) for s in SMALL]
    opt = AdamW(_two_groups(p), lr=1e-3)

    def n_compiled():
        return sum(len(c[0]) for c in adamw._adamw_kernel.device_caches.values())
    for t in range(5):
        for group in opt.param_groups:
            group["lr"] = 1e-3 / (t + 1)
        for q in p:
            q.grad = torch.randn_like(q)
        opt.step()
        if t == 0:
            first = n_compiled()
    assert n_compiled() == first


def test_grads_reallocated_rebuild_the_table(device):
    ours, ref, opt, ref_opt = _pair([(7,), (1000,)], device, lambda ps: ps)
    keep = []
    for t in range(3):
        _set_grads(ours, ref)
        keep.append([a.grad for a in ours])  # new grads live at new addresses each step
        opt.step()
        ref_opt.step()
        _compare(ours, ref, opt, ref_opt, f"step {t + 1}:")
    old_state = [dict(opt.state[a]) for a in ours]  # kept alive: a stale table writes into them, not into freed memory
    opt.state.clear()  # a state reset: the cached tables must not point at the old moments
    ref_opt.state.clear()
    for a, b in zip(ours, ref):  # new values in the same grad tensors: only the state tells the cache to rebuild
        g = torch.randn_like(a)
        a.grad.copy_(g)
        b.grad.copy_(g)
    opt.step()
    ref_opt.step()
    _compare(ours, ref, opt, ref_opt, "after state.clear():")
    assert all(s["step"].item() == 3 for s in old_state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_params_round_once(device, dtype):
    # bf16 / fp16 storage, fp32 math: one step equals torch's fp32 AdamW on the upcast values, rounded once
    p16 = torch.randn(1000, device=device).to(dtype).requires_grad_()
    p32 = p16.detach().float().requires_grad_()
    p16.grad = torch.randn_like(p16)
    p32.grad = p16.grad.float()
    opt, ref_opt = AdamW([p16], lr=1e-2), torch.optim.AdamW([p32], lr=1e-2)
    opt.step()
    ref_opt.step()
    assert opt.state[p16]["exp_avg"].dtype == opt.state[p16]["exp_avg_sq"].dtype == dtype
    nearest = p32.detach().to(dtype)
    if HAS_CUDA or dtype == torch.float16:
        assert torch.equal(p16.detach(), nearest)
    else:  # Triton 3.8's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest
        truncated = (p32.detach().view(torch.int32) & ~0xFFFF).view(torch.float32).bfloat16()
        assert ((p16.detach() == nearest) | (p16.detach() == truncated)).all()


@pytest.mark.parametrize("kwargs, error", [
    ({"amsgrad": True}, NotImplementedError), ({"maximize": True}, NotImplementedError),
    ({"capturable": True}, NotImplementedError), ({"differentiable": True}, NotImplementedError),
    ({"foreach": True}, ValueError), ({"fused": True}, ValueError), ({"lr": -1.0}, ValueError),
    ({"betas": (1.0, 0.999)}, ValueError), ({"betas": (0.9, -0.1)}, ValueError), ({"eps": -1.0}, ValueError),
    ({"weight_decay": -0.1}, ValueError),
])
def test_bad_args_raise(kwargs, error):
    with pytest.raises(error, match=r"AdamW|Invalid"):
        AdamW([torch.zeros(3, requires_grad=True)], **kwargs)


def test_bad_tensors_raise():
    with pytest.raises(ValueError, match="dtype"):
        AdamW([torch.zeros(3, dtype=torch.float64, requires_grad=True)])
    with pytest.raises(NotImplementedError, match="amsgrad"):
        AdamW([{"params": [torch.zeros(3, requires_grad=True)], "amsgrad": True}])
    opt = AdamW([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="betas"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "betas": (0.9, 1.5)})
    assert len(opt.param_groups) == 1  # a rejected group is not left behind
    p = torch.zeros(4, 6).t().requires_grad_()  # not contiguous
    p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match="contiguous"):
        AdamW([p]).step()


def test_registry_triton_adamw_is_this():
    from kernels import get_ops

    assert get_ops("triton").AdamW is AdamW


def test_tiny_gpt_trains_like_torch(device):
    from gpt2.model import GPT, GPTConfig

    cfg = GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=2, n_embd=64)
    models = [GPT(cfg).to(device) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())

    def groups(m):  # the trainer's split: decay 2-D weights only
        ps = [p for p in m.parameters() if p.requires_grad]
        return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
                {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]
    opts = [AdamW(groups(models[0]), lr=3e-3, betas=(0.9, 0.95)), torch.optim.AdamW(groups(models[1]), lr=3e-3,
                                                                                      betas=(0.9, 0.95))]
    x = torch.randint(0, 100, (4, 32), device=device)
    y = torch.roll(x, -1, dims=1)
    losses = []
    for t in range(5):
        # one backward, its grads given to both: independent backward passes would let ulp-level param
        # differences grow through Adam's m/sqrt(v) on near-zero grads, which tests nothing about us
        for o in opts:
            o.zero_grad(set_to_none=True)
        _, loss = models[0](x, y)
        loss.backward()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            b.grad = a.grad.clone()
        for o in opts:
            o.step()
        losses.append(loss.item())
        for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
            _close(a, b, f"step {t + 1} {name}")
            _close(opts[0].state[a]["exp_avg_sq"], opts[1].state[b]["exp_avg_sq"], f"step {t + 1} {name} exp_avg_sq")
    assert losses[-1] < losses[0] - 0.1, losses


def test_compile_specs_static_report():
    from kernels._triton_utils import check_report, static_report

    rows = static_report(["kernels.adamw"])
    assert len(rows) == 2 * len(adamw.compile_specs())
    for row in rows:
        assert "error" not in row, row
        assert check_report(row) == [], (row["name"], row["arch"], check_report(row))
        assert row["spill_bytes"] == 0 and row["ld128"] > 0
