"""Sample text from our checkpoints or Hugging Face GPT-2, streaming tokens as they are produced.

    python -m gpt2.generate --model gpt2 --prompt "Hello, I'm a language model," --top-k 50
    python -m gpt2.generate --model runs/tiny --prompt "ROMEO:" --temperature 0 --max-new-tokens 200

Sampling is `GPT.generate_stream` (gpt2/model.py): a KV cache, so each new token runs one position
through the model; temperature 0 is greedy; top-k and top-p (nucleus) filter before sampling; padded
vocab ids are never candidates. A sample stops at <|endoftext|>, or at max-new-tokens; a prompt plus
max-new-tokens longer than the model's block_size is an error (no sliding window).

`load_model(path, kernels, device)` is the one loader both CLIs (this and gpt2/hellaswag.py) use:
  - one of our trainer's checkpoints: a torch.save'd dict with "model" (state_dict) and "config"
    (GPTConfig.to_dict()); or a run directory holding them (its `latest` if any, else the
    highest-numbered ckpt_*.pt / *.pt)
  - a Hugging Face GPT-2 directory (config.json + model.safetensors), or a hub name such as "gpt2"
"""
import argparse
import codecs
import contextlib
import dataclasses
import glob
import os
import pickle
import re
import sys

import torch

from gpt2.model import GPT, GPTConfig


# ---- loading ---------------------------------------------------------------------------------

def find_checkpoint(directory):
    """A run directory's newest checkpoint: `latest` (a checkpoint, a link to one, or a text file
    naming one), else the highest-numbered ckpt_*.pt (our trainer's ckpt_<step>.pt), else *.pt.
    None if there is none."""
    latest = os.path.join(directory, "latest")
    if os.path.isfile(latest):
        if os.path.getsize(latest) < 4096:  # a small text file naming the checkpoint
            with open(latest, "rb") as f:
                head = f.read()
            try:
                name = head.decode("utf-8").strip()
            except UnicodeDecodeError:
                name = ""
            if name and "\n" not in name and os.path.isfile(os.path.join(directory, name)):
                return os.path.join(directory, name)
        return latest
    found = glob.glob(os.path.join(directory, "ckpt_*.pt")) or glob.glob(os.path.join(directory, "*.pt"))
    if not found:
        return None
    step = lambda p: [int(n) for n in re.findall(r"\d+", os.path.basename(p))] or [-1]  # noqa: E731
    return max(found, key=lambda p: (step(p), os.path.getmtime(p)))


def load_checkpoint(path, kernels="torch"):
    """One of our trainer's checkpoint files -> GPT on the CPU."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Our trainer may store Python objects (e.g. RNG states) beside the weights; a full unpickle
        # runs code from the file, so only load checkpoints you trust.
        print(f"{path}: not loadable with weights_only=True; unpickling it fully (trusted files only)", file=sys.stderr)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a checkpoint of ours (expected a dict with 'model' and 'config', got {have})")
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    config = GPTConfig(**{k: v for k, v in ckpt["config"].items() if k in names})
    model = GPT(config, kernels=kernels)
    sd = {}
    for key, value in ckpt["model"].items():
        for prefix in ("_orig_mod.", "module."):  # torch.compile / DDP wrappers
            key = key.removeprefix(prefix)
        sd[key] = value
    model.load_state_dict(sd)
    return model


def load_model(path, kernels="torch", device="cpu"):
    """Our checkpoint file or run directory, a Hugging Face GPT-2 directory, or a hub name -> GPT in
    eval mode on `device`, its ops from the `kernels` spec."""
    if os.path.isfile(path):
        model = load_checkpoint(path, kernels)
    elif os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        ckpt = find_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"{path}: no checkpoint here (no 'latest' or *.pt) and not a Hugging Face directory (no config.json)")
        model = load_checkpoint(ckpt, kernels)
    else:
        model = GPT.from_pretrained(path, kernels=kernels)
    return model.to(device).eval()


def add_model_args(p):
    p.add_argument("--model", required=True, help="our checkpoint file or run directory, a Hugging Face GPT-2 directory, or a hub name (gpt2, gpt2-medium, ...)")
    p.add_argument("--kernels", default="torch", help="kernel spec, e.g. torch, triton, 'triton,cross_entropy=cuda' (default: torch)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="bfloat16 runs under autocast (default: bfloat16 on cuda, float32 on cpu)")


def load_model_from_args(args):
    """-> (model, device, autocast context) from the arguments of add_model_args."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model = load_model(args.model, args.kernels, device)
    autocast = contextlib.nullcontext()
    if dtype == "bfloat16":
        autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return model, device, autocast


# ---- decode speed ----------------------------------------------------------------------------

@torch.no_grad()
def decode_tokens_per_sec(model, batch_size, new_tokens=128, prompt_len=16, use_cache=True, autocast=None):
    """New tokens per second over all rows (top-k 50 sampling, prefill of a random prompt included),
    after one short warm-up run: the number bench/run.py reports for batch 1 and 16."""
    import time

    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(0)
    idx = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), device=device, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with autocast or contextlib.nullcontext():
        model.generate(idx, 4, top_k=50, use_cache=use_cache, generator=g)
        sync()
        t0 = time.perf_counter()
        out = model.generate(idx, new_tokens, top_k=50, use_cache=use_cache, generator=g)
        sync()
    return batch_size * (out.shape[1] - prompt_len) / (time.perf_counter() - t0)


# ---- CLI -------------------------------------------------------------------------------------

@contextlib.contextmanager
def user_errors(parser):
    """In a CLI's main: what the user can fix (a missing file, a bad value or checkpoint, an unavailable
    kernel backend, a missing optional package) ends the program with one `error:` line and exit status 1
    instead of a traceback. Library callers and tests call the functions and get the exception."""
    from kernels import BackendUnavailable

    try:
        yield
    except (OSError, ValueError, ImportError, BackendUnavailable) as e:
        parser.exit(1, f"error: {e}\n")


def int_at_least(low):
    """argparse type: an integer >= low (argparse reports the flag and this message)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def main(argv=None, out=None):
    out = out or sys.stdout
    p = argparse.ArgumentParser(prog="python -m gpt2.generate", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--prompt", default="", help="text to continue (empty: start from <|endoftext|>)")
    p.add_argument("--max-new-tokens", type=int_at_least(0), default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-samples", type=int_at_least(1), default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-cache", action="store_true", help="re-run the whole prefix each step (slow; for checking)")
    args = p.parse_args(argv)

    from gpt2.data import encoding

    with user_errors(p):
        enc = encoding()
        model, device, autocast = load_model_from_args(args)
    prompt = enc.encode(args.prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token]
    if len(prompt) + args.max_new_tokens > model.config.block_size:
        p.error(f"prompt ({len(prompt)} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds the model's "
                f"block_size {model.config.block_size} (generation stops at block_size; no sliding window)")
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    samples = []
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---", file=out)
        print(args.prompt, end="", file=out, flush=True)
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a token may end mid-character
        ids = []
        with autocast:
            stream = model.generate_stream(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                           eos=enc.eot_token, use_cache=not args.no_cache, generator=generator)
            for nxt in stream:
                token = int(nxt[0])
                if token == enc.eot_token:
                    break
                ids.append(token)
                print(text.decode(enc.decode_single_token_bytes(token)), end="", file=out, flush=True)
        print(text.decode(b"", final=True), file=out, flush=True)
        samples.append(ids)
    return samples


if __name__ == "__main__":
    main()
