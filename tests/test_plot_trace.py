"""The trace heatmap for a user's own traces (``rerouting.conformance.audit.plots.plot_trace``)."""

from __future__ import annotations

import pytest

from rerouting.conformance.audit.plots import plot_trace
from rerouting.reference import Reference, RoutingConfig, Schedule
from rerouting.reference.tiny import SampleSpec, make_batch


@pytest.mark.spec("routing.readmit")
def test_plot_trace_draws_a_users_traces(llava, llava_config, tmp_path):
    batch = make_batch(llava_config, [SampleSpec((9,)), SampleSpec((5, 3))], padding="left", seed=1)
    schedule = Schedule((1, 2, 4), (0.5, 0.5, 0.25))
    traces = [
        Reference(llava, RoutingConfig(schedule, policy=p)).prefill(**batch).trace
        for p in ("reroute", "remove")
    ]
    path = plot_trace(traces, tmp_path / "mine.png", sample=1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="sample 0: no routed sample"):
        plot_trace(traces[0], tmp_path / "text-only.png", sample=0)  # sample 0 is text only
    with pytest.raises(ValueError, match=r"grid \(3, 5\) does not hold the \[16\] visual tokens"):
        plot_trace(traces[0], tmp_path / "bad.png", sample=1, grid=(3, 5))
