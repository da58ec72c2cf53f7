"""`epara demo` end to end, for real: a cluster forms, the leader places the LLM and the
segmentation model, the same workload runs under epara's placement and a baseline's, the
table, ratio and plot come out, and nothing is left behind — after a normal run and after
Ctrl-C, on loopback and (as root) on namespace hosts with emulated device classes. With
``--stay`` the printed commands (status, plan, doctor, curl, the OpenAI client) work
against the cluster it keeps up, and Ctrl-C stops it cleanly."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from epara.models.store import ModelStore
from epara.node.lab.testbed import have_bed

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def store(zoo_store: ModelStore, prepared: Callable[[str], Path]) -> Path:
    for name in ("smollm2-135m", "selfie-seg"):
        prepared(name)
    return zoo_store.root


def demo_command(store: Path, out: Path, *extra: str) -> list[str]:
    # One round: the rounds' loop is the same code, and CI time is dear.
    return [sys.executable, "-m", "epara.node.cli", "demo", "--nodes", "3", "--seconds", "6",
            "--warmup", "2", "--rounds", "1", "--store", str(store), "--out", str(out),
            *extra]


def leftovers(store: Path) -> str:
    """Node processes serving this store (the demo's nodes get ``--store``)."""
    return subprocess.run(["pgrep", "-af", f"epara.node.cli.* node --store {store}"],
                          capture_output=True, text=True).stdout.strip()


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def cgroups() -> set[str]:
    root = Path("/sys/fs/cgroup/cpu")
    return {p.name for p in root.glob("epara-*")} if root.is_dir() else set()


def check_report(stdout: str, out: Path) -> None:
    assert "cluster formed: 3 nodes, leader epara-n" in stdout
    assert re.search(r"smollm2-135m +\S+ +\S+ +\d+ unit", stdout), stdout
    rows = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in re.finditer(
        r"^ +(?:EMULATED )?(epara|replicate-all) +([\d.]+) +[\d.]+-[\d.]+ +([\d.]+)%  "
        r"selfie-seg \d+/\d+ .*smollm2-135m \d+/\d+", stdout, re.M)}
    assert set(rows) == {"epara", "replicate-all"}, stdout
    assert all(goodput > 0 and 0 < slo <= 100 for goodput, slo in rows.values()), rows
    assert re.search(r"epara / replicate-all goodput: [\d.]+x; verdict: "
                     r"(ahead|level|behind)", stdout), stdout
    assert "1 round(s) of epara, replicate-all" in stdout and "fewer than the 3" in stdout
    report = json.loads((out / "report.json").read_text())
    assert len(report["ratios"]) == 1
    assert report["ratio_vs_best_baseline"] == report["ratios"][0]
    assert report["verdict"] in ("ahead", "level", "behind")
    # What the leader decided is what ran: every node's configuration was the plan's.
    assert all(not v["not_as_planned"] for v in report["systems"].values()), report
    for name in ("goodput.png", "mask.png", "overlay.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name
    assert (out / "goodput.png").stat().st_size > 10_000
    assert "nothing left running" in stdout


def test_demo_on_loopback_compares_epara_with_a_baseline_and_cleans_up(
        tmp_path: Path, store: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(demo_command(store, out, "--loopback"), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "as loopback processes (--loopback)" in result.stdout
    check_report(result.stdout, out)
    assert leftovers(store) == ""


@pytest.mark.root
@pytest.mark.skipif(have_bed() is not None, reason=f"{have_bed()}")
def test_demo_as_root_runs_on_emulated_namespace_hosts_and_removes_them(
        tmp_path: Path, store: Path) -> None:
    before = (namespaces(), cgroups())
    out = tmp_path / "out"
    result = subprocess.run(demo_command(store, out), capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "namespace hosts with emulated device classes (root)" in result.stdout
    assert "EMULATED host 2 10.77.0.3: pi" in result.stdout
    check_report(result.stdout, out)
    assert leftovers(store) == ""
    assert (namespaces(), cgroups()) == before


def test_ctrl_c_mid_workload_stops_every_node_and_leaves_nothing(
        tmp_path: Path, store: Path) -> None:
    # On namespace hosts where this can run (the harder clean-up), else on loopback.
    before = (namespaces(), cgroups())
    command = demo_command(store, tmp_path / "out", *(() if have_bed() is None
                                                      else ("--loopback",)))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    assert process.stdout is not None
    seen = []
    end = time.monotonic() + 180
    for line in process.stdout:
        seen.append(line)
        if "[epara]" in line:  # the live progress line: the workload is running
            break
        assert time.monotonic() < end, "".join(seen)
    else:
        raise AssertionError("the demo ended before its workload:\n" + "".join(seen))
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=60)
    output = "".join(seen) + rest
    assert process.returncode == 130, output
    assert "interrupted: every node stopped" in output
    assert leftovers(store) == ""
    assert (namespaces(), cgroups()) == before


# --- epara demo --stay: the operator's views against the demo's running cluster ----------

STAY_SECONDS = 4


def _until_staying(process: subprocess.Popen[str], timeout: float) -> str:
    """The demo's output up to the line that says the cluster stays up."""
    assert process.stdout is not None
    seen = []
    end = time.monotonic() + timeout
    for line in process.stdout:
        seen.append(line)
        if "the cluster stays up until Ctrl-C" in line:
            return "".join(seen)
        assert time.monotonic() < end, "".join(seen)
    raise AssertionError("the demo ended without staying up:\n" + "".join(seen))


def _hint(output: str, marker: str) -> str:
    """The printed command containing ``marker``, as printed."""
    found = [line.strip() for line in output.splitlines() if marker in line]
    assert found, f"no hint with {marker!r}:\n{output}"
    return found[0]


def _run_hint(command: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run a printed command as a user would paste it into a shell."""
    return subprocess.run(["bash", "-c", " ".join([command, *extra])], capture_output=True,
                          text=True, timeout=60)


def _get(url: str, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                timeout=30) as response:
        assert response.status == 200
        return response.read().decode()


def check_staying_cluster(output: str, bed: bool, openai: Any) -> None:
    nodes = re.findall(r"^ +(epara-n\d) +(/\S+/node\.sock) +(http://127\.0\.0\.1:\d+)(.*)$",
                       output, re.M)
    assert [n[0] for n in nodes] == ["epara-n0", "epara-n1", "epara-n2"], output
    assert all(("forwarded by the demo" in n[3]) == bed for n in nodes), output
    # Off loopback (namespace hosts) HTTP needs the bearer token the demo prints.
    printed = re.search(r"HTTP token \(.*\): (\S+)$", output, re.M)
    assert (printed is not None) == bed, output
    token = printed.group(1) if printed else None
    for _, _, url, _ in nodes:  # HTTP on every node
        assert "smollm2-135m" in _get(url + "/v1/models", token)
    if bed:
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get(nodes[0][2] + "/v1/models")
        assert refused.value.code == 401

    status = _run_hint(_hint(output, " status --socket "), "--json")
    assert status.returncode == 0, status.stderr
    cluster = json.loads(status.stdout)["cluster"]
    assert len(cluster["members"]) == 3 and cluster["leader"] in {n[0] for n in nodes}
    if bed:  # each host advertises its emulated class, not the machine's
        classes = {m["node_id"]: (m.get("capabilities") or {}).get("device_class")
                   for m in cluster["members"]}
        assert classes == {"epara-n0": "server", "epara-n1": "embedded",
                           "epara-n2": "microcomputer"}, classes

    plan = _run_hint(_hint(output, " plan --socket "), "--json")
    assert plan.returncode == 0, plan.stderr
    services = {s["service"]: s for s in json.loads(plan.stdout)["placement"]["services"]}
    assert set(services) == {"selfie-seg", "smollm2-135m"}
    assert all(s["category"] and s["mode"] and s["units"] for s in services.values()), \
        services

    doctor = _run_hint(_hint(output, " doctor --cluster "))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "3 of this cluster" in doctor.stdout, doctor.stdout

    url = re.search(r"curl -s (?:-H '[^']*' )?(http://127\.0\.0\.1:\d+)/v1/models", output)
    assert url is not None, output
    base = url.group(1)
    metrics = _get(base + "/metrics", token)
    assert "epara_request_latency_seconds" in metrics and "\nepara_" in metrics
    assert "<html" in _get(base + "/")
    assert _get(base + "/api/status", token)
    assert f"dashboard: {base}/" + (f"#token={token}" if token else "") in output

    client = openai.OpenAI(base_url=base + "/v1", api_key=token or "unused", max_retries=0,
                           timeout=60)
    assert "smollm2-135m" in [m.id for m in client.models.list()]
    answer = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=8, temperature=0)
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    # The printed snippet and curl work as pasted.
    snippet = _run_hint(_hint(output, "import openai"))
    assert snippet.returncode == 0 and snippet.stdout.strip(), snippet.stderr
    chat = _run_hint(_hint(output, "/v1/chat/completions"))
    assert json.loads(chat.stdout)["object"] == "chat.completion", chat.stdout


def run_staying_demo(tmp_path: Path, store: Path, *extra: str) -> None:
    openai = pytest.importorskip("openai")  # the dev extra's official client
    command = demo_command(store, tmp_path / "out", "--stay", *extra)
    command[command.index("--seconds") + 1] = str(STAY_SECONDS)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        output = _until_staying(process, 240)
        check_staying_cluster(output, "--loopback" not in extra, openai)
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output + rest
    assert "stopping the cluster" in rest and "nothing left running" in rest, rest
    assert leftovers(store) == ""
    # This demo's bed (by its tag; other beds may come and go on a shared machine).
    tags = set(re.findall(r"in namespace eph\d+-(\w+)", output))
    assert bool(tags) == ("--loopback" not in extra), output
    assert not {name for name in namespaces() | cgroups() if any(t in name for t in tags)}


def test_demo_stay_keeps_a_cluster_up_for_the_operator_views_on_loopback(
        tmp_path: Path, store: Path) -> None:
    run_staying_demo(tmp_path, store, "--loopback")


@pytest.mark.root
@pytest.mark.skipif(have_bed() is not None, reason=f"{have_bed()}")
def test_demo_stay_reaches_namespace_hosts_through_forwarded_ports(
        tmp_path: Path, store: Path) -> None:
    run_staying_demo(tmp_path, store)
