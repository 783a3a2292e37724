"""Fast unit tests of the static (no-GPU) compile report's parsing and rules, on handwritten ptxas / PTX text.

The compile tests (test_attention, test_layernorm, test_adamw, test_cross_entropy, test_classifier) only
ever see kernels that pass, so a parser that reads 0 spills from every log, or a `check_report` that never
complains, would leave them green. These tests feed the parsers logs and PTX that must be flagged, with the
compiler (triton.compile, ptxas, nvcc) replaced by fakes: no compile, well under a second each.
"""
import os
import subprocess
import types

import pytest
import torch

from kernels import _triton_utils as U
import kernels.classifier as C

# ---- kernels._triton_utils.check_report --------------------------------------------------------------

ROW = {"name": "k", "arch": "sm_90", "registers": 64, "spill_bytes": 0, "stack_bytes": 0, "shared_bytes": 1024,
       "shared_limit": 227 * 1024, "ld128": 4, "ld_total": 6, "expect_ld128": True}


def test_check_report_accepts_a_clean_row():
    assert U.check_report(dict(ROW)) == []


@pytest.mark.parametrize("change, word", [
    ({"spill_bytes": 8}, "spill"),
    ({"shared_bytes": 227 * 1024 + 1}, "shared"),
    ({"ld128": 0}, "128-bit"),
])
def test_check_report_flags_each_rule(change, word):
    problems = U.check_report({**ROW, **change})
    assert len(problems) == 1 and word in problems[0], problems


def test_check_report_shared_limit_is_inclusive_and_ld128_rule_is_opt_in():
    assert U.check_report({**ROW, "shared_bytes": 227 * 1024}) == []  # exactly at the limit: fits
    assert U.check_report({**ROW, "ld128": 0, "expect_ld128": False}) == []  # compute-bound kernel: no rule
    assert len(U.check_report({**ROW, "spill_bytes": 4, "shared_bytes": 10**6, "ld128": 0})) == 3


def test_shared_limits_per_arch():
    """A100 (sm_80) opts in to 163 KiB per block, H100 (sm_90) to 227 KiB; the CUDA report uses the same."""
    assert U.SHARED_LIMIT == {80: 163 * 1024, 90: 227 * 1024}
    assert C._SHARED_LIMIT == {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


# ---- kernels._triton_utils.aot_compile: parsing ptxas -v and the PTX (compiler faked) -----------------

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    {stack} bytes stack frame, {st} bytes spill stores, {ld} bytes spill loads
ptxas info    : Used {regs} registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]
"""

PTX_HEAD = ".version 8.4\n.target sm_90a\n.address_size 64\n\n.visible .entry k(\n)\n{\n"


def _fake_compile(monkeypatch, ptx, log, shared=4096):
    """Replace triton.compile / ASTSource and ptxas with fakes; return a dict recording the calls."""
    import triton
    import triton.compiler

    calls = {}

    def ast_source(fn, signature, constexprs, attrs=None):
        calls["attrs"] = attrs
        return ("src", fn)

    def compile_(src, target=None, options=None):
        calls["target"], calls["options"] = target, options
        return types.SimpleNamespace(asm={"ptx": ptx}, metadata=types.SimpleNamespace(shared=shared))

    def run(cmd, **kw):
        calls["ptxas"] = cmd
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr=log)

    monkeypatch.setattr(triton.compiler, "ASTSource", ast_source)
    monkeypatch.setattr(triton, "compile", compile_)
    monkeypatch.setattr(U.subprocess, "run", run)
    return calls


SPEC = U.AotSpec("k", fn=object(), signature={"x": "*bf16", "y": "*bf16", "n": "i32", "B": "constexpr"},
                 constexprs={"B": 1024}, aligned=("x", "y"), num_warps=8, num_stages=2)


def test_aot_compile_reads_registers_spill_stores_and_loads_and_stack(monkeypatch):
    ptx = PTX_HEAD + "ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\nld.global.b32 %r5, [%rd2];\n}\n"
    _fake_compile(monkeypatch, ptx, PTXAS_LOG.format(stack=24, st=8, ld=16, regs=168))
    row = U.aot_compile(SPEC, 90)
    assert row["registers"] == 168
    assert row["spill_bytes"] == 8 + 16  # stores and loads both count
    assert row["stack_bytes"] == 24
    assert U.check_report(row) and "24 bytes of register spills" in U.check_report(row)[0]


@pytest.mark.parametrize("st, ld", [(8, 0), (0, 8)])
def test_aot_compile_flags_spill_stores_alone_and_spill_loads_alone(monkeypatch, st, ld):
    ptx = PTX_HEAD + "ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n}\n"
    _fake_compile(monkeypatch, ptx, PTXAS_LOG.format(stack=8, st=st, ld=ld, regs=255))
    row = U.aot_compile(SPEC, 80)
    assert row["spill_bytes"] == 8 and any("spill" in p for p in U.check_report(row))


def test_aot_compile_clean_log_is_clean(monkeypatch):
    ptx = PTX_HEAD + "ld.global.nc.v4.u32 {%r1, %r2, %r3, %r4}, [%rd1];\nld.global.v2.b64 {%rd3, %rd4}, [%rd2];\n}\n"
    _fake_compile(monkeypatch, ptx, PTXAS_LOG.format(stack=0, st=0, ld=0, regs=40), shared=2048)
    row = U.aot_compile(SPEC, 80)
    assert (row["registers"], row["spill_bytes"], row["stack_bytes"]) == (40, 0, 0)
    assert row["ld128"] == 2 and row["ld_total"] == 2
    assert row["shared_bytes"] == 2048 and row["shared_limit"] == 163 * 1024 and row["arch"] == "sm_80"
    assert U.check_report(row) == []


def test_aot_compile_scalar_global_loads_are_not_128_bit(monkeypatch):
    """PTX whose main loads are ld.global.b32 / .v2.b32 (32 / 64-bit): ld128 is 0 and the row is flagged."""
    ptx = PTX_HEAD + ("ld.global.b32 %r1, [%rd1];\nld.global.v2.b32 {%r2, %r3}, [%rd2];\n"
                      "ld.global.nc.b16 %rs1, [%rd3];\nld.shared.v4.b32 {%r4, %r5, %r6, %r7}, [%r8];\n"
                      "st.global.v4.b32 [%rd4], {%r1, %r2, %r3, %r4};\n}\n")
    _fake_compile(monkeypatch, ptx, PTXAS_LOG.format(stack=0, st=0, ld=0, regs=32))
    row = U.aot_compile(SPEC, 90)
    assert row["ld128"] == 0 and row["ld_total"] == 3
    assert U.check_report(row) == ["no 128-bit global loads"]


def test_cache_qualified_vector_loads_count_as_128_bit(monkeypatch):
    """Vector loads with a cache qualifier (Triton emits ld.global.L1::evict_last.v4.b32 for
    eviction_policy="evict_last") are 128-bit loads too, in both counters: Triton kernels and the CUDA PTX."""
    loads = ("ld.global.L1::evict_last.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n"
             "ld.global.nc.L2::128B.v4.f32 {%f1, %f2, %f3, %f4}, [%rd2];\n"
             "ld.global.L1::no_allocate.v2.b64 {%rd5, %rd6}, [%rd3];\n")
    _fake_compile(monkeypatch, PTX_HEAD + loads + "}\n", PTXAS_LOG.format(stack=0, st=0, ld=0, regs=32))
    row = U.aot_compile(SPEC, 90)
    assert row["ld128"] == 3 and row["ld_total"] == 3 and U.check_report(row) == []
    cuda_ptx = (PTX_80.replace("ld.global.v4.f32", "ld.global.L1::evict_last.v4.f32")
                .replace("st.global.v4.b32", "st.global.L1::no_allocate.v4.b32"))
    assert cuda_ptx != PTX_80 and C._ptx_counts(cuda_ptx) == C._ptx_counts(PTX_80)


MMA_SYNC = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f1, %f2, %f3, %f4};\n"
WGMMA = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, p, 1, 1, 0, 1;\n"


@pytest.mark.parametrize("body, arch, rule, want, problem", [
    (WGMMA * 3 + "wgmma.fence.sync.aligned;\nwgmma.commit_group.sync.aligned;\n", 90, "wgmma", (3, 0), None),
    (MMA_SYNC * 2, 90, "wgmma", (0, 2), "no wgmma on sm_90 (tl.dot compiled to 2 mma.sync"),
    ("fma.rn.f32 %f1, %f2, %f3, %f1;\n", 90, "wgmma", (0, 0), "no MMA at all"),
    (MMA_SYNC * 2, 80, "wgmma", (0, 2), None),  # sm_80 has no wgmma: mma.sync is its tensor-core path
    ("fma.rn.f32 %f1, %f2, %f3, %f1;\n", 80, "wgmma", (0, 0), "compiled to FMA"),
    (MMA_SYNC, 90, "tensor_cores", (0, 1), None),
    ("fma.rn.f32 %f1, %f2, %f3, %f1;\n", 90, "tensor_cores", (0, 0), "compiled to FMA"),
    ("fma.rn.f32 %f1, %f2, %f3, %f1;\n", 90, "", (0, 0), None),  # not a matmul kernel: no rule
])
def test_aot_compile_counts_tensor_core_instructions(monkeypatch, body, arch, rule, want, problem):
    """wgmma (Hopper's warpgroup MMA) and mma.sync counted in the PTX; AotSpec.mma decides what a row needs:
    wgmma on sm_90 and tensor cores of any kind on sm_80, tensor cores anywhere, or nothing."""
    ptx = PTX_HEAD + "ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n" + body + "}\n"
    _fake_compile(monkeypatch, ptx, PTXAS_LOG.format(stack=0, st=0, ld=0, regs=128))
    row = U.aot_compile(U.AotSpec("k", object(), SPEC.signature, SPEC.constexprs, SPEC.aligned, mma=rule), arch)
    assert (row["wgmma"], row["mma_sync"]) == want
    problems = U.check_report(row)
    assert problems == [] if problem is None else (len(problems) == 1 and problem in problems[0]), problems


def test_aot_spec_rejects_an_unknown_mma_rule(monkeypatch):
    _fake_compile(monkeypatch, PTX_HEAD + "}\n", PTXAS_LOG.format(stack=0, st=0, ld=0, regs=32))
    with pytest.raises(ValueError, match="AotSpec.mma must be"):
        U.aot_compile(U.AotSpec("k", object(), SPEC.signature, SPEC.constexprs, mma="hopper"), 90)


def test_with_int_one_keeps_the_mma_rule():
    spec = U.AotSpec("k", object(), SPEC.signature, SPEC.constexprs, SPEC.aligned, mma="wgmma")
    assert U.with_int_one(spec, "n").mma == "wgmma"


def test_aot_compile_flags_shared_memory_over_the_arch_limit(monkeypatch):
    ptx = PTX_HEAD + "ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n}\n"
    _fake_compile(monkeypatch, ptx, PTXAS_LOG.format(stack=0, st=0, ld=0, regs=32), shared=200 * 1024)
    on80, on90 = U.aot_compile(SPEC, 80), U.aot_compile(SPEC, 90)
    assert any("shared" in p for p in U.check_report(on80))  # 200 KiB > 163 KiB on A100
    assert U.check_report(on90) == []  # fits the 227 KiB of H100


def test_aot_compile_passes_target_options_alignment_and_gpu_name(monkeypatch):
    ptx = PTX_HEAD + "ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n}\n"
    calls = _fake_compile(monkeypatch, ptx, PTXAS_LOG.format(stack=0, st=0, ld=0, regs=32))
    row = U.aot_compile(SPEC, 90)
    assert (calls["target"].backend, calls["target"].arch, calls["target"].warp_size) == ("cuda", 90, 32)
    assert calls["options"] == {"num_warps": 8, "num_stages": 2}
    assert calls["attrs"] == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
    assert "--gpu-name=sm_90a" in calls["ptxas"] and "-v" in calls["ptxas"]
    assert (row["num_warps"], row["num_stages"], row["expect_ld128"]) == (8, 2, True)


def test_aot_compile_raises_when_ptxas_fails(monkeypatch):
    ptx = PTX_HEAD + "}\n"
    _fake_compile(monkeypatch, ptx, "")
    monkeypatch.setattr(U.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 255, "", "ptxas fatal: boom"))
    with pytest.raises(RuntimeError, match="boom"):
        U.aot_compile(SPEC, 90)


def test_with_int_one_turns_the_argument_into_a_constexpr():
    s = U.with_int_one(SPEC, "x")
    assert s.signature["x"] == "constexpr" and s.constexprs == {"B": 1024, "x": 1}
    assert s.aligned == ("y",) and (s.num_warps, s.num_stages) == (8, 2) and "[x=1]" in s.name
    assert SPEC.signature["x"] == "*bf16" and SPEC.constexprs == {"B": 1024}  # the original is untouched


# ---- kernels.classifier: nvcc -Xptxas -v parsing --------------------------------------------------------

NVCC_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4fastPf' for 'sm_80'
ptxas info    : Function properties for _Z4fastPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 1 barriers, 512 bytes smem, 368 bytes cmem[0]
ptxas info    : Compiling entry function '_Z5spillPf' for 'sm_80'
ptxas info    : Function properties for _Z5spillPf
    40 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 255 registers, 368 bytes cmem[0]
ptxas info    : Compiling entry function '_Z4fastPf' for 'sm_90'
ptxas info    : Function properties for _Z4fastPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 28 registers, used 1 barriers, 200000 bytes smem, 368 bytes cmem[0]
"""


def test_parse_ptxas_one_row_per_kernel_and_arch():
    rows = C._parse_ptxas(NVCC_LOG)
    got = [(r["mangled"], r["arch"], r["registers"], r["spill_bytes"], r["stack_bytes"], r["shared_bytes"])
           for r in rows]
    assert got == [("_Z4fastPf", "sm_80", 30, 0, 0, 512),
                   ("_Z5spillPf", "sm_80", 255, 32, 40, 0),
                   ("_Z4fastPf", "sm_90", 28, 0, 0, 200000)]


@pytest.mark.parametrize("st, ld", [(4, 0), (0, 4)])
def test_parse_ptxas_spill_stores_alone_and_loads_alone(st, ld):
    log = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'\n"
           f"    0 bytes stack frame, {st} bytes spill stores, {ld} bytes spill loads\n"
           "ptxas info    : Used 64 registers, 368 bytes cmem[0]\n")
    assert C._parse_ptxas(log)[0]["spill_bytes"] == 4


PTX_80 = """\
.version 8.0
.target sm_80
.address_size 64

.visible .entry _Z4fastPf(
	.param .u64 _Z4fastPf_param_0
)
{
	ld.global.nc.v4.u32 	{%r1, %r2, %r3, %r4}, [%rd1];
	ld.global.v4.f32 	{%f1, %f2, %f3, %f4}, [%rd2];
	st.global.v4.b32 	[%rd3], {%r1, %r2, %r3, %r4};
}

.visible .entry _Z5spillPf(
	.param .u64 _Z5spillPf_param_0
)
{
	ld.global.f32 	%f1, [%rd1];
	ld.global.v2.f32 	{%f2, %f3}, [%rd2];
	ld.shared.v4.f32 	{%f4, %f5, %f6, %f7}, [%r1];
	st.global.f32 	[%rd3], %f1;
}
"""


def test_ptx_counts_only_128_bit_global_accesses_per_kernel():
    assert C._ptx_counts(PTX_80) == {("_Z4fastPf", "sm_80"): (2, 1), ("_Z5spillPf", "sm_80"): (0, 0)}


def test_ptxas_report_rows_feed_check_report(monkeypatch, tmp_path):
    """The real ptxas_report with nvcc faked: per-arch shared limit, expect_ld128 from the template
    arguments, and check_report flagging the spilling / overflowing / not-128-bit kernels."""
    log = NVCC_LOG.replace("_Z5spillPf", "_Z5spillILi8EEvPf")
    ptx = PTX_80.replace("_Z5spillPf", "_Z5spillILi8EEvPf")

    def run(cmd, **kw):
        d = cmd[cmd.index("--keep-dir") + 1]
        with open(os.path.join(d, "classifier.ptx"), "w") as f:
            f.write(ptx)
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr=log)

    home = tmp_path / "cuda"
    monkeypatch.setattr(C, "_nvcc", lambda: "/fake/nvcc")
    monkeypatch.setattr(C, "cuda_home", lambda: str(home))
    monkeypatch.setattr(C, "_cpp_extension", lambda: types.SimpleNamespace(COMMON_NVCC_FLAGS=[],
                                                                             include_paths=lambda: []))
    monkeypatch.setattr(C, "_demangle", lambda names: {n: {"_Z4fastPf": "fast", "_Z5spillILi8EEvPf":
                                                            "spill<float, 8>"}[n] for n in names})
    monkeypatch.setattr(C.subprocess, "run", run)
    rows = {(r["name"], r["arch"]): r for r in C.ptxas_report((80, 90))}
    assert set(rows) == {("fast", "sm_80"), ("spill<float, 8>", "sm_80"), ("fast", "sm_90")}
    assert rows[("fast", "sm_80")]["shared_limit"] == 163 * 1024
    assert rows[("fast", "sm_90")]["shared_limit"] == 227 * 1024
    assert U.check_report(rows[("fast", "sm_80")]) == []
    assert rows[("fast", "sm_80")]["expect_ld128"] is False and rows[("fast", "sm_80")]["ld128"] == 2
    spill = rows[("spill<float, 8>", "sm_80")]
    assert spill["expect_ld128"] is True and spill["ld128"] == 0
    assert sorted(p.split()[-1] for p in U.check_report(spill)) == ["loads", "spills"]
    assert U.check_report(rows[("fast", "sm_90")]) == []  # 200000 B: over sm_80's limit, within sm_90's


# ---- kernels.classifier: finding nvcc, and the default arch list -----------------------------------------

def _toolkit(root, header=True):
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "include").mkdir()
    if header:
        (root / "include" / "cuda_runtime.h").write_text("")
    return str(root)


def test_cuda_home_prefers_a_valid_cuda_home(monkeypatch, tmp_path):
    home = _toolkit(tmp_path / "mine")
    monkeypatch.setenv("CUDA_HOME", home)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert C.cuda_home() == home
    assert C._nvcc() == os.path.join(home, "bin", "nvcc")


def test_cuda_home_skips_a_nonexistent_or_incomplete_cuda_home(monkeypatch, tmp_path):
    """A CUDA_HOME that does not exist, or lacks include/cuda_runtime.h, is passed over for nvcc on PATH
    (its link followed to the toolkit); with no nvcc anywhere the answer is None."""
    real = _toolkit(tmp_path / "cuda-12.4")
    (tmp_path / "wrap").mkdir()
    os.symlink(os.path.join(real, "bin", "nvcc"), tmp_path / "wrap" / "nvcc")
    monkeypatch.setenv("PATH", str(tmp_path / "wrap"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(C.os.path, "isfile", _no_usr_local(os.path.isfile))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nonexistent"))
    assert C.cuda_home() == os.path.realpath(real)
    monkeypatch.setenv("CUDA_HOME", _toolkit(tmp_path / "noheader", header=False))
    assert C.cuda_home() == os.path.realpath(real)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert C.cuda_home() is None and C._nvcc() is None


def _no_usr_local(isfile):
    """os.path.isfile that hides /usr/local/cuda (the last fallback), so the test means the same here and on CI."""
    return lambda p: False if str(p).startswith("/usr/local/cuda") else isfile(p)


def test_no_gpu_build_defaults_to_sm80_sm90_and_restores_the_env(monkeypatch):
    seen = {}

    def load(**kw):
        seen["arch"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
        seen["with_cuda"] = kw["with_cuda"]

    ext = types.SimpleNamespace(load=load, _get_build_directory=lambda name, verbose: "/nonexistent")
    monkeypatch.setattr(C, "_state", {"ops": None, "error": None, "cuda": None})
    monkeypatch.setattr(C, "unavailable_reason", lambda: None)
    monkeypatch.setattr(C, "_want_cuda", lambda: True)
    monkeypatch.setattr(C, "_cpp_extension", lambda: ext)
    monkeypatch.setattr(C, "_register_python_parts", lambda: None)
    monkeypatch.setattr(C.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(C.os.path, "getmtime", lambda p: 0.0)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    C._build_and_load()
    assert seen == {"arch": "8.0;9.0", "with_cuda": True}
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ  # not left behind for the rest of the process
    monkeypatch.setattr(C, "_state", {"ops": None, "error": None, "cuda": None})
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")  # the user's choice wins
    C._build_and_load()
    assert seen["arch"] == "8.6" and os.environ["TORCH_CUDA_ARCH_LIST"] == "8.6"


def test_cp_async_copies_count_as_global_loads(monkeypatch):
    """A pipelined loop (`tl.range(num_stages=2)`) loads through cp.async global -> shared copies: a 16-byte
    copy is a 128-bit global load, a 4-byte one a load that is not; both count in ld_total. A kernel whose
    only 128-bit loads are such copies passes the rule (seen: layer_norm_bwd R=4 w16 stages=2)."""
    ptx = PTX_HEAD + ("@%p1 cp.async.ca.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x4, %r2;\n"
                      "cp.async.cg.shared.global [ %r3 + 0 ], [ %rd2 + 0 ], 0x10, %r4;\n"
                      "cp.async.cg.shared.global [%r5], [%rd3], 16;\n"
                      "cp.async.commit_group;\ncp.async.wait_group 0;\n"
                      "ld.global.v2.b32 {%r6, %r7}, [%rd4];\n}\n")
    _fake_compile(monkeypatch, ptx, PTXAS_LOG.format(stack=0, st=0, ld=0, regs=32))
    row = U.aot_compile(SPEC, 90)
    assert row["ld128"] == 2 and row["ld_total"] == 4 and U.check_report(row) == []
    only_narrow = ptx.replace("0x10", "0x8").replace("], 16;", "], 8;")
    _fake_compile(monkeypatch, only_narrow, PTXAS_LOG.format(stack=0, st=0, ld=0, regs=32))
    row = U.aot_compile(SPEC, 90)
    assert row["ld128"] == 0 and row["ld_total"] == 4 and U.check_report(row) == ["no 128-bit global loads"]


@pytest.mark.parametrize("argv,code,where,words", [
    (["--help"], 0, "out", "usage: python -m kernels._triton_utils"),
    ([], 2, "err", "usage"),
    (["9x", "kernels.gelu"], 2, "err", "ARCHS must be comma-separated integers"),
    (["90:foo", "kernels.gelu"], 2, "err", "unknown mode 'foo'"),
])
def test_command_line_usage_errors(argv, code, where, words, capsys):
    """`python -m kernels._triton_utils` explains itself instead of a traceback (it took --help for an arch),
    on stderr, so that stdout stays the JSON rows a caller parses."""
    assert U._main(argv) == code
    out, err = capsys.readouterr()
    assert words in (out if where == "out" else err)
    assert (err if where == "out" else out) == ""


def test_cp_async_counting_reads_the_copy_size_operand(monkeypatch):
    """The state space may be spelled `.shared::cta` (newer ptxas output); the 128-bit test reads the copy
    size operand after the two addresses, not a 16 elsewhere on the line (register %r16, offset 16)."""
    ptx = PTX_HEAD + ("cp.async.cg.shared::cta.global [%r1], [%rd1], 16;\n"
                      "cp.async.ca.shared::cta.global [ %r16 + 16 ], [ %rd16 + 16 ], 0x4, %r16;\n"
                      "cp.async.ca.shared.global [%r16], [%rd16], 8;\n}\n")
    _fake_compile(monkeypatch, ptx, PTXAS_LOG.format(stack=0, st=0, ld=0, regs=32))
    row = U.aot_compile(SPEC, 90)
    assert row["ld128"] == 1 and row["ld_total"] == 3, (row["ld128"], row["ld_total"])


@pytest.mark.parametrize("argv,rows", [(["-h"], None), (["80"], "[]"), (["80,90:ones"], "[]")])
def test_command_line_help_and_no_modules(argv, rows, capsys):
    """-h is --help (usage on stdout, exit 0); an arch list with no module, with or without ':ones', is a
    valid call that compiles nothing: '[]' on stdout and exit 0."""
    assert U._main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith("usage: python -m kernels._triton_utils") if rows is None else out.strip() == rows


@pytest.mark.parametrize("argv,code", [([], 2), (["80,x"], 2), (["--help"], 0), (["80"], 0)])
def test_command_line_exit_status(argv, code):
    """`python -m kernels._triton_utils` exits with _main's status (2 for a usage error), so scripts see it."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "kernels._triton_utils", *argv], cwd=root, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == code, proc.stderr[-2000:]
