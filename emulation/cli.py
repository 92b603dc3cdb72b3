"""``switchml-switch``: run the software switch with its controller, deploy to a P4 switch, read
counters, or wait until a controller answers.

The one command-line home of all four: flags, signals and exit codes live here; the work is
the library's (``emulation.runner``, ``switchml.deploy``, ``switchml.control``).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from switchml import defaults
from switchml.errors import SwitchMLError
from switchml.extras import MissingExtra
from switchml.native import DATAPLANES, ENV_VAR, NativeUnavailable
from switchml.pipeline import parse_drop_probability
from switchml.protocol import K_TO_SIZE

log = logging.getLogger("switchml.switch")



def _advertised(text: str) -> tuple[str, int | None]:
    """``IP[:PORT]`` of --advertise-address; a wildcard address is refused (workers cannot send to it)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, ""
    try:
        parsed = (host, int(port) if port else None)
        if parsed[1] is not None and not 0 < parsed[1] < 65536:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected IP[:PORT]") from None
    if host in ("0.0.0.0", "::", ""):
        raise argparse.ArgumentTypeError(f"{text!r} is a wildcard address: workers need one they can send to")
    return parsed


def _add_secret_flags(parser: argparse.ArgumentParser, server: bool) -> None:
    """--secret-file (and a server's --insecure): the control channel's security, docs/security.md."""
    parser.add_argument("--secret-file", metavar="FILE", default=None,
                        help="file holding the cluster secret that authenticates and encrypts the control channel "
                        f"(CurveZMQ); default: ${defaults.SECRET_ENV}, else the file ${defaults.SECRET_FILE_ENV} names")
    if server:
        parser.add_argument("--insecure", action="store_true",
                            help="run the control channel open (no secret) even where other hosts can reach it; "
                            "without a secret the controller otherwise binds only loopback addresses")


def _add_tls_client_flags(parser: argparse.ArgumentParser, whose: str) -> None:
    """--tls-ca, --tls-cert, --tls-key, --tls-server-name: P4Runtime over TLS, as a client."""
    parser.add_argument("--tls-ca", metavar="PEM", default=None,
                        help=f"{whose} P4Runtime over TLS: the CA (or self-signed certificate) that signed the "
                        "switch's certificate (default: plain text)")
    parser.add_argument("--tls-cert", metavar="PEM", default=None,
                        help="client certificate for mutual TLS (with --tls-key)")
    parser.add_argument("--tls-key", metavar="PEM", default=None, help="private key of --tls-cert")
    parser.add_argument("--tls-server-name", metavar="NAME", default=None,
                        help="the name the switch's certificate must carry (default: the host dialled)")


def _leaf_spec(text: str):
    """--leaf's value as an ``emulation.tree.LeafSpec`` (errors name the field)."""
    from emulation.tree import parse_leaf_spec

    try:
        return parse_leaf_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rack_sizes(text: str) -> list[int]:
    """--rack-sizes' value: positive ints, comma-separated."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"--rack-sizes {text!r}: expected ranks per leaf as N,N,... (each >= 1)")
    return sizes


def _tls_client(args: argparse.Namespace):
    """The client ``TLSFiles`` of --tls-* flags, or None (plain text) without any."""
    from switchml.security import TLSFiles

    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return TLSFiles(args.tls_cert, args.tls_key, args.tls_ca, args.tls_server_name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchml-switch",
        description="Run the switchml software switch and its controller, or query a running one.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    emu = sub.add_parser("emulate", help="run the software switch and the controller until interrupted",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    emu.add_argument("--host", default=defaults.SWITCH_HOST, help="address the switch and controller listen on")
    emu.add_argument("--port", type=int, default=defaults.SWITCH_PORT, help="UDP port of the switch's data plane")
    emu.add_argument("--advertise-address", type=_advertised, default=None, metavar="IP[:PORT]",
                     help="the address workers are told to send their packets to (as deploy's --switch-address); "
                     "needed with a wildcard --host such as 0.0.0.0 when workers run on other hosts "
                     "(default: --host and --port)")
    emu.add_argument("--control-port", type=int, default=defaults.CONTROL_PORT, help="ZeroMQ port of the controller")
    emu.add_argument("--pool-size", type=int, default=defaults.POOL_SIZE, help="slots in the switch, all jobs together")
    emu.add_argument("--window", type=int, default=defaults.WINDOW, help="slots each job gets (the workers' window)")
    emu.add_argument("-k", "--elements-per-packet", dest="k", type=int, default=defaults.K, choices=sorted(K_TO_SIZE),
                     help="elements per packet handed to jobs")
    emu.add_argument("--drop-probability", type=parse_drop_probability, default=0.0,
                     help="emulated loss on every port, both directions, as a fraction (0.01 = 1%%)")
    emu.add_argument("--heartbeat-timeout", type=float, default=defaults.HEARTBEAT_TIMEOUT_S,
                     help="seconds without a heartbeat after which a job fails and its slots are freed")
    emu.add_argument("--seed", type=int, default=None, help="seed of the loss generator")
    emu.add_argument("--p4runtime-port", type=int, nargs="?", const=defaults.P4RUNTIME_PORT, default=None,
                     metavar="PORT", help="also serve P4Runtime on this port (alone: %(const)s; 0: any free port) "
                     "and let the controller program the switch through it, as it programs BMv2 and Tofino "
                     "(default: in-process)")
    emu.add_argument("--device-id", type=int, default=0, help="P4Runtime device id of the switch")
    emu.add_argument("--no-controller", action="store_true",
                     help="run the switch and its P4Runtime server only; a controller elsewhere programs it "
                     "(switchml-switch deploy --target emulator)")
    emu.add_argument("--dataplane", choices=DATAPLANES, default=None,
                     help="the switch's data path: native (C extension: batched UDP, GIL released) or python "
                     "(the reference); default: native where the extension is built, else python "
                     f"(or ${ENV_VAR})")
    emu.add_argument("--leaf-role", action="store_true",
                     help="serve P4Runtime with the leaf role's upstream table, so that the controller of a tree "
                     "(elsewhere, with --no-controller) can make this switch a leaf of a spine; needs "
                     "--p4runtime-port (docs/hierarchy.md)")
    emu.add_argument("--leaf", dest="leaves", action="append", type=_leaf_spec, default=None, metavar="SPEC",
                     help="make this switch the spine of a tree: its controller programs the leaf switch SPEC "
                     "(started with --no-controller --p4runtime-port P --leaf-role, or BMv2 set up by deploy "
                     "--target bmv2 --leaf-role) over P4Runtime, and every job spans the racks of its ranks "
                     "(docs/hierarchy.md); repeat per leaf. SPEC is "
                     "p4runtime=HOST:PORT|unix:PATH,data=IP:PORT[,uplink=IP:PORT][,hosts=IP+IP+...]"
                     "[,kind=software|bmv2][,ports=FILE]: the leaf's P4Runtime and data addresses, its address as "
                     "this spine sees it (default: data), its rack's worker IPs, which place ranks unless "
                     "--rack-sizes does, what it is (bmv2: k = 64 only, run with -k 64) and, for a P4 leaf, its "
                     "port map: its port and MAC of each rack worker's IP and of this spine's IP (deploy --ports's "
                     "format)")
    emu.add_argument("--rack-sizes", type=_rack_sizes, default=None, metavar="N,N,...",
                     help="with --leaf: ranks 0..N1-1 under the first leaf, the next N2 under the second, ... "
                     "(instead of each --leaf's hosts=)")
    emu.add_argument("--threads", type=int, default=1,
                     help="native data path: threads receiving on the switch's socket")
    emu.add_argument("--p4runtime-tls-cert", metavar="PEM", default=None,
                     help="serve P4Runtime over TLS with this certificate (with --p4runtime-tls-key)")
    emu.add_argument("--p4runtime-tls-key", metavar="PEM", default=None, help="private key of --p4runtime-tls-cert")
    emu.add_argument("--p4runtime-tls-client-ca", metavar="PEM", default=None,
                     help="mutual TLS: refuse P4Runtime clients without a certificate signed by this CA")
    _add_tls_client_flags(emu, "this switch's own controller speaks")
    _add_secret_flags(emu, server=True)
    emu.add_argument("-v", "--verbose", action="store_true", help="log every control event")

    dep = sub.add_parser("deploy", help="push switchml to a P4Runtime switch (BMv2, Tofino, the software switch) "
                         "and run the controller against it until interrupted (docs/deploy.md)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    dep.add_argument("--target", required=True, choices=("bmv2", "tofino", "emulator"), help="kind of switch")
    dep.add_argument("--grpc", required=True, metavar="HOST:PORT", help="the switch's P4Runtime gRPC address")
    dep.add_argument("--device-id", type=int, default=0, help="P4Runtime device id (simple_switch_grpc --device-id)")
    dep.add_argument("--election-id", type=int, default=1, help="this controller's election id (must be highest)")
    dep.add_argument("--p4info", help="P4Info file (default: p4/switchml_v1model.p4info.txtpb, or p4c's with --compile)")
    dep.add_argument("--config", help="device config to push: BMv2 JSON, or the Tofino pipeline binary")
    dep.add_argument("--compile", action="store_true", help="bmv2: compile p4/switchml_v1model.p4 with p4c-bm2-ss")
    dep.add_argument("--build-dir", default="build/p4", help="where --compile writes the JSON and P4Info")
    dep.add_argument("--no-push", action="store_true", help="do not push a pipeline: the switch runs it already")
    dep.add_argument("--ports", help="host IP -> switch port and MAC (JSON or CSV ip,port,mac); needed for bmv2 "
                     "and tofino")
    dep.add_argument("--switch-address", default=None, metavar="IP[:PORT]",
                     help="the address workers send their packets to (needed for bmv2 and tofino; emulator: "
                     f"{defaults.SWITCH_HOST}:{defaults.SWITCH_PORT})")
    dep.add_argument("--control-host", default="*", help="address the controller's ZeroMQ socket binds")
    dep.add_argument("--control-port", type=int, default=defaults.CONTROL_PORT, help="ZeroMQ port of the controller")
    dep.add_argument("--pool-size", type=int, default=None,
                     help="slots the controller hands out (default: the P4 program's, from its counter sizes)")
    dep.add_argument("--window", type=int, default=defaults.WINDOW, help="slots each job gets")
    dep.add_argument("-k", "--elements-per-packet", dest="k", type=int, default=None,
                     help=f"elements per packet (P4 targets: 64; emulator default {defaults.K})")
    dep.add_argument("--drop-probability", type=parse_drop_probability, default=0.0,
                     help="emulated loss: program the switch's loss table to drop this fraction of the packets "
                     "arriving on every port of --ports (P4 programs drop on ingress)")
    dep.add_argument("--leaf-role", action="store_true",
                     help="bmv2: set the switch up as a leaf of a two-level tree: push the leaf build "
                     "(-DSWITCHML_LEAF_ROLE; with --compile it is compiled so), program forwarding from --ports (its "
                     "rack's hosts and the spine's IP) and the loss table, then exit: the spine's controller "
                     "(emulate --leaf ...,kind=bmv2) programs its jobs (docs/hierarchy.md)")
    dep.add_argument("--timeout", type=float, default=10.0, help="deadline of each P4Runtime call, in seconds")
    _add_tls_client_flags(dep, "the controller speaks")
    _add_secret_flags(dep, server=True)
    dep.add_argument("-v", "--verbose", action="store_true", help="log every control event")

    stats = sub.add_parser("stats", help="print a running switch's counters and jobs as JSON")
    stats.add_argument("--controller", default=defaults.CONTROLLER, help="the controller's ZeroMQ endpoint")
    stats.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    _add_secret_flags(stats, server=False)

    wait = sub.add_parser("wait", help="wait until a controller answers, then exit 0 (for scripts that start a "
                          "switch and then its workers)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    wait.add_argument("--controller", default=defaults.CONTROLLER, help="the controller's ZeroMQ endpoint")
    wait.add_argument("--timeout", type=float, default=30.0, help="seconds to keep asking before exit code 1")
    _add_secret_flags(wait, server=False)
    return parser


def run_until_signalled(stop: threading.Event | None = None, ready: threading.Event | None = None) -> None:
    """Block until SIGINT or SIGTERM (handled only in the main thread) or until ``stop`` is set.

    ``ready`` is set once the handlers are in place, i.e. when the caller's service is up.
    """
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    if ready is not None:
        ready.set()
    stop.wait()


def emulate(args: argparse.Namespace, ready: threading.Event | None = None, stop: threading.Event | None = None) -> None:
    """Run switch and controller until SIGINT/SIGTERM (or ``stop`` is set)."""
    from emulation.runner import SoftwareSwitchRunner
    from switchml.security import TLSFiles, read_secret

    if args.no_controller and args.p4runtime_port is None:
        raise OSError("--no-controller needs --p4runtime-port: nothing could program the switch")
    tree = _tree(args)
    server_tls = None
    if args.p4runtime_tls_cert or args.p4runtime_tls_key or args.p4runtime_tls_client_ca:
        if args.p4runtime_port is None:
            raise ValueError("--p4runtime-tls-* need --p4runtime-port: there is no P4Runtime server to secure")
        server_tls = TLSFiles(args.p4runtime_tls_cert, args.p4runtime_tls_key, args.p4runtime_tls_client_ca,
                              flags=("--p4runtime-tls-cert", "--p4runtime-tls-key", "--p4runtime-tls-client-ca"))
    runner = SoftwareSwitchRunner(args.host, args.port, args.control_port, args.pool_size, args.drop_probability,
                                  args.seed, p4runtime_port=args.p4runtime_port, device_id=args.device_id,
                                  with_controller=not args.no_controller, dataplane=args.dataplane,
                                  threads=args.threads, window=args.window, k=args.k,
                                  heartbeat_timeout=args.heartbeat_timeout,
                                  advertise_address=args.advertise_address, p4runtime_tls=server_tls,
                                  controller_tls=_tls_client(args), secret=read_secret(args.secret_file),
                                  insecure=args.insecure, leaf_role=args.leaf_role,
                                  **({"tree": tree} if tree is not None else {}))
    log.info("switchml software switch: data %s:%d, controller %s, k=%d, window %d, pool %d, loss %.4g, %s data path",
             *runner.server.address, runner.endpoint if runner.controller else "none (--no-controller)", args.k,
             args.window, args.pool_size, args.drop_probability, runner.switch.dataplane)
    if runner.controller is not None:
        advertised = runner.controller.options.switch_address
        if advertised[0] in ("0.0.0.0", "::"):
            log.warning("workers are told to send to %s:%d, which only works on this host: workers on other hosts "
                        "will be refused at registration; give --advertise-address an address of this host they "
                        "can reach", *advertised)
        elif advertised != runner.server.address:
            log.info("workers are told to send to %s:%d", *advertised)
    if runner.p4runtime is not None:
        log.info("P4Runtime: %s, device %d", runner.p4runtime.grpc_address, args.device_id)
    if tree is not None:
        log.info("spine of a tree of %d leaves: %s", len(tree.leaves),
                 ", ".join(f"{leaf.address[0]}:{leaf.address[1]}" for leaf in tree.leaves))
    try:
        run_until_signalled(stop, ready)
    finally:
        runner.stop()
        for leaf in tree.leaves if tree is not None else ():
            leaf.target.close()
        drops = {k: v for k, v in runner.switch.drops().items() if v}
        log.info("stopped; drops by reason: %s", drops or "none")


def _tree(args: argparse.Namespace):
    """The ``switchml.tree.Tree`` of --leaf and --rack-sizes (its leaves connected), or None."""
    if args.rack_sizes and not args.leaves:
        raise ValueError("--rack-sizes needs --leaf: it places ranks under leaf switches")
    if not args.leaves:
        return None
    if args.no_controller:
        raise ValueError("--leaf needs this switch's controller (it programs the leaves): drop --no-controller")
    if args.rack_sizes and len(args.rack_sizes) != len(args.leaves):
        raise ValueError(f"--rack-sizes {','.join(map(str, args.rack_sizes))}: {len(args.rack_sizes)} racks for "
                         f"{len(args.leaves)} --leaf switches; expected one size per leaf")
    from emulation.tree import connect_leaves, racks_of_sizes
    from switchml.tree import Tree

    leaves = connect_leaves(args.leaves, _tls_client(args))
    try:
        return Tree(leaves, racks_of_sizes(args.rack_sizes) if args.rack_sizes else None)
    except ValueError:
        for leaf in leaves:
            leaf.target.close()
        raise


def deploy_plan(args: argparse.Namespace):
    """``deploy``'s flags as a typed ``switchml.deploy.DeployPlan`` (compiles with --compile)."""
    from switchml.deploy import make_plan
    from switchml.security import read_secret

    return make_plan(args.target, args.grpc, device_id=args.device_id, election_id=args.election_id,
                     p4info=args.p4info, config=args.config, compile=args.compile, build_dir=args.build_dir,
                     no_push=args.no_push, ports=args.ports, switch_address=args.switch_address,
                     control_host=args.control_host, control_port=args.control_port, pool_size=args.pool_size,
                     window=args.window, k=args.k, drop_probability=args.drop_probability, timeout=args.timeout,
                     tls=_tls_client(args), secret=read_secret(args.secret_file), insecure=args.insecure,
                     leaf_role=args.leaf_role)


def deploy(args: argparse.Namespace, ready: threading.Event | None = None, stop: threading.Event | None = None) -> None:
    """Deploy to a P4Runtime switch and run its controller until SIGINT/SIGTERM (or ``stop`` is set);
    with --leaf-role, set the leaf up and return (the spine's controller programs it from then on)."""
    from switchml.deploy import deploy as start
    from switchml.deploy import program_switch

    plan = deploy_plan(args)
    if plan.leaf_role:
        program_switch(plan).close()
        log.info("leaf set up on %s: the leaf build, forwarding for %d hosts; its spine's controller (emulate "
                 "--leaf p4runtime=%s,...,kind=bmv2) programs its jobs", plan.grpc, len(plan.hosts), plan.grpc)
        return
    with start(plan):
        run_until_signalled(stop, ready)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "emulate":
        try:
            emulate(args)
        except (OSError, ValueError, NativeUnavailable, MissingExtra, SwitchMLError) as exc:
            # ValueError: a bad secret or TLS file; SwitchMLError: a --leaf not reachable over P4Runtime
            print(f"switchml-switch: cannot start: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "deploy":
        try:
            deploy(args)
        except SwitchMLError as exc:  # switchml.deploy.DeployError among them
            print(f"switchml-switch deploy: {exc}", file=sys.stderr)
            return 1
        except (OSError, ValueError, MissingExtra) as exc:
            print(f"switchml-switch deploy: cannot start: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "stats":
        from switchml.control import ControlClient
        from switchml.messages import Stats
        from switchml.security import read_secret

        try:
            client = ControlClient(args.controller, args.timeout, secret=read_secret(args.secret_file))
            answer = client.request(Stats())
        except (SwitchMLError, ValueError) as exc:
            print(f"switchml-switch stats: {exc}", file=sys.stderr)
            return 1
        client.close()
        print(json.dumps({"jobs": answer.jobs, "counters": answer.counters}, indent=2))
        return 0
    if args.command == "wait":
        from emulation.spawn import wait_until_ready
        from switchml.security import read_secret

        try:
            answer = wait_until_ready(args.controller, None, args.timeout, secret=read_secret(args.secret_file))
        except (SwitchMLError, ValueError) as exc:
            print(f"switchml-switch wait: {exc}", file=sys.stderr)
            return 1
        print(f"controller {args.controller} ready: switch data address {answer.switch[0]}:{answer.switch[1]}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
