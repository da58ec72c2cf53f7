"""The node's HTTP endpoint against a real node serving the real SmolLM2-135M: the
official OpenAI client (plain and streamed chat completions, model listing, errors),
Prometheus metrics after traffic, and the dashboard rendered by headless Chromium."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from epara.node.client import Client

from .helpers import make_add_model, running_node, stop_node, wait_for_socket

openai = pytest.importorskip("openai")

MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory,
         prepared: Callable[[str], Path]) -> Iterator[dict[str, Any]]:
    """One standalone node serving the LLM and a tiny ONNX model, HTTP on a free port."""
    store = tmp_path_factory.mktemp("http-store")
    subprocess.run(["cp", "-r", str(prepared(MODEL)), str(store / MODEL)], check=True)
    make_add_model(store, batch=None)
    sock = tmp_path_factory.mktemp("http-node") / "node.sock"
    with running_node(store, sock, "--http-port", "0", "--threads", "1",
                      "--node-id", "http-node-1"):
        with Client(sock) as client:
            url = client.status()["http"]
        yield {"url": url, "socket": sock}


@pytest.fixture
def ai(node: dict[str, Any]) -> Any:
    # No retries: an error status must surface as it is, once.
    return openai.OpenAI(base_url=node["url"] + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers["Content-Type"]


def test_http_listens_on_loopback_only(node: dict[str, Any]) -> None:
    assert node["url"].startswith("http://127.0.0.1:")


def test_models_lists_the_llm_and_not_other_tasks(ai: Any) -> None:
    ids = [m.id for m in ai.models.list()]
    assert ids == [MODEL]  # the ONNX `add` model does not generate text
    assert ai.models.retrieve(MODEL).owned_by == "epara"


def test_chat_completion_greedy_answers_paris(ai: Any) -> None:
    answer = ai.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                        max_tokens=24)
    assert answer.object == "chat.completion"
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < answer.usage.completion_tokens <= 24
    # The chat as the template renders it: system + user turns and the assistant header.
    assert answer.usage.prompt_tokens > 10
    assert answer.usage.total_tokens == answer.usage.prompt_tokens \
        + answer.usage.completion_tokens


def test_streamed_chat_completion_matches_the_plain_one(ai: Any) -> None:
    params = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 24}
    plain_answer = ai.chat.completions.create(**params)
    plain = plain_answer.choices[0].message.content
    chunks = list(ai.chat.completions.create(**params, stream=True,
                                             stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain and "Paris" in text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].usage.prompt_tokens == plain_answer.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == plain_answer.usage.completion_tokens


def test_stream_is_server_sent_events_ending_with_done(node: dict[str, Any]) -> None:
    body = json.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": 3, "stream": True,
                       "stop": "\n", "seed": 1, "top_p": 0.9}).encode()
    request = urllib.request.Request(node["url"] + "/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_errors_are_openai_error_bodies_with_http_statuses(ai: Any,
                                                            node: dict[str, Any]) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        ai.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert missing.value.status_code == 404
    assert missing.value.body["code"] == "unknown_model"
    with pytest.raises(openai.NotFoundError):  # streamed: the status precedes the stream
        ai.chat.completions.create(model="no-such-model", messages=QUESTION, stream=True)
    with pytest.raises(openai.BadRequestError) as bad:
        ai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=0)
    assert bad.value.body["code"] == "bad_request"
    with pytest.raises(openai.BadRequestError) as not_llm:
        ai.chat.completions.create(model="add", messages=QUESTION)
    assert not_llm.value.body["code"] == "unsupported"
    with pytest.raises(openai.APIStatusError) as late:
        ai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=200,
                                   extra_body={"deadline_ms": 1})
    assert late.value.status_code == 504
    status, body, _ = get(node["url"] + "/v1/nothing")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    port = int(node["url"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                  b"Content-Length: 5\r\n\r\nnope!" % port)
        head = s.recv(65536).decode()
    assert head.startswith("HTTP/1.1 400 ")


def test_metrics_count_requests_by_outcome(ai: Any, node: dict[str, Any]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    ai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        ai.chat.completions.create(model="no-such-model", messages=QUESTION)
    with pytest.raises(openai.APIStatusError):
        ai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=50,
                                   extra_body={"deadline_ms": 1})
    with Client(node["socket"]) as client:  # the local socket is counted the same way
        for _ in range(3):
            client.infer("add", {"x": np.ones((1, 4), "float32")})
    status, text, content_type = get(node["url"] + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in samples.get(name, [])
                   if all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("epara_requests_total", model=MODEL, source="http", outcome="ok") >= 1
    assert value("epara_requests_total", model=MODEL, outcome="expired") >= 1
    assert value("epara_requests_total", model="add", source="socket", outcome="ok") >= 3
    assert value("epara_goodput_requests_total", model="add") >= 3
    assert value("epara_goodput_requests_total", model=MODEL) == value(
        "epara_requests_total", model=MODEL, outcome="ok")
    assert value("epara_request_latency_seconds_count", model="add") >= 3
    assert value("epara_time_to_first_token_seconds_count", model=MODEL) >= 1
    assert [s.labels["model"] for s in samples["epara_queue_depth"]] == ["add", MODEL]
    assert value("epara_node_info", node_id="http-node-1") == 1
    # A made-up model name never becomes a label of its own.
    assert value("epara_requests_total", model="(unknown)", outcome="invalid") >= 1
    assert not any(s.labels.get("model") == "no-such-model" for group in samples.values()
                   for s in group)


def test_a_client_that_hangs_up_mid_stream_stops_its_generation(
        ai: Any, node: dict[str, Any]) -> None:
    stream = ai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=500,
                                        stream=True)
    next(iter(stream))
    stream.close()
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with Client(node["socket"]) as client:
            stats = next(s for s in client.status()["services"] if s["model"] == MODEL)
        if stats["cancelled"] and not stats["active_sequences"]:
            break
        time.sleep(0.1)
    assert stats["cancelled"] == 1 and stats["active_sequences"] == 0


def test_dashboard_renders_in_headless_chromium(node: dict[str, Any],
                                                tmp_path: Path) -> None:
    status, page, content_type = get(node["url"] + "/")
    assert status == 200 and content_type.startswith("text/html")
    assert b"http://" not in page.replace(b"http://www.w3.org", b"")  # no CDN, no outside
    status, body, _ = get(node["url"] + "/api/status")
    assert json.loads(body)["node_id"] == "http-node-1"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    image = pytest.importorskip("PIL.Image")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    shot = tmp_path / "dashboard.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,800", node["url"]],
                   check=True, capture_output=True, timeout=60)
    dom = subprocess.run([*flags, "--dump-dom", node["url"]], check=True,
                         capture_output=True, timeout=60, text=True).stdout
    assert 'data-node="http-node-1"' in dom and MODEL in dom
    assert shot.stat().st_size > 10_000
    with image.open(shot) as picture:
        colours = picture.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # drawn, not a blank page


def scrape(url: str) -> dict[str, float]:
    """``name{label="value",...}`` -> value, for the few series these tests read."""
    from prometheus_client.parser import text_string_to_metric_families

    _, text, _ = get(url + "/metrics")
    return {name_with_labels(s.name, s.labels): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples}


def name_with_labels(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def test_a_cluster_serves_chat_and_shows_itself(tmp_path: Path, cluster_dir: Path,
                                                prepared: Callable[[str], Path]) -> None:
    """Two nodes: either one lists the LLM before it is placed and answers a chat through
    the cluster's routing; metrics show the membership; the dashboard draws both."""
    store = tmp_path / "store"
    store.mkdir()
    subprocess.run(["cp", "-r", str(prepared(MODEL)), str(store / MODEL)], check=True)
    urls = {}
    with contextlib.ExitStack() as stack:
        for name in ("c0", "c1"):
            sock = tmp_path / name / "node.sock"
            stack.enter_context(running_node(
                store, sock, "--cluster", str(cluster_dir), "--node-id", name,
                "--interface", "127.0.0.1", "--port", "0", "--threads", "1",
                "--http-port", "0"))
            with Client(sock) as client:
                urls[name] = client.status()["http"]
        end = time.monotonic() + 20
        while time.monotonic() < end:  # both see both, and one leads
            metrics = [scrape(url) for url in urls.values()]
            if all(m.get('epara_cluster_members{status="alive"}') == 2 for m in metrics) \
                    and sum(m.get("epara_is_leader", 0) for m in metrics) == 1:
                break
            time.sleep(0.2)
        for url in urls.values():  # listed from the catalogues, placed or not
            _, body, _ = get(url + "/v1/models")
            assert [m["id"] for m in json.loads(body)["data"]] == [MODEL]
        ai = openai.OpenAI(base_url=urls["c1"] + "/v1", api_key="unused", max_retries=0,
                           timeout=60)
        answer = ai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24)
        assert "Paris" in answer.choices[0].message.content
        metrics = [scrape(url) for url in urls.values()]
        assert all(m['epara_cluster_members{status="alive"}'] == 2 for m in metrics)
        assert sum(m["epara_is_leader"] for m in metrics) == 1
        assert len({m["epara_term"] for m in metrics}) == 1
        assert metrics[1][name_with_labels("epara_requests_total", {
            "model": MODEL, "source": "http", "outcome": "ok"})] == 1
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            pytest.skip("chromium is not installed (apt-get install chromium)")
        dom = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
             "--screenshot=" + str(tmp_path / "cluster.png"), "--window-size=1200,800",
             urls["c0"]], check=True, capture_output=True, timeout=60)
        dom = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
             "--dump-dom", urls["c0"]], check=True, capture_output=True, timeout=60,
            text=True).stdout
        assert 'data-node="c0"' in dom and 'data-node="c1"' in dom
        assert dom.count('class="box leader') == 1


def test_a_node_without_prometheus_client_serves_http_without_metrics(tmp_path: Path) -> None:
    """prometheus-client is an optional extra: a node whose Python cannot import it
    (None in sys.modules makes the import fail) runs, and /metrics says what is missing."""
    store = tmp_path / "store"
    make_add_model(store)
    sock = tmp_path / "n" / "node.sock"
    code = ("import sys; sys.modules['prometheus_client'] = None; "
            "from epara.node.cli import main; sys.exit(main(sys.argv[1:]))")
    process = subprocess.Popen(
        [sys.executable, "-c", code, "node", "--standalone", "--store", str(store),
         "--socket", str(sock), "--http-port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(sock, process)
        with Client(sock) as client:
            url = client.status()["http"]
            client.infer("add", {"x": np.ones((1, 4), "float32")})
        status, body, _ = get(url + "/metrics")
        assert status == 501 and json.loads(body)["error"]["code"] == "metrics_unavailable"
        status, body, _ = get(url + "/api/status")
        assert json.loads(body)["requests"]["add"] == {"ok": 1, "goodput": 1}
    finally:
        stop_node(process)
