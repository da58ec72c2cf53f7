"""When the batcher waits for companions (pure decisions, no timing)."""

from __future__ import annotations

from epara.node.service import RunCost, companion_wait


def test_no_wait_for_a_lone_request_or_a_slow_stream() -> None:
    assert companion_wait(0.005, None, 0.010) == 0.0
    assert companion_wait(0.005, 0.020, 0.010) == 0.0


def test_wait_only_when_the_shared_run_cost_exceeds_the_wait() -> None:
    assert companion_wait(0.005, 0.001, 0.004) == 0.005  # saves 4 ms for 1 ms of waiting
    assert companion_wait(0.005, 0.001, 0.0005) == 0.0  # a CPU: little to share
    assert companion_wait(0.005, 0.001, 0.0) == 0.0
    assert companion_wait(0.005, 0.001, None) == 0.005  # unknown yet: wait, to learn


def test_fixed_run_cost_is_learned_from_runs_of_several_sizes() -> None:
    cost = RunCost()
    for _ in range(4):
        cost.record(1000, 0.011, now=0.0)
    assert cost.fixed_seconds() is None  # one size: the intercept cannot be told
    for rows in (1, 2, 4, 8):  # 10 ms per run plus 1 ms per 1000 elements
        cost.record(1000 * rows, 0.010 + 0.001 * rows, now=0.0)
    fixed = cost.fixed_seconds()
    assert fixed is not None and 0.008 < fixed < 0.011
    flat = RunCost()
    for rows in (1, 2, 4, 8):  # time proportional to the input: batching shares nothing
        flat.record(1000 * rows, 0.004 * rows, now=0.0)
    assert flat.fixed_seconds() == 0.0
