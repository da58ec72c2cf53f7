"""`epara bench goodput` (simulator): goodput as serving papers define it, tables, a plot.

Goodput (DistServe, AlpaServe): the highest request rate at which a system keeps at
least a target SLO attainment (90%; also 99%), found by bisection over the mix's load
multiplier. Loads live on a grid of 2^(k/2), so the two targets and the plot share runs.
Each (mix, seed) is one task: its traces are generated once and every system runs on
them; tasks run in parallel with ``jobs`` processes.

Seeds: ``TUNING_SEEDS`` are the ones anyone may look at while changing the scheduler;
``HELD_OUT_SEEDS`` were never used for that and are reported apart. Ratios are epara's
goodput over a baseline's on the same (mix, seed).

Lab code: no node imports it (node/cli.py loads it only for this command).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from epara.node.leader.policies import PRIOR_SYSTEMS, ROUTED
from epara.node.leader.sim import SimConfig, SimResult, simulate
from epara.node.leader.workloads import (
    MIXES,
    TRACE_DEVICES,
    TRACE_SERVICES,
    Mix,
    Request,
    catalogue,
    fleet,
    read_trace,
)

SYSTEMS = ("epara", "epara-no-categories", *PRIOR_SYSTEMS,
           *(p + ROUTED for p in PRIOR_SYSTEMS))
TUNING_SEEDS = (1,)
HELD_OUT_SEEDS = (11, 12, 13, 14)
TARGETS = (0.90, 0.99)
STEPS_PER_DOUBLING = 2
K_MIN, K_MAX = -8, 6  # loads x1/16 .. x8
PLOT_KS = (-4, -2, 0, 2, 4)


def load_of(k: int) -> float:
    return 2 ** (k / STEPS_PER_DOUBLING)


@dataclass(frozen=True)
class BenchConfig:
    duration_s: float = 20.0
    warmup_s: float = 7.0
    mixes: tuple[str, ...] = tuple(MIXES)
    tuning_seeds: tuple[int, ...] = TUNING_SEEDS
    held_out_seeds: tuple[int, ...] = HELD_OUT_SEEDS
    systems: tuple[str, ...] = SYSTEMS
    jobs: int = 2


@dataclass
class _Case:
    """One (mix, seed): its world and a trace per load step."""

    mix: str
    seed: int
    target: float
    devices: tuple[Any, ...]
    services: Mapping[str, Any]
    make: Callable[[int], list[Request]]
    config: SimConfig
    traces: dict[int, list[Request]] = field(default_factory=dict)

    def trace(self, k: int) -> list[Request]:
        if k not in self.traces:
            self.traces[k] = self.make(k)
        return self.traces[k]

    def config_at(self, k: int) -> SimConfig:
        if self.mix == "trace":  # compressed time: the warm-up shrinks with it
            return replace(self.config, warmup_s=self.config.warmup_s / load_of(k))
        return self.config

    def offered_hz(self, k: int) -> float:
        """Requests per second of the measured part of the trace at step ``k``."""
        reqs = self.trace(k)
        warmup = self.config_at(k).warmup_s
        duration = max((r.t for r in reqs), default=0.0)
        measured = sum(1 for r in reqs if r.t >= warmup)
        return measured / max(1e-9, duration - warmup)


def _mix_case(mix: Mix, seed: int, config: BenchConfig) -> _Case:
    services = mix.catalogue(seed)
    return _Case(mix.name, seed, mix.target, tuple(fleet(mix.devices, mix.fleet)), services,
                 lambda k: mix.trace(load_of(k), seed, config.duration_s, services),
                 SimConfig(warmup_s=config.warmup_s, seed=seed))


def _trace_case(requests: Sequence[Request], devices: int, services: int) -> _Case:
    """A given trace, replayed at load x(2^(k/2)) by compressing its time axis."""
    duration = max((r.t for r in requests), default=0.0)
    catalog = catalogue(services, 1)
    unknown = sorted({r.service for r in requests} - set(catalog))
    if unknown:
        raise ValueError(
            f"the trace names service {unknown[0]!r}, which the built-in catalogue of "
            f"{services} services does not hold ({len(unknown)} unknown in all); a trace "
            f"must name services of catalogue({services}, 1) (docs/trace-format.md), or "
            f"pass the --services it was written for")
    return _Case("trace", 1, 0.90, tuple(fleet(devices)), catalog,
                 lambda k: [replace(r, t=r.t / load_of(k)) for r in requests],
                 SimConfig(warmup_s=duration / 4, seed=1))


def _run(case: _Case, system: str, k: int, cache: dict[tuple[str, int], SimResult]
         ) -> SimResult:
    key = (system, k)
    if key not in cache:
        cache[key] = simulate(system, case.trace(k), case.services, case.devices,
                              case.config_at(k))
    return cache[key]


def search(attains: Callable[[int], bool]) -> int | None:
    """The highest grid step whose load still attains the target (None: not even the
    lowest), assuming attainment falls with load: doubling steps to bracket, then
    bisection."""
    if attains(0):
        lo, k = 0, STEPS_PER_DOUBLING
        while k <= K_MAX and attains(k):
            lo, k = k, k + STEPS_PER_DOUBLING
        if k > K_MAX:
            return lo
        hi = k
    else:
        hi, k = 0, -STEPS_PER_DOUBLING
        while k >= K_MIN and not attains(k):
            hi, k = k, k - STEPS_PER_DOUBLING
        if k < K_MIN:
            return None
        lo = k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if attains(mid):
            lo = mid
        else:
            hi = mid
    return lo


# What a worker needs to build its case: (mix name, seed, config) or, for a given trace,
# ("trace", (requests, devices, services), config); plain data, so it pickles.
_TaskSpec = tuple[str, Any, BenchConfig]


def _case(spec: _TaskSpec) -> _Case:
    kind, arg, config = spec
    if kind == "trace":
        return _trace_case(*arg)
    return _mix_case(MIXES[kind], arg, config)


def _task(args: tuple[_TaskSpec, tuple[str, ...], bool]) -> dict[str, Any]:
    spec, systems, plot = args
    case = _case(spec)
    out: dict[str, Any] = {"mix": case.mix, "seed": case.seed, "systems": {}}
    for system in systems:
        cache: dict[tuple[str, int], SimResult] = {}
        row: dict[str, Any] = {}
        found: dict[float, int | None] = {}
        for target in sorted(TARGETS, reverse=True):
            k = search(lambda k, t=target, s=system, c=cache:
                       _run(case, s, k, c).attainment >= t)
            # Attainment is noisy in load: a load seen to keep a stricter target keeps
            # this one too.
            stricter = [v for t, v in found.items() if t > target and v is not None]
            if stricter and (k is None or max(stricter) > k):
                k = max(stricter)
            found[target] = k
            row[f"load{target * 100:.0f}"] = None if k is None else load_of(k)
            row[f"goodput{target * 100:.0f}_hz"] = 0.0 if k is None else case.offered_hz(k)
        if plot:
            for k in PLOT_KS:
                _run(case, system, k, cache)
        x1 = _run(case, system, 0, cache)
        row["x1"] = {"goodput_hz": x1.goodput_hz, "attainment": x1.attainment,
                     "outcomes": dict(x1.counts), "units": x1.units,
                     "decision_ms_max": max(x1.schedule_ms, default=0.0)}
        row["estimation"] = vars(x1.estimation)
        row["curve"] = sorted((load_of(k), r.attainment) for (_, k), r in cache.items())
        out["systems"][system] = row
    out["offered_x1_hz"] = case.offered_hz(0)
    return out




def run(config: BenchConfig, trace: Sequence[Request] | None = None,
        devices: int = TRACE_DEVICES, services: int = TRACE_SERVICES,
        progress: Callable[[str], None] | None = None,
        on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every system on every (mix, seed); the report (``report``) of the results.
    ``on_result`` gets each (mix, seed)'s raw result as it completes."""
    specs: list[tuple[_TaskSpec, int]]
    if trace is not None:
        _trace_case(trace, devices, services)  # unknown services: fail before any run
        config = replace(config, mixes=("trace",), tuning_seeds=(), held_out_seeds=(1,))
        specs = [(("trace", (tuple(trace), devices, services), config), 1)]
    else:
        # Seed-major, held-out seeds first: an interrupted run still covers every mix.
        specs = [((m, seed, config), seed)
                 for seed in (*config.held_out_seeds, *config.tuning_seeds)
                 for m in config.mixes]
    plot_seed = (config.held_out_seeds or config.tuning_seeds)[0]
    tasks = [(spec, config.systems, seed == plot_seed) for spec, seed in specs]
    results = []
    if config.jobs > 1 and len(tasks) > 1:
        with get_context("fork").Pool(config.jobs) as pool:
            for r in pool.imap_unordered(_task, tasks):
                results.append(r)
                if on_result:
                    on_result(r)
                if progress:
                    progress(f"{r['mix']} seed {r['seed']} done")
    else:
        for t in tasks:
            results.append(_task(t))
            if on_result:
                on_result(results[-1])
            if progress:
                progress(f"{results[-1]['mix']} seed {results[-1]['seed']} done")
    return report(results, config, plot_seed)


def _ratio(a: float, b: float) -> float | None:
    """a / b; None when neither reaches the target at any load (no goodput to compare),
    inf when only ``a`` does."""
    if b <= 0:
        return math.inf if a > 0 else None
    return a / b


def _median(xs: Sequence[float | None]) -> float | None:
    known = [x for x in xs if x is not None]
    return statistics.median(known) if known else None


def report(results: Sequence[Mapping[str, Any]], config: BenchConfig,
           plot_seed: int) -> dict[str, Any]:
    mixes: dict[str, Any] = {}
    baselines = [s for s in config.systems if s != "epara"]
    prior = [s for s in config.systems if s in PRIOR_SYSTEMS]
    for name in dict.fromkeys(r["mix"] for r in results):
        target = MIXES[name].target if name in MIXES else 0.90
        key = f"goodput{target * 100:.0f}_hz"
        seeds: dict[str, Any] = {}
        for r in sorted((r for r in results if r["mix"] == name), key=lambda r: r["seed"]):
            sy = r["systems"]
            for row in sy.values():  # a rate that keeps 99% keeps 90% too
                row["goodput90_hz"] = max(row["goodput90_hz"], row["goodput99_hz"])
            epara = sy["epara"]
            entry = {
                "held_out": r["seed"] not in config.tuning_seeds,
                "offered_x1_hz": r["offered_x1_hz"],
                "systems": sy,
                "ratio_vs_best_prior": _ratio(epara["goodput90_hz"], max(
                    (sy[s]["goodput90_hz"] for s in prior), default=0.0)),
                "ratio_vs_best_prior_at_target": _ratio(epara[key], max(
                    (sy[s][key] for s in prior), default=0.0)),
                "ratio_vs_ablation": _ratio(epara[key], sy["epara-no-categories"][key])
                if "epara-no-categories" in sy else None,
                "ratios_at_target": {s: _ratio(epara[key], sy[s][key]) for s in baselines},
            }
            seeds[str(r["seed"])] = entry
        held = [e for e in seeds.values() if e["held_out"]] or list(seeds.values())
        tuned = [e for e in seeds.values() if not e["held_out"]]

        def summary(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
            if not entries:
                return {}
            every = [x for e in entries for x in e["ratios_at_target"].values()
                     if x is not None]
            return {
                "seeds": len(entries),
                "ratio_vs_best_prior_median": _median(
                    [e["ratio_vs_best_prior"] for e in entries]),
                "ratio_vs_best_prior_at_target_median": _median(
                    [e["ratio_vs_best_prior_at_target"] for e in entries]),
                "ratio_vs_best_prior_at_target_min": min(
                    (e["ratio_vs_best_prior_at_target"] for e in entries
                     if e["ratio_vs_best_prior_at_target"] is not None), default=None),
                "ratio_vs_ablation_median": _median(
                    [e["ratio_vs_ablation"] for e in entries]),
                "ratio_vs_ablation_min": min((e["ratio_vs_ablation"] for e in entries
                                              if e["ratio_vs_ablation"] is not None),
                                             default=None),
                "min_ratio_any_baseline": min(every) if every else None,
                "goodput_median": {s: {t: _median([e["systems"][s][t] for e in entries])
                                       for t in ("goodput90_hz", "goodput99_hz")}
                                   for s in config.systems},
                "x1_median": {s: {t: _median([e["systems"][s]["x1"][t] for e in entries])
                                  for t in ("goodput_hz", "attainment")}
                              for s in config.systems},
                "estimation_median": {t: _median([e["systems"]["epara"]["estimation"][t]
                                                  for e in entries])
                                      for t in ("prior_median", "prior_p90",
                                                "measured_median", "measured_p90")},
            }

        mixes[name] = {"target": target, "held_out": summary(held), "tuning": summary(tuned),
                       "seeds": seeds,
                       "curve": {s: seeds[str(plot_seed)]["systems"][s]["curve"]
                                 for s in config.systems} if str(plot_seed) in seeds else {}}
    main = "production" if "production" in mixes else next(iter(mixes))
    every_seed = [x for m in mixes.values() for e in m["seeds"].values()
                  for x in e["ratios_at_target"].values() if x is not None]
    x1 = [e["systems"] for e in mixes[main]["seeds"].values()]
    fixed = _median([r for r in (_ratio(s["epara"]["x1"]["goodput_hz"],
                                        max(s[b]["x1"]["goodput_hz"] for b in baselines))
                                 for s in x1) if r is not None])
    return {
        "goodput_ratio_vs_best_prior": mixes[main]["held_out"].get(
            "ratio_vs_best_prior_median"),
        "min_ratio_any_workload": min(every_seed) if every_seed else None,
        "ratio_vs_best_baseline": fixed,
        "main": main,
        "systems": list(config.systems),
        "tuning_seeds": list(config.tuning_seeds),
        "held_out_seeds": list(config.held_out_seeds),
        "duration_s": config.duration_s,
        "mixes": mixes,
    }


def _fmt(x: float | None, width: int = 8, digits: int = 2) -> str:
    if x is None:
        return f"{'-':>{width}}"
    if math.isinf(x):
        return f"{'inf':>{width}}"
    return f"{x:>{width}.{digits}f}"


def table(rep: Mapping[str, Any]) -> str:
    mixes = rep["mixes"]
    names = list(mixes)
    lines = ["Goodput: highest request rate (req/s) keeping >= 90% | >= 99% SLO attainment, "
             "median over held-out seeds " + str(rep["held_out_seeds"]),
             f"{'system':<26}" + "".join(f"{n:>22}" for n in names)]
    for s in rep["systems"]:
        cells = ""
        for n in names:
            g = mixes[n]["held_out"]["goodput_median"][s]
            cells += f"{_fmt(g['goodput90_hz'], 11, 1)}{_fmt(g['goodput99_hz'], 11, 1)}"
        lines.append(f"{s:<26}{cells}")
    lines.append("")
    lines.append(f"{'epara ratio':<26}" + "".join(
        f"{n + ' @' + format(mixes[n]['target'] * 100, '.0f') + '%':>22}" for n in names))
    for label, part, key in (
            ("vs best prior @90 median", "held_out", "ratio_vs_best_prior_median"),
            ("vs best prior @target", "held_out", "ratio_vs_best_prior_at_target_median"),
            ("  ... minimum over seeds", "held_out", "ratio_vs_best_prior_at_target_min"),
            ("vs ablation median", "held_out", "ratio_vs_ablation_median"),
            ("  ... minimum over seeds", "held_out", "ratio_vs_ablation_min"),
            ("vs any baseline, minimum", "held_out", "min_ratio_any_baseline"),
            ("tuning seeds: vs best prior", "tuning", "ratio_vs_best_prior_median"),
            ("tuning seeds: vs ablation", "tuning", "ratio_vs_ablation_median")):
        lines.append(f"{label:<26}" + "".join(
            _fmt(mixes[n][part].get(key), 22) for n in names))
    lines.append("")
    lines.append("Requests within SLO per second at load x1 (attainment), median over "
                 "held-out seeds")
    lines.append(f"{'system':<26}" + "".join(f"{n:>22}" for n in names))
    for s in rep["systems"]:
        lines.append(f"{s:<26}" + "".join(
            f"{_fmt(mixes[n]['held_out']['x1_median'][s]['goodput_hz'], 13, 1)} "
            f"({mixes[n]['held_out']['x1_median'][s]['attainment'] * 100:5.1f}%)"
            for n in names))
    lines.append("")
    lines.append("Planner's run-time estimation error |estimate/actual - 1| (epara, x1, "
                 "median over seeds): cost model alone -> published measurements")
    for n in names:
        e = mixes[n]["held_out"]["estimation_median"]
        lines.append(f"  {n:<18} median {e['prior_median'] * 100:5.1f}% -> "
                     f"{e['measured_median'] * 100:5.1f}%, p90 {e['prior_p90'] * 100:5.1f}% "
                     f"-> {e['measured_p90'] * 100:5.1f}%")
    lines.append("")
    lines.append(f"goodput_ratio_vs_best_prior ({rep['main']}, 90%, median): "
                 f"{_fmt(rep['goodput_ratio_vs_best_prior'], 0)}x; "
                 f"min_ratio_any_workload: {_fmt(rep['min_ratio_any_workload'], 0)}x; "
                 f"ratio_vs_best_baseline (x1 req/s within SLO): "
                 f"{_fmt(rep['ratio_vs_best_baseline'], 0)}x")
    return "\n".join(lines)


def plot(rep: Mapping[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in rep["mixes"] if rep["mixes"][n]["curve"]]
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        curve = rep["mixes"][name]["curve"]
        for s in rep["systems"]:
            points = curve.get(s) or []
            style = "-" if ROUTED not in s else ":"
            width = 2.4 if s == "epara" else 1.2
            ax.plot([x for x, _ in points], [a * 100 for _, a in points], style,
                    marker="o", markersize=3, linewidth=width, label=s)
        ax.axhline(90, color="grey", linewidth=0.6)
        ax.axhline(99, color="grey", linewidth=0.6, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set(title=f"{name} (seed {rep['held_out_seeds'][0] if rep['held_out_seeds'] else 1})",
               xlabel="load multiplier", ylabel="SLO attainment (%)", ylim=(0, 101))
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_goodput_bench(trace: Path | None = None, json_out: bool = False,
                      plot_path: Path | None = None, quick: bool = False,
                      devices: int = TRACE_DEVICES, services: int = TRACE_SERVICES,
                      jobs: int = 2, progress: Callable[[str], None] | None = None) -> str:
    """`epara bench goodput`: the report as tables, or as JSON; the plot if asked."""
    config = BenchConfig(jobs=jobs)
    if quick:
        config = replace(config, duration_s=16.0, warmup_s=6.0, tuning_seeds=(),
                         held_out_seeds=(11, 12))
    requests = read_trace(trace) if trace is not None else None
    rep = run(config, requests, devices, services, progress)
    if plot_path is not None:
        plot(rep, plot_path)
    if json_out:
        return json.dumps(_finite(rep), indent=1)
    return table(rep)


def _finite(x: Any) -> Any:
    """JSON has no infinity: a ratio over a baseline that attains the target at no load
    (while epara does) is written "inf"."""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, Mapping):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x
