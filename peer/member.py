"""ClusterMember: discovery + membership + election + commands, on one asyncio loop.

Wire (all over CurveZMQ, see security.py): every node binds one control ROUTER and keeps
one DEALER per known peer endpoint. Through the DEALERs it sends, every
``heartbeat_interval`` seconds (stretched in large clusters so that at most
``max_heartbeats_per_s`` leave a node), a heartbeat (membership.Heartbeat: election
claim plus the version and digest of its state record) and, when leading, commands.
The state record (``state_provider``'s map plus the capability headline and known
peer endpoints) moves only when it changes (statesync.py): as a delta inside the
heartbeat that announces the new version, or on request (``sget``, answered with an
``st`` message over the answering node's own link). Requests that need a reply
(``status``, ``caps``) use a short-lived DEALER (``request``).

Peers are found by mDNS adverts, static seeds (``host:port`` of a control port), the
sender address inside every heartbeat received (so a seed learns who seeded it), and the
endpoints of alive members listed in each state record (so seeds are transitive).

With per-device identity every link pins its peer's own server key, taken from a
checked certificate: the advert's, the one on the connection a heartbeat arrived on,
the one listed with an endpoint in a member's ``_peers``, or (static seeds) the one a
seed answers over UDP on its control port number (``fetch_certificate``). An endpoint
whose key is not known yet is not dialled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import os
import signal
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from . import capabilities as caps_mod
from . import election, membership, statesync, wire
from .discovery import Discovery, PeerAdvert, local_ipv4_addresses
from .membership import ClusterView, Heartbeat, Member
from .security import (
    CERT_ANSWER,
    CERT_METADATA,
    CERT_QUERY,
    CERT_QUERY_SIZE,
    ClusterCredentials,
    CredentialsError,
    load_cluster_credentials,
)
from .transport import Transport, control_message, sender_of, try_send

log = logging.getLogger(__name__)

CommandHandler = Callable[[dict[str, Any], str, int], Awaitable[None] | None]
ViewCallback = Callable[[ClusterView], None]

_LEARNED_LINK_TTL = 5.0  # seconds a gossiped/learned endpoint lives without a refresh
_CAPS_RETRY = 2.0
_RECENT_COMMANDS = 256
_STATE_RETRY = 1.0  # seconds before asking a member for its record again
_MAX_PEERS_GOSSIPED = 256
_MAX_DRAIN = 256  # queued messages folded at the start of a tick, at most
_SEED_QUERY_EVERY = 1.0  # seconds between certificate queries to a seed not yet linked


class NotLeader(RuntimeError):
    """broadcast_command on a node that does not hold the leader term."""


@dataclass(frozen=True)
class MemberConfig:
    node_id: str | None = None  # default: hostname plus a random suffix
    interfaces: tuple[str, ...] | None = None  # IPs for mDNS and binding; None: all
    control_port: int = 0  # 0: any free port (advertised over mDNS)
    advertise_host: str | None = None  # address peers dial; default: first interface
    seeds: tuple[str, ...] = ()  # "host:port" control endpoints, for LANs without multicast
    mdns: bool = True
    never_lead: bool = False
    # The probe's class from the hardware, unless set (a board the probe misreads, a
    # container standing in for a smaller device): server, embedded or microcomputer.
    device_class: str | None = None
    priority: int | None = None  # override the capability-derived leadership priority
    heartbeat_interval: float = 0.2
    # Heartbeats a node sends per second at most (to all peers together): beyond
    # max_heartbeats_per_s * heartbeat_interval peers the interval grows, and so do
    # the silence bounds below (they count heartbeats, see membership.expire). Each
    # heartbeat costs ~340 wire bytes with its TCP/IP, CURVE framing and the
    # receiver's ACK; 48 a second keep a node of a 32-host cluster under 20 KB/s
    # (bench/control_plane.py) and remove a silent member after ~4.8 s there.
    max_heartbeats_per_s: float = 48.0
    suspect_after: float = 0.75
    remove_after: float = 1.5
    timing: election.Timing = field(default_factory=election.Timing)
    capabilities: caps_mod.Capabilities | None = None  # skip probing (tests, simulators)
    cache_dir: Path | None = None  # where measured capabilities are cached per boot
    status_file: Path | None = None  # JSON view written on change (tests, debugging)


@dataclass
class _Link:
    sock: zmq.asyncio.Socket
    sources: set[str]  # "seed", "mdns:<service>", "learned"
    refreshed: float
    server_key: bytes | None = None  # pinned (per-device identity); None: the cluster key


def parse_endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"endpoint {text!r} is not host:port")
    return host.strip("[]"), int(port)


class ClusterMember:
    """One node's membership in the cluster. Use from a single asyncio loop."""

    def __init__(self, config: MemberConfig, credentials_dir: Path,
                 state_provider: Callable[[], dict[str, Any]]) -> None:
        self.config = config
        self._credentials_dir = Path(credentials_dir)
        self._state_provider = state_provider
        self.node_id = config.node_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        # Wall-clock microseconds: larger on every restart (unless the clock steps back).
        self.incarnation = time.time_ns() // 1000
        self._seq = 0
        self._published = statesync.Published()
        self._state_pending: dict[str, float] = {}  # node id -> when I last asked
        self.interval = config.heartbeat_interval
        self.control_bytes_sent = 0  # payload bytes handed to ZeroMQ (benchmarks)
        self._members: dict[str, Member] = {}
        self._election = election.ElectionState()
        self._links: dict[tuple[str, int], _Link] = {}
        self._shunned: set[tuple[str, int]] = set()  # endpoints of revoked members
        self._handlers: dict[str, CommandHandler] = {}
        self._subscribers: list[ViewCallback] = []
        self._recent_commands: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        self._caps_pending: dict[tuple[str, int], float] = {}
        self._remeasuring = False  # a speed re-measurement runs in a thread
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_summary: tuple[Any, ...] | None = None
        self._view = membership.make_view(self.node_id, (), None, 0)
        self._credentials: ClusterCredentials | None = None
        self._transport: Transport | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._cert_servers: list[asyncio.DatagramTransport] = []
        self._certs: dict[str, str] = {}  # member id -> its checked certificate (gossiped)
        self._discovery: Discovery | None = None
        self.capabilities: caps_mod.Capabilities | None = config.capabilities
        self.priority = 0
        self.host = ""
        self.port = 0
        self.commands_received: list[dict[str, Any]] = []  # last few, for status/tests

    # --- public API ---

    async def start(self) -> None:
        self._credentials = load_cluster_credentials(self._credentials_dir)
        cert = self._credentials.certificate
        if cert is not None:  # per-device identity: my node id is my certificate's
            if self.config.node_id not in (None, cert.node_id):
                raise CredentialsError(f"node id {self.config.node_id!r} is not the one "
                                       f"this device's certificate names ({cert.node_id!r})")
            self.node_id = cert.node_id
            self._view = membership.make_view(self.node_id, (), None, 0)
        if self.capabilities is None:
            self.capabilities = await asyncio.to_thread(caps_mod.probe, self.config.cache_dir)
        self.capabilities = self._overridden(self.capabilities)
        caps = self.capabilities
        self.priority = (self.config.priority if self.config.priority is not None else
                         election.leadership_priority(caps.headline(), caps.power_source,
                                                      caps.battery_percent))
        # Our own heartbeats detect dead peers, and they keep every link busy, so a cut
        # TCP connection is noticed by the kernel (unacknowledged heartbeats): no libzmq
        # pings, which at 32 nodes were a third of the control plane's packets.
        self._transport = Transport(self._credentials, ping_interval_s=None)
        self._transport.start()
        interfaces = self.config.interfaces
        bind_hosts = list(interfaces) if interfaces else ["0.0.0.0"]
        self._router, self.port = self._transport.bind_router(
            bind_hosts[0], self.config.control_port, control=True)
        for extra in bind_hosts[1:]:
            self._router.bind(f"tcp://{extra}:{self.port}")
        hosts = ([self.config.advertise_host] if self.config.advertise_host else
                 list(interfaces) if interfaces else local_ipv4_addresses() or ["127.0.0.1"])
        self.host = hosts[0]
        now = time.monotonic()
        self._election = election.ElectionState(started_at=now)
        seeds = [parse_endpoint(seed) for seed in self.config.seeds]
        if self._credentials.per_device:
            # Answer certificate queries on the control port number (UDP), and learn
            # the seeds' certificates the same way before dialling them.
            assert cert is not None
            loop = asyncio.get_running_loop()
            answer = CERT_ANSWER + cert.encode().encode("ascii")
            for bind_host in bind_hosts:
                try:
                    server, _ = await loop.create_datagram_endpoint(
                        lambda: _CertificateServer(answer), local_addr=(bind_host, self.port))
                except OSError as exc:  # mDNS and gossip still find this node
                    log.warning("cannot answer certificate queries on udp %s:%d (%s): "
                                "static seeds naming this node will not reach it",
                                bind_host, self.port, exc)
                    continue
                self._cert_servers.append(server)
            if seeds:
                self._spawn(self._link_seeds(seeds))
        else:
            for host, port in seeds:
                self._ensure_link(host, port, source="seed", now=now)
        self._spawn(self._receive_loop())
        self._spawn(self._tick_loop())
        if self.config.mdns:
            self._discovery = Discovery(
                node_id=self.node_id, cluster_id=self._credentials.cluster_id, port=self.port,
                advertise_hosts=hosts, headline=caps.headline(), interfaces=interfaces,
                on_peer=self._on_advert, on_gone=self._on_advert_gone, certificate=cert)
            await self._discovery.start()
        log.info("node %s (incarnation %d) on %s:%d, cluster %s, priority %d", self.node_id,
                 self.incarnation, self.host, self.port, self._credentials.cluster_id,
                 self.priority)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._discovery is not None:
            await self._discovery.stop()
            self._discovery = None
        for link in self._links.values():
            link.sock.close(linger=0)
        self._links.clear()
        for server in self._cert_servers:
            server.close()
        self._cert_servers.clear()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def view(self) -> ClusterView:
        return self._view

    def subscribe(self, callback: ViewCallback) -> Callable[[], None]:
        """Call ``callback(view)`` on every join, leave or leader/term change."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def on_command(self, kind: str, handler: CommandHandler) -> None:
        """``handler(body, sender_id, term)``; may be a coroutine function."""
        self._handlers[kind] = handler

    async def broadcast_command(self, kind: str, body: dict[str, Any]) -> int:
        """Send a command, stamped with my term, to every peer and to myself.

        Raises NotLeader unless this node holds the leader term. Returns the number of
        peer connections it was handed to (delivery is best effort, like heartbeats:
        the leader re-sends desired state rather than relying on one message).
        """
        if self._election.leader != self.node_id:
            raise NotLeader(f"{self.node_id} is not the leader (leader: "
                            f"{self._election.leader})")
        self._seq += 1
        msg = {"kind": kind, "body": body, "term": self._election.term, "from": self.node_id,
               "inc": self.incarnation, "seq": self._seq}
        payload = control_message("cmd", **msg)
        sent = sum(self._send(link, payload) for link in self._links.values())
        self._deliver(msg)
        return sent

    # --- discovery and links ---

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task failed", exc_info=task.exception())

    def _send(self, link: _Link, payload: bytes) -> bool:
        sent = try_send(link.sock, payload)
        if sent:
            self.control_bytes_sent += len(payload)
        return sent

    def server_key(self, node_id: str) -> bytes | None:
        """The server key pinned for ``node_id`` (per-device identity; this node's own
        for itself), e.g. for the data plane to dial it; None if not known (or in the
        shared-key layout, where the cluster key is every node's)."""
        creds = self._credentials
        if creds is None or not creds.per_device:
            return None
        if node_id == self.node_id:
            return creds.node_public
        member = self._members.get(node_id)
        link = self._links.get((member.host, member.port)) if member is not None else None
        return link.server_key if link is not None else None

    def _ensure_link(self, host: str, port: int, *, source: str, now: float,
                     key: bytes | None = None) -> _Link | None:
        """The link to a control endpoint, dialled if new. With per-device identity
        ``key`` is the peer's certified server key: without one an endpoint not yet
        linked is not dialled, and a different one replaces the link (the address now
        belongs to another device)."""
        if (host, port) == (self.host, self.port) or (host, port) in self._shunned:
            return None
        assert self._transport is not None and self._credentials is not None
        trust = self._credentials.trust
        link = self._links.get((host, port))
        if trust is not None:
            if key is not None and trust.revoked(key, trust.member_keys.get(key)):
                return None
            if link is not None and key is not None and key != link.server_key:
                log.info("%s:%d now presents another certified key; redialling", host, port)
                link.sock.close(linger=0)
                del self._links[(host, port)]
                link = None
            if link is None and key is None:
                return None
        if link is None:
            link = _Link(self._transport.connect_dealer(host, port, key), set(), now, key)
            self._links[(host, port)] = link
            log.debug("connecting to %s:%d (%s)", host, port, source)
        link.sources.add(source)
        link.refreshed = now
        return link

    def _on_advert(self, advert: PeerAdvert) -> None:
        key = None
        trust = self._credentials.trust if self._credentials else None
        if trust is not None:
            key = trust.certificate_key(advert.certificate, advert.node_id)
            if key is None:
                log.debug("ignoring advert %s: no valid certificate for %s",
                          advert.service_name, advert.node_id)
                return
        self._ensure_link(advert.hosts[0], advert.port, source=f"mdns:{advert.service_name}",
                          now=time.monotonic(), key=key)

    async def _link_seeds(self, seeds: list[tuple[str, int]]) -> None:
        """Per-device identity: learn each seed's certificate over UDP, then dial it
        pinned to that certificate's key; keep asking the seeds not linked yet."""
        assert self._credentials is not None and self._credentials.trust is not None
        trust = self._credentials.trust
        while True:
            for host, port in seeds:
                if (host, port) in self._links or (host, port) == (self.host, self.port):
                    continue
                try:
                    cert = await fetch_certificate(host, port, timeout=_SEED_QUERY_EVERY)
                except (OSError, asyncio.TimeoutError):
                    continue
                key = trust.certificate_key(cert)
                if key is None:
                    log.debug("seed %s:%d answered without a valid certificate", host, port)
                    continue
                self._ensure_link(host, port, source="seed", now=time.monotonic(), key=key)
            await asyncio.sleep(_SEED_QUERY_EVERY)

    def _on_advert_gone(self, service_name: str) -> None:
        for link in self._links.values():
            link.sources.discard(f"mdns:{service_name}")

    def _prune_links(self, now: float) -> None:
        alive = {(m.host, m.port) for m in self._members.values()}
        for key, link in list(self._links.items()):
            if "learned" in link.sources and now - link.refreshed > _LEARNED_LINK_TTL:
                link.sources.discard("learned")
            if not link.sources and key not in alive:
                link.sock.close(linger=0)
                del self._links[key]
                log.debug("dropped link %s:%d", *key)

    # --- receiving ---

    async def _receive_loop(self) -> None:
        assert self._router is not None
        while True:
            batch = [await self._router.recv_multipart(copy=False)]
            # Drain what else is queued without a trip through the event loop each.
            while len(batch) < 64 and (frames := _recv_now(self._router)) is not None:
                batch.append(frames)
            for frames in batch:
                await self._on_frames(frames)

    async def _on_frames(self, frames: list[zmq.Frame]) -> None:
        assert self._router is not None and self._credentials is not None
        if len(frames) != 2:
            return
        # Per-device layout: the node id the connection's certificate proves ("" in the
        # shared-key layout); None: no valid certificate, the message is dropped.
        sender = sender_of(self._credentials, frames[1])
        if sender is None:
            log.debug("dropping a message from a connection without a valid certificate")
            return
        ident, payload = frames[0].bytes, frames[1].bytes
        # Per-device: the connection's certified key (what to pin when dialling the
        # sender back) and its certificate (what to gossip with its endpoint).
        sender_key = frames[1].get("User-Id").encode() if sender else None
        try:
            msg = wire.decode(payload)
        except wire.WireError as exc:
            log.debug("undecodable control message: %s", exc)
            return
        if msg.get("v") != wire.PROTOCOL_VERSION:
            log.debug("ignoring message of protocol version %s", msg.get("v"))
            return
        kind = msg.get("type")
        if sender and kind in ("hb", "st", "cmd") and \
                msg.get("from" if kind == "cmd" else "id") != sender:
            log.warning("dropping %s claiming to be %r from a connection certified as %r",
                        kind, msg.get("from" if kind == "cmd" else "id"), sender)
            return
        if kind == "hb":
            self._on_heartbeat(msg, sender_key)
            if sender and sender in self._members:
                self._certs[sender] = frames[1].get(CERT_METADATA)
        elif kind == "st":
            self._on_state(msg)
        elif kind == "sget":
            self._on_state_request(msg)
        elif kind == "cmd":
            self._on_command_message(msg)
        elif kind == "status":
            await self._router.send_multipart([ident, control_message(
                "status", view=self._status_dict())])
        elif kind == "caps":
            assert self.capabilities is not None
            await self._router.send_multipart([ident, control_message(
                "caps", node=self.node_id, inc=self.incarnation,
                caps=self.capabilities.to_dict())])

    def _on_heartbeat(self, msg: Mapping[str, Any], sender_key: bytes | None) -> None:
        try:
            hb = Heartbeat.from_wire(msg)
        except ValueError as exc:
            log.debug("%s", exc)
            return
        if hb.node_id == self.node_id:
            return  # a seed list that names this node itself
        now = time.monotonic()
        old = self._members.get(hb.node_id)
        self._members, news = membership.apply_heartbeat(self._members, hb, now)
        if not news:
            return
        self._ensure_link(hb.host, hb.port, source="learned", now=now, key=sender_key)
        update = msg.get("su")
        if isinstance(update, Mapping) and not self._members[hb.node_id].state_current:
            self._fold_state(hb.node_id, hb.incarnation, update, now)
        # Fold a new member or a changed claim at once: a leader's commands follow its
        # heartbeat on the same connection and must find it already accepted as leader.
        # Anything else waits for the next tick (re-electing on every heartbeat costs
        # O(members) each time, O(members^2) a tick).
        if old is None or old.status != membership.ALIVE or \
                (old.incarnation, old.term, old.leader, old.priority, old.eligible) != \
                (hb.incarnation, hb.term, hb.leader, hb.priority, hb.eligible):
            self._update(now)

    def _on_state(self, msg: Mapping[str, Any]) -> None:
        node_id, incarnation, update = msg.get("id"), msg.get("inc"), msg.get("su")
        if isinstance(node_id, str) and isinstance(incarnation, int) and \
                isinstance(update, Mapping):
            self._fold_state(node_id, incarnation, update, time.monotonic())

    def _fold_state(self, node_id: str, incarnation: int, update: Mapping[str, Any],
                    now: float) -> None:
        self._members, applied = membership.with_state(self._members, node_id, incarnation,
                                                       update)
        if not applied:
            return
        self._state_pending.pop(node_id, None)
        changed = update.get("full") or update.get("set")
        if not isinstance(changed, Mapping):
            return
        trust = self._credentials.trust if self._credentials else None
        if trust is not None and isinstance(changed.get("_rev"), bytes) and \
                trust.offer(changed["_rev"]):
            log.warning("%s: adopted revocation list v%d from %s", self.node_id,
                        trust.revocations.version, node_id)
            self._drop_revoked()
        if "_peers" not in changed:
            return  # the endpoints it knows are the same as before
        peers = self._members[node_id].synced
        for entry in ((peers.record.get("_peers") if peers else None) or ())[
                :_MAX_PEERS_GOSSIPED]:
            # [host, port], and with per-device identity the endpoint's certificate
            if isinstance(entry, list) and len(entry) in (2, 3):
                host, port = entry[:2]
                key = trust.certificate_key(entry[2]) if trust is not None and \
                    len(entry) == 3 else None
                if isinstance(host, str) and isinstance(port, int) and 0 < port < 65536:
                    self._ensure_link(host, port, source="learned", now=now, key=key)

    def _drop_revoked(self) -> None:
        """Forget members a newly adopted revocation list names, and stop talking to
        their endpoints (their messages are already refused: see ``sender_of``)."""
        assert self._credentials is not None and self._credentials.trust is not None
        trust = self._credentials.trust
        revoked = trust.revocations.node_ids
        for node_id in [n for n in self._members if n in revoked]:
            member = self._members.pop(node_id)
            self._certs.pop(node_id, None)
            self._shunned.add((member.host, member.port))
            link = self._links.pop((member.host, member.port), None)
            if link is not None:
                link.sock.close(linger=0)
            log.warning("%s: %s is revoked; removed", self.node_id, node_id)
        for endpoint, link in list(self._links.items()):  # pinned to a now revoked key
            if link.server_key is not None and trust.revoked(link.server_key):
                link.sock.close(linger=0)
                del self._links[endpoint]
        self._update(time.monotonic())

    def _on_state_request(self, msg: Mapping[str, Any]) -> None:
        """Answer ``sget`` over my own link to the asker's control endpoint."""
        host, port, have = msg.get("host"), msg.get("port"), msg.get("have")
        if not (isinstance(host, str) and isinstance(port, int) and 0 < port < 65536):
            return
        if have is not None and (isinstance(have, bool) or not isinstance(have, int)):
            have = None
        link = self._links.get((host, port))
        if link is None:
            return  # its heartbeats will create the link; it asks again
        self._send(link, control_message("st", id=self.node_id, inc=self.incarnation,
                                         su=statesync.answer(self._published, have)))

    def _request_states(self, now: float) -> None:
        """Ask each member whose announced record I do not hold for it (throttled)."""
        for node_id in membership.stale(self._members):
            if now - self._state_pending.get(node_id, -_STATE_RETRY) < _STATE_RETRY:
                continue
            member = self._members[node_id]
            link = self._links.get((member.host, member.port))
            if link is None:
                continue
            self._state_pending[node_id] = now
            have = member.synced.version if member.synced is not None else None
            self._send(link, control_message("sget", id=self.node_id, host=self.host,
                                             port=self.port, have=have))
        for node_id in [n for n in self._state_pending if n not in self._members]:
            del self._state_pending[node_id]

    def _on_command_message(self, msg: Mapping[str, Any]) -> None:
        try:
            key = (str(msg["from"]), int(msg["inc"]), int(msg["seq"]))
            term = int(msg["term"])
            str(msg["kind"])
        except (KeyError, TypeError, ValueError):
            log.debug("malformed command")
            return
        if key in self._recent_commands:
            return  # the same command over a second endpoint of the same peer
        self._recent_commands[key] = None
        while len(self._recent_commands) > _RECENT_COMMANDS:
            self._recent_commands.popitem(last=False)
        if not election.accept_command(self._election, key[0], term):
            log.debug("ignoring %s from %s, term %d: leader %s term %d", msg["kind"], key[0],
                      term, self._election.leader, self._election.term)
            return
        self._deliver(dict(msg))

    def _deliver(self, msg: dict[str, Any]) -> None:
        record = {"kind": msg["kind"], "from": msg["from"], "term": msg["term"],
                  "body": msg.get("body") or {}}
        self.commands_received = [*self.commands_received[-19:], record]
        handler = self._handlers.get(record["kind"])
        if handler is None:
            log.debug("no handler for command %s", record["kind"])
            return
        result = handler(record["body"], record["from"], record["term"])
        if inspect.isawaitable(result):
            self._spawn(result)

    # --- the periodic tick: heartbeat out, expire, elect, publish the view ---

    def _own_state(self) -> dict[str, Any]:
        try:
            state = dict(self._state_provider())
        except Exception:
            log.exception("state provider failed; publishing an empty state record")
            state = {}
        return state

    def _own_heartbeat(self) -> Heartbeat:
        return Heartbeat(
            node_id=self.node_id, incarnation=self.incarnation, seq=self._seq, host=self.host,
            port=self.port, term=self._election.term, leader=self._election.leader,
            priority=self.priority, eligible=not self.config.never_lead,
            state_version=self._published.version, state_digest=self._published.digest,
            interval=self.interval)

    def _publish(self) -> int:
        """Fold my current state into my published record; returns the previous version."""
        assert self.capabilities is not None
        record = self._own_state()
        record["_head"] = self.capabilities.headline()
        trust = self._credentials.trust if self._credentials else None
        if trust is not None and trust.revocations.version > 0:
            record["_rev"] = trust.revocations.encode()  # spreads the newest list
        if trust is None:
            record["_peers"] = [list(p) for p in sorted(
                {(m.host, m.port) for m in self._members.values()})]
        else:  # with the certificate a dialer pins
            record["_peers"] = [list(p) for p in sorted(
                {(m.host, m.port, self._certs[m.node_id]) for m in self._members.values()
                 if self._certs.get(m.node_id)})]
        before = self._published.version
        self._published = statesync.publish(self._published, record)
        return before

    async def _tick_loop(self) -> None:
        due = time.monotonic()
        while True:
            # Heartbeats that arrived while this process could not run (CPU starvation,
            # a long GC) are still queued: fold them before judging anyone silent.
            for _ in range(_MAX_DRAIN):
                if self._router is None or (frames := _recv_now(self._router)) is None:
                    break
                await self._on_frames(frames)
            now = time.monotonic()
            if now - due > 2 * self.interval:
                log.info("%s: tick %.2f s late (this process did not run)", self.node_id,
                         now - due)
            self._seq += 1
            self.interval = membership.heartbeat_interval(
                self.config.heartbeat_interval, len(self._links),
                self.config.max_heartbeats_per_s)
            trust = self._credentials.trust if self._credentials else None
            if trust is not None and trust.reload():  # an operator dropped a new list in
                log.warning("%s: adopted revocation list v%d from %s", self.node_id,
                            trust.revocations.version, self._credentials_dir)
                self._drop_revoked()
            before = self._publish()
            fields = self._own_heartbeat().to_wire()
            if self._published.version != before:
                # Push the change with the heartbeat that announces it.
                fields["su"] = statesync.answer(self._published, before)
            payload = control_message("hb", **fields)
            for link in self._links.values():
                self._send(link, payload)
            self._members, removed = membership.expire(
                self._members, now, self.config.suspect_after, self.config.remove_after,
                self.config.heartbeat_interval)
            for node_id in removed:
                log.info("%s: removed silent member %s", self.node_id, node_id)
                self._certs.pop(node_id, None)
            self._update(now)
            self._prune_links(now)
            self._request_states(now)
            self._fetch_capabilities(now)
            self._refresh_speed()
            due = time.monotonic() + self.interval
            await asyncio.sleep(self.interval)

    def _update(self, now: float) -> None:
        candidates = [election.Candidate(m.node_id, m.term, m.leader, m.priority, m.eligible)
                      for m in self._members.values()]
        candidates.append(election.Candidate(self.node_id, self._election.term,
                                             self._election.leader, self.priority,
                                             not self.config.never_lead))
        before = (self._election.leader, self._election.term)
        self._election = election.decide(self.node_id, self._election, candidates, now,
                                         self.config.timing)
        if (self._election.leader, self._election.term) != before:
            log.info("%s: leader %s term %d", self.node_id, self._election.leader,
                     self._election.term)
        record = dict(self._published.record)
        head = record.pop("_head", {})
        record.pop("_peers", None)
        record.pop("_rev", None)
        me = Member(node_id=self.node_id, host=self.host, port=self.port,
                    incarnation=self.incarnation, seq=self._seq, term=self._election.term,
                    leader=self._election.leader, priority=self.priority,
                    eligible=not self.config.never_lead, state=record,
                    headline=head, first_seen=self._election.started_at,
                    last_seen=now,
                    capabilities=self.capabilities.to_dict() if self.capabilities else None,
                    state_version=self._published.version,
                    state_digest=self._published.digest, interval=self.interval)
        self._view = membership.make_view(self.node_id, [*self._members.values(), me],
                                          self._election.leader, self._election.term)
        summary = self._view.summary()
        if summary != self._last_summary:
            self._last_summary = summary
            for callback in list(self._subscribers):
                try:
                    callback(self._view)
                except Exception:
                    log.exception("view subscriber failed")
            self.write_status()

    def _status_dict(self) -> dict[str, Any]:
        data = self._view.to_dict()
        data["commands"] = list(self.commands_received)
        data["pid"] = os.getpid()
        data["endpoint"] = f"{self.host}:{self.port}"
        data["control_tx_bytes"] = self.control_bytes_sent
        data["heartbeat_interval_s"] = self.interval
        return data

    def write_status(self) -> None:
        """Write the view to ``config.status_file`` (if set), atomically."""
        path = self.config.status_file
        if path is None:
            return
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self._status_dict(), default=str))
        os.replace(tmp, path)

    # --- capability records, fetched once per member incarnation (again when its
    # speed was re-measured since) ---

    def _overridden(self, caps: caps_mod.Capabilities) -> caps_mod.Capabilities:
        if self.config.device_class is not None:
            return replace(caps, device_class=self.config.device_class)
        return caps

    def _refresh_speed(self) -> None:
        """Measure again a speed that was taken under load, once the machine is quieter
        (``capabilities.speed_probe_due``); the state record carries the new headline."""
        if self.config.capabilities is not None or self._remeasuring or \
                self.capabilities is None:
            return  # given capabilities (tests, simulations) are never re-measured
        best = caps_mod.SpeedSample.from_json(self.capabilities.extra.get("speed"))
        if best is None or not caps_mod.speed_probe_due(best, caps_mod.load_per_core(),
                                                         time.time()):
            return
        self._remeasuring = True
        self._spawn(self._remeasure())

    async def _remeasure(self) -> None:
        try:
            caps = await asyncio.to_thread(caps_mod.probe, self.config.cache_dir)
            self.capabilities = self._overridden(caps)
        finally:
            self._remeasuring = False

    def _fetch_capabilities(self, now: float) -> None:
        for member in self._members.values():
            key = (member.node_id, member.incarnation)
            fresh = member.capabilities is not None and not caps_mod.record_outdated(
                member.capabilities, member.headline)
            if fresh or now - self._caps_pending.get(key, -_CAPS_RETRY) < _CAPS_RETRY:
                continue
            self._caps_pending[key] = now
            self._spawn(self._fetch_one(member))
        current = {(m.node_id, m.incarnation) for m in self._members.values()}
        for key in [k for k in self._caps_pending if k not in current]:
            del self._caps_pending[key]

    async def _fetch_one(self, member: Member) -> None:
        assert self._credentials is not None and self._transport is not None
        key = self.server_key(member.node_id)
        if self._credentials.per_device and key is None:
            return  # not linked yet: asked again in _CAPS_RETRY
        try:
            reply = await request(self._transport, member.host, member.port, "caps",
                                  timeout=2.0, server_key=key)
        except asyncio.TimeoutError:
            log.debug("no capability record from %s yet", member.node_id)
            return
        if reply.get("node") == member.node_id and isinstance(reply.get("caps"), dict):
            self._members = membership.with_capabilities(
                self._members, member.node_id, int(reply.get("inc", -1)), reply["caps"])


def _recv_now(sock: zmq.asyncio.Socket) -> list[zmq.Frame] | None:
    """One queued multipart message, or None, without waiting (the synchronous base
    class methods: the asyncio socket's own return futures)."""
    try:
        frames = [zmq.Socket.recv(sock, zmq.NOBLOCK, copy=False)]
    except zmq.Again:
        return None
    while sock.getsockopt(zmq.RCVMORE):
        frames.append(zmq.Socket.recv(sock, zmq.NOBLOCK, copy=False))
    return frames


class _CertificateServer(asyncio.DatagramProtocol):
    """Answers certificate queries (security.CERT_QUERY) on the control port number over
    UDP; everything else is ignored. The answer is public (the advert carries it too)."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._transport is not None and len(data) == CERT_QUERY_SIZE and \
                data.startswith(CERT_QUERY):
            self._transport.sendto(self._answer, addr)


class _CertificateAnswer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data.startswith(CERT_ANSWER) and len(data) <= 1024 and not self.answer.done():
            with contextlib.suppress(UnicodeDecodeError):
                self.answer.set_result(data[len(CERT_ANSWER):].decode("ascii"))


async def fetch_certificate(host: str, port: int, timeout: float = 2.0) -> str:
    """The encoded certificate the node with control port ``host:port`` answers with
    (per-device identity), unchecked: ``Trust.certificate_key`` checks it. TimeoutError
    when nothing answers."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        _CertificateAnswer, remote_addr=(host, port))
    try:
        query = CERT_QUERY.ljust(CERT_QUERY_SIZE, b"\0")
        for _ in range(3):  # UDP: ask again if the datagram was lost
            transport.sendto(query)
            try:
                return await asyncio.wait_for(asyncio.shield(protocol.answer), timeout / 3)
            except asyncio.TimeoutError:
                continue
        raise asyncio.TimeoutError(f"no certificate from {host}:{port}")
    finally:
        transport.close()


async def request(transport: Transport, host: str, port: int, msg_type: str, /, *,
                  timeout: float = 2.0, server_key: bytes | None = None,
                  **fields: Any) -> dict[str, Any]:
    """One request/reply over a fresh CURVE DEALER (pinned to ``server_key`` with
    per-device identity); TimeoutError when nobody answers (including when the other
    side refuses our credentials or lacks the pinned key: CURVE gives no error)."""
    sock = transport.connect_dealer(host, port, server_key)
    try:
        # IMMEDIATE would refuse to queue before the handshake; a lone request may wait.
        await asyncio.wait_for(_send_when_ready(sock, control_message(msg_type, **fields)), timeout)
        payload = await asyncio.wait_for(sock.recv(), timeout)
        return wire.decode(payload)
    finally:
        sock.close(linger=0)


async def _send_when_ready(sock: zmq.asyncio.Socket, payload: bytes) -> None:
    while not try_send(sock, payload):
        await asyncio.sleep(0.01)


async def query_status(credentials_dir: Path, host: str, port: int,
                       timeout: float = 2.0) -> dict[str, Any]:
    """Ask a running member (any member) for its view, as a dict (see ClusterView).
    With per-device identity its server key comes from the certificate it answers
    with over UDP, checked like any other (``ValueError`` if it is not valid)."""
    credentials = load_cluster_credentials(credentials_dir)
    key = None
    if credentials.trust is not None:
        key = credentials.trust.certificate_key(await fetch_certificate(host, port, timeout))
        if key is None:
            raise ValueError(f"{host}:{port} answered without a valid certificate of this "
                             "cluster")
    transport = Transport(credentials)
    try:
        reply = await request(transport, host, port, "status", timeout=timeout,
                              server_key=key)
    finally:
        transport.close()
    view = reply.get("view")
    if not isinstance(view, dict):
        raise ValueError(f"unexpected status reply from {host}:{port}")
    return view


# --- a standalone member process (tests, and before the node daemon embeds it) ---

def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m epara.peer.member",
                                     description="Run one epara cluster member.")
    parser.add_argument("--credentials", type=Path, required=True)
    parser.add_argument("--interface", action="append",
                        help="IP to bind and advertise on (repeatable); default: all")
    parser.add_argument("--peer", action="append", default=[], help="seed host:port")
    parser.add_argument("--port", type=int, default=0, help="control port (0: any)")
    parser.add_argument("--node-id")
    parser.add_argument("--never-lead", action="store_true")
    parser.add_argument("--priority", type=int)
    parser.add_argument("--no-mdns", action="store_true")
    parser.add_argument("--status-file", type=Path)
    parser.add_argument("--command-every", type=float, default=0.0,
                        help="while leader, broadcast a 'ping' command this often (tests)")
    parser.add_argument("--remove-after", type=float, default=1.5)
    parser.add_argument("--max-heartbeats-per-s", type=float,
                        default=MemberConfig.max_heartbeats_per_s)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> None:
    config = MemberConfig(
        node_id=args.node_id, interfaces=tuple(args.interface) if args.interface else None,
        control_port=args.port, seeds=tuple(args.peer), mdns=not args.no_mdns,
        never_lead=args.never_lead, priority=args.priority,
        suspect_after=args.remove_after / 2, remove_after=args.remove_after,
        max_heartbeats_per_s=args.max_heartbeats_per_s,
        cache_dir=args.cache_dir, status_file=args.status_file)
    started = time.monotonic()
    member = ClusterMember(config, args.credentials, lambda: {
        "uptime_s": round(time.monotonic() - started),
        "mem_free_mb": caps_mod.meminfo()[1]})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await member.start()
    sent = 0
    try:
        while not stop.is_set():
            if args.command_every and member.view().is_leader:
                sent += 1
                await member.broadcast_command("ping", {"n": sent})
            interval = args.command_every or 1.0
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except asyncio.TimeoutError:
                member.write_status()  # keep state records in the file fresh
    finally:
        await member.stop()


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()
