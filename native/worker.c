/* switchml._native: the worker engine's per-packet loop and the exponent quantizer in C.
 *
 * switchml/quantize.py and switchml.engine.PythonEngine (switchml/engine.py) stay the reference;
 * tests/test_native.py checks this module against them bit for bit. Only the buffer
 * protocol is used (no numpy headers), so the build needs nothing but a C compiler.
 *
 * Quantizer (DESIGN.md, "Quantization"): local exponent e = biased_exponent(max|x|) - 126
 * clamped to -126..127 (127: NaN/Inf); f = 2^(30 - c - E); q = rint(x * f) in float64;
 * result = sum / f, cast to float32. f is a power of two, so x * f and sum * (1/f) are
 * exact and the only rounding is rint's (ties to even, as numpy's rint).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "switchml_native.h"

#include <arpa/inet.h>
#include <math.h>
#include <stdlib.h>

#define RX_BATCH 32 /* messages per recvmmsg; with UDP_GRO each may hold many datagrams */
#define SCAN_DEFER_MAX 2 /* full batches in a row that may postpone a due timer check (Python: 64 receives) */

enum { ST_SENT = 0, ST_RETRANS = 1, ST_RESULTS = 2, ST_STALE = 3, ST_DUP = 4, NUM_STATS = 5 };
enum { RC_DONE = 0, RC_ABORT = 1, RC_CLOSED = 2, RC_TIMEOUT = 3, RC_MISMATCH = 4 };
enum { FLAG_ABORT = 1, FLAG_CLOSED = 2 };

/* ------------------------------------------------------------------ quantizer kernels */
static int sum_bits(int n) {
    int c = 0;
    while ((1L << c) < (long)n) c++;
    return c;
}

/* Local exponent of x[0..m): integer max of |x|'s bit patterns (for non-negative floats
 * the order of the bits is the order of the values, and NaN/Inf sort above every finite
 * value), then the exponent field: |x| < 2^(biased - 126). */
SML_HOT static int block_exponent(const float *restrict x, Py_ssize_t m) {
    uint32_t peak = 0;
    for (Py_ssize_t i = 0; i < m; i++) {
        uint32_t b;
        memcpy(&b, x + i, 4);
        b &= 0x7FFFFFFFU;
        peak = b > peak ? b : peak;
    }
    if (peak >= 0x7F800000U) return SML_EXP_NAN; /* NaN or Inf */
    int e = (int)(peak >> 23) - 126;               /* zero and denormals give <= -126 */
    if (e < SML_EXP_MIN) e = SML_EXP_MIN;
    if (e > SML_EXP_NAN) e = SML_EXP_NAN; /* |x| >= 2^126 */
    return e;
}

/* rint for |v| < 2^51 without SSE4.1's roundpd: adding 1.5 * 2^52 rounds at the units place
 * (ties to even) in the default rounding mode, which is what numpy's rint does. Out of
 * int32 range, NaN included, gives INT32_MIN: what numpy's float64 -> int32 cast gives on x86. */
static inline int32_t rint_i32(double v) {
    const double magic = 6755399441055744.0;
    double r = (v + magic) - magic;
    return (r >= -2147483648.0 && r <= 2147483647.0) ? (int32_t)r : INT32_MIN;
}

/* Scale, round and byte-swap x[0..m) into big-endian int32, zero-filling out to k. */
SML_HOT static void quantize_be(const float *restrict x, Py_ssize_t m, Py_ssize_t k, double f, uint8_t *restrict out) {
    for (Py_ssize_t i = 0; i < m; i++) sml_store_be32(out + 4 * i, (uint32_t)rint_i32((double)x[i] * f));
    if (k > m) memset(out + 4 * m, 0, (size_t)(k - m) * 4);
}

SML_HOT static void dequantize_be(const uint8_t *restrict in, Py_ssize_t m, double inv_f, float *restrict out) {
    for (Py_ssize_t i = 0; i < m; i++) out[i] = (float)((double)(int32_t)sml_load_be32(in + 4 * i) * inv_f);
}

SML_HOT static void ints_to_be(const int32_t *restrict x, Py_ssize_t m, Py_ssize_t k, uint8_t *restrict out) {
    for (Py_ssize_t i = 0; i < m; i++) sml_store_be32(out + 4 * i, (uint32_t)x[i]);
    if (k > m) memset(out + 4 * m, 0, (size_t)(k - m) * 4);
}

SML_HOT static void ints_from_be(const uint8_t *restrict in, Py_ssize_t m, int32_t *restrict out) {
    for (Py_ssize_t i = 0; i < m; i++) out[i] = (int32_t)sml_load_be32(in + 4 * i);
}

/* The same in float32, twice the lanes: when f is a normal float32, x * f is exact wherever
 * it matters (a product that underflows is below 2^-126 and rounds to 0 either way), and the
 * float -> int32 conversion (cvtps2dq) rounds to nearest even, as rint; out of range and NaN
 * give INT32_MIN, as above. */
SML_HOT static void quantize_be_f32(const float *restrict x, Py_ssize_t m, Py_ssize_t k, float f, uint8_t *restrict out) {
    for (Py_ssize_t i = 0; i < m; i++) sml_store_be32(out + 4 * i, (uint32_t)__builtin_irintf(x[i] * f));
    if (k > m) memset(out + 4 * m, 0, (size_t)(k - m) * 4);
}

/* Block b's packet payload: quantized with global exponent e (zeros for the NaN sentinel). */
static void quantize_block(const float *x, Py_ssize_t m, Py_ssize_t k, int e, int n, uint8_t *out) {
    if (e == SML_EXP_NAN) {
        memset(out, 0, (size_t)k * 4);
        return;
    }
    int shift = SML_QUANT_BITS - sum_bits(n) - e; /* f = 2^shift, shift in -101..156 */
    if (shift <= 127)
        quantize_be_f32(x, m, k, ldexpf(1.0f, shift), out);
    else /* a block below 2^-97: f is no float32, take the float64 path */
        quantize_be(x, m, k, ldexp(1.0, shift), out);
}

static void dequantize_block(const uint8_t *in, Py_ssize_t m, int e, int n, float *out) {
    if (e == SML_EXP_NAN) {
        for (Py_ssize_t i = 0; i < m; i++) out[i] = NAN;
        return;
    }
    dequantize_be(in, m, ldexp(1.0, e + sum_bits(n) - SML_QUANT_BITS), out);
}

/* ------------------------------------------------------------------ Python: quantizer */
static int check_n(int n) {
    if (n < 1) {
        PyErr_Format(PyExc_ValueError, "num_workers=%d; expected >= 1", n);
        return -1;
    }
    return 0;
}

/* block_exponents(x: float32 buffer, k, out: int8 buffer of ceil(len/k)) */
static PyObject *py_block_exponents(PyObject *Py_UNUSED(m), PyObject *args) {
    Py_buffer x, out;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "y*nw*", &x, &k, &out)) return NULL;
    Py_ssize_t n_el = x.len / 4, blocks = k > 0 ? (n_el + k - 1) / k : -1;
    if (k < 1 || x.len % 4 || out.len != blocks) {
        PyErr_SetString(PyExc_ValueError, "block_exponents: x must hold float32, k >= 1, out ceil(len/k) bytes");
    } else {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t b = 0; b < blocks; b++) {
            Py_ssize_t m = (b + 1) * k <= n_el ? k : n_el - b * k;
            ((int8_t *)out.buf)[b] = (int8_t)block_exponent((const float *)x.buf + b * k, m);
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* quantize(x: float32 buffer, e, n, out: 4*len bytes, big-endian int32) */
static PyObject *py_quantize(PyObject *Py_UNUSED(m), PyObject *args) {
    Py_buffer x, out;
    int e, n;
    if (!PyArg_ParseTuple(args, "y*iiw*", &x, &e, &n, &out)) return NULL;
    if (check_n(n) == 0) {
        if (x.len % 4 || out.len != x.len)
            PyErr_SetString(PyExc_ValueError, "quantize: x must hold float32 and out as many bytes");
        else {
            Py_BEGIN_ALLOW_THREADS quantize_block(x.buf, x.len / 4, x.len / 4, e, n, out.buf);
            Py_END_ALLOW_THREADS
        }
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* dequantize(q: big-endian int32 bytes, e, n, out: float32 buffer) */
static PyObject *py_dequantize(PyObject *Py_UNUSED(m), PyObject *args) {
    Py_buffer q, out;
    int e, n;
    if (!PyArg_ParseTuple(args, "y*iiw*", &q, &e, &n, &out)) return NULL;
    if (check_n(n) == 0) {
        if (q.len % 4 || out.len != q.len)
            PyErr_SetString(PyExc_ValueError, "dequantize: q must hold int32 and out as many bytes");
        else {
            Py_BEGIN_ALLOW_THREADS dequantize_block(q.buf, q.len / 4, e, n, out.buf);
            Py_END_ALLOW_THREADS
        }
    }
    PyBuffer_Release(&q);
    PyBuffer_Release(&out);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* quantize_blocks(x, k, n, out, exps): per block, the exponent scan and the quantization
 * with that exponent in one visit of the block (what one rank does when it is the only
 * contributor); the kernel `switchml-bench pps --quantize` times. */
static PyObject *py_quantize_blocks(PyObject *Py_UNUSED(m), PyObject *args) {
    Py_buffer x, out, exps;
    Py_ssize_t k;
    int n;
    if (!PyArg_ParseTuple(args, "y*niw*w*", &x, &k, &n, &out, &exps)) return NULL;
    Py_ssize_t n_el = x.len / 4, blocks = k > 0 ? (n_el + k - 1) / k : -1;
    if (check_n(n) == 0) {
        if (k < 1 || x.len % 4 || out.len != blocks * k * 4 || exps.len != blocks)
            PyErr_SetString(PyExc_ValueError, "quantize_blocks: out needs ceil(len/k)*k int32, exps ceil(len/k)");
        else {
            Py_BEGIN_ALLOW_THREADS
            for (Py_ssize_t b = 0; b < blocks; b++) {
                Py_ssize_t mm = (b + 1) * k <= n_el ? k : n_el - b * k;
                const float *xb = (const float *)x.buf + b * k;
                int e = block_exponent(xb, mm);
                ((int8_t *)exps.buf)[b] = (int8_t)e;
                quantize_block(xb, mm, k, e, n, (uint8_t *)out.buf + b * k * 4);
            }
            Py_END_ALLOW_THREADS
        }
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    PyBuffer_Release(&exps);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* dequantize_blocks(q, k, n, exps, out): the inverse of quantize_blocks. */
static PyObject *py_dequantize_blocks(PyObject *Py_UNUSED(m), PyObject *args) {
    Py_buffer q, exps, out;
    Py_ssize_t k;
    int n;
    if (!PyArg_ParseTuple(args, "y*niy*w*", &q, &k, &n, &exps, &out)) return NULL;
    Py_ssize_t n_el = out.len / 4, blocks = k > 0 ? (n_el + k - 1) / k : -1;
    if (check_n(n) == 0) {
        if (k < 1 || out.len % 4 || q.len != blocks * k * 4 || exps.len != blocks)
            PyErr_SetString(PyExc_ValueError, "dequantize_blocks: q needs ceil(len/k)*k int32, exps ceil(len/k)");
        else {
            Py_BEGIN_ALLOW_THREADS
            for (Py_ssize_t b = 0; b < blocks; b++) {
                Py_ssize_t mm = (b + 1) * k <= n_el ? k : n_el - b * k;
                dequantize_block((const uint8_t *)q.buf + b * k * 4, mm, ((const int8_t *)exps.buf)[b], n,
                                 (float *)out.buf + b * k);
            }
            Py_END_ALLOW_THREADS
        }
    }
    PyBuffer_Release(&q);
    PyBuffer_Release(&exps);
    PyBuffer_Release(&out);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* copy(src, dst): memcpy, the baseline of the quantizer's throughput. */
static PyObject *py_copy(PyObject *Py_UNUSED(m), PyObject *args) {
    Py_buffer src, dst;
    if (!PyArg_ParseTuple(args, "y*w*", &src, &dst)) return NULL;
    if (src.len != dst.len)
        PyErr_SetString(PyExc_ValueError, "copy: src and dst differ in length");
    else {
        Py_BEGIN_ALLOW_THREADS memcpy(dst.buf, src.buf, (size_t)src.len);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ Python: the engine */
typedef struct {
    /* the call */
    const void *src;
    void *out;
    Py_ssize_t n_el, k, n_blocks, w, n_packets;
    int is_float, job, pool_base, n, size, worker_id;
    uint32_t tsi0, desc;
    const uint8_t *parity;
    int8_t *gexp;
    size_t plen;
} call_t;

/* Worker.first_window: packets in a call's first window (1 for an empty call: its descriptor). */
static inline Py_ssize_t first_window(Py_ssize_t window, Py_ssize_t n_el, Py_ssize_t k) {
    Py_ssize_t blocks = (n_el + k - 1) / k;
    if (blocks < 1) blocks = 1;
    return blocks < window ? blocks : window;
}

/* Packet i of the call into p, with a window of wnd slots (switchml.engine.PythonEngine's
 * make_packet; wnd > w only while draining after a shape mismatch): the first window carries
 * zero payload (packet 0: the descriptor word in lane worker_id) and, for float32, block i's
 * local exponent; packet i >= wnd carries block i-wnd (float32: quantized with its global
 * exponent). */
static void build_packet(const call_t *c, Py_ssize_t i, Py_ssize_t wnd, uint8_t *p) {
    Py_ssize_t rel = i % wnd;
    int set = (c->parity[rel] + (int)((i / wnd) & 1)) & 1;
    unsigned pidx = (unsigned)(c->pool_base + rel) | (set ? SML_SET_BIT : 0);
    int e0 = 0;
    uint8_t *payload = p + SML_PREAMBLE_BYTES;
    if (i >= wnd) {
        Py_ssize_t b = i - wnd, m = (b + 1) * c->k <= c->n_el ? c->k : c->n_el - b * c->k;
        if (c->is_float)
            quantize_block((const float *)c->src + b * c->k, m, c->k, c->gexp[b], c->n, payload);
        else
            ints_to_be((const int32_t *)c->src + b * c->k, m, c->k, payload);
    } else {
        memset(payload, 0, (size_t)c->k * 4);
        if (i == 0) sml_store_be32(payload + 4 * c->worker_id, c->desc);
    }
    if (c->is_float) {
        if (i < c->n_blocks) {
            Py_ssize_t m = (i + 1) * c->k <= c->n_el ? c->k : c->n_el - i * c->k;
            e0 = block_exponent((const float *)c->src + i * c->k, m);
        } else {
            e0 = SML_EXP_MIN;
        }
    }
    p[0] = (uint8_t)c->size; /* msg_type UPDATE (0) | size */
    p[1] = (uint8_t)c->job;
    sml_store_be32(p + 2, (uint32_t)(c->tsi0 + (uint32_t)i));
    p[6] = (uint8_t)(pidx >> 8);
    p[7] = (uint8_t)pidx;
    p[8] = (uint8_t)(int8_t)e0;
    p[9] = 0;
}

/* The RESULT of packet i (already matched): global exponent, and the sum it carries. */
static void take_result(const call_t *c, Py_ssize_t i, const uint8_t *d) {
    int8_t e0 = (int8_t)d[8];
    const uint8_t *payload = d + SML_PREAMBLE_BYTES;
    if (i >= c->w) {
        Py_ssize_t b = i - c->w, m = (b + 1) * c->k <= c->n_el ? c->k : c->n_el - b * c->k;
        if (c->is_float)
            dequantize_block(payload, m, c->gexp[b], c->n, (float *)c->out + b * c->k);
        else
            ints_from_be(payload, m, (int32_t *)c->out + b * c->k);
    }
    if (c->is_float && i < c->n_blocks) c->gexp[i] = e0;
}

/* Worker's estimator state rtt[3]: smoothed round trip (0: no sample yet), backed-off timeout
 * in force (0: none), mean deviation. gain[3]: alpha, beta, K (switchml.defaults). */

/* worker.rtt_sample: RFC 6298 with per-sample gains divided by the samples per round trip. */
static inline void rtt_sample(double *rtt, double sample, Py_ssize_t per_rtt, const double *gain) {
    if (sample < 1e-9) sample = 1e-9;
    if (rtt[0] <= 0) {
        rtt[0] = sample;
        rtt[2] = sample / 2;
    } else {
        double g = 1.0 / (double)(per_rtt > 1 ? per_rtt : 1);
        rtt[2] += (fabs(rtt[0] - sample) - rtt[2]) * gain[1] * g;
        rtt[0] += (sample - rtt[0]) * gain[0] * g;
    }
    rtt[1] = 0; /* a clean sample ends the backoff */
}

/* worker.retransmit_timeout: srtt + max(granularity, K * rttvar), at least the floor (also the
 * RTO before a sample) and the backed-off timeout in force, at most the cap. */
static inline double rto_of(const double *rtt, double floor_s, double cap, double granularity, const double *gain) {
    double r = floor_s;
    if (rtt[0] > 0) {
        double var = gain[2] * rtt[2];
        r = rtt[0] + (var > granularity ? var : granularity);
        if (r < floor_s) r = floor_s;
    }
    if (rtt[1] > r) r = rtt[1];
    return r < cap ? r : cap;
}

/* Worker._lost_timeout: one smoothed round trip and a tick (no deviation term), between the
 * floor and the cap, at least the backed-off timeout in force. */
static inline double lost_timeout_of(const double *rtt, double floor_s, double cap, double granularity) {
    double r = rtt[0] > 0 && rtt[0] + granularity > floor_s ? rtt[0] + granularity : floor_s;
    if (rtt[1] > r) r = rtt[1];
    return r < cap ? r : cap;
}

/* allreduce(fd, ip, port, src, out, is_float, k, window, job, pool_base, num_workers, tsi0,
 *           parity, desc, worker_id, lanes, rto_floor, rto_max, (alpha, beta, K), timeout,
 *           scan_interval, rtt, stats, flags, outstanding, offload=True)
 *   -> (code, done, n_packets, silent_for)
 *
 * One switchml.engine.PythonEngine call with the GIL released. src/out: the flat float32 or
 * int32 input and output (same length, may be 0). window: the job's W; parity[rel]: the set
 * bit of slot rel's next use, for all W slots. desc: this rank's descriptor word, sent in
 * lane worker_id of packet 0; lanes: uint32[num_workers], written with every rank's word
 * when packet 0's result comes. rtt: float64[3] (Worker._rtt_state), read and written back.
 * stats: int64[5] (sent, retransmissions, results, stale, duplicates), incremented live.
 * flags: int32[1] polled every scan_interval (1: the job failed, 2: the worker is closing).
 * outstanding: int64[window], written on return (-1: slot done). code: 0 done, 1 abort,
 * 2 closed, 3 progress timeout, 4 descriptors differ and the first window was drained
 * (n_packets: the slots it used). offload: receive coalesced (UDP_GRO) and send each batch of
 * packets as one segmented message (UDP_SEGMENT); the switch sees the same datagrams. */
static PyObject *py_allreduce(PyObject *Py_UNUSED(m), PyObject *args) {
    int fd, is_float, job, pool_base, n, worker_id, offload = 1;
    unsigned long ip, desc;
    int port;
    Py_ssize_t k, window;
    unsigned long tsi0;
    double rto0, rto_max, timeout, scan, gain[3];
    Py_buffer src, out, parity, lanes_b, rtt_b, stats_b, flags_b, outst_b;
    if (!PyArg_ParseTuple(args, "ikiy*w*pnniiiky*kiw*dd(ddd)ddw*w*w*w*|p", &fd, &ip, &port, &src, &out, &is_float,
                          &k, &window, &job, &pool_base, &n, &tsi0, &parity, &desc, &worker_id, &lanes_b, &rto0,
                          &rto_max, &gain[0], &gain[1], &gain[2], &timeout, &scan, &rtt_b, &stats_b, &flags_b,
                          &outst_b, &offload))
        return NULL;
    call_t c = {0};
    PyObject *result = NULL;
    uint8_t *pkts = NULL;
    Py_ssize_t *outstanding = NULL, *held = NULL;
    double *sent_at = NULL, *rto = NULL, *lrto = NULL;
    char *resent = NULL;
    sml_rx_t rx = {0};
    sml_tx_t tx = {0};
    int gso = offload;
    int size = -1, code = RC_DONE, err = 0;
    double silent_for = 0;
    Py_ssize_t done = 0;
    for (int s = 0; s < 8; s++)
        if (sml_k_of_size(s) == k) size = s;
    c.n_el = src.len / 4;
    if (size < 0 || src.len % 4 || out.len != src.len || window < 1 || check_n(n) || parity.len < window ||
        worker_id < 0 || worker_id >= n || n > k || lanes_b.len != 4 * (Py_ssize_t)n || rtt_b.len != 24 ||
        stats_b.len != 8 * NUM_STATS || flags_b.len != 4 || outst_b.len != 8 * window) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "allreduce: inconsistent arguments");
        goto cleanup;
    }
    c.src = src.buf, c.out = out.buf, c.k = k, c.is_float = is_float, c.job = job, c.pool_base = pool_base, c.n = n;
    c.size = size, c.tsi0 = (uint32_t)tsi0, c.parity = parity.buf, c.worker_id = worker_id, c.desc = (uint32_t)desc;
    c.n_blocks = (c.n_el + k - 1) / k;
    c.w = first_window(window, c.n_el, k);
    c.n_packets = c.n_blocks + c.w;
    c.plen = SML_PREAMBLE_BYTES + 4 * (size_t)k;
    c.gexp = calloc((size_t)c.n_blocks + 1, 1);
    pkts = malloc((size_t)window * c.plen); /* all W slots: a mismatch's drain may use more than w */
    outstanding = malloc(sizeof(Py_ssize_t) * (size_t)window);
    held = malloc(sizeof(Py_ssize_t) * (size_t)window);
    sent_at = calloc((size_t)window, sizeof(double));
    rto = calloc((size_t)window, sizeof(double));
    lrto = calloc((size_t)window, sizeof(double));
    resent = calloc((size_t)window, 1);
    int rx_ok = sml_rx_init(&rx, RX_BATCH), tx_ok = sml_tx_init(&tx, 2 * (unsigned)window + 1, &gso);
    if (!c.gexp || !pkts || !outstanding || !held || !sent_at || !rto || !lrto || !resent || rx_ok < 0 || tx_ok < 0) {
        PyErr_NoMemory();
        goto cleanup;
    }
    double *rtt = rtt_b.buf;
    int64_t *stats = stats_b.buf;
    uint32_t *lanes = lanes_b.buf;
    volatile int32_t *flags = flags_b.buf;
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl((uint32_t)ip)};
    const size_t expected = c.plen;

    Py_BEGIN_ALLOW_THREADS
    if (offload && sml_enable_gro(fd) < 0) gso = 0; /* a kernel without UDP GRO: plain datagrams */
#define QUEUE(rel) sml_tx_add(&tx, pkts + (size_t)(rel) * c.plen, c.plen, &dst) /* never full: 2W slots */
    /* send packet i on slot rel (switchml.engine.PythonEngine's send) */
#define SEND(rel, i, wnd)                                                   \
    do {                                                                    \
        Py_ssize_t rel_ = (rel), i_ = (i);                                  \
        outstanding[rel_] = i_;                                             \
        build_packet(&c, i_, (wnd), pkts + (size_t)rel_ * c.plen);          \
        QUEUE(rel_);                                                        \
        sent_at[rel_] = now;                                                \
        rto[rel_] = rto_of(rtt, rto0, rto_max, scan, gain);                 \
        lrto[rel_] = lost_timeout_of(rtt, rto0, rto_max, scan);             \
        resent[rel_] = 0;                                                   \
        if (i_ + 1 > issued) issued = i_ + 1;                               \
        stats[ST_SENT]++;                                                   \
    } while (0)
    /* resend slot rel's packet unchanged (Worker._resend) */
#define RESEND(rel)                                                                          \
    do {                                                                                     \
        QUEUE(rel);                                                                          \
        sent_at[rel] = now;                                                                  \
        resent[rel] = 1;                                                                     \
        rto[rel] = rto[rel] * 2 < rto_max ? rto[rel] * 2 : rto_max; /* backoff, capped */    \
        lrto[rel] = lrto[rel] * 2 < rto_max ? lrto[rel] * 2 : rto_max;                        \
        if (lrto[rel] > rtt[1]) rtt[1] = lrto[rel];                /* and for the next ones */ \
        stats[ST_RETRANS]++; /* as in Python, not counted in packets_sent */                 \
    } while (0)
    Py_ssize_t issued = 0, live = c.w, held_n = 0, n_call = c.n_packets;
    int checked = 0, mismatch = 0;
    double newest_answered = -1e300, next_probe = 0;
    for (Py_ssize_t rel = 0; rel < window; rel++) outstanding[rel] = -1;
    double now = sml_now();
    for (Py_ssize_t rel = 0; rel < c.w; rel++) SEND(rel, rel, c.w);
    sml_tx_flush(fd, &tx);
    double last_progress = now, last_scan = now;
    int deferred = 0;
    while (live > 0) {
        int r = sml_rx_recv(fd, &rx);
        if (r < 0) {
            err = errno;
            break;
        }
        if (r == 0) {
            double left = scan - (sml_now() - last_scan);
            sml_wait(fd, POLLIN, left > 0 ? left : 0);
        }
        now = sml_now();
        for (int m = 0; m < r; m++) {
          size_t offset = 0, len;
          const uint8_t *d;
          while (sml_rx_segment(&rx, (unsigned)m, &offset, &d, &len) == 0) {
            Py_ssize_t rel = len >= SML_PREAMBLE_BYTES
                                 ? (Py_ssize_t)((((unsigned)d[6] << 8) | d[7]) & SML_SLOT_MASK) - pool_base
                                 : -1;
            /* Worker._match: stale, duplicate or foreign results are counted and ignored */
            if (len != expected || (d[0] >> 4) != SML_MSG_RESULT || d[1] != (uint8_t)job || rel < 0 || rel >= window) {
                stats[ST_STALE]++;
                continue;
            }
            uint32_t idx = sml_load_be32(d + 2) - c.tsi0;
            if (outstanding[rel] < 0 || idx != (uint32_t)outstanding[rel]) {
                stats[(Py_ssize_t)idx < issued ? ST_DUP : ST_STALE]++;
                continue;
            }
            Py_ssize_t i = outstanding[rel];
            done++;
            stats[ST_RESULTS]++;
            last_progress = now;
            if (sent_at[rel] > newest_answered) newest_answered = sent_at[rel];
            if (!resent[rel]) rtt_sample(rtt, now - sent_at[rel], c.w, gain); /* Karn: first transmissions only */
            if (i == 0) { /* every rank's descriptor, before any rank sent a payload */
                int differ = 0;
                for (int j = 0; j < n; j++) {
                    lanes[j] = sml_load_be32(d + SML_PREAMBLE_BYTES + 4 * j);
                    differ |= lanes[j] != c.desc;
                }
                if (differ) {
                    /* bring every slot any rank used in this first window to the same count of
                     * uses on all ranks: send the first-window packets this rank did not, then
                     * wait for their results */
                    Py_ssize_t w_all = c.w;
                    for (int j = 0; j < n; j++) {
                        Py_ssize_t fw = first_window(window, (Py_ssize_t)(lanes[j] >> SML_DESC_DTYPE_BITS), k);
                        if (fw > w_all) w_all = fw;
                    }
                    mismatch = 1;
                    held_n = 0;
                    outstanding[0] = -1;
                    for (Py_ssize_t q = c.w; q < w_all; q++) SEND(q, q, w_all);
                    live = 0;
                    for (Py_ssize_t q = 0; q < w_all; q++) live += outstanding[q] >= 0;
                    n_call = w_all;
                    continue;
                }
                checked = 1;
                for (Py_ssize_t h = 0; h < held_n; h++) SEND(held[h], held[h] + c.w, c.w); /* answered packet held[h] */
                held_n = 0;
            }
            if (mismatch) { /* the drain: this slot's first-window packet is back */
                outstanding[rel] = -1;
                live--;
                continue;
            }
            take_result(&c, i, d);
            Py_ssize_t nxt = i + c.w;
            if (nxt >= c.n_packets) {
                outstanding[rel] = -1;
                live--;
            } else if (checked) {
                SEND(rel, nxt, c.w);
            } else { /* payloads wait for the descriptor check */
                outstanding[rel] = -1;
                held[held_n++] = rel;
            }
          }
        }
        sml_tx_flush(fd, &tx);
        /* timers only once the socket is drained: a full batch may have results for due
         * slots queued behind it; a flood defers them at most SCAN_DEFER_MAX batches */
        if (now - last_scan < scan) continue;
        if (r == (int)rx.count && deferred < SCAN_DEFER_MAX) {
            deferred++;
            continue;
        }
        last_scan = now;
        deferred = 0;
        int32_t f = *flags;
        silent_for = now - last_progress;
        if (f & FLAG_ABORT) { code = RC_ABORT; break; }
        if (f & FLAG_CLOSED) { code = RC_CLOSED; break; }
        if (silent_for > timeout) { code = RC_TIMEOUT; break; }
        Py_ssize_t oldest = -1;
        for (Py_ssize_t rel = 0; rel < window; rel++) {
            if (outstanding[rel] < 0) continue;
            if (sent_at[rel] < newest_answered) { /* a later packet came back: this one was lost */
                if (now - sent_at[rel] >= lrto[rel]) RESEND(rel);
            } else if (now - sent_at[rel] >= rto[rel] && (oldest < 0 || sent_at[rel] < sent_at[oldest])) {
                oldest = rel;
            }
        }
        if (oldest >= 0 && now >= next_probe) { /* nothing came back since: probe with the oldest only */
            RESEND(oldest);
            next_probe = now + rto[oldest];
        }
        sml_tx_flush(fd, &tx);
    }
#undef RESEND
#undef SEND
#undef QUEUE
    if (code == RC_DONE && mismatch) code = RC_MISMATCH;
    c.n_packets = n_call;
    Py_END_ALLOW_THREADS

    for (Py_ssize_t rel = 0; rel < window; rel++) ((int64_t *)outst_b.buf)[rel] = outstanding[rel];
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto cleanup;
    }
    result = Py_BuildValue("(innd)", code, done, c.n_packets, silent_for);
cleanup:
    free(c.gexp), free(pkts), free(outstanding), free(held), free(sent_at), free(rto), free(lrto), free(resent);
    sml_rx_free(&rx);
    sml_tx_free(&tx);
    PyBuffer_Release(&src), PyBuffer_Release(&out), PyBuffer_Release(&parity), PyBuffer_Release(&lanes_b);
    PyBuffer_Release(&rtt_b), PyBuffer_Release(&stats_b), PyBuffer_Release(&flags_b), PyBuffer_Release(&outst_b);
    return result;
}

static PyMethodDef methods[] = {
    {"block_exponents", py_block_exponents, METH_VARARGS, "block_exponents(x, k, out): local exponent per block."},
    {"quantize", py_quantize, METH_VARARGS, "quantize(x, e, n, out): float32 -> big-endian int32 (scale, round, swap)."},
    {"dequantize", py_dequantize, METH_VARARGS, "dequantize(q, e, n, out): big-endian int32 -> float32."},
    {"quantize_blocks", py_quantize_blocks, METH_VARARGS,
     "quantize_blocks(x, k, n, out, exps): exponent scan and quantization per block, one visit each."},
    {"dequantize_blocks", py_dequantize_blocks, METH_VARARGS, "dequantize_blocks(q, k, n, exps, out)."},
    {"copy", py_copy, METH_VARARGS, "copy(src, dst): memcpy (the throughput baseline)."},
    {"allreduce", py_allreduce, METH_VARARGS, "One allreduce call of the worker engine, GIL released."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "switchml._native",
                                       "The worker engine and quantizer in C (see switchml/native.py).", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    PyObject *c = Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "PREAMBLE_BYTES",
                                SML_PREAMBLE_BYTES, "MAX_K", SML_MAX_K, "RESULT", SML_MSG_RESULT, "EXP_NAN",
                                SML_EXP_NAN, "EXP_MIN", SML_EXP_MIN, "QUANT_BITS", SML_QUANT_BITS, "RC_DONE", RC_DONE,
                                "RC_ABORT", RC_ABORT, "RC_CLOSED", RC_CLOSED, "RC_TIMEOUT", RC_TIMEOUT, "FLAG_ABORT",
                                FLAG_ABORT, "FLAG_CLOSED", FLAG_CLOSED, "NUM_STATS", NUM_STATS, "RC_MISMATCH",
                                RC_MISMATCH, "DESCRIPTOR_DTYPE_BITS", SML_DESC_DTYPE_BITS);
    if (!c || PyModule_AddObject(m, "CONSTANTS", c) < 0) {
        Py_XDECREF(c);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
