"""``switchml-switch deploy``: port maps, its errors, and a deployment to the software switch
(the emulator target) that runs real jobs. BMv2 and Tofino deployments need their switches
(docs/deploy.md); the BMv2 compile step is checked when p4c-bm2-ss is on PATH."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from mpworkers import allreduce_job, expected_sum

from emulation.cli import build_parser, deploy, main
from emulation.runner import SoftwareSwitchRunner
from emulation.switch import SoftwareSwitch
from emulation.target import InProcessTarget
from switchml import ControllerError, Worker, defaults, pipeline, protocol
from switchml.deploy import DeployError, HostPort, load_ports, make_plan
from switchml.net import free_port
from switchml.p4runtime_target import P4RuntimeTarget
from switchml.pipeline import WorkerEntry


# ------------------------------------------------------------------------ port maps
@pytest.mark.parametrize("text", [
    '{"10.0.0.1": {"port": 1, "mac": "02:00:00:00:00:01"}, "10.0.0.2": [2, "02:00:00:00:00:AA"]}',
    '[{"ip": "10.0.0.1", "port": 1, "mac": "02:00:00:00:00:01"}, {"ip": "10.0.0.2", "port": 2, '
    '"mac": "02:00:00:00:00:aa"}]',
    "# host, switch port, MAC\nip,port,mac\n10.0.0.1, 1, 02:00:00:00:00:01\n\n10.0.0.2,2,02:00:00:00:00:aa\n",
])
def test_port_maps_in_json_and_csv(tmp_path, text):
    path = tmp_path / "ports"
    path.write_text(text)
    assert load_ports(path) == {"10.0.0.1": HostPort("10.0.0.1", 1, "02:00:00:00:00:01"),
                                "10.0.0.2": HostPort("10.0.0.2", 2, "02:00:00:00:00:aa")}


@pytest.mark.parametrize("text, error", [
    ("10.0.0.300,1,02:00:00:00:00:01", "10.0.0.300"),
    ("10.0.0.1,600,02:00:00:00:00:01", "9-bit"),
    ("10.0.0.1,1,02:00:00:00:01", "MAC"),
    ("10.0.0.1,1,02:00:00:00:00:01\n10.0.0.1,2,02:00:00:00:00:02", "twice"),
    ("10.0.0.1,1", "ip,port,mac"),
    ("{not json", "not valid JSON"),
    ("", "no hosts"),
])
def test_bad_port_maps_are_reported(tmp_path, text, error):
    path = tmp_path / "ports.csv"
    path.write_text(text)
    with pytest.raises(DeployError, match=error):
        load_ports(path)


# ------------------------------------------------------------------------ errors
def run_main(capsys, *argv: str) -> tuple[int, str]:
    code = main(["deploy", *argv])
    return code, capsys.readouterr().err


def test_deploy_explains_what_it_is_missing(capsys, tmp_path):
    grpc = f"127.0.0.1:{free_port()}"
    if shutil.which("p4c-bm2-ss") is None:
        code, err = run_main(capsys, "--target", "bmv2", "--grpc", grpc, "--compile")
        assert code == 1 and "--compile needs p4c-bm2-ss on PATH" in err
    code, err = run_main(capsys, "--target", "bmv2", "--grpc", grpc)
    assert code == 1 and "--config" in err and "--compile" in err
    code, err = run_main(capsys, "--target", "tofino", "--grpc", grpc, "--compile")
    assert code == 1 and "bf-p4c" in err
    code, err = run_main(capsys, "--target", "tofino", "--grpc", grpc)
    assert code == 1 and "--p4info" in err and "--config" in err
    config = tmp_path / "switch.json"
    config.write_text("{}")
    code, err = run_main(capsys, "--target", "bmv2", "--grpc", grpc, "--config", str(config))
    assert code == 1 and "--ports" in err
    code, err = run_main(capsys, "--target", "bmv2", "--grpc", grpc, "--config", str(config), "--ports",
                         str(tmp_path / "missing.csv"))
    assert code == 1 and "missing.csv" in err
    ports = tmp_path / "ports.csv"
    ports.write_text("10.0.0.1,1,02:00:00:00:00:01\n")
    code, err = run_main(capsys, "--target", "bmv2", "--grpc", grpc, "--config", str(config), "--ports", str(ports))
    assert code == 1 and "--switch-address" in err
    code, err = run_main(capsys, "--target", "emulator", "--grpc", grpc, "-k", "100")
    assert code == 1 and "-k 100" in err
    code, err = run_main(capsys, "--target", "tofino", "--grpc", grpc, "--leaf-role")
    assert code == 1 and "--leaf-role with --target tofino" in err and "BMv2" in err
    code, err = run_main(capsys, "--target", "bmv2", "--grpc", grpc, "--config", str(config), "--leaf-role")
    assert code == 1 and "--ports" in err  # a leaf forwards its rack's and the spine's traffic from its port map
    code, err = run_main(capsys, "--target", "emulator", "--grpc", grpc, "--timeout", "1")
    assert code == 1 and "--control-host *: other hosts can reach" in err and "--secret-file" in err  # secure by default
    code, err = run_main(capsys, "--target", "emulator", "--grpc", grpc, "--timeout", "1", "--insecure")
    assert code == 1 and "no P4Runtime server answers at " + grpc in err


@pytest.mark.skipif(shutil.which("p4c-bm2-ss") is None, reason="p4c-bm2-ss not on PATH")
def test_compile_builds_the_bmv2_json(tmp_path):
    from switchml.deploy import compile_bmv2

    p4info, config = compile_bmv2(tmp_path)
    assert p4info.is_file() and config.read_bytes().startswith(b"{")
    leaf_p4info, leaf_config = compile_bmv2(tmp_path, leaf_role=True)  # the leaf build, beside the flat one
    assert leaf_config != config and b"upstream" in leaf_config.read_bytes() and b"upstream" not in config.read_bytes()
    assert "SwitchIngress.upstream" in leaf_p4info.read_text()


# ------------------------------------------------------------------------ the emulator target
class Deployment:
    """``deploy`` in a thread against a software switch that runs without a controller."""

    def __init__(self, tmp_path: Path, ports: str, *extra: str) -> None:
        self.runner = SoftwareSwitchRunner("127.0.0.1", 0, 0, p4runtime_port=0, with_controller=False)
        self.grpc = self.runner.p4runtime.grpc_address
        ports_file = tmp_path / "ports.csv"
        ports_file.write_text(ports)
        self.control_port = free_port()
        self.args = build_parser().parse_args([
            "deploy", "--target", "emulator", "--grpc", self.grpc, "--ports", str(ports_file),
            "--switch-address", "{}:{}".format(*self.runner.server.address), "--control-host", "127.0.0.1",
            "--control-port", str(self.control_port), "--window", "4", "-k", "256", *extra])
        self.ready, self.stop_event = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            deploy(self.args, self.ready, self.stop_event)
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self.error = exc
            self.ready.set()

    def start(self) -> Deployment:
        self.thread.start()
        assert self.ready.wait(30) and self.error is None, self.error
        return self

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.control_port}"

    def monitor(self) -> P4RuntimeTarget:
        return P4RuntimeTarget(self.grpc, election_id=0, require_primary=False, timeout=5)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)
        self.runner.stop()


def test_deploy_to_the_emulator_pushes_programs_and_serves_jobs(tmp_path):
    d = Deployment(tmp_path, "127.0.0.1,3,02:00:00:00:00:03\n10.0.0.2,4,02:00:00:00:00:04\n")
    try:
        # state from before the deployment: the pipeline push must wipe it
        stale = P4RuntimeTarget(d.grpc, timeout=5)
        stale.add_worker(WorkerEntry("10.9.9.9", 1, 0, 0, 1, 1, 0, 1))
        stale.close()
        d.start()
        monitor = d.monitor()
        try:
            assert [e["match"]["hdr.ipv4.src_addr"] for e in monitor.read_table(pipeline.ADMISSION_TABLE)] == [
                "127.0.0.1"]  # only the controller's own entry
            forward = sorted((e["match"]["hdr.ipv4.dst_addr"], e["params"]["port"], e["params"]["mac"])
                             for e in monitor.read_table(pipeline.FORWARD_TABLE))
            assert forward == [(("10.0.0.2", 32), 4, "02:00:00:00:00:04"), (("127.0.0.1", 32), 3, "02:00:00:00:00:03")]
            with Worker(d.endpoint, "one", 0, 1, control_timeout=30) as w:
                # the port map gave the worker's switch port and MAC to its replica
                assert monitor.read_multicast_groups() == {w.info.job_number + 1: [(3, 0)]}
                rewrite = monitor.read_table(pipeline.EGRESS_REWRITE_TABLE)
                assert [(e["params"]["mac"], e["params"]["udp_port"]) for e in rewrite] == [
                    ("02:00:00:00:00:03", w.address[1])]
                assert w.allreduce(np.arange(600, dtype=np.int32)).tolist() == list(range(600))
        finally:
            monitor.close()
        results = allreduce_job(d.endpoint, "pair", 2, [4_000], seed=8, dtype="int32")
        assert np.array_equal(results[1][0], expected_sum(2, 4_000, 8, "int32"))
    finally:
        d.stop()


def test_a_worker_missing_from_the_port_map_fails_its_job_clearly(tmp_path):
    d = Deployment(tmp_path, "10.0.0.2,4,02:00:00:00:00:04\n").start()
    try:
        with pytest.raises(ControllerError, match="127.0.0.1 is not in the port map"):
            Worker(d.endpoint, "lost", 0, 1, control_timeout=30)
    finally:
        d.stop()


def test_deploy_programs_the_loss_table_on_every_mapped_port(tmp_path):
    """``--drop-probability`` reaches the switch through P4Runtime's loss table (the way BMv2 and
    Tofino get emulated loss), one entry per port of the map, threshold out of 32768."""
    d = Deployment(tmp_path, "10.0.0.1,3,02:00:00:00:00:03\n10.0.0.2,4,02:00:00:00:00:04\n",
                   "--drop-probability", "0.25").start()
    monitor = d.monitor()
    try:
        entries = sorted((e["match"]["standard_metadata.ingress_port"], e["params"]["threshold"])
                         for e in monitor.read_table(pipeline.LOSS_TABLE))
        assert entries == [(3, pipeline.DROP_PROBABILITY_SCALE // 4), (4, pipeline.DROP_PROBABILITY_SCALE // 4)]
    finally:
        monitor.close()
        d.stop()


def test_deploy_refuses_a_drop_probability_outside_0_1():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["deploy", "--target", "emulator", "--grpc", "x:1", "--drop-probability", "1.5"])


def test_a_typed_plan_and_one_k_per_target(tmp_path):
    """``make_plan`` takes typed values; which k a target takes comes from ``switchml.pipeline`` alone."""
    plan = make_plan("emulator", "127.0.0.1:1", switch_address="127.0.0.1:5000", control_host="127.0.0.1",
                     control_port=7, window=4)
    assert plan.supported_k == pipeline.SOFTWARE_SWITCH_K == pipeline.supported_k(protocol.SIZE_TO_K)
    assert plan.k == defaults.K and plan.switch_address == ("127.0.0.1", 5000)
    assert plan.control_bind == "tcp://127.0.0.1:7" and plan.config == b"" and plan.hosts == {}
    config, ports = tmp_path / "switch.json", tmp_path / "ports.csv"
    config.write_text("{}")
    ports.write_text("10.0.0.1,1,02:00:00:00:00:01\n")
    bmv2 = make_plan("bmv2", "x:1", config=config, ports=ports, switch_address="10.0.0.100", secret=b"s" * 32)
    assert bmv2.control_bind == f"tcp://*:{defaults.CONTROL_PORT}" and bmv2.secret == b"s" * 32
    assert bmv2.supported_k == (pipeline.P4_K,) and bmv2.k == pipeline.P4_K and bmv2.config == b"{}"
    assert InProcessTarget(SoftwareSwitch()).supported_k == pipeline.SOFTWARE_SWITCH_K
    assert InProcessTarget(SoftwareSwitch(sizes=(1, 3))).supported_k == (256, 64)


@pytest.mark.parametrize("text, value", [("0", 0.0), ("0.25", 0.25), ("1", 1.0), ("1%", 0.01), (" 50% ", 0.5)])
def test_drop_probability_is_parsed_and_checked_in_one_place(text, value):
    assert pipeline.parse_drop_probability(text) == pytest.approx(value)
    assert pipeline.drop_threshold(value) == round(value * pipeline.DROP_PROBABILITY_SCALE)


@pytest.mark.parametrize("text", ["1.5", "-0.1", "nan", "150%", "x"])
def test_drop_probability_outside_0_1_is_refused(text):
    with pytest.raises(pipeline.DropProbabilityError, match="fraction in 0..1"):
        pipeline.parse_drop_probability(text)
