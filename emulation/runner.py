"""The software switch and its controller together, in this process (threads).

``switchml-switch emulate``, the trainer's local launcher and the tests all start the
switch through this one class.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from emulation.server import SwitchServer
from emulation.switch import SoftwareSwitch
from emulation.target import InProcessTarget
from switchml import defaults
from switchml.controller import Controller, ControllerOptions
from switchml.pipeline import check_drop_probability, supported_k
from switchml.security import TLSFiles
from switchml.targets import SwitchTarget

if TYPE_CHECKING:
    from emulation.p4runtime_server import P4RuntimeServer

log = logging.getLogger(__name__)


class SoftwareSwitchRunner:
    """Starts a ``SoftwareSwitch`` on UDP and a ``Controller`` on ZeroMQ; ``stop()`` ends both.

    Args:
        host: address both listen on.
        port: UDP data port (0: any free port).
        control_port: ZeroMQ port (0: any free port).
        pool_size: slots in the switch.
        drop_probability: emulated loss on every port, both directions (0..1), programmed
            through the target as the loss table's default entry (the loss of every port
            without an entry of its own).
        seed: seed of the loss generator.
        p4runtime_port: None (default): the controller programs the switch in-process
            (``InProcessTarget``). A port (0: any free one): the switch also serves P4Runtime
            there (``emulation.p4runtime_server``) and the controller programs it through
            ``P4RuntimeTarget``, the code path of BMv2 and Tofino.
        device_id: the P4Runtime device id of the switch.
        with_controller: False runs the switch alone (its P4Runtime server then waits for a
            controller elsewhere: ``switchml-switch deploy --target emulator``).
        dataplane: the switch's data path: "native" (C), "python" (the reference) or None
            (native where built; ``switchml.native``).
        threads: native data path only: threads receiving on the switch's socket.
        advertise_address: (ip, port) the controller tells workers to send to, where ``host``
            is not reachable from them (a wildcard such as 0.0.0.0, or behind NAT); a port of
            None is the switch's own. Default: the address the switch is bound to.
        p4runtime_tls: serve P4Runtime over TLS with these files (cert, key; ca: require
            client certificates signed by it). None: plain text.
        controller_tls: the TLS files the controller connects to that server with (ca; cert
            and key for mutual TLS). Default with ``p4runtime_tls``: the server's certificate
            as the CA (a self-signed one), no client certificate.
        leaf_role: serve P4Runtime with the leaf role's upstream table
            (``switchml.p4info.with_leaf_role``), so that a tree's controller can make this switch
            a leaf (docs/hierarchy.md); needs ``p4runtime_port``.
        **options: further ``ControllerOptions`` (window, k, heartbeat_timeout, secret,
            insecure, ...).
    """

    def __init__(self, host: str = defaults.SWITCH_HOST, port: int = defaults.SWITCH_PORT,
                 control_port: int = defaults.CONTROL_PORT, pool_size: int = defaults.POOL_SIZE,
                 drop_probability: float = 0.0, seed: int | None = None, p4runtime_port: int | None = None,
                 device_id: int = 0, with_controller: bool = True, dataplane: str | None = None, threads: int = 1,
                 advertise_address: tuple[str, int | None] | None = None, p4runtime_tls: TLSFiles | None = None,
                 controller_tls: TLSFiles | None = None, leaf_role: bool = False, **options) -> None:
        check_drop_probability(drop_probability)
        if leaf_role and p4runtime_port is None:
            raise ValueError("leaf_role=True needs a p4runtime_port: the leaf role is programmed over P4Runtime "
                             "(--leaf-role needs --p4runtime-port); in-process, any Python data plane has it")
        self.switch = SoftwareSwitch(pool_size=pool_size, seed=seed, dataplane=dataplane)
        self._p4info = None
        if leaf_role:
            from switchml.p4info import with_leaf_role

            self._p4info = with_leaf_role()
        self.server = SwitchServer(self.switch, host, port, threads=threads).start()
        self.p4runtime: P4RuntimeServer | None = None
        self.target: SwitchTarget | None = None
        self.controller: Controller | None = None
        try:
            if p4runtime_port is not None:
                from emulation.p4runtime_server import P4RuntimeServer  # gRPC only when asked for

                self.p4runtime = P4RuntimeServer(self.switch, host, p4runtime_port, device_id, p4info=self._p4info,
                                                 tls=p4runtime_tls).start()
                if p4runtime_tls is not None and controller_tls is None:
                    controller_tls = TLSFiles(ca=p4runtime_tls.cert)
            self._controller_tls = controller_tls
            if with_controller:
                self.target = InProcessTarget(self.switch) if self.p4runtime is None else self.p4runtime_target(device_id)
                if drop_probability:
                    self.target.set_drop_probability(None, drop_probability)
                switch_address = self.server.address
                if advertise_address is not None:
                    # the controller's RESETs go there too: a wrong address fails the first job's
                    # set-up with that address named, rather than stalling its workers
                    switch_address = (advertise_address[0], advertise_address[1] or self.server.address[1])
                self.controller = Controller(self.target, ControllerOptions(
                    bind=f"tcp://{host}:{control_port}", switch_address=switch_address, pool_size=pool_size,
                    **options)).start()
            elif drop_probability:  # no controller: program the loss as a controller would, then let go
                self._program_loss(device_id, drop_probability)
        except Exception:
            self._stop_switch()
            raise

    def _program_loss(self, device_id: int, drop_probability: float) -> None:
        """The loss table's default entry without a controller: over P4Runtime (by a client that
        leaves at once) where the switch serves it, else in-process."""
        if self.p4runtime is None:
            InProcessTarget(self.switch).set_drop_probability(None, drop_probability)
            return
        target = self.p4runtime_target(device_id)
        try:
            target.set_drop_probability(None, drop_probability)
        finally:
            target.close()

    def p4runtime_target(self, device_id: int = 0) -> SwitchTarget:
        """A new ``P4RuntimeTarget`` of this switch's P4Runtime server (with the leaf role's table
        where it serves it), as a controller elsewhere would have; the caller closes it."""
        from switchml.p4runtime_target import P4RuntimeTarget

        if self.p4runtime is None:
            raise ValueError("this software switch serves no P4Runtime (p4runtime_port=None)")
        return P4RuntimeTarget(self.p4runtime.grpc_address, device_id, p4info=self._p4info,
                               supported_k=supported_k(self.switch.sizes), tls=self._controller_tls)

    @property
    def endpoint(self) -> str:
        """The controller's ZeroMQ endpoint, for ``Worker(controller=...)``."""
        return self.controller.endpoint

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
        self._stop_switch()

    def _stop_switch(self) -> None:
        if self.target is not None:
            self.target.close()
        if self.p4runtime is not None:
            self.p4runtime.stop()
        self.server.stop()

    def __enter__(self) -> SoftwareSwitchRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
