"""The repository's folders never hide installed distributions, wherever Python starts."""
from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_DIRS = ("benchmarks", "tests", "examples")


def _run(code: str, cwd: Path, path: list[str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(path)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_top_level_kernels_in_the_repository_root_is_not_ours():
    """`import kernels` started in the root gets the installed distribution (Hugging Face's, which
    transformers imports) or nothing, never this repository's kernels/ folder; megaevo.kernels stays ours."""
    code = ("import sys\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)\n"
            "else:\n    print('found', kernels.__file__)\n"
            "import megaevo.kernels as k\nprint('ours', k.__file__, callable(k.rms_norm))\n")
    out = _run(code, ROOT)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    try:
        importlib.metadata.distribution("kernels")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    assert ("found" in lines) == installed, out.stdout
    if installed:
        assert Path(lines["found"]).resolve() != (ROOT / "kernels" / "__init__.py").resolve()
    else:
        assert lines["missing"] == "kernels"
    where, is_callable = lines["ours"].rsplit(" ", 1)
    assert is_callable == "True" and Path(where).resolve().parent.name == "kernels"


def test_top_level_kernels_without_a_distribution_is_module_not_found(tmp_path):
    """With nothing else named `kernels` on the path, the import fails as if the folder were absent
    (so that availability checks such as transformers' fall back cleanly)."""
    code = ("import sys\nsys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name, 'kernels' in sys.modules)\n"
            "else:\n    print('found', kernels.__file__)\n")
    out = _run(code, ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "missing kernels False"


@pytest.mark.parametrize("folder", SCRIPT_DIRS)
def test_script_folders_hold_no_module_named_like_an_installed_one(folder):
    """A script run as `python benchmarks/x.py` has its folder first on sys.path: a module there
    named like an installed distribution (benchmarks/kernels.py once hid Hugging Face's `kernels`)
    would break whatever imports it."""
    directory = ROOT / folder
    others = [p for p in sys.path if p and Path(p).resolve() not in (directory.resolve(), ROOT)]
    clashes = []
    for script in sorted(directory.glob("*.py")):
        if script.stem == "conftest":
            continue
        spec = importlib.machinery.PathFinder.find_spec(script.stem, others)
        if spec is not None:
            clashes.append(f"{folder}/{script.name} hides {spec.origin}")
    assert not clashes


def test_transformers_imports_in_the_repository_root():
    pytest.importorskip("transformers")
    out = _run("from transformers import AutoModelForCausalLM, LlamaConfig\nprint('ok')", ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
