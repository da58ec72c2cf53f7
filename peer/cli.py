"""Helpers behind ``epara cluster init`` and ``epara status`` (the node CLI wires argparse).

They return data or text and print nothing themselves, so the node CLI decides where
output goes, and tests can check it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from .member import parse_endpoint, query_status
from .membership import ClusterView, view_from_dict
from .security import admit_device, create_authority, create_cluster_credentials, revoke_device

DEFAULT_CONTROL_PORT = 7370  # what `epara node` binds unless told otherwise
DEFAULT_ENDPOINT = f"127.0.0.1:{DEFAULT_CONTROL_PORT}"


def cluster_init(directory: Path, *, overwrite: bool = False) -> dict[str, str]:
    """Create cluster credentials; returns the public cluster id and the key's path."""
    creds = create_cluster_credentials(Path(directory), overwrite=overwrite)
    return {"cluster_id": creds.cluster_id, "path": str(Path(directory) / "cluster.key")}


def format_cluster_init(result: dict[str, str]) -> str:
    return (f"created cluster {result['cluster_id']}\n"
            f"secret: {result['path']} (mode 0600)\n"
            "copy this directory to every device that should join; anyone holding it "
            "can join the cluster")


def authority_init(authority_dir: Path, cluster_dir: Path | None) -> str:
    """``epara cluster init --authority DIR``: per-device identity (keeps the cluster key
    of ``cluster_dir`` when it has one: upgrading a shared-key cluster keeps its id)."""
    result = create_authority(authority_dir, cluster_dir)
    kept = (f"kept the cluster key of {cluster_dir} (same cluster id); "
            if result["kept_cluster_key"] == "true" else "")
    return (f"created the authority of cluster {result['cluster_id']} in {authority_dir}\n"
            f"{kept}keep this directory OFF the devices; give each device its own "
            f"credentials with `epara cluster admit ID --authority {authority_dir} --out DIR`")


def admit(authority_dir: Path, node_id: str, out_dir: Path) -> str:
    result = admit_device(authority_dir, node_id, out_dir)
    return (f"admitted {node_id} to cluster {result['cluster_id']}: {out_dir}\n"
            f"copy that directory to the device (e.g. /etc/epara/cluster, or build its "
            f"firmware bundle with --cluster {out_dir}); it holds no authority secret")


def revoke(authority_dir: Path, node_id: str) -> str:
    result = revoke_device(authority_dir, node_id)
    return (f"revoked {node_id}: revocation list v{result['version']} in {result['path']}\n"
            "copy it into any running member's credentials directory; members pass it on "
            "and refuse that device from then on")


def fetch_status(credentials_dir: Path, endpoint: str = DEFAULT_ENDPOINT,
                 timeout: float = 2.0) -> ClusterView:
    """The cluster view as the node at ``endpoint`` sees it (any member can answer)."""
    host, port = parse_endpoint(endpoint)
    try:
        return view_from_dict(asyncio.run(query_status(credentials_dir, host, port, timeout)))
    except asyncio.TimeoutError:
        # CURVE refuses a wrong key silently, so both causes look the same from here.
        raise TimeoutError(f"no answer from {endpoint} within {timeout:g} s: no node "
                           "running there, or it belongs to another cluster") from None


def _fmt_mb(value: Any) -> str:
    return f"{int(value) / 1024:.1f}G" if isinstance(value, (int, float)) else "-"


def format_status(view: ClusterView) -> str:
    """A table of members: one line each, the leader first."""
    header = (f"leader {view.leader_id or '(none)'}  term {view.term}  "
              f"members {len(view.members)}  (as seen by {view.self_id})")
    rows = [("NODE", "ROLE", "STATUS", "ADDRESS", "CLASS", "CPU", "MEM FREE", "GFLOP/S")]
    for m in sorted(view.members, key=lambda m: (m.role != "leader", m.node_id)):
        caps = m.capabilities or {}
        state = m.state or {}
        free = state.get("mem_free_mb", caps.get("mem_free_mb"))
        rows.append((m.node_id + (" *" if m.node_id == view.self_id else ""), m.role,
                     m.status, f"{m.host}:{m.port}",
                     str(caps.get("device_class", m.headline.get("cls", "-"))),
                     str(caps.get("cpu_cores", m.headline.get("cpu", "-"))), _fmt_mb(free),
                     str(caps.get("gflops", m.headline.get("gf", "-")))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    return "\n".join([header, *lines])


def status(credentials_dir: Path, endpoint: str = DEFAULT_ENDPOINT, *, as_json: bool = False,
           timeout: float = 2.0) -> str:
    """``epara status [--json]``: the view of the node at ``endpoint``, as text."""
    view = fetch_status(credentials_dir, endpoint, timeout)
    if as_json:
        return json.dumps(view.to_dict(), indent=2, sort_keys=True, default=str)
    return format_status(view)
