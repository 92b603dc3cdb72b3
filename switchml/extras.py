"""Optional dependencies: ``pip install switchml`` is the Worker, the switch, the controller and
the DDP hook (numpy, pyzmq, torch); the rest comes with an extra, and a missing one is named.

| extra | what it adds | for |
| --- | --- | --- |
| ``p4`` | grpcio, protobuf, p4runtime, p4runtime-shell | P4Runtime: ``deploy``, ``emulate --p4runtime-port``, BMv2, Tofino |
| ``train`` | torchvision, scikit-learn, pillow, tqdm, matplotlib | ``switchml-train``, ``switchml-eval`` |
| ``ray`` | ray[train] | ``switchml-train --launcher ray`` |
| ``clip`` | open_clip_torch (and ``train``) | ``switchml-train clip`` |
| ``bench`` | matplotlib, tqdm (and ``train``) | ``switchml-bench`` |
| ``test`` | pytest, hypothesis, ruff, scapy, cryptography | the test suite (cryptography: throw-away TLS certificates) |
| ``all`` | all but ``test`` | |
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager


class MissingExtra(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that installs it."""

    def __init__(self, extra: str, what: str, module: str | None) -> None:
        super().__init__(f"{what} needs switchml's [{extra}] extra (module {module!r} is not installed): "
                         f"pip install 'switchml[{extra}]'", name=module)
        self.extra = extra


@contextmanager
def needs(extra: str, what: str) -> Iterator[None]:
    """Turn a missing module imported inside the block into ``MissingExtra`` naming ``extra``."""
    try:
        yield
    except MissingExtra:
        raise
    except ModuleNotFoundError as exc:
        raise MissingExtra(extra, what, exc.name) from exc


def missing(extra: str, command: str, *modules: str) -> str | None:
    """``require`` for a command's ``main``: its error line (``command: ...``), or None when all is there."""
    try:
        require(extra, command, *modules)
    except MissingExtra as exc:
        return f"{command}: {exc}"
    return None


def require(extra: str, what: str, *modules: str) -> None:
    """Raise ``MissingExtra`` naming ``extra`` if a top-level module of ``modules`` is not installed.

    Finds them without importing them, so a command can check its extra up front cheaply.
    """
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package missing, or a finder that refuses it
            found = False
        if not found:
            raise MissingExtra(extra, what, module)
