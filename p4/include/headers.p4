/* headers.p4: the headers both P4 programs parse and emit.
 *
 * The switchml layout is wire format v1 (switchml/protocol.py, DESIGN.md); field order and
 * widths are checked against that module, and against tests/data/wire_v1.json, by
 * tests/test_p4_contract.py. P4 emits header fields most significant bit first, so the
 * payload's int32 elements are big-endian on the wire, as protocol.py encodes them.
 */
#ifndef _SWITCHML_HEADERS_P4_
#define _SWITCHML_HEADERS_P4_

header ethernet_h {
    bit<48> dst_addr;
    bit<48> src_addr;
    bit<16> ether_type;
}

header ipv4_h {
    bit<4>  version;
    bit<4>  ihl;
    bit<8>  diffserv;
    bit<16> total_len;
    bit<16> identification;
    bit<3>  flags;
    bit<13> frag_offset;
    bit<8>  ttl;
    bit<8>  protocol;
    bit<16> hdr_checksum;
    bit<32> src_addr;
    bit<32> dst_addr;
}

header udp_h {
    bit<16> src_port;
    bit<16> dst_port;
    bit<16> length;
    bit<16> checksum;
}

// The 8-byte switchml header. pool_index (16 bits on the wire) is split so that the set
// and the slot are fields of their own: bit 15 is the set, bit 14 is unused.
header switchml_h {
    bit<4>  msg_type;
    bit<1>  unused;
    bit<3>  size;
    bit<8>  job_number;
    bit<32> tsi;
    bit<1>  set_bit;
    bit<1>  pool_unused;
    bit<14> slot;
}

// Block exponents: e0 is an int8 carried as bits (P4 arithmetic on it is unsigned, so the
// programs compare it explicitly as signed); e1 is reserved and passed through.
header exponents_h {
    bit<8> e0;
    bit<8> e1;
}

// k = 64 int32 elements. The sum wraps modulo 2^32, which is int32 addition.
header payload_h {
    bit<32> d00; bit<32> d01; bit<32> d02; bit<32> d03; bit<32> d04; bit<32> d05; bit<32> d06; bit<32> d07;
    bit<32> d08; bit<32> d09; bit<32> d10; bit<32> d11; bit<32> d12; bit<32> d13; bit<32> d14; bit<32> d15;
    bit<32> d16; bit<32> d17; bit<32> d18; bit<32> d19; bit<32> d20; bit<32> d21; bit<32> d22; bit<32> d23;
    bit<32> d24; bit<32> d25; bit<32> d26; bit<32> d27; bit<32> d28; bit<32> d29; bit<32> d30; bit<32> d31;
    bit<32> d32; bit<32> d33; bit<32> d34; bit<32> d35; bit<32> d36; bit<32> d37; bit<32> d38; bit<32> d39;
    bit<32> d40; bit<32> d41; bit<32> d42; bit<32> d43; bit<32> d44; bit<32> d45; bit<32> d46; bit<32> d47;
    bit<32> d48; bit<32> d49; bit<32> d50; bit<32> d51; bit<32> d52; bit<32> d53; bit<32> d54; bit<32> d55;
    bit<32> d56; bit<32> d57; bit<32> d58; bit<32> d59; bit<32> d60; bit<32> d61; bit<32> d62; bit<32> d63;
}

struct headers_t {
    ethernet_h  ethernet;
    ipv4_h      ipv4;
    udp_h       udp;
    switchml_h  switchml;
    exponents_h exponents;
    payload_h   payload;
}

#endif  /* _SWITCHML_HEADERS_P4_ */
