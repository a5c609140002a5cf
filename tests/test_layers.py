"""The import-linter contracts of pyproject.toml ([tool.importlinter]) hold on the installed package.

An editable install hides the package-dir folders (spec/, reference/, optimized/, conformance/) from
import-linter's graph builder, which then sees only ``rerouting/``'s own modules. So this test installs
a copy of the checkout regularly into a temporary folder (``pip install --no-deps --no-build-isolation
--target``, offline) and runs ``lint-imports`` with that folder alone on ``PYTHONPATH``. By hand::

    pip install -q --no-deps --no-build-isolation --target /tmp/rr . && (cd /tmp && \
        PYTHONPATH=/tmp/rr lint-imports --no-cache "$OLDPWD/pyproject.toml")
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# pyproject.toml [tool.setuptools] package-dir: folder -> package
FOLDERS = {
    "rerouting": "rerouting",
    "spec": "rerouting.spec",
    "reference": "rerouting.reference",
    "optimized": "rerouting.optimized",
    "conformance": "rerouting.conformance",
    "eval": "rerouting.eval",
}
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def checkout_modules() -> set[str]:
    """Every module the regular install must hold, from the checkout's files."""
    modules = set()
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules.add(".".join([package, *parts]))
    return modules


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A regular (non-editable) install of a copy of the checkout; the checkout itself is not touched."""
    base = tmp_path_factory.mktemp("layers")
    source, target = base / "src", base / "site"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    command += ["--no-index", "--target", str(target), str(source)]
    done = subprocess.run(command, cwd=base, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return target


def run_isolated(command: list[str], installed: Path) -> subprocess.CompletedProcess:
    """``command`` with only the install on PYTHONPATH, from a folder holding no ``rerouting``."""
    env = {**os.environ, "PYTHONPATH": str(installed)}
    cwd = installed.parent  # lint-imports puts its working directory on sys.path
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_the_graph_holds_every_mapped_module(installed):
    """Guards the contracts test below against an empty graph (the editable-install trap)."""
    script = (
        "import json, grimp; g = grimp.build_graph('rerouting', cache_dir=None); "
        "print(json.dumps({'modules': sorted(g.modules), "
        "'routing': sorted(g.find_modules_directly_imported_by('rerouting.optimized.routing'))}))"
    )
    done = run_isolated([sys.executable, "-c", script], installed)
    assert done.returncode == 0, done.stderr
    graph = json.loads(done.stdout)
    missing = checkout_modules() - set(graph["modules"])
    assert not missing, (
        f"the import graph lacks {sorted(missing)} (is each folder in [tool.setuptools] packages?)"
    )
    assert len(graph["modules"]) >= 40, graph["modules"]
    assert any(m.startswith("rerouting.reference.") for m in graph["routing"]), graph["routing"]


def test_import_contracts_are_kept(installed):
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} is missing: pip install -e '.[test]' (import-linter)"
    command = [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")]
    done = run_isolated(command, installed)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"lint-imports broke a contract of pyproject.toml:\n{output}"
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the exit code and the summary line still count
        names = []
    else:
        config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
        names = [c["name"] for c in config["tool"]["importlinter"]["contracts"]]
        assert any(c["type"] == "layers" for c in config["tool"]["importlinter"]["contracts"])
    for name in names:
        assert f"{name} KEPT" in output, f"contract {name!r} not reported kept:\n{output}"
    summary = f"Contracts: {len(names)} kept, 0 broken." if names else " kept, 0 broken."
    assert summary in output, output
