"""kernels.get_ops: spec parsing, error paths, and no silent fallback."""
import subprocess
import sys

import pytest

import kernels
from kernels import BackendUnavailable, get_ops, reference


def test_torch_spec_is_reference():
    ops = get_ops("torch")
    assert ops.layer_norm is reference.layer_norm and ops.attention is reference.attention
    assert ops.AdamW is reference.AdamW
    assert all(b == "torch" for b in ops.backends.values())
    assert not ops.fused_classifier


def test_overrides_parse():
    backends, explicit = kernels.parse_spec("torch, attention=torch ,linear_cross_entropy=torch")
    assert backends["attention"] == "torch" and explicit == {"attention", "linear_cross_entropy"}
    assert get_ops("torch,linear_cross_entropy=torch").fused_classifier


@pytest.mark.parametrize("spec,needle", [
    ("tpu", "unknown backend 'tpu'; valid backends: torch, triton, cuda"),
    ("torch,softmax=triton", "unknown op 'softmax'; valid ops: layer_norm"),
    ("torch,gelu=jax", "unknown backend 'jax'"),
    ("gelu=triton", "must start with a default backend"),
    ("torch,gelu", "not of the form op=backend"),
    ("torch,gelu=torch,gelu=torch", "given twice"),
    ("", "non-empty"),
])
def test_bad_specs_raise_value_error(spec, needle):
    with pytest.raises(ValueError, match=None) as e:
        get_ops(spec)
    assert needle in str(e.value)


def test_unimplemented_op_raises_with_reason():
    with pytest.raises(BackendUnavailable, match="not implemented by backend 'cuda'"):
        get_ops("torch,layer_norm=cuda")


def test_triton_without_gpu_or_interpreter_raises():
    # A fresh interpreter without TRITON_INTERPRET and without a GPU: triton must be refused, not
    # silently replaced by torch.
    code = ("import torch, kernels\n"
            "if torch.cuda.is_available(): print('SKIP'); raise SystemExit\n"
            "try:\n    kernels.get_ops('torch,gelu=triton')\nexcept kernels.BackendUnavailable as e:\n    print('REFUSED', e)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("SKIP"):
        pytest.skip("a GPU is visible")
    assert "REFUSED" in out.stdout and "TRITON_INTERPRET=1" in out.stdout


@pytest.mark.parametrize("triton_version,numpy_version,refused", [
    ("3.6.0", "2.4.1", True), ("3.5.1", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.1", False),
    ("3.8.0+git1234", "2.10.0", False), ("3.6.0", "3.0.0", True),
])
def test_interpreter_numpy_incompatibility_is_named(monkeypatch, triton_version, numpy_version, refused):
    # Triton < 3.7's interpreter int()s 1-element arrays, an error since NumPy 2.4: get_ops must refuse
    # triton in interpreter mode with that reason instead of failing inside every kernel.
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = kernels.interpreter_incompatibility()
    assert bool(reason) == refused
    if refused:
        assert f"NumPy {numpy_version}" in reason and "numpy<2.4" in reason
        with pytest.raises(BackendUnavailable, match="fails with NumPy"):
            get_ops("torch,gelu=triton")


def test_available_table_covers_everything():
    table = kernels.available()
    assert set(table) == set(kernels.BACKENDS)
    for backend, ops in table.items():
        assert set(ops) == set(kernels.OPS)
        for op, (ok, reason) in ops.items():
            assert ok or reason, f"{backend}/{op} unavailable without a reason"
    assert all(ok for ok, _ in table["torch"].values())


def test_python_m_kernels_prints_table():
    out = subprocess.run([sys.executable, "-m", "kernels"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in ("[torch]", "[triton]", "[cuda]", "layer_norm", "AdamW"):
        assert name in out.stdout


def test_loss_row_checks_switch():
    """The trainer turns the fused losses' per-call read-back off; the setting is restorable and an
    invalid row then gives a NaN loss instead of an error."""
    import torch

    import kernels.linear_cross_entropy as lce

    previous = kernels.set_loss_row_checks(False)
    try:
        assert previous is True and lce.CHECK_ROWS is False
        lce.check_loss(torch.tensor(float("nan")), torch.tensor([0]), -1, 10, "test")  # no raise
    finally:
        kernels.set_loss_row_checks(previous)
    with pytest.raises(ValueError, match="all -inf"):
        lce.check_loss(torch.tensor(float("nan")), torch.tensor([0]), -1, 10, "test")
