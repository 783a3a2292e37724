"""gpt2/train.py (and flops.py, plot.py): exact resume, DDP == gradient accumulation, learning, every
CPU-runnable kernels spec against torch, --compile-mode and --cuda-graph (its curve on a GPU only),
divergence handling, the MFU table.

Runs are in-process (`train.main(argv)`) except DDP (torchrun). A very small model (1 layer, width
32; GPT-2's vocabulary) on a slice of tiny Shakespeare keeps each run to seconds.
"""
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kernels
from gpt2 import data as D
from gpt2 import flops, train
from gpt2.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "tiny", "--n-layer", "1", "--n-head", "1", "--n-embd", "32", "--block-size", "32"]


def shakespeare():
    try:
        return D.shakespeare_path()
    except Exception as e:  # no network and no offline copy
        pytest.skip(f"tiny Shakespeare unavailable: {e}")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """The first 20,000 characters of tiny Shakespeare (~5.7k tokens) as a .txt file."""
    path = tmp_path_factory.mktemp("text") / "shk.txt"
    with open(shakespeare(), encoding="utf-8") as f:
        path.write_text(f.read(20000))
    return str(path)


def args(text, out, *extra, steps=8):
    return SMALL + ["--data", text, "--out", str(out), "--kernels", "torch", "--device", "cpu", "--dtype", "float32",
                    "--batch-size", "4", "--seq-len", "16", "--total-batch-size", "128", "--max-steps", str(steps),
                    "--lr", "1e-2", "--warmup-steps", "2", "--eval-every", "4", "--eval-tokens", "128",
                    "--checkpoint-every", "4", "--sample-tokens", "0", "--quiet", *extra]


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(text, tmp_path_factory):
    """8 steps, 1 process, gradient accumulation 2 (4 x 16 tokens per micro-batch, 128 per step)."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    log = train.main(args(text, out))
    return out, log


def curve(log, key="loss"):
    return [r[key] for r in log if key in r]


# ---- the log, config and checkpoints -------------------------------------------------------------

def test_log_config_and_checkpoints(straight):
    out, log = straight
    assert read_log(out) == log and [r["step"] for r in log] == list(range(1, 9))
    keys = {"step", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_sec", "mfu", "peak_mem_bytes"}
    for r in log:
        assert keys <= set(r) and set(r) <= keys | {"val_loss"}
        assert r["mfu"] is None and r["peak_mem_bytes"] is None  # CPU: unknown peak, no GPU memory
        assert math.isclose(r["tokens_per_sec"], 128 / r["step_time_s"])
    assert [r["step"] for r in log if "val_loss" in r] == [4, 8]
    assert log[-1]["loss"] < log[0]["loss"] - 0.5
    # warmup 2 steps to 1e-2, cosine to 1e-3 at step 8
    assert [r["lr"] for r in log[:2]] == [5e-3, 1e-2] and log[-1]["lr"] == pytest.approx(1e-3 + 9e-3 * (1 + math.cos(math.pi * 5 / 6)) / 2)
    config = json.loads((out / "config.json").read_text())
    assert config["kernels"] == "torch" and config["world_size"] == 1 and config["grad_accum_steps"] == 2
    assert config["model_config"]["n_embd"] == 32 and config["num_params"] == GPT(GPTConfig(**config["model_config"])).num_params()
    assert config["args"]["max_steps"] == 8 and config["device_name"] == "cpu" and config["torch_version"] == torch.__version__
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt")) == ["ckpt_0000004.pt", "ckpt_0000008.pt"]
    ckpt = torch.load(out / "ckpt_0000004.pt", weights_only=False)
    assert ckpt["step"] == 4 and ckpt["loader"]["consumed"] == 8 and len(ckpt["rng"]) == 1


def test_weight_decay_only_on_2d_and_optimizer_is_the_backends():
    model = GPT(GPTConfig.preset("tiny", n_layer=1), kernels="torch")
    a = train.build_parser().parse_args(["--weight-decay", "0.25"])
    train.resolve_defaults(a, torch.device("cpu"))
    opt = train.build_optimizer(model, a)
    assert type(opt) is model.ops.AdamW
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.25 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"]) and no_decay["params"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["betas"] == (0.9, 0.95) and decay["lr"] == a.lr and decay["eps"] == no_decay["eps"] == 1e-8


def test_micro_batches_accumulate_the_mean_loss_and_its_gradient():
    """forward_backward with accum=2 over two micro-batches: loss_sum is their mean loss and the .grads are
    the gradient of that mean (each micro-batch's loss is divided by accum before its backward)."""
    import contextlib

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=16), kernels="torch")
    pairs = [(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))) for _ in range(2)]
    loss_sum = torch.zeros(())
    for x, y in pairs:
        train.forward_backward(model, x, y, contextlib.nullcontext(), 2, loss_sum)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    mean = sum(model(x, y)[1] for x, y in pairs) / 2
    mean.backward()
    torch.testing.assert_close(loss_sum, mean.detach())
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_evaluate_loss_is_the_mean_over_the_same_first_batches():
    """evaluate_loss: the mean loss of the val loader's first `steps` micro-batches, the same ones at every
    evaluation (the loader is reset), with the model back in train mode."""
    import contextlib

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=16), kernels="torch")
    tokens = np.random.default_rng(0).integers(0, 64, 8 * 10 + 1)
    loader = D.DataLoader([D.Source.from_array("val", tokens)], 2, 8, shuffle=False, vocab_size=64)
    with torch.no_grad():
        expected = sum(model(x, y)[1] for x, y in [loader.next_batch() for _ in range(3)]).item() / 3
    cpu = torch.device("cpu")
    for _ in range(2):
        got = train.evaluate_loss(model, loader, 3, cpu, contextlib.nullcontext(), 1)
        assert got == pytest.approx(expected, rel=1e-6) and model.training


def test_rng_state_round_trip():
    """What a checkpoint saves of the RNGs (torch, numpy, python) is what set_rng_state restores."""
    cpu = torch.device("cpu")
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = train.rng_state(cpu)
    draws = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    train.set_rng_state(state, cpu)
    again = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(draws[0], again[0]) and (draws[1] == again[1]).all() and draws[2] == again[2]


# ---- exact resume --------------------------------------------------------------------------------

def test_resume_is_bit_exact(straight, text, tmp_path, monkeypatch):
    """4 steps, stop (only the checkpoint and log survive), --resume, 4 more == 8 steps straight; the RNGs
    are set to the checkpoint's states (the model has no dropout: only a spy can tell they are)."""
    out, log = straight
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    ckpt = torch.load(out / "ckpt_0000004.pt", weights_only=False)
    torch.manual_seed(4321), np.random.seed(4321), random.seed(4321)  # states the run would not reach by itself
    ckpt["rng"] = [train.rng_state(torch.device("cpu"))]
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    torch.save(ckpt, resumed / "ckpt_0000004.pt")
    (resumed / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))  # includes steps 5-8: trimmed on resume
    restored, set_rng_state = [], train.set_rng_state

    def spy(state, device):  # what the RNGs hold right after the resume set them
        set_rng_state(state, device)
        restored.append(train.rng_state(device))
    monkeypatch.setattr(train, "set_rng_state", spy)
    more = train.main(args(text, resumed, "--resume"))
    (got,), want = restored, ckpt["rng"][0]
    assert torch.equal(got["torch"], want["torch"]) and got["python"] == want["python"]
    assert all(np.array_equal(a, b) for a, b in zip(got["numpy"], want["numpy"]))
    assert [r["step"] for r in more] == [5, 6, 7, 8]
    for key in ("loss", "grad_norm", "lr", "val_loss"):
        assert curve(more, key) == curve(log[4:], key), key  # bit for bit
    assert [r["step"] for r in read_log(resumed)] == list(range(1, 9))
    assert json.loads((resumed / "config.json").read_text())["resumed_from"].endswith("ckpt_0000004.pt")


def test_resume_from_an_earlier_checkpoint_sets_the_later_steps_aside(text, tmp_path, monkeypatch, capsys):
    """--resume ckpt_2 of a run that has ckpt_4 and ckpt_6: pruning kept the last K by step number, so the
    abandoned run's ckpt_4/ckpt_6 stayed and each new checkpoint was deleted right after it was written
    (and a later plain --resume took the abandoned ckpt_6). Now the later steps move to abandoned_1/."""
    out = tmp_path / "run"
    first = train.main(args(text, out, "--checkpoint-every", "2", steps=6))
    old = {name: (out / name).read_bytes() for name in ("ckpt_0000004.pt", "ckpt_0000006.pt", "log.jsonl")}
    capsys.readouterr()
    written = []
    real_save = train.save_checkpoint

    def save(out, step, state, keep):
        path = real_save(out, step, state, keep)
        written.append((path.name, path.exists()))
        return path

    monkeypatch.setattr(train, "save_checkpoint", save)
    again = train.main(args(text, out, "--resume", str(out / "ckpt_0000002.pt"), "--checkpoint-every", "3",
                            "--keep-checkpoints", "2", steps=6))
    assert written == [("ckpt_0000003.pt", True), ("ckpt_0000006.pt", True)]  # the one just written is never pruned
    note = f"moved ckpt_0000004.pt, ckpt_0000006.pt, 4 log line(s) of later steps to {out / 'abandoned_1'}/"
    assert note in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_0000003.pt", "ckpt_0000006.pt"]
    aside = out / "abandoned_1"
    assert (aside / "ckpt_0000004.pt").read_bytes() == old["ckpt_0000004.pt"]
    assert (aside / "ckpt_0000006.pt").read_bytes() == old["ckpt_0000006.pt"]
    assert read_log(aside) == first[2:] and read_log(out) == first[:2] + again
    assert [r["step"] for r in again] == [3, 4, 5, 6] and curve(again) == curve(first[2:])
    latest, _ = train.find_resume("latest", out)
    assert latest == out / "ckpt_0000006.pt" and torch.load(latest, weights_only=False)["args"]["checkpoint_every"] == 3


def test_checkpoint_just_written_is_never_pruned(tmp_path):
    for step in (5, 10):
        train.save_checkpoint(tmp_path, step, {"step": step}, keep=1)
    train.save_checkpoint(tmp_path, 5, {"step": 5}, keep=2)  # back at 5 (e.g. a copied-in checkpoint)
    path = train.save_checkpoint(tmp_path, 7, {"step": 7}, keep=1)
    assert path.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000007.pt", "ckpt_0000010.pt"]
    for keep in (0, -1):  # used to mean "keep everything", unchecked
        with pytest.raises(ValueError, match=f"keep must be >= 1 .*got {keep}"):
            train.save_checkpoint(tmp_path, 8, {"step": 8}, keep=keep)


def test_resume_after_a_log_line_cut_short(straight, text, tmp_path, capsys):
    """A process killed while appending to log.jsonl leaves half a line: --resume died with a
    JSONDecodeError traceback. That line now moves aside with the later steps; damage elsewhere is an error."""
    out, log = straight
    run = tmp_path / "cut"
    run.mkdir()
    shutil.copy(out / "ckpt_0000004.pt", run)
    lines = [json.dumps(r) for r in log[:6]]
    (run / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "lo')
    more = train.main(args(text, run, "--resume"))
    assert "moved 3 log line(s) (the last one cut short) of later steps" in capsys.readouterr().out
    assert read_log(run) == log[:4] + more and [r["step"] for r in more] == [5, 6, 7, 8]
    assert (run / "abandoned_1" / "log.jsonl").read_text() == "\n".join(lines[4:]) + '\n{"step": 7, "lo\n'
    assert not list(run.glob("*.tmp"))

    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(out / "ckpt_0000004.pt", bad)
    damaged = "\n".join(lines[:2] + ['{"step": 3, "lo'] + lines[3:]) + "\n"
    (bad / "log.jsonl").write_text(damaged)
    with pytest.raises(SystemExit) as e:
        train.main(args(text, bad, "--resume"))
    err = capsys.readouterr().err
    assert e.value.code == 1 and f"{bad / 'log.jsonl'}: line 3 is not a log record" in err and "Traceback" not in err
    assert (bad / "log.jsonl").read_text() == damaged and sorted(p.name for p in bad.iterdir()) == ["ckpt_0000004.pt", "log.jsonl"]


def test_log_rewrite_on_resume_is_atomic(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    text = "".join(json.dumps({"step": s}) + "\n" for s in range(1, 7))
    log.write_text(text)

    def fails(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fails)
    with pytest.raises(OSError, match="disk full"):
        train.set_aside_later_steps(tmp_path, 4)
    assert log.read_text() == text and not list(tmp_path.glob("*.tmp"))  # the old log, whole
    monkeypatch.undo()
    assert train.set_aside_later_steps(tmp_path, 4).endswith(f"moved 2 log line(s) of later steps to {tmp_path / 'abandoned_2'}/ (they run again)")
    assert log.read_text() == text[:text.index('{"step": 5')] and train.set_aside_later_steps(tmp_path, 4) is None


def test_resume_into_another_kernels_spec(straight, text, tmp_path):
    """A checkpoint trained with `torch` continues with Triton ops: same weights, same curve."""
    table = kernels.available()
    spec = next((f"torch,{op}=triton" for op in ("gelu", "layer_norm") if table["triton"][op][0]), None)
    if spec is None:
        pytest.skip("no triton gelu/layer_norm here: " + table["triton"]["gelu"][1])
    if _unavailable(spec, device="cpu"):  # args() trains on the CPU
        pytest.skip(_unavailable(spec, device="cpu"))
    out, log = straight
    more = train.main(args(text, tmp_path / "other", "--resume", str(out / "ckpt_0000004.pt"), "--kernels", spec))
    assert curve(more) == pytest.approx(curve(log[4:]), rel=1e-4, abs=1e-4)


# ---- DDP -----------------------------------------------------------------------------------------

def test_ddp_two_ranks_match_gradient_accumulation(straight, text, tmp_path):
    """torchrun, 2 gloo ranks x 1 micro-batch == 1 process x 2 accumulated micro-batches."""
    out, log = straight
    ddp = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2.train",
           *args(text, ddp, "--peak-flops", "1e12")]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = read_log(ddp)
    assert json.loads((ddp / "config.json").read_text())["grad_accum_steps"] == 1
    assert json.loads((ddp / "config.json").read_text())["world_size"] == 2
    for key in ("loss", "grad_norm", "val_loss"):
        assert curve(got, key) == pytest.approx(curve(log, key), rel=2e-5, abs=1e-5), key
    assert sorted(p.name for p in ddp.glob("ckpt_*")) == ["ckpt_0000004.pt", "ckpt_0000008.pt"]
    assert len(torch.load(ddp / "ckpt_0000008.pt", weights_only=False)["rng"]) == 2
    fpt = json.loads((ddp / "config.json").read_text())["flops_per_token"]
    for r in got:  # tokens of both ranks per second; MFU against the peak of both devices
        assert r["tokens_per_sec"] == pytest.approx(128 / r["step_time_s"])
        assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * fpt / (2 * 1e12))


# ---- every kernels spec that runs on a CPU ---------------------------------------------------------

SPECS = ["torch,layer_norm=triton", "torch,gelu=triton", "torch,attention=triton", "torch,cross_entropy=triton",
         "torch,linear_cross_entropy=triton", "torch,AdamW=triton", "torch,cross_entropy=cuda",
         "torch,linear_cross_entropy=cuda", "triton", "triton,cross_entropy=cuda"]


def _unavailable(spec, device=None):
    """Why `spec` cannot train here (on `device`: "cpu" for args()' runs), or None."""
    backends, _ = kernels.parse_spec(spec)
    if device == "cpu" and "triton" in backends.values() and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels take CPU tensors only in Triton's interpreter (CPU-only test runs)"
    table = kernels.available()
    for op, backend in backends.items():
        ok, reason = table[backend][op]
        if not ok and (op != "linear_cross_entropy" or op in spec):
            return f"{op}={backend}: {reason}"
    return None


@pytest.fixture(scope="module")
def torch_curve(text, tmp_path_factory):
    out = tmp_path_factory.mktemp("spec") / "torch"
    return train.main(args(text, out, "--eval-every", "0", "--no-checkpoint", "--total-batch-size", "64", steps=3))


@pytest.mark.parametrize("spec", SPECS)
def test_kernels_spec_trains_like_torch(spec, torch_curve, text, tmp_path):
    reason = _unavailable(spec, device="cpu")
    if reason:
        pytest.skip(reason)
    log = train.main(args(text, tmp_path / "r", "--eval-every", "0", "--no-checkpoint", "--total-batch-size", "64",
                          "--kernels", spec, steps=3))
    assert curve(log) == pytest.approx(curve(torch_curve), rel=1e-4, abs=1e-4)
    assert curve(log, "grad_norm") == pytest.approx(curve(torch_curve, "grad_norm"), rel=1e-3, abs=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_default_kernels_bf16(torch_curve, text, tmp_path):
    """On a GPU: the default spec (triton,cross_entropy=cuda) under bf16 autocast trains like torch's fp32
    curve within bf16 tolerance, and reports peak memory (and MFU where the GPU is in the table)."""
    log = train.main(args(text, tmp_path / "gpu", "--eval-every", "0", "--no-checkpoint", "--total-batch-size", "64",
                          "--device", "cuda", "--dtype", "bfloat16", "--kernels", "triton,cross_entropy=cuda", steps=3))
    assert curve(log) == pytest.approx(curve(torch_curve), rel=2e-2, abs=2e-2)
    assert all(r["peak_mem_bytes"] > 0 for r in log)
    known = flops.peak_flops(torch.cuda.get_device_name(), "bfloat16") is not None
    assert all((r["mfu"] is not None) == known for r in log)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spec", ["torch", "triton,cross_entropy=cuda", "triton,linear_cross_entropy=cuda"])
def test_gpu_training_step_never_syncs(spec):
    """Issue 7: no host-device sync inside a training step but the loop's one loss read. After a warm-up step
    (Triton compiles and autotunes, the CUDA extension loads), a whole step as the loop runs it (batches to
    the GPU, forward + backward of two micro-batches under bf16 autocast, clipping, the optimizer step) runs
    under torch.cuda.set_sync_debug_mode("error"), which raises on any synchronizing CUDA call PyTorch makes
    (a .item(), a device-to-host copy, a data-dependent shape...). A sync per micro-step would stall the host
    that must run ahead of the GPU."""
    import argparse

    reason = _unavailable(spec)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = GPT(GPTConfig.preset("small"), kernels=spec).to(device)
    opt = train.build_optimizer(model, argparse.Namespace(weight_decay=0.1, lr=6e-4, beta1=0.9, beta2=0.95))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    checks = kernels.set_loss_row_checks(False)  # as train() runs: the fused losses' per-call row check is a sync
    batches = [tuple(torch.randint(0, model.config.vocab_size, (2, 64)) for _ in range(2)) for _ in range(4)]

    def step(pair):
        loss_sum = torch.zeros((), device=device)
        for batch in pair:
            x, y = train._to_device(batch, device)
            train.forward_backward(model, x, y, autocast, 2, loss_sum)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss_sum, norm

    try:
        step(batches[:2])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss_sum, norm = step(batches[2:])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert math.isfinite(loss_sum.item()) and math.isfinite(norm.item())  # the loop's one read, outside
    finally:
        kernels.set_loss_row_checks(checks)


# ---- --compile-mode and --cuda-graph ---------------------------------------------------------------

def test_compile_mode_trains_like_eager(torch_curve, text, tmp_path, monkeypatch):
    """--compile --compile-mode reduce-overhead: torch.compile gets the mode (on a CPU Inductor skips its CUDA
    graphs) and the curve is eager torch's within the spec tests' tolerance; config.json records the mode."""
    modes, compile_ = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: modes.append(kw.get("mode")) or compile_(model, **kw))
    out = tmp_path / "ro"
    log = train.main(args(text, out, "--eval-every", "0", "--no-checkpoint", "--total-batch-size", "64",
                          "--compile", "--compile-mode", "reduce-overhead", steps=3))
    assert modes == ["reduce-overhead"]
    assert curve(log) == pytest.approx(curve(torch_curve), rel=1e-4, abs=1e-4)
    assert curve(log, "grad_norm") == pytest.approx(curve(torch_curve, "grad_norm"), rel=1e-3, abs=1e-4)
    saved = json.loads((out / "config.json").read_text())["args"]
    assert (saved["compile"], saved["compile_mode"], saved["cuda_graph"]) == (True, "reduce-overhead", False)


def test_compile_mode_and_cuda_graph_argument_errors(text, tmp_path):
    """Refused before anything is built or written, each with what to do instead; never a silent fallback."""
    with pytest.raises(ValueError, match=r"--cuda-graph needs a CUDA GPU \(the device is cpu\)"):
        train.main(args(text, tmp_path / "a", "--cuda-graph"))
    with pytest.raises(ValueError, match="does not combine with --compile.*use --compile --compile-mode reduce-overhead instead"):
        train.main(args(text, tmp_path / "b", "--cuda-graph", "--compile"))
    with pytest.raises(ValueError, match="--compile-mode max-autotune needs --compile"):
        train.main(args(text, tmp_path / "c", "--compile-mode", "max-autotune"))
    with pytest.raises(SystemExit):  # argparse: not one of torch.compile's modes
        train.main(args(text, tmp_path / "d", "--compile", "--compile-mode", "fast"))
    assert not any((tmp_path / n).exists() for n in "abcd")
    a = train.build_parser().parse_args(["--cuda-graph"])
    with pytest.raises(ValueError, match=r"--cuda-graph does not support DDP yet \(world size 2\)"):
        train.check_cuda_graph_args(a, torch.device("cuda", 0), world=2)
    train.check_cuda_graph_args(a, torch.device("cuda", 0), world=1)  # one CUDA process: fine
    d = train.build_parser().parse_args(["--compile"])
    train.resolve_defaults(d, torch.device("cpu"))
    assert d.compile_mode == "default" and not d.cuda_graph
    e = train.build_parser().parse_args([])
    train.resolve_defaults(e, torch.device("cpu"))
    assert e.compile_mode is None  # no torch.compile, no mode


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spec", ["torch", "triton,cross_entropy=cuda"])
def test_gpu_cuda_graph_matches_eager(spec, text, tmp_path):
    """--cuda-graph (bf16, accumulation 2, 4 steps: step 1 eager warm-up, capture at step 2, replays after)
    gives the eager loss, grad-norm and val-loss curves: the same kernels run in the same order, so they
    should agree bit for bit; the tolerance (rel 1e-5, abs 1e-6) only leaves room for atomics in PyTorch's own
    kernels. Evaluation, a sample and a checkpoint at step 2 run between replays; a --cuda-graph resume from
    that checkpoint (warm-up, then a new capture) continues the same curve."""
    reason = _unavailable(spec)
    if reason:
        pytest.skip(reason)
    run = lambda out, *extra: train.main(args(text, out, "--device", "cuda", "--dtype", "bfloat16", "--kernels", spec,  # noqa: E731
                                              "--eval-every", "2", "--checkpoint-every", "2", "--sample-every", "2",
                                              "--sample-tokens", "8", *extra, steps=4))
    eager = run(tmp_path / "eager")
    graph = run(tmp_path / "graph", "--cuda-graph")
    assert json.loads((tmp_path / "graph" / "config.json").read_text())["args"]["cuda_graph"] is True
    assert json.loads((tmp_path / "graph" / "config.json").read_text())["grad_accum_steps"] == 2
    for key in ("loss", "grad_norm", "val_loss"):
        assert curve(graph, key) == pytest.approx(curve(eager, key), rel=1e-5, abs=1e-6), key
    resumed = run(tmp_path / "resumed", "--cuda-graph", "--resume", str(tmp_path / "graph" / "ckpt_0000002.pt"))
    assert [r["step"] for r in resumed] == [3, 4]
    for key in ("loss", "grad_norm", "val_loss"):
        assert curve(resumed, key) == pytest.approx(curve(eager[2:], key), rel=1e-5, abs=1e-6), key


# ---- learning --------------------------------------------------------------------------------------

def test_tiny_learns_shakespeare_below_unigram(tmp_path):
    """The `tiny` preset on tiny Shakespeare: val loss well below the unigram baseline (6.51 nats)
    after 160 steps of 512 tokens (about a minute on 2 idle cores; measured: val 6.15)."""
    shakespeare()
    baseline = D.unigram_loss("shakespeare")
    t0 = time.process_time()
    log = train.main(["--out", str(tmp_path / "tiny"), "--kernels", "torch", "--device", "cpu", "--dtype", "float32",
                      "--max-steps", "160", "--batch-size", "8", "--seq-len", "64", "--lr", "5e-3", "--warmup-steps", "5",
                      "--eval-every", "160", "--eval-tokens", "8192", "--no-checkpoint", "--sample-tokens", "0", "--quiet"])
    val = log[-1]["val_loss"]
    print(f"unigram {baseline:.3f}  val {val:.3f}  train {log[-1]['loss']:.3f}  cpu {time.process_time() - t0:.0f}s")
    assert val < baseline - 0.25, f"val loss {val:.3f} not well below the unigram baseline {baseline:.3f}"


# ---- failures ------------------------------------------------------------------------------------

def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(text, tmp_path, capsys):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        train.main(args(text, out, "--lr", "1e30", "--warmup-steps", "1", "--checkpoint-every", "1", "--eval-every", "0"))
    assert e.value.code == 1
    err = capsys.readouterr().err
    log = read_log(out)
    bad = len(log) + 1
    assert f"step {bad}:" in err and "not finite" in err and f"ckpt_{bad - 1:07d}.pt" in err, err
    names = sorted(p.name for p in out.iterdir())
    assert f"ckpt_{bad - 1:07d}.pt" in names and f"ckpt_{bad:07d}.pt" not in names
    assert not [n for n in names if n.endswith(".tmp")]
    assert torch.load(out / f"ckpt_{bad - 1:07d}.pt", weights_only=False)["step"] == bad - 1


@pytest.mark.parametrize("clip", [0.05, 0])
def test_steps_clip_grads_and_set_the_lr_of_every_group(text, tmp_path, monkeypatch, clip):
    """What the optimizer gets at each step: grads of global norm min(grad_norm, --grad-clip) (--grad-clip 0: not
    clipped at all), and the logged lr in both param groups. With --peak-flops, MFU = tokens/s x FLOPs per token
    (at --seq-len, not the block size) / peak."""
    seen, build = [], train.build_optimizer

    def recording(model, a):
        opt = build(model, a)

        def hook(opt, *_):
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"]]))
            seen.append(([g["lr"] for g in opt.param_groups], norm.item()))
        opt.register_step_pre_hook(hook)
        return opt
    monkeypatch.setattr(train, "build_optimizer", recording)
    out = tmp_path / "clip"
    log = train.main(args(text, out, "--grad-clip", str(clip), "--peak-flops", "1e12", "--eval-every", "0",
                          "--no-checkpoint", "--total-batch-size", "64", steps=3))
    assert len(seen) == len(log) == 3
    for r, (lrs, norm) in zip(log, seen):
        assert lrs == [r["lr"], r["lr"]] and r["grad_norm"] > 0.05  # so 0.05 clips every step
        assert norm == pytest.approx(min(r["grad_norm"], clip) if clip else r["grad_norm"], rel=1e-4)
    config = json.loads((out / "config.json").read_text())
    fpt = flops.flops_per_token(GPTConfig(**config["model_config"]), 16)
    assert config["flops_per_token"] == fpt and config["peak_flops"] == 1e12
    assert all(r["mfu"] == pytest.approx(r["tokens_per_sec"] * fpt / 1e12) for r in log)


def test_non_finite_grad_norm_alone_stops_the_run(text, tmp_path, monkeypatch, capsys):
    """A finite loss with an inf grad norm (overflowing grads) stops the run before that step's update too."""
    clip_grad_norm, calls = torch.nn.utils.clip_grad_norm_, []

    def clip(params, max_norm, *a, **k):
        calls.append(max_norm)
        norm = clip_grad_norm(params, max_norm, *a, **k)
        return norm * float("inf") if len(calls) == 2 else norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    out = tmp_path / "inf"
    with pytest.raises(SystemExit) as e:
        train.main(args(text, out, "--checkpoint-every", "1", "--eval-every", "0", "--total-batch-size", "64", steps=3))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "step 2: loss" in err and "grad norm inf: not finite" in err, err
    assert [r["step"] for r in read_log(out)] == [1] and sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_0000001.pt"]


def test_argument_errors(text, tmp_path, straight):
    with pytest.raises(ValueError, match="not a multiple of batch-size x seq-len x world-size"):
        train.main(args(text, tmp_path / "a", "--total-batch-size", "100"))
    with pytest.raises(ValueError, match="exceeds the model's block size"):
        train.main(args(text, tmp_path / "b", "--seq-len", "64"))
    with pytest.raises(SystemExit):  # an existing run is never overwritten without --resume
        train.main(args(text, straight[0]))
    with pytest.raises(kernels.BackendUnavailable):
        train.main(args(text, tmp_path / "c", "--kernels", "cuda"))


def test_defaults_are_the_main_job():
    a = train.build_parser().parse_args([])
    train.resolve_defaults(a, torch.device("cpu"))
    assert (a.model, a.data, a.kernels, a.dtype) == ("tiny", "shakespeare", "torch", "float32")
    assert a.sample_tokens > 0 and a.max_steps > 0 and a.out is None
    g = train.build_parser().parse_args([])
    train.resolve_defaults(g, torch.device("cuda"))
    assert (g.kernels, g.dtype) == ("triton,cross_entropy=cuda", "bfloat16")


def test_final_sample(text, tmp_path, capsys, monkeypatch):
    if not hasattr(GPT, "generate"):
        with pytest.raises(SystemExit):  # missing generate is an error at start, never a silent skip
            train.main(args(text, tmp_path / "s", "--sample-tokens", "8", steps=1))
        assert "GPT.generate" in capsys.readouterr().err
        pytest.skip("GPT.generate is not in gpt2/model.py yet")
    train.main(args(text, tmp_path / "s", "--sample-tokens", "12", steps=1))
    printed = capsys.readouterr().out
    sample = (tmp_path / "s" / "sample.txt").read_text().strip("\n")
    assert "--- sample after 1 steps ---" in printed and sample and sample in printed
    monkeypatch.delattr(GPT, "generate")
    with pytest.raises(SystemExit):
        train.main(args(text, tmp_path / "t", "--sample-tokens", "8", steps=1))
    assert "GPT.generate" in capsys.readouterr().err


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    for step in range(1, 6):
        train.save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000004.pt", "ckpt_0000005.pt"]


def test_failed_checkpoint_write_keeps_the_previous_latest(tmp_path, monkeypatch):
    for step in (1, 2):
        train.save_checkpoint(tmp_path, step, {"step": step, "w": torch.arange(1000)}, keep=3)
    real_save = torch.save

    def dies_mid_write(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the disk, then the write fails
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint(tmp_path, 3, {"step": 3, "w": torch.arange(1000)}, keep=3)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000001.pt", "ckpt_0000002.pt"]  # no partial file at all
    latest, out = train.find_resume("latest", tmp_path)
    assert latest.name == "ckpt_0000002.pt" and out == tmp_path
    ckpt = torch.load(latest, weights_only=False)
    assert ckpt["step"] == 2 and torch.equal(ckpt["w"], torch.arange(1000))


def test_sample_length_is_checked_before_training(text, tmp_path):
    """--block-size 32 with the default --sample-tokens 200 used to train the whole run, then crash in generate."""
    out = tmp_path / "s"
    cmd = args(text, out)
    i = cmd.index("--sample-tokens")
    del cmd[i:i + 2]  # the default, 200
    with pytest.raises(ValueError, match=r"--sample-tokens 200 .* = 201 exceeds the model's block size 32: pass --sample-tokens 31"):
        train.main(cmd)
    with pytest.raises(ValueError, match=r"--sample-tokens 20 .*--sample-prompt.* exceeds the model's block size 32"):
        train.main(args(text, out, "--sample-tokens", "20", "--sample-prompt", "one two three four five six seven eight nine ten eleven twelve"))
    assert not (out / "log.jsonl").exists() and not list(out.glob("ckpt_*"))  # not a single step ran


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--batch-size", "-4"), ("--seq-len", "0"), ("--seq-len", "-16"),
                                         ("--total-batch-size", "0"), ("--warmup-steps", "-1"), ("--hellaswag-limit", "0"),
                                         ("--seed", "-1"), ("--keep-checkpoints", "0"), ("--keep-checkpoints", "-2")])
def test_sizes_must_be_positive(text, tmp_path, flag, value):
    """0 used to be a ZeroDivisionError, negative a confusing ShardError; a negative seed a numpy traceback at
    the first batch; --keep-checkpoints 0 or negative silently kept every checkpoint."""
    with pytest.raises(ValueError, match=f"{flag} must be >= {0 if flag in ('--warmup-steps', '--seed') else 1}, got {value}"):
        train.main(args(text, tmp_path / "z", flag, value))
    assert not (tmp_path / "z").exists()


def test_eval_note_says_how_many_tokens_are_evaluated(text, tmp_path, capsys):
    """The note fired for any --eval-tokens that is not a multiple of the micro-batch and claimed the
    whole val split was evaluated."""
    log = train.main(args(text, tmp_path / "a", "--eval-tokens", "100", steps=1))
    assert ("note: evaluating 64 val tokens = 1 micro-batch(es) of 4 x 16 x 1 rank(s), not --eval-tokens 100: "
            "an evaluation runs whole micro-batches\n") in capsys.readouterr().out
    # the last step is always evaluated and checkpointed, also when not a multiple of --eval/--checkpoint-every (4)
    assert "val_loss" in log[-1] and [p.name for p in (tmp_path / "a").glob("ckpt_*")] == ["ckpt_0000001.pt"]
    train.main(args(text, tmp_path / "b", "--eval-tokens", "128", steps=1))
    assert "note: evaluating" not in capsys.readouterr().out
    assert train.eval_plan(128, 4, 16, 1, 8) == (2, None)
    assert train.eval_plan(200, 4, 16, 1, 8)[0] == 3
    steps, note = train.eval_plan(10, 4, 16, 2, 8)
    assert steps == 1 and note.endswith("not --eval-tokens 10: an evaluation runs whole micro-batches, at least one")
    steps, note = train.eval_plan(10**6, 4, 16, 1, 8)
    assert steps == 8 and note.startswith("note: evaluating 512 val tokens") and note.endswith("the val split holds only 8 per pass")


def test_init_from_takes_the_shape_from_its_config(text, tmp_path):
    """--init-from silently ignored --model/--n-layer/--n-head/--n-embd/--block-size; now they are refused."""
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(hf)
    plain = args(text, tmp_path / "ft", "--init-from", str(hf), steps=1)[len(SMALL):]
    log = train.main(plain)
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert len(log) == 1 and config["model_config"]["n_embd"] == 16 and config["args"]["model"] is None
    with pytest.raises(train.UsageError, match=r"--init-from .* takes the model's shape from its config.json; --model, "
                                               r"--n-layer, --n-head, --n-embd, --block-size would be ignored: drop them"):
        train.main(SMALL + plain)
    with pytest.raises(train.UsageError, match="; --n-embd would be ignored: drop it"):
        train.main(plain + ["--n-embd", "16", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_resume_refuses_other_run_arguments(straight, text, tmp_path):
    """Resuming with other values of run-defining flags (here: the defaults) is an error listing each one."""
    out, _ = straight
    ckpt = str(out / "ckpt_0000004.pt")
    with pytest.raises(ValueError) as e:
        train.main(args(text, tmp_path / "r", "--resume", ckpt, "--max-steps", "10", "--lr", "2e-2", "--seed", "1"))
    msg = str(e.value)
    for line in ("--max-steps: saved 8, now 10", "--lr: saved 0.01, now 0.02", "--seed: saved 1337, now 1",
                 "--min-lr: saved 0.001, now 0.002"):
        assert line in msg, msg
    assert "pass the saved values" in msg and "--warmup-steps" not in msg and "--kernels" not in msg
    # just --resume and the run folder: every default that differs from the saved run is listed
    with pytest.raises(ValueError) as e:
        train.main(["--resume", ckpt, "--out", str(tmp_path / "r2"), "--device", "cpu", "--quiet", "--sample-tokens", "0"])
    msg = str(e.value)
    for flag in ("--n-layer: saved 1, now None", "--data:", "--max-steps: saved 8, now 300",
                 "--batch-size: saved 4, now 16", "--warmup-steps: saved 2, now 15"):
        assert flag in msg, msg
    assert not (tmp_path / "r2" / "log.jsonl").exists()


# ---- FLOPs, MFU, plot ------------------------------------------------------------------------------

def test_flops_per_token_and_peak_table():
    config = GPTConfig.preset("gpt2")
    model = GPT(GPTConfig.preset("tiny"))
    tiny = GPTConfig.preset("tiny")
    assert flops.matmul_params(tiny) == model.num_params() - tiny.block_size * tiny.n_embd
    assert flops.matmul_params(config) == 124_439_808 - 1024 * 768
    assert flops.flops_per_token(config, 1024) == 6 * 123_653_376 + 12 * 12 * 12 * 64 * 1024
    for name, dtype, peak in [("NVIDIA H100 80GB HBM3", "bfloat16", 989.4e12), ("NVIDIA H100 PCIe", "bfloat16", 756e12),
                              ("NVIDIA H100 NVL", "float32", 417.5e12), ("NVIDIA H200", "bfloat16", 989.4e12),
                              ("NVIDIA A100-SXM4-40GB", "bfloat16", 312e12), ("NVIDIA A100 80GB PCIe", "float32", 156e12),
                              ("NVIDIA L4", "bfloat16", 121e12), ("NVIDIA A10", "bfloat16", 125e12),
                              ("NVIDIA L40S", "bfloat16", 362e12), ("NVIDIA GeForce RTX 4090", "bfloat16", 165.2e12),
                              ("NVIDIA A10G", "bfloat16", None), ("Some Future GPU", "bfloat16", None), ("cpu", "float32", None)]:
        assert flops.peak_flops(name, dtype) == peak, name
    assert flops.mfu(1e6, 8e8, None) is None
    assert flops.mfu(1e6, 8e8, 1e15, world_size=2) == pytest.approx(0.4)


def test_plot(straight, tmp_path):
    out, _ = straight
    from gpt2 import plot

    png = tmp_path / "loss.png"
    plot.main([str(out), str(out), "-o", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_plot_cli_names_a_folder_without_a_log(tmp_path, capsys):
    from gpt2 import plot

    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path / "no_run")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and "no_run" in err and "no log" in err


def test_cli_prints_usage_errors_without_a_traceback(tmp_path):
    """`python -m gpt2.train` with a bad argument: one line naming it, exit status 2, nothing written."""
    p = subprocess.run([sys.executable, "-m", "gpt2.train", "--seq-len", "0", "--out", str(tmp_path / "x")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == "error: --seq-len must be >= 1, got 0", p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not (tmp_path / "x").exists()
