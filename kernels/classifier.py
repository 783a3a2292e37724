"""Fused classifier in C++/CUDA (csrc/classifier.*): the `cuda` backend's cross_entropy and linear_cross_entropy.

What is fused: softmax + cross-entropy + its gradient. One block per row reads the logits once
(128-bit loads, online max / sum of exp in fp32) and, when a gradient is needed, writes
dlogits = (softmax - onehot(target)) / count in the same kernel, in a second sweep over the row
that reads it from shared memory where two rows fit an SM (bf16/fp16 at GPT-2's vocab on an H100),
else from global memory again (GPT2K_CE_STAGE=0 forces that; same bits). Backward is then only a
scale by grad_output, done by a kernel that returns at once when grad_output == 1: fwd + bwd touch
the logits twice in all.
Floor (fwd + bwd): read the logits once + write dlogits once: N * Vp * 2 bytes each for bf16
(1.65 GB + 1.65 GB at N = 16384, Vp = 50304). Unfused eager F.cross_entropy makes ~8 passes.

Semantics as kernels.reference.cross_entropy: mean over targets != ignore_index (0 when all are
ignored), loss fp32, only the first `vocab_size` columns are real (padded columns: probability 0,
gradient 0). An invalid row (every real logit -inf, or a target outside [0, vocab_size)) raises a
ValueError: on CUDA this costs one 8-byte device-to-host read per call (a sync); set CHECK_ROWS =
False to skip it (invalid rows then give a NaN loss and a zero gradient row). fused_ce_ never syncs.
Memory: forward keeps dlogits (the size of the logits) for backward and nothing else.

Ops (namespace gpt2k_cuda, schemas in csrc/classifier.cpp): cross_entropy_fwd, cross_entropy_grad_
(in place, for linear_cross_entropy's chunks), scale_grad_. Built on first use with
torch.utils.cpp_extension.load (ninja; cached in torch's extensions dir). With a CUDA build of torch
and a CUDA toolkit found (cuda_home()), the .cu is compiled too, for the visible GPU or, when none is
visible, for sm_80 and sm_90 (TORCH_CUDA_ARCH_LIST overrides; ~20 s more on 2 cores); without a
toolkit, or with GPT2K_BUILD_CUDA=0, the extension is the CPU part alone. `ptxas_report()` compiles
the .cu for sm_80/sm_90 on its own to read ptxas' resource report (CI checks zero spills).

Test:   pytest tests/test_classifier.py
Bench:  python bench/run.py cross_entropy        Static: python bench/run.py --static
        python bench/ce_tune.py (GPU): the staged and two-sweep row kernels side by side
"""
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from kernels._eager import auxiliary_outputs, eager_function, fast_path

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = [_CSRC / "classifier.cpp", _CSRC / "classifier.cu"]

CHECK_ROWS = True  # raise on invalid rows (costs a sync per call on CUDA); see the module docstring

_lock = threading.Lock()
_state = {"ops": None, "cuda": False, "error": None}


# ---- toolchain ------------------------------------------------------------------------------------

def cuda_home():
    """The CUDA toolkit root, or None. Looks at CUDA_HOME / CUDA_PATH, then `nvcc` on PATH (following
    links), then /usr/local/cuda; a toolkit must have bin/nvcc and include/cuda_runtime.h."""
    def ok(d):
        return d and os.path.isfile(os.path.join(d, "bin", "nvcc")) and \
            os.path.isfile(os.path.join(d, "include", "cuda_runtime.h"))

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    return next((d for d in candidates if ok(d)), None)


def _nvcc():
    home = cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


def _want_cuda():
    """Compile the .cu too: torch is a CUDA build, a toolkit is found, and GPT2K_BUILD_CUDA is not 0."""
    return torch.version.cuda is not None and cuda_home() is not None and os.environ.get("GPT2K_BUILD_CUDA") != "0"


def unavailable_reason():
    """None when the extension can be built (or is loaded) here, else why not (what to install)."""
    if _state["ops"] is not None:
        return None
    return _state["error"] or toolchain_reason()


def toolchain_reason():
    """None when a C++ compiler and ninja are found (and nvcc, if a GPU is visible), else what to install."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return (f"no C++ compiler found (looked for {cxx!r}): install one, e.g. `apt install g++` on "
                "Debian/Ubuntu, or set CXX")
    if not _cpp_extension().is_ninja_available():
        return "ninja is not installed: `pip install ninja` (torch builds the extension with it)"
    if torch.cuda.is_available() and cuda_home() is None:
        return (f"a CUDA GPU is visible but no CUDA compiler (nvcc) was found: install the CUDA toolkit "
                f"(torch was built with CUDA {torch.version.cuda}) or set CUDA_HOME")
    return None


def _cpp_extension():
    """torch.utils.cpp_extension, imported after pointing CUDA_HOME at the toolkit when it is unset (torch
    reads it at import, and guesses wrong for an nvcc wrapper on PATH such as /usr/local/bin/nvcc)."""
    home = cuda_home()
    if home and "CUDA_HOME" not in os.environ:
        os.environ["CUDA_HOME"] = home
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # its import warns "No CUDA runtime is found" on every GPU-less machine
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)

    if home and not _is_toolkit(cpp_extension.CUDA_HOME):  # imported before CUDA_HOME was set
        cpp_extension.CUDA_HOME = home
    return cpp_extension


def _load():
    """Build (first use only) and load the extension; register the Python parts of the ops."""
    if _state["ops"] is None:  # (a plain check first: torch.compile traces through this)
        _build_and_load()


@torch.compiler.disable
def _build_and_load():
    with _lock:
        if _state["ops"] is not None:
            return
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"kernels.classifier: cannot build the C++ extension: {reason}")
        with_cuda = _want_cuda()
        cpp_extension = _cpp_extension()
        name = "gpt2k_classifier_" + ("cuda" if with_cuda else "cpu")
        sources = [str(s) for s in (_SOURCES if with_cuda else _SOURCES[:1])]
        lib = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
        if not lib.exists() or lib.stat().st_mtime < max(os.path.getmtime(s) for s in sources):
            print(f"kernels.classifier: compiling the {'C++/CUDA' if with_cuda else 'C++ (CPU)'} extension "
                  f"(first use, cached in {lib.parent}) ...", file=sys.stderr, flush=True)
        arch_env = os.environ.get("TORCH_CUDA_ARCH_LIST")
        try:
            if with_cuda and not arch_env and not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # no GPU visible: A100 and H100
            cpp_extension.load(name=name, sources=sources, extra_cflags=["-O3"],
                               extra_cuda_cflags=["-O3", "-lineinfo"], with_cuda=with_cuda,
                               is_python_module=False, verbose=False)
        except Exception as e:
            hint = ("; to build only the C++ CPU part (no GPU kernels), set GPT2K_BUILD_CUDA=0"
                    if with_cuda and not torch.cuda.is_available() else "")
            _state["error"] = f"building the classifier extension failed: {e}{hint}"
            raise RuntimeError(f"kernels.classifier: {_state['error']}") from None
        finally:
            if arch_env is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        _register_python_parts()
        _state["cuda"] = with_cuda
        _state["ops"] = torch.ops.gpt2k_cuda


def _is_toolkit(d):
    return bool(d) and os.path.isfile(os.path.join(d, "bin", "nvcc"))


# ---- torch op: fake and autograd --------------------------------------------------------------------

def _fake_check(logits, targets, vocab_size, op):
    """csrc/classifier.cpp's check_inputs, for the fake implementations: the dispatcher also sends them a meta
    tensor among CPU ones, which must raise as the real op does, not return uninitialized results."""
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be 2-D (N, V), got {list(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{op}: logits dtype {logits.dtype} is not supported (float32, bfloat16, float16)")
    if not logits.is_contiguous():
        raise ValueError(f"{op}: logits must be contiguous")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"{op}: targets must have shape ({logits.shape[0]},), got {list(targets.shape)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"{op}: targets must be int64, got {targets.dtype}")
    if not targets.is_contiguous():
        raise ValueError(f"{op}: targets must be contiguous")
    if targets.device != logits.device:
        raise ValueError(f"{op}: targets on {targets.device} but logits on {logits.device}")
    if not 1 <= vocab_size <= logits.shape[1]:
        raise ValueError(f"{op}: vocab_size {vocab_size} must be in [1, {logits.shape[1]}] (the logits' width)")


def _fwd_fake(logits, targets, ignore_index, vocab_size, compute_grad, check):
    _fake_check(logits, targets, vocab_size, "cross_entropy")
    loss = logits.new_empty((), dtype=torch.float32)
    return loss, (logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,)))


def _grad_fake(logits, targets, ignore_index, vocab_size, check):
    _fake_check(logits, targets, vocab_size, "fused_ce_")
    return logits.new_empty((), dtype=torch.float32)


def _scale_fake(x, s):
    if s.numel() != 1 or s.device != x.device:
        raise ValueError(f"scale_grad_: scale must be one element on {x.device}")
    return None


def _setup_context(ctx, inputs, output):
    ctx.compute_grad = inputs[4]
    ctx.save_for_backward(output[1])
    auxiliary_outputs(ctx, output[1])  # dlogits


def _backward(ctx, grad_loss, _grad_dlogits):
    if not ctx.compute_grad:
        raise RuntimeError("cross_entropy (cuda): backward needs the forward to run with compute_grad=True")
    (dlogits,) = ctx.saved_tensors  # (softmax - onehot) / count, written by the forward
    if type(dlogits) is torch.Tensor and type(grad_loss) is torch.Tensor:
        # Eager: scale in place by grad_output, a kernel that returns at once when grad_output == 1
        # (no sync, no pass). The version bump makes a second backward through the same graph
        # (retain_graph=True) raise instead of scaling twice.
        torch.ops.gpt2k_cuda.scale_grad_(dlogits, grad_loss)
        torch.autograd.graph.increment_version(dlogits)
        return dlogits, None, None, None, None, None
    # Traced (torch.compile / AOTAutograd see functional or fake tensors) or a tensor subclass: stay
    # functional, the compiler schedules the multiply: in fp32, rounded once to dlogits' dtype (a half
    # tensor times an fp32 scalar tensor would round the scale first: a GradScaler's 65536 -> inf in fp16).
    return (dlogits.float() * grad_loss).to(dlogits.dtype), None, None, None, None, None


# Eager fast path: the extension's op called below autograd, with the same setup_context and backward as
# its registered autograd formula (kernels/_eager.py). The op exists once the extension is loaded.
_EagerCrossEntropy = eager_function(lambda *args: torch.ops.gpt2k_cuda.cross_entropy_fwd(*args), _setup_context,
                                    _backward, "_EagerCrossEntropy")


def _register_python_parts():
    torch.library.register_fake("gpt2k_cuda::cross_entropy_fwd")(_fwd_fake)
    torch.library.register_fake("gpt2k_cuda::cross_entropy_grad_")(_grad_fake)
    torch.library.register_fake("gpt2k_cuda::scale_grad_")(_scale_fake)
    torch.library.register_autograd("gpt2k_cuda::cross_entropy_fwd", _backward, setup_context=_setup_context)


# ---- public functions -------------------------------------------------------------------------------

def _check_device(t, where):
    if t.device.type == "cuda" and not _state["cuda"]:
        raise RuntimeError(f"{where}: the classifier extension was built without CUDA (no CUDA toolkit was found "
                           "when it was built, or GPT2K_BUILD_CUDA=0); it runs on CPU tensors only here")
    if t.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{where}: logits on {t.device}; supported devices: cpu, cuda (and meta, for shapes)")


def cross_entropy(logits, targets, ignore_index=-1, vocab_size=None):
    """Mean cross-entropy over targets != ignore_index; logits (..., Vp) of which the first
    `vocab_size` are real, targets (...) int64. Same semantics as kernels.reference.cross_entropy."""
    _load()
    _check_device(logits, "cross_entropy")
    if logits.dim() < 1 or targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: logits (..., V) and targets (...) expected, got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    vocab_size = logits.shape[-1] if vocab_size is None else int(vocab_size)
    x = logits.reshape(-1, logits.shape[-1])
    if not x.is_contiguous():
        x = x.contiguous()
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    t = targets.reshape(-1).contiguous()
    args = (x, t, ignore_index, vocab_size, compute_grad, CHECK_ROWS)
    if fast_path(x):  # kernels/_eager.py: skip the op's Python autograd layer in eager mode
        loss = _EagerCrossEntropy.apply(*args)[0]
    else:  # compiling, or meta tensors (shape inference: the op's fake implementation)
        loss, _ = torch.ops.gpt2k_cuda.cross_entropy_fwd(*args)
    if CHECK_ROWS and not torch.compiler.is_compiling() and not x.is_meta:
        from kernels.linear_cross_entropy import check_loss

        # the op itself names an all -inf row or a bad target; NaN / +inf logits show up as a NaN loss
        check_loss(loss, t, ignore_index, vocab_size, "cross_entropy")
    return loss


def fused_ce_(logits, targets, ignore_index, vocab_size):
    """Sum (fp32, 0-d) of the per-row losses over non-ignored rows; OVERWRITES logits (N, Vp) contiguous,
    fp32/bf16/fp16, with softmax - onehot(target) (unscaled) on real columns, 0 on padded columns and
    ignored rows. Invalid rows make the sum NaN (no sync here: the caller checks the sum once)."""
    _load()
    _check_device(logits, "fused_ce_")
    return torch.ops.gpt2k_cuda.cross_entropy_grad_(logits, targets, ignore_index, int(vocab_size), False)


def linear_cross_entropy(hidden, weight, targets, ignore_index=-1, vocab_size=None):
    """cross_entropy(hidden @ weight.T, ...) in chunks of rows that never hold the full logits
    (kernels/linear_cross_entropy.py), with this module's fused kernel on each chunk."""
    from kernels.linear_cross_entropy import chunked_linear_cross_entropy

    return chunked_linear_cross_entropy(hidden, weight, targets, ignore_index, vocab_size, backend="cuda")


# ---- static report: nvcc -Xptxas -v ---------------------------------------------------------------

def ptxas_report(archs=(80, 90)):
    """Compile csrc/classifier.cu for each sm_<arch> with `nvcc -Xptxas -v` (no GPU needed) and return one
    row per kernel and arch: name, arch, registers, spill_bytes, stack_bytes, shared_bytes, ld128, st128
    (128-bit global loads / stores in the PTX), plus shared_limit / expect_ld128 for
    kernels._triton_utils.check_report. Raises RuntimeError if nvcc is missing or fails."""
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("ptxas_report: no CUDA compiler (nvcc) found; install the CUDA toolkit or set CUDA_HOME")
    cpp_extension = _cpp_extension()
    home = cuda_home()
    with tempfile.TemporaryDirectory() as d:
        cmd = [nvcc, "-c", str(_SOURCES[1]), "-o", os.path.join(d, "classifier.o"), "-std=c++20", "-O3",
               "-Xptxas", "-v", "--keep", "--keep-dir", d,
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *cpp_extension.COMMON_NVCC_FLAGS,
               *[f"-I{p}" for p in cpp_extension.include_paths()], f"-I{os.path.join(home, 'include')}"]
        for a in archs:
            cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"ptxas_report: nvcc failed:\n{out.stderr[-6000:]}")
        counts = {}
        for ptx in Path(d).glob("*.ptx"):
            counts.update(_ptx_counts(ptx.read_text()))
    rows = _parse_ptxas(out.stderr + out.stdout)
    names = _demangle([r["mangled"] for r in rows])
    for r in rows:
        r["ld128"], r["st128"] = counts.get((r["mangled"], r["arch"]), (None, None))
        r["name"] = names.get(r.pop("mangled"))
        # the keys kernels._triton_utils.check_report reads, so one checker serves both reports
        r["shared_limit"] = _SHARED_LIMIT.get(r["arch"], 48 * 1024)
        r["expect_ld128"] = re.search(r", [48](, (true|false))?>$", r["name"]) is not None  # the 16-byte-vector ones
        r["module"] = "kernels.classifier"
    return rows


_SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}  # opt-in maximum per block, bytes


def _parse_ptxas(log):
    rows, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "registers": 0, "spill_bytes": 0, "stack_bytes": 0,
                   "shared_bytes": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack_bytes"] = int(m.group(1))
            cur["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["shared_bytes"] = int(s.group(1)) if s else 0
    return rows


def _ptx_counts(ptx):
    """{(mangled, 'sm_XX'): (128-bit global loads, 128-bit global stores)} in one PTX file."""
    arch = re.search(r"^\.target\s+(sm_\d+)", ptx, re.M).group(1)
    counts = {}
    for m in re.finditer(r"\.entry\s+(\w+)\((.*?)^}", ptx, re.M | re.S):
        body = m.group(2)
        counts[(m.group(1), arch)] = (len(re.findall(r"ld\.global(?:\.[\w:]+)*\.v4\.(?:b32|u32|f32)", body)),
                                      len(re.findall(r"st\.global(?:\.[\w:]+)*\.v4\.(?:b32|u32|f32)", body)))
    return counts


def _demangle(names):
    """mangled -> short readable name, e.g. 'ce_row_kernel<__nv_bfloat16, 8>'."""
    filt = shutil.which("c++filt")
    out = names
    if filt and names:
        res = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
        if res.returncode == 0:
            out = res.stdout.splitlines()
    short = {}
    for mangled, full in zip(names, out):
        full = full.replace("(anonymous namespace)::", "").replace("gpt2k::", "")
        m = re.match(r"(?:void )?(\w+(?:<[^()]*>)?)", full)  # drop the return type and parameter list
        short[mangled] = m.group(1) if m else full
    return short
