/* benchmarks._native_bench: the load generator and the UDP echo of `switchml-bench pps`.
 *
 * Benchmark tools, not part of the switch: they live in their own extension so that the
 * switch's data plane (native/switch.c) carries only what a deployment runs. They use the
 * same batched UDP helpers (native/switchml_native.h) as the switch and the worker, so the
 * echo is the kernel's ceiling for exactly the batching the switch does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "switchml_native.h"

#include <arpa/inet.h>
#include <stdlib.h>

/* echo(fd, batch, stop_flag, offload) -> datagrams echoed: a plain UDP echo with the same
 * batching as serve() (and, with offload, the same UDP_GRO/UDP_SEGMENT), the kernel's
 * ceiling for `switchml-bench pps`. */
/* ------------------------------------------------------------------ echo */
static PyObject *echo(PyObject *Py_UNUSED(module), PyObject *args) {
    int fd, err = 0, offload = 0, gso;
    unsigned batch;
    PyObject *flag_obj;
    Py_buffer flag;
    sml_rx_t rx;
    sml_tx_t tx;
    unsigned long long echoed = 0;
    if (!PyArg_ParseTuple(args, "iIO|p", &fd, &batch, &flag_obj, &offload)) return NULL;
    if (batch < 1 || batch > SML_MAX_BATCH) {
        PyErr_Format(PyExc_ValueError, "batch=%u; expected 1..%d", batch, SML_MAX_BATCH);
        return NULL;
    }
    if (sml_parse_flag(flag_obj, &flag) < 0) return NULL;
    gso = offload;
    if (sml_rx_init(&rx, batch) < 0 || sml_tx_init(&tx, batch * SML_GSO_MAX_SEGS, &gso) < 0) {
        sml_rx_free(&rx);
        sml_tx_free(&tx);
        PyBuffer_Release(&flag);
        return PyErr_NoMemory();
    }
    if (offload && sml_enable_gro(fd) < 0) gso = 0;
    Py_BEGIN_ALLOW_THREADS
    while (!sml_flag_set(&flag)) {
        int r = sml_rx_recv(fd, &rx);
        if (r < 0) {
            err = errno;
            break;
        }
        if (r == 0) {
            sml_wait(fd, POLLIN, 0.1);
            continue;
        }
        for (int m = 0; m < r; m++) {
            size_t offset = 0, len;
            const uint8_t *d;
            while (sml_rx_segment(&rx, (unsigned)m, &offset, &d, &len) == 0) {
                if (sml_tx_add(&tx, d, len, &rx.addr[m]) < 0) {
                    sml_tx_flush(fd, &tx);
                    sml_tx_add(&tx, d, len, &rx.addr[m]);
                }
                echoed++;
            }
        }
        sml_tx_flush(fd, &tx);
    }
    Py_END_ALLOW_THREADS
    sml_rx_free(&rx);
    sml_tx_free(&tx);
    PyBuffer_Release(&flag);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromUnsignedLongLong(echoed);
}

/* ------------------------------------------------------------------ load */
/* load(fds, ip, port, k, job, pool_base, window, warmup, duration, rto, offload) -> dict
 *
 * A closed-loop load of UPDATE packets from several sockets (one per emulated worker), in
 * one thread without the GIL: each socket keeps `window` slots busy, and sends a slot's
 * next packet (next tsi, flipped set bit) when a reply with that slot and tsi comes back
 * (a RESULT from the switch, or the packet itself from an echo); a slot silent for `rto`
 * seconds resends. Counts replies after `warmup` seconds, for `duration` seconds. With
 * offload it sends and receives as the native worker engine does (UDP_SEGMENT, UDP_GRO). */
static PyObject *load(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *fd_list;
    unsigned long ip;
    int port, k, job, pool_base, window, offload = 0;
    double warmup, duration, rto;
    if (!PyArg_ParseTuple(args, "O!kiiiiiddd|p", &PyList_Type, &fd_list, &ip, &port, &k, &job, &pool_base, &window,
                          &warmup, &duration, &rto, &offload))
        return NULL;
    int nfd = (int)PyList_GET_SIZE(fd_list);
    int size = -1;
    for (int s = 0; s < 8; s++)
        if (sml_k_of_size(s) == k) size = s;
    if (size < 0 || nfd < 1 || nfd > 64 || window < 1 || window > SML_SLOT_MASK) {
        PyErr_SetString(PyExc_ValueError, "load: bad k, socket count or window");
        return NULL;
    }
    int fds[64], gso = offload;
    for (int j = 0; j < nfd; j++) {
        fds[j] = (int)PyLong_AsLong(PyList_GET_ITEM(fd_list, j));
        if (PyErr_Occurred()) return NULL;
    }
    size_t plen = SML_PREAMBLE_BYTES + 4 * (size_t)k, nslots = (size_t)nfd * (size_t)window;
    uint8_t *pkts = calloc(nslots, plen);
    uint32_t *tsi = calloc(nslots, sizeof(uint32_t));
    double *sent_at = calloc(nslots, sizeof(double));
    struct pollfd *pfd = calloc((size_t)nfd, sizeof(struct pollfd));
    sml_rx_t rx;
    sml_tx_t tx;
    int rx_ok = sml_rx_init(&rx, 32), tx_ok = sml_tx_init(&tx, (unsigned)window + 1, &gso);
    if (!pkts || !tsi || !sent_at || !pfd || rx_ok < 0 || tx_ok < 0) {
        free(pkts), free(tsi), free(sent_at), free(pfd);
        sml_rx_free(&rx);
        sml_tx_free(&tx);
        return PyErr_NoMemory();
    }
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl((uint32_t)ip)};
    unsigned long long replies = 0, sent = 0, resent = 0, stale = 0, all_replies = 0;
    double t0, t_start = 0, t_end = 0, last_scan;
    Py_BEGIN_ALLOW_THREADS
    for (int j = 0; j < nfd; j++) {
        pfd[j] = (struct pollfd){.fd = fds[j], .events = POLLIN};
        if (offload && sml_enable_gro(fds[j]) < 0) gso = 0;
    }
    for (size_t s = 0; s < nslots; s++) {
        uint8_t *p = pkts + s * plen;
        for (int e = 0; e < k; e++) sml_store_be32(p + SML_PREAMBLE_BYTES + 4 * e, 1U);
        tsi[s] = (uint32_t)(s % (size_t)window);
    }
    t0 = last_scan = sml_now();
    /* build the packet of slot s (socket s / window, window slot s % window) */
#define BUILD(s)                                                                                   \
    do {                                                                                           \
        uint8_t *p_ = pkts + (s) * plen;                                                           \
        int rel_ = (int)((s) % (size_t)window);                                                    \
        unsigned pidx_ = (unsigned)(pool_base + rel_) | (((tsi[s] / (uint32_t)window) & 1U) << 15); \
        p_[0] = (uint8_t)((SML_MSG_UPDATE << 4) | size);                                           \
        p_[1] = (uint8_t)job;                                                                      \
        sml_store_be32(p_ + 2, tsi[s]);                                                            \
        p_[6] = (uint8_t)(pidx_ >> 8);                                                             \
        p_[7] = (uint8_t)pidx_;                                                                    \
        p_[8] = 0;                                                                                 \
        p_[9] = 0;                                                                                 \
    } while (0)
    for (int j = 0; j < nfd; j++) {
        for (int r = 0; r < window; r++) {
            size_t s = (size_t)j * (size_t)window + (size_t)r;
            BUILD(s);
            sml_tx_add(&tx, pkts + s * plen, plen, &dst);
            sent_at[s] = t0;
        }
        sml_tx_flush(fds[j], &tx);
        sent += (unsigned)window;
    }
    int measuring = 0;
    for (;;) {
        double now = sml_now();
        if (!measuring && now - t0 >= warmup) {
            measuring = 1;
            t_start = now;
        }
        if (measuring && now - t_start >= duration) {
            t_end = now;
            break;
        }
        if (poll(pfd, (nfds_t)nfd, 1) <= 0) goto scan;
        for (int j = 0; j < nfd; j++) {
            if (!(pfd[j].revents & POLLIN)) continue;
            int r = sml_rx_recv(fds[j], &rx);
            if (r <= 0) continue;
            now = sml_now();
            for (int m = 0; m < r; m++) {
                size_t offset = 0, len;
                const uint8_t *d;
                while (sml_rx_segment(&rx, (unsigned)m, &offset, &d, &len) == 0) {
                    if (len != plen) { stale++; continue; }
                    int rel = (int)((((unsigned)d[6] << 8) | d[7]) & SML_SLOT_MASK) - pool_base;
                    size_t s = (size_t)j * (size_t)window + (size_t)rel;
                    if (rel < 0 || rel >= window || sml_load_be32(d + 2) != tsi[s]) { stale++; continue; }
                    all_replies++;
                    if (measuring) replies++;
                    tsi[s] += (uint32_t)window;
                    BUILD(s);
                    if (sml_tx_add(&tx, pkts + s * plen, plen, &dst) < 0) {
                        sml_tx_flush(fds[j], &tx);
                        sml_tx_add(&tx, pkts + s * plen, plen, &dst);
                    }
                    sent_at[s] = now;
                    sent++;
                }
            }
            sml_tx_flush(fds[j], &tx);
        }
    scan:
        now = sml_now();
        if (now - last_scan < 0.002) continue;
        last_scan = now;
        for (int j = 0; j < nfd; j++) {
            for (int r = 0; r < window; r++) {
                size_t s = (size_t)j * (size_t)window + (size_t)r;
                if (now - sent_at[s] < rto) continue;
                sml_tx_add(&tx, pkts + s * plen, plen, &dst);
                sent_at[s] = now;
                resent++;
                sent++;
            }
            sml_tx_flush(fds[j], &tx);
        }
    }
#undef BUILD
    Py_END_ALLOW_THREADS
    free(pkts), free(tsi), free(sent_at), free(pfd);
    sml_rx_free(&rx);
    sml_tx_free(&tx);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:d,s:O}", "replies", replies, "all_replies", all_replies, "sent",
                         sent, "retransmissions", resent, "stale", stale, "seconds", t_end - t_start, "offload",
                         gso ? Py_True : Py_False);
}

static PyMethodDef module_methods[] = {
    {"echo", echo, METH_VARARGS,
     "echo(fd, batch, stop_flag, offload=False) -> echoed: UDP echo (recvmmsg/sendmmsg)."},
    {"load", load, METH_VARARGS,
     "load(fds, ip, port, k, job, pool_base, window, warmup, duration, rto, offload=False) -> dict: closed-loop "
     "UPDATE load."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "benchmarks._native_bench",
                                       "Load generator and UDP echo for switchml-bench pps (see benchmarks/pps.py).",
                                       -1, module_methods};

PyMODINIT_FUNC PyInit__native_bench(void) { return PyModule_Create(&moduledef); }
