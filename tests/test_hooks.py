"""The vision-side reducer and decoding strategy hooks (reference/hooks.py): identity and greedy only."""

from __future__ import annotations

import pytest
import torch

from rerouting import optimized
from rerouting.reference import Reference, RoutingConfig, RoutingError, Schedule, greedy_generate, host_for
from rerouting.reference.hooks import REDUCERS, STRATEGIES, decoding_strategy, vision_reducer

CONFIG = RoutingConfig(Schedule((1, 3), (0.5, 0.25)))


@pytest.mark.spec("layout.vision-reducer")
def test_identity_reducer_leaves_embeddings_and_layouts_bit_identical(llava, mixed_batch):
    batch, _ = mixed_batch
    host = host_for(llava)
    with torch.no_grad():
        embeds = host.embed(batch["input_ids"], batch["pixel_values"])
    layouts = host.layouts(batch["input_ids"], batch["attention_mask"])
    before = embeds.clone(), [(lay.valid.clone(), lay.visual, lay.text, lay.images) for lay in layouts]
    out, out_layouts = vision_reducer("identity")(embeds, layouts)
    assert torch.equal(out, before[0]) and out.dtype == before[0].dtype
    assert len(out_layouts) == len(layouts)
    for lay, (valid, visual, text, images) in zip(out_layouts, before[1]):
        assert torch.equal(lay.valid, valid) and (lay.visual, lay.text, lay.images) == (visual, text, images)
    assert list(REDUCERS) == ["identity"]


@pytest.mark.spec("layout.vision-reducer")
def test_unknown_reducer_is_an_error_naming_it(llava):
    with pytest.raises(RoutingError, match=r"vision reducer 'nuwa' .*\[rule layout.vision-reducer\]"):
        Reference(llava, CONFIG, reducer="nuwa")


@pytest.mark.spec("cache.decoding-strategy")
def test_greedy_strategy_takes_the_argmax_and_never_feeds_the_last_token():
    fed = []

    def step(tokens, j):
        fed.append((j, tokens.tolist()))
        return torch.nn.functional.one_hot(tokens + 1, 8).float()  # next token: previous + 1

    first = torch.tensor([[0.0, 5.0, 1.0, 0, 0, 0, 0, 0], [3.0, 0.0, 0.0, 0, 0, 0, 0, 0]])
    tokens = decoding_strategy("greedy")(first, step, 3)
    assert tokens.tolist() == [[1, 2, 3], [0, 1, 2]]
    assert fed == [(0, [1, 0]), (1, [2, 1])]
    assert list(STRATEGIES) == ["greedy", "ssd"]  # ssd: reference/ssd.py (spec/twig.md)


@pytest.mark.spec("cache.decoding-strategy")
def test_unknown_strategy_is_an_error_naming_it(llava, single):
    match = r"decoding strategy 'speculative' .*\[rule cache.decoding-strategy\]"
    with pytest.raises(RoutingError, match=match):
        greedy_generate(Reference(llava, CONFIG), **single, max_new_tokens=2, strategy="speculative")
    with pytest.raises(RoutingError, match=match):
        optimized.greedy_generate(llava, CONFIG, **single, max_new_tokens=2, strategy="speculative")
