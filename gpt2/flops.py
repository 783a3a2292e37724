"""Model FLOPs per token, the peak FLOP/s of common GPUs, and MFU (used by gpt2.train and bench).

FLOPs per trained token (forward + backward), as in the PaLM paper (appendix B):

    6 * N  +  12 * L * H * Q * T

N: parameters that take part in matmuls: all of them except the position embedding (a lookup);
the token embedding counts once, as the tied lm_head (its lookup is free, its matmul is not); the
padded vocab rows do not count. 6N: 2 FLOPs per multiply-add, forward 1x, backward 2x. Attention
term: per layer, QK^T and AV each do 2*T*(H*Q) FLOPs per token forward (H heads of size Q attend
over T positions), times 3 for forward + backward = 12*H*Q*T. Like PaLM and nanoGPT we count the
full T x T score matrix even though causal masking skips half of it, so a flash-attention kernel
that skips masked tiles does not inflate MFU. For GPT-2 124M at T=1024 this is 6*123.65M + 12*12*64*1024
= 0.742 + 0.113 = 0.855 GFLOPs per token.

MFU = tokens/s (all ranks) * FLOPs per token / (world size * peak FLOP/s of one device). The peak is
the dense (no sparsity) tensor-core number of the device's datasheet for the training dtype: bf16,
or tf32 for float32 (the trainer enables TF32 matmuls on GPU). An unknown device gives None: MFU is
then reported as unknown, never guessed; pass peak_flops (--peak-flops) to set it.
"""
import re

# name pattern (searched in torch.cuda.get_device_name()) -> {dtype: dense peak FLOP/s}.
# Order matters: the first match wins (H100 PCIe/NVL before plain H100). Patterns are anchored on word
# boundaries (an "RTX A1000" is not an A100, a "GB200" not a B200, an "H20" not an H200), and the GeForce
# cards at the end of the name ("RTX 3090 Ti", "RTX 4090 D" are other chips). A name this table does not
# list gives None, never a neighbour's figure: see peak_flops for laptop / mobile parts and MIG slices.
# GB200 is left out on purpose: its GPU is not run at a B200's power and clocks, and its dense bf16
# figure per GPU is not confirmed here (None; pass --peak-flops).
PEAK_FLOPS = [
    (r"\bH100\b.*\bPCIe\b", {"bfloat16": 756e12, "float32": 378e12}),
    (r"\bH100 NVL\b", {"bfloat16": 835e12, "float32": 417.5e12}),
    (r"\bH100\b|\bGH200\b", {"bfloat16": 989.4e12, "float32": 494.7e12}),  # SXM ("H100 80GB HBM3")
    (r"\bH200 NVL\b", {"bfloat16": 835e12, "float32": 417.5e12}),
    (r"\bH200\b", {"bfloat16": 989.4e12, "float32": 494.7e12}),
    (r"\bB200\b", {"bfloat16": 2250e12, "float32": 1100e12}),
    (r"\bA100\b", {"bfloat16": 312e12, "float32": 156e12}),  # 40 GB and 80 GB, SXM and PCIe
    (r"\bL40S\b", {"bfloat16": 362e12, "float32": 183e12}),
    (r"\bL4\b", {"bfloat16": 121e12, "float32": 60e12}),
    (r"\bA10\b", {"bfloat16": 125e12, "float32": 62.5e12}),
    (r"\bRTX 4090\s*$", {"bfloat16": 165.2e12, "float32": 82.6e12}),  # bf16 with fp32 accumulate
    (r"\bRTX 3090\s*$", {"bfloat16": 71e12, "float32": 35.6e12}),
]

# Laptop / mobile parts share a desktop part's name with far lower clocks and power: None unless a
# pattern above names them itself. A MIG slice has a fraction of the SMs: None.
_MOBILE = re.compile(r"\b(Laptop|Mobile|Max-Q)\b", re.IGNORECASE)
_MIG = re.compile(r"\bMIG\b")


def matmul_params(config):
    """N of the formula above, from a GPTConfig (no model needed)."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    per_layer = (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C) + 4 * C  # attn, mlp, 2 LN
    return L * per_layer + 2 * C + V * C  # + final LN + tied token embedding / lm_head


def flops_per_token(config, seq_len):
    head_dim = config.n_embd // config.n_head
    return 6 * matmul_params(config) + 12 * config.n_layer * config.n_head * head_dim * seq_len


def peak_flops(device_name, dtype="bfloat16"):
    """Dense peak FLOP/s of one device for `dtype` ("bfloat16" or "float32"), or None if unknown."""
    if not device_name:
        return None
    dtype = str(dtype).replace("torch.", "")
    mobile = bool(_MOBILE.search(device_name))
    if _MIG.search(device_name):
        return None
    for pattern, peaks in PEAK_FLOPS:
        if mobile and not _MOBILE.search(pattern):
            continue
        if re.search(pattern, device_name):
            return peaks.get(dtype)
    return None


def mfu(tokens_per_sec, flops_per_tok, peak_per_device, world_size=1):
    """Fraction in [0, 1] of the devices' peak, or None when the peak is unknown."""
    if not peak_per_device:
        return None
    return tokens_per_sec * flops_per_tok / (peak_per_device * world_size)
