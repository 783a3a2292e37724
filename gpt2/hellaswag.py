"""HellaSwag (validation, 10,042 examples) scored as completion, for our checkpoints and Hugging Face GPT-2.

    python -m gpt2.hellaswag --model gpt2 --kernels triton --json
    python -m gpt2.hellaswag --model runs/tiny --limit 500

Each example is a context and 4 endings. Each of the 4 rows is `ctx` followed by " " + ending; the
two are tokenized separately (so the ending's tokens are exactly those of " " + ending) and the
score of an ending is the log-likelihood of its tokens only, given everything before them.
Three predictions per example, each an argmax over the 4 endings (ties go to the first):
  acc            sum of the ending's token log-probs
  acc_norm       mean log-prob per ending token (the GPT-2 reproduction videos / llm.c)
  acc_norm_char  sum / number of characters of the ending, without the leading space: the
                 lm-evaluation-harness definition (`completion_len = len(choice)` with the " "
                 target delimiter outside the choice)
The text is used as written in the file (the harness also rewrites "[title]"-style markers and
joins ctx_a and ctx_b itself, so its numbers differ slightly). Contexts longer than the model's
block_size lose their leftmost tokens.

Batching: `batch_size` examples (4 rows each) per forward pass, every batch padded to one length,
the longest example rounded up to a multiple of 32 (capped at block_size), and the last batch padded
with dummy rows, so a compiled model sees one shape for the whole evaluation. Under torchrun each
rank scores examples[rank::world_size] and the counts are summed with all_reduce; the CLI sets up the
process group itself when WORLD_SIZE > 1 (`torchrun --nproc_per_node=N -m gpt2.hellaswag ...`) and
prints on rank 0 only. The download is checked (sha256 and line count) before it is used.

--model goes through `gpt2.generate.load_model` (one loader for both CLIs): our trainer's
checkpoint file or run directory, a Hugging Face GPT-2 directory, or a hub name.
"""
import argparse
import hashlib
import json
import os
import sys
import urllib.request

import torch

from gpt2.data import DownloadError, encoding


URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FILENAME = "hellaswag_val.jsonl"
SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
LINES = 10042
PAD_MULTIPLE = 32


# ---- data ------------------------------------------------------------------------------------

def default_data_path():
    """$GPT2_DATA_CACHE/hellaswag/hellaswag_val.jsonl when present, else the user cache (downloaded once)."""
    shared = os.environ.get("GPT2_DATA_CACHE")
    if shared and os.path.isfile(os.path.join(shared, "hellaswag", FILENAME)):
        return os.path.join(shared, "hellaswag", FILENAME)
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gpt2-kernel-lab", "hellaswag")
    return os.path.join(cache, FILENAME)


def download(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.part"
    print(f"downloading {URL} -> {path}", file=sys.stderr)
    try:
        urllib.request.urlretrieve(URL, tmp)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DownloadError(f"could not download HellaSwag from {URL} ({e}); put {FILENAME} under $GPT2_DATA_CACHE/hellaswag/ or pass --data") from e
    digest, lines = hashlib.sha256(), 0
    with open(tmp, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            lines += chunk.count(b"\n")
    if digest.hexdigest() != SHA256 or lines != LINES:
        os.remove(tmp)
        raise DownloadError(f"{URL}: downloaded file has sha256 {digest.hexdigest()} and {lines:,} lines, expected "
                           f"sha256 {SHA256} and {LINES:,} lines; deleted it (put a good {FILENAME} under "
                           "$GPT2_DATA_CACHE/hellaswag/ or pass --data)")
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none


def read_examples(path, limit=None):
    """The first `limit` examples of a HellaSwag jsonl file as dicts (ctx, endings, label, where =
    "path:line"). Blank lines are skipped; a malformed line raises ValueError naming its line number."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None (all examples) or an integer >= 1, got {limit!r}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: bad JSON ({e})") from None
            if not isinstance(d, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
            ctx, endings, label = d.get("ctx"), d.get("endings"), d.get("label")
            if not isinstance(ctx, str) or not ctx:
                raise ValueError(f"{where}: 'ctx' must be a non-empty string")
            if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) and e for e in endings):
                raise ValueError(f"{where}: 'endings' must be a list of 4 non-empty strings")
            if isinstance(label, str) and label.isdigit():
                label = int(label)  # the HF datasets copy stores labels as strings
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < 4:
                raise ValueError(f"{where}: 'label' must be 0, 1, 2 or 3, got {d.get('label')!r}")
            examples.append(dict(ctx=ctx, endings=endings, label=label, where=where))
    return examples


_TOKENIZED = {}  # (path, mtime, limit) -> list of (ctx_ids, [ending_ids x4], [ending chars x4], label, "path:line")


def tokenized_examples(path, limit=None):
    """Tokenized examples, cached in memory: the trainer evaluates the same file again and again."""
    key = (os.path.abspath(path), os.path.getmtime(path), limit)
    if key not in _TOKENIZED:
        enc = encoding()
        out = []
        for ex in read_examples(path, limit):
            ends = enc.encode_ordinary_batch([" " + e for e in ex["endings"]])
            out.append((enc.encode_ordinary(ex["ctx"]), ends, [len(e) for e in ex["endings"]], ex["label"], ex["where"]))
        _TOKENIZED.clear()
        _TOKENIZED[key] = out
    return _TOKENIZED[key]


# ---- scoring ---------------------------------------------------------------------------------

def pad_length(examples, block_size):
    longest = max((len(ex[0]) + len(e) for ex in examples for e in ex[1]), default=1)
    return min(block_size, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)


def build_batch(batch, T, rows):
    """(rows, T) tokens, targets (-1 outside the endings) and the ending lengths in tokens and chars.
    Each example: (ctx_ids, [ending_ids x4], [ending chars x4], label[, "path:line" for errors])."""
    tokens = torch.zeros(rows, T, dtype=torch.long)
    targets = torch.full((rows, T), -1, dtype=torch.long)
    n_tok = torch.ones(rows, dtype=torch.long)
    n_char = torch.ones(rows, dtype=torch.long)
    for i, ex in enumerate(batch):
        ctx, ends, chars = ex[:3]
        where = ex[4] if len(ex) > 4 else "an example"
        if not ctx:
            raise ValueError(f"{where}: empty context (an ending's first token needs at least one token before it)")
        for j, end in enumerate(ends):
            r = 4 * i + j
            if len(end) >= T:
                raise ValueError(f"{where}: ending {j} ({len(end)} tokens) does not fit the padded length {T} "
                                 "(it needs at least one context token before it; block_size too small)")
            seq = (ctx + end)[-T:]  # too long: drop the leftmost context tokens
            tokens[r, : len(seq)] = torch.tensor(seq)
            # position p predicts token p + 1: the ending's tokens are predicted from len(seq)-len(end)-1 on
            start = len(seq) - len(end)
            targets[r, start - 1: len(seq) - 1] = torch.tensor(end)
            n_tok[r], n_char[r] = len(end), chars[j]
    return tokens, targets, n_tok, n_char


@torch.no_grad()
def score_batch(model, tokens, targets):
    """Sum of log p(target) over the positions with target != -1, per row (float64)."""
    logits = model(tokens)[0]  # (R, T, V): one fixed shape, whatever the batch holds
    mask = targets != -1
    picked = logits[mask]  # (n, V): only the ending positions get the fp32 log-softmax
    picked = picked.to(torch.promote_types(picked.dtype, torch.float32))
    logp = picked.gather(-1, targets[mask][:, None]).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    per_position = torch.zeros(targets.shape, dtype=torch.float64, device=tokens.device)
    per_position[mask] = logp.double()  # then a plain row sum: deterministic, unlike atomic index_add_
    return per_position.sum(dim=1)


def _unwrap(model):
    """The module to call (DDP: the wrapped one; a compiled model stays compiled) and its GPTConfig."""
    raw = getattr(model, "module", model)
    return raw, raw.config


def ending_scores(model, examples, batch_size=16, device=None, T=None):
    """Summed log-likelihood of each ending, (N, 4) float64 on the CPU, and the (N, 4) ending
    lengths in tokens and in characters. T: the padded length (default: from these examples)."""
    raw, config = _unwrap(model)
    device = device or next(raw.parameters()).device
    T = T or pad_length(examples, config.block_size)
    sums, n_tok, n_char = [], [], []
    for start in range(0, len(examples), batch_size):
        batch = examples[start: start + batch_size]
        tokens, targets, nt, nc = build_batch(batch, T, rows=4 * batch_size)
        k = 4 * len(batch)  # the rest are dummy rows that keep the shape fixed
        sums.append(score_batch(raw, tokens.to(device), targets.to(device)).cpu()[:k])
        n_tok.append(nt[:k])
        n_char.append(nc[:k])
    if not sums:
        return (torch.zeros(0, 4, dtype=torch.float64),) * 3
    return tuple(torch.cat(x).view(-1, 4).double() for x in (sums, n_tok, n_char))


def predictions(sums, n_tok, n_char):
    """The acc, acc_norm and acc_norm_char predictions, each (N,) (argmax; ties go to the first)."""
    return sums.argmax(1), (sums / n_tok).argmax(1), (sums / n_char).argmax(1)


def evaluate(model, data_path=None, limit=None, batch_size=16, device=None, rank=0, world_size=1):
    """HellaSwag accuracy of `model` (a GPT, compiled or not): dict(n, acc, acc_norm, acc_norm_char).

    limit: the first N examples only. batch_size: examples (4 rows each) per forward pass.
    Under torchrun pass rank/world_size: each rank scores examples[rank::world_size] and the counts
    are all-reduced, so every rank returns the same numbers. Runs under whatever autocast the caller
    set; the model's train/eval mode is left alone (GPT has no dropout, and flipping it would make a
    compiled model recompile).
    """
    path = data_path or default_data_path()
    if not os.path.isfile(path):
        if data_path:
            raise FileNotFoundError(f"{path}: no such HellaSwag file")
        if rank == 0:
            download(path)
        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    examples = tokenized_examples(path, limit)
    if not examples:
        raise ValueError(f"{path}: no examples (an empty or blank-only file)")
    raw, config = _unwrap(model)
    T = pad_length(examples, config.block_size)  # from all examples: one shape on every rank
    mine = examples[rank::world_size]
    sums, n_tok, n_char = ending_scores(raw, mine, batch_size, device, T)
    labels = torch.tensor([ex[3] for ex in mine], dtype=torch.long)
    counts = [float(len(mine))] + [float((p == labels).sum()) for p in predictions(sums, n_tok, n_char)]
    counts = torch.tensor(counts, dtype=torch.float64)
    if world_size > 1 and torch.distributed.is_initialized():
        counts = counts.to(device or next(raw.parameters()).device)
        torch.distributed.all_reduce(counts)
        counts = counts.cpu()
    n = int(counts[0])
    acc, acc_norm, acc_norm_char = (float(c) / max(n, 1) for c in counts[1:])
    return dict(n=n, acc=acc, acc_norm=acc_norm, acc_norm_char=acc_norm_char)


# ---- CLI -------------------------------------------------------------------------------------

def main(argv=None):
    from gpt2.generate import add_model_args, int_at_least, load_model_from_args, user_errors

    p = argparse.ArgumentParser(prog="python -m gpt2.hellaswag", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--data", help=f"HellaSwag jsonl (default: {default_data_path()}, downloaded if missing)")
    p.add_argument("--limit", type=int_at_least(1), help="only the first N examples")
    p.add_argument("--batch-size", type=int_at_least(1), default=16, help="examples (4 rows each) per forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object: n, acc, acc_norm, acc_norm_char")
    args = p.parse_args(argv)
    rank, world = 0, 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: each rank scores its share, rank 0 prints
        from gpt2.train import setup_distributed

        rank, _, world, dist_device = setup_distributed(args.device)  # nccl on cuda:LOCAL_RANK, else gloo on cpu
        args.device = str(dist_device)
    try:
        with user_errors(p):
            model, device, autocast = load_model_from_args(args)
            with autocast:
                result = evaluate(model, args.data, args.limit, args.batch_size, device, rank=rank, world_size=world)
        if rank == 0 and args.json:
            print(json.dumps(result))
        elif rank == 0:
            print(f"HellaSwag ({result['n']} examples): acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}  "
                  f"acc_norm_char {result['acc_norm_char']:.4f}")
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
