"""Cluster credentials and the CurveZMQ key scheme.

Key scheme (simple on purpose, see docs/peer.md):

* ``epara cluster init`` creates one random CURVE (X25519) secret key, the *cluster key*,
  and writes it to ``<dir>/cluster.key`` (mode 0600, directory 0700). Copying that
  directory to a device is what admits it to the cluster.
* Every node uses the cluster keypair both as its CURVE *server* key (on the sockets it
  binds) and as its CURVE *client* key (on the sockets it connects).
* A ZAP handler on every node admits a client only when it presents the cluster public
  key. CURVE proves possession of the matching secret during the handshake, so only a
  holder of ``cluster.key`` can connect to a node; and a client refuses a server that
  cannot prove the same secret, so a node never sends state or tensors to an impostor.
* The *cluster id* is a one-way fingerprint of the public key. It goes into mDNS adverts
  so nodes of different clusters on one LAN ignore each other; neither key ever leaves
  the credentials directory, nor appears in adverts or logs.

What this does not give: per-node identity at the transport layer (every member holds
the same key, so a node id inside a message is asserted, not proven), and revoking one
device (rotate the cluster key instead: run ``cluster init`` again and redistribute).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import zmq

KEY_FILE = "cluster.key"
_FILE_HEADER = "# epara cluster secret (CURVE secret key, Z85). Keep private: mode 0600.\n"


class CredentialsError(RuntimeError):
    """Missing, malformed or unsafely readable cluster credentials."""


@dataclass(frozen=True)
class ClusterCredentials:
    """The cluster keypair (Z85 bytes, as libzmq wants them) and its public fingerprint."""

    public_key: bytes
    secret_key: bytes = field(repr=False)  # never printed, not even by a debugging repr

    @property
    def cluster_id(self) -> str:
        return cluster_fingerprint(self.public_key)


def cluster_fingerprint(public_key: bytes) -> str:
    """16 hex digits naming the cluster; derived from the public key, reveals no secret."""
    return hashlib.sha256(b"epara-cluster-id\0" + public_key).hexdigest()[:16]


def create_cluster_credentials(directory: Path, *, overwrite: bool = False) -> ClusterCredentials:
    """Create a new cluster secret in ``directory`` (0700) as ``cluster.key`` (0600)."""
    directory = Path(directory)
    path = directory / KEY_FILE
    if path.exists() and not overwrite:
        raise CredentialsError(f"{path} exists; pass overwrite=True to rotate the cluster key")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    public, secret = zmq.curve_keypair()
    # O_EXCL-free but created with 0600 from the start, so the secret is never readable
    # by others even for a moment; replace atomically so readers never see half a file.
    tmp = directory / f".{KEY_FILE}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(_FILE_HEADER + secret.decode("ascii") + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return ClusterCredentials(public_key=public, secret_key=secret)


def load_cluster_credentials(directory: Path) -> ClusterCredentials:
    """Read ``cluster.key``; refuse a key file that group or others can read."""
    path = Path(directory) / KEY_FILE
    try:
        mode = path.stat().st_mode
        text = path.read_text("ascii")
    except FileNotFoundError:
        raise CredentialsError(f"no cluster credentials at {path}; run `epara cluster init` "
                               "or copy the credentials directory from a member") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(f"{path} is accessible by group/others (mode "
                               f"{stat.S_IMODE(mode):o}); chmod 600 it")
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.startswith("#")]
    if len(lines) != 1 or len(lines[0]) != 40:
        raise CredentialsError(f"{path} does not hold one 40-character Z85 key")
    secret = lines[0].encode("ascii")
    try:
        public = zmq.curve_public(secret)
    except (zmq.ZMQError, ValueError) as exc:
        raise CredentialsError(f"{path} holds an invalid key") from exc
    return ClusterCredentials(public_key=public, secret_key=secret)


class ClusterKeyOnly:
    """ZAP credentials provider: admit exactly the clients presenting the cluster key."""

    def __init__(self, credentials: ClusterCredentials) -> None:
        self._public = credentials.public_key

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self._public
