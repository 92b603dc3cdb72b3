/* -*- P4_16 -*- */
/* switchml_v1model.p4: SwitchML in-network aggregation for BMv2 (simple_switch_grpc).
 *
 * Implements DESIGN.md's switch semantics with k = 64 int32 elements per packet, compiled
 * in. Table, action, parameter and counter names are the contract of switchml/pipeline.py
 * and of switchml_v1model.p4info.txtpb; tests/test_p4_contract.py checks all three agree.
 *
 *   p4c-bm2-ss --p4runtime-files switchml_v1model.p4info.txtpb \
 *       -o switchml_v1model.json p4/switchml_v1model.p4
 *
 * Checks run in the order of the software switch (emulation/switch.py), so both count the
 * same drop reason for the same packet:
 *   received -> emulated loss -> too short (MALFORMED) -> size (BAD_SIZE) -> length
 *   (MALFORMED) -> RESET: controller?, slot in pool? | UPDATE: admitted?, job?, slot in
 *   the job's range? -> aggregation.
 *
 * Built with -DSWITCHML_LEAF_ROLE it is also a leaf of a two-level tree (docs/hierarchy.md,
 * "The leaf's algorithm"): the upstream table, the has_result register and the leaf counter
 * are added, a slot its rack completes goes to the spine as one UPDATE, and the spine's
 * RESULT is stored and multicast to the rack. Its P4Info is switchml_v1model_leaf.p4info.txtpb
 * (every object of the flat program keeps its id); without the define the program is the flat
 * switch, unchanged.
 *
 *   p4c-bm2-ss -DSWITCHML_LEAF_ROLE --p4runtime-files switchml_v1model_leaf.p4info.txtpb \
 *       -o switchml_v1model_leaf.json p4/switchml_v1model.p4
 */
#include <core.p4>
// Pin the v1model version whose register<T, I> and counter<I> this program is written to.
#define V1MODEL_VERSION 20200408
#include <v1model.p4>

#include "include/constants.p4"
#include "include/headers.p4"

// What Bookkeeping decided for an UPDATE (or, on a leaf, for the spine's RESULT).
const bit<4> VERDICT_NONE = 0;
const bit<4> VERDICT_ABSORBED = 1;    // a new contribution, the slot is not complete yet
const bit<4> VERDICT_COMPLETE = 2;    // a new contribution that completes the slot
const bit<4> VERDICT_ANSWER = 3;      // a retransmission to a complete slot
const bit<4> VERDICT_INCOMPLETE = 4;  // a retransmission to a slot still waiting for others
// Leaf role only (docs/hierarchy.md, the leaf's steps 2, 5 and 6):
const bit<4> VERDICT_UPSTREAM = 5;    // a new contribution that completes the rack: its sum to the spine
const bit<4> VERDICT_RESEND = 6;      // a retransmission before the spine's RESULT came: the sum again
const bit<4> VERDICT_STORE = 7;       // the spine's RESULT for a rack sum waiting: keep it, multicast it
const bit<4> VERDICT_IGNORED = 8;     // the spine's RESULT for a set with no rack sum waiting

struct metadata_t {
    bool    reset_length_ok;  // parser: a RESET whose length matches its (unread) size
    bit<16> drop_threshold;   // loss: drop when random(0..32767) < threshold
    bit<2>  role;             // admission: ROLE_NONE, ROLE_WORKER or ROLE_CONTROLLER
    bit<8>  job;
    bit<5>  worker_id;
    bit<6>  num_workers;
    bit<16> mgid;
    bit<16> pool_base;
    bit<16> pool_size;
    bit<32> index;            // set * POOL_SIZE + slot: the register index of the packet's set
    bit<4>  verdict;
    bool    first;            // the contribution is the first of its slot and set
    bool    dropped;
    bit<32> drop_reason;
    // Leaf role: the upstream entry of the packet's job (up_hit false on a flat switch).
    bool    up_hit;
    bit<32> up_ip;            // the spine's data address
    bit<16> up_udp_port;
    bit<9>  up_port;          // the port towards the spine
    bit<16> up_mgid;          // the rack's multicast group
    bit<16> up_pool_base;
    bit<16> up_pool_size;
    bit<48> up_mac;           // the next hop's MAC towards the spine
    bit<32> up_src_ip;        // the leaf's address as the spine admits it
    bit<16> up_src_udp_port;
}

/*************************************************************************
 **************************  P A R S E R  ********************************
 *************************************************************************/

parser SwitchParser(packet_in pkt,
                    out headers_t hdr,
                    inout metadata_t meta,
                    inout standard_metadata_t standard_metadata) {

    state start {
        meta.reset_length_ok = false;
        pkt.extract(hdr.ethernet);
        transition select(hdr.ethernet.ether_type) {
            ETHERTYPE_IPV4: parse_ipv4;
            default: accept;
        }
    }

    state parse_ipv4 {
        pkt.extract(hdr.ipv4);
        // Only unfragmented IPv4 without options carries a UDP header right after it.
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
        // A packet too short for these 10 bytes ends the parse here (PacketTooShort); v1model
        // still runs ingress, which finds hdr.exponents invalid and counts it MALFORMED.
        pkt.extract(hdr.switchml);
        pkt.extract(hdr.exponents);
        // The payload is read only when the size enum is k = 64 and the UDP length agrees, so
        // no other size is ever taken for k = 64. A RESET's payload is never read: any
        // hardware size with a matching length is well formed.
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
        meta.reset_length_ok = true;
        transition accept;
    }
}

/*************************************************************************
 ************   C H E C K S U M    V E R I F I C A T I O N   *************
 *************************************************************************/

control SwitchVerifyChecksum(inout headers_t hdr, inout metadata_t meta) {
    apply {
        // Sets standard_metadata.checksum_error; ingress drops such switchml packets as
        // MALFORMED (a host's kernel would have discarded them before the software switch).
        verify_checksum(hdr.ipv4.isValid(),
            { hdr.ipv4.version, hdr.ipv4.ihl, hdr.ipv4.diffserv, hdr.ipv4.total_len,
              hdr.ipv4.identification, hdr.ipv4.flags, hdr.ipv4.frag_offset, hdr.ipv4.ttl,
              hdr.ipv4.protocol, hdr.ipv4.src_addr, hdr.ipv4.dst_addr },
            hdr.ipv4.hdr_checksum,
            HashAlgorithm.csum16);
    }
}

/*************************************************************************
 ***************  A G G R E G A T I O N   S T A T E  *********************
 *************************************************************************/

// Per slot and set: which workers contributed, how many (mod n), and the largest exponent.
// RESET clears the bitmaps and counts of both sets; values and exponents need no clearing
// because a slot's first contribution overwrites them. A leaf also keeps has_result: whether
// the set's value and exponent hold the spine's RESULT (1) or the rack's partial sum (0).
control Bookkeeping(inout headers_t hdr, inout metadata_t meta) {
    register<bit<32>, bit<32>>(REGISTER_SIZE) seen;           // worker bitmap
    register<bit<8>, bit<32>>(REGISTER_SIZE) contributions;   // count mod num_workers
    register<bit<8>, bit<32>>(REGISTER_SIZE) max_exponent;    // int8 as bits
#ifdef SWITCHML_LEAF_ROLE
    register<bit<1>, bit<32>>(REGISTER_SIZE) has_result;
#endif

    apply {
        bit<32> set0 = (bit<32>)hdr.switchml.slot;
        bit<32> set1 = set0 + POOL_SIZE;

        if (hdr.switchml.msg_type == MSG_TYPE_RESET) {
            seen.write(set0, 0);
            seen.write(set1, 0);
            contributions.write(set0, 0);
            contributions.write(set1, 0);
#ifdef SWITCHML_LEAF_ROLE
            has_result.write(set0, 0);
            has_result.write(set1, 0);
        } else if (hdr.switchml.msg_type == MSG_TYPE_RESULT) {
            // Ingress lets through only a RESULT from the job's spine, inside the job's range.
            bit<32> seen_here;
            bit<8> count;
            bit<1> stored;
            seen.read(seen_here, meta.index);
            contributions.read(count, meta.index);
            has_result.read(stored, meta.index);
            if (count != 0 || seen_here == 0 || stored == 1) {
                // No rack sum waits for it: a duplicate answer to a second resend, or stale.
                meta.verdict = VERDICT_IGNORED;
            } else {
                // The spine's sum replaces the rack's; its exponent is the global maximum.
                has_result.write(meta.index, 1);
                max_exponent.write(meta.index, hdr.exponents.e0);
                meta.verdict = VERDICT_STORE;
            }
#endif
        } else {
            bit<32> other = (hdr.switchml.set_bit == 0) ? set1 : set0;
            bit<32> worker = (bit<32>)1 << meta.worker_id;
            bit<32> seen_here;
            bit<8> count;
            bit<8> exponent;
            seen.read(seen_here, meta.index);
            contributions.read(count, meta.index);
            max_exponent.read(exponent, meta.index);

            if ((seen_here & worker) == 0) {
                // A new contribution. Clearing the worker from the other set frees that set
                // for the worker's next use of this slot (the shadow copy).
                bit<32> seen_other;
                seen.read(seen_other, other);
                seen.write(other, seen_other & ~worker);
                seen.write(meta.index, seen_here | worker);

                meta.first = count == 0;
#ifdef SWITCHML_LEAF_ROLE
                if (meta.first) {
                    has_result.write(meta.index, 0);  // the set holds the rack's sum from now on
                }
#endif
                count = count + 1;
                if (count == (bit<8>)meta.num_workers) {
                    count = 0;
                }
                contributions.write(meta.index, count);

                // Signed max: e0 is an int8; 127 (NaN/Inf) wins over every exponent.
                if (meta.first || (int<8>)hdr.exponents.e0 > (int<8>)exponent) {
                    exponent = hdr.exponents.e0;
                }
                max_exponent.write(meta.index, exponent);
                if (count != 0) {
                    meta.verdict = VERDICT_ABSORBED;
                } else if (meta.up_hit) {
                    meta.verdict = VERDICT_UPSTREAM;
                } else {
                    meta.verdict = VERDICT_COMPLETE;
                }
            } else if (count == 0) {
                // Everyone contributed, yet this worker sends again: its result was lost.
                meta.verdict = VERDICT_ANSWER;
#ifdef SWITCHML_LEAF_ROLE
                bit<1> stored;
                has_result.read(stored, meta.index);
                if (meta.up_hit && stored == 0) {
                    // The spine's RESULT has not come: the worker's resend is the leaf's timer.
                    meta.verdict = VERDICT_RESEND;
                }
#endif
            } else {
                meta.verdict = VERDICT_INCOMPLETE;
            }
            hdr.exponents.e0 = exponent;
        }
    }
}

// control Values: the 64 per-element registers, generated by p4/gen_registers.py.
#include "include/generated_v1model_values.p4"

/*************************************************************************
 **************  I N G R E S S   P R O C E S S I N G   *******************
 *************************************************************************/

control SwitchIngress(inout headers_t hdr,
                      inout metadata_t meta,
                      inout standard_metadata_t standard_metadata) {

    // Statistics: P4Runtime reads counters (BMv2 answers no register reads).
    counter<bit<32>>(POOL_SIZE, CounterType.packets) results_multicast;         // by slot
    counter<bit<32>>(POOL_SIZE, CounterType.packets) retransmissions_answered;  // by slot
    counter<bit<32>>(NUM_DROP_REASONS, CounterType.packets) drops;              // by DROP_*
    counter<bit<32>>(NUM_PACKET_COUNTERS, CounterType.packets) packets;         // by PACKETS_*
#ifdef SWITCHML_LEAF_ROLE
    counter<bit<32>>(NUM_LEAF_COUNTERS, CounterType.packets) leaf;              // by LEAF_*
#endif

    Bookkeeping() bookkeeping;
    Values() values;

    /* ---- loss: emulated packet loss per ingress port ---- */

    action set_drop_probability(bit<16> threshold) {
        meta.drop_threshold = threshold;
    }

    table loss {
        key = { standard_metadata.ingress_port : exact; }
        actions = { set_drop_probability; NoAction; }
        default_action = NoAction();
        size = LOSS_TABLE_SIZE;
    }

    /* ---- admission: who the sender is, decided by its address, never by the header ---- */

    action set_worker(bit<8> job, bit<5> worker_id, bit<6> num_workers,
                      bit<16> mgid, bit<16> pool_base, bit<16> pool_size) {
        meta.role = ROLE_WORKER;
        meta.job = job;
        meta.worker_id = worker_id;
        meta.num_workers = num_workers;
        meta.mgid = mgid;
        meta.pool_base = pool_base;
        meta.pool_size = pool_size;
    }

    action set_controller() {
        meta.role = ROLE_CONTROLLER;
    }

    table admission {
        key = {
            hdr.ipv4.src_addr : exact;
            hdr.udp.src_port  : exact;
        }
        actions = { set_worker; set_controller; @defaultonly NoAction; }
        // An unknown sender keeps ROLE_NONE and is dropped by the checks. Const, so that no
        // control-plane mistake can admit every sender at once.
        const default_action = NoAction();
        size = ADMISSION_TABLE_SIZE;
    }

#ifdef SWITCHML_LEAF_ROLE
    /* ---- upstream: the leaf role's entry of a job: where its rack sums go, whose RESULTs it takes ---- */

    action set_upstream(bit<32> ip, bit<16> udp_port, bit<9> port, bit<16> mgid,
                        bit<16> pool_base, bit<16> pool_size,
                        bit<48> mac, bit<32> src_ip, bit<16> src_udp_port) {
        meta.up_hit = true;
        meta.up_ip = ip;
        meta.up_udp_port = udp_port;
        meta.up_port = port;
        meta.up_mgid = mgid;
        meta.up_pool_base = pool_base;
        meta.up_pool_size = pool_size;
        meta.up_mac = mac;
        meta.up_src_ip = src_ip;
        meta.up_src_udp_port = src_udp_port;
    }

    table upstream {
        key = { hdr.switchml.job_number : exact; }
        actions = { set_upstream; @defaultonly NoAction; }
        const default_action = NoAction();
        size = UPSTREAM_TABLE_SIZE;
    }

#endif
    /* ---- forward: plain IPv4 forwarding of traffic that is not switchml's ---- */

    action set_egress(bit<9> port, bit<48> mac) {
        // One hop in a star: the TTL is left alone, as an L2 switch would.
        standard_metadata.egress_spec = port;
        hdr.ethernet.dst_addr = mac;
    }

    action drop() {
        mark_to_drop(standard_metadata);
    }

    table forward {
        key = { hdr.ipv4.dst_addr : lpm; }
        actions = { set_egress; drop; }
        default_action = drop();
        size = FORWARD_TABLE_SIZE;
    }

    apply {
        bool is_switchml = hdr.udp.isValid() &&
            (hdr.udp.dst_port & SWITCHML_UDP_PORT_MASK) == SWITCHML_UDP_PORT;

        if (!is_switchml) {
            if (hdr.ipv4.isValid()) {
                forward.apply();
            } else {
                mark_to_drop(standard_metadata);
            }
        } else {
            packets.count(PACKETS_RECEIVED);
            meta.dropped = false;
            meta.role = ROLE_NONE;
            meta.verdict = VERDICT_NONE;
            meta.first = false;
            meta.drop_threshold = 0;
            meta.up_hit = false;
            // Meaningful only once the checks below have found the header valid.
            bit<32> slot = (bit<32>)hdr.switchml.slot;
            meta.index = slot;
            if (hdr.switchml.set_bit == 1) {
                meta.index = slot + POOL_SIZE;
            }
            loss.apply();
            bit<15> roll;
            random(roll, 0, 32767);

            bool size_ok = hdr.switchml.size == SWITCHML_SIZE ||
                (hdr.switchml.msg_type == MSG_TYPE_RESET &&
                 hdr.switchml.size <= SWITCHML_MAX_HARDWARE_SIZE);
            bool length_ok = (hdr.payload.isValid() || meta.reset_length_ok) &&
                hdr.ipv4.total_len == IPV4_HEADER_BYTES + hdr.udp.length &&
                standard_metadata.checksum_error == 0;

            if ((bit<16>)roll < meta.drop_threshold) {
                meta.dropped = true;
                meta.drop_reason = DROP_EMULATED_LOSS;
            } else if (!hdr.exponents.isValid()) {
                meta.dropped = true;
                meta.drop_reason = DROP_MALFORMED;
            } else if (!size_ok) {
                meta.dropped = true;
                meta.drop_reason = DROP_BAD_SIZE;
            } else if (!length_ok) {
                meta.dropped = true;
                meta.drop_reason = DROP_MALFORMED;
            } else {
                admission.apply();
#ifdef SWITCHML_LEAF_ROLE
                upstream.apply();
#endif

                if (hdr.switchml.msg_type == MSG_TYPE_RESET) {
                    if (meta.role != ROLE_CONTROLLER) {
                        meta.dropped = true;
                        meta.drop_reason = DROP_RESET_NOT_FROM_CONTROLLER;
                    } else if (slot >= POOL_SIZE) {
                        meta.dropped = true;
                        meta.drop_reason = DROP_SLOT_OUT_OF_RANGE;
                    }
#ifdef SWITCHML_LEAF_ROLE
                } else if (hdr.switchml.msg_type == MSG_TYPE_RESULT) {
                    // A leaf takes a RESULT only from its job's spine, by the source address.
                    if (!meta.up_hit || hdr.ipv4.src_addr != meta.up_ip ||
                            hdr.udp.src_port != meta.up_udp_port) {
                        meta.dropped = true;
                        meta.drop_reason = DROP_BAD_MSG_TYPE;
                    } else if (slot < (bit<32>)meta.up_pool_base ||
                               slot >= (bit<32>)meta.up_pool_base + (bit<32>)meta.up_pool_size ||
                               slot >= POOL_SIZE) {
                        meta.dropped = true;
                        meta.drop_reason = DROP_SLOT_OUT_OF_RANGE;
                    }
#endif
                } else if (hdr.switchml.msg_type != MSG_TYPE_UPDATE) {
                    meta.dropped = true;
                    meta.drop_reason = DROP_BAD_MSG_TYPE;
                } else if (meta.role != ROLE_WORKER) {
                    meta.dropped = true;
                    meta.drop_reason = DROP_NOT_ADMITTED;
                } else if (hdr.switchml.job_number != meta.job) {
                    meta.dropped = true;
                    meta.drop_reason = DROP_JOB_MISMATCH;
                } else if (slot < (bit<32>)meta.pool_base ||
                           slot >= (bit<32>)meta.pool_base + (bit<32>)meta.pool_size ||
                           slot >= POOL_SIZE) {
                    meta.dropped = true;
                    meta.drop_reason = DROP_SLOT_OUT_OF_RANGE;
                }

                if (!meta.dropped) {
                    bookkeeping.apply(hdr, meta);
                }
            }

            if (meta.dropped) {
                drops.count(meta.drop_reason);
                mark_to_drop(standard_metadata);
            } else if (hdr.switchml.msg_type == MSG_TYPE_RESET) {
                // The echo, back to the controller, acknowledges the reset.
                packets.count(PACKETS_RESETS);
                bit<48> mac = hdr.ethernet.src_addr;
                hdr.ethernet.src_addr = hdr.ethernet.dst_addr;
                hdr.ethernet.dst_addr = mac;
                bit<32> ip = hdr.ipv4.src_addr;
                hdr.ipv4.src_addr = hdr.ipv4.dst_addr;
                hdr.ipv4.dst_addr = ip;
                bit<16> port = hdr.udp.src_port;
                hdr.udp.src_port = hdr.udp.dst_port;
                hdr.udp.dst_port = port;
                standard_metadata.egress_spec = standard_metadata.ingress_port;
            } else if (meta.verdict == VERDICT_INCOMPLETE) {
                drops.count(DROP_RETRANSMISSION_INCOMPLETE);
                mark_to_drop(standard_metadata);
#ifdef SWITCHML_LEAF_ROLE
            } else if (meta.verdict == VERDICT_IGNORED) {
                leaf.count(LEAF_IGNORED_FROM_UPSTREAM);
                mark_to_drop(standard_metadata);
            } else if (meta.verdict == VERDICT_STORE) {
                // The spine's RESULT overwrites the set (keep nothing, add the payload) and goes
                // on unchanged to the rack, from the leaf's address.
                leaf.count(LEAF_RESULTS_FROM_UPSTREAM);
                results_multicast.count(slot);
                values.apply(hdr.payload, meta.index, 0, 0xFFFFFFFF);
                hdr.ethernet.src_addr = hdr.ethernet.dst_addr;
                hdr.ipv4.src_addr = hdr.ipv4.dst_addr;
                hdr.udp.src_port = hdr.udp.dst_port;
                standard_metadata.mcast_grp = meta.up_mgid;
            } else if (meta.verdict == VERDICT_UPSTREAM || meta.verdict == VERDICT_RESEND) {
                // The rack's sum, as one UPDATE of the leaf to the spine: a new contribution is
                // added in first (as for COMPLETE); a resend only reads the sum out.
                bit<32> keep_mask = 0xFFFFFFFF;
                bit<32> add_mask = 0xFFFFFFFF;
                if (meta.verdict == VERDICT_RESEND) {
                    leaf.count(LEAF_RESENT_UPSTREAM);
                    add_mask = 0;
                } else {
                    leaf.count(LEAF_SENT_UPSTREAM);
                    packets.count(PACKETS_AGGREGATED);
                    if (meta.first) {
                        keep_mask = 0;
                    }
                }
                values.apply(hdr.payload, meta.index, keep_mask, add_mask);
                hdr.exponents.e1 = 0;
                hdr.ethernet.src_addr = hdr.ethernet.dst_addr;
                hdr.ethernet.dst_addr = meta.up_mac;
                hdr.ipv4.src_addr = meta.up_src_ip;
                hdr.ipv4.dst_addr = meta.up_ip;
                hdr.udp.src_port = meta.up_src_udp_port;
                hdr.udp.dst_port = meta.up_udp_port;
                standard_metadata.egress_spec = meta.up_port;
#endif
            } else {
                // Add the payload in (first: overwrite) or, for an answer, only read the sum.
                bit<32> keep_mask = 0xFFFFFFFF;
                bit<32> add_mask = 0xFFFFFFFF;
                if (meta.verdict == VERDICT_ANSWER) {
                    add_mask = 0;
                } else {
                    packets.count(PACKETS_AGGREGATED);
                    if (meta.first) {
                        keep_mask = 0;
                    }
                }
                values.apply(hdr.payload, meta.index, keep_mask, add_mask);

                if (meta.verdict == VERDICT_ABSORBED) {
                    mark_to_drop(standard_metadata);
                } else {
                    // A RESULT leaves from the address the workers sent to (the switch's).
                    hdr.switchml.msg_type = MSG_TYPE_RESULT;
                    hdr.exponents.e1 = 0;
                    bit<48> mac = hdr.ethernet.src_addr;
                    hdr.ethernet.src_addr = hdr.ethernet.dst_addr;
                    bit<32> ip = hdr.ipv4.src_addr;
                    hdr.ipv4.src_addr = hdr.ipv4.dst_addr;
                    bit<16> port = hdr.udp.src_port;
                    hdr.udp.src_port = hdr.udp.dst_port;
                    if (meta.verdict == VERDICT_COMPLETE) {
                        // To every worker of the job; SwitchEgress.egress_rewrite addresses
                        // each copy.
                        results_multicast.count(slot);
                        standard_metadata.mcast_grp = meta.mgid;
                    } else {
                        // VERDICT_ANSWER: back to the sender only.
                        retransmissions_answered.count(slot);
                        hdr.ethernet.dst_addr = mac;
                        hdr.ipv4.dst_addr = ip;
                        hdr.udp.dst_port = port;
                        standard_metadata.egress_spec = standard_metadata.ingress_port;
                    }
                }
            }
        }
    }
}

/*************************************************************************
 ****************  E G R E S S   P R O C E S S I N G   *******************
 *************************************************************************/

control SwitchEgress(inout headers_t hdr,
                     inout metadata_t meta,
                     inout standard_metadata_t standard_metadata) {

    /* ---- egress_rewrite: address each copy of a multicast result to its worker ---- */

    action set_destination(bit<48> mac, bit<32> ip, bit<16> udp_port) {
        hdr.ethernet.dst_addr = mac;
        hdr.ipv4.dst_addr = ip;
        hdr.udp.dst_port = udp_port;
    }

    action drop() {
        // A copy nobody described would leave with the last sender's address: drop it.
        mark_to_drop(standard_metadata);
    }

    table egress_rewrite {
        key = {
            standard_metadata.mcast_grp  : exact;
            standard_metadata.egress_rid : exact;
        }
        actions = { set_destination; drop; }
        default_action = drop();
        size = EGRESS_REWRITE_TABLE_SIZE;
    }

    apply {
        if (hdr.switchml.isValid()) {
            // Multicast copies keep the ingress mcast_grp; unicast answers and RESET echoes
            // were addressed in ingress.
            if (standard_metadata.mcast_grp != 0) {
                egress_rewrite.apply();
            }
            // A switchml packet leaves with the size it arrived with (the parser admitted
            // only lengths that match its size enum), so the IPv4 and UDP lengths stand.
            // Its payload changed: UDP checksum 0 means "none" (RFC 768); the IPv4
            // checksum is recomputed in SwitchComputeChecksum.
            hdr.udp.checksum = 0;
        }
    }
}

/*************************************************************************
 *************   C H E C K S U M    C O M P U T A T I O N   **************
 *************************************************************************/

control SwitchComputeChecksum(inout headers_t hdr, inout metadata_t meta) {
    apply {
        // Addresses of switchml packets change; recomputing is also right for the rest.
        update_checksum(hdr.ipv4.isValid(),
            { hdr.ipv4.version, hdr.ipv4.ihl, hdr.ipv4.diffserv, hdr.ipv4.total_len,
              hdr.ipv4.identification, hdr.ipv4.flags, hdr.ipv4.frag_offset, hdr.ipv4.ttl,
              hdr.ipv4.protocol, hdr.ipv4.src_addr, hdr.ipv4.dst_addr },
            hdr.ipv4.hdr_checksum,
            HashAlgorithm.csum16);
    }
}

/*************************************************************************
 ***********************  D E P A R S E R  *******************************
 *************************************************************************/

control SwitchDeparser(packet_out pkt, in headers_t hdr) {
    apply {
        // Invalid headers are skipped; a RESET's unread payload follows as it came.
        pkt.emit(hdr.ethernet);
        pkt.emit(hdr.ipv4);
        pkt.emit(hdr.udp);
        pkt.emit(hdr.switchml);
        pkt.emit(hdr.exponents);
        pkt.emit(hdr.payload);
    }
}

V1Switch(
    SwitchParser(),
    SwitchVerifyChecksum(),
    SwitchIngress(),
    SwitchEgress(),
    SwitchComputeChecksum(),
    SwitchDeparser()
) main;
