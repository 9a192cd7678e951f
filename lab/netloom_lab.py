#!/usr/bin/env python3
"""netloom lab: multi-node labs of systemd containers that Ansible reaches over SSH.

    netloom_lab.py image                      build the node image (once per recipe)
    netloom_lab.py workload-image NAME        build lab/workload_images/NAME (once per recipe)
    netloom_lab.py guest                      build the test VM guest (once per recipe)
    netloom_lab.py up --topology FILE         create/repair the lab, write its inventory
    netloom_lab.py restart --topology FILE --node NAME ...   reboot nodes (systemd shutdown and boot)
    netloom_lab.py down --topology FILE       remove everything the lab made
    netloom_lab.py status [--topology FILE]   nodes, state, SSH ports

Run it with the project's venv python (.venv/bin/python). See lab/README.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import guest_image
import lab_docker  # the lab's modules live next to this script
import lab_image
import lab_topology


def say(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="netloom_lab.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("image", help="build the lab node image unless the engine has the current one")
    workload = commands.add_parser("workload-image", help="build a workload image from "
                                   "lab/workload_images/NAME unless the engine has the current one")
    workload.add_argument("name", help=f"recipe name ({', '.join(lab_image.workload_names())})")
    commands.add_parser("guest", help="build the test VM guest (qcow2, kernel, initrd) unless cached")
    up = commands.add_parser("up", help="bring a lab up (idempotent) and write its Ansible inventory")
    up.add_argument("--topology", type=Path, required=True, help="lab topology YAML (lab/topologies/*.yml)")
    up.add_argument("--inventory-file", type=Path, default=lab_docker.DEFAULT_INVENTORY,
                    help="where to write the Ansible inventory (default: inventory/lab/hosts.yml)")
    up.add_argument("--molecule-instance-config", type=Path,
                    help="also write Molecule's delegated-driver instance config here")
    restart = commands.add_parser("restart", help="reboot nodes, then refresh the inventories")
    restart.add_argument("--topology", type=Path, required=True)
    restart.add_argument("--node", action="append", required=True, help="node to reboot (repeatable)")
    restart.add_argument("--inventory-file", type=Path, default=lab_docker.DEFAULT_INVENTORY)
    restart.add_argument("--molecule-instance-config", type=Path)
    down = commands.add_parser("down", help="remove every container, network and volume of a lab")
    down.add_argument("--topology", type=Path, required=True)
    down.add_argument("--inventory-file", type=Path, default=lab_docker.DEFAULT_INVENTORY,
                      help="inventory to remove if this lab wrote it "
                           "(the lab also removes the others it recorded)")
    show = commands.add_parser("status", help="print the nodes of every lab (or of one)")
    show.add_argument("--topology", type=Path, help="only this lab")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        topology = lab_topology.load(args.topology) if getattr(args, "topology", None) else None
        if args.command == "guest":
            guest = guest_image.ensure_guest(lab_docker.STATE_DIR, say)
            say(f"guest: {guest.directory}")
            return 0
        client = lab_docker.connect()
        if args.command == "image":
            tag = lab_image.ensure_image(client, lab_docker.STATE_DIR, say)
            say(f"image: {tag}")
        elif args.command == "workload-image":
            tag = lab_image.workload_image(args.name, client, lab_docker.STATE_DIR, say)
            say(f"workload image: {tag} (also {tag.rpartition(':')[0]}:latest)")
        elif args.command == "up":
            lab = lab_docker.Lab(client, topology, say)
            lab.up(args.inventory_file.resolve(),
                   args.molecule_instance_config.resolve() if args.molecule_instance_config else None)
            print_status(client, topology.name)
            say(f"{topology.name}: up in {time.monotonic() - started:.1f} s")
        elif args.command == "restart":
            lab_docker.Lab(client, topology, say).restart(
                args.node, args.inventory_file.resolve(),
                args.molecule_instance_config.resolve() if args.molecule_instance_config else None)
            say(f"{topology.name}: restarted {', '.join(args.node)} in {time.monotonic() - started:.1f} s")
        elif args.command == "down":
            lab_docker.Lab(client, topology, say).down(args.inventory_file.resolve())
            say(f"{topology.name}: down in {time.monotonic() - started:.1f} s")
        else:
            print_status(client, topology.name if topology else None)
    except lab_topology.TopologyError as exc:
        print(f"error: topology {args.topology}: {exc}", file=sys.stderr)
        return 2
    except (lab_docker.LabError, lab_image.ImageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def print_status(client, lab: str | None) -> None:
    rows = lab_docker.status(client, lab)
    if not rows:
        say("no lab nodes" + (f" for lab {lab}" if lab else ""))
        return
    header = ("LAB", "NODE", "STATE", "SSH", "ADDRESSES")
    table = [header] + [(row.lab, row.node, row.state, row.ssh, row.addresses) for row in rows]
    widths = [max(len(line[column]) for line in table) for column in range(len(header) - 1)]
    for line in table:
        say("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)) + "  " + line[-1])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
