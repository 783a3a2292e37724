"""The project's numerical rule (see ../shared/DESIGN.md): compare against float64, and allow a kernel
at most `factor` times the error that the reference op in the same dtype gets, plus a small atol.
"""
import torch


def max_err(x, ref64):
    return (x.double() - ref64.double()).abs().max().item() if x.numel() else 0.0


def assert_close(out, ref64, baseline, factor=2.0, atol=1e-6, name="output"):
    """out: the kernel's result; ref64: float64 truth; baseline: the reference op in out's dtype."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err, base = max_err(out, ref64), max_err(baseline, ref64)
    assert err <= factor * base + atol, f"{name}: max error {err:.3g} > {factor} x reference's {base:.3g} + {atol:g}"
    return err, base
