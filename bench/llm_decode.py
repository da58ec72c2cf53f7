"""Decode speed of the epara LLM engine against transformers, measured in the same run.

    python bench/llm_decode.py [--threads 2] [--tokens 48] [--repeats 3] [--llama-cpp]
    python bench/llm_decode.py --json

For batch 1 and batch 4 it reports time to first token (prefill of the batch's prompts)
and decode throughput (generated tokens per second over all sequences, after the first),
best of interleaved rounds, for: epara (ONNX Runtime, GGUF weights kept 4-bit), plain
transformers ``generate`` on the same GGUF de-quantised to float32, and optionally
llama-cpp-python on the GGUF itself (only if it is installed). It also reports how many
greedy tokens epara and transformers agree on, and the stall of a running stream while
a 1,000-token prompt is admitted: the longest gap between two of its tokens, in units
of its median gap before the prompt arrived (decode steps). Not a test: run it by hand.

``--json`` runs every system that is installed and prints one JSON object: the ratios
``b1_vs_llama_cpp``, ``b4_vs_transformers``, ``b4_vs_llama_cpp`` (decode tok/s, best of
the rounds, ``null`` where the reference is not installed), ``max_token_gap_steps``,
and the raw rates with their spread over the rounds.

The references are bench-only dependencies, not epara's:
- transformers: ``pip install torch==2.13.0`` (the CPU wheel, first), then
  ``pip install transformers==5.24.0 accelerate``.
- llama.cpp: ``CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python`` builds
  llama.cpp from source (about 8 minutes on two idle cores; a C/C++ compiler and cmake
  are needed).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from epara.models.llm import GenerationParams, LlmEngine, load_engine
from epara.models.llm_prepare import extract_gguf, prepare_smollm2
from epara.models.store import ModelStore

PROMPTS = [
    "Once upon a time, there was a little robot who",
    "The history of the printing press begins",
    "Here is a short story about a dragon and a knight:",
    "The three most important inventions of the last century are",
]

Result = tuple[float, float, list[list[int]]]  # ttft seconds, decode tok/s, tokens
LABELS = {
    "epara": "epara (4-bit weights, fp32 math)",
    "epara-int8": "epara (4-bit weights, int8 acts)",
    "transformers": "transformers generate (fp32)",
    "llama-cpp": "llama-cpp-python (Q4_1)",
}


def bench_epara(engine: LlmEngine, batch: int, tokens: int) -> Result:
    for i in range(batch):
        engine.add(f"b{i}", prompt=PROMPTS[i], params=GenerationParams(max_tokens=tokens))
    out: dict[str, list[int]] = {f"b{i}": [] for i in range(batch)}
    start = time.perf_counter()
    first = None
    while engine.active:
        for event in engine.step():
            if event.token_id >= 0:
                out[event.seq_id].append(event.token_id)
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    decoded = sum(len(t) - 1 for t in out.values())
    return first - start, decoded / (end - first), list(out.values())


def token_gap_steps(engine: LlmEngine, prompt_tokens: int = 1000, before: int = 12,
                    ) -> float:
    """The stall of a running stream while a long prompt is admitted: the longest gap
    between two of its tokens from the prompt's arrival until the prompt's first token,
    over the stream's median gap before the arrival (its decode step)."""
    # Long enough to outlast the prompt's whole prefill (it is cancelled then).
    engine.add("stream", prompt=PROMPTS[0], params=GenerationParams(max_tokens=4000))
    stamps: list[float] = []
    arrival = first_long = None
    while engine.active:
        events = engine.step()
        now = time.perf_counter()
        if any(e.seq_id == "stream" and e.token_id >= 0 for e in events):
            stamps.append(now)
        if any(e.seq_id == "long" for e in events) and first_long is None:
            first_long = now
            engine.cancel("stream")
            engine.cancel("long")
        if len(stamps) == before and arrival is None:
            words = "The history of the printing press begins with movable type. " * 200
            ids = engine.tokenizer.encode(words, add_special_tokens=False).ids
            long_prompt = engine.tokenizer.decode(ids[:prompt_tokens])
            arrival = time.perf_counter()
            engine.add("long", prompt=long_prompt, params=GenerationParams(max_tokens=2))
    while engine.active:
        engine.step()
    step = statistics.median(b - a for a, b in itertools.pairwise(stamps[:before]))
    during = [s for s in stamps if s >= arrival] + [first_long]
    gaps = [b - a for a, b in itertools.pairwise([stamps[before - 1], *during])]
    return max(gaps) / step


def load_transformers(gguf: Path, threads: int) -> Callable[[int, int], Result]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)

    def run(batch: int, tokens: int) -> Result:
        enc = tokenizer(PROMPTS[:batch], return_tensors="pt", padding=True)
        with torch.inference_mode():
            start = time.perf_counter()
            model.generate(**enc, max_new_tokens=1, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
            first = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            total = time.perf_counter() - start
        new = out[:, enc.input_ids.shape[1]:].tolist()
        # Rows that stopped early are padded: count only real tokens.
        stop = {tokenizer.pad_token_id, tokenizer.eos_token_id}
        rows = [[t for t in row if t not in stop] for row in new]
        decoded = sum(max(0, len(r) - 1) for r in rows)
        return first, decoded / max(total - first, 1e-9), rows

    return run


def load_llama_cpp(gguf: Path, threads: int) -> Callable[[int, int], Result] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_threads=threads, n_ctx=512, verbose=False)

    def run(batch: int, tokens: int) -> Result:
        # llama-cpp-python's high-level API runs one sequence at a time.
        ttfts, rates = [], []
        for prompt in PROMPTS[:batch]:
            llm.reset()  # no reuse of the previous run's prompt cache: time the prefill
            start = time.perf_counter()
            first, count = None, 0
            for _ in llm(prompt, max_tokens=tokens, temperature=0.0, stream=True):
                first = first or time.perf_counter()
                count += 1
            end = time.perf_counter()
            ttfts.append(first - start)
            rates.append((count - 1) / (end - first))
        # Sequences run one after another: the batch's rate is the mean per-sequence rate.
        return statistics.mean(ttfts), statistics.mean(rates), [[] for _ in range(batch)]

    return run


def best_of(results: list[Result]) -> Result:
    """Fastest TTFT and decode rate: on a shared machine the least disturbed run is the
    closest to what the system can do (medians moved ±30% with other people's jobs)."""
    return (min(r[0] for r in results), max(r[1] for r in results), results[0][2])


def load_system(name: str, model_dir: Path, gguf: Path, threads: int,
                ) -> Callable[[int, int], Result]:
    if name == "transformers":
        run = load_transformers(gguf, threads)
    elif name == "llama-cpp":
        loaded = load_llama_cpp(gguf, threads)
        if loaded is None:
            raise SystemExit("llama-cpp-python is not installed")
        run = loaded
    else:
        engine = load_engine(model_dir, threads=threads)
        if name == "epara-int8":
            engine = LlmEngine(model_dir, engine.manifest, threads=threads, stages=[
                model_dir / engine.manifest.files["model_int8_activations"]])

        def run(batch: int, tokens: int) -> Result:
            return bench_epara(engine, batch, tokens)
    run(1, 4)  # warm-up: first runs allocate, pre-pack weights, fill caches
    return run


def measure_in_child(name: str, args: argparse.Namespace, model_dir: Path, gguf: Path,
                     ) -> dict[int, Result]:
    """One round of one system in its own process, so no runtime's thread pool (spinning
    OpenMP or ONNX Runtime workers) competes with the next system for the cores."""
    command = [sys.executable, __file__, "--child", name, "--model-dir", str(model_dir),
               "--gguf", str(gguf), "--threads", str(args.threads),
               "--tokens", str(args.tokens), "--gap-tokens", str(args.gap_tokens)]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    out = json.loads(done.stdout.splitlines()[-1])
    return {(int(k) if k.isdigit() else k): (tuple(v) if isinstance(v, list) else v)
            for k, v in out.items()}


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = total = 0
    for x, y in zip(a, b, strict=True):
        n = min(len(x), len(y))
        prefix = next((i for i in range(n) if x[i] != y[i]), n)
        same, total = same + prefix, total + n
    return f"{same}/{total}"


def summary(results: dict[str, dict[int, Result]], rounds: list[dict[str, Any]],
            gaps: list[float], args: argparse.Namespace) -> dict[str, Any]:
    """The --json object: ratios of best decode rates, and every rate's spread."""
    def ratio(batch: int, base: str) -> float | None:
        if base not in results:
            return None
        return round(results["epara"][batch][1] / results[base][batch][1], 3)

    return {
        "b1_vs_llama_cpp": ratio(1, "llama-cpp"),
        "b4_vs_transformers": ratio(4, "transformers"),
        "b4_vs_llama_cpp": ratio(4, "llama-cpp"),
        "b1_vs_transformers": ratio(1, "transformers"),
        "max_token_gap_steps": round(statistics.median(gaps), 2),
        "gap_prompt_tokens": args.gap_tokens,
        "max_token_gap_steps_range": [round(min(gaps), 2), round(max(gaps), 2)],
        "decode_tok_s": {name: {str(b): {"best": round(results[name][b][1], 1),
                                         "all": [round(r[name][b][1], 1) for r in rounds]}
                                for b in (1, 4)} for name in results},
        "threads": args.threads, "tokens": args.tokens, "rounds": args.repeats,
        "llama_cpp_installed": "llama-cpp" in results,
        "transformers_installed": "transformers" in results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--store", type=Path, default=None, help="model store (default: "
                        "$EPARA_MODEL_STORE or the user cache)")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="also time llama-cpp-python if it is installed")
    parser.add_argument("--gap-tokens", type=int, default=1000, help="length of the prompt "
                        "admitted beside a running stream for the token-gap measure")
    parser.add_argument("--json", action="store_true", help="run every installed system "
                        "and print one JSON object of ratios (see the module docstring)")
    parser.add_argument("--child", choices=list(LABELS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--gguf", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        run = load_system(args.child, args.model_dir, args.gguf, args.threads)
        out: dict[str, Any] = {str(b): run(b, args.tokens) for b in (1, 4)}
        if args.child == "epara":
            out["gap"] = token_gap_steps(load_engine(args.model_dir, threads=args.threads),
                                         args.gap_tokens)
        print(json.dumps(out))
        return 0

    store = ModelStore(args.store)
    model_dir = prepare_smollm2(store)
    gguf = extract_gguf(store, Path(tempfile.mkdtemp(prefix="epara-bench-")))
    names = ["epara"] if args.json else ["epara", "epara-int8"]
    have_transformers = importlib.util.find_spec("transformers") is not None
    if not args.no_transformers and (have_transformers or not args.json):
        names.append("transformers")
    if args.llama_cpp or args.json:
        if importlib.util.find_spec("llama_cpp") is None:
            print("llama-cpp-python is not installed: skipped", file=sys.stderr)
        else:
            names.append("llama-cpp")
    # Rounds interleave the systems, so a burst of outside load hits all of them alike.
    rounds = [{name: measure_in_child(name, args, model_dir, gguf) for name in names}
              for _ in range(args.repeats)]
    results = {name: {b: best_of([r[name][b] for r in rounds]) for b in (1, 4)}
               for name in names}
    gaps = [r["epara"]["gap"] for r in rounds]
    if args.json:
        print(json.dumps(summary(results, rounds, gaps, args), indent=1))
        return 0

    print(f"\nSmolLM2-135M-Instruct, {args.threads} threads, {args.tokens} new tokens per "
          f"sequence, best of {args.repeats} interleaved rounds, each system in its own "
          "process")
    header = f"{'system':<34}{'batch':>6}{'TTFT ms':>10}{'decode tok/s':>14}{'vs transformers':>17}"
    print(header)
    print("-" * len(header))
    for batch in (1, 4):
        base = results.get("transformers", {}).get(batch)
        for name in names:
            ttft, rate, _ = results[name][batch]
            ratio = f"{rate / base[1]:.1f}x" if base else "-"
            print(f"{LABELS[name]:<34}{batch:>6}{ttft * 1000:>10.1f}{rate:>14.1f}{ratio:>17}")
    print(f"longest token gap of a running stream while a {args.gap_tokens}-token prompt is "
          "admitted: "
          f"{statistics.median(gaps):.2f} decode steps (median of {len(gaps)} rounds; "
          f"range {min(gaps):.2f}-{max(gaps):.2f})")
    if "transformers" in results:
        for name in ("epara", "epara-int8"):
            for batch in (1, 4):
                same = agreement(results[name][batch][2], results["transformers"][batch][2])
                print(f"{LABELS[name]}, batch {batch}: greedy tokens equal to transformers "
                      f"(common prefix per sequence): {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
