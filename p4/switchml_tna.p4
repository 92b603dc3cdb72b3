/* -*- P4_16 -*- */
/* switchml_tna.p4: SwitchML in-network aggregation for Tofino (TNA), k = 64.
 *
 * The same semantics, tables, actions, parameters and counters as switchml_v1model.p4
 * (switchml/pipeline.py is the contract), shaped by what Tofino allows:
 *
 *  - A stateful ALU touches one register entry per packet and returns one 32-bit word.
 *    Each value register holds a pair of elements (i, i + 32), as in p4app-switchML: the
 *    worker's packet adds both halves and reads out the second; a recirculated second pass
 *    (the "harvest") reads out the first half, then the result is multicast or answered.
 *  - Registers live in one pipe. Everything happens in the pipe a packet arrived on, and the
 *    harvest recirculates to that pipe's recirculation port: all workers of a job must be
 *    attached to ports of one pipe.
 *  - Comparisons between two run-time values are done by subtracting and testing the sign
 *    bit, and 1 << worker_id by a const table: Tofino's gateways and ALUs do neither.
 *  - The egress pipe cannot see the multicast group, so ingress bridges it in a header in
 *    front of the packet; egress_rewrite's key keeps the contract's P4Runtime names
 *    ("standard_metadata.mcast_grp", ...) through @name annotations.
 *  - The exponent register stores e0 ^ 0x80: that maps int8 order onto unsigned order, so
 *    the stateful ALU's unsigned max is the signed max the semantics ask for.
 *  - A counter can be addressed once per packet, but the contract's SwitchIngress.packets
 *    counts a new contribution twice (RECEIVED and AGGREGATED). Here `packets` counts
 *    RECEIVED only, and SwitchIngress.packet_outcomes (same indices) counts AGGREGATED and
 *    RESETS: a Tofino target reads those two indices from it.
 *
 * Not verified: this program has not been compiled (bf-p4c comes with Intel's P4 Studio
 * SDE, which this project cannot install) nor run on a Tofino. Its table names, keys and
 * action parameters are checked against the contract by tests/test_p4_contract.py, which
 * also compiles it when bf-p4c is on PATH:
 *
 *   bf-p4c --arch tna --p4runtime-files switchml_tna.p4info.txtpb -o build p4/switchml_tna.p4
 *
 * Whether it fits Tofino 1's stages and PHV (32 pair registers, 64 payload words) is
 * unknown; the control plane must also set up the recirculation port of each pipe used.
 */
#include <core.p4>
#include <tna.p4>

#include "include/constants.p4"
#include "include/headers.p4"

// Port 68 of each pipe is its recirculation port on Tofino 1 (pipe n: n << 7 | 68).
#ifndef RECIRCULATION_PORT_IN_PIPE
#define RECIRCULATION_PORT_IN_PIPE 68
#endif

// What the first pass decided; the bridge carries it to the harvest pass and to egress.
const bit<8> BRIDGE_NONE = 0;       // plain forwarding, RESET echo
const bit<8> BRIDGE_HARVEST = 1;    // recirculated: read the first halves, then send
const bit<8> BRIDGE_MULTICAST = 2;  // a result on its way to every worker: rewrite in egress
const bit<8> BRIDGE_ANSWER = 3;     // a result on its way back to one worker

// Which RegisterAction each value pair runs (the op_NN tables of control Values).
const bit<3> VALUE_OP_NONE = 0;
const bit<3> VALUE_OP_WRITE = 1;        // first contribution: store, read the second half
const bit<3> VALUE_OP_ADD = 2;          // later contribution: add, read the second half
const bit<3> VALUE_OP_READ_SECOND = 3;  // answer to a retransmission, first pass
const bit<3> VALUE_OP_READ_FIRST = 4;   // harvest pass

// 8 bytes in front of the Ethernet header, never seen outside the switch.
header bridge_h {
    bit<8>   kind;           // BRIDGE_*: what this pass or egress is to do
    bit<8>   next_kind;      // of a harvest: BRIDGE_MULTICAST or BRIDGE_ANSWER, what follows it
    bit<16>  mgid;           // the job's multicast group
    bit<16>  index;          // set * POOL_SIZE + slot, for the harvest
    bit<7>   pad;
    PortId_t ingress_port;   // the worker's port, for an answer after the harvest
}

struct value_pair_t {
    bit<32> first;
    bit<32> second;
}

struct bitmap_pair_t {
    bit<32> first;   // set 0
    bit<32> second;  // set 1
}

struct ingress_metadata_t {
    bridge_h bridge;
    bool     reset_length_ok;  // parser: a RESET whose length matches its (unread) size
    bit<16>  drop_threshold;   // loss: drop when random(0..32767) < threshold
    bit<16>  loss_margin;      // roll - threshold: negative means drop
    bit<2>   role;
    bit<8>   job;
    bit<5>   worker_id;
    bit<8>   num_workers;
    bit<8>   last_count;       // num_workers - 1: the count before the completing packet
    bit<16>  mgid;
    bit<16>  pool_base;
    bit<16>  pool_size;
    bit<16>  pool_offset;      // slot - pool_base: negative means below the job's range
    bit<16>  pool_margin;      // pool_offset - pool_size: negative means inside the range
    bit<32>  worker_bit;       // 1 << worker_id
    bit<32>  seen_before;      // the set's bitmap before this packet
    bit<8>   count_before;     // the set's contributions before this packet
    bit<8>   biased_e0;        // e0 ^ 0x80
    bit<3>   value_op;
    bool     dropped;
    bit<32>  drop_reason;
}

struct egress_metadata_t {
    bridge_h bridge;
}

/*************************************************************************
 ***********************  I N G R E S S   P A R S E R  *******************
 *************************************************************************/

parser SwitchIngressParser(packet_in pkt,
                           out headers_t hdr,
                           out ingress_metadata_t ig_md,
                           out ingress_intrinsic_metadata_t ig_intr_md) {

    state start {
        pkt.extract(ig_intr_md);
        pkt.advance(PORT_METADATA_SIZE);
        // Tofino does not zero metadata: every field a later stage may read before it writes
        // starts from a known value here (p4test warns of each one left out).
        ig_md.reset_length_ok = false;
        ig_md.drop_threshold = 0;
        ig_md.loss_margin = 0;
        ig_md.role = ROLE_NONE;
        ig_md.job = 0;
        ig_md.worker_id = 0;
        ig_md.num_workers = 0;
        ig_md.last_count = 0;
        ig_md.mgid = 0;
        ig_md.pool_base = 0;
        ig_md.pool_size = 0;
        ig_md.pool_offset = 0;
        ig_md.pool_margin = 0;
        ig_md.worker_bit = 0;
        ig_md.seen_before = 0;
        ig_md.count_before = 0;
        ig_md.biased_e0 = 0;
        ig_md.value_op = VALUE_OP_NONE;
        ig_md.dropped = false;
        ig_md.drop_reason = 0;
        transition select(ig_intr_md.ingress_port[6:0]) {
            RECIRCULATION_PORT_IN_PIPE: parse_bridge;
            default: parse_ethernet;
        }
    }

    state parse_bridge {
        // Only harvest passes come back through the recirculation port.
        pkt.extract(ig_md.bridge);
        transition parse_ethernet;
    }

    state parse_ethernet {
        pkt.extract(hdr.ethernet);
        transition select(hdr.ethernet.ether_type) {
            ETHERTYPE_IPV4: parse_ipv4;
            default: accept;
        }
    }

    state parse_ipv4 {
        pkt.extract(hdr.ipv4);
        transition select(hdr.ipv4.ihl, hdr.ipv4.frag_offset, hdr.ipv4.protocol) {
            (5, 0, IP_PROTOCOL_UDP): parse_udp;
            default: accept;
        }
    }

    state parse_udp {
        pkt.extract(hdr.udp);
        transition select(hdr.udp.dst_port) {
            SWITCHML_UDP_PORT &&& SWITCHML_UDP_PORT_MASK: parse_switchml;
            default: accept;
        }
    }

    state parse_switchml {
        pkt.extract(hdr.switchml);
        pkt.extract(hdr.exponents);
        // As in the v1model program: the payload only for k = 64 with a matching length; a
        // RESET of any hardware size is well formed without reading its payload.
        transition select(hdr.switchml.msg_type, hdr.switchml.size, hdr.udp.length) {
            (_, SWITCHML_SIZE, SWITCHML_UDP_LENGTH): parse_payload;
            (MSG_TYPE_RESET, SWITCHML_SIZE_K32, SWITCHML_UDP_LENGTH_K32): reset_without_payload;
            (MSG_TYPE_RESET, SWITCHML_SIZE_K128, SWITCHML_UDP_LENGTH_K128): reset_without_payload;
            (MSG_TYPE_RESET, SWITCHML_SIZE_K256, SWITCHML_UDP_LENGTH_K256): reset_without_payload;
            default: accept;
        }
    }

    state parse_payload {
        pkt.extract(hdr.payload);
        transition accept;
    }

    state reset_without_payload {
        ig_md.reset_length_ok = true;
        transition accept;
    }
}

/*************************************************************************
 ***************  A G G R E G A T I O N   S T A T E  *********************
 *************************************************************************/

// Worker bitmaps (both sets of a slot in one pair register, so one access can mark the
// worker in its set and clear it from the other), contributions per set, max exponent.
control Bookkeeping(inout headers_t hdr, inout ingress_metadata_t ig_md) {

    Register<bitmap_pair_t, bit<16>>(POOL_SIZE) seen;
    Register<bit<8>, bit<16>>(POOL_SIZE) contributions_set0;
    Register<bit<8>, bit<16>>(POOL_SIZE) contributions_set1;
    Register<bit<8>, bit<16>>(REGISTER_SIZE) max_exponent;

    RegisterAction<bitmap_pair_t, bit<16>, bit<32>>(seen) mark_set0 = {
        void apply(inout bitmap_pair_t bitmaps, out bit<32> before) {
            before = bitmaps.first;
            bitmaps.first = bitmaps.first | ig_md.worker_bit;
            bitmaps.second = bitmaps.second & ~ig_md.worker_bit;
        }
    };
    RegisterAction<bitmap_pair_t, bit<16>, bit<32>>(seen) mark_set1 = {
        void apply(inout bitmap_pair_t bitmaps, out bit<32> before) {
            before = bitmaps.second;
            bitmaps.first = bitmaps.first & ~ig_md.worker_bit;
            bitmaps.second = bitmaps.second | ig_md.worker_bit;
        }
    };
    RegisterAction<bitmap_pair_t, bit<16>, bit<32>>(seen) clear_bitmaps = {
        void apply(inout bitmap_pair_t bitmaps) {
            bitmaps.first = 0;
            bitmaps.second = 0;
        }
    };

    // contributions_set0: count = (count + 1) mod num_workers, returning the count before.
    RegisterAction<bit<8>, bit<16>, bit<8>>(contributions_set0) contributions_set0_count = {
        void apply(inout bit<8> count, out bit<8> before) {
            before = count;
            if (count == ig_md.last_count) {
                count = 0;
            } else {
                count = count + 1;
            }
        }
    };
    RegisterAction<bit<8>, bit<16>, bit<8>>(contributions_set0) contributions_set0_read = {
        void apply(inout bit<8> count, out bit<8> before) {
            before = count;
        }
    };
    RegisterAction<bit<8>, bit<16>, bit<8>>(contributions_set0) contributions_set0_clear = {
        void apply(inout bit<8> count) {
            count = 0;
        }
    };
    // contributions_set1: count = (count + 1) mod num_workers, returning the count before.
    RegisterAction<bit<8>, bit<16>, bit<8>>(contributions_set1) contributions_set1_count = {
        void apply(inout bit<8> count, out bit<8> before) {
            before = count;
            if (count == ig_md.last_count) {
                count = 0;
            } else {
                count = count + 1;
            }
        }
    };
    RegisterAction<bit<8>, bit<16>, bit<8>>(contributions_set1) contributions_set1_read = {
        void apply(inout bit<8> count, out bit<8> before) {
            before = count;
        }
    };
    RegisterAction<bit<8>, bit<16>, bit<8>>(contributions_set1) contributions_set1_clear = {
        void apply(inout bit<8> count) {
            count = 0;
        }
    };

    RegisterAction<bit<8>, bit<16>, bit<8>>(max_exponent) exponent_write = {
        void apply(inout bit<8> biased, out bit<8> result) {
            biased = ig_md.biased_e0;
            result = biased;
        }
    };
    RegisterAction<bit<8>, bit<16>, bit<8>>(max_exponent) exponent_max = {
        void apply(inout bit<8> biased, out bit<8> result) {
            if (ig_md.biased_e0 > biased) { biased = ig_md.biased_e0; }
            result = biased;
        }
    };
    RegisterAction<bit<8>, bit<16>, bit<8>>(max_exponent) exponent_read = {
        void apply(inout bit<8> biased, out bit<8> result) { result = biased; }
    };

    apply {
        bit<16> slot = (bit<16>)hdr.switchml.slot;
        if (hdr.switchml.msg_type == MSG_TYPE_RESET) {
            clear_bitmaps.execute(slot);
            contributions_set0_clear.execute(slot);
            contributions_set1_clear.execute(slot);
        } else {
            if (hdr.switchml.set_bit == 0) {
                ig_md.seen_before = mark_set0.execute(slot);
            } else {
                ig_md.seen_before = mark_set1.execute(slot);
            }
            bool retransmission = (ig_md.seen_before & ig_md.worker_bit) != 0;
            if (hdr.switchml.set_bit == 0) {
                if (retransmission) {
                    ig_md.count_before = contributions_set0_read.execute(slot);
                } else {
                    ig_md.count_before = contributions_set0_count.execute(slot);
                }
            } else {
                if (retransmission) {
                    ig_md.count_before = contributions_set1_read.execute(slot);
                } else {
                    ig_md.count_before = contributions_set1_count.execute(slot);
                }
            }

            bit<8> biased;
            if (retransmission) {
                biased = exponent_read.execute(ig_md.bridge.index);
                if (ig_md.count_before == 0) {
                    ig_md.value_op = VALUE_OP_READ_SECOND;
                    ig_md.bridge.next_kind = BRIDGE_ANSWER;      // after the harvest
                } else {
                    ig_md.dropped = true;
                    ig_md.drop_reason = DROP_RETRANSMISSION_INCOMPLETE;
                }
            } else {
                if (ig_md.count_before == 0) {
                    biased = exponent_write.execute(ig_md.bridge.index);
                    ig_md.value_op = VALUE_OP_WRITE;
                } else {
                    biased = exponent_max.execute(ig_md.bridge.index);
                    ig_md.value_op = VALUE_OP_ADD;
                }
                if (ig_md.count_before == ig_md.last_count) {
                    ig_md.bridge.next_kind = BRIDGE_MULTICAST;   // after the harvest
                }
            }
            hdr.exponents.e0 = biased ^ 0x80;
        }
    }
}

// control Values: the 32 pair registers, generated by p4/gen_registers.py.
#include "include/generated_tna_values.p4"

/*************************************************************************
 **************  I N G R E S S   P R O C E S S I N G   *******************
 *************************************************************************/

control SwitchIngress(inout headers_t hdr,
                      inout ingress_metadata_t ig_md,
                      in ingress_intrinsic_metadata_t ig_intr_md,
                      in ingress_intrinsic_metadata_from_parser_t ig_prsr_md,
                      inout ingress_intrinsic_metadata_for_deparser_t ig_dprsr_md,
                      inout ingress_intrinsic_metadata_for_tm_t ig_tm_md) {

    Counter<bit<32>, bit<32>>(POOL_SIZE, CounterType_t.PACKETS) results_multicast;         // by slot
    Counter<bit<32>, bit<32>>(POOL_SIZE, CounterType_t.PACKETS) retransmissions_answered;  // by slot
    Counter<bit<32>, bit<32>>(NUM_DROP_REASONS, CounterType_t.PACKETS) drops;              // by DROP_*
    Counter<bit<32>, bit<32>>(NUM_PACKET_COUNTERS, CounterType_t.PACKETS) packets;         // RECEIVED only
    Counter<bit<32>, bit<32>>(NUM_PACKET_COUNTERS, CounterType_t.PACKETS) packet_outcomes; // AGGREGATED, RESETS

    Random<bit<15>>() loss_roll;

    Bookkeeping() bookkeeping;
    Values() values;

    /* ---- loss: emulated packet loss per ingress port ---- */

    action set_drop_probability(bit<16> threshold) {
        ig_md.drop_threshold = threshold;
    }

    table loss {
        key = { ig_intr_md.ingress_port : exact @name("standard_metadata.ingress_port"); }
        actions = { set_drop_probability; NoAction; }
        default_action = NoAction();
        size = LOSS_TABLE_SIZE;
    }

    /* ---- admission: who the sender is, decided by its address, never by the header ---- */

    action set_worker(bit<8> job, bit<5> worker_id, bit<6> num_workers,
                      bit<16> mgid, bit<16> pool_base, bit<16> pool_size) {
        ig_md.role = ROLE_WORKER;
        ig_md.job = job;
        ig_md.worker_id = worker_id;
        ig_md.num_workers = (bit<8>)num_workers;
        ig_md.mgid = mgid;
        ig_md.pool_base = pool_base;
        ig_md.pool_size = pool_size;
    }

    action set_controller() {
        ig_md.role = ROLE_CONTROLLER;
    }

    table admission {
        key = {
            hdr.ipv4.src_addr : exact;
            hdr.udp.src_port  : exact;
        }
        actions = { set_worker; set_controller; @defaultonly NoAction; }
        const default_action = NoAction();
        size = ADMISSION_TABLE_SIZE;
    }

    /* ---- worker_bit: 1 << worker_id, which Tofino cannot shift by a variable ---- */

    action set_worker_bit(bit<32> bit_mask) {
        ig_md.worker_bit = bit_mask;
    }

    table worker_bit {
        key = { ig_md.worker_id : exact; }
        actions = { set_worker_bit; }
        const entries = {
             0 : set_worker_bit(32w1 << 0);   1 : set_worker_bit(32w1 << 1);
             2 : set_worker_bit(32w1 << 2);   3 : set_worker_bit(32w1 << 3);
             4 : set_worker_bit(32w1 << 4);   5 : set_worker_bit(32w1 << 5);
             6 : set_worker_bit(32w1 << 6);   7 : set_worker_bit(32w1 << 7);
             8 : set_worker_bit(32w1 << 8);   9 : set_worker_bit(32w1 << 9);
            10 : set_worker_bit(32w1 << 10); 11 : set_worker_bit(32w1 << 11);
            12 : set_worker_bit(32w1 << 12); 13 : set_worker_bit(32w1 << 13);
            14 : set_worker_bit(32w1 << 14); 15 : set_worker_bit(32w1 << 15);
            16 : set_worker_bit(32w1 << 16); 17 : set_worker_bit(32w1 << 17);
            18 : set_worker_bit(32w1 << 18); 19 : set_worker_bit(32w1 << 19);
            20 : set_worker_bit(32w1 << 20); 21 : set_worker_bit(32w1 << 21);
            22 : set_worker_bit(32w1 << 22); 23 : set_worker_bit(32w1 << 23);
            24 : set_worker_bit(32w1 << 24); 25 : set_worker_bit(32w1 << 25);
            26 : set_worker_bit(32w1 << 26); 27 : set_worker_bit(32w1 << 27);
            28 : set_worker_bit(32w1 << 28); 29 : set_worker_bit(32w1 << 29);
            30 : set_worker_bit(32w1 << 30); 31 : set_worker_bit(32w1 << 31);
        }
        const default_action = set_worker_bit(0);
        size = MAX_WORKERS;
    }

    /* ---- forward: plain IPv4 forwarding of traffic that is not switchml's ---- */

    action set_egress(PortId_t port, bit<48> mac) {
        ig_tm_md.ucast_egress_port = port;
        hdr.ethernet.dst_addr = mac;
    }

    action drop() {
        ig_dprsr_md.drop_ctl = 1;
    }

    table forward {
        key = { hdr.ipv4.dst_addr : lpm; }
        actions = { set_egress; drop; }
        default_action = drop();
        size = FORWARD_TABLE_SIZE;
    }

    // Addresses of a reply: it leaves from the address the sender used (the switch's).
    action swap_addresses() {
        bit<48> mac = hdr.ethernet.src_addr;
        hdr.ethernet.src_addr = hdr.ethernet.dst_addr;
        hdr.ethernet.dst_addr = mac;
        bit<32> ip = hdr.ipv4.src_addr;
        hdr.ipv4.src_addr = hdr.ipv4.dst_addr;
        hdr.ipv4.dst_addr = ip;
        bit<16> port = hdr.udp.src_port;
        hdr.udp.src_port = hdr.udp.dst_port;
        hdr.udp.dst_port = port;
    }

    apply {
        bool is_switchml = hdr.udp.isValid() &&
            (hdr.udp.dst_port & SWITCHML_UDP_PORT_MASK) == SWITCHML_UDP_PORT;

        if (ig_md.bridge.isValid() && ig_md.bridge.kind == BRIDGE_HARVEST) {
            // Second pass of a complete slot or of an answer: read the first halves out
            // (values.apply below), then send the result on.
            ig_md.value_op = VALUE_OP_READ_FIRST;
            if (ig_md.bridge.next_kind == BRIDGE_MULTICAST) {
                results_multicast.count((bit<32>)hdr.switchml.slot);
                ig_tm_md.mcast_grp_a = ig_md.bridge.mgid;
            } else {
                retransmissions_answered.count((bit<32>)hdr.switchml.slot);
                ig_tm_md.ucast_egress_port = ig_md.bridge.ingress_port;
            }
            ig_md.bridge.kind = ig_md.bridge.next_kind;
        } else if (!is_switchml) {
            ig_md.bridge.setValid();
            ig_md.bridge.kind = BRIDGE_NONE;
            if (hdr.ipv4.isValid()) {
                forward.apply();
            } else {
                ig_dprsr_md.drop_ctl = 1;
            }
        } else {
            packets.count(PACKETS_RECEIVED);
            ig_md.bridge.setValid();
            ig_md.bridge.kind = BRIDGE_NONE;
            ig_md.bridge.next_kind = BRIDGE_NONE;
            ig_md.bridge.pad = 0;
            ig_md.bridge.ingress_port = ig_intr_md.ingress_port;
            ig_md.bridge.index = (bit<16>)hdr.switchml.slot;
            if (hdr.switchml.set_bit == 1) {
                ig_md.bridge.index = ig_md.bridge.index + POOL_SIZE;
            }

            loss.apply();
            ig_md.loss_margin = (bit<16>)loss_roll.get() - ig_md.drop_threshold;

            if (ig_md.loss_margin[15:15] == 1) {
                ig_md.dropped = true;
                ig_md.drop_reason = DROP_EMULATED_LOSS;
            } else if (!hdr.exponents.isValid()) {
                ig_md.dropped = true;
                ig_md.drop_reason = DROP_MALFORMED;
            } else if (hdr.switchml.size != SWITCHML_SIZE &&
                       (hdr.switchml.msg_type != MSG_TYPE_RESET ||
                        hdr.switchml.size > SWITCHML_MAX_HARDWARE_SIZE)) {
                ig_md.dropped = true;
                ig_md.drop_reason = DROP_BAD_SIZE;
            } else if (!(hdr.payload.isValid() || ig_md.reset_length_ok)) {
                // Unlike the v1model program, the IPv4 length and checksum are not checked:
                // the parser would have to carry them this far, and the MAC already drops
                // damaged frames.
                ig_md.dropped = true;
                ig_md.drop_reason = DROP_MALFORMED;
            } else {
                admission.apply();
                ig_md.last_count = ig_md.num_workers - 1;
                ig_md.pool_offset = (bit<16>)hdr.switchml.slot - ig_md.pool_base;
                ig_md.pool_margin = ig_md.pool_offset - ig_md.pool_size;

                if (hdr.switchml.msg_type == MSG_TYPE_RESET) {
                    if (ig_md.role != ROLE_CONTROLLER) {
                        ig_md.dropped = true;
                        ig_md.drop_reason = DROP_RESET_NOT_FROM_CONTROLLER;
                    } else if ((bit<16>)hdr.switchml.slot >= POOL_SIZE) {
                        ig_md.dropped = true;
                        ig_md.drop_reason = DROP_SLOT_OUT_OF_RANGE;
                    }
                } else if (hdr.switchml.msg_type != MSG_TYPE_UPDATE) {
                    ig_md.dropped = true;
                    ig_md.drop_reason = DROP_BAD_MSG_TYPE;
                } else if (ig_md.role != ROLE_WORKER) {
                    ig_md.dropped = true;
                    ig_md.drop_reason = DROP_NOT_ADMITTED;
                } else if (hdr.switchml.job_number != ig_md.job) {
                    ig_md.dropped = true;
                    ig_md.drop_reason = DROP_JOB_MISMATCH;
                } else if (ig_md.pool_offset[15:15] == 1 || ig_md.pool_margin[15:15] == 0 ||
                           (bit<16>)hdr.switchml.slot >= POOL_SIZE) {
                    // slot < pool_base, or slot >= pool_base + pool_size, or off the pool.
                    ig_md.dropped = true;
                    ig_md.drop_reason = DROP_SLOT_OUT_OF_RANGE;
                }

                if (!ig_md.dropped) {
                    worker_bit.apply();
                    ig_md.biased_e0 = hdr.exponents.e0 ^ 0x80;
                    bookkeeping.apply(hdr, ig_md);
                }
            }

            if (ig_md.dropped) {
                drops.count(ig_md.drop_reason);
                ig_dprsr_md.drop_ctl = 1;
            } else if (hdr.switchml.msg_type == MSG_TYPE_RESET) {
                // The echo, back to the controller, acknowledges the reset.
                packet_outcomes.count(PACKETS_RESETS);
                swap_addresses();
                ig_tm_md.ucast_egress_port = ig_intr_md.ingress_port;
            } else {
                if (ig_md.value_op == VALUE_OP_WRITE || ig_md.value_op == VALUE_OP_ADD) {
                    packet_outcomes.count(PACKETS_AGGREGATED);
                }
                if (ig_md.bridge.next_kind == BRIDGE_NONE) {
                    // Absorbed: the slot waits for the other workers.
                    ig_dprsr_md.drop_ctl = 1;
                } else {
                    // Complete, or an answer: make the packet the RESULT now and recirculate
                    // it once, so that the harvest pass reads the first halves out.
                    hdr.switchml.msg_type = MSG_TYPE_RESULT;
                    hdr.exponents.e1 = 0;
                    swap_addresses();
                    ig_md.bridge.kind = BRIDGE_HARVEST;
                    ig_md.bridge.mgid = ig_md.mgid;
                    ig_tm_md.ucast_egress_port =
                        ig_intr_md.ingress_port[8:7] ++ (bit<7>)RECIRCULATION_PORT_IN_PIPE;
                    ig_tm_md.bypass_egress = 1;
                }
            }
        }

        // One application for both passes: VALUE_OP_NONE leaves every register alone.
        values.apply(hdr.payload, ig_md.bridge.index, ig_md.value_op);
    }
}

control SwitchIngressDeparser(packet_out pkt,
                              inout headers_t hdr,
                              in ingress_metadata_t ig_md,
                              in ingress_intrinsic_metadata_for_deparser_t ig_dprsr_md) {
    apply {
        // The bridge goes first: the egress parser (or, for a harvest, the ingress parser
        // on the recirculation port) takes it off again.
        pkt.emit(ig_md.bridge);
        pkt.emit(hdr);
    }
}

/*************************************************************************
 ************************  E G R E S S   P A R S E R  ********************
 *************************************************************************/

parser SwitchEgressParser(packet_in pkt,
                          out headers_t hdr,
                          out egress_metadata_t eg_md,
                          out egress_intrinsic_metadata_t eg_intr_md) {
    // Egress rewrites addresses only: the payload is not parsed and passes through.
    state start {
        pkt.extract(eg_intr_md);
        pkt.extract(eg_md.bridge);
        transition select(eg_md.bridge.kind) {
            BRIDGE_NONE: accept;
            default: parse_ethernet;
        }
    }

    state parse_ethernet {
        pkt.extract(hdr.ethernet);
        pkt.extract(hdr.ipv4);
        pkt.extract(hdr.udp);
        pkt.extract(hdr.switchml);
        transition accept;
    }
}

/*************************************************************************
 ****************  E G R E S S   P R O C E S S I N G   *******************
 *************************************************************************/

control SwitchEgress(inout headers_t hdr,
                     inout egress_metadata_t eg_md,
                     in egress_intrinsic_metadata_t eg_intr_md,
                     in egress_intrinsic_metadata_from_parser_t eg_prsr_md,
                     inout egress_intrinsic_metadata_for_deparser_t eg_dprsr_md,
                     inout egress_intrinsic_metadata_for_output_port_t eg_oport_md) {

    /* ---- egress_rewrite: address each copy of a multicast result to its worker ---- */

    action set_destination(bit<48> mac, bit<32> ip, bit<16> udp_port) {
        hdr.ethernet.dst_addr = mac;
        hdr.ipv4.dst_addr = ip;
        hdr.udp.dst_port = udp_port;
    }

    action drop() {
        eg_dprsr_md.drop_ctl = 1;
    }

    table egress_rewrite {
        key = {
            eg_md.bridge.mgid     : exact @name("standard_metadata.mcast_grp");
            eg_intr_md.egress_rid : exact @name("standard_metadata.egress_rid");
        }
        actions = { set_destination; drop; }
        default_action = drop();
        size = EGRESS_REWRITE_TABLE_SIZE;
    }

    apply {
        if (eg_md.bridge.kind == BRIDGE_MULTICAST) {
            egress_rewrite.apply();
        }
        if (hdr.switchml.isValid()) {
            // Same length as it came (see the v1model program); the payload changed, so no
            // UDP checksum (0), and the IPv4 checksum is recomputed in the deparser.
            hdr.udp.checksum = 0;
        }
    }
}

control SwitchEgressDeparser(packet_out pkt,
                             inout headers_t hdr,
                             in egress_metadata_t eg_md,
                             in egress_intrinsic_metadata_for_deparser_t eg_dprsr_md) {
    Checksum() ipv4_checksum;

    apply {
        if (hdr.switchml.isValid()) {
            hdr.ipv4.hdr_checksum = ipv4_checksum.update({
                hdr.ipv4.version, hdr.ipv4.ihl, hdr.ipv4.diffserv, hdr.ipv4.total_len,
                hdr.ipv4.identification, hdr.ipv4.flags, hdr.ipv4.frag_offset, hdr.ipv4.ttl,
                hdr.ipv4.protocol, hdr.ipv4.src_addr, hdr.ipv4.dst_addr });
        }
        // The bridge is not emitted: it never leaves the switch.
        pkt.emit(hdr);
    }
}

Pipeline(
    SwitchIngressParser(),
    SwitchIngress(),
    SwitchIngressDeparser(),
    SwitchEgressParser(),
    SwitchEgress(),
    SwitchEgressDeparser()
) pipe;

Switch(pipe) main;
