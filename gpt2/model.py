"""GPT-2, as OpenAI's 124M checkpoint, with every hot op routed through a kernel backend.

    model = GPT(GPTConfig.preset("gpt2"), kernels="triton,cross_entropy=cuda")
    logits, loss = model(idx, targets)

Every LayerNorm, GELU, attention and the loss call `self.ops.<op>` (see kernels/__init__.py), so
one argument switches the whole model between the pure-PyTorch reference and our kernels.

Vocab padding: the token embedding / lm_head have `padded_vocab_size` rows (50257 -> 50304, a
multiple of 128, so the classifier matmul tiles evenly). The padded columns never win: forward
returns logits[..., :vocab_size], the loss sees only the real columns, and the padded embedding
rows get no gradient from the loss.

Loss path: by default the full logits are built and `ops.cross_entropy` reduces them. When the
spec names `linear_cross_entropy` (e.g. "triton,linear_cross_entropy=cuda"), training calls
`ops.linear_cross_entropy(hidden, wte, targets)`, which never holds the full (B*T, V) logits, and
forward returns (None, loss).
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


class LayerNorm(nn.Module):
    def __init__(self, ndim, eps, ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim))
        self.eps = eps
        self.ops = ops

    def forward(self, x):
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, ops):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.ops = ops

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = self.ops.attention(q, k, v)  # (B, nh, T, hs), causal
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

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


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
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        V = self.config.vocab_size
        if targets is not None and self.ops.fused_classifier:
            loss = self.ops.linear_cross_entropy(
                x.view(B * T, -1), self.lm_head.weight, targets.reshape(B * T), ignore_index, V)
            return None, loss
        logits = self.lm_head(x)  # (B, T, padded_vocab)
        loss = None
        if targets is not None:
            loss = self.ops.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index, V)
        return logits[..., :V], loss

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
