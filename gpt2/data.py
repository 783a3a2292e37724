"""Token shards and a resumable, DDP-aware loader.

    python -m gpt2.data shakespeare --out data/shakespeare       # tiny Shakespeare (the default corpus)
    python -m gpt2.data text a.txt b.txt --out data/mine          # local text files
    python -m gpt2.data fineweb --out data/edu10B --sample 10BT   # FineWeb-Edu (pip install -e ".[data]")

Shard file `<name>_<split>_<index:06d>.bin`: a 32-byte header, then uint16 little-endian GPT-2 token
ids. Header: magic b"GPT2SHRD", uint32 version (1), uint64 token count, 12 reserved zero bytes. The
header lets the loader reject a wrong file (magic/version) and a truncated one (size != header +
2 * count) before training touches it. Every document starts with <|endoftext|> (50256). Preparing
refuses a folder that already holds shards of the same name (old and new shards would mix).

Loader: each shard is cut into sequences of T+1 tokens starting at multiples of T (x = tok[i*T:
(i+1)*T], y shifted by one). An epoch visits every sequence once: the shard order and the order of
sequences inside each shard are permutations drawn from (seed, epoch[, shard]), so any process can
compute batch j of epoch e without reading anything else. Batches are consecutive groups of B
sequences of that order; the micro-batches of one epoch are numbered j = 0, 1, ... and rank r of W
takes j = r, r + W, r + 2W, ...: disjoint parts, and W processes see exactly what one process with
W-fold gradient accumulation sees. The state is (epoch, micro-batches consumed), so a resumed run
(even with another world size) continues from the exact next batch. Dropped per epoch: the < T+1
tail tokens of each shard and the last < B*W sequences.

Token ids are checked against the vocabulary once per shard, when a loader first reads it (a scan of
the memory map); bad files raise ShardError naming the file. Nothing is skipped silently.
"""
import argparse
import bisect
import contextlib
import functools
import hashlib
import numbers
import os
import re
import struct
import sys
import uuid
from pathlib import Path

import numpy as np
import torch

MAGIC = b"GPT2SHRD"
VERSION = 1
HEADER = struct.Struct("<8sIQ12x")  # magic, version, token count, reserved -> 32 bytes
HEADER_BYTES = HEADER.size
EOT = 50256  # GPT-2's <|endoftext|>
VOCAB_SIZE = 50257
SHARD_TOKENS = 100_000_000

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


class ShardError(ValueError):
    """A token shard or dataset that cannot be used; the message names the file."""


# ---- shard files -------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Write `path` through a temp file that is fsynced and renamed over it at the end: a reader (or a
    resume after a crash) sees the old file or the new one, and a failed write leaves no partial file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written file is never left behind, let alone taken as the latest
        raise
    os.replace(tmp, path)


def write_shard(path, tokens):
    """Write `tokens` (ints in [0, 65535]) as one shard, atomically (atomic_write)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 0xFFFF):
        raise ValueError(f"{path}: token ids must fit in uint16, got range [{tokens.min()}, {tokens.max()}]")
    with atomic_write(path) as f:
        f.write(HEADER.pack(MAGIC, VERSION, tokens.size))
        f.write(tokens.astype("<u2").tobytes())


def read_header(path):
    """Return the token count of a shard after checking magic, version and file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte shard header (truncated or not a shard)")
    magic, version, count = HEADER.unpack(head)
    if magic != MAGIC:
        raise ShardError(f"{path}: bad magic {magic!r}, expected {MAGIC!r} (not a token shard from gpt2.data)")
    if version != VERSION:
        raise ShardError(f"{path}: shard version {version}, this code reads version {VERSION}")
    expected = HEADER_BYTES + 2 * count
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise ShardError(f"{path}: {what}: header says {count} tokens ({expected} bytes), file has {size} bytes")
    return count


def read_shard(path):
    """Memory-map a shard's tokens (uint16) after checking its header."""
    count = read_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


class Source:
    """One stream of tokens for the loader: a shard file (memory-mapped on first use) or an array."""

    def __init__(self, name, num_tokens, path=None, tokens=None):
        self.name, self.num_tokens, self.path, self._tokens = name, num_tokens, path, tokens
        self.key = os.path.basename(name)  # what a loader state records: the data folder may move
        self._checked_vocab = None

    @classmethod
    def from_file(cls, path):
        return cls(str(path), read_header(path), path=str(path))

    @classmethod
    def from_array(cls, name, tokens):
        return cls(name, len(tokens), tokens=np.asarray(tokens, dtype=np.uint16))

    def tokens(self, vocab_size):
        if self._tokens is None:
            self._tokens = read_shard(self.path)
        if self._checked_vocab != vocab_size:
            top = _chunked_max(self._tokens)
            if top >= vocab_size:
                where = int(np.argmax(self._tokens >= vocab_size))
                raise ShardError(f"{self.name}: token id {int(self._tokens[where])} at position {where} is >= the vocab size {vocab_size}")
            self._checked_vocab = vocab_size
        return self._tokens


def _chunked_max(a, chunk=1 << 24):
    return max((int(a[i:i + chunk].max()) for i in range(0, len(a), chunk)), default=-1)


def _shard_name(name=".+", split="train|val"):
    """Regex of the file names `<name>_<split>_<index>.bin` (name and split are regexes), anchored at both
    ends: the split is the word before the index, so a dataset called e.g. `hamlet_train` is no train split."""
    return re.compile(rf"^{name}_({split})_\d{{6,}}\.bin$")


def shard_paths(directory, split):
    """The `<name>_<split>_<index>.bin` shards of a folder, sorted. Raises ShardError when there are none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ShardError(f"{directory}: not a directory of token shards")
    pattern = _shard_name(split=re.escape(split))
    paths = sorted(p for p in directory.iterdir() if pattern.match(p.name))
    if not paths:
        raise ShardError(f"{directory}: no *_{split}_*.bin shards (make them with `python -m gpt2.data ...`)")
    return paths


# ---- the loader --------------------------------------------------------------------------------

class DataLoader:
    """Yields (x, y) int64 CPU tensors of shape (B, T); see the module docstring for the order.

    sources: list of Source. rank/world_size: this process's part. shuffle=False reads sequences in
    file order (validation). vocab_size: ids at or above it raise ShardError.
    """

    def __init__(self, sources, batch_size, seq_len, rank=0, world_size=1, seed=0, shuffle=True, vocab_size=VOCAB_SIZE):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.sources, self.B, self.T = list(sources), batch_size, seq_len
        self.rank, self.world_size, self.seed, self.shuffle, self.vocab_size = rank, world_size, seed, shuffle, vocab_size
        self.seqs = [max(0, (s.num_tokens - 1) // seq_len) for s in self.sources]
        self.batches_per_epoch = sum(self.seqs) // batch_size  # micro-batches of all ranks together
        if self.batches_per_epoch < world_size:
            names = ", ".join(s.name for s in self.sources)
            raise ShardError(
                f"{names}: {sum(s.num_tokens for s in self.sources)} tokens make {sum(self.seqs)} sequences of "
                f"{seq_len}+1 tokens, fewer than one batch of {batch_size} for each of {world_size} rank(s)")
        self.steps_per_epoch = self.batches_per_epoch // world_size  # per rank
        self.epoch, self.consumed = 0, 0
        self._order_epoch = None

    def reset(self):
        self.epoch, self.consumed = 0, 0

    def _order(self):
        """Shard order of the current epoch and the cumulative sequence counts along it."""
        if self._order_epoch != self.epoch:
            n = len(self.sources)
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._shard_order = order
            self._cum = np.cumsum([0] + [self.seqs[k] for k in order]).tolist()
            self._perm_cache = {}
            self._order_epoch = self.epoch
        return self._shard_order, self._cum

    def _seq_perm(self, k):
        if k not in self._perm_cache:
            n = self.seqs[k]
            self._perm_cache = {k: np.random.default_rng([self.seed, self.epoch, k]).permutation(n) if self.shuffle else None}
        return self._perm_cache[k]

    def _batch(self, j):
        order, cum = self._order()
        buf = np.empty((self.B, self.T + 1), dtype=np.int64)
        for row, s in enumerate(range(j * self.B, (j + 1) * self.B)):
            pos = bisect.bisect_right(cum, s) - 1
            k = int(order[pos])
            i = s - cum[pos]
            perm = self._seq_perm(k)
            i = int(perm[i]) if perm is not None else i
            tokens = self.sources[k].tokens(self.vocab_size)
            buf[row] = tokens[i * self.T: i * self.T + self.T + 1]
        x = torch.from_numpy(buf[:, :-1].copy())
        y = torch.from_numpy(buf[:, 1:].copy())
        return x, y

    def next_batch(self):
        if self.consumed + self.world_size > self.batches_per_epoch:  # every rank needs one more
            self.epoch, self.consumed = self.epoch + 1, 0
        j = self.consumed + self.rank
        self.consumed += self.world_size
        return self._batch(j)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self):
        return {"version": 1, "epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "shuffle": self.shuffle,
                "batch_size": self.B, "seq_len": self.T, "sources": [[s.key, s.num_tokens] for s in self.sources]}

    def load_state_dict(self, state):
        mine = self.state_dict()
        for key in ("seed", "shuffle", "batch_size", "seq_len", "sources"):
            theirs = state.get(key)
            if key == "sources" and theirs is not None:
                theirs = [list(s) for s in theirs]
            if theirs != mine[key]:
                raise ValueError(f"loader state does not match this loader: {key} was {theirs!r}, now {mine[key]!r}")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


# ---- datasets: shard folders, .txt files, the built-in corpus ---------------------------------

class DownloadError(OSError):
    """Something fetched on first use (tiktoken's BPE files, tiny Shakespeare, HellaSwag) could not be
    downloaded or failed its check; the message says where to put a local copy instead."""


def encoding():
    """tiktoken's GPT-2 BPE. tiktoken downloads its two files on first use and caches them (in
    $TIKTOKEN_CACHE_DIR, else a temp folder); offline, that fails deep inside `requests`: say what to do."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' ConnectionError / HTTPError, or tiktoken's hash check of the download
        raise DownloadError(
            f"tiktoken could not load the GPT-2 BPE files ({type(e).__name__}: {str(e)[:300]}). It downloads them "
            "from openaipublic.blob.core.windows.net on first use; on a machine without internet set "
            "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached copies") from e


def tokenize_documents(texts):
    """GPT-2 tokens of a list of documents, each preceded by <|endoftext|>, as one uint16 array."""
    enc = encoding()
    parts = []
    for ids in enc.encode_ordinary_batch(list(texts)):
        parts.append(np.array([EOT] + ids, dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def split_documents(text, blank_lines):
    if not blank_lines:
        return [text]
    docs = [d.strip("\n") for d in text.replace("\r\n", "\n").split("\n\n")]
    return [d for d in docs if d.strip()]


@functools.lru_cache(maxsize=4)
def _text_tokens(path, mtime):
    with open(path, encoding="utf-8") as f:
        return tokenize_documents([f.read()])


def _train_val(tokens, val_fraction):
    """(train, val): the last `val_fraction` of the tokens are val; each split must get at least one."""
    n_val = int(round(len(tokens) * val_fraction))
    if not 0 < n_val < len(tokens):
        raise ValueError(f"{len(tokens)} tokens with val_fraction {val_fraction} give {n_val} val and {len(tokens) - n_val} "
                         "train tokens: both splits need at least one token (more text, or another --val-fraction)")
    return tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]


def _check_count(name, value, none_means=None):
    """value must be an integer >= 1 (or None, when none_means says what None is): ValueError otherwise."""
    if value is None and none_means is not None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        allowed = f"None ({none_means}) or an integer >= 1" if none_means is not None else "an integer >= 1"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def text_sources(path, split, val_fraction=0.1):
    """A .txt file as one document, tokenized on the fly: the last `val_fraction` of its tokens are val."""
    train, val = _train_val(_text_tokens(str(path), os.path.getmtime(path)), val_fraction)
    return [Source.from_array(f"{path}[{split}]", val if split == "val" else train)]


def resolve_sources(data, split):
    """--data: "shakespeare" (built-in corpus), a .txt file, or a folder of shards."""
    if data == "shakespeare":
        return text_sources(shakespeare_path(), split)
    if str(data).endswith(".txt"):
        if not os.path.isfile(data):
            raise FileNotFoundError(f"{data}: no such text file")
        return text_sources(data, split)
    return [Source.from_file(p) for p in shard_paths(data, split)]


def make_loader(data, split, batch_size, seq_len, rank=0, world_size=1, seed=0, vocab_size=VOCAB_SIZE):
    """The train split is shuffled; val is read in file order."""
    shuffle = split == "train"
    return DataLoader(resolve_sources(data, split), batch_size, seq_len, rank, world_size, seed, shuffle, vocab_size)


def unigram_loss(data):
    """Cross-entropy (nats/token) of the val split under the train split's token frequencies
    (add-one smoothing): the loss of a model that ignores context, a baseline to beat."""
    train = np.concatenate([s.tokens(VOCAB_SIZE) for s in resolve_sources(data, "train")])
    val = np.concatenate([s.tokens(VOCAB_SIZE) for s in resolve_sources(data, "val")])
    counts = np.bincount(train, minlength=VOCAB_SIZE).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val].mean())


def _cache_dirs():
    dirs = []
    env = os.environ.get("GPT2_DATA_CACHE")
    if env:
        dirs += [Path(env), Path(env) / "corpus"]
    dirs.append(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2-kernel-lab")
    return dirs


def shakespeare_path():
    """tinyshakespeare.txt from $GPT2_DATA_CACHE(/corpus), the user cache, or downloaded there."""
    for d in _cache_dirs():
        if (d / "tinyshakespeare.txt").is_file():
            return str(d / "tinyshakespeare.txt")
    target = _cache_dirs()[-1] / "tinyshakespeare.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    import urllib.request

    print(f"downloading tiny Shakespeare from {SHAKESPEARE_URL} to {target}", file=sys.stderr)
    local = "put tinyshakespeare.txt in $GPT2_DATA_CACHE or $GPT2_DATA_CACHE/corpus to use a local copy"
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=60) as r:
            body = r.read()
    except OSError as e:  # URLError, a timeout, a refused connection
        raise DownloadError(f"could not download tiny Shakespeare from {SHAKESPEARE_URL} ({e}); {local}") from e
    digest = hashlib.sha256(body).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise DownloadError(f"{SHAKESPEARE_URL}: sha256 {digest} != expected {SHAKESPEARE_SHA256}; nothing saved; {local}")
    # Every DDP rank may download at once: each writes its own temp file (a shared name would be renamed
    # away under another rank) and renames it over the target; the copies are identical (checked above).
    tmp = target.with_name(f"{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(body)
        os.replace(tmp, target)
    except OSError:
        if not target.is_file():  # else another process saved it first: that copy is the same text
            raise
    finally:
        tmp.unlink(missing_ok=True)  # nothing left after the rename
    return str(target)


# ---- preparing shards --------------------------------------------------------------------------

def refuse_existing_shards(out, name):
    """Shards are never added to those of an earlier preparation (old higher-numbered shards would stay
    and mix in): ShardError when `out` already holds shards named `name`."""
    out = Path(out)
    pattern = _shard_name(re.escape(name))
    existing = sorted(p.name for p in out.iterdir() if pattern.match(p.name)) if out.is_dir() else []
    if existing:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise ShardError(f"{out} already holds {len(existing)} shard(s) named {name!r} ({shown}): new shards would "
                         "mix with them; remove them first, or write to another folder")


class ShardWriter:
    """Accumulates token arrays and writes `<name>_<split>_<index>.bin` shards of `shard_tokens`."""

    def __init__(self, out, name, shard_tokens=SHARD_TOKENS, split_of=lambda index: "train", max_shards=None, progress=None):
        _check_count("shard_tokens", shard_tokens)
        _check_count("max_shards", max_shards, none_means="no limit")
        self.out, self.name, self.shard_tokens, self.split_of, self.max_shards = Path(out), name, shard_tokens, split_of, max_shards
        self.out.mkdir(parents=True, exist_ok=True)
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill, self.index, self.paths, self.progress = 0, 0, [], progress

    @property
    def done(self):
        return self.max_shards is not None and self.index >= self.max_shards

    def add(self, tokens):
        while len(tokens) and not self.done:
            take = min(len(tokens), self.shard_tokens - self.fill)
            self.buf[self.fill:self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.progress is not None:
                self.progress.update(take)
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self):
        if self.fill and not self.done:
            path = self.out / f"{self.name}_{self.split_of(self.index)}_{self.index:06d}.bin"
            write_shard(path, self.buf[:self.fill])
            self.paths.append(path)
            self.index += 1
        self.fill = 0


def prepare_text(files, out, name="text", val_fraction=0.1, blank_lines=False, shard_tokens=SHARD_TOKENS):
    """Local text files -> shards. Documents: one per file, or split on blank lines; the last
    `val_fraction` (0 < val_fraction < 1) of the concatenated tokens go to the val split; both
    splits must get at least one token (the trainer's --eval-every needs a val split)."""
    if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be > 0 and < 1 (the last fraction of the tokens is the val split), got {val_fraction!r}")
    _check_count("shard_tokens", shard_tokens)  # before the tokenizing, not at the first ShardWriter
    refuse_existing_shards(out, name)
    docs = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            docs += split_documents(f.read(), blank_lines)
    train, val = _train_val(tokenize_documents(docs), val_fraction)
    paths = []
    for split, part in (("train", train), ("val", val)):
        w = ShardWriter(out, name, shard_tokens, split_of=lambda i, s=split: s)
        w.add(part)
        w.flush()
        paths += w.paths
    return paths


def _encode_doc(text):
    return np.array([EOT] + encoding().encode_ordinary(text), dtype=np.uint16)


def prepare_documents(texts, out, name, shard_tokens=SHARD_TOKENS, max_shards=None, workers=None, total=None):
    """An iterable of documents -> shards, tokenized in a process pool; shard 0 is the val split."""
    import multiprocessing as mp

    from tqdm import tqdm

    refuse_existing_shards(out, name)
    workers = workers or max(1, (os.cpu_count() or 2) // 2)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=name)
    writer = ShardWriter(out, name, shard_tokens, split_of=lambda i: "val" if i == 0 else "train", max_shards=max_shards, progress=bar)
    with mp.Pool(workers) as pool:
        for tokens in pool.imap(_encode_doc, texts, chunksize=16):
            writer.add(tokens)
            if writer.done:
                pool.terminate()
                break
    writer.flush()
    bar.close()
    return writer.paths


def prepare_fineweb(out, shards=None, sample="10BT", shard_tokens=SHARD_TOKENS, workers=None):
    _check_count("shards", shards, none_means="the whole sample")  # before the download starts
    _check_count("shard_tokens", shard_tokens)
    name = "edufineweb"
    refuse_existing_shards(out, name)  # before the download starts
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise ImportError('FineWeb-Edu needs the `datasets` package: pip install -e ".[data]"') from e
    ds = load_dataset("HuggingFaceFW/fineweb-edu", name=f"sample-{sample}", split="train", streaming=True)
    total = shards * shard_tokens if shards else None
    return prepare_documents((row["text"] for row in ds), out, name, shard_tokens, shards, workers, total)


def _open_fraction(text):
    """argparse type: a float strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 and < 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be > 0 and < 1 (the val split needs tokens, and so does train), got {value}")
    return value


def main(argv=None):
    from gpt2.generate import int_at_least, user_errors

    p = argparse.ArgumentParser(prog="python -m gpt2.data", description="Make GPT-2 token shards.")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fineweb", help="FineWeb-Edu via `datasets`; shard 0 is val")
    f.add_argument("--out", required=True)
    f.add_argument("--shards", type=int_at_least(1), default=None, help="stop after N >= 1 shards (default: the whole sample)")
    f.add_argument("--sample", default="10BT", help="FineWeb-Edu sample: 10BT, 100BT, 350BT")
    f.add_argument("--workers", type=int_at_least(1), default=None, help="tokenizer processes (default: half the CPUs)")
    t = sub.add_parser("text", help="local text files: one document per file (or --split-blank-lines)")
    t.add_argument("files", nargs="+")
    t.add_argument("--out", required=True)
    t.add_argument("--name", default="text")
    t.add_argument("--val-fraction", type=_open_fraction, default=0.1, help="the last fraction (> 0 and < 1) of the tokens is val")
    t.add_argument("--split-blank-lines", action="store_true", help="a blank line separates documents")
    s = sub.add_parser("shakespeare", help="tiny Shakespeare (from $GPT2_DATA_CACHE or downloaded)")
    s.add_argument("--out", required=True)
    for q in (f, t, s):
        q.add_argument("--shard-tokens", type=int_at_least(1), default=SHARD_TOKENS, help="tokens per shard (>= 1)")
    args = p.parse_args(argv)
    with user_errors(p):
        if args.cmd == "fineweb":
            paths = prepare_fineweb(args.out, args.shards, args.sample, args.shard_tokens, args.workers)
        elif args.cmd == "text":
            paths = prepare_text(args.files, args.out, args.name, args.val_fraction, args.split_blank_lines,
                                 args.shard_tokens)
        else:
            paths = prepare_text([shakespeare_path()], args.out, "shakespeare", 0.1, False, args.shard_tokens)
    for path in paths:
        print(f"{path}: {read_header(path):,} tokens")


if __name__ == "__main__":
    main()
