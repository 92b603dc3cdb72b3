/* constants.p4: the numbers both P4 programs share.
 *
 * Every value here restates one of switchml/protocol.py (wire format v1),
 * switchml/pipeline.py (counter indices) or switchml/defaults.py (pool size);
 * tests/test_p4_contract.py parses this file and fails when they drift apart.
 */
#ifndef _SWITCHML_CONSTANTS_P4_
#define _SWITCHML_CONSTANTS_P4_

/* ---------------------------------------------------------------- network */

const bit<16> ETHERTYPE_IPV4 = 0x0800;
const bit<8>  IP_PROTOCOL_UDP = 17;
const bit<16> IPV4_HEADER_BYTES = 20;  // the parser takes only IPv4 without options (ihl = 5)
const bit<16> UDP_HEADER_BYTES = 8;

/* ------------------------------------------------------ wire format v1 */

// The switch owns 16 UDP ports: dst port & 0xFFF0 == 0xBEE0 (protocol.UDP_PORT_MATCH).
const bit<16> SWITCHML_UDP_PORT = 0xBEE0;
const bit<16> SWITCHML_UDP_PORT_MASK = 0xFFF0;

// msg_type nibble (protocol.MsgType).
const bit<4> MSG_TYPE_UPDATE = 0;
const bit<4> MSG_TYPE_RESULT = 1;
const bit<4> MSG_TYPE_RESET = 2;

// Elements per packet are compiled in: k = 64 is size enum 1 (protocol.SIZE_TO_K).
// Only RESET packets may carry another hardware size (0..3): the switch never reads their
// payload, so the controller need not know the target's k to clear a slot.
#define SWITCHML_K 64
const bit<3> SWITCHML_SIZE = 1;
const bit<3> SWITCHML_SIZE_K32 = 0;
const bit<3> SWITCHML_SIZE_K128 = 2;
const bit<3> SWITCHML_SIZE_K256 = 3;
const bit<3> SWITCHML_MAX_HARDWARE_SIZE = 3;

// UDP length = 8 (UDP header) + 10 (switchml header and exponents) + 4 * k.
const bit<16> SWITCHML_UDP_LENGTH = 274;       // k = 64, the only size whose payload is read
const bit<16> SWITCHML_UDP_LENGTH_K32 = 146;
const bit<16> SWITCHML_UDP_LENGTH_K128 = 530;
const bit<16> SWITCHML_UDP_LENGTH_K256 = 1042;

/* ------------------------------------------------------------ the pool */

// Slots in the switch, all jobs together (switchml/defaults.py POOL_SIZE). Each slot has
// two sets (shadow copies), so per-set state is indexed by set * POOL_SIZE + slot.
#ifndef POOL_SIZE
#define POOL_SIZE 1024
#endif
#define REGISTER_SIZE (2 * POOL_SIZE)

// Width of the per-slot worker bitmap: worker ids are 0..31 (protocol.MAX_WORKERS).
#define MAX_WORKERS 32

// Who the admission table says the sender is.
const bit<2> ROLE_NONE = 0;        // no entry: only its drop is counted
const bit<2> ROLE_WORKER = 1;      // set_worker: may send UPDATEs for its job's slots
const bit<2> ROLE_CONTROLLER = 2;  // set_controller: may send RESETs

/* ------------------------------------------------ counters (pipeline.py) */

// Index into SwitchIngress.drops: why a switchml packet was dropped (pipeline.DropReason).
const bit<32> DROP_MALFORMED = 0;
const bit<32> DROP_BAD_SIZE = 1;
const bit<32> DROP_BAD_MSG_TYPE = 2;
const bit<32> DROP_NOT_ADMITTED = 3;
const bit<32> DROP_SLOT_OUT_OF_RANGE = 4;
const bit<32> DROP_JOB_MISMATCH = 5;
const bit<32> DROP_RESET_NOT_FROM_CONTROLLER = 6;
const bit<32> DROP_RETRANSMISSION_INCOMPLETE = 7;
const bit<32> DROP_EMULATED_LOSS = 8;
const bit<32> DROP_SIZE_MISMATCH = 9;  // software switch only; kept so both counters have one size
#define NUM_DROP_REASONS 10

// Index into SwitchIngress.packets (pipeline.PacketCounter).
const bit<32> PACKETS_RECEIVED = 0;
const bit<32> PACKETS_AGGREGATED = 1;
const bit<32> PACKETS_RESETS = 2;
#define NUM_PACKET_COUNTERS 3

// Index into SwitchIngress.leaf, the leaf role's counter (pipeline.LeafCounter; only in a
// program built with -DSWITCHML_LEAF_ROLE, docs/hierarchy.md).
const bit<32> LEAF_SENT_UPSTREAM = 0;
const bit<32> LEAF_RESENT_UPSTREAM = 1;
const bit<32> LEAF_RESULTS_FROM_UPSTREAM = 2;
const bit<32> LEAF_IGNORED_FROM_UPSTREAM = 3;
#define NUM_LEAF_COUNTERS 4

/* ----------------------------------------------------------- table sizes */

#define LOSS_TABLE_SIZE 512
#define ADMISSION_TABLE_SIZE 4096
#define FORWARD_TABLE_SIZE 1024
#define EGRESS_REWRITE_TABLE_SIZE 4096
#define UPSTREAM_TABLE_SIZE 256  // one entry per job number

#endif  /* _SWITCHML_CONSTANTS_P4_ */
