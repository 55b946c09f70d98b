"""The repository's top-level folders must never shadow another distribution's import name.

`python -m pytest` and `python -c ...` from the repo root put the root first on sys.path: a top-level folder with an
`__init__.py` then wins over an installed package of the same name (our old `kernels/` hid PyPI's `kernels`, which
transformers imports, and the whole suite failed to collect).
"""
import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUR_PACKAGES = {"megatron_qvgen", "qvgen_kernels"}


def _top_level_packages():
    return sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())


def test_only_our_import_names_are_top_level_packages():
    stray = [name for name in _top_level_packages() if name not in OUR_PACKAGES]
    assert not stray, f"top-level folders with __init__.py would shadow other packages' import names: {stray}"


def test_no_top_level_folder_takes_an_installed_distributions_import_name():
    owners = importlib.metadata.packages_distributions()
    ours = {"megatron-qvgen", "megatron_qvgen"}
    clashes = {name: owners[name] for name in _top_level_packages() if set(owners.get(name, [])) - ours}
    assert not clashes, f"repo folders shadow installed distributions: {clashes}"


def test_pypi_kernels_is_not_shadowed_from_the_repo_root():
    """Run from the repo root exactly as `python -m pytest` does: `kernels` must resolve to site-packages."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("PyPI's kernels is not installed here")
    code = "import kernels, qvgen_kernels, sys; print(kernels.__file__); print(qvgen_kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""}, check=True).stdout.split()
    assert "site-packages" in out[0] and not out[0].startswith(str(ROOT / "kernels" / "__init__")), out
    assert out[1].startswith(str(ROOT / "kernels" / "qvgen_kernels")), out


def test_transformers_and_diffusers_import_from_the_repo_root():
    code = "from diffusers import WanPipeline, CogVideoXPipeline; import transformers; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_qvgen_kernels_never_imports_megatron():
    code = ("import sys, qvgen_kernels.runtime, qvgen_kernels.linear; "
            "bad = [m for m in sys.modules if m.startswith(('megatron', 'megatron_qvgen'))]; print(bad)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]", res.stdout
