"""megatron-qvgen: QVGen quantization-aware training of video diffusion transformers on megatron-core.

Two import packages ship from this distribution:
  megatron_qvgen   the training library (needs megatron-core)
  qvgen_kernels    the standalone inference runtime in kernels/qvgen_kernels/ (torch + triton + safetensors only)

kernels/ itself has no __init__.py on purpose: with the repo root on sys.path (`python -m pytest`), a top-level
package named `kernels` would shadow PyPI's `kernels` distribution (which transformers imports).
"""
from setuptools import find_packages, setup


setup(
    name="megatron-qvgen",
    version="0.1.0",
    description="QVGen W4A4/W3A3 quantization-aware training for Wan 2.1 and CogVideoX on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_qvgen", "megatron_qvgen.*"])
    + find_packages("kernels", include=["qvgen_kernels", "qvgen_kernels.*"]),
    package_dir={"qvgen_kernels": "kernels/qvgen_kernels"},
    # No upper bounds: CI installs current releases so that the next breaking release shows up there first.
    install_requires=[
        "torch>=2.4",
        # Tested: 0.16.1 (CI, Python 3.11: the newest there) and 0.19.2 (GPU image, Python 3.12). No upper pin, so a
        # current image keeps its megatron-core; the CPU shim checks the private names it patches and, on a version
        # that lacks one, stops naming it and the tested versions (megatron_qvgen/cpu_shim.py).
        "megatron-core>=0.16.1",
        # megatron-core 0.18+ imports triton unconditionally; the QAT fake-quant kernels use it on GPUs.
        "triton>=3.0; sys_platform == 'linux'",
        # megatron's dist_checkpointing needs psutil but does not declare it (a save hangs without it).
        "psutil",
        "numpy",
        "safetensors",
        "tensorboard",
        "tqdm",
        "webdataset>=0.2.86",
        "braceexpand",
        # python -m megatron_qvgen.evaluate draws its teacher | student | difference grid with it.
        "matplotlib",
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
            "qvgen-evaluate=megatron_qvgen.evaluate:main",
        ]
    },
)
