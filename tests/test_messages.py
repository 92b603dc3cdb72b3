"""Typed control messages: each request and answer as JSON and back, checked in one place,
and a controller that answers malformed requests with the field that is wrong."""

from __future__ import annotations

import pytest
import zmq

from emulation.runner import SoftwareSwitchRunner
from switchml import messages as m
from switchml.control import ControlClient
from switchml.errors import ControllerError


@pytest.mark.parametrize("request_", [
    m.Hello(), m.Stats(), m.Register("job", 1, 2, ("10.0.0.1", 5000), 64), m.Register("job", 0, 1, ("::1", 1)),
    m.Barrier("job", 0), m.Heartbeat("job", 1), m.Leave("job", 1), m.Leave("job", 1, "token-of-rank-1"),
])
def test_requests_round_trip(request_):
    wire = zmq.utils.jsonapi.loads(zmq.utils.jsonapi.dumps(m.to_json(request_)))
    assert wire["op"] == request_.op and m.decode_request(wire) == request_


@pytest.mark.parametrize("answer", [
    m.HelloAnswer(("127.0.0.1", 48864), (256, 64)), m.JobInfo(3, 1, 2, 64, 8, 16, ("10.0.0.9", 48864)),
    m.JobInfo(3, 1, 2, 64, 8, 16, ("10.0.0.9", 48864), "session-token"),
    m.HeartbeatAnswer("running"), m.StatsAnswer([{"name": "j"}], {"drop_malformed": 0}), m.Ack(),
])
def test_answers_round_trip(answer):
    wire = zmq.utils.jsonapi.loads(zmq.utils.jsonapi.dumps(m.to_json(answer)))
    assert wire["ok"] is True and type(answer).from_json(wire) == answer


def test_a_refusal_carries_its_error_and_silent_ranks():
    wire = m.to_json(m.Refusal("job 'x' failed", (2, 3)))
    assert wire == {"ok": False, "error": "job 'x' failed", "failed_ranks": [2, 3]}
    assert m.decode_answer(m.Heartbeat("x", 0), wire) == m.Refusal("job 'x' failed", (2, 3))
    assert m.decode_answer(m.Heartbeat("x", 0), {"ok": True, "state": "running"}) == m.HeartbeatAnswer("running")


@pytest.mark.parametrize("msg, error", [
    ([1, 2], "not a JSON object"),
    ({"op": "shout"}, "unknown op 'shout'"),
    ({"op": "register", "job": "", "rank": 0, "world_size": 1, "addr": ["a", 1]}, "job='': expected a non-empty"),
    ({"op": "register", "job": "j", "rank": 0, "world_size": 33, "addr": ["a", 1]}, "world_size=33"),
    ({"op": "register", "job": "j", "rank": 2, "world_size": 2, "addr": ["a", 1]}, r"rank=2: expected .* 0\.\.1"),
    ({"op": "register", "job": "j", "rank": True, "world_size": 2, "addr": ["a", 1]}, "rank=True"),
    ({"op": "register", "job": "j", "rank": 0, "world_size": 1, "addr": "a:1"}, r"addr='a:1': expected \[ip"),
    ({"op": "register", "job": "j", "rank": 0, "world_size": 1, "addr": ["a", 1], "k": "64"}, "k='64'"),
    ({"op": "heartbeat", "job": ["j"], "rank": 0}, "job=\\['j'\\]: expected a job name"),
    ({"op": "leave", "job": "j", "rank": "0"}, "rank='0': expected an integer"),
    ({"op": "leave", "job": "j", "rank": 0, "session": 5}, "session=5: expected the token"),
])
def test_malformed_requests_are_named(msg, error):
    with pytest.raises(m.MessageError, match=error):
        m.decode_request(msg)


def test_the_controller_refuses_malformed_requests_and_serves_typed_ones():
    with SoftwareSwitchRunner("127.0.0.1", 0, 0) as runner:
        client = ControlClient(runner.endpoint, 10)
        try:
            hello = client.request(m.Hello())
            assert hello == m.HelloAnswer(runner.server.address, runner.target.supported_k)
            for raw, error in (({"op": "shout"}, "unknown op"), ({"op": "leave", "job": 7, "rank": 0}, "job=7"),
                               ({"op": "heartbeat", "job": "none", "rank": 0}, "no job 'none'")):
                answer = client.call(raw)
                assert answer["ok"] is False and error in answer["error"]
            with pytest.raises(ControllerError, match="controller refused 'barrier': no job 'none'"):
                client.request(m.Barrier("none", 0))
            stats = client.request(m.Stats())
            assert stats.jobs == [] and "drop_malformed" in stats.counters
        finally:
            client.close()
