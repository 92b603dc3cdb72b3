"""Wire format v1: the one contract between worker, software switch and P4 programs.

Every constant of the format lives here; the emulator, the scapy layer and the P4 tests
read it from this module (``tests/test_p4_contract.py`` checks ``p4/include`` against it).

UDP payload layout (big-endian, after p4app-switchML's UDP transport)::

    byte 0    msg_type:4 | unused:1 | size:3
    byte 1    job_number:8
    bytes 2-5 tsi:32            sender's packet id, echoed back in the RESULT
    bytes 6-7 pool_index:16     bit 15 = set (shadow copy), bits 13..0 = slot
    byte 8    e0:int8           block exponent (127 = NaN/Inf sentinel)
    byte 9    e1:int8           reserved, 0
    then      k x int32, big-endian
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

UDP_PORT = 0xBEE0  #: 48864, the switch's UDP port
UDP_PORT_MATCH = (0xBEE0, 0xFFF0)  #: value/mask the switch matches on the UDP destination port

HEADER_BYTES = 8
EXPONENT_BYTES = 2
PREAMBLE_BYTES = HEADER_BYTES + EXPONENT_BYTES  #: bytes before the payload
ELEMENT_BYTES = 4  #: one int32

SET_SHIFT = 15
SET_BIT = 1 << SET_SHIFT  #: pool_index bit 15 (0x8000)
SLOT_MASK = 0x3FFF  #: pool_index bits 13..0
MSG_TYPE_SHIFT = 4  #: byte 0: msg_type in bits 7..4, unused bit 3
SIZE_MASK = 0x7  #: byte 0: size in bits 2..0
MAX_SLOTS = SLOT_MASK + 1

#: size enum -> elements per packet. 0..3 are p4app-switchML's; 4..7 only the software switch takes.
SIZE_TO_K: dict[int, int] = {0: 32, 1: 64, 2: 128, 3: 256, 4: 512, 5: 1024, 6: 2048, 7: 4096}
K_TO_SIZE: dict[int, int] = {k: s for s, k in SIZE_TO_K.items()}
HARDWARE_SIZES = frozenset({0, 1, 2, 3})  #: size enums a P4 target may accept
MAX_K = max(SIZE_TO_K.values())

EXP_NAN = 127  #: e0 sentinel: the block holds NaN/Inf (or |x| >= 2^126)
EXP_MIN = -126  #: e0 of an all-zero block
INT8_MIN, INT8_MAX = -128, 127

MAX_WORKERS = 32  #: width of the switch's worker bitmap
MAX_JOBS = 256  #: job_number is 8 bits

#: The call descriptor (switchml.worker): packet 0 of every allreduce call carries, in payload
#: lane ``worker_id`` (one-hot, so the switch's sum returns every rank's word exactly), the word
#: ``min(elements, DESCRIPTOR_MAX_ELEMENTS) << DESCRIPTOR_DTYPE_BITS | dtype code``. The switch
#: only sums; the workers compare. Code 0 never occurs, so a zero lane is "no descriptor".
DESCRIPTOR_DTYPE_BITS = 2
DESCRIPTOR_MAX_ELEMENTS = (1 << (32 - DESCRIPTOR_DTYPE_BITS)) - 1  #: larger counts saturate (> 4 GB of float32)
DTYPE_CODES: dict[str, int] = {"float32": 1, "int32": 2}

PREAMBLE = struct.Struct(">BBIHbb")  #: the 10 bytes before the payload: byte0, job, tsi, pool_index, e0, e1


class MsgType(IntEnum):
    """The ``msg_type`` nibble."""

    UPDATE = 0  #: worker -> switch: a contribution
    RESULT = 1  #: switch -> worker: a completed sum
    RESET = 2  #: controller -> switch: clear both sets of a slot (answered with a RESET echo)


class WireFormatError(ValueError):
    """A packet or a field that does not fit wire format v1."""


def k_to_size(k: int) -> int:
    """The size enum for ``k`` elements per packet."""
    try:
        return K_TO_SIZE[k]
    except KeyError:
        raise WireFormatError(f"k={k} is not a packet size of wire format v1; expected one of {sorted(K_TO_SIZE)}") from None


def packet_bytes(k: int) -> int:
    """UDP payload length of a packet of ``k`` elements."""
    return PREAMBLE_BYTES + ELEMENT_BYTES * k


def pool_index(slot: int, set_bit: int) -> int:
    """Pack ``slot`` and the shadow-copy ``set_bit`` into the 16-bit pool_index."""
    if not 0 <= slot <= SLOT_MASK:
        raise WireFormatError(f"slot={slot} out of range 0..{SLOT_MASK}")
    return (SET_BIT if set_bit else 0) | slot


@dataclass(frozen=True)
class Header:
    """The decoded 10 bytes before the payload."""

    msg_type: int
    size: int
    job_number: int
    tsi: int
    slot: int
    set_bit: int
    e0: int
    e1: int = 0

    @property
    def k(self) -> int:
        return SIZE_TO_K[self.size]


def encode_header(
    msg_type: int, size: int, job_number: int, tsi: int, slot: int, set_bit: int, e0: int, e1: int = 0
) -> bytes:
    """The 10-byte preamble; every field is range-checked."""
    for name, value, lo, hi in (
        ("msg_type", msg_type, 0, 15),
        ("size", size, 0, 7),
        ("job_number", job_number, 0, 255),
        ("tsi", tsi, 0, 0xFFFFFFFF),
        ("e0", e0, INT8_MIN, INT8_MAX),
        ("e1", e1, INT8_MIN, INT8_MAX),
    ):
        if not lo <= value <= hi:
            raise WireFormatError(f"{name}={value} out of range {lo}..{hi}")
    return PREAMBLE.pack((msg_type << MSG_TYPE_SHIFT) | size, job_number, tsi, pool_index(slot, set_bit), e0, e1)


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Decode the preamble of ``data``; raises WireFormatError if it is too short."""
    if len(data) < PREAMBLE_BYTES:
        raise WireFormatError(f"packet of {len(data)} bytes is shorter than the {PREAMBLE_BYTES}-byte header")
    byte0, job, tsi, pidx, e0, e1 = PREAMBLE.unpack_from(data)
    return Header(byte0 >> MSG_TYPE_SHIFT, byte0 & SIZE_MASK, job, tsi, pidx & SLOT_MASK, pidx >> SET_SHIFT, e0, e1)


@dataclass(frozen=True)
class Packet:
    """A whole switchml packet: header fields and the int32 payload."""

    msg_type: int
    job_number: int
    tsi: int
    slot: int
    set_bit: int
    e0: int
    payload: np.ndarray = field(repr=False)  #: int32, length k
    e1: int = 0

    @property
    def k(self) -> int:
        return int(self.payload.shape[0])

    def encode(self) -> bytes:
        """Serialise to the UDP payload."""
        return encode_packet(self.msg_type, self.job_number, self.tsi, self.slot, self.set_bit, self.e0, self.payload, self.e1)


def encode_packet(
    msg_type: int, job_number: int, tsi: int, slot: int, set_bit: int, e0: int, payload: np.ndarray, e1: int = 0
) -> bytes:
    """Header plus the payload as big-endian int32."""
    payload = np.asarray(payload)
    size = k_to_size(int(payload.shape[0]))
    return encode_header(msg_type, size, job_number, tsi, slot, set_bit, e0, e1) + payload.astype(">i4").tobytes()


def decode_packet(data: bytes | bytearray | memoryview) -> Packet:
    """Decode a whole packet; raises WireFormatError on a bad size enum or a length mismatch."""
    h = decode_header(data)
    expected = packet_bytes(h.k)
    if len(data) != expected:
        raise WireFormatError(f"packet of {len(data)} bytes; size={h.size} (k={h.k}) needs {expected}")
    payload = np.frombuffer(data, dtype=">i4", count=h.k, offset=PREAMBLE_BYTES).astype(np.int32)
    return Packet(h.msg_type, h.job_number, h.tsi, h.slot, h.set_bit, h.e0, payload, h.e1)
