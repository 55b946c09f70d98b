"""CI installs current releases and fails loudly when an import or the test collection breaks."""
import os
import re
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIN = re.compile(r"""["'][A-Za-z0-9_.\-\[\]]+\s*(==|<=|<|~=|===)\s*[0-9][^"']*["']""")


def _pins_without_reason(path):
    """Requirement strings with an upper bound or exact pin whose line, or a comment just above, gives no reason."""
    lines = open(path).read().splitlines()
    bad = []
    for i, line in enumerate(lines):
        for match in PIN.finditer(line):
            name = re.split(r"[=<~\[]", match.group(0).strip("\"'"))[0]
            above = [l.strip() for l in lines[max(0, i - 4):i] if l.strip().startswith("#")]
            if "#" not in line and not any(name in comment for comment in above):
                bad.append(f"{os.path.basename(path)}:{i + 1}: {match.group(0)}")
    return bad


def test_no_upper_pin_without_a_reason_next_to_it():
    for path in ("setup.py", "scripts/setup_env.sh", ".ci/run", "scripts/run_tests.sh"):
        assert _pins_without_reason(os.path.join(REPO, path)) == []
    setup = open(os.path.join(REPO, "setup.py")).read()
    assert '"megatron-core>=0.16.1"' in setup   # the tested range: no upper pin (see its comment)


def _fake_repo(tmp_path, files):
    (tmp_path / "scripts").mkdir()
    shutil.copy(os.path.join(REPO, "scripts", "run_tests.sh"), tmp_path / "scripts" / "run_tests.sh")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "kernels")]))
    proc = subprocess.run(["bash", str(tmp_path / "scripts" / "run_tests.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def test_a_collection_error_stops_the_run_with_its_cause(tmp_path):
    broken = "import no_such_module_xyz\n\ndef test_a():\n    pass\n"
    rc, out, err = _fake_repo(tmp_path, {"tests/test_broken.py": broken,
                                         "tests/test_fine.py": "def test_b():\n    pass\n"})
    assert rc == 2, out + err
    assert "no_such_module_xyz" in err and "run_tests: test collection failed (pytest exit 2); nothing was run" in err
    assert "passed" not in out


def test_a_folder_shadowing_an_installed_package_is_caught_before_the_tests(tmp_path):
    rc, out, err = _fake_repo(tmp_path, {"diffusers/__init__.py": "raise ImportError('shadowed by the repo root')\n",
                                         "tests/test_fine.py": "def test_b():\n    pass\n"})
    assert rc == 3, out + err
    assert "import diffusers: ImportError: shadowed by the repo root" in err
