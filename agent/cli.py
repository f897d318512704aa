"""The `veil` command line: the lab today; agent, ca, status and check as they land."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from agent.lab.manifests import ManifestError


def _lab_name(value: str | None) -> str:
    return value or os.environ.get("VEIL_LAB", "lab")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="veil", description="Veil: a sidecarless service mesh.")
    sub = p.add_subparsers(dest="command", required=True)

    lab = sub.add_parser("lab", help="a local multi-node cluster in network namespaces")
    labsub = lab.add_subparsers(dest="lab_command", required=True)
    name_help = "lab name (default: $VEIL_LAB or 'lab')"

    up = labsub.add_parser("up", help="create a lab from manifests")
    up.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        help="a manifest file or directory (repeatable)",
    )
    up.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    up.add_argument("--name", help=name_help)
    up.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for pods to become ready"
    )

    down = labsub.add_parser("down", help="remove a lab and everything it created")
    down.add_argument("--name", help=name_help)
    down.add_argument("--all", action="store_true", help="remove every lab on this machine")

    st = labsub.add_parser("status", help="nodes, pods and services of a lab")
    st.add_argument("--name", help=name_help)
    st.add_argument("-o", "--output", choices=["text", "json"], default="text")

    ex = labsub.add_parser("exec", help="run a command in a pod (netns, /etc/hosts, cgroup)")
    ex.add_argument("pod", help="pod name, or deploy/<name>")
    ex.add_argument("-n", "--namespace")
    ex.add_argument("--name", help=name_help)
    ex.add_argument("argv", nargs=argparse.REMAINDER, help="-- command [args...]")

    echo = sub.add_parser("echo", help="HTTP echo workload for examples")
    echo.add_argument("--port", type=int, default=8080)
    echo.add_argument("--host", default="0.0.0.0")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "echo":
        from agent.lab import echo  # noqa: PLC0415 - keep `veil lab` start-up free of trio

        echo.main(args.port, args.host)
        return 0
    from agent.lab import lab  # noqa: PLC0415 - import cost only for the lab commands
    from agent.lab.cgroups import CgroupError  # noqa: PLC0415
    from agent.lab.cni import CniError  # noqa: PLC0415
    from agent.lab.netns import CommandError  # noqa: PLC0415

    try:
        name = _lab_name(getattr(args, "name", None))
        if args.lab_command == "up":
            lab.up(args.filename, name, args.nodes, ready_timeout=args.timeout)
            print(lab.format_status(lab.status(name)))
        elif args.lab_command == "down":
            if args.all:
                lab.down_all()
            else:
                lab.down(name)
        elif args.lab_command == "status":
            st = lab.status(name)
            print(json.dumps(st, indent=2) if args.output == "json" else lab.format_status(st))
        elif args.lab_command == "exec":
            command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            lab.exec_in_pod(name, args.pod, args.namespace, command)
    except ManifestError as e:
        print(f"veil: invalid manifest: {e}", file=sys.stderr)
        return 2
    except (lab.LabError, ValueError) as e:
        print(f"veil: {e}", file=sys.stderr)
        return 1
    except (CommandError, CniError, CgroupError) as e:
        print(f"veil: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
