"""megatron-qvgen: QVGen quantization-aware training of video diffusion transformers on megatron-core.

Two import packages ship from this distribution:
  megatron_qvgen   the training library (needs megatron-core)
  qvgen_kernels    the standalone inference runtime in kernels/ (torch + triton + safetensors only)
"""
from setuptools import find_packages, setup

kernel_subpackages = ["qvgen_kernels." + p for p in find_packages("kernels")]

setup(
    name="megatron-qvgen",
    version="0.1.0",
    description="QVGen W4A4/W3A3 quantization-aware training for Wan 2.1 and CogVideoX on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_qvgen", "megatron_qvgen.*"])
    + ["qvgen_kernels"]
    + kernel_subpackages,
    package_dir={"qvgen_kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        # Pinned exactly: the CPU shim patches private megatron names (tests check they exist).
        "megatron-core==0.16.1",
        # megatron's dist_checkpointing needs psutil but does not declare it (a save hangs without it).
        "psutil",
        "numpy",
        "safetensors",
        "tensorboard",
        "tqdm",
        "webdataset>=0.2.86",
        "braceexpand",
    ],
    extras_require={
        "kernels": ["triton>=3.0"],
        # diffusers' from_pretrained needs accelerate for low_cpu_mem_usage loading
        "convert": ["diffusers>=0.35", "transformers>=4.45", "accelerate"],
        "data": ["diffusers>=0.35", "transformers>=4.45", "av"],
        "test": [
            "pytest>=8",
            "diffusers>=0.35",
            "transformers>=4.45",
            "accelerate",
            "av",
            "triton>=3.0",
        ],
    },
    entry_points={
        "console_scripts": [
            "qvgen-train=megatron_qvgen.train:main",
        ]
    },
)
