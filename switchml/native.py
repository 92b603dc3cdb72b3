"""Which data path runs: the C extensions (``native``) or the pure-Python reference (``python``).

The extensions are built by the package's own install (``setup.py``, sources in
``native/``) where a C compiler is present, and skipped where it is not. Every component
with a data path (``switchml.Worker``, ``emulation.switch.SoftwareSwitch``) takes a
``dataplane`` argument:

- ``None`` (the default): ``$SWITCHML_DATAPLANE`` if set, else ``native`` where its
  extension imported and ``python`` where it did not;
- ``"native"``: the C data path, or a clear error if it is not built;
- ``"python"``: the reference, always available.

Which one a component got is logged once per process at INFO.

The native loops also use UDP segmentation offload where the kernel has it (UDP_SEGMENT to
send a run of datagrams to one destination in one message, UDP_GRO to receive such runs in
one buffer): the same datagrams, less kernel work per datagram. ``$SWITCHML_UDP_OFFLOAD=0``
turns it off (to measure it, or on a kernel that misbehaves).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from types import ModuleType

from switchml import protocol
from switchml.errors import SwitchMLError

log = logging.getLogger(__name__)

NATIVE = "native"
PYTHON = "python"
DATAPLANES = (NATIVE, PYTHON)
ENV_VAR = "SWITCHML_DATAPLANE"  #: default data path of every component in this process and its children
OFFLOAD_ENV_VAR = "SWITCHML_UDP_OFFLOAD"  #: "0" turns UDP GSO/GRO off in the native loops

_logged: set[str] = set()
_log_lock = threading.Lock()
_modules: dict[str, tuple[ModuleType | None, str | None]] = {}


class NativeUnavailable(SwitchMLError):
    """``dataplane="native"`` was asked for, but its C extension is not built (or does not match)."""


def udp_offload() -> bool:
    """Whether the native loops use UDP GSO/GRO (default yes; ``$SWITCHML_UDP_OFFLOAD=0``: no)."""
    return os.environ.get(OFFLOAD_ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def load(module_name: str, expected: dict[str, int]) -> tuple[ModuleType | None, str | None]:
    """Import a native module once; (module, None), or (None, why not).

    ``expected``: constants the module's ``CONSTANTS`` must hold, so that a stale build of
    an older wire format is refused rather than trusted.
    """
    if module_name not in _modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            _modules[module_name] = (None, f"{module_name} did not import ({exc}); build it with a C compiler "
                                           "present: pip install -e .")
        else:
            constants = getattr(module, "CONSTANTS", {})
            wrong = {name: (constants.get(name), value) for name, value in expected.items()
                     if constants.get(name) != value}
            if wrong:
                _modules[module_name] = (None, f"{module_name} is a stale build: constants (built, expected) "
                                               f"{wrong}; rebuild with pip install -e .")
            else:
                _modules[module_name] = (module, None)
    return _modules[module_name]


def resolve(requested: str | None, component: str, module: ModuleType | None, why_not: str | None) -> str:
    """The data path ``component`` runs: see the module docstring for the rules."""
    source = "argument"
    if requested is None:
        requested = os.environ.get(ENV_VAR) or None
        source = f"${ENV_VAR}"
    if requested is None:
        chosen = NATIVE if module is not None else PYTHON
        source = "default"
    elif requested in DATAPLANES:
        chosen = requested
    else:
        raise ValueError(f"dataplane={requested!r} ({source}); expected one of {', '.join(DATAPLANES)}")
    if chosen == NATIVE and module is None:
        raise NativeUnavailable(f"{component}: dataplane 'native' ({source}) is not available: {why_not}")
    with _log_lock:
        if component not in _logged:
            _logged.add(component)
            detail = "C extension" if chosen == NATIVE else (
                "pure-Python reference" + (f", native unavailable: {why_not}" if module is None else ""))
            log.info("%s data path: %s (%s; %s)", component, chosen, source, detail)
    return chosen


# --------------------------------------------------------------- worker side
WORKER_MODULE = "switchml._native"
WORKER_RC_MISMATCH = 4  #: allreduce's code: the descriptors differed, and the first window was drained
WORKER_NUM_STATS = 5  #: allreduce's counters: sent, retransmissions, results, stale, duplicates


def worker_module() -> tuple[ModuleType | None, str | None]:
    """The worker engine's and quantizer's extension, or why it is missing."""
    from switchml import quantize

    return load(WORKER_MODULE, {"PREAMBLE_BYTES": protocol.PREAMBLE_BYTES, "MAX_K": protocol.MAX_K,
                                "RESULT": int(protocol.MsgType.RESULT), "EXP_NAN": protocol.EXP_NAN,
                                "EXP_MIN": protocol.EXP_MIN, "QUANT_BITS": quantize.QUANT_BITS,
                                "DESCRIPTOR_DTYPE_BITS": protocol.DESCRIPTOR_DTYPE_BITS,
                                "RC_MISMATCH": WORKER_RC_MISMATCH, "NUM_STATS": WORKER_NUM_STATS})


def worker_available() -> bool:
    """Whether ``switchml._native`` imported (and matches this wire format)."""
    return worker_module()[0] is not None


def resolve_worker(requested: str | None) -> str:
    """The worker engine's data path for ``Worker(dataplane=requested)``."""
    module, why_not = worker_module()
    return resolve(requested, "switchml worker", module, why_not)
