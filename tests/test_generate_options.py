"""``generate`` under ``route()``: the options it serves (beams, sampling, several sequences) and those it refuses."""

from __future__ import annotations

import copy

import pytest
import torch

from rerouting.optimized import route
from rerouting.reference import RoutingConfig, RoutingError, Schedule
from rerouting.reference.tiny import SampleSpec, make_batch

pytestmark = pytest.mark.usefixtures("one_thread")

KEEP_ALL = Schedule((1, 3), (1.0, 1.0))  # routed, every visual token kept: must equal the unrouted model
ROUTED = Schedule((1, 3, 4), (0.5, 0.5, 0.25))


@pytest.fixture(scope="module")
def model64(llava):
    """Float64, so that routed and unrouted logits agree far below any argmax or sampling boundary."""
    return copy.deepcopy(llava).double()


@pytest.fixture(scope="module")
def batch(llava_config):
    batch = make_batch(llava_config, [SampleSpec((5, 3)), SampleSpec((2, 4, 6))], padding="left", seed=3)
    return {**batch, "pixel_values": batch["pixel_values"].double()}


def generate(model, batch, seed=0, **options):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=5, min_new_tokens=5, **options)


@pytest.mark.spec("cache.decode.unrouted", "routing.equiv.keep-all")
@pytest.mark.parametrize(
    "options",
    [
        {"num_beams": 3, "do_sample": False},
        {"num_beams": 2, "num_return_sequences": 2, "do_sample": False},
        {"do_sample": True, "top_k": 0, "temperature": 1.0},
        {"do_sample": True, "num_return_sequences": 3},
    ],
    ids=["beams", "beams-2-sequences", "sampling", "sampling-3-sequences"],
)
def test_keep_all_routed_generate_equals_unrouted(model64, batch, options):
    unrouted = generate(model64, batch, **options)
    with route(model64, RoutingConfig(KEEP_ALL)) as router:
        routed = generate(model64, batch, **options)
    assert torch.equal(routed, unrouted)
    copies = (
        options.get("num_beams", 1)
        if options.get("num_beams", 1) > 1
        else options.get("num_return_sequences", 1)
    )
    samples = router.last_trace.samples  # one per expanded row, in repeat_interleave order
    assert len(samples) == 2 * copies
    for b in range(2):
        rows = samples[b * copies : (b + 1) * copies]
        assert all(s.visual_positions == rows[0].visual_positions for s in rows)


@pytest.mark.spec("cache.decode.unrouted", "cache.decode.positions")
def test_routed_beam_search_runs_and_reorders_its_cache(model64, batch):
    with route(model64, RoutingConfig(ROUTED)) as router:
        routed = generate(model64, batch, num_beams=3, num_return_sequences=2, do_sample=False)
    assert routed.shape[0] == 4 and len(router.last_trace.samples) == 6
    assert all(s.decisions for s in router.last_trace.samples)


@pytest.mark.spec("routing.errors")
@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"cache_implementation": "static"}, "cache_implementation='static'"),
        ({"cache_implementation": "offloaded"}, "cache_implementation='offloaded'"),
        ({"prompt_lookup_num_tokens": 3}, "prompt_lookup_num_tokens=3"),
        ({"use_cache": False}, "use_cache=False"),
        ({"dola_layers": "high"}, "dola_layers='high'"),
        ({"penalty_alpha": 0.6, "top_k": 4}, "penalty_alpha=0.6"),
    ],
)
def test_generate_options_routing_cannot_serve_are_refused_by_name(llava, batch, options, name):
    model = copy.deepcopy(llava)
    inputs = {**batch, "pixel_values": batch["pixel_values"].float()}
    refused = pytest.raises(RoutingError, match=rf"generate option {name} is not supported while routing")
    with refused, route(model, RoutingConfig(ROUTED)):
        model.generate(**inputs, max_new_tokens=2, **options)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__


@pytest.mark.spec("routing.errors")
def test_an_assistant_model_is_refused(llava, batch):
    model = copy.deepcopy(llava)
    inputs = {**batch, "pixel_values": batch["pixel_values"].float()}
    refused = pytest.raises(
        RoutingError, match=r"assistant_model=<LlavaForConditionalGeneration> .* assisted"
    )
    with refused, route(model, RoutingConfig(ROUTED)):
        model.generate(**inputs, max_new_tokens=2, assistant_model=copy.deepcopy(llava))
