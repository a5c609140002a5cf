"""Routing an unmodified Hugging Face model: ``with route(model, config): model(...); model.generate(...)``."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rerouting.optimized import RoutedCache, greedy_generate, route, routed_prefill
from rerouting.reference import RoutingConfig, RoutingError, Schedule
from rerouting.reference.compat import output_cache
from rerouting.reference.tiny import SampleSpec, make_batch

MULTI = Schedule((1, 3, 4), (0.5, 0.5, 0.25))
SPECS = [SampleSpec((5, 3)), SampleSpec((2, 4, 6)), SampleSpec((9,)), SampleSpec((1, 1))]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def batch(llava_config):
    """Left padded (what ``generate`` expects): one image, two images, text only, one image."""
    return make_batch(llava_config, SPECS, padding="left", seed=2)


def snapshot(model):
    """Everything the context manager could disturb: weights, instance attributes, attention implementation."""
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        set(model.__dict__),
        model.config.get_text_config()._attn_implementation,
        model.config._attn_implementation,
    )


def assert_unchanged(model, before, batch, logits_before):
    state, attributes, text_attn, attn = before
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert set(model.__dict__) == attributes and "forward" not in model.__dict__
    assert model.forward.__func__ is type(model).forward
    assert model.config.get_text_config()._attn_implementation == text_attn
    assert model.config._attn_implementation == attn
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits_before)  # bit-identical unrouted forward


def until_eos(tokens, eos):
    """Generated ids up to and including the first EOS (generate pads after it; greedy_generate does not stop)."""
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


@pytest.mark.spec("routing.errors", "routing.output")
def test_forward_under_route_is_routed_and_model_restored(llava, batch):
    model = copy.deepcopy(llava)
    with torch.no_grad():
        logits_before = model(**batch).logits
    before = snapshot(model)
    config = RoutingConfig(MULTI)
    with route(model, config) as router:
        out = model(**batch)
    functional = routed_prefill(model, config, **batch)
    assert torch.equal(out.logits, functional.logits)
    assert isinstance(output_cache(out), RoutedCache)
    assert router.last_trace.to_dict() == functional.trace.to_dict()
    assert not torch.equal(out.logits, logits_before)  # it really was routed
    assert_unchanged(model, before, batch, logits_before)


@pytest.mark.spec("routing.errors")
def test_model_restored_after_an_exception_inside_the_block(llava, batch):
    model = copy.deepcopy(llava)
    with torch.no_grad():
        logits_before = model(**batch).logits
    before = snapshot(model)
    with pytest.raises(KeyError), route(model, RoutingConfig(MULTI)):
        model(**batch)
        raise KeyError("user code fails inside the block")
    assert_unchanged(model, before, batch, logits_before)
    with pytest.raises(RoutingError, match="labels"), route(model, RoutingConfig(MULTI)):
        model(**batch, labels=batch["input_ids"])  # an error raised by the routed forward itself
    assert_unchanged(model, before, batch, logits_before)


@pytest.mark.spec("cache.decode.unrouted", "cache.decode.positions", "cache.decode.equiv")
@pytest.mark.parametrize("policy", ["reroute", "remove"])
def test_generate_under_route_equals_functional_greedy(llava, batch, policy):
    model = copy.deepcopy(llava)
    config = RoutingConfig(MULTI, policy=policy)
    expected, _ = greedy_generate(model, config, **batch, max_new_tokens=6)
    with route(model, config) as router:
        ids = model.generate(**batch, max_new_tokens=6, do_sample=False)
    generated = ids[:, batch["input_ids"].shape[1] :]
    eos = model.generation_config.eos_token_id
    assert until_eos(generated, eos) == until_eos(expected, eos)
    assert [s.decisions for s in router.last_trace.samples][2] == ()  # the text-only sample is not routed
    with torch.no_grad():
        dense = model.generate(**batch, max_new_tokens=6, do_sample=False)  # after exit: unrouted again
    assert "forward" not in model.__dict__ and dense.shape[0] == ids.shape[0]


@pytest.mark.spec("cache.decode.positions", "routing.active.positions")
def test_generate_refuses_right_padding_positions(llava, llava_config):
    """generate continues a right-padded sample at the wrong positions: an error, never a silent change."""
    right = make_batch(llava_config, SPECS[:2], padding="right", seed=2)
    model = copy.deepcopy(llava)
    with pytest.raises(RoutingError, match="routing.active.positions"), route(model, RoutingConfig(MULTI)):
        model.generate(**right, max_new_tokens=3, do_sample=False)
    assert "forward" not in model.__dict__


@pytest.mark.spec("routing.errors")
def test_unsupported_attention_implementation_is_named(llava, batch):
    model = copy.deepcopy(llava)
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(RoutingError, match=r"'flash_attention_2'.*\[rule routing.errors\]"):
        route(model, RoutingConfig(MULTI))
    with pytest.raises(RoutingError, match="flash_attention_2"):
        routed_prefill(model, RoutingConfig(MULTI), **batch)


@pytest.mark.spec("routing.errors")
def test_attention_switched_inside_the_block_is_refused(llava, batch):
    model = copy.deepcopy(llava)
    with pytest.raises(RoutingError, match="flex_attention"), route(model, RoutingConfig(MULTI)):
        model.config.text_config._attn_implementation = "flex_attention"
        model(**batch)
    assert "forward" not in model.__dict__


@pytest.mark.spec("routing.errors")
def test_unsupported_model_class_is_named():
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
        )
    )
    with pytest.raises(RoutingError, match=r"LlamaForCausalLM.*\[rule routing.errors\]"):
        route(model, RoutingConfig(MULTI))


@pytest.mark.spec("routing.errors", "layout.visual-set")
def test_unsupported_inputs_are_errors(llava, batch):
    model = copy.deepcopy(llava)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with route(model, RoutingConfig(MULTI)):
        with pytest.raises(RoutingError, match="inputs_embeds"):
            model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        with pytest.raises(RoutingError, match="layout.visual-set"):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # no pixel_values
    with pytest.raises(RoutingError, match="schedule.decision-layers"):
        route(model, RoutingConfig(Schedule((9,), (0.5,))))


@pytest.mark.spec("routing.errors")
def test_out_of_memory_is_a_routing_error(llava, batch, monkeypatch):
    model = copy.deepcopy(llava)

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(model.model.language_model.layers[3], "forward", exhausted)
    with pytest.raises(RoutingError, match=r"out of memory.*\[rule routing.errors\]"):
        routed_prefill(model, RoutingConfig(MULTI), **batch)
