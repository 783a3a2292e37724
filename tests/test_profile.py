"""gpt2/profile.py and `gpt2.train --profile N` (device time per kernel category; `bench/run.py --e2e` uses it).

The category table is checked on kernel names as an H100 profile shows them (cuBLAS, cuDNN, PyTorch's own
kernels, Inductor's, ours); the arithmetic (busy time as a union of intervals, per-step shares, the
device-bound rate) on synthetic kernels; the trainer's flag on a CPU run, where only host operators exist.
"""
import gzip
import json
import math

import pytest

from gpt2 import profile as P
from tests.conftest import requires_cuda
from gpt2 import train
from tests.test_train import args, read_log, text  # noqa: F401  (the `text` fixture)

NAMES = {
    "matmul": ["sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas",
               "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_nn_align8>(Params)",
               "triton_tem_fused_addmm_0", "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_32x5_tn"],
    "attention": ["_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_preprocess_kernel",
                  "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t>>(Flash_fwd_params)",
                  "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0",
                  "fmha_cutlassB_bf16_aligned_64x64_k64_sm80"],
    "layer_norm": ["_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel",
                   "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>(int, float, float const*, float const*, float const*, float*, float*, float*)",
                   "void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernel_32x32<float, float>(long, long, float const*, float const*, float const*, float const*, float*, float*)",
                   "triton_red_fused_add_native_layer_norm_native_layer_norm_backward_3"],
    "gelu": ["_gelu_fwd_kernel", "_gelu_bwd_kernel",
             "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&, at::native::GeluType)::{lambda()#2}::operator()() const::{lambda()#4}::operator()() const::{lambda(c10::BFloat16)#1}, std::array<char*, 2ul> >(int, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&, at::native::GeluType)::{lambda()#2}::operator()() const::{lambda()#4}::operator()() const::{lambda(c10::BFloat16)#1}, std::array<char*, 2ul>)",
             "triton_poi_fused_gelu_gelu_backward_7"],
    "cross_entropy": ["void gpt2k::ce_row_kernel<c10::BFloat16, 8, true>(c10::BFloat16 const*, long, long, long const*, long, c10::BFloat16*, float*, float)",
                      "void gpt2k::scale_kernel<c10::BFloat16>(c10::BFloat16*, long, float const*)", "_ce_kernel", "_scale_kernel",
                      "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>(float*, float const*, int)",
                      "void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>(float*, float*, float const*, long const*, float const*, bool, long, long, long, long)"],
    "grad_clip": ["void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::TensorListMetadata<1>, at::native::(anonymous namespace)::LpNormFunctor<float, (at::native::(anonymous namespace)::NormType)1, float, float>, float*, int>(...)"],
    "optimizer": ["_adamw_kernel", "_nonfinite_kernel",
                  "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, (at::native::ADAM_MODE)1, false>>(...)"],
    "embedding": ["void at::native::(anonymous namespace)::indexSelectLargeIndex<float, long, unsigned int, 2, 2, -2, true>(...)",
                  "void at::native::(anonymous namespace)::embedding_backward_feature_kernel<float, float, long>(long const*, float const*, float*, int, long, int, int)"],
    "inductor": ["triton_poi_fused__to_copy_0", "triton_red_fused_sum_4", "triton_per_fused_add_mul_2"],
    "copy/cast": ["void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(float)#1}, std::array<char*, 2ul>, 4, TrivialOffsetCalculator<1, unsigned int>, TrivialOffsetCalculator<1, unsigned int>, at::native::memory::LoadWithCast<1>, at::native::memory::StoreWithCast<1> >(...)",
                  "Memcpy DtoD (Device -> Device)", "Memcpy HtoD (Pinned -> Device)"],
    "fill": ["void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)",
             "Memset (Device)"],
    "reduction": ["void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, at::native::sum_functor<float, float, float>::operator()(at::TensorIterator&)::{lambda(float, float)#1}>, unsigned int, float, 4, 4> >(...)"],
    "elementwise": ["void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<float>, std::array<char*, 3ul>)"],
    "other": ["_dot_probe", "void some_library::mystery(int)"],
}


@pytest.mark.parametrize("expected, name", [(c, n) for c, names in NAMES.items() for n in names])
def test_kernel_categories(expected, name):
    assert P.category(name) == expected


def test_every_category_is_exercised_by_the_name_table():
    assert {c for c, _ in P.CATEGORIES} | {"other"} == set(NAMES)


@pytest.mark.parametrize("intervals, total", [
    ([], 0.0), ([(0, 10)], 10.0), ([(0, 10), (20, 25)], 15.0), ([(0, 10), (5, 12)], 12.0),
    ([(5, 12), (0, 10), (30, 31)], 13.0), ([(0, 10), (2, 3), (4, 5)], 10.0), ([(0, 10), (10, 15)], 15.0),
])
def test_busy_time_is_the_union_of_the_intervals(intervals, total):
    assert P.busy_time(intervals) == total


def _kernels():
    """Two steps of 10 ms wall each (us): per step a 4 ms gemm, a 1 ms LayerNorm overlapping the gemm's last
    0.5 ms on another stream, 2 ms of attention after a 1 ms gap."""
    out = []
    for step in range(2):
        t = step * 10_000
        out += [("nvjet_gemm", t, t + 4000), ("_layer_norm_fwd_kernel", t + 3500, t + 4500),
                ("_attn_fwd_kernel", t + 5500, t + 7500)]
    return out


def test_summary_per_step_shares_busy_time_and_device_bound_rate():
    host = [("aten::empty", 40, 300.0), ("aten::mm", 8, 900.0), ("cudaLaunchKernel", 60, 600.0)]
    s = P.summarize(_kernels(), [0.010, 0.012], host, tokens_per_step=16384, flops_per_token=1e9, peak_flops=1e15,
                    note="n")
    assert s["steps"] == 2 and s["step_time_s"] == pytest.approx(0.011) and s["kernels_per_step"] == 3
    cats = s["categories"]
    assert list(cats) == ["matmul", "attention", "layer_norm"]  # by time
    assert cats["matmul"]["ms_per_step"] == pytest.approx(4.0) and cats["attention"]["ms_per_step"] == pytest.approx(2.0)
    assert cats["layer_norm"]["kernels_per_step"] == 1
    assert sum(c["share_of_kernel_time"] for c in cats.values()) == pytest.approx(1.0)
    assert cats["matmul"]["share_of_kernel_time"] == pytest.approx(4 / 7)
    busy = (4.5 + 2.0) / 1e3  # the overlap counts once
    assert s["device_busy_s"] == pytest.approx(busy)
    assert s["device_idle_fraction"] == pytest.approx(1 - busy / 0.011)
    assert s["device_bound_tokens_per_sec"] == pytest.approx(16384 / busy)
    assert s["device_bound_mfu"] == pytest.approx(16384 / busy * 1e9 / 1e15)
    assert [k["name"] for k in s["top_kernels"]] == ["nvjet_gemm", "_attn_fwd_kernel", "_layer_norm_fwd_kernel"]
    assert s["top_kernels"][0]["category"] == "matmul" and s["top_kernels"][0]["calls_per_step"] == 1
    assert [o["name"] for o in s["host_top_ops"]] == ["aten::mm", "cudaLaunchKernel", "aten::empty"]
    assert s["host_top_ops"][0] == {"name": "aten::mm", "self_cpu_ms_per_step": 0.45, "calls_per_step": 4}
    assert s["note"] == "n"
    json.dumps(s)  # JSON-able
    text = P.table(s)
    assert "device busy 6.50 ms per step, idle 40.9%" in text and "| matmul | 4.000 | 57.1% | 1 |" in text
    assert "device-bound: 2,520,615 tokens/s per device, MFU 252.1%" in text and "note: n" in text


def test_device_kernels_leave_out_host_events_and_gpu_annotations():
    import types

    import torch

    def ev(name, device, annotation=False, start=0.0, end=1.0):
        return types.SimpleNamespace(name=name, device_type=getattr(torch.autograd.DeviceType, device),
                                     is_user_annotation=annotation, time_range=types.SimpleNamespace(start=start, end=end))
    events = [ev("aten::mm", "CPU"), ev("nvjet_gemm", "CUDA", start=2, end=5),
              ev("Optimizer.step#AdamW.step", "CUDA", annotation=True, start=0, end=50),  # spans its kernels' gaps
              ev("Memset (Device)", "CUDA", start=6, end=7), ev("my_range", "CPU", annotation=True)]
    assert P.device_kernels(events) == [("nvjet_gemm", 2, 5), ("Memset (Device)", 6, 7)]


def test_summary_without_device_kernels_or_peak():
    s = P.summarize([], [1.0, 3.0, 2.0], [("aten::mm", 3, 3000.0)], tokens_per_step=100)
    assert s["step_time_s"] == 2.0 and s["device_busy_s"] is None and s["device_idle_fraction"] is None
    assert s["categories"] == {} and "device_bound_tokens_per_sec" not in s
    assert "no device kernels recorded" in P.table(s) and "| aten::mm | 1.000 | 1 |" in P.table(s)
    unknown_peak = P.summarize(_kernels(), [0.01, 0.01], tokens_per_step=1000, flops_per_token=1e9, peak_flops=None)
    assert unknown_peak["device_bound_tokens_per_sec"] > 0 and unknown_peak["device_bound_mfu"] is None
    assert "MFU" not in P.table(unknown_peak).split("device-bound")[1].splitlines()[0]
    with pytest.raises(ValueError, match="no profiled step"):
        P.summarize([], [])


def test_train_profiles_its_last_steps_on_cpu(text, tmp_path):  # noqa: F811
    out = tmp_path / "p"
    log = train.main(args(text, out, "--profile", "2", steps=5))
    assert [bool(r.get("profiled")) for r in read_log(out)] == [False, False, False, True, True]
    assert len(log) == 5
    s = json.loads((out / "profile.json").read_text())
    assert s["steps"] == 2
    assert s["step_time_s"] == pytest.approx((log[3]["step_time_s"] + log[4]["step_time_s"]) / 2)
    assert s["device_busy_s"] is None and s["categories"] == {}  # a CPU run: no device kernels
    assert s["tokens_per_step"] == 128 and s["host_top_ops"]
    assert all(o["self_cpu_ms_per_step"] >= 0 and o["calls_per_step"] > 0 for o in s["host_top_ops"])
    assert any(o["name"] in ("aten::mm", "aten::addmm") for o in s["host_top_ops"])
    # the checkpoint at step 4 (--checkpoint-every 4) falls inside the window: said, not hidden
    assert s["note"] == "the profiled window also holds val loss at step 4, checkpoint at step 4: their kernels are counted"
    with gzip.open(out / "trace.json.gz", "rt") as f:
        trace = json.load(f)
    assert trace["traceEvents"]
    assert all(math.isfinite(r["loss"]) for r in log)


def test_train_profile_arguments(text, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match=r"--profile 6: this run does only 5 step\(s\)"):
        train.main(args(text, tmp_path / "a", "--profile", "6", steps=5))
    with pytest.raises(ValueError, match="--profile must be >= 0"):
        train.main(args(text, tmp_path / "b", "--profile", "-1", steps=5))
    out = tmp_path / "c"  # the last step alone; nothing else in the window
    train.main(args(text, out, "--profile", "1", steps=3))
    s = json.loads((out / "profile.json").read_text())
    assert s["steps"] == 1 and "note" not in s
    assert [bool(r.get("profiled")) for r in read_log(out)] == [False, False, True]


def test_train_without_profile_writes_none(text, tmp_path):  # noqa: F811
    out = tmp_path / "n"
    train.main(args(text, out, steps=2))
    assert not (out / "profile.json").exists() and not any("profiled" in r for r in read_log(out))


def test_a_profiler_failure_is_reported_and_the_run_goes_on(text, tmp_path, monkeypatch, capsys):  # noqa: F811
    def broken(*a, **k):  # after the profiler stopped, reading its events fails
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED (test)")
    monkeypatch.setattr(P, "summarize", broken)
    out = tmp_path / "f"
    log = train.main(args(text, out, "--profile", "1", steps=2))
    assert len(log) == 2 and (out / "ckpt_0000002.pt").exists()  # the last step's checkpoint still written
    assert not (out / "profile.json").exists()
    assert "warning: --profile failed, no profile.json (RuntimeError: CUPTI_ERROR_NOT_INITIALIZED (test))" in capsys.readouterr().out


@requires_cuda
def test_train_profile_on_a_gpu(text, tmp_path):  # noqa: F811
    """The device side: CUDA kernels recorded and categorized, busy time within the step's wall time."""
    out = tmp_path / "g"
    train.main(args(text, out, "--profile", "2", "--device", "cuda", "--dtype", "bfloat16", steps=4))
    s = json.loads((out / "profile.json").read_text())
    assert s["kernels_per_step"] > 10 and "matmul" in s["categories"] and s["top_kernels"]
    assert 0 < s["device_busy_s"] and 0 <= s["device_idle_fraction"] < 1
    assert s["device_bound_tokens_per_sec"] >= 0.99 * s["tokens_per_step"] / s["step_time_s"]
    assert sum(c["share_of_kernel_time"] for c in s["categories"].values()) == pytest.approx(1.0)


def test_summary_step_time_is_the_median_and_idle_share_never_negative():
    """One slow step in the window (a checkpoint, say) does not move the step time (the median); kernels on
    several streams can add up to more busy time than the median step's wall time: the idle share is then 0,
    never negative. Without the FLOPs per token there is no MFU, even with the peak known."""
    s = P.summarize([("nvjet_gemm", 0, 45_000)], [0.010, 0.010, 0.100], tokens_per_step=10, flops_per_token=None,
                    peak_flops=1e15)
    assert s["step_time_s"] == 0.010
    assert s["device_busy_s"] == pytest.approx(0.015) and s["device_idle_fraction"] == 0.0
    assert s["device_bound_tokens_per_sec"] == pytest.approx(10 / 0.015) and s["device_bound_mfu"] is None


def test_summary_keeps_the_top_n_and_cuts_long_names():
    kernels = [(f"k{i:02d}_" + "x" * 200, 0, 100 * (i + 1)) for i in range(15)]  # k14 the longest
    host = [(f"op{i:02d}_" + "y" * 200, 1, float(i)) for i in range(15)]
    s = P.summarize(kernels, [1.0], host)
    assert [k["name"][:3] for k in s["top_kernels"]] == [f"k{i:02d}" for i in range(14, 2, -1)]  # the 12 longest
    assert [o["name"][:4] for o in s["host_top_ops"]] == [f"op{i:02d}" for i in range(14, 2, -1)]
    assert all(len(k["name"]) == 160 for k in s["top_kernels"] + s["host_top_ops"])
    assert sum(c["kernels_per_step"] for c in s["categories"].values()) == 15  # the categories keep every kernel
    small = P.summarize(kernels, [1.0], host, top=2)
    assert len(small["top_kernels"]) == 2 and len(small["host_top_ops"]) == 2


def test_step_profiler_finish_keeps_host_ops_apart_and_stops(tmp_path, monkeypatch):
    """StepProfiler around a fake torch.profiler.profile: the host table takes the CPU entries of key_averages
    only (a CUDA run also lists its kernels there), the device kernels come from the events, and finish()
    leaves the profiler inactive."""
    import types

    import torch
    import torch.profiler

    CPU, CUDA = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    class FakeProfile:
        def __init__(self, activities):
            self.activities = activities

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return [types.SimpleNamespace(key="aten::mm", count=4, self_cpu_time_total=800.0, device_type=CPU),
                    types.SimpleNamespace(key="nvjet_gemm", count=4, self_cpu_time_total=9000.0, device_type=CUDA)]

        def events(self):
            return [types.SimpleNamespace(name="nvjet_gemm", device_type=CUDA, is_user_annotation=False,
                                          time_range=types.SimpleNamespace(start=0.0, end=3000.0))]

        def export_chrome_trace(self, path):
            open(path, "wb").close()
    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    prof = P.StepProfiler(torch.device("cpu"))
    assert not prof.active
    prof.start()
    assert prof.active
    prof.step_done(0.004)
    prof.step_done(0.004)
    s = prof.finish(tmp_path, tokens_per_step=8)
    assert not prof.active
    assert [o["name"] for o in s["host_top_ops"]] == ["aten::mm"]
    assert s["steps"] == 2 and s["device_busy_s"] == pytest.approx(0.0015) and s["categories"]["matmul"]["kernels_per_step"] == 0.5
    assert json.loads((tmp_path / "profile.json").read_text()) == s and (tmp_path / "trace.json.gz").exists()


def test_train_profile_can_cover_every_step(text, tmp_path):  # noqa: F811
    out = tmp_path / "all"
    train.main(args(text, out, "--profile", "2", steps=2))
    assert [bool(r.get("profiled")) for r in read_log(out)] == [True, True]
    assert json.loads((out / "profile.json").read_text())["steps"] == 2


@pytest.mark.parametrize("changes, note", [
    ({}, None),  # window: steps 7, 8; the evaluations and checkpoint at step 8 run after the profiler stopped
    ({"max_steps": 9}, "val loss at step 8, checkpoint at step 8"),
    ({"max_steps": 10}, None),  # window: steps 9, 10; step 8 is before it
    ({"max_steps": 9, "no_checkpoint": True}, "val loss at step 8"),
    ({"max_steps": 9, "sample_tokens": 16}, "val loss at step 8, sample at step 8, checkpoint at step 8"),
    ({"max_steps": 9, "eval_every": 0, "hellaswag_every": 2, "checkpoint_every": 0}, "HellaSwag at step 8"),
    ({"max_steps": 13, "profile": 6}, "val loss at step 8, checkpoint at step 8, val loss at step 12, checkpoint at step 12"),
])
def test_profile_note_names_what_runs_inside_the_window(changes, note):
    import argparse

    ns = argparse.Namespace(**{"max_steps": 8, "profile": 2, "eval_every": 4, "hellaswag_every": 0, "sample_every": 4,
                               "sample_tokens": 0, "checkpoint_every": 4, "no_checkpoint": False, **changes})
    got = train._profile_note(ns, 0)
    assert got == (None if note is None else f"the profiled window also holds {note}: their kernels are counted")


def test_summary_of_zero_length_kernels_only():
    """A window whose only device work has zero length (a memset the tracer saw as instantaneous): no division
    by zero, no device-bound rate."""
    s = P.summarize([("Memset (Device)", 5.0, 5.0)], [1.0], tokens_per_step=10, flops_per_token=1e9, peak_flops=1e15)
    assert s["categories"]["fill"] == {"ms_per_step": 0.0, "share_of_kernel_time": 0.0, "kernels_per_step": 1.0}
    assert s["device_busy_s"] == 0.0 and s["device_idle_fraction"] == 1.0 and "device_bound_tokens_per_sec" not in s
    assert "idle 100.0%" in P.table(s)
