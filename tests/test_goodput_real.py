"""`epara bench goodput --real`: the same trace replayed on a real cluster of node
processes under epara's placement and a baseline's, with a JSON table and a plot."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from epara.models.store import ModelStore
from epara.node.loadgen import builtin_trace, run_real_goodput


def test_builtin_trace_mixes_streams_bursts_and_chats() -> None:
    trace = builtin_trace(10.0, nodes=3, load=1.0)
    services = {r.service for r in trace}
    assert services == {"selfie-seg", "minilm", "text-det", "smollm2-135m"}
    assert all(0 <= r.t < 10.0 and 0 <= r.origin < 3 for r in trace)
    frames = [r.t for r in trace if r.service == "selfie-seg" and r.origin == 0]
    assert max(b - a for a, b in itertools.pairwise(frames)) < 0.11  # steady
    assert len(builtin_trace(10.0, nodes=3, load=2.0)) > 1.8 * len(trace)


def test_real_cluster_goodput_table_for_epara_and_a_baseline(tmp_path: Path,
                                                             zoo_store: ModelStore) -> None:
    plot = tmp_path / "goodput.png"
    report = json.loads(run_real_goodput(None, seconds=4.0, nodes=2, store=zoo_store.root,
                                         json_out=True, plot=plot,
                                         policies=["epara", "replicate-all"], load=0.5))
    assert set(report["systems"]) == {"epara", "replicate-all"}
    for system in report["systems"].values():
        assert system["goodput_hz"] > 0
        assert 0 < system["slo_attainment"] <= 1
    assert report["ratio_vs_best_baseline"] is not None
    assert plot.stat().st_size > 5000
