"""``epara firmware``: bundle, flash, upgrade and uninstall a node on a device."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from epara.firmware.flash import SshTarget


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fw = sub.add_parser("firmware", help="bundle a node for a device, flash it, upgrade it")
    fsub = fw.add_subparsers(title="firmware commands")

    profiles = fsub.add_parser("profiles", help="list the device profiles")
    profiles.set_defaults(run=_cmd_profiles)

    bundle = fsub.add_parser("bundle", help="build an offline bundle for a device profile")
    bundle.add_argument("--profile", required=True, help="profile name (epara firmware "
                        "profiles) or a .toml file")
    bundle.add_argument("--models", help="comma-separated model names from the store "
                        "(default: the profile's)")
    bundle.add_argument("--store", type=Path, help="model store (default: the usual one)")
    bundle.add_argument("--cluster", type=Path, metavar="DIR", help="include these "
                        "credentials: a device directory (`epara cluster admit ID --out DIR`, "
                        "its own key and certificate) or a shared-key cluster directory; "
                        "never the authority")
    bundle.add_argument("--out", type=Path, help="the .tar.gz to write")
    bundle.add_argument("--with", dest="with_extras", action="append", default=[],
                        metavar="EXTRA", help="an optional extra of the profile (e.g. torch)")
    bundle.add_argument("--extra-wheel", action="append", default=[], type=Path,
                        help="a wheel not on PyPI for this device (e.g. JetPack's "
                        "onnxruntime-gpu), installed last")
    bundle.add_argument("--node-flag", action="append", default=[], metavar="FLAG",
                        help="add a flag to `epara node` (write --node-flag=--x)")
    bundle.add_argument("--allow-lead", action="store_true",
                        help="drop the profile's --never-lead (a cluster of only Pis)")
    bundle.add_argument("--python", help="override the profile's Python version (3.12)")
    bundle.set_defaults(run=_cmd_bundle)

    flash = fsub.add_parser("flash", help="install a bundle into a mounted root or over SSH")
    flash.add_argument("bundle", type=Path)
    _target_args(flash)
    flash.add_argument("--mode", choices=["auto", "full", "firstboot"], default="auto",
                       help="full: build the venv now (needs this machine's arch and Python);"
                       " firstboot: stage it for the device's first boot; auto: full when "
                       "possible")
    flash.add_argument("--node-id", help="pin the node's id (default: from its machine id)")
    flash.set_defaults(run=_cmd_flash)

    upgrade = fsub.add_parser("upgrade", help="switch to a new bundle, roll back if the node "
                              "is not healthy")
    upgrade.add_argument("bundle", type=Path)
    _target_args(upgrade)
    upgrade.add_argument("--health-timeout", type=float, default=60.0,
                         help="seconds the new node has to answer and rejoin its cluster")
    upgrade.add_argument("--restart-command", help="how to restart the node (default: "
                         "systemctl restart epara.service)")
    upgrade.add_argument("--socket", help="node socket for the health check")
    upgrade.set_defaults(run=_cmd_upgrade)

    uninstall = fsub.add_parser("uninstall", help="remove the node from a device")
    _target_args(uninstall)
    uninstall.add_argument("--purge", action="store_true",
                           help="also remove identity, credentials and models")
    uninstall.set_defaults(run=_cmd_uninstall)


def _target_args(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--root", type=Path, help="a mounted root file system (default: /, "
                       "this machine)")
    where.add_argument("--ssh", metavar="USER@HOST", help="a device reachable over SSH")
    parser.add_argument("--ssh-port", type=int, default=22)
    parser.add_argument("--ssh-identity", type=Path, help="private key for --ssh")
    parser.add_argument("--ssh-option", action="append", default=[], metavar="OPT",
                        help="ssh -o option, e.g. StrictHostKeyChecking=accept-new")
    parser.add_argument("--target-root", default="/", help="with --ssh: the root on the "
                        "device to install into (default /)")


def _cmd_profiles(args: argparse.Namespace) -> int:
    from epara.firmware.profiles import available_profiles, load_profile

    for name in available_profiles():
        p = load_profile(name)
        print(f"{name:<15} {p.arch:<8} py{p.python:<5} extras {','.join(p.extras):<18} "
              f"{p.description}")
    return 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from epara.firmware.bundle import BundleError, build_bundle
    from epara.firmware.profiles import ProfileError, load_profile
    from epara.models.store import ModelStore

    try:
        profile = load_profile(args.profile)
        if args.python:
            profile = replace(profile, python=args.python,
                              python_bin=f"/usr/bin/python{args.python}")
        summary = build_bundle(
            profile, ModelStore(args.store), out=args.out,
            models=[m for m in args.models.split(",") if m] if args.models is not None
            else None, cluster=args.cluster, with_extras=args.with_extras,
            extra_wheels=args.extra_wheel, node_flags=args.node_flag,
            allow_lead=args.allow_lead)
    except (BundleError, ProfileError) as exc:
        print(f"epara: {exc}", file=sys.stderr)
        return 1
    print(summary.describe())
    return 0


def _run(args: argparse.Namespace, bundle: Path | None, install_args: list[str]) -> int:
    from epara.firmware.flash import FlashError, run_local, run_ssh

    try:
        if args.ssh:
            target = SshTarget(args.ssh, args.ssh_port, args.ssh_identity,
                               tuple(args.ssh_option))
            return run_ssh(target, bundle, install_args, args.target_root)
        return run_local(bundle, ["--root", str(args.root or "/"), *install_args])
    except FlashError as exc:
        print(f"epara: {exc}", file=sys.stderr)
        return 1


def _cmd_flash(args: argparse.Namespace) -> int:
    extra = ["--mode", args.mode] + (["--node-id", args.node_id] if args.node_id else [])
    return _run(args, args.bundle, extra)


def _cmd_upgrade(args: argparse.Namespace) -> int:
    extra = ["--upgrade", "--health-timeout", str(args.health_timeout)]
    if args.restart_command:
        extra += ["--restart-command", args.restart_command]
    if args.socket:
        extra += ["--socket", args.socket]
    return _run(args, args.bundle, extra)


def _cmd_uninstall(args: argparse.Namespace) -> int:
    return _run(args, None, ["--uninstall", *(["--purge"] if args.purge else [])])
