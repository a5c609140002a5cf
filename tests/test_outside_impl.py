"""The example outside implementation of docs/ passes the conformance suite, and uses only the public contract."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "outside_impl.py"


def test_outside_impl_imports_only_the_contract():
    """No import of rerouting.reference, rerouting.optimized or the suite's internals: only the protocol."""
    tree = ast.parse(EXAMPLE.read_text(encoding="utf-8"))
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    ours = {m for m in modules if m and m.split(".")[0] == "rerouting"}
    assert ours == {"rerouting.conformance.protocol"}, ours


def test_outside_impl_passes_conform(tmp_path):
    """``rerouting conform --impl outside_impl:OutsideRouter``, the module found on PYTHONPATH like a user's."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(EXAMPLE.parent), os.environ.get("PYTHONPATH", "")])
    )
    command = [sys.executable, "-m", "rerouting", "conform", "--impl", "outside_impl:OutsideRouter"]
    command += ["--profile", "ci", "--max-examples", "2", "--device", "cpu", "--out", str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    summary = report["summary"]
    assert summary["failed"] == summary["errors"] == 0, summary
    # a LLaVA-only implementation (hosts = ...): the Qwen2.5-VL-only rules are skipped, every other checked;
    # it implements no twig (TwigVLM is optional, conformance/test_twig.py): those rules are skipped too
    skipped = {rule for rule, entry in report["rules"].items() if entry["status"] == "skipped"}
    twig = {
        "twig.module",
        "twig.init-from-base",
        "twig.format",
        "twig.ttp.score",
        "twig.ttp.final-wipe",
        "twig.budget",
    }
    twig |= {f"twig.ssd.{name}" for name in ("draft", "verify", "rollback", "batch", "lossless", "generate")}
    # ... the Qwen3-family rules (spec/hosts.md and the hybrid budget rules), checked on those hosts only
    from rerouting.conformance.rules import spec_rules

    qwen3 = {rule for rule, file in spec_rules().items() if file == "hosts.md"}
    qwen3 |= {"budget.flops.linear", "budget.kv.state-bytes"}
    # and a reducers = ("identity",) implementation: Nüwa's rules (spec/nuwa.md) are skipped too
    nuwa = {rule for rule in report["rules"] if rule.startswith("nuwa.")}
    clse = {"clse." + r for r in ("scorer", "params", "reference-layer", "grid", "spectral", "evolution")}
    clse |= {"clse." + r for r in ("gate", "images", "variants", "stages", "presets", "flops")}
    cache = {"cache.policy", "cache.policy.retroactive"}  # no retroactive cache policy (cache_policies)
    expected = {"layout.rotary-ids", "layout.image-grid"} | twig | qwen3 | clse | cache | nuwa
    assert nuwa and skipped == expected, skipped
    assert summary["rules_checked"] == summary["rules_defined"] - len(skipped), summary
