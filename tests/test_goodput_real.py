"""`epara bench goodput --real`: the same trace replayed on a real cluster of node
processes under epara's placement and a baseline's, with a JSON table and a plot."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from epara.models.store import ModelStore
from epara.node.lab.loadgen import (
    Outcome,
    PolicyResult,
    builtin_trace,
    case_study_trace,
    run_real_goodput,
    summarize,
    verdict,
)


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
                                         policies=["epara", "replicate-all"], load=0.5,
                                         rounds=1))
    assert set(report["systems"]) == {"epara", "replicate-all"}
    for system in report["systems"].values():
        assert system["goodput_hz"] > 0
        assert 0 < system["slo_attainment"] <= 1
    assert report["ratio_vs_best_baseline"] == report["ratios"][0] is not None
    assert report["verdict"] in ("ahead", "level", "behind")
    for system in report["systems"].values():
        assert system["not_as_planned"] == []  # every node ran what the plan says
    assert plot.stat().st_size > 5000


def _result(policy: str, within: int, seconds: float = 10.0) -> PolicyResult:
    outcomes = [Outcome("s", True, i < within, 10.0, sent_s=i * seconds / 100)
                for i in range(100)]
    return PolicyResult(policy, outcomes, seconds)


def test_verdict_calls_a_lead_only_beyond_the_spread() -> None:
    assert verdict([10, 11, 12], [5, 6, 7]) == "ahead"
    assert verdict([5, 6, 7], [10, 11, 12]) == "behind"
    # Medians 1 apart, ranges 4 wide: level.
    assert verdict([8, 11, 12], [9, 10, 13]) == "level"


def test_rounds_summary_reports_the_median_ratio_each_round_and_the_range() -> None:
    rounds = [[_result("epara", 60), _result("replicate-all", 40), _result("one", 20)],
              [_result("epara", 50), _result("replicate-all", 50), _result("one", 30)],
              [_result("epara", 90), _result("replicate-all", 45), _result("one", 10)]]
    summary = summarize(rounds)
    assert summary["best_baseline"] == "replicate-all"
    assert summary["ratios"] == [1.5, 1.0, 2.0]
    assert summary["ratio_vs_best_baseline"] == 1.5
    assert summary["ratio_range"] == [1.0, 2.0]
    assert summary["systems"]["epara"]["goodput_hz"] == 6.0
    assert summary["systems"]["epara"]["goodput_range"] == [5.0, 9.0]
    assert summary["verdict"] == "level"  # 6 vs 4.5 is within epara's 4-wide range


def test_case_study_trace_has_streams_a_latency_critical_model_and_chats() -> None:
    trace = case_study_trace(10.0, nodes=3)
    services = {r.service for r in trace}
    assert services == {"selfie-seg", "minilm", "smollm2-135m"}
    assert sum(r.service == "selfie-seg" for r in trace) == 300  # 3 streams x 10 fps
    assert all(r.output_tokens == 16 for r in trace if r.service == "smollm2-135m")


def test_a_warm_up_is_not_counted_in_goodput_and_is_reported_apart() -> None:
    # 100 requests over 10 s; the first 4 s are a warm-up in which none met its SLO.
    outcomes = [Outcome("s", True, i >= 40, 10.0, sent_s=i / 10) for i in range(100)]
    warmed = PolicyResult("epara", outcomes, 10.0, warmup_s=4.0)
    assert warmed.goodput() == 60 / 6.0
    assert warmed.attainment() == 1.0
    assert warmed.warmup_goodput() == 0.0
    cold = PolicyResult("epara", outcomes, 10.0)
    assert cold.goodput() == 6.0 and cold.warmup_goodput() is None
    summary = summarize([[warmed, PolicyResult("replicate-all", outcomes, 10.0,
                                               warmup_s=4.0)]])
    assert summary["systems"]["epara"]["warmup_goodput_hz"] == 0.0
    assert summary["systems"]["epara"]["per_service"]["s"]["requests"] == 60
