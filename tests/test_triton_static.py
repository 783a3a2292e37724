"""Every Triton kernel also compiles, for a real GPU, with each integer argument equal to 1.

Triton's JIT turns an int argument of value 1 into a constexpr (C = 1, one row, a unit stride), which
changes what the kernel body may do with it (a constexpr has no `.to()`); Triton's interpreter keeps it
a plain number, so the CPU parity tests cannot catch such a kernel failing on a GPU at size 1 (this
happened to LayerNorm at C = 1). The zero-spill / shared-memory checks of the GPT-2-shape compiles live
in each kernel's own test file and in `python bench/run.py --static`.
"""
from kernels._triton_utils import static_report

MODULES = ["kernels.layernorm", "kernels.gelu", "kernels.attention", "kernels.adamw", "kernels.cross_entropy"]


def test_every_kernel_compiles_with_int_arguments_equal_to_one():
    rows = static_report(MODULES, archs=(90,), int_ones=True)
    assert len(rows) >= 20, f"expected a row per kernel and int argument, got {len(rows)}"
    failed = [f"{r['module']}: {r['name']}: {r['error'][:300]}" for r in rows if "error" in r]
    assert not failed, "\n".join(failed)
