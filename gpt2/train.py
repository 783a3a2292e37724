"""Train GPT-2 with a chosen kernel backend, on one device or many (DDP via torchrun).

    python -m gpt2.train                                    # tiny preset on tiny Shakespeare, then a sample
    python -m gpt2.train --kernels=torch --max-steps 50     # the PyTorch reference ops
    torchrun --nproc_per_node=8 -m gpt2.train --model gpt2 --data data/edu10B ...   # see README

Step s (1-based, the number of optimizer steps done) runs `accum` micro-batches per rank, with DDP
gradient sync only on the last one; the loss stays on the device and is read once per step together
with the grad norm (the only host sync). Then: LR (linear warmup, cosine decay to --min-lr), clip,
AdamW from the backend (`model.ops.AdamW`, decay on 2-D weights only), and every --eval-every /
--hellaswag-every / --sample-every / --checkpoint-every steps (0 = off) the evaluations and the
checkpoint, always also at the last step. --compile [--compile-mode MODE] runs torch.compile(model,
mode=MODE); --cuda-graph (one CUDA process, no --compile) runs the first step eagerly, then replays each
micro-step from one captured CUDA graph (CUDAGraphMicroStep; the loss curve is the eager one).

OUT/config.json (written at start): args, kernels, kernel_backends, world_size, grad_accum_steps,
model_config, num_params, flops_per_token, peak_flops, device_name, torch_version, triton_version,
resumed_from. OUT/log.jsonl: one JSON object per step with step, loss, lr, grad_norm, step_time_s,
tokens_per_sec (global), mfu (fraction, null when the device's peak is unknown), peak_mem_bytes
(null on CPU), and val_loss / hellaswag on the steps where they ran; with --profile N the last N steps also
say "profiled": true and OUT/profile.json holds their breakdown (gpt2/profile.py). OUT/ckpt_<step>.pt: model,
optimizer, step, loader state, the RNG states of every rank, the config; written to a temp file and
renamed, the last --keep-checkpoints kept. --resume from step s moves the run folder's checkpoints and log
lines of later steps (an abandoned timeline, or steps after the last checkpoint) to OUT/abandoned_<n>/
and says so; a log line cut short by a killed process is one of them. --resume checks that the run-defining arguments
(RESUME_MUST_MATCH) equal the checkpoint's, and the sample length is checked against the block size at start. A non-finite loss or grad norm stops the run (exit 1)
before anything is written for that step.
"""
import argparse
import contextlib
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

import kernels
from gpt2 import data as gdata
from gpt2 import flops
from gpt2 import profile as gprofile
from gpt2.model import GPT, GPTConfig


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, bad arguments found late); the message says why."""


class UsageError(ValueError):
    """A bad argument or combination of arguments, found before training starts; the message says which."""


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile(mode=...)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m gpt2.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default=None, help=f"preset: {', '.join(GPTConfig.PRESETS)} (not given: tiny; not with --init-from)")
    a("--n-layer", type=int, default=None, help="override the preset's number of layers")
    a("--n-head", type=int, default=None, help="override the preset's number of heads")
    a("--n-embd", type=int, default=None, help="override the preset's width")
    a("--block-size", type=int, default=None, help="override the preset's context length")
    a("--init-from", default=None, help="a Hugging Face GPT-2 directory or hub name to fine-tune (its config sets the "
                                       "shape: no --model/--n-layer/--n-head/--n-embd/--block-size)")
    a("--data", default="shakespeare", help="'shakespeare' (built in), a .txt file, or a folder of *_train_*/*_val_* shards")
    a("--kernels", default=None, help="kernel spec (kernels.get_ops); default: 'triton,cross_entropy=cuda' with a GPU, else 'torch'")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--compile-mode", default=None, choices=COMPILE_MODES,
      help="torch.compile's mode, only with --compile (not given: 'default'); reduce-overhead also replays the "
           "compiled code from CUDA graphs")
    a("--cuda-graph", action="store_true",
      help="capture one training micro-step in a CUDA graph after the first (eager) step and replay it: no Python "
           "per kernel (one CUDA process; not with --compile: use --compile --compile-mode reduce-overhead)")
    a("--device", default=None, help="cuda or cpu (default: cuda when visible); under torchrun cuda:LOCAL_RANK")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast dtype; auto: bfloat16 on GPU, float32 on CPU")
    a("--batch-size", type=int, default=None, help="micro-batch per rank (default 16 on CPU, 64 on GPU)")
    a("--seq-len", type=int, default=None, help="tokens per sequence (default: 64 on CPU, else the block size)")
    a("--total-batch-size", type=int, default=None, help="tokens per optimizer step, all ranks (default: one micro-batch per rank)")
    a("--max-steps", type=int, default=None, help="optimizer steps (default 300 on CPU, 2000 on GPU)")
    a("--lr", type=float, default=None, help="max learning rate (default: 5e-3 for the tiny/small presets, else 6e-4)")
    a("--min-lr", type=float, default=None, help="final learning rate of the cosine decay (default lr/10)")
    a("--warmup-steps", type=int, default=None, help="linear warmup steps (default 5%% of max-steps)")
    a("--weight-decay", type=float, default=0.1, help="AdamW decay, on 2-D weights only")
    a("--beta1", type=float, default=0.9)
    a("--beta2", type=float, default=0.95)
    a("--grad-clip", type=float, default=1.0, help="clip the global grad norm to this (0: no clipping)")
    a("--seed", type=int, default=1337, help="seeds the weights, the data order and the samples (>= 0)")
    a("--eval-every", type=int, default=100, help="val loss every N steps (0: off)")
    a("--eval-tokens", type=int, default=32768, help="val tokens per evaluation (all ranks)")
    a("--hellaswag-every", type=int, default=0, help="HellaSwag every N steps (0: off)")
    a("--hellaswag-limit", type=int, default=None, help="HellaSwag examples per evaluation (default: all 10,042)")
    a("--sample-every", type=int, default=0, help="print a sample every N steps (0: off)")
    a("--sample-tokens", type=int, default=200, help="length of the samples, and of the one printed at the end (0: no sample)")
    a("--sample-prompt", default="", help="text the samples continue (after <|endoftext|>)")
    a("--top-k", type=int, default=50, help="sample from the k most likely tokens")
    a("--checkpoint-every", type=int, default=200, help="checkpoint every N steps, and at the end (0: only at the end)")
    a("--keep-checkpoints", type=int, default=3, help="how many of the latest checkpoints to keep (>= 1; --no-checkpoint: none)")
    a("--no-checkpoint", action="store_true", help="write no checkpoint at all")
    a("--peak-flops", type=float, default=None, help="peak FLOP/s of one device for MFU (default: from gpt2/flops.py's table)")
    a("--out", default=None, help="run folder (default runs/<model>-<data>-<time>)")
    a("--resume", nargs="?", const="latest", default=None,
      help="continue a run: alone, from the latest checkpoint of --out (or of the newest folder in runs/); or a checkpoint file or run folder")
    a("--quiet", action="store_true", help="no per-step console line")
    a("--profile", type=int, default=0, metavar="N",
      help="profile the last N steps (gpt2/profile.py): device time per kernel category, the GPU's idle share, "
           "the top host ops -> OUT/profile.json, OUT/trace.json.gz and a table at the end; their log lines say "
           "'profiled' (the profiler slows the host). 0: off")
    return p


# ---- setup helpers ------------------------------------------------------------------------------

def setup_distributed(device_arg):
    """(rank, local_rank, world_size, device). torchrun sets RANK/LOCAL_RANK/WORLD_SIZE."""
    cuda = torch.cuda.is_available() if device_arg is None else device_arg.startswith("cuda")
    if "RANK" not in os.environ:
        device = torch.device(device_arg or ("cuda" if cuda else "cpu"))
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # Triton launches on the current device, not on the tensors' one
        return 0, 0, 1, device
    import torch.distributed as dist

    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if cuda:
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    return rank, local_rank, world, device


MODEL_SHAPE_ARGS = ("model", "n_layer", "n_head", "n_embd", "block_size")  # set by --init-from's config instead


def resolve_defaults(args, device):
    given = [f"--{k.replace('_', '-')}" for k in MODEL_SHAPE_ARGS if getattr(args, k) is not None]
    if args.init_from and given:
        raise UsageError(f"--init-from {args.init_from} takes the model's shape from its config.json; {', '.join(given)} "
                         f"would be ignored: drop {'it' if len(given) == 1 else 'them'} (or --init-from)")
    if args.model is None and not args.init_from:
        args.model = "tiny"
    gpu = device.type == "cuda"
    if args.kernels is None:
        args.kernels = "triton,cross_entropy=cuda" if gpu else "torch"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if gpu else "float32"
    if args.batch_size is None:
        args.batch_size = 64 if gpu else 16
    if args.max_steps is None:
        args.max_steps = 2000 if gpu else 300
    if args.lr is None:
        args.lr = 5e-3 if args.model in ("tiny", "small") else 6e-4
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.max_steps // 20)
    if args.compile_mode is not None and not args.compile:
        raise UsageError(f"--compile-mode {args.compile_mode} needs --compile (it is torch.compile's mode)")
    if args.compile and args.compile_mode is None:
        args.compile_mode = "default"  # without --compile it stays None: no mode applies
    for name in ("eval_every", "hellaswag_every", "sample_every", "checkpoint_every", "max_steps", "sample_tokens", "eval_tokens",
                 "warmup_steps", "seed", "profile"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("batch_size", "seq_len", "total_batch_size", "n_layer", "n_head", "n_embd", "block_size", "hellaswag_limit",
                 "keep_checkpoints"):
        value = getattr(args, name)
        if value is not None and value < 1:  # None: filled in later from the model (seq_len, total_batch_size)
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_cuda_graph_args(args, device, world):
    """--cuda-graph: one CUDA process, no --compile. Raises ValueError before anything is built; never a
    silent fallback to eager."""
    if not args.cuda_graph:
        return
    if args.compile:
        raise UsageError("--cuda-graph captures the eager model and does not combine with --compile; for CUDA graphs "
                         "of a compiled model use --compile --compile-mode reduce-overhead instead")
    if world > 1:
        raise UsageError(f"--cuda-graph does not support DDP yet (world size {world}): run one process, or drop --cuda-graph")
    if device.type != "cuda":
        raise UsageError(f"--cuda-graph needs a CUDA GPU (the device is {device})")


def lr_at(step, args):
    """LR of optimizer step `step` (0-based): linear warmup to --lr, cosine decay to --min-lr at --max-steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def build_optimizer(model, args):
    """The backend's AdamW (model.ops.AdamW); weight decay on 2-D weights (matmuls, embeddings) only,
    none on biases and LayerNorm gains."""
    params = list(model.parameters())  # the tied wte / lm_head weight once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return model.ops.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8, weight_decay=args.weight_decay)


# Arguments that change a run's math: a resumed run must use the values saved in its checkpoint.
# The rest (kernels, compile, compile mode, cuda graph, dtype, device, eval/sample/checkpoint cadence, out, quiet)
# may differ.
RESUME_MUST_MATCH = ("model", "n_layer", "n_head", "n_embd", "block_size", "init_from", "data", "batch_size", "seq_len",
                     "total_batch_size", "max_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2",
                     "grad_clip", "seed")


def check_resume_args(saved, args, ckpt_path):
    """Raise ValueError listing every run-defining argument that differs from the checkpoint's."""
    if not isinstance(saved, dict):
        raise UsageError(f"{ckpt_path}: the checkpoint holds no saved arguments to check the resumed run against")
    diffs = [f"  --{k.replace('_', '-')}: saved {saved.get(k, '(missing)')!r}, now {getattr(args, k)!r}"
             for k in RESUME_MUST_MATCH if saved.get(k, "(missing)") != getattr(args, k)]
    if diffs:
        raise UsageError(f"--resume {ckpt_path}: these arguments differ from the ones the run was started with "
                         "(they change the run's math; pass the saved values; kernels, compile, compile mode, cuda graph, "
                         "dtype, device, eval/sample/checkpoint cadence and out may differ):\n" + "\n".join(diffs))


def check_sample_length(args, block_size):
    """The samples (<|endoftext|> + --sample-prompt + --sample-tokens) must fit the context: checked at start,
    not after training."""
    if args.sample_tokens <= 0:
        return
    n_prompt = 1 + len(gdata.encoding().encode(args.sample_prompt))
    if n_prompt + args.sample_tokens > block_size:
        raise UsageError(f"--sample-tokens {args.sample_tokens} + the prompt's {n_prompt} tokens (<|endoftext|> + "
                         f"--sample-prompt) = {n_prompt + args.sample_tokens} exceeds the model's block size {block_size}: "
                         f"pass --sample-tokens {max(0, block_size - n_prompt)} or less (0: no sample), a shorter "
                         "--sample-prompt, or a larger --block-size")


CKPT_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def checkpoints(out):
    """OUT's ckpt_<step>.pt files, oldest step first."""
    paths = [p for p in Path(out).glob("ckpt_*.pt") if CKPT_NAME.match(p.name)]
    return sorted(paths, key=checkpoint_step)


def checkpoint_step(path):
    return int(CKPT_NAME.match(Path(path).name).group(1))


def find_resume(resume, out):
    """(checkpoint path, run folder) for --resume."""
    if resume != "latest":
        path = Path(resume)
        if path.is_file():
            return path, Path(out) if out else path.parent
        if path.is_dir():
            out, resume = out or path, "latest"
            ckpts = checkpoints(path)
            if not ckpts:
                raise FileNotFoundError(f"--resume {path}: no ckpt_*.pt in that folder")
            return ckpts[-1], Path(out)
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file or run folder")
    if out is None:
        runs = sorted((d for d in Path("runs").glob("*") if checkpoints(d)), key=lambda d: checkpoints(d)[-1].stat().st_mtime)
        if not runs:
            raise FileNotFoundError("--resume: no run folder with checkpoints under runs/; pass --out or a checkpoint path")
        out = runs[-1]
    ckpts = checkpoints(out)
    if not ckpts:
        raise FileNotFoundError(f"--resume: no ckpt_*.pt in {out}")
    return ckpts[-1], Path(out)


def rng_state(device):
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(out, step, state, keep):
    """Atomically write OUT/ckpt_<step>.pt, then delete the older ones but the last `keep` - 1: the one
    just written always stays (a later step's file, should one be there, is not counted or touched)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the checkpoint just written stays), got {keep}")
    path = Path(out) / f"ckpt_{step:07d}.pt"
    with gdata.atomic_write(path) as f:
        torch.save(state, f)
    older = [p for p in checkpoints(out) if checkpoint_step(p) < step]
    for old in older[:max(0, len(older) - (keep - 1))]:
        old.unlink()
    return path


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _versions():
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional on CPU-only installs
        triton_version = None
    return torch.__version__, triton_version


def forward_backward(model, x, y, autocast, accum, loss_sum):
    """One training micro-step: forward under autocast, loss / accum added into loss_sum (in place),
    backward accumulating into the parameters' .grad."""
    with autocast:
        _, loss = model(x, y)
    loss = loss.float() / accum
    loss_sum += loss.detach()
    loss.backward()


# ---- --cuda-graph: the training micro-step, captured once and replayed ------------------------------

CUDA_GRAPH_WARMUP_STEPS = 1  # optimizer steps run eagerly before the capture (Triton compiles and autotunes there)


class CUDAGraphMicroStep:
    """--cuda-graph: the loop's training micro-step, recorded once in a torch.cuda.CUDAGraph and replayed.

    A micro-step is forward_backward, as the eager loop runs it per micro-batch: forward under autocast,
    loss / accum added into the step's loss sum, backward accumulating into the parameters' .grad. A
    replay launches the same kernels in the same order, with none of the Python and dispatch cost per op
    (at GPT-2 124M on an H100 our custom ops cost more host time than device time). What capture needs (PyTorch's "CUDA Graphs"
    notes, whole-network capture):
      - fixed addresses. Each batch is copied into the same input tensors x, y; the loss is added into
        one loss_sum tensor; the .grad tensors exist before the capture and are zeroed in place (never set
        to None) before each optimizer step, so backward's AccumulateGrad adds into the same memory on
        every replay: gradient accumulation over micro-steps works as in eager. Parameters are updated in
        place by the optimizer, outside the graph.
      - nothing on the host inside: the loop turns the loss-row checks off (the only syncs in the ops);
        the loss read (the one sync per step), clipping and the optimizer step stay in the loop.
      - autocast with cache_enabled=False: its cache of weight casts must not live across a capture.
      - warm-up before the capture: the first CUDA_GRAPH_WARMUP_STEPS optimizer steps run this very
        micro-step eagerly (Triton compiles and autotunes, the CUDA extension loads, cuBLAS sets up its
        handle and workspace) on the side stream the capture then uses; their grads start as None, as in
        the eager loop. Same kernels, same order: the loss curve is the eager one.
    Memory: what the captured micro-step allocates stays reserved in the graph's private pool for the
    replays (about one eager micro-step's peak), next to the grads and the static inputs. Evaluation,
    sampling and checkpoints use the model eagerly, outside the graph: they never touch that pool, the
    inputs or the grads.
    """

    def __init__(self, model, batch_size, seq_len, accum, dtype, device):
        if device.index is not None:  # the capture, its stream and Triton's launches use the current device
            torch.cuda.set_device(device)
        self.model, self.accum = model, accum
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # the tied wte once
        self.x = torch.zeros((batch_size, seq_len), dtype=torch.long, device=device)
        self.y = torch.zeros_like(self.x)
        self.loss_sum = torch.zeros((), device=device)  # sum over the step's micro-steps of loss / accum
        self.autocast = (torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype != torch.float32
                         else contextlib.nullcontext())
        self.stream = torch.cuda.Stream(device)  # warm-up and capture; replays run on the current stream
        self.graph = None
        self.steps = 0  # optimizer steps begun

    def begin_step(self):
        """Before an optimizer step's first micro-step: the grads and the loss sum to zero."""
        if self.steps < CUDA_GRAPH_WARMUP_STEPS:
            for _, p in self.named:  # as the eager loop's optimizer.zero_grad(set_to_none=True)
                p.grad = None
        else:  # from now on the grads keep their addresses: the graph adds into them
            missing = [n for n, p in self.named if p.grad is None]
            if missing:
                raise TrainingError(f"--cuda-graph: {', '.join(missing)} got no gradient in the warm-up step; "
                                    "the graph can only accumulate into gradients that exist")
            torch._foreach_zero_([p.grad for _, p in self.named])
        self.loss_sum.zero_()
        self.steps += 1

    def micro_step(self, batch):
        """One micro-batch (CPU tensors x, y): copy it into the static inputs, then warm up, capture or replay."""
        x, y = batch
        self.x.copy_(x.pin_memory(), non_blocking=True)  # as _to_device: async copies from pinned memory
        self.y.copy_(y.pin_memory(), non_blocking=True)
        if self.graph is None:
            current = torch.cuda.current_stream()
            self.stream.wait_stream(current)  # the inputs, the zeroed grads and loss sum are ready
            if self.steps <= CUDA_GRAPH_WARMUP_STEPS:
                with torch.cuda.stream(self.stream):
                    self._forward_backward()
            else:
                self._capture()
            current.wait_stream(self.stream)
        if self.graph is not None:
            self.graph.replay()  # on the current stream, after the input copies

    def _forward_backward(self):
        forward_backward(self.model, self.x, self.y, self.autocast, self.accum, self.loss_sum)

    def _capture(self):
        grads = [p.grad for _, p in self.named]
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self.stream):  # records the kernels; runs none of them
            self._forward_backward()
        if any(p.grad is not g for (_, p), g in zip(self.named, grads)):  # replays would not accumulate
            raise TrainingError("--cuda-graph: backward replaced a .grad tensor during the capture instead of adding into it")


# ---- the run ------------------------------------------------------------------------------------

def train(args):
    """Run training; returns the list of logged step records (rank 0; other ranks get [])."""
    rank, local_rank, world, device = setup_distributed(args.device)
    # No host-device sync per micro-step: the fused losses would read one scalar back per call to raise
    # on an invalid row; the loop reads the loss once per step and stops on NaN/inf instead.
    checks = kernels.set_loss_row_checks(False)
    try:
        log = _train(args, rank, world, device)
        # Rank 0 may still be writing the last checkpoint: a rank that tears gloo down while its peer still
        # uses the connection aborts. (If rank 0 fails instead, torchrun stops the ranks waiting here.)
        if world > 1:
            torch.distributed.barrier()
        return log
    finally:
        kernels.set_loss_row_checks(checks)
        if world > 1:
            torch.distributed.destroy_process_group()


def _train(args, rank, world, device):
    master = rank == 0
    resolve_defaults(args, device)
    check_cuda_graph_args(args, device, world)
    say = print if master else (lambda *a, **k: None)
    say(f"kernels: {args.kernels}   device: {device_name(device)} x {world}   dtype: {args.dtype}")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    # Fail early on what would only fail at the end (sample) or at the first evaluation.
    if (args.sample_tokens > 0 or args.sample_every > 0) and not hasattr(GPT, "generate"):
        raise TrainingError("sampling needs GPT.generate (gpt2/model.py), which is missing; pass --sample-tokens 0 to train without samples")
    if args.hellaswag_every > 0:
        from gpt2.hellaswag import evaluate as hellaswag_evaluate  # noqa: F401  (import errors surface now)

    # Run folder and checkpoint to resume from.
    ckpt, resumed_from = None, None
    if args.resume:
        ckpt_path, out = find_resume(args.resume, args.out)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        resumed_from = str(ckpt_path)
        say(f"resuming from {ckpt_path} (step {ckpt['step']})")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        data_name = Path(str(args.data)).stem if args.data != "shakespeare" else "shakespeare"
        model_name = args.model or Path(args.init_from).name
        out = Path(args.out or f"runs/{model_name}-{data_name}-{stamp}")
        if (out / "log.jsonl").exists() or checkpoints(out):  # every rank checks: none may hang waiting for rank 0
            raise TrainingError(f"{out} already holds a run; pass --resume to continue it, or another --out")
    if master:
        out.mkdir(parents=True, exist_ok=True)

    # Model.
    torch.manual_seed(args.seed)
    if ckpt is not None:
        config = GPTConfig(**ckpt["config"])
        model = GPT(config, kernels=args.kernels)
    elif args.init_from:
        model = GPT.from_pretrained(args.init_from, kernels=args.kernels)
        config = model.config
    else:
        overrides = {k: v for k, v in (("n_layer", args.n_layer), ("n_head", args.n_head), ("n_embd", args.n_embd),
                                       ("block_size", args.block_size)) if v is not None}
        config = GPTConfig.preset(args.model, **overrides)
        model = GPT(config, kernels=args.kernels)
    if args.seq_len is None:
        args.seq_len = min(64, config.block_size) if device.type == "cpu" else config.block_size
    if args.seq_len > config.block_size:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the model's block size {config.block_size}")
    B, T = args.batch_size, args.seq_len
    per_micro = B * T * world
    if args.total_batch_size is None:
        args.total_batch_size = per_micro
    if args.total_batch_size % per_micro:
        raise UsageError(f"--total-batch-size {args.total_batch_size} is not a multiple of batch-size x seq-len x world-size "
                         f"= {B} x {T} x {world} = {per_micro}")
    accum = args.total_batch_size // per_micro
    if ckpt is not None:
        check_resume_args(ckpt.get("args"), args, resumed_from)
    check_sample_length(args, config.block_size)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    raw = model

    optimizer = build_optimizer(raw, args)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])

    # Data.
    train_loader = gdata.make_loader(args.data, "train", B, T, rank, world, args.seed, config.vocab_size)
    val_loader = gdata.make_loader(args.data, "val", B, T, rank, world, args.seed, config.vocab_size) if args.eval_every else None
    if ckpt is not None:
        train_loader.load_state_dict(ckpt["loader"])
    eval_steps, eval_note = eval_plan(args.eval_tokens, B, T, world, val_loader.steps_per_epoch) if val_loader else (0, None)

    if args.compile:
        model = torch.compile(model, mode=args.compile_mode)
    evaluator = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    graph_step = CUDAGraphMicroStep(raw, B, T, accum, dtype, device) if args.cuda_graph else None

    start = ckpt["step"] if ckpt is not None else 0
    if ckpt is not None:
        states = ckpt["rng"]
        if len(states) != world:
            say(f"note: checkpoint has RNG states of {len(states)} rank(s), this run has {world}")
        set_rng_state(states[rank % len(states)], device)
    del ckpt

    fpt = flops.flops_per_token(config, T)
    peak = args.peak_flops or (flops.peak_flops(device_name(device), args.dtype) if device.type == "cuda" else None)
    if master:
        torch_version, triton_version = _versions()
        meta = {"args": vars(args), "kernels": args.kernels, "kernel_backends": raw.ops.backends, "world_size": world,
                "grad_accum_steps": accum, "model_config": config.to_dict(), "num_params": raw.num_params(),
                "flops_per_token": fpt, "peak_flops": peak, "device_name": device_name(device),
                "torch_version": torch_version, "triton_version": triton_version, "resumed_from": resumed_from}
        if resumed_from:
            note = set_aside_later_steps(out, start)
            if note:
                say(note)
        (out / "config.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        say(f"model: {raw.num_params():,} params {config}\nout: {out}   steps {start}..{args.max_steps}   "
            f"{args.total_batch_size:,} tokens/step = {B} x {T} x {world} rank(s) x {accum} accum   "
            f"{fpt / 1e9:.3f} GFLOP/token   peak {'unknown' if not peak else f'{peak / 1e12:.0f} TFLOP/s'}")
        if graph_step is not None:
            say(f"cuda graph: {CUDA_GRAPH_WARMUP_STEPS} eager warm-up step(s), then every micro-step replays one captured graph")
        if eval_note:
            say(eval_note)

    if args.profile > args.max_steps - start:
        raise UsageError(f"--profile {args.profile}: this run does only {args.max_steps - start} step(s) "
                         f"(steps {start}..{args.max_steps}); profile at most that many")
    profiler = gprofile.StepProfiler(device) if args.profile and master else None
    log = []
    last_ckpt = checkpoints(out)[-1] if master and checkpoints(out) else None
    enc = None
    model.train()
    for step in range(start, args.max_steps):
        if profiler is not None and step == args.max_steps - args.profile:
            profiler.start()  # the last --profile steps (gpt2/profile.py)
        t0 = time.perf_counter()
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if graph_step is not None:  # --cuda-graph: the same micro-steps, replayed from one CUDA graph
            graph_step.begin_step()
            for _ in range(accum):
                graph_step.micro_step(train_loader.next_batch())
            loss_sum = graph_step.loss_sum
        else:
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                x, y = _to_device(train_loader.next_batch(), device)
                sync = micro == accum - 1  # DDP all-reduces the grads in the last micro-step's backward only
                with model.no_sync() if world > 1 and not sync else contextlib.nullcontext():
                    forward_backward(model, x, y, autocast, accum, loss_sum)
        if world > 1:
            torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
        norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        # The one host sync per step, before the update: a NaN/inf loss or gradient never reaches the weights.
        loss_value, norm_value = torch.stack([loss_sum, norm.float()]).tolist()
        done = step + 1
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written before it"
            raise TrainingError(f"step {done}: loss {loss_value}, grad norm {norm_value}: not finite; stopping "
                                f"before the update ({where}; nothing was saved for step {done})")
        optimizer.step()
        if graph_step is None:  # (--cuda-graph keeps the grads' memory and zeroes it in begin_step)
            optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        tps = args.total_batch_size / dt
        record = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": norm_value, "step_time_s": dt,
                  "tokens_per_sec": tps, "mfu": flops.mfu(tps, fpt, peak, world),
                  "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
        last = done == args.max_steps
        if profiler is not None and profiler.active:
            record["profiled"] = True
            profiler.step_done(dt)
            if last:  # stopped before the last step's evaluations and checkpoint; printed after its log line
                try:
                    profiled = gprofile.table(profiler.finish(
                        out, tokens_per_step=args.total_batch_size // world, flops_per_token=fpt, peak_flops=peak,
                        note=_profile_note(args, start)))
                except Exception as e:  # diagnostics: a profiler failure is reported, the run itself goes on
                    profiled = f"warning: --profile failed, no profile.json ({type(e).__name__}: {e})"
        if val_loader is not None and (done % args.eval_every == 0 or last):
            record["val_loss"] = evaluate_loss(evaluator, val_loader, eval_steps, device, autocast, world)
        if args.hellaswag_every and (done % args.hellaswag_every == 0 or last):
            from gpt2.hellaswag import evaluate as hellaswag_evaluate

            evaluator.eval()
            with autocast:
                record["hellaswag"] = hellaswag_evaluate(raw, limit=args.hellaswag_limit, device=device, rank=rank, world_size=world)
            evaluator.train()
        if master:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            log.append(record)
            if not args.quiet:
                say(_console_line(record, args.max_steps))
            if record.get("profiled") and last:  # (also with --quiet: it is not a per-step line)
                say(profiled)
        if args.sample_tokens and args.sample_every and done % args.sample_every == 0 and not last and master:
            enc = enc or gdata.encoding()
            say(f"--- sample at step {done} ---\n{sample(raw, enc, args, device, autocast)}")
        if not args.no_checkpoint and ((args.checkpoint_every and done % args.checkpoint_every == 0) or last):
            states = [rng_state(device)]
            if world > 1:
                states = [None] * world
                torch.distributed.all_gather_object(states, rng_state(device))
            if master:
                state = {"model": raw.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                         "loader": train_loader.state_dict(), "rng": states, "config": config.to_dict(),
                         "args": vars(args), "kernels": args.kernels, "world_size": world}
                last_ckpt = save_checkpoint(out, done, state, args.keep_checkpoints)
    if master and args.sample_tokens:
        enc = enc or gdata.encoding()
        text = sample(raw, enc, args, device, autocast)
        (out / "sample.txt").write_text(text + "\n")
        say(f"--- sample after {args.max_steps} steps ---\n{text}")
    return log


def _profile_note(args, start):
    """What else ran inside the profiled steps (their evaluations, samples, checkpoints), or None."""
    first = max(start, args.max_steps - args.profile) + 1
    extra = [f"{flag} at step {d}" for d in range(first, args.max_steps)
             for flag, every in (("val loss", args.eval_every), ("HellaSwag", args.hellaswag_every),
                                 ("sample", args.sample_every if args.sample_tokens else 0),
                                 ("checkpoint", 0 if args.no_checkpoint else args.checkpoint_every))
             if every and d % every == 0]
    return ("the profiled window also holds " + ", ".join(extra) + ": their kernels are counted") if extra else None


def _to_device(batch, device):
    if device.type == "cuda":  # pinned host memory + async copy: the copy overlaps the previous micro-step
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
    return batch


def eval_plan(eval_tokens, B, T, world, val_steps):
    """(micro-batches per evaluation, a note when they hold other than --eval-tokens tokens, else None):
    whole micro-batches of B x T x world tokens, at least one, at most one pass over the val split."""
    per_micro = B * T * world
    steps = max(1, min(eval_tokens // per_micro, val_steps))
    if steps * per_micro == eval_tokens:
        return steps, None
    if eval_tokens // per_micro > val_steps:
        why = f"the val split holds only {val_steps} per pass"
    else:
        why = "an evaluation runs whole micro-batches" + (", at least one" if eval_tokens < per_micro else "")
    return steps, (f"note: evaluating {steps * per_micro:,} val tokens = {steps} micro-batch(es) of {B} x {T} x {world} "
                   f"rank(s), not --eval-tokens {eval_tokens:,}: {why}")


@torch.no_grad()
def evaluate_loss(model, loader, steps, device, autocast, world):
    """Mean loss over the first `steps` val micro-batches of every rank (the same batches each time)."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = _to_device(loader.next_batch(), device)
        with autocast:
            _, loss = model(x, y)
        total += loss.float()
    total /= steps
    if world > 1:
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.AVG)
    model.train()
    return total.item()




@torch.no_grad()
def sample(raw, enc, args, device, autocast):
    """Text the model writes after <|endoftext|> + --sample-prompt (seeded, so runs are comparable)."""
    raw.eval()
    prompt = [gdata.EOT] + enc.encode(args.sample_prompt)
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with autocast:
        out = raw.generate(idx, args.sample_tokens, temperature=1.0, top_k=args.top_k, generator=generator)
    raw.train()
    return enc.decode(out[0, 1:].tolist())


def set_aside_later_steps(out, step):
    """On resume from step `step`: what OUT holds of later steps (checkpoints, log lines) belongs to the
    timeline given up; it moves to a new OUT/abandoned_<n>/, never deleted, and no longer found by --resume
    or pruned in place of the new checkpoints. Returns a note saying what moved, or None."""
    log_path = out / "log.jsonl"
    kept, later, cut = _split_log(log_path, step)
    later_ckpts = [p for p in checkpoints(out) if checkpoint_step(p) > step]
    if not later_ckpts and not later:
        return None
    n = 1
    while (out / f"abandoned_{n}").exists():
        n += 1
    aside = out / f"abandoned_{n}"
    aside.mkdir()
    for path in later_ckpts:
        os.replace(path, aside / path.name)
    if later:
        (aside / "log.jsonl").write_text("".join(line + "\n" for line in later))
        with gdata.atomic_write(log_path, "w") as f:
            f.write("".join(line + "\n" for line in kept))
    moved = [p.name for p in later_ckpts]
    if later:
        moved.append(f"{len(later)} log line(s)" + (" (the last one cut short)" if cut else ""))
    return f"note: resuming at step {step}: moved {', '.join(moved)} of later steps to {aside}/ (they run again)"


def _split_log(path, step):
    """(lines of steps <= step, lines of later steps, whether the last line was cut short) of log.jsonl.
    A last line that is no JSON record was being written when the process died: a later step. One
    elsewhere is damage: TrainingError naming it."""
    lines = path.read_text().splitlines() if path.exists() else []
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    kept, later = [], []
    for number, line in numbered:
        try:
            line_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError) as e:
            if number == numbered[-1][0]:
                later.append(line)
                return kept, later, True
            raise TrainingError(f"{path}: line {number} is not a log record ({type(e).__name__}: {e}): {line[:100]!r}; "
                                "repair or remove that line, then resume again") from e
        (kept if line_step <= step else later).append(line)
    return kept, later, False


def _console_line(r, max_steps):
    parts = [f"step {r['step']:>5}/{max_steps}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}", f"norm {r['grad_norm']:.3f}",
             f"{r['step_time_s'] * 1000:.0f} ms", f"{r['tokens_per_sec']:,.0f} tok/s"]
    if r["mfu"] is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    if r["peak_mem_bytes"] is not None:
        parts.append(f"mem {r['peak_mem_bytes'] / 2**30:.1f} GiB")
    if "val_loss" in r:
        parts.append(f"val {r['val_loss']:.4f}")
    if "hellaswag" in r:
        parts.append(f"hellaswag {r['hellaswag'].get('acc_norm', float('nan')):.4f}")
    return " | ".join(parts)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return train(args)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except (UsageError, FileNotFoundError, gdata.ShardError, gdata.DownloadError, kernels.BackendUnavailable) as e:
        # what the user can fix: the message alone (tests and library callers get the exception)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
