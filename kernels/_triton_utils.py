"""Shared Triton helpers: ahead-of-time compilation for real GPUs (no GPU needed) and its resource report.

Each Triton kernel module defines `compile_specs()` -> list of `AotSpec` at GPT-2 shapes. The static
report (`python bench/run.py --static`) and the compile tests run `aot_compile(spec, arch)` on each,
which compiles with Triton's own compiler for `GPUTarget("cuda", arch, 32)`, then runs Triton's bundled
`ptxas -v` on the PTX to read registers, spill bytes and the shared memory, and counts the 128-bit
global loads and the tensor-core instructions in the PTX: on sm_90 a `tl.dot` should become `wgmma`
(Hopper's warpgroup MMA); the Ampere `mma.sync` it falls back to (small tiles, too few warps) runs at
a fraction of the H100's tensor-core peak, and an FMA loop (no MMA at all) at far less.
"""
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

# Shared memory a block may use (opt-in maximum), bytes.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass
class AotSpec:
    name: str  # a label for the report, e.g. "layer_norm_fwd bf16 C=768"
    fn: object  # the @triton.jit function (not an autotuner: pass autotuner.fn with one config)
    signature: dict  # arg name -> "*bf16" / "*fp32" / "i32" / "fp32" / "constexpr"
    constexprs: dict  # constexpr name -> value
    aligned: tuple = ()  # arg names the JIT would specialize as divisible by 16 (pointers, strides)
    num_warps: int = 4
    num_stages: int = 3
    expect_ld128: bool = True  # the main global loads should be 128-bit (memory-bound kernels)
    # matmul kernels: "tensor_cores" = some MMA instruction (mma.sync or wgmma) on every arch; "wgmma" = also
    # wgmma, not only mma.sync, on sm_90 and newer; "" = no rule (kernels without tl.dot)
    mma: str = ""
    extra: dict = field(default_factory=dict)


def _ptxas():
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")


def aot_compile(spec, arch):
    """Compile `spec` for sm_<arch>; return a dict with registers, spill bytes, shared bytes, ld128 count."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(spec.signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.aligned}
    src = ASTSource(spec.fn, spec.signature, spec.constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    ptx = kernel.asm["ptx"]
    gpu = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed for {spec.name} on sm_{arch}:\n{out.stderr}")
    log = out.stderr + out.stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_st, spill_ld = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    stack = int(re.search(r"(\d+) bytes stack frame", log).group(1))
    shared = kernel.metadata.shared
    return {
        "name": spec.name, "arch": f"sm_{arch}", "registers": regs, "spill_bytes": spill_st + spill_ld,
        "stack_bytes": stack, "shared_bytes": shared, "shared_limit": SHARED_LIMIT[arch],
        # global loads: ld.global, and cp.async copies global -> shared (a pipelined loop's prefetches,
        # `tl.range(num_stages=)`), 128-bit when they move 16 bytes
        "ld128": len(re.findall(r"ld\.global(?:\.[\w:]+)*\.v4\.(?:b32|u32|f32|s32)", ptx))
        + len(re.findall(r"ld\.global(?:\.[\w:]+)*\.v2\.(?:b64|u64|f64)", ptx))
        + len(re.findall(r"cp\.async(?:\.[\w:]+)*\.shared(?:::cta)?\.global(?:\.[\w:]+)*\s+\[[^]]*\],\s*\[[^]]*\],\s*(?:16|0x10)\b", ptx)),
        "ld_total": len(re.findall(r"ld\.global", ptx)) + len(re.findall(r"cp\.async(?:\.[\w:]+)*\.shared(?:::cta)?\.global", ptx)),
        "expect_ld128": spec.expect_ld128, "num_warps": spec.num_warps, "num_stages": spec.num_stages,
        # tensor-core instructions: Hopper's warpgroup MMA, and the Ampere-style warp MMA
        "wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)), "mma_sync": len(re.findall(r"\bmma\.sync\b", ptx)),
        "expect_mma": _expected_mma(spec.mma, arch),
    }


def _expected_mma(rule, arch):
    """What check_report requires of a row's tensor-core instructions: "wgmma", "tensor_cores" or ""."""
    if rule not in ("", "tensor_cores", "wgmma"):
        raise ValueError(f"AotSpec.mma must be '', 'tensor_cores' or 'wgmma', got {rule!r}")
    return "tensor_cores" if rule == "wgmma" and arch < 90 else rule


def mma_problems(row):
    """The tensor-core rule of one row (empty list = fine, or no rule)."""
    want, wgmma, sync = row.get("expect_mma", ""), row.get("wgmma", 0), row.get("mma_sync", 0)
    if want == "wgmma" and not wgmma:
        return [f"no wgmma on {row.get('arch')} (tl.dot compiled to " + (f"{sync} mma.sync" if sync else "no MMA at all")
                + ": not Hopper's tensor-core path)"]
    if want == "tensor_cores" and not (wgmma or sync):
        return [f"no tensor-core MMA instruction on {row.get('arch')} (tl.dot compiled to FMA)"]
    return []


def check_report(row):
    """Problems with one aot_compile row (empty list = fine)."""
    problems = []
    if row["spill_bytes"]:
        problems.append(f"{row['spill_bytes']} bytes of register spills")
    if row["shared_bytes"] > row["shared_limit"]:
        problems.append(f"shared memory {row['shared_bytes']} > {row['shared_limit']}")
    if row["expect_ld128"] and row["ld128"] == 0:
        problems.append("no 128-bit global loads")
    return problems + mma_problems(row)


def with_int_one(spec, arg):
    """`spec` with integer argument `arg` equal to 1: Triton's JIT specializes an int argument of value 1
    to a constexpr (C = 1, a stride of 1, one row), so every kernel must also compile that way. An
    interpreter test cannot see this: there the argument stays a plain number."""
    sig, consts = dict(spec.signature), dict(spec.constexprs)
    sig[arg], consts[arg] = "constexpr", 1
    return AotSpec(f"{spec.name} [{arg}=1]", spec.fn, sig, consts, tuple(a for a in spec.aligned if a != arg),
                   spec.num_warps, spec.num_stages, spec.expect_ld128, spec.mma, spec.extra)


def static_report(modules, archs=(80, 90), int_ones=False):
    """AOT-compile every `compile_specs()` of the given kernel modules (e.g. ["kernels.layernorm"]).

    Runs in a subprocess without TRITON_INTERPRET (under the interpreter, @triton.jit makes
    interpreter functions that the real compiler cannot take). Returns a list of report rows; a row
    whose compile failed has an "error" key. int_ones=True compiles instead, once per kernel function,
    each integer argument specialized to 1 (see with_int_one).
    """
    import json
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "kernels._triton_utils", ",".join(str(a) for a in archs) + (":ones" if int_ones else ""),
           *modules]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"static compile report failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _main(argv):
    import importlib
    import json
    import sys

    usage = ("usage: python -m kernels._triton_utils ARCHS[:ones] MODULE...   e.g. 80,90 kernels.layernorm\n"
             "  compiles each MODULE's compile_specs() for sm_<arch> and prints one JSON row per kernel and arch")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    arch_list, _, mode = argv[0].partition(":")
    try:
        archs = [int(a) for a in arch_list.split(",")]
    except ValueError:
        print(f"kernels._triton_utils: ARCHS must be comma-separated integers such as 80,90, got {argv[0]!r}\n{usage}",
              file=sys.stderr)
        return 2
    if mode not in ("", "ones"):
        print(f"kernels._triton_utils: unknown mode {mode!r} after ':' (only 'ones')\n{usage}", file=sys.stderr)
        return 2
    rows = []
    for name in argv[1:]:
        specs = importlib.import_module(name).compile_specs()
        if mode == "ones":
            first = {}
            for spec in specs:  # one spec per kernel function is enough: the question is whether it compiles
                first.setdefault(id(spec.fn), spec)
            specs = [with_int_one(s, a) for s in first.values() for a, t in s.signature.items() if t in ("i32", "i64")]
        for spec in specs:
            for arch in archs:
                try:
                    row = aot_compile(spec, arch)
                except Exception as e:  # reported, and flagged by check_report's caller
                    row = {"name": spec.name, "arch": f"sm_{arch}", "error": f"{type(e).__name__}: {e}"}
                row["module"] = name
                rows.append(row)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
