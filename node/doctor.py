"""``epara doctor``: why a node is not discovered, or cannot join.

Each check returns a finding (ok / warn / fail, what was seen, what to do). The checks
look at what breaks discovery in practice: credentials (missing, readable by others),
interfaces without multicast or without a multicast route, firewall rules that drop
mDNS (UDP 5353), nodes on the LAN that advertise another cluster or protocol version,
and adverts of nodes that the local node has not admitted as members.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from epara.peer.discovery import SERVICE_TYPE
from epara.peer.security import (
    AUTHORITY_KEY_FILE,
    CredentialsError,
    load_cluster_credentials,
)
from epara.peer.wire import PROTOCOL_VERSION


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # "ok" | "warn" | "fail"
    detail: str
    advice: str = ""


def check_credentials(directory: Path) -> tuple[Finding, str | None]:
    try:
        credentials = load_cluster_credentials(directory)
    except CredentialsError as exc:
        return Finding("credentials", "fail", str(exc),
                       "copy the cluster directory from a member (mode 0600 key in a 0700 "
                       "directory), or `epara cluster init` for a new cluster"), None
    if (Path(directory) / AUTHORITY_KEY_FILE).exists():
        return Finding("credentials", "warn", f"{directory} holds the cluster's authority "
                       "key", "keep the authority off devices: run nodes from a directory "
                       "made by `epara cluster admit`"), credentials.cluster_id
    cert, trust = credentials.certificate, credentials.trust
    if cert is None or trust is None:
        return Finding("credentials", "ok", f"cluster {credentials.cluster_id} ({directory}; "
                       "shared key: any holder can claim any node id)"), credentials.cluster_id
    if trust.revoked(credentials.node_public or b"", cert.node_id):
        return Finding("credentials", "fail", f"this device ({cert.node_id}) is revoked "
                       f"(revocation list v{trust.revocations.version})",
                       "its peers refuse it; admit it again under a new id"), \
            credentials.cluster_id
    return Finding("credentials", "ok", f"cluster {credentials.cluster_id}, device "
                   f"{cert.node_id} certified by the authority, revocation list "
                   f"v{trust.revocations.version} ({directory})"), credentials.cluster_id


def _ip_json(*args: str) -> list[dict[str, Any]]:
    if shutil.which("ip") is None:
        return []
    result = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=10)
    try:
        return json.loads(result.stdout or "[]")
    except json.JSONDecodeError:
        return []


def check_interfaces() -> list[Finding]:
    findings = []
    usable = []
    for link in _ip_json("addr", "show"):
        name = link.get("ifname", "?")
        flags = set(link.get("flags", []))
        ipv4 = [a["local"] for a in link.get("addr_info", []) if a.get("family") == "inet"]
        if name == "lo" or not ipv4:
            continue
        if "UP" not in flags:
            findings.append(Finding(f"interface {name}", "warn", f"{name} is down",
                                    f"ip link set {name} up"))
        elif "MULTICAST" not in flags:
            findings.append(Finding(f"interface {name}", "warn",
                                    f"{name} ({', '.join(ipv4)}) has no MULTICAST flag: mDNS "
                                    "cannot use it", f"ip link set {name} multicast on, or "
                                    "name peers with --peer HOST:PORT"))
        else:
            usable.append(f"{name} ({', '.join(ipv4)})")
    if usable:
        findings.append(Finding("interfaces", "ok", "multicast-capable: " + ", ".join(usable)))
    else:
        findings.append(Finding("interfaces", "fail", "no interface can carry mDNS",
                                "connect to the LAN, or run nodes with --peer HOST:PORT"))
    routes = _ip_json("route", "get", "224.0.0.251")
    if routes:
        findings.append(Finding("multicast route", "ok",
                                f"224.0.0.251 leaves by {routes[0].get('dev', '?')}"))
    else:
        findings.append(Finding("multicast route", "warn", "no route to 224.0.0.251",
                                "add a default route or `ip route add 224.0.0.0/4 dev IF`"))
    return findings


def check_firewall() -> Finding:
    rules = ""
    for command in (["nft", "list", "ruleset"], ["iptables", "-S"]):
        if shutil.which(command[0]) is None:
            continue
        result = subprocess.run(command, capture_output=True, text=True, timeout=10)
        rules += result.stdout
    suspicious = [line.strip() for line in rules.splitlines()
                  if ("5353" in line and ("drop" in line.lower() or "reject" in line.lower()))
                  or ("policy drop" in line and "input" in line)]
    if suspicious:
        return Finding("firewall", "warn", "rules that may drop mDNS: "
                       + "; ".join(suspicious[:3]),
                       "allow UDP 5353 from the LAN, and the nodes' TCP control/data ports")
    return Finding("firewall", "ok", "no rule dropping UDP 5353 found" if rules
                   else "no nftables/iptables rules readable")


async def browse(interfaces: list[str] | None, seconds: float) -> list[dict[str, Any]]:
    """Every ``_epara._tcp`` advert seen in ``seconds`` (any cluster, any version)."""
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    zc = AsyncZeroconf(interfaces=interfaces or None, ip_version=IPVersion.V4Only)
    names: set[str] = set()

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        names.add(name)

    browser = AsyncServiceBrowser(zc.zeroconf, SERVICE_TYPE, handlers=[on_change])
    await asyncio.sleep(seconds)
    adverts = []
    for name in sorted(names):
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if await info.async_request(zc.zeroconf, 1500):
            props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
            adverts.append({"name": name, "node_id": props.get("id"),
                            "cluster_id": props.get("cid"), "protocol": props.get("pv"),
                            "hosts": info.parsed_addresses(), "port": info.port})
    await browser.async_cancel()
    await zc.async_close()
    return adverts


def check_adverts(adverts: list[dict[str, Any]], cluster_id: str | None,
                  members: set[str] | None) -> list[Finding]:
    findings = []
    ours = [a for a in adverts if a["cluster_id"] == cluster_id]
    for advert in adverts:
        where = f"{advert['node_id']} at {', '.join(advert['hosts'])}"
        if advert["cluster_id"] != cluster_id:
            findings.append(Finding(f"advert {advert['node_id']}", "warn",
                                    f"{where} belongs to cluster {advert['cluster_id']}",
                                    "ignored by design; give it this cluster's credentials "
                                    "if it should join"))
        elif advert["protocol"] != str(PROTOCOL_VERSION):
            findings.append(Finding(f"advert {advert['node_id']}", "fail",
                                    f"{where} speaks protocol {advert['protocol']}, this epara "
                                    f"speaks {PROTOCOL_VERSION}",
                                    "upgrade the older node (epara firmware upgrade)"))
        elif members is not None and advert["node_id"] not in members:
            findings.append(Finding(f"advert {advert['node_id']}", "warn",
                                    f"{where} advertises this cluster but is not a member "
                                    "here", "check its clock/credentials and that TCP "
                                    f"port {advert['port']} is reachable from this host"))
    summary = (f"{len(adverts)} adverts seen, {len(ours)} of this cluster"
               if adverts else "no epara adverts seen on the chosen interfaces")
    findings.insert(0, Finding("mdns", "ok" if ours else "warn", summary,
                               "" if ours else "is any other node running on this LAN?"))
    return findings


def check_local_node(socket_path: Path | None) -> tuple[Finding, set[str] | None]:
    from epara.node.client import Client, EparaError

    try:
        with Client(socket_path, timeout=5) as client:
            status = client.status()
    except EparaError as exc:
        return Finding("local node", "warn", str(exc), "start it with `epara node`"), None
    cluster = status.get("cluster")
    if not cluster:
        return Finding("local node", "warn", f"{status['node_id']} runs without a cluster",
                       "give it credentials (--cluster DIR) and restart it"), None
    members = {m["node_id"] for m in cluster["members"]}
    return Finding("local node", "ok", f"{status['node_id']} sees {len(members)} members, "
                   f"leader {cluster['leader']}, term {cluster['term']}"), members


def diagnose(credentials_dir: Path, interfaces: list[str] | None, socket_path: Path | None,
             seconds: float = 3.0) -> list[Finding]:
    started = time.monotonic()
    credentials, cluster_id = check_credentials(credentials_dir)
    findings = [credentials, *check_interfaces(), check_firewall()]
    node, members = check_local_node(socket_path)
    findings.append(node)
    adverts = asyncio.run(browse(interfaces, seconds))
    findings += check_adverts(adverts, cluster_id, members)
    findings.append(Finding("doctor", "ok", f"done in {time.monotonic() - started:.1f} s"))
    return findings


def render(findings: list[Finding], as_json: bool) -> str:
    if as_json:
        return json.dumps([asdict(f) for f in findings], indent=2)
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    lines = []
    for f in findings:
        lines.append(f"[{marks[f.status]}] {f.check}: {f.detail}")
        if f.advice and f.status != "ok":
            lines.append(f"       -> {f.advice}")
    return "\n".join(lines)
