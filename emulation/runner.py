"""The software switch and its controller together, in this process (threads).

``switchml-switch emulate``, the trainer's local launcher and the tests all start the
switch through this one class.
"""

from __future__ import annotations

import logging

from emulation.server import SwitchServer
from emulation.switch import SoftwareSwitch
from emulation.target import InProcessTarget
from switchml import defaults
from switchml.controller import Controller, ControllerOptions

log = logging.getLogger(__name__)


class SoftwareSwitchRunner:
    """Starts a ``SoftwareSwitch`` on UDP and a ``Controller`` on ZeroMQ; ``stop()`` ends both.

    Args:
        host: address both listen on.
        port: UDP data port (0: any free port).
        control_port: ZeroMQ port (0: any free port).
        pool_size: slots in the switch.
        drop_probability: emulated loss on every port (0..1).
        seed: seed of the loss generator.
        **options: further ``ControllerOptions`` (window, k, heartbeat_timeout, ...).
    """

    def __init__(self, host: str = defaults.SWITCH_HOST, port: int = defaults.SWITCH_PORT,
                 control_port: int = defaults.CONTROL_PORT, pool_size: int = defaults.POOL_SIZE,
                 drop_probability: float = 0.0, seed: int | None = None, **options) -> None:
        self.switch = SoftwareSwitch(pool_size=pool_size, drop_probability=drop_probability, seed=seed)
        self.server = SwitchServer(self.switch, host, port).start()
        try:
            self.controller = Controller(InProcessTarget(self.switch), ControllerOptions(
                bind=f"tcp://{host}:{control_port}", switch_address=self.server.address, pool_size=pool_size,
                **options)).start()
        except Exception:
            self.server.stop()
            raise

    @property
    def endpoint(self) -> str:
        """The controller's ZeroMQ endpoint, for ``Worker(controller=...)``."""
        return self.controller.endpoint

    def stop(self) -> None:
        self.controller.stop()
        self.server.stop()

    def __enter__(self) -> SoftwareSwitchRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
