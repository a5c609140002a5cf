"""Shared fixtures: tiny random LLaVA models built from real transformers configs (no download)."""

from __future__ import annotations

import pytest
import torch

from rerouting.reference.tiny import SampleSpec, make_batch, tiny_llava, tiny_llava_config


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP threads stall badly on a shared, oversubscribed CPU.

    Module-scoped; a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def llava_config():
    return tiny_llava_config()


@pytest.fixture(scope="session")
def llava(llava_config):
    return tiny_llava(llava_config, seed=0)


@pytest.fixture(scope="session")
def single(llava_config):
    """One sample: 5 text tokens, one image (16 visual tokens), 3 text tokens."""
    return make_batch(llava_config, [SampleSpec((5, 3))], seed=1)


@pytest.fixture(scope="session")
def mixed_batch(llava_config):
    """Four samples of different lengths, left padded: one, two and no images."""
    specs = [SampleSpec((5, 3)), SampleSpec((2, 4, 6)), SampleSpec((9,)), SampleSpec((1, 1))]
    return make_batch(llava_config, specs, padding="left", seed=2), specs
