/* Shared by the native data paths (native/switch.c, native/worker.c): wire-format constants,
 * byte-order loops, the clock and batched UDP helpers.
 *
 * The constants mirror switchml/protocol.py and switchml/pipeline.py; each module exports
 * them (CONSTANTS) and the Python side refuses the module when one differs, so the two can
 * never drift apart silently.
 */
#ifndef SWITCHML_NATIVE_H
#define SWITCHML_NATIVE_H

#define _GNU_SOURCE 1
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define SML_HEADER_BYTES 8
#define SML_PREAMBLE_BYTES 10
#define SML_MAX_K 4096
#define SML_MAX_PACKET (SML_PREAMBLE_BYTES + 4 * SML_MAX_K)
#define SML_SLOT_MASK 0x3FFF
#define SML_SET_BIT 0x8000
#define SML_MSG_UPDATE 0
#define SML_MSG_RESULT 1
#define SML_MSG_RESET 2
#define SML_EXP_NAN 127
#define SML_EXP_MIN (-126)
#define SML_QUANT_BITS 30

/* k of a size enum: 0=32 ... 7=4096 */
static inline int sml_k_of_size(int size) { return 32 << size; }

/* Hot loops get an AVX2 clone next to the baseline one where the compiler and the C library
 * support function multiversioning: the package is built once and may run on older CPUs. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones) && defined(__linux__)
#define SML_HOT __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef SML_HOT
#define SML_HOT
#endif

static inline uint32_t sml_load_be32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return __builtin_bswap32(v);
}

static inline void sml_store_be32(uint8_t *p, uint32_t v) {
    v = __builtin_bswap32(v);
    memcpy(p, &v, 4);
}

static inline double sml_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Wait up to `seconds` for `events` on fd (EINTR counts as a wake-up). */
static inline int sml_wait(int fd, short events, double seconds) {
    struct pollfd p = {.fd = fd, .events = events, .revents = 0};
    struct timespec ts;
    if (seconds < 0) seconds = 0;
    ts.tv_sec = (time_t)seconds;
    ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
    return ppoll(&p, 1, &ts, NULL);
}

/* Send msgs[0..n) with sendmmsg. A full send buffer waits (a non-blocking socket would
 * otherwise lose the packet to EAGAIN); any other error skips that one datagram, as UDP
 * would lose it anyway. Returns the number of datagrams that could not be sent. */
static inline unsigned sml_send_all(int fd, struct mmsghdr *msgs, unsigned n) {
    unsigned i = 0, failed = 0;
    int stalls = 0;
    while (i < n) {
        int r = sendmmsg(fd, msgs + i, n - i, 0);
        if (r > 0) {
            i += (unsigned)r;
            stalls = 0;
            continue;
        }
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) && stalls < 100) {
            stalls++;
            sml_wait(fd, POLLOUT, 0.001);
            continue;
        }
        failed++; /* ECONNREFUSED and friends, or a send buffer stuck for 100 ms */
        i++;
        stalls = 0;
    }
    return failed;
}

#endif
