"""gpt2.flops.peak_flops: device names as torch.cuda.get_device_name() gives them -> the datasheet's dense
peak, or None for a device the table does not list (MFU is then reported as unknown, never guessed)."""
import pytest

from gpt2 import flops


@pytest.mark.parametrize("name, dtype, peak", [
    # listed cards
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H100 NVL", "float32", 417.5e12),
    ("NVIDIA GH200 480GB", "bfloat16", 989.4e12),
    ("NVIDIA H200", "bfloat16", 989.4e12),
    ("NVIDIA H200 NVL", "bfloat16", 835e12),
    ("NVIDIA B200", "bfloat16", 2250e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A100-SXM4-40GB", "float32", 156e12),
    ("NVIDIA A100-PCIE-40GB", "bfloat16", 312e12),
    ("NVIDIA A100 80GB PCIe", "bfloat16", 312e12),
    ("NVIDIA L40S", "bfloat16", 362e12),
    ("NVIDIA L4", "bfloat16", 121e12),
    ("NVIDIA A10", "bfloat16", 125e12),
    ("NVIDIA GeForce RTX 4090", "bfloat16", 165.2e12),
    ("NVIDIA GeForce RTX 3090", "torch.bfloat16", 71e12),
    # names that contain a listed one but are other chips: unknown, not the neighbour's peak
    ("NVIDIA RTX A1000", "bfloat16", None),  # not an A100
    ("NVIDIA RTX A1000 6GB Laptop GPU", "bfloat16", None),
    ("NVIDIA GB200", "bfloat16", None),  # not a B200 (left unknown on purpose)
    ("NVIDIA H20", "bfloat16", None),
    ("NVIDIA H800", "bfloat16", None),
    ("NVIDIA L40", "bfloat16", None),  # not an L4 nor an L40S
    ("NVIDIA A10G", "bfloat16", None),
    ("NVIDIA A100X", "bfloat16", None),
    ("NVIDIA GeForce RTX 3090 Ti", "bfloat16", None),
    ("NVIDIA GeForce RTX 4090 D", "bfloat16", None),
    # laptop / mobile parts of a listed desktop card, MIG slices
    ("NVIDIA GeForce RTX 4090 Laptop GPU", "bfloat16", None),
    ("NVIDIA GeForce RTX 3090 Mobile", "bfloat16", None),
    ("NVIDIA GeForce RTX 4090 Max-Q", "bfloat16", None),
    ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "bfloat16", None),
    # nothing known
    ("Some Future GPU", "bfloat16", None),
    ("cpu", "float32", None),
    ("", "bfloat16", None),
    (None, "bfloat16", None),
    ("NVIDIA H100 80GB HBM3", "float16x", None),  # an unknown dtype
])
def test_peak_flops(name, dtype, peak):
    assert flops.peak_flops(name, dtype) == peak


def test_patterns_are_anchored():
    """Every pattern matches only on word boundaries (or the end of the name): a longer model number that
    starts with a listed one is never matched by it."""
    import re

    for pattern, _ in flops.PEAK_FLOPS:
        for alt in pattern.split("|"):
            assert alt.startswith(r"\b") and alt.endswith((r"\b", "$")), pattern
    assert not any(re.search(p, "NVIDIA A1000") for p, _ in flops.PEAK_FLOPS)


# both dtypes of every entry of the table: tf32 for float32 (the trainer enables TF32 matmuls)
BOTH_DTYPES = [
    ("NVIDIA H100 PCIe", 756e12, 378e12),
    ("NVIDIA H100 NVL", 835e12, 417.5e12),
    ("NVIDIA H100 80GB HBM3", 989.4e12, 494.7e12),
    ("NVIDIA GH200 480GB", 989.4e12, 494.7e12),
    ("NVIDIA H200 NVL", 835e12, 417.5e12),
    ("NVIDIA H200", 989.4e12, 494.7e12),
    ("NVIDIA B200", 2250e12, 1100e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 156e12),
    ("NVIDIA L40S", 362e12, 183e12),
    ("NVIDIA L4", 121e12, 60e12),
    ("NVIDIA A10", 125e12, 62.5e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12, 82.6e12),
    ("NVIDIA GeForce RTX 3090", 71e12, 35.6e12),
]


@pytest.mark.parametrize("name, bf16, fp32", BOTH_DTYPES)
def test_peak_flops_both_dtypes(name, bf16, fp32):
    assert flops.peak_flops(name, "bfloat16") == flops.peak_flops(name, "torch.bfloat16") == bf16
    assert flops.peak_flops(name, "float32") == flops.peak_flops(name, "torch.float32") == fp32


def test_every_table_entry_is_tested():
    """A card added to PEAK_FLOPS gets its row in BOTH_DTYPES (each name is matched by its own entry)."""
    import re

    hit = [next(i for i, (p, _) in enumerate(flops.PEAK_FLOPS) if re.search(p, n)) for n, _, _ in BOTH_DTYPES]
    assert set(hit) == set(range(len(flops.PEAK_FLOPS)))


def test_mobile_parts_never_take_a_desktop_figure(monkeypatch):
    """The laptop rule itself, apart from the $-anchors of today's GeForce patterns: a pattern that does
    not name a mobile part never matches one; a pattern that names it does."""
    monkeypatch.setattr(flops, "PEAK_FLOPS", [(r"\bRTX 5000 Laptop\b", {"bfloat16": 1e12}),
                                              (r"\bRTX 5000\b", {"bfloat16": 2e12})])
    assert flops.peak_flops("NVIDIA RTX 5000 Ada Generation", "bfloat16") == 2e12
    assert flops.peak_flops("NVIDIA RTX 5000 Laptop GPU", "bfloat16") == 1e12
    assert flops.peak_flops("NVIDIA RTX 5000 Ada Max-Q", "bfloat16") is None
    monkeypatch.setattr(flops, "PEAK_FLOPS", [(r"\bRTX 5000\b", {"bfloat16": 2e12})])
    assert flops.peak_flops("NVIDIA RTX 5000 Ada Generation Laptop GPU", "bfloat16") is None


def test_mfu():
    assert flops.mfu(1e6, 8e8, 1e15) == pytest.approx(0.8)  # one device by default
    assert flops.mfu(1e6, 8e8, 1e15, world_size=4) == pytest.approx(0.2)
    for unknown in (None, 0):  # an unknown peak: MFU unknown, never a number (nor a ZeroDivisionError)
        assert flops.mfu(1e6, 8e8, unknown) is None
        assert flops.mfu(1e6, 8e8, unknown, world_size=8) is None


def test_flops_per_token_gpt2_124m():
    """6N + 12 L H Q T, the module docstring's worked example: N = 123.65M (no position embedding, the tied
    lm_head once, the padded vocab not counted), 0.855 GFLOPs per token at T=1024; the attention term
    grows with T, 6N does not."""
    from gpt2.model import GPTConfig

    config = GPTConfig.preset("gpt2")
    assert config.vocab_size == 50257 and flops.matmul_params(config) == 123_653_376
    assert flops.flops_per_token(config, 1024) == 6 * 123_653_376 + 12 * 12 * 12 * 64 * 1024
    assert flops.flops_per_token(config, 1024) / 1e9 == pytest.approx(0.855, abs=5e-4)
    assert flops.flops_per_token(config, 2048) - flops.flops_per_token(config, 1024) == 12 * 12 * 768 * 1024
