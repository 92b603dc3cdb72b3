"""A scapy layer for wire format v1, for the tests and debugging (``tcpdump``-style dissection).

Field names and widths come from ``switchml.protocol``; ``tests/test_protocol.py`` checks
that this layer and the protocol module encode and decode the shared vectors alike.

    >>> from scapy_layer import SwitchML      # tests/ is on sys.path under pytest
    >>> pkt = IP(dst="127.0.0.1") / UDP(dport=48864) / SwitchML(msg_type=0, size=1, slot=5) / payload
"""

from __future__ import annotations

from scapy.fields import BitEnumField, BitField, ByteField, FieldListField, SignedByteField, SignedIntField
from scapy.layers.inet import UDP
from scapy.packet import Packet, bind_layers

from switchml import protocol

_MSG_TYPES = {t.value: t.name for t in protocol.MsgType}


class SwitchML(Packet):
    """Header (8 B), exponents (2 B) and the big-endian int32 payload."""

    name = "SwitchML"
    fields_desc = [
        BitEnumField("msg_type", 0, 4, _MSG_TYPES),
        BitField("unused", 0, 1),
        BitField("size", 1, 3),
        ByteField("job_number", 0),
        BitField("tsi", 0, 32),  # unsigned (scapy's IntField is signed)
        BitField("set", 0, 1),
        BitField("reserved", 0, 1),
        BitField("slot", 0, 14),
        SignedByteField("e0", 0),
        SignedByteField("e1", 0),
        # "values", not "payload": scapy's Packet.payload is the next layer
        FieldListField("values", [], SignedIntField("", 0), count_from=lambda pkt: protocol.SIZE_TO_K[pkt.size],
                       max_count=protocol.MAX_K),
    ]

bind_layers(UDP, SwitchML, dport=protocol.UDP_PORT)
bind_layers(UDP, SwitchML, sport=protocol.UDP_PORT)
