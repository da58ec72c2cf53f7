"""mDNS/DNS-SD adverts (``_epara._tcp.local.``) and browsing for peers.

The advert is a standard DNS-SD service: any mDNS browser lists the nodes. Its TXT
record stays small (under 400 bytes) and public: node id, cluster id (a fingerprint
of the cluster public key, see security.py), protocol version, control port, a few
headline capabilities and, with per-device identity, the node's certificate (its CURVE
server key ``ck``, issue time ``ci`` and the authority's signature ``cs``, which with
``id`` and ``cid`` make the certificate; dialers pin the key after checking it).
Everything else (the full capability record, live state) is fetched over the
CURVE-protected control port, so only cluster members can read it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ifaddr
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .security import Certificate
from .wire import PROTOCOL_VERSION

log = logging.getLogger(__name__)

SERVICE_TYPE = "_epara._tcp.local."
MAX_TXT_BYTES = 400
_RESOLVE_TIMEOUT_MS = 3000


@dataclass(frozen=True)
class PeerAdvert:
    """A parsed advert of a node of this cluster and protocol version."""

    service_name: str
    node_id: str
    hosts: tuple[str, ...]
    port: int
    headline: Mapping[str, str]
    certificate: str | None = None  # per-device identity: the node's certificate (encoded)


def local_ipv4_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this host (network namespace)."""
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                found.append(ip.ip)
    return found


def txt_properties(node_id: str, cluster_id: str, port: int,
                   headline: Mapping[str, Any],
                   certificate: Certificate | None = None) -> dict[str, str]:
    props = {"id": node_id, "cid": cluster_id, "pv": str(PROTOCOL_VERSION), "cp": str(port)}
    props.update({str(k): str(v) for k, v in headline.items()})
    if certificate is not None:  # its other fields are the advert's id and cid
        props.update({"ck": certificate.curve_public.decode("ascii"),
                      "ci": str(certificate.issued),
                      "cs": base64.urlsafe_b64encode(certificate.signature).decode("ascii")})
    size = sum(len(k) + len(v) + 2 for k, v in props.items())  # length byte + "="
    if size > MAX_TXT_BYTES:
        raise ValueError(f"TXT record of {size} bytes exceeds {MAX_TXT_BYTES}")
    return props


def parse_advert(service_name: str, properties: Mapping[bytes, bytes | None],
                 hosts: Sequence[str], port: int, cluster_id: str) -> PeerAdvert | None:
    """A PeerAdvert for a node we may talk to, or None (logged at debug, with why)."""
    props = {k.decode("utf-8", "replace"): (v or b"").decode("utf-8", "replace")
             for k, v in properties.items()}
    if props.get("cid") != cluster_id:
        log.debug("ignoring %s: other cluster %s", service_name, props.get("cid"))
        return None
    if props.get("pv") != str(PROTOCOL_VERSION):
        log.debug("ignoring %s: protocol version %s, we speak %s", service_name,
                  props.get("pv"), PROTOCOL_VERSION)
        return None
    if not props.get("id") or not hosts or not port:
        log.debug("ignoring %s: incomplete advert", service_name)
        return None
    headline = {k: v for k, v in props.items()
                if k not in ("id", "cid", "pv", "cp", "ck", "ci", "cs")}
    return PeerAdvert(service_name, props["id"], tuple(hosts), port, headline,
                      _certificate(props))


def _certificate(props: Mapping[str, str]) -> str | None:
    """The encoded certificate an advert carries (unchecked: the dialer verifies it)."""
    try:
        cert = Certificate(props["cid"], props["id"], props["ck"].encode("ascii"),
                           int(props["ci"]), base64.urlsafe_b64decode(props["cs"]))
    except (KeyError, ValueError, UnicodeEncodeError):
        return None
    if len(cert.curve_public) != 40 or len(cert.signature) != 64:
        return None
    return cert.encode()


class Discovery:
    """Registers this node's advert and reports peers of the same cluster.

    ``interfaces``: IP addresses to use (``["127.0.0.1"]`` for loopback tests), or None
    for all interfaces (on a real LAN, or inside a network namespace).
    """

    def __init__(self, *, node_id: str, cluster_id: str, port: int,
                 advertise_hosts: Sequence[str], headline: Mapping[str, Any],
                 interfaces: Sequence[str] | None,
                 on_peer: Callable[[PeerAdvert], None],
                 on_gone: Callable[[str], None],
                 certificate: Certificate | None = None) -> None:
        self._node_id = node_id
        self._cluster_id = cluster_id
        self._port = port
        self._hosts = list(advertise_hosts)
        self._props = txt_properties(node_id, cluster_id, port, headline, certificate)
        self._interfaces = list(interfaces) if interfaces is not None else None
        self._on_peer = on_peer
        self._on_gone = on_gone
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def service_name(self) -> str:
        return f"{self._node_id}.{SERVICE_TYPE}"

    async def start(self) -> None:
        interfaces: Any = self._interfaces if self._interfaces is not None else InterfaceChoice.All
        self._azc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        self._info = AsyncServiceInfo(
            SERVICE_TYPE, self.service_name, port=self._port, properties=self._props,
            server=f"epara-{self._node_id}.local.", parsed_addresses=self._hosts)
        self._browser = AsyncServiceBrowser(self._azc.zeroconf, SERVICE_TYPE,
                                            handlers=[self._on_change])
        # The name embeds the node id, unique in a cluster: skip the ~1.3 s of conflict
        # probing (a restarted node re-registers its own name while peers still cache it).
        await self._azc.async_register_service(self._info, cooperating_responders=True)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._azc is not None:
            if self._info is not None:
                await self._azc.async_unregister_service(self._info)
            await self._azc.async_close()
        self._azc = self._browser = self._info = None

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        if name == self.service_name:
            return
        if state_change is ServiceStateChange.Removed:
            self._on_gone(name)
            return
        task = asyncio.ensure_future(self._resolve(zeroconf, service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zeroconf, _RESOLVE_TIMEOUT_MS):
            log.debug("no answer resolving %s", name)
            return
        advert = parse_advert(name, info.properties or {}, info.parsed_addresses(),
                              info.port or 0, self._cluster_id)
        if advert is not None:
            self._on_peer(advert)
