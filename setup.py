# No torch import here: the C++/CUDA extension is compiled on first use (kernels/classifier.py),
# so the build never depends on what is installed in pip's isolated build environment.
from setuptools import find_packages, setup

setup(
    name="gpt2-kernel-lab",
    version="0.1.0",
    description="GPT-2 (124M) in PyTorch with fused Triton and CUDA kernels for every hot op",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["kernels", "kernels.*", "gpt2", "gpt2.*", "bench", "bench.*"]),
    install_requires=["torch>=2.6", "tiktoken", "numpy", "ninja", "tqdm", "matplotlib"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "transformers", "safetensors"],
        "data": ["datasets"],
    },
)
