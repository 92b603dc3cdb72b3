"""The software switch as a child process: one way to start it, one way to know it is up.

``spawn_switch()`` runs ``switchml-switch emulate`` with typed options and returns once its
controller answers ``hello``, the request every Worker starts with: ready means ready for
workers, whatever the switch logs. The trainer's torchrun launcher, the benchmarks and the
tests start it this way (a Mininet placement passes its own ``start`` and ``wait``, which run
the same command and the same ``hello`` inside network namespaces: ``wait_command``);
``stop_process`` ends it and ``child_env`` is the environment every such child gets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from switchml import defaults
from switchml.control import FROM_ENV, ControlClient
from switchml.errors import ControlAuthError, ControllerTimeout, SwitchMLError
from switchml.messages import Hello, HelloAnswer

#: How often ``wait_until_ready`` asks again (and checks that the process still runs).
_POLL_S = 0.5

#: The checkout (or site-packages) folder that holds ``switchml`` and ``emulation``.
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child that runs switchml: the package importable
    (``PYTHONPATH``, so a checkout works without an install), output unbuffered (its log is
    read while it runs), then ``extra``."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def wait_command(endpoint: str, timeout: float = 30.0) -> list[str]:
    """``switchml-switch wait``: ``wait_until_ready`` as a command, for a namespace this process is not in."""
    return [sys.executable, "-m", "emulation.cli", "wait", "--controller", endpoint, "--timeout", repr(float(timeout))]


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


def wait_until_ready(endpoint: str, proc: subprocess.Popen | None = None, timeout: float = 30.0,
                     secret: bytes | None = FROM_ENV) -> HelloAnswer:
    """Ask the controller at ``endpoint`` ``hello`` until it answers; raise ``SwitchMLError`` if
    ``proc`` exits first or ``timeout`` passes (``ControlAuthError`` at once if its secret differs;
    ``secret``: ``ControlClient``'s, by default the environment's)."""
    client = ControlClient(endpoint, timeout, secret=secret)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                return client.request(Hello(), timeout=max(0.0, min(_POLL_S, deadline - time.monotonic())))
            except ControllerTimeout:
                if (proc is not None and proc.poll() is not None) or time.monotonic() >= deadline:
                    raise SwitchMLError(f"the controller at {endpoint} did not answer within "
                                        f"{timeout:g} s") from None
    finally:
        client.close()


#: Starts a command line as a child process (where and with which output is the caller's).
Start = Callable[[list[str]], subprocess.Popen]
#: Returns once the controller at the endpoint answers; raises ``SwitchMLError`` if the
#: process exits first or the timeout (seconds) passes.
Wait = Callable[[str, subprocess.Popen, float], object]


def spawn_switch(host: str = defaults.SWITCH_HOST, port: int = defaults.SWITCH_PORT,
                 control_port: int = defaults.CONTROL_PORT, *, ready_timeout: float = 30.0,
                 stdout: IO | int | None = None, stderr: IO | int | None = None, env: dict[str, str] | None = None,
                 start: Start | None = None, wait: Wait = wait_until_ready, **options) -> subprocess.Popen:
    """Start ``switchml-switch emulate`` as a child process; return it once its controller answers.

    ``options`` are ``emulate_command``'s (drop_probability, k, window, ...). ``start`` runs the
    command (default: ``subprocess.Popen`` here with ``stdout``, ``stderr`` and ``env``) and
    ``wait`` checks readiness (default: ``wait_until_ready`` from this process); a placement in
    other network namespaces passes both. If the switch does not come up (a port in use, say),
    the child is killed and ``SwitchMLError`` says so.
    """
    command = emulate_command(host, port, control_port, **options)
    proc = start(command) if start is not None else subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)
    try:
        wait(f"tcp://{host}:{control_port}", proc, ready_timeout)
    except SwitchMLError as exc:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if isinstance(exc, ControlAuthError):
            raise
        raise SwitchMLError(f"the software switch did not start on {host}:{port}/{control_port} "
                            f"(exit code {proc.poll()}; {exc}); is the port in use?") from None
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
