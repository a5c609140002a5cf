"""The transformers adapter: names found by feature detection, a tested range, a clear refusal outside it."""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

import rerouting.conformance
import rerouting.optimized
import rerouting.reference
from rerouting.optimized import greedy_generate, route
from rerouting.reference import RoutingConfig, RoutingError, Schedule, host_for
from rerouting.reference.compat import (
    SUPPORTED_TRANSFORMERS,
    check_transformers,
    forward_cache,
    layer_cache_argument,
)
from rerouting.reference.tiny import SampleSpec, make_batch

MULTI = Schedule((1, 3, 4), (0.5, 0.5, 0.25))
PACKAGES = [
    Path(module.__file__).resolve().parent
    for module in (rerouting.reference, rerouting.optimized, rerouting.conformance)
]


def from_project(warning: warnings.WarningMessage) -> bool:
    """A warning attributed to a line of rerouting's own code (HF's deprecations point at their caller)."""
    path = Path(warning.filename).resolve()
    return any(path.is_relative_to(package) for package in PACKAGES)


@pytest.mark.spec("cache.decode.unrouted", "routing.errors")
@pytest.mark.parametrize("policy", ["reroute", "remove"])
def test_generate_under_route_warns_nothing_from_the_project(llava, llava_config, policy):
    """``route()`` + ``generate`` (left padded, two images, text only) equals the functional decode, warning-free."""
    batch = make_batch(
        llava_config, [SampleSpec((2, 4, 6)), SampleSpec((9,)), SampleSpec((5, 3))], padding="left", seed=4
    )
    model, config = copy.deepcopy(llava), RoutingConfig(MULTI, policy=policy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected, _ = greedy_generate(model, config, **batch, max_new_tokens=4)
        with route(model, config):
            ids = model.generate(**batch, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert ids[:, batch["input_ids"].shape[1] :].tolist() == expected.tolist()
    ours = [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught if from_project(w)]
    assert ours == []


@pytest.mark.spec("routing.errors")
@pytest.mark.parametrize("version", ["4.57.6", "5.3.0", "6.0.0", "6.1.0.dev0"])
def test_versions_outside_the_range_are_refused(version):
    with pytest.raises(RoutingError, match="routing.errors") as info:
        check_transformers(version)
    assert f"transformers {version} is installed" in str(info.value)
    assert str(SUPPORTED_TRANSFORMERS) in str(info.value)


@pytest.mark.spec("routing.errors")
@pytest.mark.parametrize("version", ["5.4.0", "5.24.0", "5.30.0.dev0"])
def test_versions_inside_the_range_are_accepted(version):
    check_transformers(version)


@pytest.mark.spec("routing.errors")
@pytest.mark.parametrize(
    "module", ["rerouting.reference", "rerouting.optimized", "rerouting.conformance.impls"]
)
def test_import_refuses_an_unsupported_installed_release(tmp_path, module):
    """An environment whose installed transformers reads 5.3.0: importing any layer (hence ``route``) fails."""
    info = tmp_path / "transformers-5.3.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 5.3.0\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120, env=env
    )
    assert run.returncode != 0
    assert (
        "RoutingError: transformers 5.3.0 is installed; rerouting supports transformers<6,>=5.4" in run.stderr
    )


@pytest.mark.spec("routing.errors")
def test_an_unknown_cache_protocol_is_refused():
    class FutureLayer(torch.nn.Module):
        def forward(self, hidden, attention_mask=None, kv_state=None):
            return hidden

    with pytest.raises(
        RoutingError, match=r"FutureLayer\.forward takes none of \['cache', 'past_key_values'\]"
    ):
        layer_cache_argument(FutureLayer)


def test_the_installed_layers_are_recognised(llava):
    name = layer_cache_argument(type(llava.model.language_model.layers[0]))
    assert name in ("cache", "past_key_values")


@pytest.mark.spec("routing.errors")
def test_forward_cache_takes_either_name_once():
    cache = object()
    assert forward_cache({"cache": cache, "input_ids": 1}) is cache
    assert forward_cache({"past_key_values": cache}) is cache
    assert forward_cache({"cache": None, "past_key_values": None}) is None
    with pytest.raises(RoutingError, match=r"both \['cache', 'past_key_values'\]"):
        forward_cache({"cache": cache, "past_key_values": cache})


def test_declared_range_is_the_checked_range():
    """pyproject's transformers requirement and the adapter's range are one range."""
    requirements = [Requirement(r) for r in importlib.metadata.requires("rerouting") or []]
    (declared,) = [r for r in requirements if r.name == "transformers"]
    assert declared.specifier == SUPPORTED_TRANSFORMERS


def test_ci_runs_the_readme_test_command_and_the_floor():
    root = Path(__file__).resolve().parents[1]
    readme, ci = (root / "README.md").read_text(), (root / ".ci" / "run").read_text()
    test_command = next(line for line in readme.splitlines() if "python -m pytest" in line)
    assert test_command.strip() in ci
    lines = (root / "ci" / "constraints-floor.txt").read_text().splitlines()
    pins = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    (pin,) = [next(iter(r.specifier)) for r in pins if r.name == "transformers"]
    (floor,) = [s.version for s in SUPPORTED_TRANSFORMERS if s.operator == ">="]
    assert pin.operator == "==" and Version(pin.version) == Version(floor)


@pytest.mark.spec("routing.active.causal")
def test_a_missing_mask_is_an_explicit_causal_request_or_an_error(llava):
    """``attention_mask=None`` is allowed only with ``is_causal=True`` under SDPA, and then equals the mask."""
    from rerouting.reference.compat import call_layer
    from rerouting.reference.host import attention_implementation, causal_mask

    layer, host = llava.model.language_model.layers[1], host_for(llava)
    x = torch.randn(1, 5, llava.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(5)[None]
    rotary = host.rotary_embeddings(x, positions)
    run = functools.partial(
        call_layer, layer, x, position_ids=positions, position_embeddings=rotary, cache=None
    )
    with torch.no_grad(), attention_implementation(llava, "sdpa"):
        explicit = run(attention_mask=causal_mask(positions[0], positions[0], x.dtype))
        requested = run(attention_mask=None, is_causal=True)
        with pytest.raises(RoutingError, match=r"needs is_causal=True under sdpa .*routing.active.causal"):
            run(attention_mask=None)
    torch.testing.assert_close(requested, explicit)  # same kernel family, same semantics
    eager = attention_implementation(llava, "eager")
    with torch.no_grad(), eager, pytest.raises(RoutingError, match=r"attention implementation 'eager'"):
        run(attention_mask=None, is_causal=True)
