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
