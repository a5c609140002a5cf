"""The GPU CI recipe (docs/ci/gpu-conformance.yml): a valid workflow whose command the CLI accepts."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from rerouting.conformance.cli import build_parser

WORKFLOW = Path(__file__).resolve().parents[1] / "docs" / "ci" / "gpu-conformance.yml"


def test_workflow_matches_the_github_workflow_schema(tmp_path):
    checker = Path(sys.executable).with_name("check-jsonschema")
    run = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    broken = tmp_path / "broken.yml"  # the check can fail: a misspelt key is refused
    broken.write_text(WORKFLOW.read_text().replace("runs-on:", "runs_on:"))
    run = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.github-workflows", str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0


def conform_command() -> list[str]:
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["conform"]["steps"]
    script = next(step["run"] for step in steps if "rerouting conform" in step.get("run", ""))
    profile = yaml.safe_load(WORKFLOW.read_text())["jobs"]["conform"]["env"]["PROFILE"]
    assert "'ci'" in profile  # the default profile of the workflow's expression
    words = shlex.split(script.replace("\\\n", " ").replace("$PROFILE", "ci"), comments=True)
    return words[words.index("conform") + 1 :]


def test_workflow_command_is_accepted_by_the_cli():
    options = build_parser().parse_args(conform_command())
    assert options.device == "cuda" and options.impl == "mypkg.routing:MyRouter"
    assert options.out == "rerouting-conform"
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["conform"]["steps"]
    upload = next(step for step in steps if step.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and upload["with"]["path"].rstrip("/") == options.out
