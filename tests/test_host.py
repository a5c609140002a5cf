"""The host protocol and registry (reference/host.py): one adapter per model family, picked by class name."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rerouting.reference import HOSTS, Host, ImageSpan, LlavaHost, RoutingError, host_for, register_host
from rerouting.reference.tiny import SampleSpec, make_batch


@pytest.mark.spec("routing.errors")
def test_host_for_picks_the_registered_adapter(llava):
    host = host_for(llava)
    assert type(host) is LlavaHost and isinstance(host, Host)
    assert host.layer_kinds == ("softmax",) * host.num_layers
    assert HOSTS["LlavaForConditionalGeneration"] is LlavaHost


@pytest.mark.spec("routing.errors")
def test_unsupported_class_lists_the_registered_ones():
    text_only = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2
        )
    )
    match = r"model class LlamaForCausalLM is not supported; supported classes: LlavaForConditionalGeneration"
    with pytest.raises(RoutingError, match=match):
        host_for(text_only)
    with pytest.raises(RoutingError, match="routing.errors"):
        LlavaHost(text_only)  # direct construction checks the class too

    @register_host("LlamaForCausalLM")
    class Fake:
        def __init__(self, model):
            self.model = model

    try:
        assert isinstance(host_for(text_only), Fake)
    finally:
        del HOSTS["LlamaForCausalLM"]


@pytest.mark.spec("layout.visual-set")
def test_embed_from_precomputed_features_is_bit_identical(llava, single):
    host = host_for(llava)
    with torch.no_grad():
        from_pixels = host.embed(single["input_ids"], single["pixel_values"])
        features = llava.model.get_image_features(pixel_values=single["pixel_values"], return_dict=True)
        from_features = host.embed(single["input_ids"], None, features.pooler_output)
    assert torch.equal(from_pixels, from_features)
    with pytest.raises(RoutingError, match="not both"):
        host.embed(single["input_ids"], single["pixel_values"], features.pooler_output)
    with pytest.raises(RoutingError, match=r"16 image placeholder tokens \(id \d+\) but 15 image features"):
        host.embed(single["input_ids"], None, [features.pooler_output[0][:15]])


@pytest.mark.spec("layout.visual-set")
def test_layouts_name_every_image_span(llava, llava_config):
    batch = make_batch(llava_config, [SampleSpec((2, 0, 6)), SampleSpec((3,))], seed=4)  # adjacent images
    first, text_only = host_for(llava).layouts(batch["input_ids"], batch["attention_mask"])
    assert first.images == (ImageSpan(0, 16, (4, 4)), ImageSpan(16, 32, (4, 4)))
    assert len(first.visual) == 32 and text_only.images == ()


@pytest.mark.spec("cache.decode.positions")
def test_decode_positions_continue_from_each_length(llava):
    positions = host_for(llava).decode_positions(torch.tensor([7, 3]), 2, 3)
    assert positions.tolist() == [[9, 10, 11], [5, 6, 7]]
