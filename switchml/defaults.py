"""Every default of switchml in one place: ports, packet and pool sizes, timeouts.

Command lines, the controller, the worker and the software switch read their defaults
from here, so changing one number here changes it everywhere.
"""

from __future__ import annotations

from switchml.protocol import UDP_PORT

SWITCH_HOST = "127.0.0.1"
SWITCH_PORT = UDP_PORT  #: the switch's UDP data port (48864)
CONTROL_PORT = 48865  #: the controller's ZeroMQ port
CONTROLLER = f"tcp://{SWITCH_HOST}:{CONTROL_PORT}"
P4RUNTIME_PORT = 9559  #: the software switch's P4Runtime gRPC port

#: Elements per packet the controller hands out for the software switch: 1024 int32 is a
#: 4 KB payload, well under the loopback MTU; a P4 target overrides it (BMv2: 64).
K = 1024
#: Slots per job (the worker's window W). n * W * packet must fit the switch's receive
#: buffer (net.core.rmem_max is 4 MB here): 8 workers x 64 x 4 KB = 2 MB.
WINDOW = 64
#: Slots in the switch (all jobs together); pool_index has 14 bits, so at most 16384.
POOL_SIZE = 1024

#: Retransmission timeout (RTO) of the worker, as TCP's (RFC 6298): smoothed round trip + 4 x
#: its mean deviation, measured on first transmissions only (Karn), doubled per resend, and
#: kept between RETRANSMIT_TIMEOUT_S (the floor, and the RTO before the first sample) and
#: RETRANSMIT_TIMEOUT_MAX_S. The floor bounds how fast a lost packet is resent, so it stays
#: at the old fixed timeout's 10 ms (1% loss is recovered no slower); what a descheduled
#: peer costs beyond it is taken by the estimator's deviation term and by resending only
#: the oldest packet while nothing at all comes back (switchml.worker, step 5).
RETRANSMIT_TIMEOUT_S = 0.010
RETRANSMIT_TIMEOUT_MAX_S = 0.2
#: RFC 6298's gains per round trip (alpha = 1/8 for the mean, beta = 1/4 for the deviation)
#: and K = 4 deviations; with w packets in flight a worker gets w samples per round trip, so
#: each sample gets 1/w of the gain (RFC 7323, appendix G).
RTT_ALPHA = 1 / 8
RTT_BETA = 1 / 4
RTT_K = 4
#: An allreduce that makes no progress for this long fails (dead peer, dead switch).
PROGRESS_TIMEOUT_S = 30.0
#: How long a worker waits for the controller (registration waits for all ranks).
CONTROL_TIMEOUT_S = 60.0
#: How often workers tell the controller they are alive, and after how long without a
#: heartbeat the controller declares a job failed and frees its slots. Workers learn that
#: verdict with their next heartbeat, and a dead controller process (with the software
#: switch, the switch) at once, from its closed connection.
HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TIMEOUT_S = 10.0
#: How long the controller retransmits RESET packets before giving up on a job's set-up.
RESET_TIMEOUT_S = 5.0
#: How long a worker waits, right after registration, for the switch to answer its probe
#: (one aggregation round that every rank makes at once) before it names the address.
PROBE_TIMEOUT_S = 5.0

#: Socket buffer the worker and the software switch ask for (SO_RCVBUF / SO_SNDBUF).
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024

#: The cluster secret that authenticates and encrypts the control channel (CurveZMQ keys
#: are derived from it, ``switchml.security``): its text in SECRET_ENV, or a file holding
#: it named by SECRET_FILE_ENV (``--secret-file`` of every command). Launchers hand it to
#: every rank through these variables.
SECRET_ENV = "SWITCHML_SECRET"
SECRET_FILE_ENV = "SWITCHML_SECRET_FILE"
#: Shortest cluster secret accepted, in bytes (32 random bytes, base64: 44 characters).
SECRET_MIN_BYTES = 16
