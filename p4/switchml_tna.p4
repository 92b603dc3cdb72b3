/* -*- P4_16 -*- */
/* switchml_tna.p4: SwitchML in-network aggregation for Tofino (TNA), k = 64.
 *
 * The same tables, actions, parameters and counters as switchml_v1model.p4
 * (switchml/pipeline.py is the contract), and the same semantics for workers that follow the
 * protocol, shaped by what Tofino allows:
 *
 *  - A stateful ALU touches one register entry per packet and returns one 32-bit word.
 *    Each value register holds a pair of elements (i, i + 32), as in p4app-switchML: the
 *    worker's packet adds both halves and reads out the second; a recirculated second pass
 *    (the "harvest") reads out the first half, then the result is multicast or answered.
 *  - Every register is driven by one table whose const entries pick its RegisterAction (at
 *    most 4 per register), and every register after the bitmap is keyed on what the bitmap
 *    returned (seen_before, and map_result = seen_before & worker_bit, computed in the bitmap's
 *    own action), so the 34 of them spread over stages 3..11 (4 stateful ALUs a stage; the
 *    pairs are pinned there with @stage, see p4/gen_registers.py). Stage by stage: 0
 *    admission, loss, the loss roll; 1 worker_bit and the range margins; 2 the verdict (one
 *    ternary table for the v1model program's chain of checks) with the bitmap; 3-4 the two
 *    slot-state registers; 3-11 the value pairs; 11 next_step (what leaves the first pass).
 *  - A contribution opens a round when the set's bitmap was empty. DESIGN.md says "count ==
 *    0"; the two agree for every worker that follows the protocol (a worker moves a slot to
 *    its other set only after that set's result, so only then are its bits gone) and differ
 *    only for one that reuses a slot before its result, which can corrupt its own job's
 *    sums, nothing else. Opening a round writes the count and the exponent, so a RESET need
 *    only clear the bitmaps.
 *  - Per slot and set, one pair register holds (missing contributions, max exponent): one
 *    stateful ALU instead of two. The count runs down (as p4app-switchML's): a round opens at
 *    num_workers - 1 and each later contribution takes one off; the register returns the
 *    count after the packet, and 0 means the slot is complete (a comparison with a constant,
 *    which Tofino's gateways and ternary keys do). The harvest pass reads the exponent out
 *    with the first halves of the values.
 *  - Registers live in one pipe. Everything happens in the pipe a packet arrived on, and the
 *    harvest recirculates to that pipe's recirculation port: all workers of a job must be
 *    attached to ports of one pipe.
 *  - Range checks subtract and test the sign bit (set_worker computes pool_base - slot as
 *    it matches), and 1 << worker_id comes from a const table: Tofino's gateways and ALUs
 *    do neither a run-time comparison nor a variable shift.
 *  - The egress pipe cannot see the multicast group, so ingress bridges it in a header in
 *    front of the packet; egress_rewrite's key keeps the contract's P4Runtime names
 *    ("standard_metadata.mcast_grp", ...) through @name annotations.
 *  - The exponent is stored as e0 ^ 0x80: that maps int8 order onto unsigned order, so the
 *    stateful ALU's unsigned max is the signed max the semantics ask for.
 *  - A counter can be addressed once per packet, but the contract's SwitchIngress.packets
 *    counts a new contribution twice (RECEIVED and AGGREGATED). Here `packets` counts
 *    RECEIVED only, and SwitchIngress.packet_outcomes (same indices) counts AGGREGATED and
 *    RESETS: a Tofino target reads those two indices from it.
 *
 * Compiled by bf-p4c (p4lang/p4c's Tofino back end, built from source: docs/deploy.md, which
 * also has its resource use): 12 of Tofino 1's 12 stages, 35 of 48 stateful ALUs. Never run
 * on a Tofino or on tofino-model. tests/test_p4_contract.py checks its tables against the
 * contract, and where bf-p4c is on PATH compiles it and checks bf-p4c's P4Info:
 *
 *   bf-p4c --arch tna --target tofino --p4runtime-force-std-externs \
 *       --p4runtime-files build/switchml_tna.p4info.txtpb -o build p4/switchml_tna.p4
 *
 * The control plane must also set up the recirculation port of each pipe used.
 */
#include <core.p4>
#include <tna.p4>

#include "include/constants.p4"
#include "include/headers.p4"

// Slots off the pool: a slot is on it when no bit of this mask is set (POOL_SIZE a power of 2).
#define POOL_INDEX_MASK (16w0xFFFF ^ (POOL_SIZE - 1))

// Port 68 of each pipe is its recirculation port on Tofino 1 (pipe n: n << 7 | 68).
#ifndef RECIRCULATION_PORT_IN_PIPE
#define RECIRCULATION_PORT_IN_PIPE 68
#endif

// What the first pass decided; the bridge carries it to the harvest pass and to egress.
const bit<8> BRIDGE_NONE = 0;       // plain forwarding, RESET echo
const bit<8> BRIDGE_HARVEST = 1;    // recirculated: read the first halves, then send
const bit<8> BRIDGE_MULTICAST = 2;  // a result on its way to every worker: rewrite in egress
const bit<8> BRIDGE_ANSWER = 3;     // a result on its way back to one worker

// What the registers do with this packet (the const tables of Bookkeeping and Values).
const bit<2> PHASE_NONE = 0;        // nothing: dropped, forwarded, or an egress-bound pass
const bit<2> PHASE_CONTRIBUTE = 1;  // an admitted UPDATE: mark, count, aggregate or read
const bit<2> PHASE_HARVEST = 2;     // the recirculated pass: read the first halves
const bit<2> PHASE_RESET = 3;       // an admitted RESET: clear the slot's bitmaps and counts

// 8 bytes in front of the Ethernet header, never seen outside the switch.
header bridge_h {
    bit<8>   kind;           // BRIDGE_*: what this pass or egress is to do
    bit<8>   next_kind;      // of a harvest: BRIDGE_MULTICAST or BRIDGE_ANSWER, what follows it
    bit<16>  mgid;           // the job's multicast group
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

// The bitmaps' AND (map_result = seen_before & worker_bit) runs in the bitmap register's own
// action, on its output: all three in whole 32-bit containers, aligned alike.
@pa_container_size("ingress", "ig_md.seen_before", 32)
@pa_container_size("ingress", "ig_md.map_result", 32)
@pa_container_size("ingress", "ig_md.worker_bit", 32)
struct slot_state_t {
    bit<16> missing;   // contributions the round still waits for (0: complete, or none open)
    bit<16> exponent;  // the round's max e0, biased (e0 ^ 0x80)
}

struct ingress_metadata_t {
    bridge_h bridge;
    bool     reset_length_ok;  // parser: a RESET whose length matches its (unread) size
    bool     fresh;            // a switchml packet on its first pass: the verdict's to judge
    bit<16>  slot;             // the header's, copied by the parser (see parse_switchml)
    bit<1>   set_bit;          // the header's, copied by the parser
    bit<16>  index;            // set * POOL_SIZE + slot: the value and exponent registers' entry
    bit<16>  drop_threshold;   // loss: drop when random(0..32767) < threshold
    bit<16>  loss_roll;        // random(0..32767)
    bit<16>  loss_margin;      // roll - threshold: negative means drop
    bit<2>   role;
    bit<8>   job_diff;         // header's job ^ admitted job: non-zero is a mismatch
    bit<5>   worker_id;
    bit<8>   num_workers;
    bit<16>  last_count;       // num_workers - 1: where the count of a new round starts
    bit<16>  mgid;
    bit<16>  pool_size;
    bit<16>  pool_gap;         // pool_base - slot: positive means below the job's range
    bit<16>  pool_margin;      // pool_gap + pool_size = pool_base + pool_size - slot: positive inside
    bit<32>  worker_bit;       // 1 << worker_id
    bit<2>   phase;            // PHASE_*: what the registers do
    bit<32>  seen_before;      // the set's bitmap before this packet
    bit<32>  map_result;       // seen_before & worker_bit: non-zero for a retransmission
    bit<16>  missing;          // the set's missing contributions after this packet
    bit<8>   biased_e0;        // e0 ^ 0x80
    bit<16>  max_biased;       // harvest: the slot's max exponent, biased
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
        ig_md.fresh = false;
        ig_md.slot = 0;
        ig_md.set_bit = 0;
        ig_md.index = 0;
        ig_md.drop_threshold = 0;
        ig_md.loss_roll = 0;
        ig_md.loss_margin = 0;
        ig_md.role = ROLE_NONE;
        ig_md.job_diff = 0;
        ig_md.worker_id = 0;
        ig_md.num_workers = 0;
        ig_md.last_count = 0;
        ig_md.mgid = 0;
        ig_md.pool_size = 0;
        ig_md.pool_gap = 0;
        ig_md.pool_margin = 0;
        ig_md.worker_bit = 0;
        ig_md.phase = PHASE_NONE;
        ig_md.seen_before = 0;
        ig_md.map_result = 0;
        ig_md.missing = 0;
        ig_md.biased_e0 = 0;
        ig_md.max_biased = 0;
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
        // The match-action stages read slot and set from metadata copies: a header field that
        // they shift or widen would no longer sit in its PHV container as the deparser needs it.
        ig_md.slot = (bit<16>)hdr.switchml.slot;
        ig_md.set_bit = hdr.switchml.set_bit;
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

// The verdict, the worker bitmaps (both sets of a slot in one pair register, so one access
// can mark the worker in its set and clear it from the other) and, per set, the slot state
// (missing contributions, max exponent). One table per register, at most 4 RegisterActions
// per register (Tofino's limit).
control Bookkeeping(in headers_t hdr, inout ingress_metadata_t ig_md) {

    Register<bitmap_pair_t, bit<16>>(POOL_SIZE) seen;
    Register<slot_state_t, bit<16>>(POOL_SIZE) slot_set0;
    Register<slot_state_t, bit<16>>(POOL_SIZE) slot_set1;

    /* ---- seen ---- */

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

    /* ---- verdict: what becomes of a switchml packet, or why it is dropped ----
     * The checks of switchml_v1model.p4's chain of ifs, in the same order, as one ternary
     * table whose first matching entry wins (Tofino's gateways take only a few comparisons
     * each, and the chain needs a dozen), and whose admitting actions mark the worker in the
     * bitmap register at once: the verdict and the first register access share a stage.
     * Unlike the v1model program, the IPv4 length and checksum are not checked (the parser
     * would have to carry them this far, and the MAC already drops damaged frames). */

    action drop_for(bit<32> reason) {
        ig_md.dropped = true;
        ig_md.drop_reason = reason;
    }

    // As p4app-switchML's bitmap checker: the AND uses the register's output in the same action.
    action contribute_to_set0() {
        ig_md.phase = PHASE_CONTRIBUTE;
        ig_md.seen_before = mark_set0.execute(ig_md.slot);
        ig_md.map_result = ig_md.seen_before & ig_md.worker_bit;
    }
    action contribute_to_set1() {
        ig_md.phase = PHASE_CONTRIBUTE;
        ig_md.seen_before = mark_set1.execute(ig_md.slot);
        ig_md.map_result = ig_md.seen_before & ig_md.worker_bit;
    }
    action reset_slot() {
        ig_md.phase = PHASE_RESET;
        clear_bitmaps.execute(ig_md.slot);
    }

    table verdict {
        key = {
            ig_md.fresh               : exact   @name("fresh");          // else: not to judge
            ig_md.loss_margin[15:15]  : ternary @name("lost");           // 1: the loss roll lost
            hdr.exponents.isValid()   : ternary @name("has_exponents");
            hdr.switchml.msg_type     : ternary @name("msg_type");
            hdr.switchml.size         : ternary @name("size");
            hdr.payload.isValid()     : ternary @name("has_payload");
            ig_md.reset_length_ok     : ternary @name("reset_length_ok");
            ig_md.role                : ternary @name("role");
            ig_md.job_diff            : ternary @name("job_diff");
            ig_md.pool_gap            : ternary @name("pool_gap");       // base - slot
            ig_md.pool_margin         : ternary @name("pool_margin");    // base + size - slot
            ig_md.slot                : ternary @name("slot");
            ig_md.set_bit             : ternary @name("set_bit");
        }
        actions = { drop_for; contribute_to_set0; contribute_to_set1; reset_slot; @defaultonly NoAction; }
        const entries = {
            // 1. the emulated loss; 2. no block exponents
            (true, 1, _, _, _, _, _, _, _, _, _, _, _) : drop_for(DROP_EMULATED_LOSS);
            (true, _, false, _, _, _, _, _, _, _, _, _, _) : drop_for(DROP_MALFORMED);
            // 3-5. a RESET: hardware sizes only (0..3), its length, from the controller, on the pool
            (true, _, _, MSG_TYPE_RESET, 3w4 &&& 3w4, _, _, _, _, _, _, _, _) : drop_for(DROP_BAD_SIZE);
            (true, _, _, MSG_TYPE_RESET, _, false, false, _, _, _, _, _, _) : drop_for(DROP_MALFORMED);
            (true, _, _, MSG_TYPE_RESET, _, _, _, ROLE_CONTROLLER, _, _, _, 0 &&& POOL_INDEX_MASK, _)
                : reset_slot();
            (true, _, _, MSG_TYPE_RESET, _, _, _, ROLE_CONTROLLER, _, _, _, _, _) : drop_for(DROP_SLOT_OUT_OF_RANGE);
            (true, _, _, MSG_TYPE_RESET, _, _, _, _, _, _, _, _, _) : drop_for(DROP_RESET_NOT_FROM_CONTROLLER);
            // 3. any other type: the one size whose payload the program reads (k = 64, size 1)
            (true, _, _, _, 3w0 &&& 3w7, _, _, _, _, _, _, _, _) : drop_for(DROP_BAD_SIZE);
            (true, _, _, _, 3w2 &&& 3w6, _, _, _, _, _, _, _, _) : drop_for(DROP_BAD_SIZE);
            (true, _, _, _, 3w4 &&& 3w4, _, _, _, _, _, _, _, _) : drop_for(DROP_BAD_SIZE);
            // 4. its length
            (true, _, _, _, _, false, _, _, _, _, _, _, _) : drop_for(DROP_MALFORMED);
            // 6-9. an UPDATE from a worker of its job, on its job's slots:
            //      base <= slot (pool_gap <= 0), slot < base + size (pool_margin > 0), slot < POOL_SIZE
            (true, _, _, MSG_TYPE_UPDATE, _, _, _, ROLE_WORKER, 0, _, 0, _, _) : drop_for(DROP_SLOT_OUT_OF_RANGE);
            (true, _, _, MSG_TYPE_UPDATE, _, _, _, ROLE_WORKER, 0, _, 16w0x8000 &&& 16w0x8000, _, _)
                : drop_for(DROP_SLOT_OUT_OF_RANGE);
            (true, _, _, MSG_TYPE_UPDATE, _, _, _, ROLE_WORKER, 0, 0, _, 0 &&& POOL_INDEX_MASK, 0)
                : contribute_to_set0();
            (true, _, _, MSG_TYPE_UPDATE, _, _, _, ROLE_WORKER, 0, 0, _, 0 &&& POOL_INDEX_MASK, 1)
                : contribute_to_set1();
            (true, _, _, MSG_TYPE_UPDATE, _, _, _, ROLE_WORKER, 0, 16w0x8000 &&& 16w0x8000, _, 0 &&& POOL_INDEX_MASK, 0)
                : contribute_to_set0();
            (true, _, _, MSG_TYPE_UPDATE, _, _, _, ROLE_WORKER, 0, 16w0x8000 &&& 16w0x8000, _, 0 &&& POOL_INDEX_MASK, 1)
                : contribute_to_set1();
            (true, _, _, MSG_TYPE_UPDATE, _, _, _, ROLE_WORKER, 0, _, _, _, _) : drop_for(DROP_SLOT_OUT_OF_RANGE);
            (true, _, _, MSG_TYPE_UPDATE, _, _, _, ROLE_WORKER, _, _, _, _, _) : drop_for(DROP_JOB_MISMATCH);
            (true, _, _, MSG_TYPE_UPDATE, _, _, _, _, _, _, _, _, _) : drop_for(DROP_NOT_ADMITTED);
            // 6. RESULT or an unknown type, from anyone
            (true, _, _, _, _, _, _, _, _, _, _, _, _) : drop_for(DROP_BAD_MSG_TYPE);
        }
        const default_action = NoAction();  // not a fresh switchml packet
        size = 32;
    }

    /* ---- slot_set0/1: per slot, the set's missing contributions and max exponent ----
     * One pair register per set, (missing, biased exponent), so that one stateful ALU keeps
     * both: a contribution that opens a round (the set's bitmap was empty) writes
     * (num_workers - 1, e0), a later one takes one off and raises the exponent, a
     * retransmission reads; each returns the missing count after it (0: the slot is
     * complete). The harvest pass reads the exponent out, as it reads the first halves. No
     * RESET action: the contribution that opens a round overwrites both. */

    RegisterAction<slot_state_t, bit<16>, bit<16>>(slot_set0) open_set0 = {
        void apply(inout slot_state_t state, out bit<16> missing) {
            state.missing = ig_md.last_count;
            state.exponent = (bit<16>)ig_md.biased_e0;
            missing = state.missing;
        }
    };
    RegisterAction<slot_state_t, bit<16>, bit<16>>(slot_set0) add_to_set0 = {
        void apply(inout slot_state_t state, out bit<16> missing) {
            state.missing = state.missing - 1;
            if ((bit<16>)ig_md.biased_e0 > state.exponent) {
                state.exponent = (bit<16>)ig_md.biased_e0;
            }
            missing = state.missing;
        }
    };
    RegisterAction<slot_state_t, bit<16>, bit<16>>(slot_set0) read_set0 = {
        void apply(inout slot_state_t state, out bit<16> missing) { missing = state.missing; }
    };
    RegisterAction<slot_state_t, bit<16>, bit<16>>(slot_set0) exponent_of_set0 = {
        void apply(inout slot_state_t state, out bit<16> exponent) { exponent = state.exponent; }
    };

    action open_round_set0() { ig_md.missing = open_set0.execute(ig_md.slot); }
    action add_set0() { ig_md.missing = add_to_set0.execute(ig_md.slot); }
    action read_missing_set0() {
        ig_md.missing = read_set0.execute(ig_md.slot);
        // a Tofino counter takes one kind of address: next_step counts every drop by drop_reason
        ig_md.drop_reason = DROP_RETRANSMISSION_INCOMPLETE;  // if the slot is not complete
    }
    action read_exponent_set0() { ig_md.max_biased = exponent_of_set0.execute(ig_md.slot); }

    table state_set0 {
        key = { ig_md.phase : exact; ig_md.set_bit : exact; ig_md.seen_before : ternary;
                ig_md.map_result : ternary; }
        actions = { open_round_set0; add_set0; read_missing_set0; read_exponent_set0;
                    @defaultonly NoAction; }
        const entries = {  // the first match wins; as the value pairs (control Values)
            (PHASE_CONTRIBUTE, 0, 0, _) : open_round_set0();
            (PHASE_CONTRIBUTE, 0, _, 0) : add_set0();
            (PHASE_CONTRIBUTE, 0, _, _) : read_missing_set0();  // a retransmission
            (PHASE_HARVEST,    0, _, _) : read_exponent_set0();
        }
        const default_action = NoAction();
        size = 4;
    }

    RegisterAction<slot_state_t, bit<16>, bit<16>>(slot_set1) open_set1 = {
        void apply(inout slot_state_t state, out bit<16> missing) {
            state.missing = ig_md.last_count;
            state.exponent = (bit<16>)ig_md.biased_e0;
            missing = state.missing;
        }
    };
    RegisterAction<slot_state_t, bit<16>, bit<16>>(slot_set1) add_to_set1 = {
        void apply(inout slot_state_t state, out bit<16> missing) {
            state.missing = state.missing - 1;
            if ((bit<16>)ig_md.biased_e0 > state.exponent) {
                state.exponent = (bit<16>)ig_md.biased_e0;
            }
            missing = state.missing;
        }
    };
    RegisterAction<slot_state_t, bit<16>, bit<16>>(slot_set1) read_set1 = {
        void apply(inout slot_state_t state, out bit<16> missing) { missing = state.missing; }
    };
    RegisterAction<slot_state_t, bit<16>, bit<16>>(slot_set1) exponent_of_set1 = {
        void apply(inout slot_state_t state, out bit<16> exponent) { exponent = state.exponent; }
    };

    action open_round_set1() { ig_md.missing = open_set1.execute(ig_md.slot); }
    action add_set1() { ig_md.missing = add_to_set1.execute(ig_md.slot); }
    action read_missing_set1() {
        ig_md.missing = read_set1.execute(ig_md.slot);
        // a Tofino counter takes one kind of address: next_step counts every drop by drop_reason
        ig_md.drop_reason = DROP_RETRANSMISSION_INCOMPLETE;  // if the slot is not complete
    }
    action read_exponent_set1() { ig_md.max_biased = exponent_of_set1.execute(ig_md.slot); }

    table state_set1 {
        key = { ig_md.phase : exact; ig_md.set_bit : exact; ig_md.seen_before : ternary;
                ig_md.map_result : ternary; }
        actions = { open_round_set1; add_set1; read_missing_set1; read_exponent_set1;
                    @defaultonly NoAction; }
        const entries = {  // the first match wins; as the value pairs (control Values)
            (PHASE_CONTRIBUTE, 1, 0, _) : open_round_set1();
            (PHASE_CONTRIBUTE, 1, _, 0) : add_set1();
            (PHASE_CONTRIBUTE, 1, _, _) : read_missing_set1();  // a retransmission
            (PHASE_HARVEST,    1, _, _) : read_exponent_set1();
        }
        const default_action = NoAction();
        size = 4;
    }

    apply {
        verdict.apply();
        state_set0.apply();
        state_set1.apply();
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
        ig_md.worker_id = worker_id;
        ig_md.num_workers = (bit<8>)num_workers;
        ig_md.job_diff = job ^ hdr.switchml.job_number;
        ig_md.mgid = mgid;
        // pool_base - slot, not slot - pool_base: Tofino takes action data as the first
        // operand of a subtraction only, and here it costs no stage
        ig_md.pool_gap = pool_base - ig_md.slot;
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

    /* ---- outcome: AGGREGATED and RESETS of SwitchIngress.packet_outcomes ----
     * One table for both: a Tofino counter is used by one table's actions (or by uses the
     * compiler can prove exclusive). A RESET reaches PHASE_RESET only admitted, and a new
     * contribution (map_result == 0) is never dropped after the verdict. */

    action count_aggregated() { packet_outcomes.count(PACKETS_AGGREGATED); }
    action count_reset() { packet_outcomes.count(PACKETS_RESETS); }

    table outcome {
        key = { ig_md.phase : exact; ig_md.map_result : ternary; }
        actions = { count_aggregated; count_reset; @defaultonly NoAction; }
        const entries = {
            (PHASE_CONTRIBUTE, 0) : count_aggregated();
            (PHASE_RESET,      _) : count_reset();
        }
        const default_action = NoAction();
        size = 2;
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

    /* ---- next_step: what leaves the first pass, once the registers have spoken ----
     * One table (as p4app-switchML's next-step selector) instead of a chain of ifs: pinned
     * to the last stage, beside the last value pairs, it leaves the stages before it to the
     * pairs (left to itself, bf-p4c puts the reply logic in a stage of its own and needs a
     * 13th). */

    action drop_counted() {
        drops.count(ig_md.drop_reason);
        ig_dprsr_md.drop_ctl = 1;
    }

    action absorb() {
        ig_dprsr_md.drop_ctl = 1;  // the slot waits for the other workers
    }

    action echo_reset() {
        // The echo, back to the controller, acknowledges the reset.
        swap_addresses();
        ig_tm_md.ucast_egress_port = ig_intr_md.ingress_port;
    }

    // Complete, or an answer: make the packet the RESULT now and recirculate it once, so
    // that the harvest pass reads the first halves and the exponent out.
    action harvest_then(bit<8> next_kind) {
        hdr.switchml.msg_type = MSG_TYPE_RESULT;
        hdr.exponents.e1 = 0;
        swap_addresses();
        ig_md.bridge.kind = BRIDGE_HARVEST;
        ig_md.bridge.next_kind = next_kind;
        ig_md.bridge.mgid = ig_md.mgid;
        ig_tm_md.ucast_egress_port = ig_intr_md.ingress_port[8:7] ++ (bit<7>)RECIRCULATION_PORT_IN_PIPE;
        ig_tm_md.bypass_egress = 1;
    }

    @stage(11)
    table next_step {
        key = {
            ig_md.fresh      : exact;
            ig_md.phase      : ternary;
            ig_md.dropped    : ternary;
            ig_md.missing    : ternary;  // after this packet; 0: the slot is complete
            ig_md.map_result : ternary;  // non-zero: a retransmission
        }
        actions = { drop_counted; absorb; echo_reset; harvest_then;
                    @defaultonly NoAction; }
        const entries = {  // the first match wins
            (true, _, true, _, _)                  : drop_counted();
            (true, PHASE_RESET, _, _, _)           : echo_reset();
            (true, PHASE_CONTRIBUTE, _, 0, 0)      : harvest_then(BRIDGE_MULTICAST);  // completed it
            (true, PHASE_CONTRIBUTE, _, 0, _)      : harvest_then(BRIDGE_ANSWER);     // answer again
            (true, PHASE_CONTRIBUTE, _, _, 0)      : absorb();
            (true, PHASE_CONTRIBUTE, _, _, _)      : drop_counted();  // a retransmission, incomplete
        }
        const default_action = NoAction();  // a harvest pass, or traffic that is not switchml's
        size = 8;
    }

    apply {
        bool is_switchml = hdr.udp.isValid() &&
            (hdr.udp.dst_port & SWITCHML_UDP_PORT_MASK) == SWITCHML_UDP_PORT;
        // In both passes (the harvest parses the header again): set * POOL_SIZE + slot, with
        // POOL_SIZE a power of two (constants.p4); a slot >= POOL_SIZE never reaches a
        // register. Neither set_bit ++ slot nor slices of slot: Tofino's PHV allocation must
        // keep a deparsed header's fields where they sit in their containers.
        if (ig_md.set_bit == 1) {
            ig_md.index = ig_md.slot | POOL_SIZE;
        } else {
            ig_md.index = ig_md.slot;
        }

        if (ig_md.bridge.isValid() && ig_md.bridge.kind == BRIDGE_HARVEST) {
            // Second pass of a complete slot or of an answer: read the first halves out
            // (values.apply below), then send the result on.
            ig_md.phase = PHASE_HARVEST;
            if (ig_md.bridge.next_kind == BRIDGE_MULTICAST) {
                results_multicast.count((bit<32>)ig_md.slot);
                ig_tm_md.mcast_grp_a = ig_md.bridge.mgid;
            } else {
                retransmissions_answered.count((bit<32>)ig_md.slot);
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
            ig_md.biased_e0 = hdr.exponents.e0 ^ 0x80;

            loss.apply();
            admission.apply();
            worker_bit.apply();
            ig_md.loss_roll[14:0] = loss_roll.get();  // bit 15 stays 0 (parser): no cast, no stage
            ig_md.loss_margin = ig_md.loss_roll - ig_md.drop_threshold;
            ig_md.pool_margin = ig_md.pool_gap + ig_md.pool_size;
            ig_md.last_count = (bit<16>)ig_md.num_workers - 1;
            ig_md.fresh = true;
        }

        // Unconditional, gated by their keys (fresh, phase): applied after a branch, a Tofino
        // table waits for every table in it, so the registers stay out of the branches and
        // run in the stages right after the verdict.
        bookkeeping.apply(hdr, ig_md);  // the verdict, then the counts and the exponent

        outcome.apply();

        // The value pairs serve both passes; PHASE_NONE leaves them alone.
        values.apply(hdr.payload, ig_md.index, ig_md.phase, ig_md.seen_before, ig_md.map_result);

        if (ig_md.phase == PHASE_HARVEST) {
            hdr.exponents.e0 = ig_md.max_biased[7:0] ^ 0x80;
        }
        next_step.apply();
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
