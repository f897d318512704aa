"""The `veil` command line: the lab today; agent, ca, status and check as they land."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from veil.core.spiffe import DEFAULT_TRUST_DOMAIN
from veil.lab.errors import LabError
from veil.lab.manifests import ManifestError
from veil.runtime.config import (
    CA_SERVER_NAME,
    AgentConfig,
    CaConfig,
    default_workers,
    parse_hostport,
)
from veil.runtime.fdlimit import raise_open_files
from veil.runtime.heap import keep_heap

LEVELS = ("debug", "info", "warning", "error")
try:
    VERSION = importlib.metadata.version("veil")
except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing
    VERSION = "dev"
KUBECONFIG_HELP = (
    "read cluster state from the Kubernetes API: a kubeconfig file, or `in-cluster` for the "
    "pod's service account (instead of --state-dir)"
)


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
    up.add_argument(
        "--node-cidr-mask-size",
        type=int,
        default=24,
        metavar="BITS",
        help="prefix length of each node's pod range in 10.244.0.0/16, as Kubernetes' "
        "option of that name (default 24: room for 245 pods a node; 23: 501; 22: 1013)",
    )
    up.add_argument("--name", help=name_help)
    up.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for pods to become ready"
    )
    up.add_argument(
        "--capture",
        action="append",
        default=[],
        metavar="[NODE=]MODE",
        help="capture mode, iptables (default) or ebpf, for every node or one (repeatable)",
    )
    up.add_argument(
        "--agent-workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes of every node's agent (default 1: the lab's nodes share this "
        "machine's cores)",
    )
    up.add_argument(
        "--cert-ttl",
        type=int,
        metavar="SECONDS",
        help="lifetime of workload certificates (default 24 h)",
    )
    up.add_argument(
        "--kubernetes",
        action="store_true",
        help="on the upstream control plane (make upstream builds it): the manifests applied "
        "with kubectl, the lab as each node's kubelet, Veil reading the API",
    )
    up.add_argument(
        "--chart",
        action="store_true",
        help="with --kubernetes: install Veil with its Helm chart (deploy/chart/veil), so the "
        "kubelets run the agent DaemonSet, the CA and the controller",
    )

    kc = labsub.add_parser("kubectl", help="kubectl as the lab's admin (kubernetes mode)")
    kc.add_argument("--name", help=name_help)
    kc.epilog = "kubectl's arguments follow `--`: veil lab kubectl -- get nodes"
    kcfg = labsub.add_parser("kubeconfig", help="print the admin kubeconfig (kubernetes mode)")
    kcfg.add_argument("--name", help=name_help)

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
    ex.epilog = "the command follows `--`; options (-n, --name) go anywhere before it"

    chk = sub.add_parser("check", help="can this machine run the lab and each capture mode?")
    chk.add_argument("--no-ebpf", action="store_true", help="skip the eBPF checks")

    st_cmd = sub.add_parser("status", help="per node: agent, enrolled pods, tunnels, identities")
    st_cmd.add_argument("--name", help="lab name (default: $VEIL_LAB or 'lab')")
    st_cmd.add_argument("-o", "--output", choices=["text", "json"], default="text")

    authz = sub.add_parser("authz", help="authorization policy tools")
    authz_sub = authz.add_subparsers(dest="authz_command", required=True)
    check = authz_sub.add_parser("check", help="what the live policies decide, and why")
    check.add_argument("--from", dest="source", required=True, help="source pod")
    check.add_argument("-n", "--namespace", default="default", help="the source pod's namespace")
    check.add_argument(
        "--to", dest="target", required=True, help="<service[.ns]|pod[.ns]|ip>:<port>"
    )
    check.add_argument("--name", help="lab name (default: $VEIL_LAB or 'lab')")

    ca = sub.add_parser("ca", help="run the mesh certificate authority")
    ca.add_argument(
        "--state-dir",
        type=Path,
        help="cluster state directory to authorize against (the lab's manifest mode)",
    )
    ca.add_argument("--kubeconfig", help=KUBECONFIG_HELP)
    ca.add_argument(
        "--agent-service-account",
        default="veil-system/veil-agent",
        help="namespace/name of the agents' service account: its pod-bound tokens may obtain "
        "the identities of workloads on their node (Kubernetes; TokenReview)",
    )
    ca.add_argument(
        "--ca-secret",
        help="namespace/name of a Secret holding the self-signed root and key (Kubernetes; made "
        "on the first start, shared by replicas); the trust bundle is published beside it as "
        "ConfigMap veil-ca-root",
    )
    ca.add_argument(
        "--data-dir",
        type=Path,
        required=True,
        help="where a self-signed root is kept (ca-key.pem mode 0600)",
    )
    ca.add_argument(
        "--node-tokens",
        type=Path,
        help="node bootstrap credentials (hashes), as `veil lab up` writes them (on "
        "Kubernetes, agents and waypoints use projected tokens: TokenReview)",
    )
    ca.add_argument(
        "--plugin-certs",
        type=Path,
        help="operator CA: ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem",
    )
    ca.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    ca.add_argument("--listen", default="0.0.0.0:15012")
    ca.add_argument("--metrics-listen", default="0.0.0.0:15014")
    ca.add_argument("--ttl", type=int, default=24 * 3600, help="leaf lifetime in seconds")
    ca.add_argument("--server-name", default=CA_SERVER_NAME)
    ca.add_argument("--log-level", default="info", choices=LEVELS)

    ag = sub.add_parser("agent", help="run the node agent")
    ag.add_argument("--node", required=True, help="the node this agent runs on")
    ag.add_argument(
        "--state-dir", type=Path, help="cluster state directory (the lab's manifest mode)"
    )
    ag.add_argument("--kubeconfig", help=KUBECONFIG_HELP)
    ag.add_argument("--ca-address", default="veil-ca.veil-system.svc:15012")
    ag.add_argument("--ca-server-name", default=CA_SERVER_NAME)
    ag.add_argument("--ca-root", type=Path, required=True, help="CA trust anchor (PEM)")
    ag.add_argument("--token-file", type=Path, required=True, help="node credential")
    ag.add_argument(
        "--data-dir",
        type=Path,
        default=Path("/var/run/veil/agent"),
        help="where the agent keeps its registry of enrolled pods",
    )
    ag.add_argument(
        "--cni-socket",
        type=Path,
        default=Path("/var/run/veil/cni.sock"),
        help="unix socket veil-cni talks to",
    )
    ag.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    ag.add_argument(
        "--capture",
        choices=["iptables", "ebpf"],
        default="iptables",
        help="how pod traffic is redirected to the agent (default iptables)",
    )
    ag.add_argument(
        "--bpf-pin-dir",
        type=Path,
        default=Path("/sys/fs/bpf/veil"),
        help="where eBPF capture pins its maps (a restarted agent reopens them)",
    )
    ag.add_argument(
        "--host-proc",
        type=Path,
        default=Path("/proc"),
        help="the node's /proc, where a running pod is found by its cgroup (a DaemonSet "
        "pod mounts it read-only, e.g. at /host/proc)",
    )
    ag.add_argument(
        "--cni-bin-dir",
        type=Path,
        help="install veil-cni on the node: the host's CNI bin dir as mounted here "
        "(with --cni-conf-dir; a DaemonSet pod)",
    )
    ag.add_argument(
        "--cni-conf-dir",
        type=Path,
        help="the host's CNI config dir as mounted here: veil-cni is chained into the primary "
        "CNI's list and kept there",
    )
    ag.add_argument(
        "--cni-host-socket",
        help="agentSocket in the chained entry: the CNI socket's path on the host "
        "(default: --cni-socket)",
    )
    ag.add_argument(
        "--cni-exclude-namespaces",
        default="kube-system",
        help="comma-separated namespaces whose pods veil-cni lets through without the agent",
    )
    ag.add_argument(
        "--daemonset",
        help="namespace/name of the agent's DaemonSet: stopping after it was deleted (helm "
        "uninstall) releases every pod and removes veil-cni from the node",
    )
    ag.add_argument(
        "--handover-wait",
        type=float,
        default=20.0,
        help="on SIGTERM, seconds to keep serving while a new agent comes to take the pods' "
        "listeners over (SIGINT stops at once)",
    )
    ag.add_argument(
        "--drain",
        type=float,
        default=30.0,
        help="after handing over, seconds the connections in hand may take to finish",
    )
    ag.add_argument(
        "--workers",
        default="auto",
        help="processes that serve the pods' traffic: a number (1: the agent itself), or "
        "auto, one per core the agent may use, at most --max-workers (default auto)",
    )
    ag.add_argument(
        "--max-workers",
        type=int,
        default=8,
        help="the most workers auto starts (default 8): each costs ~40 MB and one set of "
        "tunnels to every peer",
    )
    ag.add_argument("--admin-listen", default="127.0.0.1:15000")
    ag.add_argument("--metrics-listen", default="0.0.0.0:15020")
    ag.add_argument("--ready-listen", default="0.0.0.0:15021")
    ag.add_argument("--log-level", default="info", choices=LEVELS)

    mig = sub.add_parser(
        "migrate",
        help="convert Istio ambient manifests (labels, security.istio.io policies, the "
        "waypoint class) to Veil's; the result on stdout, what changed on stderr",
    )
    mig.add_argument(
        "-f", "--filename", action="append", required=True, help="a file, a directory or -"
    )

    ctl = sub.add_parser(
        "controller", help="run the waypoint controller (Gateways of class veil-waypoint)"
    )
    ctl.add_argument("--kubeconfig", required=True, help=KUBECONFIG_HELP)
    ctl.add_argument(
        "--image", default=f"ghcr.io/veil-dev/veil:{VERSION}", help="the waypoints' image"
    )
    ctl.add_argument("--ca-address", default="veil-ca.veil-system.svc:15012")
    ctl.add_argument("--trust-bundle", type=Path, help="the CA's roots (PEM) for waypoints")
    ctl.add_argument(
        "--trust-configmap",
        help="or namespace/name of the ConfigMap the CA publishes them in (veil-ca-root)",
    )
    ctl.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    ctl.add_argument("--log-level", default="info", choices=LEVELS)

    wp = sub.add_parser("waypoint", help="run a namespace's L7 waypoint (a Gateway's pod)")
    wp.add_argument("--gateway", required=True, help="the Gateway (class veil-waypoint) served")
    wp.add_argument("--namespace", required=True)
    env = os.environ.get
    wp.add_argument("--state-dir", type=Path, default=env("VEIL_STATE_DIR"))
    wp.add_argument("--kubeconfig", default=env("VEIL_KUBECONFIG"), help=KUBECONFIG_HELP)
    wp.add_argument("--ca-address", default=env("VEIL_CA_ADDRESS", "veil-ca.veil-system.svc:15012"))
    wp.add_argument("--ca-root", type=Path, default=env("VEIL_CA_ROOT"))
    wp.add_argument(
        "--token-file", type=Path, default=env("VEIL_TOKEN_FILE"), help="the pod's own credential"
    )
    wp.add_argument("--trust-domain", default=env("VEIL_TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN))
    wp.add_argument(
        "--path-normalization",
        default=env("VEIL_PATH_NORMALIZATION", "MERGE_SLASHES"),
        choices=["NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"],
        help="how request paths are normalized before policy and routing (Istio's options)",
    )
    wp.add_argument("--log-level", default="info", choices=LEVELS)

    lb = labsub.add_parser("label", help="set (k=v) or remove (k-) labels of a namespace or pod")
    lb.add_argument("kind", choices=["namespace", "ns", "pod", "po"])
    lb.add_argument("object", help="namespace or pod name")
    lb.add_argument("changes", nargs="+", help="key=value or key-")
    lb.add_argument("-n", "--namespace", help="the pod's namespace")
    lb.add_argument("--name", help=name_help)

    ap = labsub.add_parser("apply", help="add or replace policies, gateways, routes at runtime")
    ap.add_argument("-f", "--filename", action="append", required=True)
    ap.add_argument("--name", help=name_help)

    de = labsub.add_parser("delete", help="remove a policy, gateway or route")
    de.add_argument("kind", help="e.g. authorizationpolicy")
    de.add_argument("object")
    de.add_argument("-n", "--namespace")
    de.add_argument("--name", help=name_help)

    ag_ctl = labsub.add_parser(
        "agent",
        help="stop (SIGKILL) or start a node's agent, or restart it with a hand-over "
        "(kill -TERM: the next agent takes its pods' listeners, no connection reset)",
    )
    ag_ctl.add_argument("action", choices=["stop", "start", "restart"])
    ag_ctl.add_argument("node")
    ag_ctl.add_argument("--name", help=name_help)
    ag_ctl.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="start: one more environment variable for the agent (repeatable), e.g. "
        "LD_PRELOAD=...libfaketime.so.1 to move its clock",
    )

    echo = sub.add_parser("echo", help="HTTP echo workload for examples")
    echo.add_argument("--port", type=int, default=8080)
    echo.add_argument("--host", default="0.0.0.0")
    echo.add_argument(
        "--tcp-port", type=int, help="also a TCP echo: every read answered with the pod's name"
    )
    echo.add_argument(
        "--grpc-port",
        type=int,
        help="also HTTP/2 (h2c): gRPC calls of Istio's echo service and plain HTTP/2 requests",
    )
    echo.add_argument(
        "--ext-authz-port",
        type=int,
        help="also the HTTP check of Istio's sample ext_authz server (x-ext-authz: allow)",
    )
    return p


def migrate_command(paths: Sequence[str]) -> int:
    import yaml  # noqa: PLC0415

    from veil.core.migrate import migrate  # noqa: PLC0415

    docs: list[object] = []
    try:
        for p in paths:
            if p == "-":
                docs += list(yaml.safe_load_all(sys.stdin))
                continue
            path = Path(p)
            files = (
                sorted(f for f in path.iterdir() if f.suffix in (".yaml", ".yml"))
                if path.is_dir()
                else [path]
            )
            for f in files:
                docs += list(yaml.safe_load_all(f.read_text()))
    except (OSError, yaml.YAMLError) as e:
        print(f"veil migrate: {e}", file=sys.stderr)
        return 1
    result = migrate(d for d in docs if isinstance(d, dict))
    for note in result.notes:
        print(f"# veil migrate: {note}", file=sys.stderr)
    sys.stdout.write(yaml.safe_dump_all(result.objects, sort_keys=False))
    return 0


def agent_config(args: argparse.Namespace) -> AgentConfig:
    """`veil agent`'s options as its config (ValueError on a bad value)."""
    return AgentConfig(
        node=args.node,
        state_dir=args.state_dir,
        ca_address=parse_hostport(args.ca_address, 15012),
        ca_server_name=args.ca_server_name,
        ca_root=args.ca_root,
        token_file=args.token_file,
        data_dir=args.data_dir,
        cni_socket=args.cni_socket,
        trust_domain=args.trust_domain,
        admin_listen=parse_hostport(args.admin_listen),
        metrics_listen=parse_hostport(args.metrics_listen),
        ready_listen=parse_hostport(args.ready_listen),
        capture=args.capture,
        bpf_pin_dir=args.bpf_pin_dir,
        kubeconfig=args.kubeconfig,
        host_proc=args.host_proc,
        handover_wait=args.handover_wait,
        drain=args.drain,
        cni_bin_dir=args.cni_bin_dir,
        cni_conf_dir=args.cni_conf_dir,
        cni_host_socket=args.cni_host_socket,
        cni_exclude_namespaces=tuple(
            n.strip() for n in args.cni_exclude_namespaces.split(",") if n.strip()
        ),
        daemonset=args.daemonset,
        workers=parse_workers(args.workers, args.max_workers),
    )


def parse_workers(value: str, cap: int) -> int:
    """`--workers`: a number, or auto (one per usable core, at most `cap`)."""
    if value == "auto":
        if cap < 1:
            raise ValueError(f"--max-workers {cap}: use 1 or more")
        return default_workers(cap)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--workers {value!r}: a number or auto") from None


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` is a command to run (`veil lab exec POD -n NS -- cmd`),
    # never options of ours: split it off before parsing, as kubectl does.
    command: list[str] | None = None
    if "--" in words:
        cut = words.index("--")
        words, command = words[:cut], words[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(words)
    if getattr(args, "lab_command", None) == "exec":
        if not command:
            parser.error("lab exec: give the command after `--`: veil lab exec POD [-n NS] -- CMD")
        args.argv = command
    elif getattr(args, "lab_command", None) == "kubectl":
        args.argv = command or []
    elif command is not None:
        parser.error(
            f"unexpected `-- {' '.join(command)}`: only `veil lab exec` and `veil lab kubectl` "
            "take arguments after `--`"
        )
    if args.command in ("ca", "agent", "waypoint", "controller"):
        return run_daemon(args)
    if args.command == "migrate":
        return migrate_command(args.filename)
    if args.command == "echo":
        from veil.lab import echo  # noqa: PLC0415 - keep `veil lab` start-up free of trio

        echo.main(args.port, args.host, args.tcp_port, args.grpc_port, args.ext_authz_port)
        return 0
    if args.command == "check":
        from veil.agent import check as preflight  # noqa: PLC0415
        from veil.lab import upstream  # noqa: PLC0415

        report = preflight.run(ebpf=not args.no_ebpf)
        optional = {"upstream Kubernetes (optional)": [upstream.check()]}
        print(preflight.format_report({**report, **optional}))
        return 0 if all(c.ok for cs in report.values() for c in cs) else 1
    if args.command in ("status", "authz"):
        return run_ops(args)
    from veil.lab import lab  # noqa: PLC0415 - import cost only for the lab commands
    from veil.lab.cgroups import CgroupError  # noqa: PLC0415
    from veil.lab.cni import CniError  # noqa: PLC0415
    from veil.lab.netns import CommandError  # noqa: PLC0415

    try:
        name = _lab_name(getattr(args, "name", None))
        if args.lab_command == "up":
            lab.up(
                args.filename,
                name,
                args.nodes,
                ready_timeout=args.timeout,
                cert_ttl=args.cert_ttl,
                capture=args.capture,
                kubernetes=args.kubernetes or args.chart,
                chart=args.chart,
                node_mask=args.node_cidr_mask_size,
                agent_workers=args.agent_workers,
            )
            print(lab.format_status(lab.status(name)))
        elif args.lab_command == "down":
            if args.all:
                lab.down_all()
            else:
                lab.down(name)
        elif args.lab_command == "status":
            st = lab.status(name)
            print(json.dumps(st, indent=2) if args.output == "json" else lab.format_status(st))
        elif args.lab_command == "apply":
            for ref in lab.apply(name, args.filename):
                print(f"{ref} applied")
        elif args.lab_command == "delete":
            print(f"{lab.delete(name, args.kind, args.object, args.namespace)} deleted")
        elif args.lab_command == "agent":
            from veil.lab import controlplane  # noqa: PLC0415

            if args.action == "restart":
                old, new = controlplane.hand_over_agent(name, args.node)
                print(
                    f"agent {args.node}: pid {old} handed over to pid {new} (it drains, then exits)"
                )
            if args.action == "stop":
                controlplane.stop_agent(name, args.node)
                print(f"agent {args.node}: stopped")
            if args.action == "start":
                if bad := [e for e in args.env if "=" not in e or not e.partition("=")[0]]:
                    raise LabError(f"--env takes KEY=VALUE, not {bad[0]!r}")
                env = dict(e.partition("=")[::2] for e in args.env)
                pid = controlplane.start_agent(
                    name, args.node, lab.spawn, lab.node_netns, extra_env=env
                )
                print(f"agent {args.node}: running (pid {pid}), enrolled pods resumed")
        elif args.lab_command == "label":
            labels = lab.label(name, args.kind, args.object, args.namespace, args.changes)
            print(
                f"{args.kind} {args.object} labels: "
                + (", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "(none)")
            )
        elif args.lab_command == "exec":
            lab.exec_in_pod(name, args.pod, args.namespace, args.argv)
        elif args.lab_command in ("kubectl", "kubeconfig"):
            from veil.lab import controlplane, kubernetes, store  # noqa: PLC0415

            if not (store.read_record(name) or {}).get("kubernetes"):
                raise LabError(
                    f"lab {name!r} runs no Kubernetes control plane (lab up --kubernetes)"
                )
            if args.lab_command == "kubeconfig":
                print((controlplane.kube_dir(name) / "admin.kubeconfig").read_text(), end="")
            else:
                return subprocess.run(
                    kubernetes.kubectl_argv(name, *args.argv), check=False
                ).returncode
    except ManifestError as e:
        print(f"veil: invalid manifest: {e}", file=sys.stderr)
        return 2
    except (LabError, ValueError) as e:
        print(f"veil: {e}", file=sys.stderr)
        return 1
    except (CommandError, CniError, CgroupError) as e:
        print(f"veil: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def run_ops(args: argparse.Namespace) -> int:
    from veil.lab import ops  # noqa: PLC0415

    name = _lab_name(args.name)
    try:
        if args.command == "status":
            nodes = ops.status(name)
            print(
                json.dumps(nodes, indent=2) if args.output == "json" else ops.format_status(nodes)
            )
            return 0 if all(n["agent"] == "ready" for n in nodes) else 1
        what, verdicts = ops.authz_check(name, args.source, args.namespace, args.target)
        print(ops.format_check(f"{args.namespace}/{args.source}", what, verdicts))
        return 0 if verdicts and all(v.decision.allowed for v in verdicts) else 3
    except LabError as e:
        print(f"veil: {e}", file=sys.stderr)
        return 1


def run_daemon(args: argparse.Namespace) -> int:
    import trio  # noqa: PLC0415 - daemons only

    from veil.runtime.lifecycle import configure_logging  # noqa: PLC0415

    configure_logging(args.log_level)
    logging.getLogger("veil.limits").info("open files limit: %d", raise_open_files())
    keep_heap()
    try:
        if args.command == "ca":
            from veil.ca import app as ca_app  # noqa: PLC0415

            cfg = CaConfig(
                state_dir=args.state_dir,
                data_dir=args.data_dir,
                node_tokens=args.node_tokens,
                plugin_certs=args.plugin_certs,
                trust_domain=args.trust_domain,
                listen=parse_hostport(args.listen),
                metrics_listen=parse_hostport(args.metrics_listen),
                ttl_seconds=args.ttl,
                server_name=args.server_name,
                kubeconfig=args.kubeconfig,
                agent_account=args.agent_service_account,
                ca_secret=args.ca_secret,
            )
            trio.run(ca_app.run, cfg)
        elif args.command == "controller":
            from veil.controller import app as controller_app  # noqa: PLC0415

            parse_hostport(args.ca_address)  # a clear error now, not in every waypoint
            trio.run(
                controller_app.run,
                controller_app.ControllerConfig(
                    kubeconfig=args.kubeconfig,
                    image=args.image,
                    ca_address=args.ca_address,
                    trust_bundle=args.trust_bundle,
                    trust_configmap=args.trust_configmap,
                    trust_domain=args.trust_domain,
                ),
            )
        elif args.command == "agent":
            from veil.agent.app import Agent  # noqa: PLC0415

            acfg = agent_config(args)
            trio.run(Agent(acfg).run)
        else:
            from veil.waypoint.app import WaypointConfig, WaypointServer  # noqa: PLC0415
            from veil.waypoint.normalize import PathNormalization  # noqa: PLC0415

            missing = [
                f"--{n.replace('_', '-')}"
                for n in ("ca_root", "token_file")
                if getattr(args, n) is None
            ]
            if missing:
                raise ValueError(f"missing {', '.join(missing)} (or the VEIL_* environment)")
            trio.run(
                WaypointServer(
                    WaypointConfig(
                        gateway=args.gateway,
                        namespace=args.namespace,
                        state_dir=args.state_dir,
                        kubeconfig=args.kubeconfig,
                        ca_address=parse_hostport(args.ca_address, 15012),
                        ca_root=args.ca_root,
                        token_file=args.token_file,
                        trust_domain=args.trust_domain,
                        path_normalization=PathNormalization(args.path_normalization),
                    )
                ).run
            )
    except (ValueError, OSError) as e:
        print(f"veil {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
