"""The control channel's security (docs/security.md): CurveZMQ from a cluster secret, secure
by default off loopback, and a rank that acts only for its own registration. Real ZeroMQ
sockets, a real controller and real workers over UDP on 127.0.0.1."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from mpworkers import run_threads

from emulation.runner import SoftwareSwitchRunner
from switchml import Worker, defaults
from switchml import messages as m
from switchml.control import ControlClient
from switchml.controller import Controller, ControllerOptions, InsecureBind
from switchml.errors import ControlAuthError
from switchml.security import CurveKeys, SecretError, is_local_endpoint, read_secret

SECRET = b"correct horse battery staple, 2026"


def test_keys_are_derived_from_the_secret_alone():
    keys = CurveKeys.from_secret(SECRET)
    assert keys == CurveKeys.from_secret(SECRET)  # every host derives the same pairs
    assert len({keys.server_public, keys.client_public, keys.server_secret, keys.client_secret}) == 4
    other = CurveKeys.from_secret(SECRET + b"!")
    assert other.server_public != keys.server_public and other.client_public != keys.client_public


def test_the_secret_comes_from_a_flag_then_the_environment(tmp_path):
    path = tmp_path / "secret"
    path.write_text("from-the-file-0123456789\n")
    assert read_secret(path, environ={}) == b"from-the-file-0123456789"  # the newline is not part of it
    assert read_secret(None, environ={defaults.SECRET_ENV: "from-the-variable-0123"}) == b"from-the-variable-0123"
    assert read_secret(None, environ={defaults.SECRET_FILE_ENV: str(path)}) == b"from-the-file-0123456789"
    assert read_secret(None, environ={}) is None
    with pytest.raises(SecretError, match=rf"\${defaults.SECRET_ENV}: the cluster secret is 5 bytes; expected at "
                                          rf"least {defaults.SECRET_MIN_BYTES}"):
        read_secret(None, environ={defaults.SECRET_ENV: "short"})
    with pytest.raises(SecretError, match="--secret-file='/nonexistent/s': cannot read"):
        read_secret("/nonexistent/s", environ={})


@pytest.mark.parametrize("endpoint, local", [
    ("tcp://127.0.0.1:48865", True), ("tcp://localhost:1", True), ("tcp://[::1]:5", True), ("ipc:///tmp/x", True),
    ("tcp://*:48865", False), ("tcp://0.0.0.0:1", False), ("tcp://10.0.0.1:1", False),
])
def test_which_endpoints_only_this_host_reaches(endpoint, local):
    assert is_local_endpoint(endpoint) is local


def test_an_open_controller_refuses_an_address_other_hosts_reach():
    with SoftwareSwitchRunner("127.0.0.1", 0, 0, with_controller=False) as runner:
        from emulation.target import InProcessTarget

        with pytest.raises(InsecureBind, match=r"tcp://\*:0, which other hosts can reach.*--secret-file.*--insecure"):
            Controller(InProcessTarget(runner.switch), ControllerOptions(bind="tcp://*:0"))


def _register_all(endpoint: str, job: str, n: int, **kw) -> list[Worker]:
    workers = run_threads(lambda rank: Worker(endpoint, job, rank, n, **kw), n)
    if errors := [w for w in workers if isinstance(w, BaseException)]:
        for w in workers:
            if isinstance(w, Worker):
                w.close()
        raise errors[0]
    return workers


def _allreduce_all(workers: list[Worker], x: np.ndarray) -> list[np.ndarray]:
    futures = [w.allreduce_async(x + w.rank) for w in workers]
    return [f.result(timeout=60) for f in futures]


def test_a_secured_controller_serves_its_secret_and_refuses_every_other_key(caplog):
    caplog.set_level(logging.WARNING, logger="switchml.controller")
    with SoftwareSwitchRunner("127.0.0.1", 0, 0, secret=SECRET) as runner:
        workers = _register_all(runner.endpoint, "sealed", 2, secret=SECRET)
        try:
            x = np.arange(3000, dtype=np.int32)
            for got in _allreduce_all(workers, x):
                np.testing.assert_array_equal(got, 2 * x + 1)
            # a wrong secret, and none at all: a clear error at the handshake, not a timeout
            for secret, kind in ((b"not the cluster's secret, sorry", "another cluster secret"),
                                 (None, "requires a cluster secret")):
                client = ControlClient(runner.endpoint, 30, secret=secret)
                with pytest.raises(ControlAuthError, match=f"handshake failed.*{kind}.*--secret-file"):
                    client.request(m.Register("intruder", 0, 1, ("127.0.0.1", 9)))
                client.close()
            with pytest.raises(ControlAuthError, match="another cluster secret"):
                Worker(runner.endpoint, "intruder", 0, 1, secret=b"not the cluster's secret, sorry")
            # the controller logged them (from its thread, when its socket monitor reports them)
            deadline = time.monotonic() + 30
            while "CurveZMQ handshake failed" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
            assert f"refused a control connection on {runner.endpoint}: the CurveZMQ handshake failed" in caplog.text
            # ... and they changed nothing
            good = ControlClient(runner.endpoint, 30, secret=SECRET)
            jobs = good.request(m.Stats()).jobs
            good.close()
            assert [(j["name"], j["state"]) for j in jobs] == [("sealed", "running")]
            for got in _allreduce_all(workers, x):
                np.testing.assert_array_equal(got, 2 * x + 1)
        finally:
            for w in workers:
                w.close()


def test_the_secret_reaches_workers_through_the_environment(monkeypatch):
    monkeypatch.setenv(defaults.SECRET_ENV, SECRET.decode())
    with SoftwareSwitchRunner("127.0.0.1", 0, 0, secret=SECRET) as runner:
        (worker,) = _register_all(runner.endpoint, "env", 1)
        with worker:
            np.testing.assert_array_equal(worker.allreduce(np.ones(10, np.int32)), np.ones(10, np.int32))


def test_a_rank_acts_only_for_its_own_registration(caplog):
    with SoftwareSwitchRunner("127.0.0.1", 0, 0) as runner:
        workers = _register_all(runner.endpoint, "mine", 2)
        port = runner.endpoint.rsplit(":", 1)[1]
        try:
            victim = workers[0].info.session
            # another connection on this host, without the token; and one from another address
            # (127.0.0.2, which a ZeroMQ client can bind as its source) holding the stolen token
            intruder = ControlClient(runner.endpoint, 30)
            elsewhere = ControlClient(f"tcp://127.0.0.2:0;127.0.0.1:{port}", 30)
            with caplog.at_level(logging.WARNING, logger="switchml.controller"):
                for client, session, why in ((intruder, "", "without its session token"),
                                             (intruder, "guess", "without its session token"),
                                             (elsewhere, victim, "from another address")):
                    for request in (m.Leave("mine", 0, session), m.Heartbeat("mine", 0, session),
                                    m.Barrier("mine", 0, session)):
                        answer = client.call(request)
                        assert isinstance(answer, m.Refusal), request
                        assert f"{request.op!r} for job 'mine', rank 0 refused" in answer.error and why in answer.error
            intruder.close()
            elsewhere.close()
            refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
            assert len(refusals) == 9 and "from 127.0.0.2" in refusals[-1]
            # the job is untouched: both ranks still registered, running, and summing
            stats = ControlClient(runner.endpoint, 30)
            (job,) = stats.request(m.Stats()).jobs
            stats.close()
            assert job["state"] == "running" and job["registered"] == [0, 1]
            x = np.arange(100, dtype=np.int32)
            for got in _allreduce_all(workers, x):
                np.testing.assert_array_equal(got, 2 * x + 1)
            # and the owners themselves are still served
            assert run_threads(lambda rank: workers[rank].barrier(30), 2) == [None, None]
        finally:
            for w in workers:
                w.close()


def test_emulate_refuses_to_serve_other_hosts_without_a_secret(capsys):
    from emulation.cli import main

    assert main(["emulate", "--host", "0.0.0.0", "--port", "0", "--control-port", "0"]) == 1
    err = capsys.readouterr().err
    assert "cannot start" in err and "which other hosts can reach, without authentication" in err
    assert "--secret-file" in err and "--insecure" in err


def test_a_client_with_a_secret_is_told_when_the_controller_runs_open():
    with SoftwareSwitchRunner("127.0.0.1", 0, 0) as runner:
        client = ControlClient(runner.endpoint, 30, secret=SECRET)
        with pytest.raises(ControlAuthError, match="another cluster secret, or runs open without one"):
            client.request(m.Hello())
        client.close()


def test_launchers_hand_the_secret_to_every_rank_through_the_environment(tmp_path, monkeypatch):
    import os

    pytest.importorskip("torchvision")
    from trainer import launch
    from trainer.cli import build_parser
    from trainer.config import TrainConfig

    for name in (defaults.SECRET_ENV, defaults.SECRET_FILE_ENV, "RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)  # restored after the test, whatever the launcher sets
    path = tmp_path / "secret"
    path.write_text("the-cluster-secret-0123\n")
    with_file = TrainConfig.from_namespace(build_parser().parse_args(["digits", "--secret-file", str(path)]))
    assert launch._cluster_secret(with_file, fresh=True) == b"the-cluster-secret-0123"
    assert os.environ[defaults.SECRET_ENV] == "the-cluster-secret-0123"  # what every rank inherits
    monkeypatch.delenv(defaults.SECRET_ENV)
    plain = TrainConfig.from_namespace(build_parser().parse_args(["digits"]))
    fresh = launch._cluster_secret(plain, fresh=True)  # local and Ray, starting their own switch
    assert len(fresh) >= 32 and os.environ[defaults.SECRET_ENV] == fresh.decode()
    monkeypatch.delenv(defaults.SECRET_ENV)
    assert launch._cluster_secret(plain, fresh=False) is None
    # torchrun across hosts without a secret: refused before any switch starts
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    with pytest.raises(SystemExit, match="MASTER_ADDR 10.0.0.1, which other hosts reach, without a secret"):
        launch.launch_torchrun(plain)
