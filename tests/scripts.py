"""Import a repository script that is not part of a package (tools/, benchmarks/) by its path."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script(relative_path: str):
    path = ROOT / relative_path
    name = "script_" + "_".join(path.with_suffix("").parts[-2:])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module
