"""ZeroMQ sockets for node-to-node traffic, all CurveZMQ-encrypted and authenticated.

ZAP policy (security.py): in the shared-key layout only the cluster key is admitted, and
it is every socket's server key. In the per-device layout every ROUTER's server key is
the device's own; the control ROUTER (``bind_router(control=True)``) admits any key not
revoked and its owner checks each message's certificate (``sender_of``); every other
ROUTER admits only keys the control plane has certified. Dealers present the device's
own key and its certificate as ZMTP metadata, and pin the server key they are given
(taken from the peer's certificate by the caller).

One ``Transport`` per member: it owns a private ``zmq.asyncio.Context`` because the ZAP
authenticator is per context, and two members in one process (tests, the simulator)
must not share one. Control messages are CBOR maps (``epara.peer.wire``) in one frame.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from . import wire
from .security import (
    CERT_METADATA,
    CONTROL_DOMAIN,
    CertifiedMembers,
    ClusterCredentials,
    ClusterKeyOnly,
    NotRevoked,
)

log = logging.getLogger(__name__)

# A dead peer is noticed by libzmq's own heartbeats too, so a cut link drops the TCP
# connection (and reconnects on heal) instead of sitting on a half-open socket.
_ZMQ_HEARTBEAT_IVL_MS = 500
_ZMQ_HEARTBEAT_TIMEOUTS = 3
# Links without libzmq heartbeats (the control plane, whose own heartbeats flow one way
# on every link all the time): the kernel drops a connection whose sent data stays
# unacknowledged this long (TCP_USER_TIMEOUT, libzmq's TCP_MAXRT on Linux), so a cut
# link still reconnects on heal, at no cost on the wire; and it probes connections it
# only receives on once they fall silent (TCP keepalive), so half-open ones are reaped.
_DEAD_AFTER_MS = 6000
_KEEPALIVE_IDLE_S = 10
_KEEPALIVE_INTERVAL_S = 5
_KEEPALIVE_PROBES = 3
_RECONNECT_IVL_MS = 100
_RECONNECT_IVL_MAX_MS = 1000
# Heartbeats are only useful fresh: queue few, drop the rest rather than deliver stale.
_SNDHWM = 50


def control_message(msg_type: str, /, **fields: Any) -> bytes:
    """Encode one control message (a versioned CBOR map)."""
    return wire.encode({"v": wire.PROTOCOL_VERSION, "type": msg_type, **fields})


class Transport:
    """Creates CURVE server (bind) and client (connect) sockets for one member."""

    def __init__(self, credentials: ClusterCredentials, *,
                 ping_interval_s: float | None = _ZMQ_HEARTBEAT_IVL_MS / 1000) -> None:
        """``ping_interval_s``: libzmq's own keepalive on every connection (the dead
        connection is dropped after three silent intervals, and redialled). None: no
        libzmq pings; the kernel's TCP timeouts drop dead connections instead (for
        links that carry traffic anyway: each ping and its pong cost two TCP segments
        and two acknowledgements per connection and interval)."""
        self._credentials = credentials
        self._ping_ms = None if ping_interval_s is None else \
            max(1, round(ping_interval_s * 1000))
        self.context = zmq.asyncio.Context()
        self._auth: AsyncioAuthenticator | None = None

    def start(self) -> None:
        """Start the ZAP handler; must run inside the event loop that uses the sockets."""
        zap_log = logging.getLogger(__name__ + ".zap")
        # pyzmq's ZAP handler logs every client's key at debug level; keys stay out of logs.
        zap_log.setLevel(logging.WARNING)
        self._auth = AsyncioAuthenticator(self.context, log=zap_log)
        self._auth.start()
        trust = self._credentials.trust
        if trust is None:  # shared-key layout: the cluster key is the only identity
            self._auth.configure_curve_callback("*", credentials_provider=ClusterKeyOnly(
                self._credentials))
            self._auth.configure_curve_callback(CONTROL_DOMAIN, credentials_provider=
                                                ClusterKeyOnly(self._credentials))
            return
        assert self._credentials.node_public is not None and \
            self._credentials.certificate is not None
        trust.member_keys[self._credentials.node_public] = self._credentials.certificate.node_id
        self._auth.configure_curve_callback(CONTROL_DOMAIN,
                                            credentials_provider=NotRevoked(trust))
        self._auth.configure_curve_callback("*", credentials_provider=CertifiedMembers(trust))

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.context.destroy(linger=0)

    def _common(self, sock: zmq.asyncio.Socket) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        if self._ping_ms is not None:
            sock.setsockopt(zmq.HEARTBEAT_IVL, self._ping_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, self._ping_ms * _ZMQ_HEARTBEAT_TIMEOUTS)
        else:
            sock.setsockopt(zmq.TCP_MAXRT, _DEAD_AFTER_MS)
            sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
            sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, _KEEPALIVE_IDLE_S)
            sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, _KEEPALIVE_INTERVAL_S)
            sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, _KEEPALIVE_PROBES)
        sock.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_IVL_MAX_MS)
        sock.setsockopt(zmq.SNDHWM, _SNDHWM)

    def bind_router(self, host: str, port: int, *,
                    control: bool = False) -> tuple[zmq.asyncio.Socket, int]:
        """Bind a ROUTER as CURVE server; ``port=0`` picks a free port. ``control``: the
        membership ROUTER, which checks each message's certificate itself (others admit
        only already-certified members' keys)."""
        sock = self.context.socket(zmq.ROUTER)
        self._common(sock)
        if control:
            sock.setsockopt(zmq.ZAP_DOMAIN, CONTROL_DOMAIN.encode())
        sock.curve_server = True
        sock.curve_secretkey = self._credentials.server_secret
        # Unroutable replies (the asker went away) are dropped, not raised.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if port == 0:
            bound = sock.bind_to_random_port(f"tcp://{host}")
        else:
            sock.bind(f"tcp://{host}:{port}")
            bound = port
        return sock, bound

    def connect_dealer(self, host: str, port: int,
                       server_key: bytes | None = None) -> zmq.asyncio.Socket:
        """Connect a DEALER as CURVE client that only completes a handshake with a server
        holding the secret of ``server_key`` (per-device layout: the peer's certified
        key, required) or of the cluster key (shared-key layout: ``server_key`` must be
        None or the cluster key)."""
        creds = self._credentials
        if creds.per_device and server_key is None:
            raise ValueError("per-device identity: a dialer must pin the peer's server key")
        if not creds.per_device and server_key not in (None, creds.public_key):
            raise ValueError("shared-key layout: every server holds the cluster key")
        sock = self.context.socket(zmq.DEALER)
        self._common(sock)
        # Queue only on completed (authenticated) connections: a send to a dead or
        # unreachable peer fails at once instead of piling up stale heartbeats.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.curve_serverkey = server_key or creds.public_key
        if creds.node_secret is not None and creds.certificate is not None:
            # My own key, and the certificate that binds my node id to it.
            sock.curve_publickey = creds.node_public
            sock.curve_secretkey = creds.node_secret
            sock.setsockopt(zmq.METADATA, f"{CERT_METADATA}:{creds.certificate.encode()}"
                            .encode())
        else:
            sock.curve_publickey = creds.public_key
            sock.curve_secretkey = creds.secret_key
        sock.connect(f"tcp://{_host_for_uri(host)}:{port}")
        return sock


def sender_of(credentials: ClusterCredentials, frame: zmq.Frame) -> str | None:
    """The proven node id behind a received frame (per-device layout); ``""`` in the
    shared-key layout, where the cluster key proves membership only; None when the
    connection has no valid, unrevoked certificate for its key."""
    if credentials.trust is None:
        return ""
    try:
        key, cert = frame.get("User-Id"), frame.get(CERT_METADATA)
    except (zmq.ZMQError, UnicodeDecodeError):
        return None
    return credentials.trust.node_for(key.encode() if key else None, cert)


def _host_for_uri(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def try_send(sock: zmq.asyncio.Socket, payload: bytes) -> bool:
    """Send without blocking; False when the peer is not connected or its queue is full."""
    try:
        # The underlying sync send with NOBLOCK completes at once (or raises), so the
        # future the asyncio socket returns is already done and need not be awaited.
        zmq.Socket.send(sock, payload, zmq.NOBLOCK)
    except zmq.Again:
        return False
    return True
