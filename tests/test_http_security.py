"""HTTP hardening (node/httpapi.py, docs/http.md "Security and limits"): Host and Origin
checks, the bearer token, connection, body and request-time limits, against real node
processes serving a tiny ONNX model (no LLM needed)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from epara.node.client import Client
from epara.node.httpapi import HttpLimits, host_allowed, origin_allowed

from .helpers import make_add_model, running_node

NAMES = frozenset({"mydevice", "mydevice.local"})


def test_host_rules_defeat_dns_rebinding() -> None:
    loop = "127.0.0.1"
    assert host_allowed("127.0.0.1:8080", loop, NAMES)
    assert host_allowed("localhost:8080", loop, NAMES) and host_allowed("[::1]:80", loop, NAMES)
    assert not host_allowed("evil.example:8080", loop, NAMES)  # a rebinding page's name
    assert not host_allowed("10.0.0.5:8080", loop, NAMES)  # loopback answers loopback only
    assert not host_allowed("mydevice.local:8080", loop, NAMES)
    assert not host_allowed("", loop, NAMES)
    lan = "10.0.0.5"
    assert host_allowed("10.0.0.5:8080", lan, NAMES) and host_allowed("mydevice.local", lan,
                                                                       NAMES)
    assert host_allowed("127.0.0.1:9999", lan, NAMES)  # through a port forward
    assert not host_allowed("evil.example", lan, NAMES)
    assert not host_allowed("evil.example", "0.0.0.0", NAMES)


def test_origin_must_be_this_listener() -> None:
    assert origin_allowed(None, "127.0.0.1:8080")  # curl, SDKs: no Origin
    assert origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080")  # the dashboard
    assert not origin_allowed("http://evil.example", "127.0.0.1:8080")
    assert not origin_allowed("http://127.0.0.1:8081", "127.0.0.1:8080")  # another port
    assert not origin_allowed("null", "127.0.0.1:8080")  # sandboxed frames, file:// pages


def raw(url: str, request: bytes, *, timeout: float = 15.0) -> tuple[int, dict[str, Any]]:
    """Send bytes as they are; the status and JSON body of the answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    is_json = b"content-type: application/json" in head.lower()
    return int(head.split(b" ")[1]), json.loads(body) if is_json else {}


def request(url: str, method: str = "GET", path: str = "/v1/models", *,
            headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    authority = url.removeprefix("http://")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {authority}", "Connection: close",
             f"Content-Length: {len(body)}"]
    for name, value in (headers or {}).items():
        if name == "Host":
            lines[1] = f"Host: {value}"
        else:
            lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("httpsec-store")
    make_add_model(store)
    return store


# Configured, not the defaults (64 connections, 1 MiB, 10 s): each is enforced as given.
LIMITS = HttpLimits(max_connections=6, max_body_bytes=4 * 1024, request_timeout_s=1.5)
LIMIT_FLAGS = ("--http-max-connections", "6", "--http-max-body-kb", "4",
               "--http-request-timeout", "1.5")


@pytest.fixture(scope="module")
def loopback_node(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    sock = tmp_path_factory.mktemp("httpsec-a") / "node.sock"
    with running_node(store, sock, "--http-port", "0", "--standalone", *LIMIT_FLAGS):
        with Client(sock) as client:
            status = client.status()
        assert status["http_limits"] == {**LIMITS.to_json(), "open_connections": 0}
        yield status["http"]


def test_loopback_node_checks_host_origin_and_body_size(loopback_node: str) -> None:
    url = loopback_node
    slow = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    slow.sendall(b"GET /v1/models HTTP/1.1\r\nHo")  # ... and never the rest
    started = time.monotonic()
    try:
        assert raw(url, request(url))[0] == 200
        assert raw(url, request(url, headers={"Host": "localhost"}))[0] == 200
        status, body = raw(url, request(url, headers={"Host": "evil.example"}))
        assert status == 421 and body["error"]["code"] == "bad_host"
        status, body = raw(url, request(url, "POST", "/v1/chat/completions", headers={
            "Origin": "http://evil.example", "Content-Type": "text/plain"}, body=b"{}"))
        assert status == 403 and body["error"]["code"] == "cross_origin"
        # The same origin (the dashboard's page) passes the checks: its bad body is a 400.
        status, body = raw(url, request(url, "POST", "/v1/chat/completions",
                                        headers={"Origin": url}, body=b"{}"))
        assert status == 400 and body["error"]["code"] == "bad_request"
        # A body of exactly the configured limit is read (and judged: not a chat) ...
        padded = b"{}" + b" " * (LIMITS.max_body_bytes - 2)
        status, body = raw(url, request(url, "POST", "/v1/chat/completions", body=padded))
        assert status == 400 and body["error"]["code"] == "bad_request"
        # ... one byte more is refused from its Content-Length, before it is sent.
        head = request(url, "POST", "/v1/chat/completions").replace(
            b"Content-Length: 0", f"Content-Length: {LIMITS.max_body_bytes + 1}".encode())
        status, body = raw(url, head)
        assert status == 413 and body["error"]["code"] == "too_large"
        assert str(LIMITS.max_body_bytes) in body["error"]["message"]
        # A request that does not arrive within the configured time is answered 408.
        slow.settimeout(LIMITS.request_timeout_s + 20)
        answer = slow.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        waited = time.monotonic() - started
        assert waited >= LIMITS.request_timeout_s - 0.2
        assert waited < HttpLimits().request_timeout_s  # the configured time, not 10 s
    finally:
        slow.close()


def test_connections_beyond_the_limit_get_503(loopback_node: str) -> None:
    port = int(loopback_node.rsplit(":", 1)[1])
    held = [socket.create_connection(("127.0.0.1", port))
            for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(0.5)  # let the node accept them all
        status, body = raw(loopback_node, request(loopback_node))
        assert status == 503 and body["error"]["code"] == "overloaded"
        assert f"over {LIMITS.max_connections} open" in body["error"]["message"]
    finally:
        for conn in held:
            conn.close()
    deadline = time.monotonic() + 10
    while raw(loopback_node, request(loopback_node))[0] != 200:  # slots come back
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--http-max-connections", "0", "--http-max-connections must be a whole number from 1"),
    ("--http-max-body-kb", "999999999", "--http-max-body-kb must be a whole number from 1 "
     "to 262144"),
    ("--http-request-timeout", "nan", "--http-request-timeout must be a number from 0.1"),
    ("--http-request-timeout", "inf", "--http-request-timeout must be a number from 0.1"),
    ("--http-request-timeout", "0", "--http-request-timeout must be a number from 0.1"),
])
def test_out_of_range_http_limits_stop_the_node_with_a_clear_error(
        flag: str, value: str, message: str, tmp_path: Path) -> None:
    """Checked before anything starts: no socket, no port."""
    result = subprocess.run([sys.executable, "-m", "epara.node.cli", "node", "--standalone",
                             "--http-port", "0", "--socket", str(tmp_path / "node.sock"),
                             "--store", str(tmp_path / "store"), flag, value],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "node.sock").exists()


def lan_address() -> str | None:
    """A non-loopback address of this machine to listen on (only ever bound, not dialled
    from outside: the test connects to it from this machine)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # no packet is sent for a UDP connect
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


def test_off_loopback_a_token_is_required_and_checked(store: Path, tmp_path: Path) -> None:
    address = lan_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    sock = tmp_path / "b" / "node.sock"
    refused = subprocess.run(
        [sys.executable, "-m", "epara.node.cli", "node", "--standalone", "--store", str(store),
         "--socket", str(sock), "--http-port", "0", "--http-host", address],
        capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--http-token-file" in refused.stderr
    token_file = tmp_path / "http.token"
    with running_node(store, sock, "--standalone", "--http-port", "0", "--http-host",
                      address, "--http-token-file", str(token_file)):
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        with Client(sock) as client:
            url = client.status()["http"]
        assert url.startswith(f"http://{address}:")
        status, body = raw(url, request(url))
        assert status == 401 and body["error"]["code"] == "unauthorized"
        assert raw(url, request(url, headers={"Authorization": "Bearer wrong"}))[0] == 401
        assert raw(url, request(url, headers={"Authorization": f"Bearer {token}"}))[0] == 200
        assert raw(url, request(url, path="/"))[0] == 200  # the dashboard's static page
        assert raw(url, request(url, path="/api/status"))[0] == 401  # its data is not
        # A name a rebinding attacker controls is refused even with the token.
        assert raw(url, request(url, headers={"Authorization": f"Bearer {token}",
                                              "Host": "evil.example"}))[0] == 421
