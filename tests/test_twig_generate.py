"""``model.generate(assistant_model=twig)`` under ``route(model, config, twig=twig)`` (spec twig.ssd.generate)."""

from __future__ import annotations

import pytest
import torch

from rerouting.optimized import route
from rerouting.optimized.generate_ssd import finish
from rerouting.reference import RoutingConfig, RoutingError, Schedule, Scorer, Twig
from rerouting.reference.tiny import SampleSpec, make_batch, tiny_llava, tiny_llava_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CONFIG = tiny_llava_config(num_layers=6)
TTP = RoutingConfig(
    Schedule((2, 5), (6, 0), unit="count"), policy="remove", scorer=Scorer(kind="twig", twig_layers=2)
)


@pytest.fixture(scope="module")
def setup():
    model = tiny_llava(CONFIG)
    batch = make_batch(CONFIG, [SampleSpec((5, 3)), SampleSpec((7, 2)), SampleSpec((1, 4))], padding="left")
    return model, batch, Twig.from_base(model, 2, 2)


@pytest.mark.spec("twig.ssd.generate", "twig.ssd.lossless")
def test_ssd_generate_equals_greedy_generate(setup):
    model, batch, twig = setup
    with route(model, TTP, twig=twig) as router:
        greedy = model.generate(**batch, max_new_tokens=10, do_sample=False)
        ssd = model.generate(
            **batch, max_new_tokens=10, assistant_model=twig, assistant_confidence_threshold=0.0
        )
        stats = router.last_speculation
        assert torch.equal(greedy, ssd)
        assert max(max(r) for r in stats.drafted) == 5  # the default num_speculations
        model.generate(**batch, max_new_tokens=10, assistant_model=twig, num_assistant_tokens=2)
        assert max(max(r) for r in router.last_speculation.drafted) <= 2
        model.generation_config.num_assistant_tokens = 3  # the generation config is read too
        try:
            model.generate(
                **batch, max_new_tokens=10, assistant_model=twig, assistant_confidence_threshold=0.0
            )
        finally:
            model.generation_config.num_assistant_tokens = None
        assert max(max(r) for r in router.last_speculation.drafted) == 3


@pytest.mark.spec("twig.ssd.generate")
def test_ssd_generate_refuses_what_it_cannot_serve(setup):
    model, batch, twig = setup
    with route(model, TTP, twig=twig):
        for bad, name in (
            ({"do_sample": True}, "do_sample"),
            ({"num_beams": 2}, "num_beams"),
            ({"num_return_sequences": 2}, "num_return_sequences"),
            ({"streamer": object()}, "streamer"),
        ):
            with pytest.raises(RoutingError, match=rf"{name}.*twig.ssd.generate"):
                model.generate(**batch, max_new_tokens=3, assistant_model=twig, **bad)
        with pytest.raises(RoutingError, match=r"assistant_model must be the twig.*twig.ssd.generate"):
            model.generate(**batch, max_new_tokens=3, assistant_model=Twig.from_base(model, 2, 2))
    no_twig = pytest.raises(RoutingError, match=r"assistant_model=.*not supported while routing")
    with route(model, RoutingConfig(Schedule((2,), (0.5,)))), no_twig:
        model.generate(**batch, max_new_tokens=3, assistant_model=twig)


@pytest.mark.spec("twig.ssd.generate")
def test_finish_pads_after_eos_and_stops_when_all_are_done():
    tokens = torch.tensor([[5, 2, 7, 8], [6, 6, 2, 9]])
    assert finish(tokens, [2], 0).tolist() == [[5, 2, 0], [6, 6, 2]]
    assert finish(torch.tensor([[5, 2, 7], [6, 6, 6]]), [2], 0).tolist() == [[5, 2, 0], [6, 6, 6]]
    assert torch.equal(finish(tokens, [], 0), tokens)
