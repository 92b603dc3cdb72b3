"""The software switch as a child process: one way to start it, one way to know it is up.

``spawn_switch()`` runs ``switchml-switch emulate`` with typed options and returns once its
controller answers ``hello``, the request every Worker starts with: ready means ready for
workers, whatever the switch logs. The trainer's torchrun launcher and the tests start it
this way; ``stop_process`` ends it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO

from switchml import defaults
from switchml.control import ControlClient
from switchml.errors import ControllerTimeout, SwitchMLError
from switchml.messages import Hello, HelloAnswer

#: How often ``wait_until_ready`` asks again (and checks that the process still runs).
_POLL_S = 0.5


def emulate_command(host: str = defaults.SWITCH_HOST, port: int = defaults.SWITCH_PORT,
                    control_port: int = defaults.CONTROL_PORT, *, drop_probability: float = 0.0,
                    k: int | None = None, window: int | None = None, pool_size: int | None = None,
                    seed: int | None = None, heartbeat_timeout: float | None = None,
                    extra: Sequence[str] = ()) -> list[str]:
    """The ``switchml-switch emulate`` command line for these options (None: the command's default)."""
    cmd = [sys.executable, "-m", "emulation.cli", "emulate", "--host", host, "--port", str(port),
           "--control-port", str(control_port), "--drop-probability", repr(float(drop_probability))]
    for flag, value in (("-k", k), ("--window", window), ("--pool-size", pool_size), ("--seed", seed),
                        ("--heartbeat-timeout", heartbeat_timeout)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + list(extra)


def wait_until_ready(endpoint: str, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> HelloAnswer:
    """Ask the controller at ``endpoint`` ``hello`` until it answers; raise ``SwitchMLError`` if
    ``proc`` exits first or ``timeout`` passes."""
    client = ControlClient(endpoint, timeout)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                return client.request(Hello(), timeout=max(0.0, min(_POLL_S, deadline - time.monotonic())))
            except ControllerTimeout:
                if (proc is not None and proc.poll() is not None) or time.monotonic() >= deadline:
                    raise SwitchMLError(f"the software switch's controller at {endpoint} did not answer within "
                                        f"{timeout:g} s") from None
    finally:
        client.close()


def spawn_switch(host: str = defaults.SWITCH_HOST, port: int = defaults.SWITCH_PORT,
                 control_port: int = defaults.CONTROL_PORT, *, ready_timeout: float = 30.0,
                 stdout: IO | int | None = None, stderr: IO | int | None = None, env: dict[str, str] | None = None,
                 **options) -> subprocess.Popen:
    """Start ``switchml-switch emulate`` as a child process; return it once its controller answers.

    ``options`` are ``emulate_command``'s (drop_probability, k, window, ...). If the switch does
    not come up (a port in use, say), the child is killed and ``SwitchMLError`` says so.
    """
    proc = subprocess.Popen(emulate_command(host, port, control_port, **options), stdout=stdout, stderr=stderr,
                            env=env)
    try:
        wait_until_ready(f"tcp://{host}:{control_port}", proc, ready_timeout)
    except SwitchMLError:
        proc.kill()
        proc.wait()
        raise SwitchMLError(f"the software switch did not start on {host}:{port}/{control_port} "
                            f"(exit code {proc.poll()}); is the port in use?") from None
    return proc


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Ask a child to stop (SIGTERM), then kill it if it does not within ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
