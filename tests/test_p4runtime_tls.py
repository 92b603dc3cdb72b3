"""P4Runtime over TLS (docs/security.md): the software switch's server with its certificate,
optionally demanding client certificates, and the controller's client (``P4RuntimeTarget``,
``switchml-switch deploy``). Real gRPC with real TLS on 127.0.0.1; throw-away certificates."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

from mpworkers import run_threads  # noqa: E402
from tls_certs import PKI, make_pki  # noqa: E402

from emulation.cli import build_parser, deploy  # noqa: E402
from emulation.runner import SoftwareSwitchRunner  # noqa: E402
from switchml import Worker  # noqa: E402
from switchml.net import free_port  # noqa: E402
from switchml.p4runtime_target import P4RuntimeError, P4RuntimeTarget  # noqa: E402
from switchml.security import TLSFiles  # noqa: E402


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _allreduce(endpoint: str, job: str, n: int = 2) -> None:
    def rank(r: int):
        with Worker(endpoint, job, r, n) as w:
            return w.allreduce(np.full(500, r + 1, np.int32))

    for got in run_threads(rank, n, 60):
        np.testing.assert_array_equal(got, np.full(500, n * (n + 1) // 2, np.int32))


def test_mutual_tls_programs_the_switch_and_refuses_clients_without_a_good_certificate(pki):
    server = TLSFiles(pki.server.cert, pki.server.key, pki.ca)
    client = TLSFiles(pki.client.cert, pki.client.key, pki.ca)
    with SoftwareSwitchRunner("127.0.0.1", 0, 0, p4runtime_port=0, p4runtime_tls=server,
                              controller_tls=client) as runner:
        _allreduce(runner.endpoint, "over-tls")  # the controller programmed the job through TLS
        address = runner.p4runtime.grpc_address
        with pytest.raises(P4RuntimeError, match="speaks TLS and this client connects in plain text.*--tls-ca"):
            P4RuntimeTarget(address, election_id=5, timeout=2)
        for refused in (TLSFiles(ca=pki.ca),  # no client certificate
                        TLSFiles(pki.other_client.cert, pki.other_client.key, pki.ca),  # another CA signed it
                        TLSFiles(pki.client.cert, pki.client.key, pki.other_ca)):  # the server's is not trusted
            with pytest.raises(P4RuntimeError, match="TLS"):
                P4RuntimeTarget(address, election_id=5, timeout=2, tls=refused)
        _allreduce(runner.endpoint, "still-mine")  # nobody else became primary or changed a table


def test_a_tls_client_against_a_plain_server_is_told_so(pki):
    with SoftwareSwitchRunner("127.0.0.1", 0, 0, p4runtime_port=0, with_controller=False) as runner:
        with pytest.raises(P4RuntimeError, match="the server speaks plain text, not TLS"):
            P4RuntimeTarget(runner.p4runtime.grpc_address, timeout=2, tls=TLSFiles(ca=pki.ca))


def test_bad_tls_files_are_named(pki, tmp_path):
    with pytest.raises(ValueError, match="--tls-ca=.*/missing.pem.: No such file"):
        TLSFiles(ca=str(tmp_path / "missing.pem")).client_credentials()
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="--tls-cert=.*junk.pem.: not a PEM file"):
        TLSFiles(str(tmp_path / "junk.pem"), pki.client.key, pki.ca).client_credentials()
    with pytest.raises(ValueError, match="needs both --p4runtime-tls-cert and --p4runtime-tls-key"):
        TLSFiles(pki.server.cert, flags=("--p4runtime-tls-cert", "--p4runtime-tls-key", "--x")).server_credentials()


def test_deploy_over_tls_with_a_client_certificate(pki):
    server = TLSFiles(pki.server.cert, pki.server.key, pki.ca)
    with SoftwareSwitchRunner("127.0.0.1", 0, 0, p4runtime_port=0, p4runtime_tls=server,
                              with_controller=False) as runner:
        control_port = free_port()
        args = build_parser().parse_args([
            "deploy", "--target", "emulator", "--grpc", runner.p4runtime.grpc_address,
            "--switch-address", "{}:{}".format(*runner.server.address), "--control-host", "127.0.0.1",
            "--control-port", str(control_port), "--window", "4", "-k", "256", "--timeout", "5",
            "--tls-ca", pki.ca, "--tls-cert", pki.client.cert, "--tls-key", pki.client.key])
        ready, stop = threading.Event(), threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                deploy(args, ready, stop)
            except BaseException as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)
                ready.set()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            assert ready.wait(30) and not errors, errors
            _allreduce(f"tcp://127.0.0.1:{control_port}", "deployed-over-tls")
        finally:
            stop.set()
            thread.join(30)
