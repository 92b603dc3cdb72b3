"""Wire format v1: the module and the scapy layer against the shared byte vectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scapy_layer import SwitchML

from switchml import protocol
from switchml.protocol import WireFormatError

VECTORS = json.loads((Path(__file__).parent / "data" / "wire_v1.json").read_text())
CASES = VECTORS["cases"]


def test_constants_match_vectors():
    assert protocol.UDP_PORT == VECTORS["udp_dst_port"]
    value, mask = (int(x, 16) for x in VECTORS["switch_match"].split("/"))
    assert protocol.UDP_PORT_MATCH == (value, mask)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_decode_vector(case):
    f, data = case["fields"], bytes.fromhex(case["hex"])
    pkt = protocol.decode_packet(data)
    assert (pkt.msg_type, pkt.job_number, pkt.tsi, pkt.slot, pkt.set_bit, pkt.e0, pkt.e1) == (
        f["msg_type"], f["job_number"], f["tsi"], f["slot"], f["set"], f["e0"], f["e1"])
    assert pkt.k == f["k"] == protocol.SIZE_TO_K[f["size_enum"]]
    assert pkt.payload.tolist() == f["payload"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_encode_vector(case):
    f = case["fields"]
    data = protocol.encode_packet(f["msg_type"], f["job_number"], f["tsi"], f["slot"], f["set"], f["e0"],
                                  np.array(f["payload"], dtype=np.int32), f["e1"])
    assert data.hex() == case["hex"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_scapy_layer_agrees_with_module(case):
    f, data = case["fields"], bytes.fromhex(case["hex"])
    pkt = SwitchML(data)
    assert (pkt.msg_type, pkt.size, pkt.job_number, pkt.tsi, pkt.set, pkt.slot, pkt.e0, pkt.e1) == (
        f["msg_type"], f["size_enum"], f["job_number"], f["tsi"], f["set"], f["slot"], f["e0"], f["e1"])
    assert pkt.values == f["payload"]
    built = SwitchML(msg_type=f["msg_type"], size=f["size_enum"], job_number=f["job_number"], tsi=f["tsi"],
                     set=f["set"], slot=f["slot"], e0=f["e0"], e1=f["e1"], values=f["payload"])
    assert bytes(built) == data


def test_scapy_binds_switchml_port():
    from scapy.layers.inet import IP, UDP

    data = bytes.fromhex(CASES[0]["hex"])
    frame = IP(bytes(IP(dst="127.0.0.1") / UDP(sport=5000, dport=protocol.UDP_PORT) / data))
    assert frame.haslayer(SwitchML) and frame[SwitchML].slot == CASES[0]["fields"]["slot"]


@pytest.mark.parametrize("field,value", [("job_number", 256), ("tsi", -1), ("e0", 128), ("msg_type", 16)])
def test_encode_rejects_out_of_range_fields(field, value):
    fields = dict(msg_type=0, size=1, job_number=0, tsi=0, slot=0, set_bit=0, e0=0)
    fields[field] = value
    with pytest.raises(WireFormatError, match=field):
        protocol.encode_header(**fields)


def test_decode_rejects_short_and_mismatched_packets():
    data = bytes.fromhex(CASES[0]["hex"])
    with pytest.raises(WireFormatError, match="shorter"):
        protocol.decode_packet(data[:9])
    with pytest.raises(WireFormatError, match="needs"):
        protocol.decode_packet(data[:-4])
    with pytest.raises(WireFormatError, match="slot"):
        protocol.pool_index(protocol.MAX_SLOTS, 0)
    with pytest.raises(WireFormatError, match="k=100"):
        protocol.k_to_size(100)


def test_round_trip_every_size():
    rng = np.random.default_rng(0)
    for size, k in protocol.SIZE_TO_K.items():
        payload = rng.integers(-(2**31), 2**31, k, dtype=np.int64).astype(np.int32)
        data = protocol.encode_packet(1, 9, 2**32 - 2, 1234, 1, -126, payload)
        assert len(data) == protocol.packet_bytes(k)
        assert protocol.decode_header(data).size == size
        back = protocol.decode_packet(data)
        assert np.array_equal(back.payload, payload) and back.e0 == -126 and back.set_bit == 1
