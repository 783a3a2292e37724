"""bench/: the results schema and --compare on fixture files, the static report's failure rule, the
interpreter IO audit of the memory-bound kernels, the CPU mode, and (GPU only) a short real run."""
import argparse
import importlib.util
import json
import os
import contextlib
import subprocess
import sys
import time
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
    # what the docstring lists: peak memory, the timing basis, ours' speedups and their basis
    (lambda d: d["rows"][0].pop("peak_mem_bytes"), "peak_mem_bytes missing"),
    (lambda d: d["rows"][0].pop("timing_basis"), "timing_basis missing"),
    (lambda d: d["rows"][0].update(timing_basis="wall"), "timing_basis 'wall'"),
    (lambda d: d["rows"][2].pop("speedup"), "speedup missing (ours)"),
    (lambda d: d["rows"][2].pop("speedup_basis"), "speedup_basis missing (ours)"),
    (lambda d: d["rows"][2]["speedup_basis"].pop("eager"), "speedup_basis"),
    # nulls need a reason, and schema 3 (the fixtures are schema 2, which never wrote them)
    (lambda d: d["rows"][2].update(pct_of_limit=None), "pct_of_limit null without pct_reason (schema 3 only)"),
    (lambda d: d["rows"][2].update(speedup=None, speedup_basis=None, speedup_reason="x"),
     "speedup null without speedup_reason (schema 3 only)"),
    (lambda d: d.update(schema=report.SCHEMA) or d["rows"][2].update(gbps=None), "gbps null without pct_reason"),
])
def test_validate_rejects_broken_documents(break_it, expect):
    doc = json.loads(A.read_text())
    break_it(doc)
    problems = report.validate(doc)
    assert any(expect in p for p in problems), problems


def test_committed_results_still_validate():
    """Real results written by earlier versions (bench/results/, schema 2) load under today's checks."""
    paths = sorted((ROOT / "bench" / "results").glob("*.json"))
    assert paths
    for path in paths:
        assert report.validate(json.loads(path.read_text())) == [], path


def test_schema_1_needs_no_graph_fields_but_its_own():
    old = json.loads(A.read_text())
    old["schema"] = "gpt2-kernel-lab/bench/1"
    for r in old["rows"]:
        for k in ("timing_basis", "speedup_basis", "ms_graph", "ms_graph_p20", "ms_graph_p80", "graph", "graph_reason"):
            r.pop(k, None)
    assert report.validate(old) == []
    old["rows"][2].pop("speedup")  # schema 1 wrote speedup and peak_mem_bytes already
    assert any("speedup missing" in p for p in report.validate(old))


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


def test_compare_refuses_a_file_that_is_not_a_result(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a bench result"):
        report.load(bad)
    # the CLI: one error line and exit status 2 (1 means "something is slower"), no traceback
    for path, message in ((bad, "not a bench result"), (tmp_path / "missing.json", "No such file")):
        assert run.main(["--compare", str(path), str(A)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err


def test_validate_graph_fields():
    doc = json.loads(A.read_text())
    ok = doc["rows"][2]  # layer_norm fwd triton, graph-timed
    ok["ms_graph_p80"] = ok["ms_graph"] / 2
    assert any("ms_graph_p20 <= ms_graph <= ms_graph_p80" in p for p in report.validate(doc))
    doc = json.loads(A.read_text())
    for k in ("ms_graph", "ms_graph_p20", "ms_graph_p80"):
        doc["rows"][2].pop(k)
    assert any("neither ms_graph nor graph_reason" in p for p in report.validate(doc))
    doc["rows"][2]["graph_reason"] = "capture failed: x"
    doc["rows"][2]["timing_basis"] = "do_bench"
    assert report.validate(doc) == []
    # schema 1 files (before graph timings) still load: no ms_graph, no graph_reason
    old = json.loads(A.read_text())
    old["schema"] = "gpt2-kernel-lab/bench/1"
    for r in old["rows"]:
        for k in ("ms_graph", "ms_graph_p20", "ms_graph_p80", "graph", "graph_reason", "timing_basis"):
            r.pop(k, None)
    assert report.validate(old) == []


def test_compare_uses_graph_times_when_both_runs_have_them():
    a, b = report.load(A), report.load(B)
    ln_b = b["rows"][2]  # layer_norm fwd triton: 10% slower in do_bench's ms
    assert ln_b["provider"] == "triton" and ln_b["ms"] / a["rows"][2]["ms"] > 1.05
    ln_b.update(ms_graph=a["rows"][2]["ms_graph"], ms_graph_p20=a["rows"][2]["ms_graph_p20"],
                ms_graph_p80=a["rows"][2]["ms_graph_p80"])  # ... but the same on the device
    text, flagged = report.compare(a, b)
    assert not any(f.startswith("layer_norm") for f in flagged), flagged
    assert "| layer_norm | bf16 N=16384 C=768 | fwd | triton | graph |" in text
    assert "| gelu | bf16 N=16384 C=3072 | fwd | compile | do_bench |" in text  # no graph time in A or B
    for k in ("ms_graph", "ms_graph_p20", "ms_graph_p80"):
        ln_b.pop(k)  # one side without a graph time: both fall back to do_bench
    _, flagged = report.compare(a, b)
    assert any(f.startswith("layer_norm") and "do_bench" in f for f in flagged), flagged


def test_markdown_and_plots(tmp_path):
    doc = report.load(A)
    md = report.markdown(doc)
    assert "NVIDIA H100" in md and "| fwd | triton | 0.020" in md and "eager 2.00x, compile 1.25x" in md
    assert "ms_graph" in md and "| 0.012 [0.012, 0.012] |" in md  # layer_norm triton's graph time
    assert "compile 1.07x*" in md  # gelu: compile could not be captured, so that speedup is do_bench's
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


def test_summarize_log_leaves_out_the_profiled_steps_and_attaches_their_profile(tmp_path):
    log = tmp_path / "log.jsonl"
    steps = [{"step": i, "loss": 10 - i, "tokens_per_sec": 100.0 + i if i <= 5 else 1.0, "mfu": 0.1, "step_time_s": 1.0,
              "peak_mem_bytes": 1, **({"profiled": True} if i > 5 else {})} for i in range(1, 8)]
    log.write_text("\n".join(json.dumps(s) for s in steps) + "\n")
    s = run.summarize_log(log, warmup=2)
    assert s["steps_measured"] == 3 and s["tokens_per_sec"] == 104.0  # steps 3..5; the slow profiled 6, 7 are out
    assert s["steps"] == 7 and s["loss"] == 3 and "profile" not in s  # no profile.json next to the log
    (tmp_path / "profile.json").write_text(json.dumps({"steps": 2, "step_time_s": 1.5}))
    assert run.summarize_log(log, warmup=2)["profile"] == {"steps": 2, "step_time_s": 1.5}
    log.write_text("\n".join(json.dumps(s) for s in steps[:5]) + "\n")  # an older profile.json, no profiled step
    assert "profile" not in run.summarize_log(log, warmup=2)
    log.write_text("\n".join(json.dumps(s) for s in steps[:2] + steps[5:]) + "\n")
    assert run.summarize_log(log, warmup=2)["status"] == "error"  # only profiled steps after the warm-up


@pytest.mark.parametrize("profiled", [2, 0])
def test_train_run_adds_the_profiled_steps_after_the_timed_ones(monkeypatch, tmp_path, profiled):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        n = int(cmd[cmd.index("--max-steps") + 1])
        (out / "log.jsonl").write_text("".join(json.dumps(
            {"step": i, "loss": 1.0, "tokens_per_sec": 10.0, "mfu": None, "step_time_s": 1.0, "peak_mem_bytes": None,
             **({"profiled": True} if i > n - profiled else {})}) + "\n" for i in range(1, n + 1)))
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(run.subprocess, "run", fake_run)
    args = run.parse_args(["--e2e", "--e2e-steps", "6", "--e2e-warmup", "2", "--e2e-profile", str(profiled)])
    r = run.train_run("triton", ("--cuda-graph",), args, tmp_path / "r")
    cmd = seen["cmd"]
    assert cmd[cmd.index("--max-steps") + 1] == str(6 + profiled)
    assert ("--profile" in cmd) == bool(profiled) and cmd[-1] == "--cuda-graph"
    if profiled:
        assert cmd[cmd.index("--profile") + 1] == "2"
    assert r["status"] == "ok" and r["steps"] == 6 + profiled and r["steps_measured"] == 4


@pytest.mark.parametrize("logged, timeout, status", [(8, False, "ok"), (8, True, "ok"), (5, False, "error"), (5, True, "error")])
def test_a_run_that_fails_in_its_profiled_steps_keeps_its_timed_ones(monkeypatch, tmp_path, logged, timeout, status):
    """The profiler (CUPTI, CUDA graphs) failing or hanging after the timed steps costs the profile, not the run;
    failing before them is an error. The log's last line may be cut short by the kill."""
    def fake_run(cmd, **kw):
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        lines = [json.dumps({"step": i, "loss": 1.0, "tokens_per_sec": 10.0 * i, "mfu": None, "step_time_s": 1.0,
                             "peak_mem_bytes": None, **({"profiled": True} if i > 6 else {})}) for i in range(1, logged + 1)]
        (out / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "lo')
        if timeout:
            raise subprocess.TimeoutExpired(cmd, 5)
        return subprocess.CompletedProcess(cmd, -11, "", "Segmentation fault in libcupti")
    monkeypatch.setattr(run.subprocess, "run", fake_run)
    args = run.parse_args(["--e2e", "--e2e-steps", "6", "--e2e-warmup", "2"])
    r = run.train_run("triton", ("--cuda-graph",), args, tmp_path / "r")
    assert r["status"] == status
    if status == "ok":
        assert r["steps_measured"] == 4 and r["tokens_per_sec"] == 45.0 and "profile" not in r
        assert r["profile_error"].startswith("timed out after" if timeout else "exit -11: Segmentation fault in libcupti")
        md = report.e2e_markdown([{"name": "triton --cuda-graph", **r}])
        # the note shows the cause itself (it was once all prefix)
        assert ("| profiled steps failed: timed out after" if timeout else
                "| profiled steps failed: exit -11: Segmentation fault in libcupti |") in md
    else:
        assert ("timed out" if timeout else "exit -11") in r["reason"]
    args0 = run.parse_args(["--e2e", "--e2e-steps", "6", "--e2e-warmup", "2", "--e2e-profile", "0"])
    assert run.train_run("triton", (), args0, tmp_path / "r0")["status"] == "error"  # nothing was profiled: a failure


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU run of the trainer (a GPU machine times the real ones)")
def test_train_run_profiles_for_real_on_cpu(tmp_path):
    ns = argparse.Namespace(e2e_batch=2, e2e_seq=32, e2e_steps=2, e2e_warmup=1, e2e_profile=1, e2e_timeout=600,
                            data="shakespeare")
    r = run.train_run("torch", (), ns, tmp_path / "tiny", model="tiny")
    assert r["status"] == "ok", r.get("reason")
    assert r["steps"] == 3 and r["steps_measured"] == 1
    assert r["profile"]["steps"] == 1 and r["profile"]["device_busy_s"] is None and r["profile"]["host_top_ops"]
    md = report.e2e_markdown([{"name": "torch", **r}])
    assert "Where a step's time goes" in md and "| torch | " in md.split("Where a step's time goes")[1]


def test_e2e_markdown_breakdown_of_profiled_runs():
    prof = {"step_time_s": 0.040, "device_busy_s": 0.030, "device_idle_fraction": 0.25, "kernels_per_step": 812,
            "device_bound_tokens_per_sec": 546133.0, "device_bound_mfu": 0.4716,
            "categories": {"matmul": {"ms_per_step": 18.5}, "attention": {"ms_per_step": 4.75},
                           "layer_norm": {"ms_per_step": 2.5}, "copy/cast": {"ms_per_step": 0.75},
                           "fill": {"ms_per_step": 0.25}}}
    rows = [{"name": "torch", "status": "ok", "tokens_per_sec": 400000.0, "mfu": 0.35, "peak_mem_bytes": 2**30, "loss": 9.0,
             "profile": prof},
            {"name": "triton", "status": "ok", "tokens_per_sec": 300000.0, "mfu": 0.26, "peak_mem_bytes": None, "loss": 9.0},
            {"name": "cuda", "status": "unavailable", "reason": "no nvcc"}]
    md = report.e2e_markdown(rows)
    lines = md.split("Where a step's time goes")[1].splitlines()
    assert "| run | step ms | busy ms | GPU idle | device-bound tok/s | its MFU | kernels/step | matmul | attention |" in md
    (line,) = [x for x in lines if x.startswith("| torch |")]
    assert line == "| torch | 40.00 | 30.00 | 25% | 546,133 | 47.2% | 812 | 18.50 | 4.75 | 2.50 | - | - | - | - | 1.00 |"
    assert not any(x.startswith("| triton |") for x in lines)  # not profiled: no line
    assert "Where a step's time goes" not in report.e2e_markdown(rows[1:])


def test_speedup_plot_picks_the_strongest_baseline_on_our_timing_basis():
    doc = report.load(A)
    rows = {(r["op"], r["mode"], r["provider"]): r for r in doc["rows"]}
    ln, gelu = rows[("layer_norm", "fwd", "triton")], rows[("gelu", "fwd", "triton")]
    assert report.strongest_baseline(ln) == ("compile", 1.25, "graph", {})
    # gelu: compile (1.07x) could only be compared on do_bench: the bar is vs eager's graph time, and the
    # stronger-looking do_bench baseline is named next to it
    assert report.strongest_baseline(gelu) == ("eager", pytest.approx(1.5714, abs=1e-4), "graph", {"compile": pytest.approx(1.0714, abs=1e-4)})
    _, providers, value, note, hatched = report.speedup_bars(doc)
    assert providers == ["triton"] and not hatched
    assert value[("gelu bf16 N=16384 C=3072 fwd", "triton")] == pytest.approx(1.5714, abs=1e-4)
    assert note[("gelu bf16 N=16384 C=3072 fwd", "triton")] == "vs eager; compile: 1.07x on do_bench only"
    # no baseline on our basis: the strongest of the rest, marked (hatched, "(do_bench)")
    gelu["speedup_basis"]["eager"] = "do_bench"
    assert report.strongest_baseline(gelu)[:3] == ("compile", pytest.approx(1.0714, abs=1e-4), "do_bench")
    # ours without a graph time: all its comparisons are do_bench's
    for k in ("ms_graph", "ms_graph_p20", "ms_graph_p80"):
        ln.pop(k)
    ln.update(timing_basis="do_bench", graph_reason="capture failed", speedup_basis={"eager": "do_bench", "compile": "do_bench"})
    _, _, value, note, hatched = report.speedup_bars(doc)
    assert hatched == {("layer_norm bf16 N=16384 C=768 fwd", "triton"), ("gelu bf16 N=16384 C=3072 fwd", "triton")}
    assert note[("layer_norm bf16 N=16384 C=768 fwd", "triton")] == "vs compile (do_bench)"


def _fused_loss_doc():
    """Fixture A (as schema 3) plus the rows run_gpu makes for a fused loss: eager as the baseline, ours
    computes the gradient in its forward (times shaped like the H100 cross_entropy run)."""
    doc = json.loads(A.read_text())
    doc["schema"] = report.SCHEMA
    b = specs.Bench("cross_entropy", {"N": 16384, "V": 50304}, baselines=("eager",), ours=("triton",),
                    extra={"vocab_size": 50257}, grad_in_fwd=("triton",))
    for mode, base_ms, ours_ms in (("fwd", 7.0, 1.9), ("bwd", 9.6, 0.5), ("fwd+bwd", 16.6, 2.7)):
        group = []
        for name, ms in (("eager", base_ms), ("triton", ours_ms)):
            res = {"peak_mem_bytes": 2**20, "ms": 1.1 * ms, "ms_p20": ms, "ms_p80": 1.2 * ms, "ms_graph": ms,
                   "ms_graph_p20": 0.99 * ms, "ms_graph_p80": 1.01 * ms, "graph": {"calls": 4, "input_sets": 1, "replays": 10}}
            group.append({"op": b.op, "variant": b.variant, "mode": mode, "provider": name,
                          "role": "ours" if name == "triton" else "baseline", **run._metrics(b, mode, res, LIMITS, name)})
        run._speedups(group, b)
        doc["rows"] += group
    return doc


def test_fused_loss_fwd_and_bwd_rows_are_timed_but_not_compared(tmp_path):
    doc = _fused_loss_doc()
    assert report.validate(doc) == []
    rows = {(r["op"], r["mode"], r["provider"]): r for r in doc["rows"]}
    for mode in ("fwd", "bwd"):
        ours, eager = rows[("cross_entropy", mode, "triton")], rows[("cross_entropy", mode, "eager")]
        assert ours["ms_graph"] > 0 and ours["bytes"] == specs.ideal_bytes(specs.Bench("cross_entropy", {"N": 16384, "V": 50304}), mode)
        assert ours["pct_of_limit"] is ours["gbps"] is ours["tflops"] is ours["speedup"] is ours["speedup_basis"] is None
        assert "gradient in its forward" in ours["pct_reason"] and "fwd+bwd" in ours["speedup_reason"]
        assert eager["pct_of_limit"] > 0  # a baseline's split is the usual one: its rates stand
    fused = rows[("cross_entropy", "fwd+bwd", "triton")]
    assert fused["speedup"] == {"eager": pytest.approx(16.6 / 2.7)} and fused["pct_of_limit"] > 0
    md = report.markdown(doc)
    assert "| bwd | triton | 0.550 [0.500, 0.600] | 0.500 [0.495, 0.505] | n/a | n/a | n/a | 1 | n/a |" in md
    assert "n/a: not comparable: this provider computes the gradient in its forward" in md
    # the plots: only fwd+bwd for the op (its fwd and bwd would show 19x "speedups" and >100% of the limit)
    labels, *_ = report.speedup_bars(doc)
    ce = [lab for lab in labels if lab.startswith("cross_entropy")]
    assert ce == ["cross_entropy bf16 N=16384 V=50304 fwd+bwd"]
    labels, _, _ = report.roofline_bars(doc)
    assert [lab for lab in labels if lab.startswith("cross_entropy")] == ce
    assert "layer_norm bf16 N=16384 C=768 fwd" in labels  # other ops untouched
    assert len(report.plots(doc, str(tmp_path / "r"))) == 2
    # a null without its reason is refused
    rows[("cross_entropy", "fwd", "triton")].pop("pct_reason")
    assert any("null without pct_reason" in p for p in report.validate(doc))


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
        assert set(b.grad_in_fwd) <= set(b.providers), b
    keys = [(b.op, b.variant) for b in specs.BENCHES]
    assert len(keys) == len(set(keys)), keys  # rows of two benches never share (op, variant)
    assert specs.CARDS["A100 SXM 80GB"]["bytes_per_s"] == 2.039e12 and "A100 SXM" not in specs.CARDS
    for op in ("cross_entropy", "linear_cross_entropy"):  # the fused losses: only fwd+bwd compares
        assert next(b for b in specs.BENCHES if b.op == op).grad_in_fwd == ("triton", "cuda")


def test_layer_norm_fp32_in_bf16_out_variant():
    """The model's ln_1 under autocast: fp32 x, bf16 y (out_dtype), so dy is bf16 too; dx stays fp32."""
    (b,) = [b for b in specs.BENCHES if b.op == "layer_norm" and b.out_dtype]
    assert (b.dtype, b.out_dtype, b.variant) == ("float32", "bfloat16", "fp32->bf16 N=16384 C=768")
    n, c = 16384 * 768, 768
    assert specs.ideal_bytes(b, "fwd") == n * (4 + 2) + 2 * c * 4  # x -> y
    assert specs.ideal_bytes(b, "bwd") == n * (2 + 4 + 4) + 3 * c * 4  # dy, x -> dx; w -> dw, db
    assert not b.quick and [x.variant for x in specs.selected({"layer_norm"}, quick=True)] == ["bf16 N=16384 C=768"]
    tiny = specs.Bench("layer_norm", {"N": 3, "C": 8}, "float32", out_dtype="bfloat16")
    args, kwargs, _ = specs.make_inputs(tiny, "cpu")
    assert args[0].dtype == torch.float32 and kwargs == {"out_dtype": torch.bfloat16}
    assert specs.BASELINES["eager"][1]("layer_norm")(*args, **kwargs).dtype == torch.bfloat16


def test_baselines_can_be_graph_timed(monkeypatch):
    """torch.compile baselines without donated buffers (a backward with retain_graph=True, as time_graph's
    bwd capture, is refused otherwise), AdamW baselines capturable (CUDA-graph capture refuses the rest)."""
    import functools

    import torch._functorch.config as functorch_config

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))  # fast
    # config.patch, not monkeypatch: torch 2.11's config module loses the entry on monkeypatch's undo
    with functorch_config.patch(donated_buffer=True):  # restored on exit
        b = specs.Bench("layer_norm", {"N": 4, "C": 8}, "float32")
        fn = run.build_provider(b, "compile")
        forward, dy, _ = run._prepare(b, fn, "cpu")  # the first backward, without retain_graph
        run._backward(forward(), dy, retain_graph=True)
        assert functorch_config.donated_buffer is False
    for name in ("foreach", "fused"):
        opt = run.build_provider(specs.Bench("AdamW", {"params": 8}, "float32"), name)([torch.zeros(8)], lr=1e-3)
        assert opt.defaults["capturable"] is True and opt.defaults[name] is True


# ---- --static ----------------------------------------------------------------------------------

ROW = {"name": "k", "arch": "sm_90", "registers": 64, "spill_bytes": 0, "shared_bytes": 1024,
       "shared_limit": 227 * 1024, "ld128": 4, "expect_ld128": True}


@pytest.mark.parametrize("change, fails, warns", [
    ({}, 0, 0),
    ({"spill_bytes": 8}, 1, 0),
    ({"shared_bytes": 228 * 1024}, 1, 0),
    ({"ld128": 0}, 0, 1),
    ({"error": "CompilationError: boom"}, 1, 0),
    ({"expect_mma": "wgmma", "wgmma": 16}, 0, 0),
    ({"expect_mma": "wgmma", "mma_sync": 48}, 1, 0),  # a matmul kernel on Ampere's path on an H100
    ({"expect_mma": "tensor_cores", "mma_sync": 48}, 0, 0),
    ({"expect_mma": "tensor_cores"}, 1, 0),  # tl.dot as FMA
    ({"expect_mma": "tensor_cores", "wgmma": 16}, 0, 0),  # wgmma alone is a tensor-core path too
    ({"mma_sync": 0, "wgmma": 0}, 0, 0),  # no rule: not a matmul kernel
])
def test_static_rule(change, fails, warns):
    f, w = run.static_problems({**ROW, **change})
    assert (len(f), len(w)) == (fails, warns)


@pytest.mark.parametrize("row, code", [(ROW, 0), ({**ROW, "spill_bytes": 16}, 1), ({**ROW, "shared_bytes": 10**6}, 1),
                                       ({**ROW, "expect_mma": "wgmma", "mma_sync": 8}, 1)])
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


# ---- the GPU pipeline on a CPU stand-in --------------------------------------------------------

class CpuClock:
    """run.CudaClock's methods on the CPU (perf_counter for events; a "graph" is the Python body, run
    once under `capturing` at capture and again at each replay), to run run_gpu without a GPU."""
    device = "cpu"
    l2_bytes = 4096  # tiny: the 7 x 32 fp32 inputs below "fit in L2", so graphs rotate input copies

    def __init__(self):
        self.capturing = False

    def sync(self):
        pass

    def interval(self):
        t = {}
        return (lambda: t.setdefault("s", time.perf_counter()), lambda: t.setdefault("e", time.perf_counter()),
                lambda: 1e3 * (t["e"] - t["s"]))

    def flush_l2(self):
        pass

    def do_bench(self, fn, rep, grad_to_none):
        times = []
        while len(times) < 3 or sum(times) < rep:
            for t in grad_to_none or []:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return run._quantiles(times)

    def side_stream(self):
        return None

    def on(self, stream):
        return contextlib.nullcontext()

    def capture(self, body, stream):
        self.capturing = True
        try:
            body()
        except Exception as e:
            raise run.GraphUnavailable(f"capture failed: {type(e).__name__}: {e}") from e
        finally:
            self.capturing = False
        return body

    def memory_allocated(self):
        return 0

    def reset_peak(self):
        pass

    def max_memory_allocated(self):
        return 0

    def free_bytes(self):
        return 2**30

    def empty_cache(self):
        pass


LIMITS = {"copy_gbps": 100.0, "matmul_tflops": 1.0, "how": "test"}


@pytest.fixture
def fake_gpu(monkeypatch):
    """run_gpu on the CPU: tiny layer_norm / gelu benches, eager vs our triton (interpreter), and a
    baseline that syncs the host (as an op that reads a loss with .item()): it cannot be captured.
    CPU test runs only: our Triton kernels take CPU tensors in Triton's interpreter alone, which a GPU machine
    does not use (there test_gpu_quick_run runs the real pipeline)."""
    if torch.cuda.is_available():
        pytest.skip("runs our Triton kernels on CPU tensors: Triton's interpreter, which CPU-only runs use")
    clock = CpuClock()

    def syncing(op):
        from kernels import reference

        def f(*args, **kwargs):
            if clock.capturing:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
            return getattr(reference, op)(*args, **kwargs)
        return f
    monkeypatch.setitem(specs.BASELINES, "syncs", ("test: syncs the host", syncing))
    monkeypatch.setattr(specs, "BENCHES", [
        specs.Bench("layer_norm", {"N": 7, "C": 32}, "float32", baselines=("eager", "syncs"), quick=True),
        specs.Bench("gelu", {"N": 5, "C": 24}, "float32", modes=("fwd+bwd",), baselines=("eager",), quick=True)])
    monkeypatch.setattr(run, "GRAPH_TARGET_MS", 1e-3)  # one call per graph (rounded up to the input copies)
    monkeypatch.setattr(run, "GRAPH_MIN_REPLAYS", 2)
    return clock


def test_gpu_pipeline_with_graph_timings(fake_gpu, tmp_path, capsys):
    args = run.parse_args(["--quick", "--rep", "1", "--out", str(tmp_path)])
    assert run.run_gpu(args, clock=fake_gpu, limits=LIMITS) == 0
    (path,) = tmp_path.glob("*_gpu.json")
    doc = report.load(path)  # validates the schema
    rows = {(r["op"], r["mode"], r["provider"]): r for r in doc["rows"]}
    assert len(rows) == 3 * 3 + 2  # every provider and mode is a row
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("reason") for r in rows.values()]
    for mode in ("fwd", "bwd", "fwd+bwd"):
        ours, eager, syncs = (rows[("layer_norm", mode, p)] for p in ("triton", "eager", "syncs"))
        for r in (ours, eager):
            assert r["timing_basis"] == "graph" and r["ms_graph_p20"] <= r["ms_graph"] <= r["ms_graph_p80"]
            k = r["graph"]["input_sets"]
            assert k == (4 if mode == "fwd" else 2) and r["graph"]["calls"] % k == 0
            assert r["gbps"] == pytest.approx(r["bytes"] / r["ms_graph"] / 1e6)  # the roofline uses the graph time
        assert ours["speedup"]["eager"] == pytest.approx(eager["ms_graph"] / ours["ms_graph"])
        if mode == "bwd":  # its forwards run before capture: the backwards alone capture fine
            assert syncs["timing_basis"] == "graph" and ours["speedup_basis"]["syncs"] == "graph"
            continue
        # the syncing baseline keeps its do_bench row, says why it has no graph time
        assert "ms_graph" not in syncs and "capture failed" in syncs["graph_reason"]
        assert "operation not permitted when stream is capturing" in syncs["graph_reason"]
        assert syncs["timing_basis"] == "do_bench" and syncs["gbps"] == pytest.approx(syncs["bytes"] / syncs["ms"] / 1e6)
        assert ours["speedup_basis"] == {"eager": "graph", "syncs": "do_bench"}
        assert ours["speedup"]["syncs"] == pytest.approx(syncs["ms"] / ours["ms"])
    gelu = rows[("gelu", "fwd+bwd", "triton")]
    assert gelu["timing_basis"] == "graph" and gelu["graph"]["input_sets"] == 4
    assert doc["settings"]["graphs"] and "ms_graph" in doc["settings"]["timing"]
    out = capsys.readouterr().out
    assert "| ms (do_bench) | ms_graph |" in out and "- capture failed" in out
    text, flagged = report.compare(doc, doc)
    assert flagged == [] and "| graph |" in text
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_gpu_pipeline_without_graphs(fake_gpu, tmp_path):
    args = run.parse_args(["gelu", "--quick", "--rep", "1", "--no-graphs", "--out", str(tmp_path)])
    assert run.run_gpu(args, clock=fake_gpu, limits=LIMITS) == 0
    (path,) = tmp_path.glob("*_gpu.json")
    rows = report.load(path)["rows"]
    assert len(rows) == 2 and all(r["timing_basis"] == "do_bench" and "--no-graphs" in r["graph_reason"] for r in rows)


class MemClock(CpuClock):
    """Logs when the peak is reset and read, to see what the peak_mem_bytes measurement covers."""
    def __init__(self, log):
        super().__init__()
        self.log = log

    def reset_peak(self):
        self.log.append("reset")

    def max_memory_allocated(self):
        self.log.append("peak")
        return 0


@pytest.mark.parametrize("mode, measured", [("fwd", ["fwd"]), ("bwd", ["bwd"]), ("fwd+bwd", ["fwd", "bwd"])])
def test_peak_mem_of_a_bwd_row_is_the_backward_alone(mode, measured):
    log = []

    class Logged(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            log.append("fwd")
            return 2 * x

        @staticmethod
        def backward(ctx, g):
            log.append("bwd")
            return 2 * g
    b = specs.Bench("gelu", {"N": 2, "C": 4}, "float32")
    run.time_row(b, mode, Logged.apply, 1, MemClock(log), graphs=False)
    start = log.index("reset")
    assert log[start + 1:log.index("peak")] == measured
    if mode == "bwd":
        assert log[start - 1] == "fwd"  # the forward ran just before, outside the measurement


def test_gpu_pipeline_fused_loss_rows(fake_gpu, tmp_path, monkeypatch, capsys):
    """run_gpu end to end for a provider that computes the gradient in its forward (here: our GELU
    declared so): its fwd and bwd rows keep their times, with null rates and speedups and a reason."""
    monkeypatch.setattr(specs, "BENCHES", [
        specs.Bench("gelu", {"N": 5, "C": 24}, "float32", baselines=("eager",), quick=True, grad_in_fwd=("triton",))])
    assert run.run_gpu(run.parse_args(["--quick", "--rep", "1", "--out", str(tmp_path)]), clock=fake_gpu, limits=LIMITS) == 0
    doc = report.load(next(tmp_path.glob("*_gpu.json")))
    rows = {(r["mode"], r["provider"]): r for r in doc["rows"]}
    for mode in ("fwd", "bwd"):
        r = rows[(mode, "triton")]
        assert r["ms_graph"] > 0 and r["pct_of_limit"] is None and r["speedup"] is None
        assert r["pct_reason"] and r["speedup_reason"] and rows[(mode, "eager")]["pct_of_limit"] > 0
    assert rows[("fwd+bwd", "triton")]["speedup"]["eager"] > 0
    assert "n/a" in capsys.readouterr().out
    assert doc["settings"]["peak_mem"].startswith("peak_mem_bytes")


def test_input_sets_rotate_only_what_fits_in_l2():
    ln = next(b for b in specs.BENCHES if b.op == "layer_norm" and b.dtype == "bfloat16")
    ce = next(b for b in specs.BENCHES if b.op == "cross_entropy")
    l2 = 50 * 2**20
    assert run.input_sets(ln, "fwd", l2) == 3  # 50 MB moved per call: 2 x L2 = 105 MB between reuses
    assert run.input_sets(ln, "bwd", l2) == 1  # fwd+bwd's bytes: 126 MB between reuses already
    assert run.input_sets(ce, "fwd+bwd", l2) == 1  # 3.3 GB of logits
    tiny = specs.Bench("gelu", {"N": 1, "C": 8}, "float32")
    assert run.input_sets(tiny, "fwd", l2) == run.MAX_INPUT_SETS


# ---- --e2e: selection and incremental results ---------------------------------------------------

def test_e2e_selection():
    names = lambda argv: [n for n, _, _ in run.e2e_selected(run.parse_args(["--e2e", *argv]))]  # noqa: E731
    assert names(["--quick"]) == ["torch", "triton", "triton,cross_entropy=cuda", "torch --cuda-graph",
                                  "triton,cross_entropy=cuda --cuda-graph"]
    assert names(["--e2e-filter", "^triton"]) == ["triton", "triton,cross_entropy=cuda", "triton --compile",
                                                   "triton,cross_entropy=cuda --compile",
                                                   "triton,cross_entropy=cuda --cuda-graph",
                                                   "triton,cross_entropy=cuda --compile --compile-mode reduce-overhead"]
    assert names(["--quick", "--e2e-filter", "cuda"]) == ["triton,cross_entropy=cuda", "torch --cuda-graph",
                                                          "triton,cross_entropy=cuda --cuda-graph"]
    assert "torch,layer_norm=triton" in names([])
    args = run.parse_args(["--e2e"])
    assert (args.e2e_steps, args.e2e_warmup, args.e2e_batch * args.e2e_seq) == (15, 5, 16384)


def test_e2e_writes_its_json_after_every_run(monkeypatch, tmp_path, capsys):
    import kernels

    def get_ops(spec):
        if "cuda" in spec:
            raise kernels.BackendUnavailable("cross_entropy=cuda: no nvcc (test)")
        return object()
    monkeypatch.setattr(kernels, "get_ops", get_ops)
    seen = []

    def runner(spec, compiled, args, out):
        files = list(tmp_path.glob("*_e2e.json"))
        seen.append([r["name"] for r in json.loads(files[0].read_text())["e2e"]] if files else None)
        if spec == "triton":
            raise subprocess.TimeoutExpired("train", 1)  # a bug in the runner: recorded, later runs go on
        return {"status": "ok", "tokens_per_sec": 1000.0, "mfu": 0.1, "peak_mem_bytes": 1, "loss": 9.0,
                "steps": 15, "steps_measured": 10, "step_time_s": 1.0}
    args = run.parse_args(["--e2e", "--out", str(tmp_path), "--e2e-filter", "^(torch|triton)$|cross_entropy=cuda$"])
    assert run.run_e2e(args, runner=runner) == 0
    assert seen == [None, ["torch"]]  # the file existed, with the finished runs, before the next one started
    (path,) = tmp_path.glob("*_e2e.json")
    doc = report.load(path)
    assert [(r["name"], r["status"]) for r in doc["e2e"]] == [
        ("torch", "ok"), ("triton", "error"), ("triton,cross_entropy=cuda", "unavailable"),
        ("torch,cross_entropy=cuda", "unavailable"), ("torch,linear_cross_entropy=cuda", "unavailable")]
    assert doc["settings"]["completed"] == 5 and doc["settings"]["planned"][0] == "torch"
    assert doc["settings"]["profiled_steps"] == 2 and "then 2 profiled step(s) (not timed)" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.tmp"))
    assert run.run_e2e(run.parse_args(["--e2e", "--e2e-filter", "nothing-matches"]), runner=runner) == 2


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
    host = [r for r in doc["cpu"] if r["what"].startswith("host time")]
    assert {r["provider"] for r in host} == {"fast_path", "custom_op", "torch_backend"}, host
    assert all(r["status"] == "ok" and r["host_us"] > 0 for r in host), host


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
    # device-only times: our LayerNorm / GELU capture in a CUDA graph (no host sync), and the roofline uses them
    assert all("ms_graph" in r and r["timing_basis"] == "graph" for r in ours), [r.get("graph_reason") for r in ours]
    assert all(r["ms_graph"] <= 1.1 * r["ms"] for r in ours), [(r["mode"], r["ms"], r["ms_graph"]) for r in ours]
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_decode_rows_cpu_tiny():
    """Decode throughput (issue 8's benchmark) runs on a CPU and reports a number per batch size."""
    rows = run.decode_rows("cpu", quick=True, models=("tiny",))
    assert [r["batch"] for r in rows] == [1, 16]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["tokens_per_sec"] > 0


def test_compare_flags_rows_and_e2e_runs_missing_from_b():
    a = json.loads(A.read_text())
    b = json.loads(A.read_text())
    dropped = next(r for r in b["rows"] if r["status"] == "ok")
    b["rows"].remove(dropped)
    a["e2e"] = [{"name": "triton", "status": "ok", "tokens_per_sec": 1000.0, "loss": 6.5}]
    b["e2e"] = []
    text, flagged = report.compare(a, b)
    assert any("missing from B" in f and dropped["provider"] in f for f in flagged), flagged
    assert any(f.startswith("e2e triton: ran in A, missing from B") for f in flagged), flagged


def test_gpu_pipeline_times_a_two_output_op(fake_gpu, tmp_path, monkeypatch):
    """add_layer_norm returns (s, y): every mode (fwd, bwd alone, fwd+bwd) with do_bench and CUDA-graph
    timings runs backward through both outputs; ours comes from layer_norm's backend."""
    monkeypatch.setattr(specs, "BENCHES", [
        specs.Bench("add_layer_norm", {"N": 7, "C": 32}, "bfloat16", baselines=("eager", "triton_unfused"), quick=True)])
    args = run.parse_args(["--quick", "--rep", "1", "--out", str(tmp_path)])
    assert run.run_gpu(args, clock=fake_gpu, limits=LIMITS) == 0
    doc = report.load(next(tmp_path.glob("*_gpu.json")))
    rows = {(r["mode"], r["provider"]): r for r in doc["rows"]}
    assert len(rows) == 3 * 3
    assert all(r["status"] == "ok" and r["timing_basis"] == "graph" for r in rows.values()), \
        [(k, r.get("reason"), r.get("graph_reason")) for k, r in rows.items()]
    fwd_bytes = 7 * 32 * (4 + 2 + 4 + 2) + 2 * 32 * 4  # x fp32, r bf16 -> s fp32, y bf16 (out_dtype); fp32 w, b
    assert rows[("fwd", "triton")]["bytes"] == specs.ideal_bytes(specs.BENCHES[0], "fwd") == fwd_bytes


# ---- mutation-testing gaps: what the tests above let through -------------------------------------

def test_compare_edge_cases():
    """--compare's documented rules at their edges: exactly 5% slower is not flagged (more than 5% is), a
    row that did not run in A is not flagged when B lacks it, an e2e run that broke in B is, and
    results from different cards are noted."""
    a, b = report.load(A), report.load(B)
    ga = next(r for r in a["rows"] if r["op"] == "gelu" and r["provider"] == "compile")  # no ms_graph: do_bench ms
    gb = next(r for r in b["rows"] if r["op"] == "gelu" and r["provider"] == "compile")
    ga.update(ms=1.0, ms_p20=1.0, ms_p80=1.0)
    gb.update(ms=1.05, ms_p20=1.05, ms_p80=1.05)  # 1.05 / 1.0 == report.SLOWER exactly
    text, flagged = report.compare(a, b)
    assert not any(f.startswith("gelu") for f in flagged), flagged
    assert "| gelu | bf16 N=16384 C=3072 | fwd | compile | do_bench | 1.000 | 1.050 | 1.05 |  |" in text
    assert "different cards" not in text
    gb.update(ms=1.06, ms_p20=1.06, ms_p80=1.06)
    _, flagged = report.compare(a, b)
    assert any(f.startswith("gelu bf16 N=16384 C=3072 fwd compile: 1.06x") for f in flagged), flagged
    # sdpa_cudnn was unavailable in A: gone from B is not a regression
    b["rows"] = [r for r in b["rows"] if r["provider"] != "sdpa_cudnn"]
    text, flagged = report.compare(a, b)
    assert not any("sdpa_cudnn" in f for f in flagged), flagged
    assert "| attention | bf16 B=16 H=12 T=1024 D=64 | fwd | sdpa_cudnn | | unavailable | - | | only in A |" in text
    # an e2e run that ran in A and failed in B
    b["e2e"][1] = {**b["e2e"][1], "status": "error", "reason": "exit 1: boom"}
    b["env"]["gpu"] = "NVIDIA A100-SXM4-80GB"
    text, flagged = report.compare(a, b)
    assert "e2e triton: ran in A, error in B" in flagged, flagged
    assert "| triton | 150,000 | error | | | | BROKEN |" in text
    assert "note: different cards (NVIDIA H100 80GB HBM3 vs NVIDIA A100-SXM4-80GB)" in text


def test_pct_of_limit_is_against_the_bound_s_own_limit():
    """_metrics: GB/s from the ideal bytes, TFLOP/s from the ideal FLOPs, both over the graph time when
    there is one; % of limit = TFLOP/s over the measured matmul limit for a compute-bound op, GB/s over
    the copy bandwidth for a memory-bound one."""
    limits = {"copy_gbps": 2000.0, "matmul_tflops": 500.0}
    attn = specs.Bench("attention", {"B": 2, "H": 3, "T": 64, "D": 16}, bound="compute")
    res = {"ms": 0.5, "ms_p20": 0.4, "ms_p80": 0.6, "ms_graph": 0.25, "ms_graph_p20": 0.2, "ms_graph_p80": 0.3}
    r = run._metrics(attn, "fwd", dict(res), limits, "triton")
    nbytes, nflops = 4 * 2 * 3 * 64 * 16 * 2, 2 * 2 * 2 * 3 * 64 * 64 * 16 / 2
    assert (r["bytes"], r["flops"], r["timing_basis"], r["bound"]) == (nbytes, nflops, "graph", "compute")
    assert r["gbps"] == pytest.approx(nbytes / 0.25e-3 / 1e9) and r["tflops"] == pytest.approx(nflops / 0.25e-3 / 1e12)
    assert r["pct_of_limit"] == pytest.approx(100 * r["tflops"] / 500.0)
    gelu = specs.Bench("gelu", {"N": 4, "C": 8}, "float32")
    no_graph = {k: v for k, v in res.items() if not k.startswith("ms_graph")}
    r = run._metrics(gelu, "fwd", no_graph, limits, "triton")
    assert r["timing_basis"] == "do_bench" and r["flops"] == 0 and r["tflops"] == 0
    assert r["gbps"] == pytest.approx(2 * 4 * 8 * 4 / 0.5e-3 / 1e9)
    assert r["pct_of_limit"] == pytest.approx(100 * r["gbps"] / 2000.0)


def test_markdown_columns_and_roofline_values():
    """The table's GB/s, TFLOP/s and % limit columns, the e2e table's "vs torch" (B's tokens/s over
    torch's), and the roofline plot's fractions (pct_of_limit / 100)."""
    doc = report.load(A)
    md = report.markdown(doc)
    assert ("| fwd | triton | 0.020 [0.020, 0.021] | 0.012 [0.012, 0.012] | 4194 | - | 140% | 48 "
            "| eager 2.00x, compile 1.25x |") in md
    assert "| 2684* | - | 89%* | 192 |" in md  # gelu compile: do_bench-based rates are starred
    assert ("| fwd | triton | 0.085 [0.083, 0.088] | 0.081 [0.079, 0.082] | 1247 | 319.1 | 46% | 96 "
            "| sdpa_flash 0.94x |") in md  # attention: compute-bound, % of the matmul limit
    assert "| triton | 150,000 | 1.50x | 45.0% | 23.28 | 9.1240 | |" in md
    _, providers, frac = report.roofline_bars(doc)
    assert providers == ["eager", "compile", "triton", "sdpa_flash"]
    assert frac[("layer_norm bf16 N=16384 C=768 fwd", "triton")] == pytest.approx(1.3981, abs=1e-4)
    assert frac[("attention bf16 B=16 H=12 T=1024 D=64 fwd", "triton")] == pytest.approx(0.4559, abs=1e-4)


@pytest.mark.parametrize("break_it, expect", [
    (lambda d: d.update(schema="gpt2-kernel-lab/bench/4"), "schema is 'gpt2-kernel-lab/bench/4'"),
    # schema 2 never wrote null rates, with or without a reason
    (lambda d: d["rows"][2].update(pct_of_limit=None, pct_reason="x"), "pct_of_limit null without pct_reason (schema 3 only)"),
])
def test_validate_rejects_what_only_later_schemas_allow(break_it, expect):
    doc = json.loads(A.read_text())
    break_it(doc)
    assert any(expect in p for p in report.validate(doc)), report.validate(doc)


def _floor(**per_tensor_bytes):
    return sum(per_tensor_bytes.values())


def test_specs_floor_of_every_bench_and_mode():
    """Ideal bytes (each input read once, each output written once, at its dtype) and matmul FLOPs of every
    declared bench and mode, tensor by tensor as the docstring of bench/specs.py states them."""
    seen = set()
    for b in specs.BENCHES:
        sh, s = b.shape, {"bfloat16": 2, "float32": 4}[b.dtype]
        want = {}
        if b.op == "layer_norm":
            n, c, so = sh["N"] * sh["C"], sh["C"], {"bfloat16": 2, "float32": 4}[b.out_dtype or b.dtype]
            want["fwd"] = _floor(x=n * s, w=4 * c, b=4 * c, y=n * so)
            want["bwd"] = _floor(dy=n * so, x=n * s, w=4 * c, dx=n * s, dw=4 * c, db=4 * c)
        elif b.op == "add_layer_norm":  # x, s, ds, dx fp32; r, y, dy, dr bf16; w, b fp32
            n, c = sh["N"] * sh["C"], sh["C"]
            want["fwd"] = _floor(x=4 * n, r=2 * n, w=4 * c, b=4 * c, s=4 * n, y=2 * n)
            want["bwd"] = _floor(ds=4 * n, s=4 * n, dy=2 * n, w=4 * c, dx=4 * n, dr=2 * n, dw=4 * c, db=4 * c)
        elif b.op == "gelu":
            n = sh["N"] * sh["C"] * s
            want["fwd"], want["bwd"] = _floor(x=n, y=n), _floor(dy=n, x=n, dx=n)
        elif b.op == "attention":
            t = sh["B"] * sh["H"] * sh["T"] * sh["D"] * s
            want["fwd"] = _floor(q=t, k=t, v=t, o=t)
            want["bwd"] = _floor(q=t, k=t, v=t, o=t, do=t, dq=t, dk=t, dv=t)
        elif b.op == "cross_entropy":
            logits, targets = sh["N"] * sh["V"] * s, sh["N"] * 8  # int64 targets
            want = {"fwd": logits + targets, "bwd": _floor(logits=logits, targets=targets, dlogits=logits),
                    "fwd+bwd": _floor(logits=logits, targets=targets, dlogits=logits)}  # fused: one pass
        elif b.op == "linear_cross_entropy":
            h, w = sh["N"] * sh["C"] * s, sh["V"] * sh["C"] * s
            want = {"fwd": h + w, "bwd": _floor(h=h, w=w, dh=h, dw=w), "fwd+bwd": _floor(h=h, w=w, dh=h, dw=w)}
        elif b.op == "AdamW":
            want["step"] = 4 * sh["params"] * 7  # read p, g, m, v; write p, m, v (fp32)
        want.setdefault("fwd+bwd", want.get("fwd", 0) + want.get("bwd", 0))
        for mode in b.modes:
            assert specs.ideal_bytes(b, mode) == want[mode], (b.op, b.variant, mode)
        # FLOPs: attention's causal QK^T and PV (2 FLOPs per multiply-add, half the T x T), backward 2.5x;
        # the LM head's matmul, backward 2x (dh and dW); 0 for the memory-bound ops
        if b.op == "attention":
            fwd = 2 * 2 * sh["B"] * sh["H"] * sh["T"] * sh["T"] * sh["D"] / 2
            want_flops = {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}
        elif b.op == "linear_cross_entropy":
            fwd = 2 * sh["N"] * sh["C"] * sh["V"]
            want_flops = {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}
        else:
            want_flops = dict.fromkeys(b.modes, 0)
        assert b.bound == ("compute" if b.op in ("attention", "linear_cross_entropy") else "memory"), b
        for mode in b.modes:
            assert specs.flops(b, mode) == want_flops[mode], (b.op, b.variant, mode)
            seen.add(b.op)
    assert seen == {"layer_norm", "add_layer_norm", "gelu", "attention", "cross_entropy", "linear_cross_entropy", "AdamW"}


# The audit's floors at its own shapes (bench/io_audit.py): tensor by tensor, and where the audit
# uses specs' dtypes, equal to specs.ideal_bytes at that shape.
_N, _C, _G = 256 * 768, 768, 256 * 3072
AUDIT_IDEAL = {
    "layer_norm fwd": _floor(x=2 * _N, w=4 * _C, b=4 * _C, y=2 * _N),
    "layer_norm bwd": _floor(dy=2 * _N, x=2 * _N, w=4 * _C, dx=2 * _N, dw=4 * _C, db=4 * _C),
    # add_layer_norm without out_dtype: y (and so dy) in x's fp32; d(x + r) written in x's fp32 and r's bf16
    "add_layer_norm fwd": _floor(x=4 * _N, r=2 * _N, w=4 * _C, b=4 * _C, s=4 * _N, y=4 * _N),
    "add_layer_norm bwd": _floor(dy=4 * _N, ds=4 * _N, s=4 * _N, w=4 * _C, dx=4 * _N, dr=2 * _N, dw=4 * _C, db=4 * _C),
    "gelu fwd": _floor(x=2 * _G, y=2 * _G),
    "gelu bwd": _floor(dy=2 * _G, x=2 * _G, dx=2 * _G),
    "AdamW step": 7 * 4 * (256 * 768 + 768 + 2304 + 768 * 64),
    # logits read over the real vocab only, the gradient written over the padded one, int64 targets, fp32 loss
    "cross_entropy fwd+bwd": _floor(logits=32 * 50257 * 2, targets=32 * 8, dlogits=32 * 50304 * 2, loss=4),
}


def test_io_audit_floors_match_the_specs():
    assert set(AUDIT_IDEAL) == set(KERNEL_AUDITS)
    for name, mode in (("layer_norm fwd", "fwd"), ("layer_norm bwd", "bwd"), ("gelu fwd", "fwd"), ("gelu bwd", "bwd")):
        b = specs.Bench(name.split()[0], {"N": 256, "C": 3072 if name.startswith("gelu") else 768})
        assert specs.ideal_bytes(b, mode) == AUDIT_IDEAL[name], name
    assert specs.ideal_bytes(specs.Bench("AdamW", {"params": 248_832}, "float32"), "step") == AUDIT_IDEAL["AdamW step"]


@pytest.mark.parametrize("name", KERNEL_AUDITS)
def test_io_audit_ideal_is_the_op_s_floor(audit_rows, name):
    """The denominator of unique/ideal: a floor counted too high (an output twice, the padded vocab of
    the logits) would let an extra pass through memory under LIMIT. The kernels move at least their floor."""
    if importlib.util.find_spec(io_audit.AUDITS[name][1]) is None:
        pytest.skip(f"{io_audit.AUDITS[name][1]} not written yet")
    row = audit_rows[name]
    assert row["status"] == "ok", row.get("reason")
    assert row["ideal_bytes"] == AUDIT_IDEAL[name]
    assert row["unique_ratio"] >= 0.95, row  # cross_entropy: 0.985 (the ignored row's gradient is torch's zeros)
    assert row["total_ratio"] >= row["unique_ratio"]


def test_io_audit_counts_atomics_as_read_and_write():
    """An atomic read-modify-write loads and stores its address: counted in both, masked lanes out."""
    import triton
    import triton.language as tl

    @triton.jit
    def bump(x_ptr, flag_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.atomic_add(x_ptr + offs, 1.0, mask=offs < n)
        tl.atomic_cas(flag_ptr, 0, 1)

    x, flag = torch.zeros(100), torch.zeros(1, dtype=torch.int32)
    with io_audit.Recorder() as rec:
        bump[(1,)](x, flag, 100, BLOCK=128)
    assert x.sum() == 100 and flag.item() == 1
    assert rec.per_tensor({"x": x, "flag": flag}) == {"x": {"read": 400, "written": 400}, "flag": {"read": 4, "written": 4},
                                                      "other": {"read": 0, "written": 0}}
    assert rec.unique_bytes() == rec.total_bytes() == 808


# ---- run.py's CPU-side logic ----------------------------------------------------------------------

def test_parse_args():
    args = run.parse_args(["gelu", "--ops", "layer_norm,attention"])
    assert args.ops == {"gelu", "layer_norm", "attention"} and args.rep == 100 and args.data == "shakespeare"
    assert run.parse_args([]).ops is None
    assert run.parse_args(["--quick"]).rep == 50 and run.parse_args(["--quick", "--rep", "7"]).rep == 7
    for bad in (["nope"], ["--ops", "gelu,nope"], ["--e2e", "--e2e-steps", "5", "--e2e-warmup", "5"]):
        with pytest.raises(SystemExit):
            run.parse_args(bad)
    assert run.parse_args(["--e2e", "--e2e-steps", "5", "--e2e-warmup", "4"]).e2e_warmup == 4
    assert run.parse_args(["--e2e"]).e2e_profile == 2 and run.parse_args(["--e2e", "--e2e-profile", "0"]).e2e_profile == 0
    with pytest.raises(SystemExit):
        run.parse_args(["--e2e", "--e2e-profile", "-1"])


def test_quantiles_median_p20_p80():
    assert run._quantiles([float(x) for x in range(11, 0, -1)]) == [6.0, 3.0, 9.0]  # sorted first
    assert run._quantiles([0.0, 10.0]) == pytest.approx([5.0, 2.0, 8.0])  # linear interpolation
    assert run._quantiles([3.0]) == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("change, fails, warns", [
    # without the row's own shared_limit, the arch's: 163 KiB on sm_80, 227 KiB on sm_90
    ({"shared_limit": None, "arch": "sm_80", "shared_bytes": 200 * 1024}, 1, 0),
    ({"shared_limit": None, "arch": "sm_90", "shared_bytes": 200 * 1024}, 0, 0),
    ({"expect_ld128": False, "ld128": 0}, 0, 0),  # no 128-bit loads where none are expected: fine
])
def test_static_rule_defaults(change, fails, warns):
    f, w = run.static_problems({**ROW, **change})
    assert (len(f), len(w)) == (fails, warns), (f, w)


def test_static_selects_companion_audits_and_writes_json(monkeypatch, capsys, tmp_path):
    """`--static add_layer_norm --out DIR`: add_layer_norm is a companion of layer_norm (its audits are
    layer_norm's module's), so the IO audit covers it; the static JSON is written and valid."""
    from kernels import _triton_utils

    asked = []
    monkeypatch.setattr(run, "triton_modules", lambda ops=None: ([], [], []))
    monkeypatch.setattr(_triton_utils, "static_report", lambda modules, archs=(80, 90): [])
    monkeypatch.setattr(run, "_cuda_rows", lambda: pytest.fail("add_layer_norm has no CUDA kernel"))
    monkeypatch.setattr(io_audit, "audit", lambda names=None: asked.append(names) or [])
    assert run.run_static(run.parse_args(["--static", "add_layer_norm", "--out", str(tmp_path)])) == 0
    assert set(asked[0]) == {"calibration copy", "calibration double read", "layer_norm fwd", "layer_norm bwd",
                             "add_layer_norm fwd", "add_layer_norm bwd"}
    (path,) = tmp_path.glob("*_static.json")
    doc = report.load(path)
    assert doc["kind"] == "static" and doc["static"]["failures"] == []
    floors = doc["static"]["floors"]
    assert [(f["op"], f["mode"]) for f in floors] == [("add_layer_norm", m) for m in specs.MODES]
    b = specs.selected({"add_layer_norm"})[0]
    assert floors[0]["bytes"] == specs.ideal_bytes(b, "fwd")
    assert floors[0]["floor_s"]["H100 SXM"] == pytest.approx(specs.ideal_bytes(b, "fwd") / 3.35e12)


# ---- bench.host_overhead: its rows are the model's calls ---------------------------------------------------

def _op_name(row_op):
    return row_op.split(" ")[0]  # "cross_entropy (triton)" -> cross_entropy


def test_host_overhead_calls_per_step_are_the_model_s(monkeypatch):
    """CALLS_PER_STEP is what one GPT-2 124M micro-step (12 layers, the default classifier) calls of each op:
    counted on the model itself (tiny widths, torch backend), so a change to the model shows here."""
    from bench import host_overhead as H
    from gpt2.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=128, n_layer=12, n_head=2, n_embd=64), kernels="torch")
    counts = {}
    for name in {_op_name(op) for op in H.CALLS_PER_STEP}:
        fn = getattr(model.ops, name)
        monkeypatch.setattr(model.ops, name, lambda *a, fn=fn, name=name, **k: (
            counts.__setitem__(name, counts.get(name, 0) + 1), fn(*a, **k))[1])
    idx = torch.randint(0, 128, (1, 8))
    _, loss = model(idx, idx)
    loss.backward()
    assert {_op_name(op): n for op, n in H.CALLS_PER_STEP.items() if n} == counts


def test_host_overhead_times_our_op_and_its_reference(monkeypatch):
    """measure() has one row per CALLS_PER_STEP entry (plus the model's), and each row times our op through the
    fast path, then through the custom op, then the reference op: checked by calling each timed function once
    and recording which op it called. Its kernel stubs and loss-row setting are undone after the test."""
    from bench import host_overhead as H
    from kernels import _eager
    from kernels import attention as at
    from kernels import cross_entropy as ce
    from kernels import gelu as ge
    from kernels import layernorm as ln
    from kernels import reference as ref

    import kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_eager, "ENABLED", True)
    import kernels.classifier
    import kernels.linear_cross_entropy

    for mod in (kernels.classifier, kernels.linear_cross_entropy):
        monkeypatch.setattr(mod, "CHECK_ROWS", mod.CHECK_ROWS)  # measure() turns them off: restored after
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    stub_kernels = H._stub_kernels

    def undoable_stubs(modules):
        for mod in modules:
            for name, obj in list(vars(mod).items()):
                monkeypatch.setattr(mod, name, obj)  # the kernel objects measure() replaces come back after
        return stub_kernels(modules)
    monkeypatch.setattr(H, "_stub_kernels", undoable_stubs)
    monkeypatch.setattr(H, "_model_row", lambda torch, _eager, number: {"op": "model"})
    calls, depth = [], [0]

    def spy(kind, name, fn):
        def call(*a, **k):
            if not depth[0]:
                calls.append((kind, name, _eager.ENABLED))
            depth[0] += 1
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
        return call
    for kind, mod, names in (("ours", ln, ("layer_norm", "add_layer_norm")), ("ours", ge, ("gelu",)),
                             ("ours", at, ("attention", "attention_qkv")), ("ours", ce, ("cross_entropy",)),
                             ("ref", ref, ("layer_norm", "add_layer_norm", "gelu", "attention", "attention_qkv",
                                           "cross_entropy"))):
        for name in names:
            monkeypatch.setattr(mod, name, spy(kind, name, getattr(mod, name)))
    timed = []

    def time_once(fn, reps=7, number=300):
        fn()
        timed.append(list(calls))
        calls.clear()
        return 1.0, 1.0, 1.0
    monkeypatch.setattr(H, "_time_us", time_once)
    doc = H.measure(number=1)
    ops = [r["op"] for r in doc["rows"]]
    assert ops == list(H.CALLS_PER_STEP) + ["model"], ops
    want = []
    for op in H.CALLS_PER_STEP:
        name = _op_name(op)
        want += [[("ours", name, True)], [("ours", name, False)], [("ref", name, True)]]
    assert timed == want


# ---- bench/gpu_session.sh ------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run of the script: on a GPU it would run the real steps")
def test_gpu_session_leaves_one_tarball_in_out(tmp_path):
    """The device tool brings back at most 8 files (16 MiB each) from $OUT: the script leaves exactly one, the
    tarball of its run folder, rewritten after every step, without the profiler's traces."""
    out, run_dir = tmp_path / "out", tmp_path / "session"
    e2e = run_dir / "run" / "e2e" / "torch"
    e2e.mkdir(parents=True)
    (e2e / "trace.json.gz").write_bytes(b"x" * 1000)  # as a profiled e2e run leaves them
    (e2e / "profile.json").write_text("{}")
    env = {**_env(), "OUT": str(out), "RUN_DIR": str(run_dir), "GPU_SESSION_NO_INSTALL": "1",
           "TESTS": "tests/test_flops.py", "TESTS_TIMEOUT": "300"}
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "tests e2e"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "pytest rc=0" in proc.stdout and "e2e rc=0" in proc.stdout
    assert [p.name for p in out.iterdir()] == ["run.tgz"]
    import tarfile

    with tarfile.open(out / "run.tgz") as tar:
        names = set(tar.getnames())
    assert {"run/env.txt", "run/pytest.log", "run/e2e.log", "run/e2e/torch/profile.json"} <= names
    assert not any(n.endswith("trace.json.gz") for n in names)
    bad = subprocess.run(["bash", "bench/gpu_session.sh", "nope"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2 and "unknown step nope" in bad.stdout


def test_host_overhead_compiled_row_and_its_table(monkeypatch, capsys):
    """--compiled: the micro-step of both models under torch.compile (compile replaced by the identity here:
    what is checked is the row and the table, not the compiler); the fast path has no entry there."""
    from bench import host_overhead as H

    compile_kw = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: (compile_kw.append(kw), model)[1])
    specs = []
    import gpt2.model

    real = gpt2.model.GPT
    monkeypatch.setattr(gpt2.model, "GPT", lambda config, kernels: (specs.append(kernels), real(config, kernels="torch"))[1])
    row = H._compiled_row(torch, number=10)
    assert specs == ["triton", "torch"] and row["fast_path"] is None and row["ms_per_step_fast_path"] is None
    assert compile_kw == [{}, {}] and row["calls_per_step"] == 1  # default mode; one micro-step per call
    assert row["custom_op"]["us"] > 0 and row["torch_backend"]["us"] > 0
    plain = {"op": "gelu", "fast_path": {"us": 1.0}, "custom_op": {"us": 2.0}, "torch_backend": {"us": 3.0},
             "calls_per_step": 12, "ms_per_step_fast_path": 0.012}
    monkeypatch.setattr(H, "measure", lambda number, compiled: {"what": "w", "torch": "t", "threads": 1,
                                                                "rows": [plain] + ([row] if compiled else [])})
    assert H.main(["--compiled"]) == 0
    out = capsys.readouterr().out
    assert "| gelu | 1.0 | 2.0 | 3.0 | 12 | 0.01 |" in out
    assert "| GPT-2 micro-step under torch.compile (12 layers, tiny widths) | - | " in out
    assert out.rstrip().endswith(" | 1 | - |")  # the compiled row: 1 call, no fast-path ms/step


def test_summarize_log_peak_memory_is_over_every_step(tmp_path):
    """The peak is the run's: a warm-up step (compile, autotuning) or a profiled one may hold it."""
    log = tmp_path / "log.jsonl"
    steps = [{"step": i, "loss": 1.0, "tokens_per_sec": 100.0, "mfu": None, "step_time_s": 1.0,
              "peak_mem_bytes": {1: 9000, 5: 7000}.get(i, 1000), **({"profiled": True} if i == 5 else {})}
             for i in range(1, 6)]
    log.write_text("\n".join(json.dumps(s) for s in steps) + "\n")
    assert run.summarize_log(log, warmup=2)["peak_mem_bytes"] == 9000
    assert run.summarize_log(log, warmup=2, limit=4)["peak_mem_bytes"] == 9000 and \
        run.summarize_log(log, warmup=2, limit=4)["steps"] == 4


def test_a_failed_run_whose_timed_steps_were_profiled_is_an_error(monkeypatch, tmp_path):
    """Keeping a failed run's timed steps needs them unprofiled: if the profiled window reached into them,
    their rate is not the run's, and the failure is the run's. A long failure is capped in the row."""
    def fake_run(cmd, **kw):
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "log.jsonl").write_text("".join(json.dumps(
            {"step": i, "loss": 1.0, "tokens_per_sec": 10.0, "mfu": None, "step_time_s": 1.0, "peak_mem_bytes": None,
             **({"profiled": True} if i > 4 else {})}) + "\n" for i in range(1, 8)))
        return subprocess.CompletedProcess(cmd, 1, "", "\n".join(["x" * 200] * 30))
    monkeypatch.setattr(run.subprocess, "run", fake_run)
    args = run.parse_args(["--e2e", "--e2e-steps", "6", "--e2e-warmup", "2"])
    assert run.train_run("triton", (), args, tmp_path / "r")["status"] == "error"

    def fake_run_ok_steps(cmd, **kw):  # the timed steps clean, the profiled ones fail with a long stderr
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "log.jsonl").write_text("".join(json.dumps(
            {"step": i, "loss": 1.0, "tokens_per_sec": 10.0, "mfu": None, "step_time_s": 1.0, "peak_mem_bytes": None})
            + "\n" for i in range(1, 7)))
        return subprocess.CompletedProcess(cmd, 1, "", "\n".join(["x" * 200] * 30))
    monkeypatch.setattr(run.subprocess, "run", fake_run_ok_steps)
    r = run.train_run("triton", (), args, tmp_path / "r2")
    assert r["status"] == "ok" and len(r["profile_error"]) == 2000


def test_train_run_without_an_e2e_profile_setting_does_not_profile(monkeypatch, tmp_path):
    """bench --cpu's tiny training run passes a Namespace without e2e_profile: no profiled steps there."""
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "log.jsonl").write_text("".join(json.dumps(
            {"step": i, "loss": 1.0, "tokens_per_sec": 10.0, "mfu": None, "step_time_s": 1.0, "peak_mem_bytes": None})
            + "\n" for i in range(1, 4)))
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(run.subprocess, "run", fake_run)
    ns = argparse.Namespace(e2e_batch=2, e2e_seq=8, e2e_steps=3, e2e_warmup=1, e2e_timeout=60, data="shakespeare")
    assert run.train_run("torch", (), ns, tmp_path / "r", model="tiny")["status"] == "ok"
    assert "--profile" not in seen["cmd"] and seen["cmd"][seen["cmd"].index("--max-steps") + 1] == "3"


@pytest.mark.parametrize("row, cell", [
    ({"wgmma": 12, "mma_sync": 0, "expect_mma": "wgmma"}, "12 wgmma"),
    ({"wgmma": 0, "mma_sync": 48, "expect_mma": "wgmma"}, "48 mma.sync"),
    ({"wgmma": 4, "mma_sync": 2, "expect_mma": "tensor_cores"}, "4 wgmma, 2 mma.sync"),
    ({"wgmma": 0, "mma_sync": 0, "expect_mma": "tensor_cores"}, "none"),  # a matmul kernel without MMA: said
    ({"wgmma": 0, "mma_sync": 0, "expect_mma": ""}, "-"),  # not a matmul kernel
    ({}, "-"),  # a CUDA row: no PTX counts
])
def test_static_mma_cell(row, cell):
    assert run._mma_cell(row) == cell


def test_e2e_markdown_profile_table_shape_and_missing_values():
    """The separator has one cell per header column; a CPU profile (no device kernels) shows dashes; a rate
    without an MFU (unknown peak) shows the rate and a dash; a profile_error note stays on one line of the
    table, its pipes escaped."""
    cpu = {"step_time_s": 0.5, "device_busy_s": None, "device_idle_fraction": None, "kernels_per_step": 0,
           "categories": {}}
    gpu = {"step_time_s": 0.040, "device_busy_s": 0.030, "device_idle_fraction": 0.25, "kernels_per_step": 812,
           "device_bound_tokens_per_sec": 546133.0, "device_bound_mfu": None, "categories": {}}
    rows = [{"name": "cpu", "status": "ok", "tokens_per_sec": 10.0, "mfu": None, "peak_mem_bytes": None, "loss": 9.0,
             "profile": cpu},
            {"name": "gpu", "status": "ok", "tokens_per_sec": 10.0, "mfu": None, "peak_mem_bytes": None, "loss": 9.0,
             "profile": gpu},
            {"name": "bad", "status": "ok", "tokens_per_sec": 10.0, "mfu": None, "peak_mem_bytes": None, "loss": 9.0,
             "profile_error": "exit -11: a | b\nTraceback (most recent call last): second line"}]
    md = report.e2e_markdown(rows)
    lines = md.split("Where a step's time goes")[1].splitlines()
    (header,) = [x for x in lines if x.startswith("| run |")]
    sep = lines[lines.index(header) + 1]
    assert sep.count("|---") == header.count("|") - 1
    (cpu_line,) = [x for x in lines if x.startswith("| cpu |")]
    assert cpu_line.startswith("| cpu | 500.00 | - | - | - | - | 0 | ")
    (gpu_line,) = [x for x in lines if x.startswith("| gpu |")]
    assert gpu_line.startswith("| gpu | 40.00 | 30.00 | 25% | 546,133 | - | 812 | ")
    (bad,) = [x for x in md.splitlines() if x.startswith("| bad |")]
    assert bad.count("|") == 8 and "second line" not in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run of the script: on a GPU it would run the real steps")
def test_gpu_session_packs_before_its_steps_and_never_leaves_a_broken_tarball(tmp_path):
    """The tarball is written once the environment is recorded, before any step (a call killed in its first step
    still brings back env.txt), and only a whole new tarball replaces it: here tar cannot write its .part file
    (a directory is in the way), so $OUT gets no run.tgz at all rather than a broken or partial one."""
    import tarfile

    env = {**_env(), "RUN_DIR": str(tmp_path / "session"), "GPU_SESSION_NO_INSTALL": "1"}
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "nope"], cwd=ROOT, env={**env, "OUT": str(out)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    with tarfile.open(out / "run.tgz") as tar:
        assert "run/env.txt" in tar.getnames()
    blocked = tmp_path / "blocked"
    (blocked / "run.tgz.part").mkdir(parents=True)
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "nope"], cwd=ROOT, env={**env, "OUT": str(blocked)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and not (blocked / "run.tgz").exists()


def test_gpu_session_keeps_its_run_folder_out_of_out_by_default(tmp_path):
    """Without RUN_DIR the run folder is not under $OUT (which must hold the tarball alone): checked on the
    script's own variable lines, without running it (it would write to the default /tmp/gpu_session)."""
    script = (ROOT / "bench" / "gpu_session.sh").read_text().splitlines()
    lines = [x for x in script if x.startswith(("OUT=", "RUN_DIR="))]
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "-c", "\n".join(lines) + '\necho "$RUN_DIR"'], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "OUT": str(out)})
    run_dir = proc.stdout.strip()
    assert run_dir and not (run_dir + "/").startswith(str(out) + "/"), run_dir
