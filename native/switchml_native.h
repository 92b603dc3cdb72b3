/* Shared by the native data paths (native/switch.c, native/worker.c) and native/bench.c: wire-format constants,
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
#include <netinet/udp.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define SML_HEADER_BYTES 8
#define SML_PREAMBLE_BYTES 10
#define SML_MAX_K 4096
#define SML_MAX_PACKET (SML_PREAMBLE_BYTES + 4 * SML_MAX_K)
#define SML_MAX_BATCH 256 /* messages per recvmmsg: each has a 64 KB buffer (a coalesced receive) */
#define SML_SLOT_MASK 0x3FFF
#define SML_SET_BIT 0x8000
#define SML_MSG_UPDATE 0
#define SML_MSG_RESULT 1
#define SML_MSG_RESET 2
#define SML_EXP_NAN 127
#define SML_EXP_MIN (-126)
#define SML_QUANT_BITS 30
#define SML_DESC_DTYPE_BITS 2 /* protocol.DESCRIPTOR_DTYPE_BITS: the call descriptor's dtype code */

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

/* ------------------------------------------------------------------ UDP segmentation offload
 * A sender passes a run of equal-size datagrams to one destination in one message with
 * UDP_SEGMENT (GSO); a receiver with UDP_GRO gets such a run, on loopback, in one buffer with
 * the segment size in a cmsg. On any wire they are the same datagrams; receivers without
 * UDP_GRO (the Python paths, a P4 switch) get them one by one. It cuts the kernel's
 * per-datagram work, which bounds this software switch. */
#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#define SML_GSO_MAX_BYTES 65000 /* payload of one message: under IPv4's 65507 */
#define SML_GSO_MAX_SEGS 64     /* the kernel's UDP_MAX_SEGMENTS on older kernels */
#define SML_RX_BUFFER 65536     /* a receive buffer that holds any (coalesced) datagram */
#define SML_CTL_SPACE CMSG_SPACE(sizeof(int))

/* Ask for coalesced receives; 0 on success (older kernels: -1, and nothing changes). */
static inline int sml_enable_gro(int fd) {
    int one = 1;
    return setsockopt(fd, SOL_UDP, UDP_GRO, &one, sizeof one);
}

/* The segment size of a coalesced receive (0: one plain datagram). */
static inline int sml_gro_size(struct msghdr *h) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR(h, c)) {
        if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO) {
            int size;
            memcpy(&size, CMSG_DATA(c), sizeof size);
            return size;
        }
    }
    return 0;
}

/* Datagrams queued for one sendmmsg; with *gso set, consecutive equal-size datagrams to one
 * destination share a message. Capacity is fixed at init, so pointers into it stay valid. */
typedef struct {
    struct mmsghdr *msgs;
    struct iovec *iov;
    struct sockaddr_in *addr;
    char *ctl;
    unsigned n, niov, cap;
    size_t bytes; /* payload of the last message */
    int *gso;     /* the caller's flag: cleared for good when the kernel refuses a segmented send */
} sml_tx_t;

static inline int sml_tx_init(sml_tx_t *t, unsigned cap, int *gso) {
    memset(t, 0, sizeof *t);
    t->cap = cap;
    t->gso = gso;
    t->msgs = calloc(cap, sizeof(struct mmsghdr));
    t->iov = calloc(cap, sizeof(struct iovec));
    t->addr = calloc(cap, sizeof(struct sockaddr_in));
    t->ctl = calloc(cap, SML_CTL_SPACE);
    return (t->msgs && t->iov && t->addr && t->ctl) ? 0 : -1;
}

static inline void sml_tx_free(sml_tx_t *t) {
    free(t->msgs), free(t->iov), free(t->addr), free(t->ctl);
    memset(t, 0, sizeof *t);
}

/* Queue one datagram; the caller keeps `payload` alive until the flush. 0, or -1 when full. */
static inline int sml_tx_add(sml_tx_t *t, const void *payload, size_t len, const struct sockaddr_in *dst) {
    if (t->niov >= t->cap) return -1;
    if (t->n && *t->gso) {
        struct msghdr *last = &t->msgs[t->n - 1].msg_hdr;
        const struct sockaddr_in *a = &t->addr[t->n - 1];
        if (a->sin_addr.s_addr == dst->sin_addr.s_addr && a->sin_port == dst->sin_port &&
            last->msg_iov[0].iov_len == len && t->bytes + len <= SML_GSO_MAX_BYTES &&
            last->msg_iovlen < SML_GSO_MAX_SEGS) {
            t->iov[t->niov++] = (struct iovec){(void *)payload, len};
            last->msg_iovlen++;
            t->bytes += len;
            return 0;
        }
    }
    t->addr[t->n] = *dst;
    t->iov[t->niov] = (struct iovec){(void *)payload, len};
    t->msgs[t->n].msg_hdr = (struct msghdr){.msg_name = &t->addr[t->n], .msg_namelen = sizeof(struct sockaddr_in),
                                           .msg_iov = &t->iov[t->niov], .msg_iovlen = 1};
    t->n++, t->niov++;
    t->bytes = len;
    return 0;
}

/* Send everything queued and empty the queue; returns the datagrams that could not be sent.
 * A full send buffer waits (up to 100 ms); a segmented message the kernel refuses (EINVAL,
 * EIO, EMSGSIZE: a segment over the path MTU, no checksum offload) turns offload off for
 * good and goes out datagram by datagram; other errors lose the datagrams, as UDP may. */
static inline unsigned sml_tx_flush(int fd, sml_tx_t *t) {
    unsigned failed = 0, i = 0;
    int stalls = 0;
    for (unsigned m = 0; m < t->n; m++) {
        struct msghdr *h = &t->msgs[m].msg_hdr;
        if (h->msg_iovlen > 1) {
            char *ctl = t->ctl + (size_t)m * SML_CTL_SPACE;
            memset(ctl, 0, SML_CTL_SPACE);
            h->msg_control = ctl;
            h->msg_controllen = CMSG_SPACE(sizeof(uint16_t));
            struct cmsghdr *c = CMSG_FIRSTHDR(h);
            c->cmsg_level = SOL_UDP;
            c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t seg = (uint16_t)h->msg_iov[0].iov_len;
            memcpy(CMSG_DATA(c), &seg, sizeof seg);
        }
    }
    while (i < t->n) {
        int r = sendmmsg(fd, t->msgs + i, t->n - i, 0);
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
        struct msghdr *h = &t->msgs[i].msg_hdr;
        if (h->msg_iovlen > 1 && (errno == EINVAL || errno == EIO || errno == EMSGSIZE || errno == EOPNOTSUPP)) {
            *t->gso = 0;
            struct msghdr one = *h;
            one.msg_control = NULL;
            one.msg_controllen = 0;
            one.msg_iovlen = 1;
            for (size_t s = 0; s < h->msg_iovlen; s++) {
                one.msg_iov = &h->msg_iov[s];
                while (sendmsg(fd, &one, 0) < 0) {
                    if (errno == EINTR) continue;
                    if ((errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) && stalls++ < 100) {
                        sml_wait(fd, POLLOUT, 0.001);
                        continue;
                    }
                    failed++;
                    break;
                }
            }
        } else {
            failed += (unsigned)h->msg_iovlen;
        }
        i++;
        stalls = 0;
    }
    t->n = t->niov = 0;
    t->bytes = 0;
    return failed;
}

/* recvmmsg buffers: `count` messages of SML_RX_BUFFER bytes, each with room for a cmsg. */
typedef struct {
    struct mmsghdr *msgs;
    struct iovec *iov;
    struct sockaddr_in *addr;
    char *ctl;
    uint8_t *buf;
    unsigned count;
} sml_rx_t;

static inline int sml_rx_init(sml_rx_t *r, unsigned count) {
    memset(r, 0, sizeof *r);
    r->count = count;
    r->msgs = calloc(count, sizeof(struct mmsghdr));
    r->iov = calloc(count, sizeof(struct iovec));
    r->addr = calloc(count, sizeof(struct sockaddr_in));
    r->ctl = calloc(count, SML_CTL_SPACE);
    r->buf = malloc((size_t)count * SML_RX_BUFFER);
    return (r->msgs && r->iov && r->addr && r->ctl && r->buf) ? 0 : -1;
}

static inline void sml_rx_free(sml_rx_t *r) {
    free(r->msgs), free(r->iov), free(r->addr), free(r->ctl), free(r->buf);
    memset(r, 0, sizeof *r);
}

/* recvmmsg without waiting: the number of messages (0: none), or -1 with errno set. */
static inline int sml_rx_recv(int fd, sml_rx_t *r) {
    for (unsigned i = 0; i < r->count; i++) {
        r->iov[i] = (struct iovec){r->buf + (size_t)i * SML_RX_BUFFER, SML_RX_BUFFER};
        r->msgs[i].msg_hdr = (struct msghdr){.msg_name = &r->addr[i], .msg_namelen = sizeof(struct sockaddr_in),
                                             .msg_iov = &r->iov[i], .msg_iovlen = 1,
                                             .msg_control = r->ctl + (size_t)i * SML_CTL_SPACE,
                                             .msg_controllen = SML_CTL_SPACE};
    }
    int n = recvmmsg(fd, r->msgs, r->count, MSG_DONTWAIT, NULL);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return 0;
    return n;
}

/* Segment `seg` (0-based) of received message m: its bytes and length; -1 past the end. */
static inline int sml_rx_segment(sml_rx_t *r, unsigned m, size_t *offset, const uint8_t **data, size_t *len) {
    size_t total = r->msgs[m].msg_len;
    int gso = sml_gro_size(&r->msgs[m].msg_hdr);
    if (*offset >= total && !(total == 0 && *offset == 0)) return -1;
    size_t step = gso > 0 ? (size_t)gso : total;
    if (step == 0) step = 1; /* an empty datagram: one segment of 0 bytes */
    *data = (const uint8_t *)r->iov[m].iov_base + *offset;
    *len = total - *offset < step ? total - *offset : step;
    *offset = *offset + step;
    return 0;
}

/* ------------------------------------------------------------------ stop flags (Python side)
 * A loop that runs without the GIL stops when byte 0 of a writable buffer (a bytearray the
 * Python caller owns) turns non-zero. */
#ifdef Py_PYTHON_H
static int sml_parse_flag(PyObject *obj, Py_buffer *flag) {
    if (PyObject_GetBuffer(obj, flag, PyBUF_WRITABLE) < 0) return -1;
    if (flag->len < 1) {
        PyBuffer_Release(flag);
        PyErr_SetString(PyExc_ValueError, "stop flag: expected a writable buffer of at least 1 byte");
        return -1;
    }
    return 0;
}

static inline int sml_flag_set(const Py_buffer *flag) { return __atomic_load_n((uint8_t *)flag->buf, __ATOMIC_RELAXED); }
#endif

#endif
