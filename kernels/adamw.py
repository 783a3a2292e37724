"""Fused AdamW: one Triton launch per (param group, device, dtype) updates every parameter; each launch
runs with its device made current (Triton launches on the current device: kernels._eager.on_device).

    opt = AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)   # torch.optim.AdamW's signature
    opt.step()                        # or opt.step(found_inf=flag): a no-op step when flag != 0

What is fused: decoupled weight decay, both moment updates, the bias corrections and the parameter
update, for all tensors of a group in ONE launch. Each element is read once (param, grad, exp_avg,
exp_avg_sq) and written once (param, exp_avg, exp_avg_sq); math in fp32, storage in the param's dtype
(fp32, bf16 or fp16; state has the param's dtype, as in torch).

Design: multi-tensor apply over a pointer table. The launch gets an int64 table with one row per
tensor (addresses of param, grad, exp_avg, exp_avg_sq, step; numel) and an int32 block table
(tensor row, block index) with one entry per BLOCK elements; each program loads its row and casts
the addresses to pointers. Why not a flat buffer per group: flattening means re-pointing every
param's .data (and .grad) into one storage, which silently breaks for an existing model (tied
weights, FSDP/DDP buckets, `model.to()`, checkpoints that hold views), while the table leaves the
model untouched. The tables are built once and cached, keyed by every param's and grad's address
(~0.3 us per tensor to check); they are rebuilt (one small async copy) only when one changes, e.g.
grads reallocated elsewhere. Triton's interpreter on the CPU dereferences loaded addresses too, so
the very same kernel runs in CI and on the GPU (slowly there: its loads and stores are per-element
gathers, seconds per step for a 50304x768 tensor; it uses one 2^20 block per program to go faster).

Per-step scalars: lr, betas, eps and 1 - lr*weight_decay are fp32 kernel arguments (not
constexpr): an LR schedule never recompiles. `state["step"]` is a float32 scalar tensor on the
param's device (as torch's fused/capturable AdamW keeps it); one `torch._foreach_add_` increments
the steps and the kernel computes the bias corrections from them, 1 - beta**t = -expm1(t*log(beta)),
with a series for small |t*log(beta)| so step 1 is accurate in fp32. No host-device sync anywhere.

Non-finite grads: `step(found_inf=t)` with a device tensor t (e.g. `~torch.isfinite(total_norm)`
from clip_grad_norm_, free) makes the whole step a no-op when t != 0: params, moments and step
counts are left as they were. `AdamW(..., skip_nonfinite=True)` computes that flag itself with a
read-only pass over the grads (4 more bytes per param) before the update. Without either, a NaN
grad is written into the weights, exactly as torch.optim.AdamW does.

Floor: 28 bytes/param (fp32: read p, g, m, v; write p, m, v). GPT-2 124M: 124.4M * 28 B = 3.48 GB,
at H100 SXM's 3.35 TB/s about 1.04 ms per step. Overhead beyond it: per 2048-element block the
program reads 60 bytes of table and step (0.1%), plus the one foreach launch for the steps.

Test: pytest tests/test_adamw.py -q (interpreter on CPU, real kernel on a GPU).
Bench: python bench/run.py (one step over GPT-2 124M vs torch.optim.AdamW(fused=True)).
"""
import math
import os

import torch
import triton
import triton.language as tl

from kernels._eager import on_device
from kernels._triton_utils import AotSpec

_GPU_BLOCK = 2048  # elements per program on a GPU: 16 fp32 per thread with 4 warps, 4 x 128-bit loads
_NUM_WARPS = 4
_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _one_minus_pow(t, log_beta):
    """1 - beta**t = -expm1(t * log(beta)), accurate in fp32 also when beta**t is close to 1."""
    x = t * log_beta  # <= 0
    # Taylor series of expm1 for |x| <= 0.5 (truncation error < 1e-8 relative), exp(x) - 1 beyond.
    series = x * (1.0 + x / 2 * (1.0 + x / 3 * (1.0 + x / 4 * (1.0 + x / 5 * (1.0 + x / 6 * (1.0 + x / 7 * (1.0 + x / 8)))))))
    return -tl.where(x >= -0.5, series, tl.exp(x) - 1.0)


@triton.jit
def _row(table_ptr, blocks_ptr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor: (param, grad, exp_avg, exp_avg_sq, step pointers, numel, block start)."""
    pid = tl.program_id(0)
    row = table_ptr + tl.load(blocks_ptr + 2 * pid).to(tl.int64) * 6  # 6 int64 per table row
    start = tl.load(blocks_ptr + 2 * pid + 1).to(tl.int64) * BLOCK
    p_ptr = tl.load(row + 0).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(DTYPE))
    step_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    n = tl.load(row + 5)
    if ALIGNED:  # every address is 16-byte aligned: lets full blocks use 128-bit loads
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
    return p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, n, start


@triton.jit
def _update(p, g, m, v, decay, beta2, one_minus_beta1, one_minus_beta2, eps, step_size, bc2_sqrt):
    # Operation order as torch.optim.AdamW's, so results agree to fp32 rounding.
    p = p * decay  # decoupled weight decay: p *= 1 - lr * weight_decay
    m = m + one_minus_beta1 * (g - m)  # exp_avg.lerp_(grad, 1 - beta1)
    v = v * beta2 + one_minus_beta2 * g * g  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
    p = p - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))  # param.addcdiv_(m, denom, -step_size)
    return p, m, v


@triton.jit
def _adamw_kernel(
    table_ptr,  # int64 [n_tensors, 6]: addresses of param, grad, exp_avg, exp_avg_sq, step (fp32); numel
    blocks_ptr,  # int32 [n_blocks, 2]: (table row, block index within that tensor), one per program
    found_inf_ptr,  # fp32 scalar, read only if HAS_FOUND_INF: nonzero -> leave everything unchanged
    lr,  # fp32 scalars, runtime values (an lr schedule does not recompile)
    decay,  # 1 - lr * weight_decay
    beta2,
    one_minus_beta1,  # 1 - beta: computed in float64 on the host, as torch does (fp32 1 - 0.999 is off by 1e-5)
    one_minus_beta2,
    eps,
    log_beta1,  # log(beta1), log(beta2): for the bias corrections
    log_beta2,
    DTYPE: tl.constexpr,  # storage dtype of param, grad and state
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, n, start = _row(table_ptr, blocks_ptr, DTYPE, ALIGNED, BLOCK)
    if HAS_FOUND_INF:
        n = tl.where(tl.load(found_inf_ptr) != 0, 0, n)  # every mask false: a no-op
    t = tl.load(step_ptr)  # already incremented for this step
    step_size = lr / _one_minus_pow(t, log_beta1)
    bc2_sqrt = tl.sqrt(_one_minus_pow(t, log_beta2))
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:  # full block: no mask, so loads vectorize
        p = tl.load(p_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
        m = tl.load(m_ptr + offs).to(tl.float32)
        v = tl.load(v_ptr + offs).to(tl.float32)
        p, m, v = _update(p, g, m, v, decay, beta2, one_minus_beta1, one_minus_beta2, eps, step_size, bc2_sqrt)
        tl.store(p_ptr + offs, p.to(DTYPE))
        tl.store(m_ptr + offs, m.to(DTYPE))
        tl.store(v_ptr + offs, v.to(DTYPE))
    else:  # the tensor's last block
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
        p, m, v = _update(p, g, m, v, decay, beta2, one_minus_beta1, one_minus_beta2, eps, step_size, bc2_sqrt)
        tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)
        tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
        tl.store(v_ptr + offs, v.to(DTYPE), mask=mask)


@triton.jit
def _nonfinite_kernel(
    table_ptr,  # as in _adamw_kernel
    blocks_ptr,
    found_inf_ptr,  # fp32 scalar, zeroed before the launch; set to 1 if any grad is inf or NaN
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, n, start = _row(table_ptr, blocks_ptr, DTYPE, ALIGNED, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        g = tl.load(g_ptr + offs).to(tl.float32)
    else:
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    bad = tl.max((~(tl.abs(g) <= 3.4028234663852886e38)).to(tl.int32), axis=0)  # NaN fails <= too
    tl.store(found_inf_ptr, 1.0, mask=bad != 0)  # every writer writes the same value: no race


def _interpret():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_size(numels):
    if _interpret():  # numpy-backed: a few big blocks run much faster than many small ones
        return min(1 << 20, max(1024, triton.next_power_of_2(max(numels))))
    return _GPU_BLOCK


class _Launch:
    """The cached tables of one (param group, device, dtype) bucket."""

    def __init__(self, params, grads, states, block):
        self.device = params[0].device
        self.dtype = _DTYPES[params[0].dtype]
        self.block = block
        self.steps = [s["step"] for s in states]
        rows, counts = [], []
        for p, g, s in zip(params, grads, states):
            rows.append([p.data_ptr(), g.data_ptr(), s["exp_avg"].data_ptr(), s["exp_avg_sq"].data_ptr(),
                         s["step"].data_ptr(), p.numel()])
            counts.append(triton.cdiv(p.numel(), block))
        self.aligned = all(a % 16 == 0 for r in rows for a in r[:4])
        table = torch.tensor(rows, dtype=torch.int64)
        which = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32), torch.tensor(counts))
        index = torch.cat([torch.arange(c, dtype=torch.int32) for c in counts])
        blocks = torch.stack([which, index], dim=1)
        self.n_blocks = blocks.shape[0]
        self.table, self.blocks = _to_device(table, self.device), _to_device(blocks, self.device)


def _to_device(t, device):
    if device.type == "cuda":  # pinned + non_blocking: the copy does not wait for the GPU
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _check_options(group):
    """Reject what this optimizer does not implement, naming what is supported."""
    for key, what in (("amsgrad", "amsgrad=True"), ("maximize", "maximize=True"), ("capturable", "capturable=True"),
                      ("differentiable", "differentiable=True")):
        if group.get(key):
            raise NotImplementedError(f"kernels.adamw.AdamW does not support {what}; use the torch backend "
                                      f"(torch.optim.AdamW) for it. Supported: plain AdamW with decoupled weight decay")
    for key in ("foreach", "fused"):
        if group.get(key) is not None:
            raise ValueError(f"kernels.adamw.AdamW: {key}={group[key]!r} is not an option here (it is always one "
                             f"fused multi-tensor Triton launch); leave {key}=None")
    if group.get("decoupled_weight_decay") is False:
        raise NotImplementedError("kernels.adamw.AdamW implements decoupled weight decay only (AdamW, not Adam)")
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if isinstance(lr, torch.Tensor) and (lr.device.type != "cpu" or lr.numel() != 1):
        raise ValueError("kernels.adamw.AdamW: lr must be a float or a 1-element CPU tensor (reading a GPU tensor "
                         "would sync the host every step)")
    if not 0.0 <= float(lr):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= beta1 < 1.0 or not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid betas: {group['betas']}; each must be in [0, 1)")
    if not 0.0 <= wd:
        raise ValueError(f"Invalid weight_decay value: {wd}")


def _torch_defaults():
    """The param-group keys and defaults of this torch version's AdamW (they differ across versions)."""
    probe = torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    return dict(probe.defaults)


def _log(beta):
    return math.log(beta) if beta > 0 else float("-inf")


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW (amsgrad=False, maximize=False) as one fused Triton kernel per param group.

    state_dict() / load_state_dict() are interchangeable with torch.optim.AdamW's. `skip_nonfinite`:
    see the module docstring; it is not saved in param groups (torch's AdamW would not know it).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 skip_nonfinite=False):
        defaults = _torch_defaults()
        defaults.update(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused)
        _check_options(defaults)
        self.skip_nonfinite = skip_nonfinite
        self._launches = {}  # group index -> (key, [_Launch])
        self._flags = {}  # device -> fp32 scalar used by skip_nonfinite
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            group["betas"] = tuple(group["betas"])
            _check_options(group)
            for p in group["params"]:
                if p.dtype not in _DTYPES:
                    raise ValueError(f"kernels.adamw.AdamW: param dtype {p.dtype} is not supported; supported: "
                                     f"{', '.join(str(d) for d in _DTYPES)}")
        except Exception:
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        defaults = _torch_defaults()
        for group in self.param_groups:  # tolerate checkpoints from other torch versions
            for key, value in defaults.items():
                group.setdefault(key, value)
            group["foreach"] = group["fused"] = None  # a torch.optim.AdamW(fused=True) checkpoint is fine here
            group["capturable"] = False  # our step lives on the param's device regardless
            group["betas"] = tuple(group["betas"])
            _check_options(group)
        for p, s in self.state.items():  # torch keeps the step on the CPU unless fused/capturable
            s["step"] = torch.as_tensor(s["step"], dtype=torch.float32).to(p.device).reshape(())
        self._launches.clear()

    def _init_state(self, p):
        s = self.state[p]
        if len(s) == 0:
            s["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return s

    def _launches_for(self, i, group):
        """The cached launches of group i. The key is every param's and grad's address (a few us per
        tensor): new grads at new addresses, a param moved, or a param gaining/losing its grad rebuild
        the tables. State tensors change through _init_state and load_state_dict (which clear the cache)
        or `opt.state.clear()` (len changes); whoever swaps state tensors by hand must clear opt._launches."""
        params = [p for p in group["params"] if p.grad is not None]
        key = (id(self.state), len(self.state)) + tuple(p.data_ptr() for p in params) + tuple(
            p.grad.data_ptr() for p in params)
        cached = self._launches.get(i)
        if cached is not None and cached[0] == key:
            return cached[1]
        buckets = {}
        for p in params:
            s = self._init_state(p)
            if p.grad.is_sparse:
                raise ValueError("kernels.adamw.AdamW does not support sparse gradients")
            if p.grad.dtype != p.dtype or p.grad.shape != p.shape or p.grad.device != p.device:
                raise ValueError(f"kernels.adamw.AdamW: grad {p.grad.dtype} {tuple(p.grad.shape)} does not match "
                                 f"its param {p.dtype} {tuple(p.shape)}")
            if not all(t.is_contiguous() for t in (p, p.grad, s["exp_avg"], s["exp_avg_sq"])):
                raise ValueError("kernels.adamw.AdamW needs contiguous params, grads and state "
                                 f"(a param of shape {tuple(p.shape)} is not)")
            if any(s[k].shape != p.shape or s[k].dtype != p.dtype or s[k].device != p.device
                   for k in ("exp_avg", "exp_avg_sq")):
                raise ValueError("kernels.adamw.AdamW: exp_avg / exp_avg_sq must match their param")
            if s["step"].device != p.device or s["step"].dtype != torch.float32 or s["step"].numel() != 1:
                raise ValueError("kernels.adamw.AdamW: state['step'] must be a float32 scalar on the param's device")
            buckets.setdefault((p.device, p.dtype), []).append((p, s))
        launches = []
        for items in buckets.values():
            ps, ss = [p for p, _ in items], [s for _, s in items]
            launches.append(_Launch(ps, [p.grad for p in ps], ss, _block_size([p.numel() for p in ps])))
        self._launches[i] = (key, launches)
        return launches

    @torch.no_grad()
    def step(self, closure=None, found_inf=None):
        """One AdamW step over every param with a grad. `found_inf`: optional tensor (any device, one
        element); when it is nonzero the whole step is a no-op (no host sync either way)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        all_launches = [(g, self._launches_for(i, g)) for i, g in enumerate(self.param_groups)]
        devices = {ln.device for _, launches in all_launches for ln in launches}
        flags = {}
        if found_inf is not None:
            flag = found_inf.reshape(()).to(torch.float32)
            flags = {d: flag.to(d, non_blocking=True) for d in devices}
        elif self.skip_nonfinite:
            flags = self._check_grads(all_launches, devices)
        steps = [s for _, launches in all_launches for ln in launches for s in ln.steps]
        if steps:
            if flags:  # count the step only where it is taken
                taken = {d: (f == 0).float() for d, f in flags.items()}
                torch._foreach_add_(steps, [taken[s.device] for s in steps])
            else:
                torch._foreach_add_(steps, 1.0)
        for group, launches in all_launches:
            lr = float(group["lr"])
            beta1, beta2 = group["betas"]
            for ln in launches:
                flag = flags.get(ln.device)
                with on_device(ln.table):  # Triton launches on the current device: make it this bucket's
                    _adamw_kernel[(ln.n_blocks,)](
                        ln.table, ln.blocks, flag if flag is not None else ln.table,
                        lr, 1.0 - lr * group["weight_decay"], beta2, 1.0 - beta1, 1.0 - beta2, group["eps"],
                        _log(beta1), _log(beta2),
                        DTYPE=ln.dtype, HAS_FOUND_INF=flag is not None, ALIGNED=ln.aligned, BLOCK=ln.block,
                        num_warps=_NUM_WARPS)
        return loss

    def _check_grads(self, all_launches, devices):
        """One device flag per device: 1.0 if any grad anywhere is inf/NaN (summed across devices)."""
        flags = {}
        for d in devices:
            flags[d] = self._flags.setdefault(d, torch.zeros((), dtype=torch.float32, device=d))
            flags[d].zero_()
        for _, launches in all_launches:
            for ln in launches:
                with on_device(ln.table):
                    _nonfinite_kernel[(ln.n_blocks,)](ln.table, ln.blocks, flags[ln.device], DTYPE=ln.dtype,
                                                      ALIGNED=ln.aligned, BLOCK=ln.block, num_warps=_NUM_WARPS)
        if len(flags) > 1:  # the step is skipped everywhere if any device saw a bad grad
            total = sum(f.to(next(iter(flags)), non_blocking=True) for f in flags.values())
            flags = {d: total.to(d, non_blocking=True) for d in flags}
        return flags


def compile_specs():
    """AOT compile checks at the GPU block size: the update (fp32, bf16; with/without found_inf) and the grad check."""
    sig = {"table_ptr": "*i64", "blocks_ptr": "*i32", "found_inf_ptr": "*fp32", "lr": "fp32", "decay": "fp32",
           "beta2": "fp32", "one_minus_beta1": "fp32",
           "one_minus_beta2": "fp32", "eps": "fp32", "log_beta1": "fp32", "log_beta2": "fp32",
           "DTYPE": "constexpr", "HAS_FOUND_INF": "constexpr", "ALIGNED": "constexpr", "BLOCK": "constexpr"}
    aligned = ("table_ptr", "blocks_ptr", "found_inf_ptr")
    specs = []
    for name, dtype in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
        for has_inf in (False, True):
            specs.append(AotSpec(f"adamw {name}{' found_inf' if has_inf else ''}", _adamw_kernel, sig,
                                 {"DTYPE": dtype, "HAS_FOUND_INF": has_inf, "ALIGNED": True, "BLOCK": _GPU_BLOCK},
                                 aligned=aligned, num_warps=_NUM_WARPS))
    check_sig = {k: sig[k] for k in ("table_ptr", "blocks_ptr", "found_inf_ptr", "DTYPE", "ALIGNED", "BLOCK")}
    specs.append(AotSpec("adamw nonfinite check fp32", _nonfinite_kernel, check_sig,
                         {"DTYPE": tl.float32, "ALIGNED": True, "BLOCK": _GPU_BLOCK}, aligned=aligned,
                         num_warps=_NUM_WARPS))
    return specs
