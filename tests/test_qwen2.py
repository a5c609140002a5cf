"""The Qwen2-VL host (reference/host_qwen2.py): the Qwen2.5-VL rules on ``Qwen2VLForConditionalGeneration``."""

from __future__ import annotations

import copy
import importlib.metadata

import pytest
import torch

from rerouting.optimized import route, routed_prefill
from rerouting.reference import Qwen2VLHost, Reference, RoutingConfig, Schedule, host_for, preset
from rerouting.reference import greedy_generate as reference_greedy
from rerouting.reference.host_qwen import mrope_release_ok
from rerouting.reference.tiny_qwen import IMAGE_TOKEN_ID, TWO_SAMPLES, QwenSample, make_qwen_batch
from rerouting.reference.tiny_qwen2 import tiny_qwen2, tiny_qwen2_config

pytestmark = pytest.mark.usefixtures("one_thread")
INSTALLED = importlib.metadata.version("transformers")


@pytest.fixture(scope="module")
def qwen2():
    if not mrope_release_ok():
        pytest.skip(f"transformers {INSTALLED} has the Qwen mRoPE bug; the Qwen hosts refuse it")
    return tiny_qwen2(seed=0)


@pytest.fixture(scope="module")
def batch():
    return make_qwen_batch(TWO_SAMPLES, padding="left", seed=0)


@pytest.mark.spec("layout.image-grid", "routing.equiv.keep-all")
def test_host_layouts_and_keep_all_equal_the_model(qwen2, batch):
    host = host_for(qwen2)
    assert isinstance(host, Qwen2VLHost) and type(qwen2).__name__ == "Qwen2VLForConditionalGeneration"
    layouts = host.layouts(
        batch["input_ids"], batch["attention_mask"], image_grid_thw=batch["image_grid_thw"]
    )
    assert [[(s.stop - s.start, s.grid) for s in lay.images] for lay in layouts] == [
        [(4, (2, 2)), (6, (2, 3))],
        [(1, (1, 1)), (4, (2, 2))],
    ]
    config = RoutingConfig(Schedule((1, 3), (1.0, 1.0)))
    with torch.no_grad():
        dense = qwen2(**batch, mm_token_type_ids=(batch["input_ids"] == IMAGE_TOKEN_ID).int()).logits
    valid = batch["attention_mask"].bool()
    for routed in (
        Reference(qwen2, config).prefill(**batch).logits,
        routed_prefill(qwen2, config, **batch).logits,
    ):
        torch.testing.assert_close(routed[valid], dense[valid], rtol=1e-4, atol=1e-5)


@pytest.mark.spec("clse.presets", "clse.images")
@pytest.mark.parametrize("name", ["qwen2vl_clse_avg192", "qwen2vl_ours_vs_clse_avg192"])
def test_clse_preset_on_qwen2vl_in_both_paths_and_generate(name):
    if not mrope_release_ok():
        pytest.skip(f"transformers {INSTALLED} has the Qwen mRoPE bug; the Qwen hosts refuse it")
    model = tiny_qwen2(tiny_qwen2_config(num_layers=28), seed=1)  # Qwen2-VL-7B's depth: decisions [1, 10, 19]
    model.generation_config.eos_token_id = None
    batch = make_qwen_batch([QwenSample((4, 3), ((8, 8),)), QwenSample((2, 2, 3), ((6, 8), (4, 6)))], seed=2)
    config = preset(name)
    reference = Reference(model, config)
    expected, result = reference_greedy(reference, **batch, max_new_tokens=3)
    fast = routed_prefill(model, config, **batch)
    for mine, truth in zip(fast.trace.samples, result.trace.samples):
        assert [d.selected for d in mine.decisions] == [d.selected for d in truth.decisions]
    assert [d.k for d in result.trace.samples[0].decisions] == [
        9,
        5,
        1,
    ]  # N = 16: floor(16·(0.57, 0.36, 0.098))
    with route(copy.deepcopy(model), config) as router:
        generated = router.model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated[:, -3:], expected)


@pytest.mark.spec("layout.image-grid", "clse.grid")
def test_grids_from_the_mrope_ids_equal_the_given_grids(qwen2, batch):
    host = host_for(qwen2)
    grids = batch["image_grid_thw"]
    ids, _ = host.rope_index(batch["input_ids"], batch["attention_mask"], grids)
    given = host.layouts(batch["input_ids"], batch["attention_mask"], image_grid_thw=grids)
    from_ids = host.layouts(batch["input_ids"], batch["attention_mask"], position_ids=ids)
    assert [lay.images for lay in from_ids] == [lay.images for lay in given]
