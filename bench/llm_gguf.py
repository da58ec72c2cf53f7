"""A Qwen2.5-0.5B-shaped Q4_K_M GGUF (random weights) through ``epara models import``:
does it load, and are its greedy tokens those of an independent reference?

    python bench/llm_gguf.py [--tokens 8] [--threads 2] [--json] [--keep DIR]

The file has Qwen2.5-0.5B-Instruct's real shapes (24 layers, width 896, 14 heads / 2 KV
heads, FFN 4864, vocabulary 151936, tied embedding, QKV bias) and llama.cpp's Q4_K_M
choice of types (Q5_0 and Q8_0 where rows of 896 are not whole K-quant super-blocks,
Q4_K / Q6_K ffn_down, Q8_0 embedding); see ``tests/gguf_models.qwen25_05b_q4_k_m``. The
reference is the float64 numpy forward pass of ``tests/llm_reference.py`` on the
``gguf`` package's de-quantised weights. Reports the times to write, import and load the
model, the greedy tokens of both, the largest logit difference, and epara's decode speed
(batch 1) next to the reference's own time per token in the same run, for scale only.
Needs about 4 GB of memory and several minutes on 2 cores (``--keep DIR`` reuses the
file and the import in a second run). Not a test: run it by hand (a
``slow`` test runs the same check: ``pytest -m slow tests/test_llm_gguf.py``).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ helpers

from epara.models.importer import import_model
from epara.models.llm import GenerationParams, LlmStage, load_engine
from epara.models.store import ModelStore
from tests.gguf_models import qwen25_05b_q4_k_m, write_model
from tests.llm_reference import Reference

PROMPT = "The capital of France is Paris. Once upon a time,"


def run(folder: Path, tokens: int = 8, threads: int = 2) -> dict[str, Any]:
    """Write, import, load and check the model in ``folder``; the figures as a dict."""
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    path = folder / "qwen2.5-0.5b-q4_k_m-random.gguf"
    if not path.exists():  # --keep DIR: a second run reuses the file and the import
        partial = write_model(path.with_suffix(".partial"), qwen25_05b_q4_k_m())
        partial.replace(path)
    written = time.perf_counter()
    directory = import_model(path, ModelStore(folder / "store"), "qwen25-05b-random",
                             stream=io.StringIO())
    imported = time.perf_counter()
    engine = load_engine(directory, threads=threads)
    loaded = time.perf_counter()
    ids = engine.encode(PROMPT)
    stage = LlmStage(directory / engine.manifest.model_file, threads=threads)
    logits = stage.forward(["p"], np.array([ids], np.int64), np.arange(len(ids))[None])[0]
    del stage
    engine.add("g", prompt=PROMPT, params=GenerationParams(max_tokens=tokens))
    got: list[int] = []
    step_times = []
    while engine.active:
        tick = time.perf_counter()
        got += [e.token_id for e in engine.step() if e.finish_reason != "stop"]
        step_times.append(time.perf_counter() - tick)
    reference = Reference(path, cache=True)  # ~2 GB of float32 weights, kept
    tick = time.perf_counter()
    want_logits = reference.forward(ids)[-1]
    reference_s = time.perf_counter() - tick
    want = reference.greedy(ids, len(got))
    decode = step_times[1:]  # the first step is the prefill
    return {
        "model": "Qwen2.5-0.5B shapes, Q4_K_M types, random weights",
        "quantisation": engine.manifest.extra["quantisation"],
        "weights_mb": round((directory / "weights.bin").stat().st_size / 2**20, 1),
        "gguf_mb": round(path.stat().st_size / 2**20, 1),
        "write_s": round(written - start, 1),
        "import_s": round(imported - written, 1),
        "load_s": round(loaded - imported, 1),
        "prompt_tokens": len(ids),
        "greedy_epara": got,
        "greedy_reference": want,
        "greedy_equal": got == want,
        "max_logit_diff_rel": float(np.abs(logits - want_logits).max()
                                    / np.abs(want_logits).max()),
        "decode_tok_s": round(len(decode) / sum(decode), 2) if decode else None,
        "decode_step_ms_spread": [round(1000 * min(decode), 1), round(1000 * max(decode), 1)]
        if decode else None,
        "reference_forward_s": round(reference_s, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()
    if args.keep:
        result = run(args.keep, args.tokens, args.threads)
    else:
        with tempfile.TemporaryDirectory(prefix="epara-gguf-bench-") as folder:
            result = run(Path(folder), args.tokens, args.threads)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return 0 if result["greedy_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
