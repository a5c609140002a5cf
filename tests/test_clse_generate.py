"""A routed ``model.generate`` with the CLSE presets on a tiny LLaVA of LLaVA-1.5's geometry (spec/clse.md)."""

from __future__ import annotations

import pytest

from rerouting import optimized
from rerouting.reference import Reference, preset
from rerouting.reference.decode import greedy_generate
from rerouting.reference.tiny import SampleSpec, make_batch, tiny_llava, tiny_llava_config

pytestmark = pytest.mark.usefixtures("one_thread")


def until_eos(tokens, eos):
    return [row[: row.index(eos) + 1] if eos in row else row for row in tokens.tolist()]


@pytest.fixture(scope="module")
def llava_576():
    """32 layers and a 24 x 24 grid of visual tokens per image (96 px, 4 px patches), as LLaVA-1.5-7B at 336 px."""
    config = tiny_llava_config(num_layers=32, image_size=96, patch_size=4)
    batch = make_batch(config, [SampleSpec((35, 9)), SampleSpec((20, 4))], padding="left", seed=3)
    return tiny_llava(config, seed=2), batch


@pytest.mark.spec("clse.presets", "clse.grid", "cache.decode.equiv")
@pytest.mark.parametrize("name", ["clse_avg64", "ours_vs_clse_avg64"])
def test_routed_generate_with_clse_preset(llava_576, name):
    model, batch = llava_576
    config = preset(name)
    with optimized.route(model, config) as router:
        ids = model.generate(**batch, max_new_tokens=4, do_sample=False)
    generated = ids[:, batch["input_ids"].shape[1] :]
    trace = router.last_trace
    for sample in trace.samples:
        assert [d.k for d in sample.decisions] == [110, 70, 20]
        assert sample.layer_visual_counts[0] == 576 and sample.layer_visual_counts[-1] == 20
    reference = Reference(model, config)
    expected, result = greedy_generate(reference, **batch, max_new_tokens=4)
    eos = model.generation_config.eos_token_id
    assert until_eos(generated, eos) == until_eos(expected, eos)
    for mine, truth in zip(trace.samples, result.trace.samples):
        assert [d.selected for d in mine.decisions] == [d.selected for d in truth.decisions]
