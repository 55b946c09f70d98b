"""The teacher stage of benchmarks/fidelity/gpu_study.sh as a lent GPU runs it, at CPU scale: the fitted teacher is
packed into small files (PACK_TO) and a later run restores it from them (TEACHER_PACK) instead of fitting it again,
and samples exactly as the original. Real processes: the shell script, torchrun, the conversion tools."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _stage(tmp_path: Path, fid: Path, **env) -> subprocess.CompletedProcess:
    # `python` and `torchrun` as the scripts call them: those of this interpreter's environment
    full = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "SCALE": "cpu", "FID": str(fid), "TEACHER_STEPS": "8", "DATA_SAMPLES": "64", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'kernels'}", **env}
    return subprocess.run(["bash", "benchmarks/fidelity/gpu_study.sh", "teacher"], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=600)


def test_a_packed_teacher_is_restored_instead_of_fitted_and_samples_the_same(tmp_path):
    first = _stage(tmp_path, tmp_path / "a", PACK_TO=str(tmp_path / "pack"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "pack" / "teacher_pack.json").is_file()
    assert all(p.stat().st_size <= 15 * 2**20 for p in (tmp_path / "pack").iterdir())

    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "data", tmp_path / "b" / "data")
    second = _stage(tmp_path, tmp_path / "b", TEACHER_PACK=str(tmp_path / "pack"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "unpacked" in second.stdout and "fit teacher" not in second.stdout + second.stderr
    a, b = (json.loads((tmp_path / x / "teacher_samples.json").read_text()) for x in ("a", "b"))
    assert a["per_sample"] == b["per_sample"] and a["accuracy"] == b["accuracy"]
