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


# ---- which implementation each spec really resolves to (mutation testing found these unpinned) -----------

def _triton_impls():
    """op -> the triton backend's implementation, named here independently of kernels._REGISTRY."""
    from kernels import adamw, attention, cross_entropy, gelu, layernorm

    return {"layer_norm": layernorm.layer_norm, "gelu": gelu.gelu, "attention": attention.attention,
            "cross_entropy": cross_entropy.cross_entropy,
            "linear_cross_entropy": cross_entropy.linear_cross_entropy, "AdamW": adamw.AdamW}


def test_default_spec_is_torch():
    ops = get_ops()
    assert set(ops.backends.values()) == {"torch"} and not ops.explicit
    assert ops.gelu is reference.gelu and ops.add_layer_norm is reference.add_layer_norm
    assert ops.attention_qkv is reference.attention_qkv


def test_triton_spec_is_triton_for_every_op():
    """"triton" must give triton's own function for every op (no op quietly mapped to the reference), and
    the companions from the same backend modules (add_layer_norm of layer_norm, attention_qkv of attention)."""
    from kernels import attention, layernorm

    ops, want = get_ops("triton"), _triton_impls()
    assert set(ops.backends.values()) == {"triton"}
    for op in kernels.OPS:
        assert getattr(ops, op) is want[op], op
        assert getattr(ops, op) is not getattr(reference, op), op
    assert ops.add_layer_norm is layernorm.add_layer_norm and ops.attention_qkv is attention.attention_qkv
    assert not ops.fused_classifier  # the default backend alone never asks for the fused classifier
    assert get_ops("triton,linear_cross_entropy=triton").fused_classifier


@pytest.mark.parametrize("op", kernels.OPS)
def test_an_override_changes_its_op_only(op):
    backends, explicit = kernels.parse_spec(f"torch,{op}=triton")
    assert explicit == {op}
    assert backends == {o: ("triton" if o == op else "torch") for o in kernels.OPS}
    backends, _ = kernels.parse_spec(f"triton,{op}=torch")
    assert backends == {o: ("torch" if o == op else "triton") for o in kernels.OPS}


def test_override_resolves_that_op_and_its_companion_only():
    from kernels import attention, layernorm

    want = _triton_impls()
    ops = get_ops("torch,gelu=triton")
    assert ops.gelu is want["gelu"] and ops.layer_norm is reference.layer_norm
    assert ops.add_layer_norm is reference.add_layer_norm and ops.attention_qkv is reference.attention_qkv
    ops = get_ops("torch,layer_norm=triton")
    assert ops.layer_norm is want["layer_norm"] and ops.add_layer_norm is layernorm.add_layer_norm
    assert ops.gelu is reference.gelu and ops.attention is reference.attention
    assert ops.attention_qkv is reference.attention_qkv
    ops = get_ops("torch,attention=triton")
    assert ops.attention is want["attention"] and ops.attention_qkv is attention.attention_qkv
    assert ops.add_layer_norm is reference.add_layer_norm


def test_spec_whitespace_is_ignored_names_are_exact():
    backends, explicit = kernels.parse_spec("  triton , gelu = torch ,attention= torch")
    assert backends == dict({o: "triton" for o in kernels.OPS}, gelu="torch", attention="torch")
    assert explicit == {"gelu", "attention"}
    for spec, needle in [("Torch", "unknown backend 'Torch'"), ("torch,GELU=triton", "unknown op 'GELU'"),
                         ("torch,gelu=TRITON", "unknown backend 'TRITON'")]:
        with pytest.raises(ValueError) as e:
            kernels.parse_spec(spec)
        assert needle in str(e.value), spec


def test_missing_linear_cross_entropy_is_an_error_only_when_named(monkeypatch):
    """A default backend without linear_cross_entropy is fine (the attribute raises when called); naming it
    in the spec raises BackendUnavailable up front. Any other missing op is an error either way."""
    monkeypatch.delitem(kernels._REGISTRY["linear_cross_entropy"], "triton")
    ops = get_ops("triton")
    assert ops.gelu is _triton_impls()["gelu"]
    with pytest.raises(BackendUnavailable, match="linear_cross_entropy=triton: op 'linear_cross_entropy' is not implemented"):
        ops.linear_cross_entropy(None, None, None)
    for spec in ("triton,linear_cross_entropy=triton", "torch,linear_cross_entropy=triton"):
        with pytest.raises(BackendUnavailable, match="linear_cross_entropy=triton"):
            get_ops(spec)
    monkeypatch.delitem(kernels._REGISTRY["gelu"], "triton")
    with pytest.raises(BackendUnavailable, match="gelu=triton: op 'gelu' is not implemented"):
        get_ops("triton")


def test_module_reasons_and_import_errors(monkeypatch, tmp_path):
    """A backend module's unavailable_reason() refuses it with that reason; a module that does not exist is
    'not implemented yet'; but a module that exists and fails to import (a missing dependency) raises its
    ImportError instead of being passed off as not implemented."""
    (tmp_path / "fake_refusing_backend.py").write_text(
        "def unavailable_reason():\n    return 'needs the flux capacitor'\ngelu = object()\n")
    (tmp_path / "fake_broken_backend.py").write_text("import no_such_dependency_xyz\ngelu = object()\n")
    (tmp_path / "fake_fine_backend.py").write_text("def unavailable_reason():\n    return None\ngelu = object()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    gelu = kernels._REGISTRY["gelu"]
    monkeypatch.setitem(gelu, "cuda", "fake_refusing_backend:gelu")
    with pytest.raises(BackendUnavailable, match="gelu=cuda: needs the flux capacitor"):
        get_ops("torch,gelu=cuda")
    monkeypatch.setitem(gelu, "cuda", "fake_fine_backend:gelu")
    import fake_fine_backend

    assert get_ops("torch,gelu=cuda").gelu is fake_fine_backend.gelu
    monkeypatch.setitem(gelu, "cuda", "fake_no_such_backend_module:gelu")
    with pytest.raises(BackendUnavailable, match="fake_no_such_backend_module does not exist"):
        get_ops("torch,gelu=cuda")
    monkeypatch.setitem(gelu, "cuda", "fake_broken_backend:gelu")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        get_ops("torch,gelu=cuda")
    ok, reason = kernels.available()["cuda"]["gelu"]
    assert not ok and "ModuleNotFoundError" in reason and "no_such_dependency_xyz" in reason
