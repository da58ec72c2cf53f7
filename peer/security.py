"""Cluster credentials and the CurveZMQ key scheme.

Two layouts (docs/peer.md, "Identity"):

**Shared key (the original layout).** ``epara cluster init`` creates one random CURVE
(X25519) secret, the *cluster key*, in ``<dir>/cluster.key`` (mode 0600, directory
0700). Every node uses it as its CURVE server key and its client key; a ZAP handler
admits exactly the clients presenting it. Any holder can claim any node id, and
revoking one device means rotating the key everywhere.

**Per-device identity.** ``epara cluster init --authority AUTH`` creates an Ed25519
*authority* key in AUTH, kept off the devices (the cluster key is kept if the cluster
directory already has one: that is the one-line upgrade). ``epara cluster admit ID``
gives a device its own CURVE keypair (``node.key``) and a certificate (``node.cert``)
binding ID to that key, signed by the authority; the device directory also holds
``authority.pub`` and the signed revocation list, and no shared secret at all. The
device's keypair is its CURVE *server* key on every socket it binds (control ROUTER,
data plane) and its client key on every socket it dials. A node dials with its own key
and presents its certificate as ZMTP metadata (``X-Epara-Cert``); the receiver checks
the signature, that the certificate's key is the CURVE key of the connection, and that
it is not revoked, so a message's node id is proven, not asserted, and so are
leadership claims and commands.

Dialers pin the server key: a node dials a peer only with a key it took from that
peer's certificate, checked against the authority and the revocation list and bound to
the node id it expects (``Trust.certificate_key``). It learns certificates before it
dials, from (docs/peer.md, "Identity") the peer's mDNS advert (TXT ``crt``), the
connection a peer's heartbeat arrived on (whose certificate the receiver has checked),
the ``_peers`` list of a member's state record (endpoints with certificates), or a
one-datagram exchange on the peer's control port number over UDP (``CERT_QUERY``:
static seeds and ``epara status``). A server without the pinned key's secret cannot
complete the CURVE handshake, so nothing is ever sent to it.
``epara cluster revoke ID`` signs a new revocation list; nodes pass it on in their state
records, refuse the revoked keys in ZAP, and drop messages from connections opened
before it arrived. The data plane's ZAP admits only keys of certified members.

A revoked device keeps its own secret, but its key is refused by every dialer (the
revocation list names it) as well as by every ZAP handler, so it can neither connect
to anyone nor pose as a server for an address it hijacks.

The *cluster id* is a one-way fingerprint of the cluster public key. It goes into mDNS
adverts so nodes of different clusters on one LAN ignore each other; no secret ever
leaves a credentials directory or appears in adverts or logs. A device of the
per-device layout reads it from its certificate (signed by the authority), so it needs
no ``cluster.key``; one left there by an older ``admit`` is ignored (re-admitting
removes it). The authority directory keeps the cluster key: it defines the cluster id,
and the shared-key layout still runs on it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import zmq

KEY_FILE = "cluster.key"
NODE_KEY_FILE = "node.key"  # the device's own CURVE secret (device directory)
CERT_FILE = "node.cert"  # its certificate, signed by the authority (public)
AUTHORITY_PUB_FILE = "authority.pub"  # the authority's Ed25519 verify key (hex)
AUTHORITY_KEY_FILE = "authority.key"  # the authority's signing seed: never on a device
REVOCATIONS_FILE = "revocations.cbor"
# What a device's credentials directory may hold, private (0600) or public; never the
# authority's key (bundles and installs copy exactly these).
DEVICE_FILES = {KEY_FILE: 0o600, NODE_KEY_FILE: 0o600, CERT_FILE: 0o644,
                AUTHORITY_PUB_FILE: 0o644, REVOCATIONS_FILE: 0o644}
CERT_METADATA = "X-Epara-Cert"  # the ZMTP metadata property carrying a certificate
# The certificate exchange over UDP on a node's control port number: a query is this
# prefix padded with zeros to CERT_QUERY_SIZE bytes (no larger than the answer, so the
# exchange cannot amplify traffic toward a forged source); the answer is CERT_ANSWER
# followed by the node's encoded certificate.
CERT_QUERY = b"epara-cert?"
CERT_QUERY_SIZE = 256
CERT_ANSWER = b"epara-cert "
CONTROL_DOMAIN = "epara-control"  # ZAP domain of the control ROUTER
_FILE_HEADER = "# epara cluster secret (CURVE secret key, Z85). Keep private: mode 0600.\n"
_NODE_HEADER = "# epara node secret (CURVE secret key, Z85). Keep private: mode 0600.\n"
_CERT_LABEL = "epara-cert-1"
_REVOCATIONS_LABEL = "epara-revocations-1"


class CredentialsError(RuntimeError):
    """Missing, malformed or unsafely readable cluster credentials."""


@dataclass(frozen=True)
class ClusterCredentials:
    """The cluster keypair (Z85 bytes, as libzmq wants them) and its public fingerprint;
    with per-device identity instead the device's keypair, certificate and trust state
    (and the cluster keypair only if an older device directory still holds it)."""

    public_key: bytes | None
    secret_key: bytes | None = field(repr=False)  # never printed, not even in a repr
    node_public: bytes | None = None  # Z85; None in the shared-key layout
    node_secret: bytes | None = field(default=None, repr=False)
    certificate: Certificate | None = None
    trust: Trust | None = field(default=None, compare=False)

    @property
    def cluster_id(self) -> str:
        if self.certificate is not None:  # signed by the authority: no cluster key needed
            return self.certificate.cluster_id
        assert self.public_key is not None
        return cluster_fingerprint(self.public_key)

    @property
    def per_device(self) -> bool:
        return self.trust is not None

    @property
    def server_public(self) -> bytes:
        """The CURVE server key of every socket this node binds: its own key with
        per-device identity, else the shared cluster key."""
        key = self.node_public if self.per_device else self.public_key
        assert key is not None
        return key

    @property
    def server_secret(self) -> bytes:
        key = self.node_secret if self.per_device else self.secret_key
        assert key is not None
        return key


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
    _write_private(path, _FILE_HEADER + secret.decode("ascii") + "\n")
    return ClusterCredentials(public_key=public, secret_key=secret)


def _read_secret(path: Path, missing: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 CURVE keys from a private key file."""
    try:
        mode = path.stat().st_mode
        text = path.read_text("ascii")
    except FileNotFoundError:
        raise CredentialsError(missing) from None
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
    return public, secret


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` created 0600 (never readable by others, even briefly),
    replacing atomically so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


_TRUST: dict[Path, Trust] = {}
_TRUST_LOCK = threading.Lock()


def load_cluster_credentials(directory: Path) -> ClusterCredentials:
    """Read a credentials directory (either layout); refuse private key files that group
    or others can read, and a certificate the directory's authority did not sign."""
    directory = Path(directory)
    path = directory / KEY_FILE
    if not (directory / CERT_FILE).exists():
        public, secret = _read_secret(path, f"no cluster credentials at {path}; run "
                                      "`epara cluster init` or copy the credentials "
                                      "directory from a member (or `epara cluster admit` "
                                      "one)")
        return ClusterCredentials(public_key=public, secret_key=secret)
    # Per-device: a cluster key an older `admit` left here is read (and checked for
    # safe permissions) but used for nothing; the cluster id is the certificate's.
    shared: tuple[bytes | None, bytes | None] = (None, None)
    if path.exists():
        shared = _read_secret(path, "")
    node_public, node_secret = _read_secret(directory / NODE_KEY_FILE,
                                            f"{directory / CERT_FILE} without its "
                                            f"{NODE_KEY_FILE}")
    authority = read_authority_public(directory)
    try:
        cert = Certificate.decode((directory / CERT_FILE).read_text("ascii").strip())
    except ValueError as exc:
        raise CredentialsError(f"{directory / CERT_FILE}: {exc}") from None
    cluster_id = cert.cluster_id
    if shared[0] is not None and cluster_fingerprint(shared[0]) != cluster_id:
        raise CredentialsError(f"{path} is not the key of the cluster {directory / CERT_FILE} "
                               "names; remove it (a per-device node does not need it)")
    if not cert.verify(authority, cluster_id) or cert.curve_public != node_public:
        raise CredentialsError(f"{directory / CERT_FILE} is not a certificate for this "
                               f"node's key signed by this cluster's authority")
    with _TRUST_LOCK:  # one trust state per directory and process (control and data plane)
        trust = _TRUST.get(directory.resolve())
        if trust is None:
            trust = _TRUST[directory.resolve()] = Trust(directory, authority, cluster_id)
    return ClusterCredentials(public_key=shared[0], secret_key=shared[1],
                              node_public=node_public, node_secret=node_secret,
                              certificate=cert, trust=trust)


def certified_node_id(directory: Path | None) -> str | None:
    """The node id a device directory's certificate names, if it has one."""
    if directory is None or not (Path(directory) / CERT_FILE).exists():
        return None
    return load_cluster_credentials(directory).certificate.node_id  # type: ignore[union-attr]


# --- per-device identity: authority, certificates, revocations ---------------------------


def _nacl() -> Any:
    try:
        import nacl.exceptions
        import nacl.signing
    except ImportError:
        raise CredentialsError("per-device identity needs PyNaCl: pip install "
                               "'epara[identity]'") from None
    return nacl


def read_authority_public(directory: Path) -> bytes:
    path = Path(directory) / AUTHORITY_PUB_FILE
    try:
        key = bytes.fromhex(path.read_text("ascii").strip())
    except FileNotFoundError:
        raise CredentialsError(f"no {path}: a device directory needs the authority's "
                               "public key (`epara cluster admit` writes it)") from None
    except ValueError:
        key = b""
    if len(key) != 32:
        raise CredentialsError(f"{path} does not hold a 32-byte hex key")
    return key


def _verify(authority: bytes, message: bytes, signature: bytes) -> bool:
    nacl = _nacl()
    try:
        nacl.signing.VerifyKey(authority).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class Certificate:
    """The authority's statement: node ``node_id`` of cluster ``cluster_id`` owns the CURVE
    public key ``curve_public``."""

    cluster_id: str
    node_id: str
    curve_public: bytes  # Z85, 40 bytes
    issued: int  # Unix seconds
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return cbor2.dumps([_CERT_LABEL, self.cluster_id, self.node_id, self.curve_public,
                            self.issued])

    def verify(self, authority: bytes, cluster_id: str) -> bool:
        return self.cluster_id == cluster_id and _verify(authority, self.signed_bytes(),
                                                         self.signature)

    def encode(self) -> str:
        """Text (URL-safe base64), to fit a file line and a ZMTP metadata value."""
        return base64.urlsafe_b64encode(cbor2.dumps(
            [self.cluster_id, self.node_id, self.curve_public, self.issued,
             self.signature])).decode("ascii")

    @classmethod
    def decode(cls, text: str) -> Certificate:
        try:
            fields = cbor2.loads(base64.urlsafe_b64decode(text.encode("ascii")))
            cid, node_id, key, issued, signature = fields
        except (ValueError, TypeError, cbor2.CBORDecodeError):
            raise ValueError("not an epara certificate") from None
        if not (isinstance(cid, str) and isinstance(node_id, str) and 0 < len(node_id) <= 64
                and isinstance(key, bytes) and len(key) == 40 and isinstance(issued, int)
                and isinstance(signature, bytes) and len(signature) == 64):
            raise ValueError("malformed epara certificate")
        return cls(cid, node_id, key, issued, signature)


@dataclass(frozen=True)
class Revocations:
    """A signed, versioned list of revoked node ids and keys. A higher version replaces a
    lower one; lists only grow (a revoked id stays revoked)."""

    cluster_id: str
    version: int = 0
    node_ids: frozenset[str] = frozenset()
    keys: frozenset[bytes] = frozenset()  # Z85 CURVE keys of revoked certificates
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return cbor2.dumps([_REVOCATIONS_LABEL, self.cluster_id, self.version,
                            sorted(self.node_ids), sorted(self.keys)])

    def encode(self) -> bytes:
        return cbor2.dumps([self.cluster_id, self.version, sorted(self.node_ids),
                            sorted(self.keys), self.signature])

    @classmethod
    def decode(cls, blob: bytes) -> Revocations:
        try:
            cid, version, ids, keys, signature = cbor2.loads(blob)
            result = cls(str(cid), int(version), frozenset(str(i) for i in ids),
                         frozenset(bytes(k) for k in keys), bytes(signature))
        except (ValueError, TypeError, cbor2.CBORDecodeError):
            raise ValueError("not an epara revocation list") from None
        return result

    def verify(self, authority: bytes, cluster_id: str) -> bool:
        return self.cluster_id == cluster_id and (
            self.version == 0 or _verify(authority, self.signed_bytes(), self.signature))


class Trust:
    """What one process trusts in the per-device layout: the authority, the current
    revocation list, and the certified keys seen on the control plane (the data plane's
    ZAP admits only those). Shared by the control and data planes of one node."""

    def __init__(self, directory: Path, authority: bytes, cluster_id: str) -> None:
        self.directory = directory
        self.authority = authority
        self.cluster_id = cluster_id
        self.revocations = Revocations(cluster_id)
        self._checked: dict[tuple[bytes, str], str | None] = {}  # (key, cert) -> node id
        self.member_keys: dict[bytes, str] = {}  # certified key -> node id
        self._mtime = 0.0
        self.reload()

    def reload(self) -> bool:
        """Adopt the directory's revocation file if it is newer (an operator dropped one
        in); True when the list changed."""
        path = self.directory / REVOCATIONS_FILE
        try:
            mtime = path.stat().st_mtime
            if mtime == self._mtime:
                return False
            self._mtime = mtime
            return self.offer(path.read_bytes(), persist=False)
        except OSError:
            return False

    def offer(self, blob: bytes, *, persist: bool = True) -> bool:
        """Adopt a revocation list if it is valid and newer; True when adopted."""
        try:
            offered = Revocations.decode(blob)
        except ValueError:
            return False
        if offered.version <= self.revocations.version or \
                not offered.verify(self.authority, self.cluster_id):
            return False
        self.revocations = offered
        self._checked.clear()
        for key, node_id in list(self.member_keys.items()):
            if self.revoked(key, node_id):
                del self.member_keys[key]
        if persist:  # so a restart starts from it, and `epara doctor` can show it
            tmp = self.directory / f".{REVOCATIONS_FILE}.tmp"
            tmp.write_bytes(blob)
            os.replace(tmp, self.directory / REVOCATIONS_FILE)
            self._mtime = (self.directory / REVOCATIONS_FILE).stat().st_mtime
        return True

    def revoked(self, key: bytes, node_id: str | None = None) -> bool:
        return key in self.revocations.keys or (node_id is not None
                                                and node_id in self.revocations.node_ids)

    def node_for(self, key: bytes | None, cert_text: str | None) -> str | None:
        """The proven node id of a connection: its certificate must be the authority's,
        name the connection's own CURVE key, and not be revoked. None otherwise."""
        if key is None or cert_text is None:
            return None
        cached = self._checked.get((key, cert_text), "")
        if cached != "":
            return cached
        try:
            cert = Certificate.decode(cert_text)
        except ValueError:
            cert = None
        ok = (cert is not None and cert.curve_public == key
              and cert.verify(self.authority, self.cluster_id)
              and not self.revoked(key, cert.node_id))
        node_id = cert.node_id if ok and cert is not None else None
        if len(self._checked) > 4096:
            self._checked.clear()
        self._checked[(key, cert_text)] = node_id
        if node_id is not None:
            self.member_keys[key] = node_id
        return node_id

    def certificate_key(self, cert_text: str | None, node_id: str | None = None) -> bytes | None:
        """The CURVE key a dialer may pin for a peer: the key of ``cert_text`` if it is a
        certificate of this cluster signed by the authority, not revoked, and (when
        ``node_id`` is given) for that node. None otherwise."""
        if not isinstance(cert_text, str) or len(cert_text) > 512:
            return None
        try:
            cert = Certificate.decode(cert_text)
        except ValueError:
            return None
        if node_id is not None and cert.node_id != node_id:
            return None
        return cert.curve_public if self.node_for(cert.curve_public, cert_text) else None


def create_authority(authority_dir: Path, cluster_dir: Path | None = None) -> dict[str, str]:
    """A new authority in ``authority_dir``. The cluster key is ``cluster_dir``'s when it
    has one (upgrading a shared-key cluster keeps its id), else a new one."""
    nacl = _nacl()
    authority_dir = Path(authority_dir)
    if (authority_dir / AUTHORITY_KEY_FILE).exists():
        raise CredentialsError(f"{authority_dir} already holds an authority")
    authority_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(authority_dir, 0o700)
    if cluster_dir is not None and (Path(cluster_dir) / KEY_FILE).exists():
        creds = load_cluster_credentials(cluster_dir)
        if creds.per_device or creds.secret_key is None:
            raise CredentialsError(f"{cluster_dir} is a device directory; upgrade from the "
                                   "shared-key cluster directory")
        _write_private(authority_dir / KEY_FILE, _FILE_HEADER + creds.secret_key.decode() + "\n")
        kept = True
    else:
        creds = create_cluster_credentials(authority_dir)
        kept = False
    signing = nacl.signing.SigningKey.generate()
    _write_private(authority_dir / AUTHORITY_KEY_FILE, bytes(signing).hex() + "\n")
    (authority_dir / AUTHORITY_PUB_FILE).write_text(bytes(signing.verify_key).hex() + "\n")
    revocations = _sign_revocations(signing, Revocations(creds.cluster_id))
    (authority_dir / REVOCATIONS_FILE).write_bytes(revocations.encode())
    return {"cluster_id": creds.cluster_id, "authority": str(authority_dir),
            "kept_cluster_key": str(kept).lower()}


def _authority(authority_dir: Path) -> tuple[Any, ClusterCredentials]:
    nacl = _nacl()
    path = Path(authority_dir) / AUTHORITY_KEY_FILE
    if not path.exists():
        raise CredentialsError(f"no authority at {authority_dir} (`epara cluster init "
                               "--authority DIR` creates one)")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(f"{path} is accessible by group/others; chmod 600 it")
    signing = nacl.signing.SigningKey(bytes.fromhex(path.read_text("ascii").strip()))
    _, secret = _read_secret(Path(authority_dir) / KEY_FILE, f"{authority_dir} has no "
                             f"{KEY_FILE}")
    return signing, ClusterCredentials(public_key=zmq.curve_public(secret), secret_key=secret)


def _sign_revocations(signing: Any, revocations: Revocations) -> Revocations:
    unsigned = Revocations(revocations.cluster_id, revocations.version, revocations.node_ids,
                           revocations.keys)
    return Revocations(unsigned.cluster_id, unsigned.version, unsigned.node_ids,
                       unsigned.keys, signing.sign(unsigned.signed_bytes()).signature)


def _current_revocations(authority_dir: Path, cluster_id: str) -> Revocations:
    path = Path(authority_dir) / REVOCATIONS_FILE
    return Revocations.decode(path.read_bytes()) if path.exists() else Revocations(cluster_id)


def admit_device(authority_dir: Path, node_id: str, out_dir: Path) -> dict[str, str]:
    """Make ``out_dir`` a device directory for ``node_id``: the device's key (kept if
    ``out_dir`` already holds one, e.g. made on the device), its certificate, the
    authority's public key and the current revocation list. Neither the authority's
    secret nor the shared cluster key is written there (a cluster key an older admit
    left is removed)."""
    if not node_id or len(node_id) > 64 or any(c.isspace() for c in node_id):
        raise CredentialsError(f"node id {node_id!r}: 1-64 characters, no spaces")
    signing, cluster = _authority(authority_dir)
    revocations = _current_revocations(authority_dir, cluster.cluster_id)
    if node_id in revocations.node_ids:
        raise CredentialsError(f"{node_id} is revoked; admit the device under a new id")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)
    if (out_dir / NODE_KEY_FILE).exists():
        public, _ = _read_secret(out_dir / NODE_KEY_FILE, "")
    else:
        public, secret = zmq.curve_keypair()
        _write_private(out_dir / NODE_KEY_FILE, _NODE_HEADER + secret.decode() + "\n")
    unsigned = Certificate(cluster.cluster_id, node_id, public, int(time.time()))
    cert = Certificate(unsigned.cluster_id, node_id, public, unsigned.issued,
                       signing.sign(unsigned.signed_bytes()).signature)
    (out_dir / CERT_FILE).write_text(cert.encode() + "\n")
    issued = Path(authority_dir) / "issued"  # so a revocation can name the keys too
    issued.mkdir(exist_ok=True)
    with open(issued / f"{node_id}.certs", "a") as handle:
        handle.write(cert.encode() + "\n")
    (out_dir / KEY_FILE).unlink(missing_ok=True)
    (out_dir / AUTHORITY_PUB_FILE).write_text(bytes(signing.verify_key).hex() + "\n")
    (out_dir / REVOCATIONS_FILE).write_bytes(revocations.encode())
    return {"node_id": node_id, "cluster_id": cluster.cluster_id, "dir": str(out_dir)}


def revoke_device(authority_dir: Path, node_id: str) -> dict[str, Any]:
    """Add ``node_id`` to the authority's revocation list, signed, one version up."""
    signing, cluster = _authority(authority_dir)
    current = _current_revocations(authority_dir, cluster.cluster_id)
    issued = Path(authority_dir) / "issued" / f"{node_id}.certs"
    keys = {Certificate.decode(line.strip()).curve_public
            for line in (issued.read_text().splitlines() if issued.exists() else ())
            if line.strip()}
    updated = _sign_revocations(signing, Revocations(
        cluster.cluster_id, current.version + 1, current.node_ids | {node_id},
        current.keys | keys))
    path = Path(authority_dir) / REVOCATIONS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(updated.encode())
    os.replace(tmp, path)
    return {"node_id": node_id, "version": updated.version, "path": str(path)}


class ClusterKeyOnly:
    """ZAP credentials provider: admit exactly the clients presenting the cluster key."""

    def __init__(self, credentials: ClusterCredentials) -> None:
        assert credentials.public_key is not None
        self._public = credentials.public_key

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self._public


class NotRevoked:
    """ZAP provider of the control plane (per-device layout): admit any key that is not
    revoked. Each message is then checked for a valid certificate of that very key
    (``Trust.node_for``), since ZAP cannot see the certificate."""

    def __init__(self, trust: Trust) -> None:
        self._trust = trust

    def callback(self, domain: str, key: bytes) -> bool:
        return not self._trust.revoked(key, self._trust.member_keys.get(key))


class CertifiedMembers:
    """ZAP provider of every other socket (the data plane): admit only keys whose
    certificates the control plane has verified, and not revoked since."""

    def __init__(self, trust: Trust) -> None:
        self._trust = trust

    def callback(self, domain: str, key: bytes) -> bool:
        node_id = self._trust.member_keys.get(key)
        return node_id is not None and not self._trust.revoked(key, node_id)
