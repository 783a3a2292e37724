"""GPT-2, as OpenAI's 124M checkpoint, with every hot op routed through a kernel backend.

    model = GPT(GPTConfig.preset("gpt2"), kernels="triton,cross_entropy=cuda")
    logits, loss = model(idx, targets)

Every LayerNorm, GELU, attention and the loss call `self.ops.<op>` (see kernels/__init__.py), so
one argument switches the whole model between the pure-PyTorch reference and our kernels. Every
residual add is done by the LayerNorm that reads its sum (`ops.add_layer_norm`: s = x + branch, then the
LayerNorm of s; one kernel each way with layer_norm=triton, the same two PyTorch ops with torch): x + attn
by ln_2, and x + mlp by the next block's ln_1 (or ln_f after the last block). So a block takes and returns
(x, r): the residual stream and its last branch output not yet added (None before the first block).

Vocab padding: the token embedding / lm_head have `padded_vocab_size` rows (50257 -> 50304, a
multiple of 128, so the classifier matmul tiles evenly). The padded columns never win: forward
returns logits[..., :vocab_size], the loss sees only the real columns, and the padded embedding
rows get no gradient from the loss.

Loss path: by default the full logits are built and `ops.cross_entropy` reduces them. When the
spec names `linear_cross_entropy` (e.g. "triton,linear_cross_entropy=cuda"), training calls
`ops.linear_cross_entropy(hidden, wte, targets)`, which never holds the full (B*T, V) logits, and
forward returns (None, loss).

Generation (`model.generate`, `model.generate_stream`): a KV cache keeps every layer's keys and
values, so each new token costs one position. The cached path reuses `ops.layer_norm` and
`ops.gelu`, but attention goes through torch's SDPA with an explicit offset causal mask (a query at
absolute position p sees keys 0..p; SDPA's `is_causal` aligns the mask top-left, which is wrong when
the queries start at an offset). Training never touches that path: its
attention is `ops.attention_qkv`. Generation stops at block_size with a clear error (no sliding window:
the learned position embeddings would make a window re-encode the whole prefix every step).
"""
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import get_ops


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50257  # real tokens: 50,000 BPE merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def padded_vocab_size(self):
        return -(-self.vocab_size // 128) * 128

    # name: (n_layer, n_head, n_embd, block_size). tiny/small are ours, sized for a CPU:
    # tiny trains on tiny Shakespeare in a few CPU-minutes, small is a 6-layer 384-wide model.
    PRESETS = {
        "gpt2": (12, 12, 768, 1024),  # 124M
        "gpt2-medium": (24, 16, 1024, 1024),  # 350M
        "gpt2-large": (36, 20, 1280, 1024),  # 774M
        "gpt2-xl": (48, 25, 1600, 1024),  # 1558M
        "small": (6, 6, 384, 512),
        "tiny": (4, 4, 128, 256),
    }

    @classmethod
    def preset(cls, name, **overrides):
        if name not in cls.PRESETS:
            raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(cls.PRESETS)}")
        n_layer, n_head, n_embd, block_size = cls.PRESETS[name]
        kw = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size)
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self):
        return asdict(self)


def matmul_dtype(x):
    """The dtype a matmul on x computes in: autocast's when it is on for x's device, else None (x's own)."""
    device = x.device.type
    if device == "meta":  # shape inference: autocast has no meta device (and is_autocast_available breaks dynamo's graph)
        return None
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class LayerNorm(nn.Module):
    """Every LayerNorm output here feeds a matmul (c_attn, c_fc, lm_head), so it is written in the dtype
    that matmul computes in: under bf16 autocast the fp32 residual stream goes in and bf16 comes out, with
    no separate cast kernel (and none for the gradient on the way back). keep_dtype: x's dtype instead."""

    def __init__(self, ndim, eps, ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim))
        self.eps = eps
        self.ops = ops

    def forward(self, x, keep_dtype=False):
        out_dtype = None if keep_dtype else matmul_dtype(x)
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps, out_dtype=out_dtype)

    def add_forward(self, x, residual, keep_dtype=False):
        """(x + residual, this LayerNorm of it): the residual add fused into the LayerNorm's kernel."""
        out_dtype = None if keep_dtype else matmul_dtype(x)
        return self.ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps, out_dtype=out_dtype)

    def pending_forward(self, x, residual, keep_dtype=False):
        """(x + residual, its LayerNorm), or (x, ln(x)) when there is no residual (None) to add."""
        if residual is None:
            return x, self(x, keep_dtype)
        return self.add_forward(x, residual, keep_dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, ops):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.ops = ops

    def forward(self, x):
        # q, k, v side by side in one (B, T, 3C) projection, each split into n_head heads of C / n_head;
        # causal attention per head, the heads side by side again: (B, T, C). One op (ops.attention_qkv):
        # the torch backend does the usual split / view / transpose around ops.attention; our kernels read
        # the heads in place and write the gradient of qkv as one tensor
        return self.c_proj(self.ops.attention_qkv(self.c_attn(x), self.n_head))

    def forward_cached(self, x, cache, layer):
        """x (B, T, C) holds positions [cache.pos, cache.pos + T); their k, v are written to the cache."""
        B, T, C = x.shape
        pos = cache.pos
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        keys, values = cache.update(layer, k, v)  # (B, nh, pos + T, hs)
        mask = None  # one query at the newest position sees every cached key
        if T > 1:  # query i sits at absolute position pos + i and sees keys 0 .. pos + i
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config, ops):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.ops = ops

    def forward(self, x):
        return self.c_proj(self.ops.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, ops):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_eps, ops)
        self.attn = CausalSelfAttention(config, ops)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_eps, ops)
        self.mlp = MLP(config, ops)

    def forward(self, x, r=None):
        """(x, r) -> (x, r): r is the previous block's MLP output, not yet added to the stream x (None before
        the first block). Returns the stream after the attention half and this block's MLP output: the add
        x + mlp(...) is done by the next LayerNorm (ln_1 of the next block, or ln_f), in its kernel."""
        x, h = self.ln_1.pending_forward(x, r)  # x = x + r; h = ln_1(x)
        x, h = self.ln_2.add_forward(x, self.attn(h))  # x = x + attn(h); h = ln_2(x)
        return x, self.mlp(h)

    def forward_cached(self, x, r, cache, layer):
        x, h = self.ln_1.pending_forward(x, r)
        x, h = self.ln_2.add_forward(x, self.attn.forward_cached(h, cache, layer))
        return x, self.mlp(h)


class KVCache:
    """Keys and values of every layer for positions [0, pos) of a batch, preallocated to block_size.

    Buffers are allocated on the first write, in the dtype the keys come in (bf16 under autocast).
    """

    def __init__(self, config, batch_size):
        self.n_layer, self.block_size, self.batch_size = config.n_layer, config.block_size, batch_size
        self.k = [None] * config.n_layer  # each (B, nh, block_size, hs)
        self.v = [None] * config.n_layer
        self.pos = 0  # positions already in the cache

    def update(self, layer, k, v):
        B, nh, T, hs = k.shape
        end = self.pos + T
        if end > self.block_size:
            raise ValueError(f"KV cache full: position {end} exceeds block_size {self.block_size}")
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(B, nh, self.block_size, hs)
            self.v[layer] = v.new_empty(B, nh, self.block_size, hs)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) of real vocab ids only -> next ids (B,). temperature 0 is greedy (argmax).

    top_k keeps the k largest logits; top_p keeps the smallest set of ids, in decreasing
    probability, whose total probability reaches top_p (the most likely id is always kept).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this id already reaches top_p
        drop = torch.zeros_like(drop).scatter(-1, order, drop)  # back to vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class GPT(nn.Module):
    def __init__(self, config=None, kernels="torch"):
        super().__init__()
        self.config = config = config or GPTConfig()
        self.ops = get_ops(kernels) if isinstance(kernels, str) else kernels
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config, self.ops) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, config.layer_norm_eps, self.ops),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                std /= math.sqrt(2 * self.config.n_layer)  # residual projections: GPT-2 paper
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def kernels(self):
        return self.ops.spec

    def num_params(self, padded=False):
        """Unique parameters (the tied lm_head counted once). padded=False leaves out the padded vocab
        rows, giving the count of OpenAI's checkpoint (124,439,808 for gpt2)."""
        n = sum(p.numel() for p in self.parameters())
        if not padded:
            n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        return n

    def forward(self, idx, targets=None, ignore_index=-1):
        """idx (B, T) int64 -> (logits (B, T, vocab_size) or None, loss or None).

        Logits are None only when targets are given and the spec selects linear_cross_entropy.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        r = None  # the last block's MLP output, added to x by the next LayerNorm
        for block in self.transformer.h:
            x, r = block(x, r)
        fused_loss = targets is not None and self.ops.fused_classifier
        # linear_cross_entropy scales its hidden gradient after its matmul: in x's dtype (fp32) that adds no
        # rounding, in bf16 it would; so ln_f's output stays fp32 for it (it casts the chunks it multiplies)
        x = self.transformer.ln_f.pending_forward(x, r, keep_dtype=fused_loss)[1]
        V = self.config.vocab_size
        if fused_loss:
            loss = self.ops.linear_cross_entropy(
                x.view(B * T, -1), self.lm_head.weight, targets.reshape(B * T), ignore_index, V)
            return None, loss
        logits = self.lm_head(x)  # (B, T, padded_vocab)
        loss = None
        if targets is not None:
            loss = self.ops.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index, V)
        return logits[..., :V], loss

    # ---- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def forward_cached(self, idx, cache):
        """idx (B, T): the tokens at positions [cache.pos, cache.pos + T). Returns the logits of the
        last position, (B, vocab_size), and advances the cache."""
        B, T = idx.shape
        if cache.pos + T > self.config.block_size:
            raise ValueError(f"KV cache full: position {cache.pos + T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(cache.pos, cache.pos + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        r = None
        for layer, block in enumerate(self.transformer.h):
            x, r = block.forward_cached(x, r, cache, layer)
        cache.pos += T
        x = self.transformer.ln_f.pending_forward(x[:, -1:, :], None if r is None else r[:, -1:, :])[1]
        return self.lm_head(x)[:, -1, : self.config.vocab_size]  # padded ids are never candidates

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos=None,
                        use_cache=True, generator=None):
        """Yield the next token ids (B,) one step at a time; see `generate`."""
        B, T = idx.shape
        if T < 1:
            raise ValueError("generate needs a prompt of at least one token (GPT-2 starts from <|endoftext|>)")
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(
                f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens} exceeds "
                f"block_size {self.config.block_size}; generation stops at block_size (no sliding window)")
        cache = KVCache(self.config, B) if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        step_input = idx
        for _ in range(max_new_tokens):
            if use_cache:
                logits = self.forward_cached(step_input, cache)
            else:
                logits = self(idx)[0][:, -1, :]  # the whole prefix again, through the training path
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)  # finished rows repeat eos
                done |= nxt == eos
            yield nxt
            step_input = nxt[:, None]
            if not use_cache:
                idx = torch.cat([idx, step_input], dim=1)
            if eos is not None and bool(done.all()):
                return

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos=None,
                 use_cache=True, generator=None):
        """idx (B, T) prompt ids -> (B, T + n) with n <= max_new_tokens new ids sampled after it.

        temperature=0 is greedy; top_k / top_p filter before sampling (see `sample_next`). With eos,
        a row that produced eos repeats it, and generation ends early once every row has. use_cache
        runs one position per step through the KV cache; use_cache=False re-runs the whole prefix
        through `forward` (the check that the cache is exact). `generator` (a torch.Generator on the
        model's device) makes sampling reproducible. Raises ValueError if T + max_new_tokens exceeds
        block_size.
        """
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, eos, use_cache, generator))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)

    # ---- Hugging Face checkpoints ---------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, kernels="torch"):
        """Load a Hugging Face GPT2LMHeadModel checkpoint: a local directory with config.json and
        model.safetensors (or pytorch_model.bin), or a hub name such as "gpt2" (needs network)."""
        directory = _hf_directory(path)
        config_file = os.path.join(directory, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{config_file}: missing; a Hugging Face GPT-2 directory has config.json and model.safetensors")
        with open(config_file) as f:
            hf = json.load(f)
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{config_file}: activation_function {act!r} is not GPT-2's tanh GELU (gelu_new)")
        for key, gpt2_value in (("tie_word_embeddings", True), ("scale_attn_by_inverse_layer_idx", False),
                                ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
            if hf.get(key, gpt2_value) != gpt2_value:
                raise ValueError(f"{config_file}: {key}={hf[key]!r} is not GPT-2's ({gpt2_value}); this model cannot load it")
        config = GPTConfig(
            block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
            n_head=hf["n_head"], n_embd=hf["n_embd"], layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5))
        model = cls(config, kernels=kernels)
        sd, source = _read_hf_state_dict(directory)
        model.load_hf_state_dict(sd, source)
        return model

    @torch.no_grad()
    def load_hf_state_dict(self, sd, source="state dict"):
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        ignored = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers
        ours = self.state_dict()
        loaded = set()
        for key, value in sd.items():
            name = key if key.startswith("transformer.") or key.startswith("lm_head.") else "transformer." + key
            if name.endswith(ignored):
                continue
            if name not in ours:
                raise KeyError(f"{source}: unknown key {key!r} (not a GPT-2 parameter)")
            if name.endswith(conv1d):
                value = value.t()  # HF's Conv1D stores (in, out); nn.Linear wants (out, in)
            target = ours[name]
            if name in ("transformer.wte.weight", "lm_head.weight"):
                if value.shape != (self.config.vocab_size, self.config.n_embd):
                    raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, expected {(self.config.vocab_size, self.config.n_embd)}")
                tied = {"transformer.wte.weight", "lm_head.weight"} & loaded
                if tied and not torch.equal(target[: self.config.vocab_size], value.to(target.dtype)):
                    raise ValueError(f"{source}: {key} differs from {tied.pop()}: GPT-2 ties the token embedding "
                                     "and the lm_head, this checkpoint does not")
                target.zero_()  # padded rows: zero, never used by the loss or sampling
                target[: self.config.vocab_size].copy_(value)
            else:
                if value.shape != target.shape:
                    raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
                target.copy_(value)
            loaded.add(name)
        missing = set(ours) - loaded
        if "transformer.wte.weight" in loaded or "lm_head.weight" in loaded:
            missing -= {"transformer.wte.weight", "lm_head.weight"}  # tied: either one loads both
        if missing:
            raise KeyError(f"{source}: missing keys {sorted(missing)}")


HF_HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def _hf_directory(path):
    if os.path.isdir(path):
        return path
    if path in HF_HUB_NAMES or ("/" in path and not os.path.exists(path) and not path.startswith((".", "/"))):
        try:
            from huggingface_hub import snapshot_download
        except ImportError as e:
            raise ImportError(f"loading {path!r} from the hub needs huggingface_hub (pip install huggingface_hub)") from e
        return snapshot_download(path, allow_patterns=["config.json", "model.safetensors"])
    raise FileNotFoundError(f"{path}: not a directory, and not a hub name ({', '.join(HF_HUB_NAMES)})")


def _read_hf_state_dict(directory):
    st = os.path.join(directory, "model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st), st
    bin_file = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(bin_file):
        return torch.load(bin_file, map_location="cpu", weights_only=True), bin_file
    raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin")
