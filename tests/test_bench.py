"""bench/: the results schema and --compare on fixture files, the static report's failure rule, the
interpreter IO audit of the memory-bound kernels, the CPU mode, and (GPU only) a short real run."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import io_audit, report, run, specs

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
A, B = FIXTURES / "bench_a.json", FIXTURES / "bench_b.json"


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


# ---- schema and --compare ----------------------------------------------------------------------

def test_fixtures_match_the_schema():
    for path in (A, B):
        assert report.validate(json.loads(path.read_text())) == [], path


@pytest.mark.parametrize("break_it, expect", [
    (lambda d: d.pop("schema"), "schema"),
    (lambda d: d["env"].pop("git_commit"), "env.git_commit missing"),
    (lambda d: d["limits"].update(copy_gbps=0), "limits.copy_gbps"),
    (lambda d: d["rows"][0].update(ms_p20=1.0), "ms_p20 <= ms"),
    (lambda d: d["rows"][0].pop("pct_of_limit"), "pct_of_limit missing"),
    (lambda d: d["rows"][7].pop("reason"), "without a reason"),
    (lambda d: d["rows"][1].update(status="skipped"), "not ok/unavailable/error"),
    (lambda d: d["e2e"][0].update(tokens_per_sec=float("nan")), "tokens_per_sec"),
])
def test_validate_rejects_broken_documents(break_it, expect):
    doc = json.loads(A.read_text())
    break_it(doc)
    problems = report.validate(doc)
    assert any(expect in p for p in problems), problems


def test_compare_flags_only_what_is_more_than_5_percent_slower_or_broken():
    text, flagged = report.compare(report.load(A), report.load(B))
    assert len(flagged) == 3, flagged
    assert any(f.startswith("layer_norm") and "1.10x" in f for f in flagged)  # 10% slower
    assert any(f.startswith("attention") and "error in B" for f in flagged)  # ran in A, broke in B
    assert any(f.startswith("e2e triton") for f in flagged)  # 13% fewer tokens/s
    assert not any(f.startswith("gelu") for f in flagged)  # 3% slower: within noise
    assert "SLOWER" in text and "BROKEN" in text
    _, same = report.compare(report.load(A), report.load(A))
    assert same == []


def test_compare_cli_exit_code(capsys):
    assert run.main(["--compare", str(A), str(B)]) == 1
    assert "3 flagged" in capsys.readouterr().out
    assert run.main(["--compare", str(A), str(A)]) == 0


def test_compare_refuses_a_file_that_is_not_a_result(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a bench result"):
        report.load(bad)


def test_markdown_and_plots(tmp_path):
    doc = report.load(A)
    md = report.markdown(doc)
    assert "NVIDIA H100" in md and "| fwd | triton | 0.020" in md and "eager 2.00x, compile 1.25x" in md
    assert "unavailable: RuntimeError: cuDNN" in md  # a provider that can't run is listed, not dropped
    paths = report.plots(doc, str(tmp_path / "r"))
    assert [Path(p).name for p in paths] == ["r_speedup.png", "r_roofline.png"]
    assert all(Path(p).stat().st_size > 1000 for p in paths)


def test_summarize_log_excludes_warmup(tmp_path):
    log = tmp_path / "log.jsonl"
    steps = [{"step": i, "loss": 10 - i, "tokens_per_sec": 10.0 if i <= 2 else 100.0 + i, "mfu": 0.1,
              "step_time_s": 1.0, "peak_mem_bytes": 1000 * i} for i in range(1, 8)]
    log.write_text("\n".join(json.dumps(s) for s in steps) + "\n")
    s = run.summarize_log(log, warmup=2)
    assert s["status"] == "ok" and s["steps_measured"] == 5
    assert s["tokens_per_sec"] == 105.0  # median of 103..107: the slow warm-up steps are out
    assert s["loss"] == 3 and s["peak_mem_bytes"] == 7000
    assert run.summarize_log(log, warmup=7)["status"] == "error"


# ---- specs -------------------------------------------------------------------------------------

def test_specs_floors():
    ln = next(b for b in specs.BENCHES if b.op == "layer_norm" and b.dtype == "bfloat16")
    assert specs.ideal_bytes(ln, "fwd") == 2 * 16384 * 768 * 2 + 2 * 768 * 4
    adamw = next(b for b in specs.BENCHES if b.op == "AdamW")
    # GPT-2 124M: 124,439,808 parameters + 47 padded vocab rows of 768.
    assert sum(torch.Size(s).numel() for s in specs.gpt2_param_shapes()) == adamw.shape["params"] == 124_439_808 + 47 * 768
    attn = next(b for b in specs.BENCHES if b.op == "attention")
    assert specs.flops(attn, "fwd") == 2 * 16 * 12 * 1024**2 * 64
    # the floor is the larger of the memory time and the compute time (here, q k v o at 3.35 TB/s)
    floor = max(specs.flops(attn, "fwd") / 989e12, specs.ideal_bytes(attn, "fwd") / 3.35e12)
    assert specs.floor_seconds(attn, "fwd", "H100 SXM") == pytest.approx(floor) == pytest.approx(4 * 16 * 12 * 1024 * 64 * 2 / 3.35e12)
    for b in specs.BENCHES:
        assert set(b.baselines) <= set(specs.BASELINES), b
        assert b.baselines and b.ours, b  # every op is timed against at least one baseline


# ---- --static ----------------------------------------------------------------------------------

ROW = {"name": "k", "arch": "sm_90", "registers": 64, "spill_bytes": 0, "shared_bytes": 1024,
       "shared_limit": 227 * 1024, "ld128": 4, "expect_ld128": True}


@pytest.mark.parametrize("change, fails, warns", [
    ({}, 0, 0),
    ({"spill_bytes": 8}, 1, 0),
    ({"shared_bytes": 228 * 1024}, 1, 0),
    ({"ld128": 0}, 0, 1),
    ({"error": "CompilationError: boom"}, 1, 0),
])
def test_static_rule(change, fails, warns):
    f, w = run.static_problems({**ROW, **change})
    assert (len(f), len(w)) == (fails, warns)


@pytest.mark.parametrize("row, code", [(ROW, 0), ({**ROW, "spill_bytes": 16}, 1), ({**ROW, "shared_bytes": 10**6}, 1)])
def test_static_exits_nonzero_on_a_spill(monkeypatch, capsys, row, code):
    """The real run_static, with the compiler replaced by a synthetic report row."""
    from kernels import _triton_utils

    monkeypatch.setattr(run, "triton_modules", lambda ops=None: (["kernels.fake"], [], ["kernels.notyet"]))
    monkeypatch.setattr(_triton_utils, "static_report", lambda modules, archs=(80, 90): [dict(row)])
    monkeypatch.setattr(run, "_cuda_rows", lambda: [])
    monkeypatch.setattr(io_audit, "audit", lambda names=None: [])
    args = run.parse_args(["--static"])
    assert run.run_static(args) == code
    out = capsys.readouterr().out
    assert "kernels.notyet" in out and "missing" in out  # missing modules are reported, not failures
    assert ("FAILED" in out) == bool(code)


@pytest.mark.skipif(importlib.util.find_spec("kernels.gelu") is None, reason="kernels/gelu.py not written yet")
def test_static_cli_on_one_module():
    """`python bench/run.py --static gelu` for real: AOT compile for sm_80/sm_90, IO audit, floors."""
    out = subprocess.run([sys.executable, "bench/run.py", "--static", "gelu"], cwd=ROOT, capture_output=True,
                         text=True, env=_env(), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "gelu_fwd" in out.stdout and "sm_80" in out.stdout and "sm_90" in out.stdout
    assert "| gelu fwd | 1.0" in out.stdout and "floor H100" in out.stdout


# ---- IO audit ----------------------------------------------------------------------------------

def test_io_audit_calibration():
    """The audit itself: a plain copy is exactly at its floor; re-reading the input shows in total/ideal only."""
    rows = {r["kernel"]: r for r in io_audit.audit(["calibration copy", "calibration double read"])}
    copy, twice = rows["calibration copy"], rows["calibration double read"]
    assert copy["status"] == twice["status"] == "ok"
    assert copy["unique_ratio"] == copy["total_ratio"] == 1.0
    assert twice["unique_ratio"] == 1.0 and twice["total_ratio"] == 1.5
    assert copy["per_tensor"]["x"] == {"read": 4000, "written": 0}
    assert copy["per_tensor"]["other"] == {"read": 0, "written": 0}


KERNEL_AUDITS = [n for n in io_audit.AUDITS if not n.startswith("calibration")]


@pytest.fixture(scope="module")
def audit_rows():
    present = [n for n in KERNEL_AUDITS if importlib.util.find_spec(io_audit.AUDITS[n][1]) is not None]
    return {r["kernel"]: r for r in io_audit.audit(present)} if present else {}


@pytest.mark.parametrize("name", KERNEL_AUDITS)
def test_io_audit_unique_bytes_at_the_floor(audit_rows, name):
    module = io_audit.AUDITS[name][1]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not written yet")
    row = audit_rows[name]
    assert row["status"] == "ok", row.get("reason")
    assert row["launches"], f"{name}: no Triton kernel ran (is the op really the Triton one?)"
    assert row["unique_ratio"] <= io_audit.LIMIT, (
        f"{name}: {row['unique_bytes']:,} distinct bytes moved vs a floor of {row['ideal_bytes']:,} "
        f"({row['unique_ratio']:.3f}x): a hidden intermediate buffer or an extra pass; per tensor: {row['per_tensor']}")


# ---- CPU mode and GPU runs ---------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode is what runs without a GPU")
def test_cpu_mode_notes_and_exits_zero(tmp_path):
    out = subprocess.run([sys.executable, "bench/run.py", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, env=_env(), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "GPU kernels were NOT timed" in out.stdout
    (path,) = tmp_path.glob("*_cpu.json")
    doc = json.loads(path.read_text())
    assert report.validate(doc) == []
    whats = " ".join(r["what"] for r in doc["cpu"])
    assert "cross_entropy" in whats and "data loader" in whats and "gpt2.train tiny" in whats


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_quick_run(tmp_path):
    out = subprocess.run([sys.executable, "bench/run.py", "--quick", "gelu", "layer_norm", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (path,) = tmp_path.glob("*_gpu.json")
    doc = report.load(path)
    ours = [r for r in doc["rows"] if r["provider"] == "triton"]
    assert ours and all(r["status"] == "ok" for r in ours), [r.get("reason") for r in ours]
    assert all(r["speedup"] for r in ours)
    assert len(list(tmp_path.glob("*.png"))) == 2
