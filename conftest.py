"""Runs the Python blocks of README.md and docs/*.md as tests (Sybil), each document in one namespace.

Every document starts with ``model``, ``inputs`` (its ``input_ids``, ``attention_mask``, ``pixel_values`` too)
and ``config`` from ``rerouting.reference.tiny.tiny_example()``: a random 32-layer LLaVA-1.5-shaped toy and a
left-padded batch, so that a block written for a real checkpoint runs as written. A block that needs what
no test machine has (a hub download, a GPU) is marked ``<!-- skip: next -->`` in the Markdown.

A document's blocks share one namespace, so under pytest-xdist run them with ``--dist loadfile`` (the
default ``load`` may hand a document's blocks to different workers).
"""

from __future__ import annotations

import torch
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser


def _namespace(namespace: dict) -> None:
    from rerouting.reference import preset
    from rerouting.reference.tiny import tiny_example

    torch.set_num_threads(1)  # tiny models; threads only contend on a shared machine
    model, inputs = tiny_example()
    namespace.update(model=model, inputs=inputs, config=preset("ours_vs_fastv_avg64"), **inputs)


pytest_collect_file = Sybil(
    parsers=[PythonCodeBlockParser(), SkipParser()],
    patterns=["README.md", "docs/*.md"],
    setup=_namespace,
).pytest()
