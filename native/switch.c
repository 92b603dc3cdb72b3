/* emulation._native_switch: the software switch's per-packet work in C.
 *
 * Same semantics and counters as emulation/switch.py (SoftwareSwitch._process), which
 * stays the reference: tests/test_native.py drives both with the same packet streams and
 * compares replies and counters.
 *
 * Ownership: Python owns every array (slot state, counters) and every table. The arrays
 * are numpy arrays handed to Switch() once; this module writes them in place. The tables
 * are compiled by emulation/native.py into the flat lists set_tables() takes, whenever
 * Python changed them. One mutex guards all of it: the data path holds it per batch of
 * packets, Python holds it (acquire/release, the SoftwareSwitch's `_lock`) around every
 * read or write of the state, so counters, slot reads and table updates stay consistent.
 *
 * Loss uses MT19937 seeded as Python's random.Random(seed) and draws getrandbits(15), as
 * the reference does, so a seeded lossy stream loses the same packets on both paths.
 *
 * The leaf role (docs/hierarchy.md; emulation/dataplane.py's docstring, steps 1-6) is the
 * reference's too: a job with an upstream entry sends the slots its rack completes to the
 * spine as one UPDATE, resends it when a worker retransmits before the spine's RESULT came
 * (has_result 0), answers from that RESULT after (has_result 1), and takes the spine's RESULT
 * only from the upstream address, multicasting it to the rack unchanged.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "switchml_native.h"

#include <arpa/inet.h>
#include <pthread.h>
#include <stdlib.h>

/* switchml.pipeline.DropReason and PacketCounter */
enum {
    DROP_MALFORMED = 0,
    DROP_BAD_SIZE = 1,
    DROP_BAD_MSG_TYPE = 2,
    DROP_NOT_ADMITTED = 3,
    DROP_SLOT_OUT_OF_RANGE = 4,
    DROP_JOB_MISMATCH = 5,
    DROP_RESET_NOT_FROM_CONTROLLER = 6,
    DROP_RETRANSMISSION_INCOMPLETE = 7,
    DROP_EMULATED_LOSS = 8,
    DROP_SIZE_MISMATCH = 9,
    NUM_DROPS = 10
};
enum { PKT_RECEIVED = 0, PKT_AGGREGATED = 1, PKT_RESETS = 2, NUM_PKTS = 3 };
/* switchml.pipeline.LeafCounter */
enum { LEAF_SENT_UPSTREAM = 0, LEAF_RESENT_UPSTREAM = 1, LEAF_RESULTS_FROM_UPSTREAM = 2, LEAF_IGNORED_FROM_UPSTREAM = 3,
       NUM_LEAF = 4 };

/* ------------------------------------------------------------------ MT19937 (as CPython's) */
#define MT_N 624
#define MT_M 397
typedef struct {
    uint32_t mt[MT_N];
    int mti;
} mt_t;

static void mt_init(mt_t *r, uint32_t s) {
    r->mt[0] = s;
    for (int i = 1; i < MT_N; i++) r->mt[i] = 1812433253U * (r->mt[i - 1] ^ (r->mt[i - 1] >> 30)) + (uint32_t)i;
    r->mti = MT_N;
}

static void mt_init_by_array(mt_t *r, const uint32_t *key, size_t len) {
    size_t i = 1, j = 0, k;
    mt_init(r, 19650218U);
    for (k = (MT_N > len ? MT_N : len); k; k--) {
        r->mt[i] = (r->mt[i] ^ ((r->mt[i - 1] ^ (r->mt[i - 1] >> 30)) * 1664525U)) + key[j] + (uint32_t)j;
        i++, j++;
        if (i >= MT_N) { r->mt[0] = r->mt[MT_N - 1]; i = 1; }
        if (j >= len) j = 0;
    }
    for (k = MT_N - 1; k; k--) {
        r->mt[i] = (r->mt[i] ^ ((r->mt[i - 1] ^ (r->mt[i - 1] >> 30)) * 1566083941U)) - (uint32_t)i;
        i++;
        if (i >= MT_N) { r->mt[0] = r->mt[MT_N - 1]; i = 1; }
    }
    r->mt[0] = 0x80000000U;
}

static uint32_t mt_next(mt_t *r) {
    static const uint32_t mag01[2] = {0x0U, 0x9908b0dfU};
    uint32_t y;
    if (r->mti >= MT_N) {
        int kk;
        for (kk = 0; kk < MT_N - MT_M; kk++) {
            y = (r->mt[kk] & 0x80000000U) | (r->mt[kk + 1] & 0x7fffffffU);
            r->mt[kk] = r->mt[kk + MT_M] ^ (y >> 1) ^ mag01[y & 1U];
        }
        for (; kk < MT_N - 1; kk++) {
            y = (r->mt[kk] & 0x80000000U) | (r->mt[kk + 1] & 0x7fffffffU);
            r->mt[kk] = r->mt[kk + (MT_M - MT_N)] ^ (y >> 1) ^ mag01[y & 1U];
        }
        y = (r->mt[MT_N - 1] & 0x80000000U) | (r->mt[0] & 0x7fffffffU);
        r->mt[MT_N - 1] = r->mt[MT_M - 1] ^ (y >> 1) ^ mag01[y & 1U];
        r->mti = 0;
    }
    y = r->mt[r->mti++];
    y ^= (y >> 11);
    y ^= (y << 7) & 0x9d2c5680U;
    y ^= (y << 15) & 0xefc60000U;
    y ^= (y >> 18);
    return y;
}

/* ------------------------------------------------------------------ hash tables */
typedef struct {
    uint64_t key;
    int64_t val;
    int used;
} hslot_t;

typedef struct {
    hslot_t *slots;
    uint64_t mask;
} htab_t;

static uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static int htab_init(htab_t *h, Py_ssize_t n) {
    uint64_t cap = 8;
    while (cap < (uint64_t)n * 2 + 2) cap <<= 1;
    h->slots = calloc(cap, sizeof(hslot_t));
    h->mask = cap - 1;
    return h->slots != NULL;
}

static void htab_put(htab_t *h, uint64_t key, int64_t val) {
    uint64_t i = mix64(key) & h->mask;
    while (h->slots[i].used && h->slots[i].key != key) i = (i + 1) & h->mask;
    h->slots[i].key = key;
    h->slots[i].val = val;
    h->slots[i].used = 1;
}

static inline int htab_get(const htab_t *h, uint64_t key, int64_t *val) {
    uint64_t i = mix64(key) & h->mask;
    while (h->slots[i].used) {
        if (h->slots[i].key == key) {
            *val = h->slots[i].val;
            return 1;
        }
        i = (i + 1) & h->mask;
    }
    return 0;
}

/* ------------------------------------------------------------------ tables */
typedef struct {
    int is_controller;
    int64_t job, worker_id, num_workers, mgid, pool_base, pool_size;
} adm_t;

typedef struct {
    uint32_t ip; /* host order */
    uint16_t port;
} addr_t;

/* An upstream entry (switchml.pipeline.UpstreamEntry): this switch is a leaf of job `job`. */
typedef struct {
    addr_t spine;
    int64_t mgid, pool_base, pool_size;
} up_t;

typedef struct {
    htab_t adm; /* addr key -> index into adms */
    adm_t *adms;
    htab_t port_of; /* addr key -> switch port */
    htab_t loss;    /* switch port -> threshold of 32768 */
    int64_t default_loss;
    htab_t groups; /* mgid -> index into group_start/len */
    Py_ssize_t *group_start, *group_len;
    addr_t *replicas;
    htab_t up; /* job -> index into ups */
    up_t *ups;
} tables_t;

static inline uint64_t addr_key(uint32_t ip, uint16_t port) { return ((uint64_t)ip << 16) | port; }

static void tables_free(tables_t *t) {
    if (!t) return;
    free(t->adm.slots);
    free(t->adms);
    free(t->port_of.slots);
    free(t->loss.slots);
    free(t->groups.slots);
    free(t->group_start);
    free(t->group_len);
    free(t->replicas);
    free(t->up.slots);
    free(t->ups);
    free(t);
}

/* ------------------------------------------------------------------ the switch object */
typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    int python_holds; /* Python holds mu (between acquire and release) */
    int pool_size, max_k;
    uint32_t sizes_mask;
    Py_buffer bufs[11];
    int nbufs;
    int32_t *value; /* [2][pool][max_k], host order */
    int8_t *exp;    /* [2][pool] */
    int32_t *count; /* [2][pool] */
    uint32_t *seen; /* [2][pool] */
    int32_t *slot_k;
    uint8_t *has_result; /* [2][pool]: leaf role: value/exp hold the spine's RESULT */
    uint64_t *results, *retrans, *drops, *packets, *leaf;
    tables_t *tables;
    mt_t rng;
    uint64_t send_failures;
} SwitchObject;

/* Where one processed packet goes: a payload (the input itself for a RESET echo, or a
 * RESULT in the caller's buffer) and its destinations. */
typedef struct {
    const uint8_t *payload;
    size_t len;
    addr_t *dst;
    int ndst;
} reply_t;

static inline int lost(SwitchObject *s, const tables_t *t, uint64_t key) {
    int64_t port = 0, thr;
    if (!htab_get(&t->port_of, key, &port)) port = 0;
    if (!htab_get(&t->loss, (uint64_t)port, &thr)) thr = t->default_loss;
    return thr > 0 && (int64_t)(mt_next(&s->rng) >> 17) < thr;
}

SML_HOT static void copy_from_be(int32_t *restrict dst, const uint8_t *restrict src, int k) {
    for (int i = 0; i < k; i++) dst[i] = (int32_t)sml_load_be32(src + 4 * i);
}

/* The add loop: big-endian payload into host-order sums, wrapping mod 2^32 like the ALUs. */
SML_HOT static void add_from_be(int32_t *restrict acc, const uint8_t *restrict src, int k) {
    for (int i = 0; i < k; i++) acc[i] = (int32_t)((uint32_t)acc[i] + sml_load_be32(src + 4 * i));
}

SML_HOT static void store_to_be(uint8_t *restrict dst, const int32_t *restrict src, int k) {
    for (int i = 0; i < k; i++) sml_store_be32(dst + 4 * i, (uint32_t)src[i]);
}

/* Emit `payload` to each address in `cand` that the loss table lets through. */
static int emit(SwitchObject *s, const tables_t *t, const addr_t *cand, int ncand, addr_t *dst) {
    int n = 0;
    for (int i = 0; i < ncand; i++) {
        if (lost(s, t, addr_key(cand[i].ip, cand[i].port)))
            s->drops[DROP_EMULATED_LOSS]++;
        else
            dst[n++] = cand[i];
    }
    return n;
}

/* One UDP payload from (ip, port): SoftwareSwitch._process, step for step, including the
 * order of the loss draws. `out` receives a RESULT when one is built; reply->dst has room
 * for every replica of the largest group. The caller holds the mutex. */
static void process_one(SwitchObject *s, const uint8_t *d, size_t n, uint32_t ip, uint16_t port, uint8_t *out,
                        reply_t *reply) {
    const tables_t *t = s->tables;
    uint64_t skey = addr_key(ip, port);
    int64_t ai;
    const adm_t *entry = NULL;
    reply->payload = NULL;
    reply->ndst = 0;

    s->packets[PKT_RECEIVED]++;
    if (lost(s, t, skey)) { s->drops[DROP_EMULATED_LOSS]++; return; }
    if (n < SML_PREAMBLE_BYTES) { s->drops[DROP_MALFORMED]++; return; }
    int msg = d[0] >> 4, size = d[0] & 0x7, job = d[1];
    unsigned pidx = ((unsigned)d[6] << 8) | d[7];
    if (!((s->sizes_mask >> size) & 1U)) { s->drops[DROP_BAD_SIZE]++; return; }
    int k = sml_k_of_size(size);
    if (n != (size_t)(SML_PREAMBLE_BYTES + 4 * k)) { s->drops[DROP_MALFORMED]++; return; }
    int slot = (int)(pidx & SML_SLOT_MASK), v = (int)(pidx >> 15);
    if (htab_get(&t->adm, skey, &ai)) entry = &t->adms[ai];

    if (msg == SML_MSG_RESET) {
        if (!entry || !entry->is_controller) { s->drops[DROP_RESET_NOT_FROM_CONTROLLER]++; return; }
        if (slot >= s->pool_size) { s->drops[DROP_SLOT_OUT_OF_RANGE]++; return; }
        for (int set = 0; set < 2; set++) {
            int i = set * s->pool_size + slot;
            s->seen[i] = 0;
            s->count[i] = 0;
            s->slot_k[i] = 0;
            s->has_result[i] = 0;
        }
        s->packets[PKT_RESETS]++;
        addr_t src = {ip, port};
        reply->payload = d; /* the echo acknowledges the reset */
        reply->len = n;
        reply->ndst = emit(s, t, &src, 1, reply->dst);
        return;
    }
    if (msg == SML_MSG_RESULT) { /* leaf role, step 6: only from the spine of the header's job */
        int64_t ui;
        if (!htab_get(&t->up, (uint64_t)job, &ui) || t->ups[ui].spine.ip != ip || t->ups[ui].spine.port != port) {
            s->drops[DROP_BAD_MSG_TYPE]++;
            return;
        }
        const up_t *up = &t->ups[ui];
        if (!(up->pool_base <= slot && slot < up->pool_base + up->pool_size) || slot >= s->pool_size) {
            s->drops[DROP_SLOT_OUT_OF_RANGE]++;
            return;
        }
        int i = v * s->pool_size + slot;
        if (s->count[i] != 0 || !s->seen[i] || s->has_result[i]) { /* no rack sum waits: a duplicate or stale */
            s->leaf[LEAF_IGNORED_FROM_UPSTREAM]++;
            return;
        }
        if (s->slot_k[i] != k) { s->drops[DROP_SIZE_MISMATCH]++; return; }
        copy_from_be(s->value + (size_t)i * (size_t)s->max_k, d + SML_PREAMBLE_BYTES, k);
        s->exp[i] = (int8_t)d[8];
        s->has_result[i] = 1;
        s->leaf[LEAF_RESULTS_FROM_UPSTREAM]++;
        s->results[slot]++;
        reply->payload = d; /* the spine's RESULT, unchanged, to the rack */
        reply->len = n;
        int64_t gi;
        if (htab_get(&t->groups, (uint64_t)up->mgid, &gi))
            reply->ndst = emit(s, t, t->replicas + t->group_start[gi], (int)t->group_len[gi], reply->dst);
        return;
    }
    if (msg != SML_MSG_UPDATE) { s->drops[DROP_BAD_MSG_TYPE]++; return; }
    if (!entry || entry->is_controller) { s->drops[DROP_NOT_ADMITTED]++; return; }
    if (job != entry->job) { s->drops[DROP_JOB_MISMATCH]++; return; }
    if (!(entry->pool_base <= slot && slot < entry->pool_base + entry->pool_size) || slot >= s->pool_size) {
        s->drops[DROP_SLOT_OUT_OF_RANGE]++;
        return;
    }

    uint32_t bit = 1U << entry->worker_id;
    int idx = v * s->pool_size + slot, other = (1 - v) * s->pool_size + slot;
    int32_t *value = s->value + (size_t)idx * (size_t)s->max_k;
    const uint8_t *payload = d + SML_PREAMBLE_BYTES;
    int64_t ui;
    const up_t *up = htab_get(&t->up, (uint64_t)entry->job, &ui) ? &t->ups[ui] : NULL; /* a leaf of this job */
    int completed, msg_out = SML_MSG_RESULT;
    if (!(s->seen[idx] & bit)) { /* a new contribution */
        int first = s->count[idx] == 0;
        if (!first && s->slot_k[idx] != k) { s->drops[DROP_SIZE_MISMATCH]++; return; }
        s->seen[idx] |= bit;
        s->seen[other] &= ~bit; /* frees the other set for this worker's next use */
        s->count[idx] = (int32_t)((s->count[idx] + 1) % entry->num_workers);
        int8_t e0 = (int8_t)d[8];
        if (first) {
            copy_from_be(value, payload, k);
            s->exp[idx] = e0;
            s->slot_k[idx] = k;
            s->has_result[idx] = 0; /* leaf role, step 1: value holds the rack's sum */
        } else {
            add_from_be(value, payload, k);
            if (e0 > s->exp[idx]) s->exp[idx] = e0;
        }
        s->packets[PKT_AGGREGATED]++;
        if (s->count[idx] != 0) return;
        if (up) { /* leaf role, step 2: the rack's sum goes upstream as one contribution */
            s->leaf[LEAF_SENT_UPSTREAM]++;
            msg_out = SML_MSG_UPDATE;
        } else {
            s->results[slot]++;
        }
        completed = 1;
    } else { /* a retransmission */
        if (s->count[idx] != 0) { s->drops[DROP_RETRANSMISSION_INCOMPLETE]++; return; }
        if (up && !s->has_result[idx]) { /* leaf role, step 5: the spine's RESULT has not come */
            s->leaf[LEAF_RESENT_UPSTREAM]++;
            msg_out = SML_MSG_UPDATE;
        } else {
            s->retrans[slot]++; /* (leaf role, step 4: from the spine's RESULT) */
        }
        completed = 0;
    }
    out[0] = (uint8_t)((msg_out << 4) | (d[0] & 0xF));
    out[1] = (uint8_t)entry->job;
    memcpy(out + 2, d + 2, 6);
    out[8] = (uint8_t)s->exp[idx];
    out[9] = 0;
    store_to_be(out + SML_PREAMBLE_BYTES, value, k);
    reply->payload = out;
    reply->len = n;
    if (msg_out == SML_MSG_UPDATE) { /* to the spine */
        reply->ndst = emit(s, t, &up->spine, 1, reply->dst);
    } else if (completed) { /* multicast to the job's group */
        int64_t gi;
        if (htab_get(&t->groups, (uint64_t)entry->mgid, &gi))
            reply->ndst = emit(s, t, t->replicas + t->group_start[gi], (int)t->group_len[gi], reply->dst);
    } else { /* slot complete: answer the sender again */
        addr_t src = {ip, port};
        reply->ndst = emit(s, t, &src, 1, reply->dst);
    }
}

/* ------------------------------------------------------------------ Python methods */
static int get_array(SwitchObject *self, PyObject *obj, Py_ssize_t itemsize, Py_ssize_t count, const char *name,
                     void **ptr) {
    Py_buffer *b = &self->bufs[self->nbufs];
    if (PyObject_GetBuffer(obj, b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    self->nbufs++;
    if (b->itemsize != itemsize || b->len != itemsize * count) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd items of %zd bytes, got %zd bytes of items of %zd", name,
                     count, itemsize, b->len, b->itemsize);
        return -1;
    }
    *ptr = b->buf;
    return 0;
}

static void Switch_dealloc(SwitchObject *self) {
    for (int i = 0; i < self->nbufs; i++) PyBuffer_Release(&self->bufs[i]);
    tables_free(self->tables);
    pthread_mutex_destroy(&self->mu);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int empty_tables(SwitchObject *self) {
    tables_t *t = calloc(1, sizeof(tables_t));
    if (!t || !htab_init(&t->adm, 0) || !htab_init(&t->port_of, 0) || !htab_init(&t->loss, 0) ||
        !htab_init(&t->groups, 0) || !htab_init(&t->up, 0)) {
        tables_free(t);
        PyErr_NoMemory();
        return -1;
    }
    self->tables = t;
    return 0;
}

static int Switch_init(SwitchObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"pool_size", "max_k", "sizes_mask", "seed_key", "value", "exp", "count", "seen",
                             "slot_k", "results", "retransmissions", "drops", "packets", "has_result", "leaf", NULL};
    PyObject *seed_key, *arrays[11];
    unsigned int mask;
    if (self->nbufs) {
        PyErr_SetString(PyExc_RuntimeError, "Switch is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiIOOOOOOOOOOOO", kwlist, &self->pool_size, &self->max_k, &mask,
                                     &seed_key, &arrays[0], &arrays[1], &arrays[2], &arrays[3], &arrays[4], &arrays[5],
                                     &arrays[6], &arrays[7], &arrays[8], &arrays[9], &arrays[10]))
        return -1;
    if (self->pool_size < 1 || self->pool_size > SML_SLOT_MASK + 1 || self->max_k < 32 || self->max_k > SML_MAX_K) {
        PyErr_SetString(PyExc_ValueError, "pool_size or max_k out of range");
        return -1;
    }
    for (int size = 0; size < 8; size++)
        if (((mask >> size) & 1U) && sml_k_of_size(size) > self->max_k) {
            PyErr_SetString(PyExc_ValueError, "sizes_mask takes a size larger than max_k");
            return -1;
        }
    self->sizes_mask = mask & 0xFF;
    Py_ssize_t pool2 = 2 * (Py_ssize_t)self->pool_size;
    if (get_array(self, arrays[0], 4, pool2 * self->max_k, "value", (void **)&self->value) ||
        get_array(self, arrays[1], 1, pool2, "exp", (void **)&self->exp) ||
        get_array(self, arrays[2], 4, pool2, "count", (void **)&self->count) ||
        get_array(self, arrays[3], 4, pool2, "seen", (void **)&self->seen) ||
        get_array(self, arrays[4], 4, pool2, "slot_k", (void **)&self->slot_k) ||
        get_array(self, arrays[5], 8, self->pool_size, "results", (void **)&self->results) ||
        get_array(self, arrays[6], 8, self->pool_size, "retransmissions", (void **)&self->retrans) ||
        get_array(self, arrays[7], 8, NUM_DROPS, "drops", (void **)&self->drops) ||
        get_array(self, arrays[8], 8, NUM_PKTS, "packets", (void **)&self->packets) ||
        get_array(self, arrays[9], 1, pool2, "has_result", (void **)&self->has_result) ||
        get_array(self, arrays[10], 8, NUM_LEAF, "leaf", (void **)&self->leaf))
        return -1;
    /* the seed as random.Random(seed) takes it: abs(seed) in 32-bit words, least significant first */
    PyObject *seq = PySequence_Fast(seed_key, "seed_key must be a sequence of 32-bit words");
    if (!seq) return -1;
    Py_ssize_t nkey = PySequence_Fast_GET_SIZE(seq);
    uint32_t *key = malloc(sizeof(uint32_t) * (size_t)(nkey ? nkey : 1));
    if (!key) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < nkey; i++) {
        key[i] = (uint32_t)PyLong_AsUnsignedLongMask(PySequence_Fast_GET_ITEM(seq, i));
    }
    Py_DECREF(seq);
    if (PyErr_Occurred()) {
        free(key);
        return -1;
    }
    if (nkey == 0) {
        key[0] = 0;
        nkey = 1;
    }
    mt_init_by_array(&self->rng, key, (size_t)nkey);
    free(key);
    if (pthread_mutex_init(&self->mu, NULL) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_mutex_init failed");
        return -1;
    }
    return empty_tables(self);
}

static PyObject *Switch_acquire(SwitchObject *self, PyObject *Py_UNUSED(ignored)) {
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&self->mu);
    Py_END_ALLOW_THREADS self->python_holds = 1;
    Py_RETURN_NONE;
}

static PyObject *Switch_release(SwitchObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!self->python_holds) {
        PyErr_SetString(PyExc_RuntimeError, "release of a switch lock Python does not hold");
        return NULL;
    }
    self->python_holds = 0;
    pthread_mutex_unlock(&self->mu);
    Py_RETURN_NONE;
}

static int as_i64(PyObject *tuple, Py_ssize_t i, int64_t *out) {
    PyObject *o = PyTuple_GetItem(tuple, i);
    if (!o) return -1;
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = v;
    return 0;
}

/* f[0..width-1] = the ints of row `e`, a `width`-tuple of table `what`; -1 with an exception if it is not one. */
static int row_of(PyObject *e, int width, int64_t *f, const char *what) {
    if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != width) {
        PyErr_Format(PyExc_TypeError, "%s: expected %d-tuples", what, width);
        return -1;
    }
    for (int j = 0; j < width; j++)
        if (as_i64(e, j, &f[j])) return -1;
    return 0;
}

/* set_tables(admission, port_of, loss, default_loss, groups, upstream); Python must hold the lock.
 *   admission: [(ip, udp_port, is_controller, job, worker_id, num_workers, mgid, pool_base, pool_size)]
 *   port_of:   [(ip, udp_port, port)]
 *   loss:      [(port, threshold)]
 *   groups:    [(mgid, [(ip, udp_port), ...])]
 *   upstream:  [(job, ip, udp_port, mgid, pool_base, pool_size)]  (the leaf role)
 * ip as a host-order 32-bit int. Later entries win, as in a dict. */
static PyObject *Switch_set_tables(SwitchObject *self, PyObject *args) {
    PyObject *adm, *port_of, *loss, *groups, *ups;
    long long default_loss;
    if (!PyArg_ParseTuple(args, "O!O!O!LO!O!", &PyList_Type, &adm, &PyList_Type, &port_of, &PyList_Type, &loss,
                          &default_loss, &PyList_Type, &groups, &PyList_Type, &ups))
        return NULL;
    if (!self->python_holds) {
        PyErr_SetString(PyExc_RuntimeError, "set_tables needs the switch lock held");
        return NULL;
    }
    tables_t *t = calloc(1, sizeof(tables_t));
    Py_ssize_t nadm = PyList_GET_SIZE(adm), nport = PyList_GET_SIZE(port_of), nloss = PyList_GET_SIZE(loss),
               ngroups = PyList_GET_SIZE(groups), nups = PyList_GET_SIZE(ups), nrep = 0;
    for (Py_ssize_t g = 0; g < ngroups; g++) {
        PyObject *item = PyList_GET_ITEM(groups, g);
        PyObject *reps = PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 2 ? PyTuple_GET_ITEM(item, 1) : NULL;
        if (!reps || !PyList_Check(reps)) {
            tables_free(t);
            PyErr_SetString(PyExc_TypeError, "groups: expected [(mgid, [(ip, port), ...])]");
            return NULL;
        }
        nrep += PyList_GET_SIZE(reps);
    }
    if (!t || !htab_init(&t->adm, nadm) || !htab_init(&t->port_of, nport) || !htab_init(&t->loss, nloss) ||
        !htab_init(&t->groups, ngroups) || !htab_init(&t->up, nups) ||
        !(t->ups = calloc((size_t)nups + 1, sizeof(up_t))) || !(t->adms = calloc((size_t)nadm + 1, sizeof(adm_t))) ||
        !(t->group_start = calloc((size_t)ngroups + 1, sizeof(Py_ssize_t))) ||
        !(t->group_len = calloc((size_t)ngroups + 1, sizeof(Py_ssize_t))) ||
        !(t->replicas = calloc((size_t)nrep + 1, sizeof(addr_t)))) {
        tables_free(t);
        return PyErr_NoMemory();
    }
    t->default_loss = default_loss;
    int64_t f[9];
    for (Py_ssize_t i = 0; i < nadm; i++) {
        if (row_of(PyList_GET_ITEM(adm, i), 9, f, "admission")) goto fail;
        if (!f[2] && (f[5] < 1 || f[4] < 0 || f[4] > 31)) {
            PyErr_SetString(PyExc_ValueError, "admission: worker_id or num_workers out of range");
            goto fail;
        }
        adm_t *a = &t->adms[i];
        a->is_controller = (int)f[2];
        a->job = f[3], a->worker_id = f[4], a->num_workers = f[5], a->mgid = f[6], a->pool_base = f[7],
        a->pool_size = f[8];
        htab_put(&t->adm, addr_key((uint32_t)f[0], (uint16_t)f[1]), i);
    }
    for (Py_ssize_t i = 0; i < nport; i++) {
        PyObject *e = PyList_GET_ITEM(port_of, i);
        if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 3 || as_i64(e, 0, &f[0]) || as_i64(e, 1, &f[1]) ||
            as_i64(e, 2, &f[2])) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "port_of: expected 3-tuples");
            goto fail;
        }
        htab_put(&t->port_of, addr_key((uint32_t)f[0], (uint16_t)f[1]), f[2]);
    }
    for (Py_ssize_t i = 0; i < nloss; i++) {
        PyObject *e = PyList_GET_ITEM(loss, i);
        if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 2 || as_i64(e, 0, &f[0]) || as_i64(e, 1, &f[1])) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "loss: expected 2-tuples");
            goto fail;
        }
        htab_put(&t->loss, (uint64_t)f[0], f[1]);
    }
    nrep = 0;
    for (Py_ssize_t g = 0; g < ngroups; g++) {
        PyObject *item = PyList_GET_ITEM(groups, g), *reps = PyTuple_GET_ITEM(item, 1);
        if (as_i64(item, 0, &f[0])) goto fail;
        t->group_start[g] = nrep;
        t->group_len[g] = PyList_GET_SIZE(reps);
        for (Py_ssize_t r = 0; r < PyList_GET_SIZE(reps); r++) {
            PyObject *e = PyList_GET_ITEM(reps, r);
            if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 2 || as_i64(e, 0, &f[1]) || as_i64(e, 1, &f[2])) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "groups: expected (ip, port) replicas");
                goto fail;
            }
            t->replicas[nrep].ip = (uint32_t)f[1];
            t->replicas[nrep].port = (uint16_t)f[2];
            nrep++;
        }
        htab_put(&t->groups, (uint64_t)f[0], g);
    }
    for (Py_ssize_t i = 0; i < nups; i++) {
        if (row_of(PyList_GET_ITEM(ups, i), 6, f, "upstream")) goto fail;
        t->ups[i] = (up_t){{(uint32_t)f[1], (uint16_t)f[2]}, f[3], f[4], f[5]};
        htab_put(&t->up, (uint64_t)f[0], i);
    }
    tables_free(self->tables);
    self->tables = t;
    Py_RETURN_NONE;
fail:
    tables_free(t);
    return NULL;
}

static Py_ssize_t max_group(const tables_t *t) {
    Py_ssize_t m = 1;
    for (uint64_t i = 0; i <= t->groups.mask; i++)
        if (t->groups.slots[i].used && t->group_len[t->groups.slots[i].val] > m) m = t->group_len[t->groups.slots[i].val];
    return m;
}

static PyObject *addr_tuple(addr_t a) {
    char text[INET_ADDRSTRLEN];
    struct in_addr in = {.s_addr = htonl(a.ip)};
    inet_ntop(AF_INET, &in, text, sizeof text);
    return Py_BuildValue("(si)", text, (int)a.port);
}

/* process(data, ip, port) -> [(payload, (ip, port)), ...]: SoftwareSwitch.process. */
static PyObject *Switch_process(SwitchObject *self, PyObject *args) {
    Py_buffer data;
    unsigned long ip;
    int port;
    if (!PyArg_ParseTuple(args, "y*ki", &data, &ip, &port)) return NULL;
    uint8_t *out = malloc(SML_MAX_PACKET);
    addr_t *dst = NULL;
    PyObject *result = NULL;
    reply_t reply;
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&self->mu);
    Py_END_ALLOW_THREADS
    dst = malloc(sizeof(addr_t) * (size_t)max_group(self->tables));
    if (out && dst) {
        reply.dst = dst;
        process_one(self, data.buf, (size_t)data.len, (uint32_t)ip, (uint16_t)port, out, &reply);
    }
    pthread_mutex_unlock(&self->mu);
    if (!out || !dst) {
        PyErr_NoMemory();
        goto done;
    }
    result = PyList_New(0);
    for (int i = 0; result && i < reply.ndst; i++) {
        PyObject *item = Py_BuildValue("(y#N)", reply.payload, (Py_ssize_t)reply.len, addr_tuple(reply.dst[i]));
        if (!item || PyList_Append(result, item) < 0) Py_CLEAR(result);
        Py_XDECREF(item);
    }
done:
    free(out);
    free(dst);
    PyBuffer_Release(&data);
    return result;
}

/* One serving thread's buffers: received datagrams, the RESULTs built for up to CHUNK of
 * them, their destinations and the send queue. */
#define CHUNK 256 /* datagrams processed per hold of the mutex */

typedef struct {
    struct sockaddr_in dst;
    const uint8_t *payload;
    size_t len;
    uint32_t seq;
} out_t;

typedef struct {
    sml_rx_t rx;
    sml_tx_t tx;
    uint8_t *out;      /* CHUNK x SML_MAX_PACKET */
    reply_t *replies;  /* CHUNK */
    addr_t *dst;       /* CHUNK x max_dst */
    out_t *outs;       /* CHUNK x max_dst */
    size_t max_dst;
    unsigned n;        /* replies pending */
    unsigned nres;     /* RESULTs built in `out` (about one per n replies: the arena stays warm) */
    int gso;
} serve_bufs_t;

static void bufs_free(serve_bufs_t *b) {
    sml_rx_free(&b->rx);
    sml_tx_free(&b->tx);
    free(b->out), free(b->replies), free(b->dst), free(b->outs);
}

/* Room for `max_dst` destinations per reply; only while no reply is pending. */
static int bufs_dst(serve_bufs_t *b, size_t max_dst) {
    if (max_dst <= b->max_dst) return 0;
    free(b->dst), free(b->outs);
    sml_tx_free(&b->tx);
    b->dst = malloc(sizeof(addr_t) * CHUNK * max_dst);
    b->outs = malloc(sizeof(out_t) * CHUNK * max_dst);
    b->max_dst = max_dst;
    if (!b->dst || !b->outs || sml_tx_init(&b->tx, (unsigned)(CHUNK * max_dst), &b->gso) < 0) return -1;
    return 0;
}

static int bufs_init(serve_bufs_t *b, unsigned batch, int offload) {
    memset(b, 0, sizeof *b);
    b->gso = offload;
    b->out = malloc((size_t)CHUNK * SML_MAX_PACKET);
    b->replies = calloc(CHUNK, sizeof(reply_t));
    if (sml_rx_init(&b->rx, batch) < 0 || !b->out || !b->replies) return -1;
    return bufs_dst(b, 32);
}

static int out_cmp(const void *pa, const void *pb) {
    const out_t *a = pa, *b = pb;
    uint32_t ia = ntohl(a->dst.sin_addr.s_addr), ib = ntohl(b->dst.sin_addr.s_addr);
    if (ia != ib) return ia < ib ? -1 : 1;
    if (a->dst.sin_port != b->dst.sin_port) return ntohs(a->dst.sin_port) < ntohs(b->dst.sin_port) ? -1 : 1;
    return a->seq < b->seq ? -1 : (a->seq > b->seq);
}

static inline struct sockaddr_in sockaddr_of(addr_t a) {
    struct sockaddr_in s;
    memset(&s, 0, sizeof s);
    s.sin_family = AF_INET;
    s.sin_addr.s_addr = htonl(a.ip);
    s.sin_port = htons(a.port);
    return s;
}

/* Send the pending replies. With offload, by destination (stable: each destination keeps
 * its order), so that runs to one worker leave as one segmented message. */
static unsigned bufs_flush(int fd, serve_bufs_t *b) {
    unsigned nout = 0;
    for (unsigned i = 0; i < b->n; i++)
        for (int j = 0; j < b->replies[i].ndst; j++) {
            b->outs[nout] = (out_t){sockaddr_of(b->replies[i].dst[j]), b->replies[i].payload, b->replies[i].len, nout};
            nout++;
        }
    b->n = b->nres = 0;
    if (!nout) return 0;
    if (b->gso && nout > 1) qsort(b->outs, nout, sizeof(out_t), out_cmp);
    for (unsigned i = 0; i < nout; i++) sml_tx_add(&b->tx, b->outs[i].payload, b->outs[i].len, &b->outs[i].dst);
    return sml_tx_flush(fd, &b->tx);
}


/* serve(fd, batch, stop_flag, offload): receive (recvmmsg), process, send (sendmmsg) until
 * stop_flag[0] != 0, with the GIL released throughout. With offload the socket takes
 * coalesced receives (UDP_GRO) and sends runs to one destination segmented (UDP_SEGMENT).
 * Several threads may serve the same switch and socket: each holds the mutex only while
 * it processes up to CHUNK datagrams. */
static PyObject *Switch_serve(SwitchObject *self, PyObject *args) {
    int fd, offload = 1, err = 0;
    unsigned batch;
    PyObject *flag_obj;
    Py_buffer flag;
    serve_bufs_t b;
    if (!PyArg_ParseTuple(args, "iIO|p", &fd, &batch, &flag_obj, &offload)) return NULL;
    if (batch < 1 || batch > SML_MAX_BATCH) {
        PyErr_Format(PyExc_ValueError, "batch=%u; expected 1..%d", batch, SML_MAX_BATCH);
        return NULL;
    }
    if (sml_parse_flag(flag_obj, &flag) < 0) return NULL;
    if (bufs_init(&b, batch, offload) < 0) {
        bufs_free(&b);
        PyBuffer_Release(&flag);
        return PyErr_NoMemory();
    }
    if (offload && sml_enable_gro(fd) < 0) b.gso = 0; /* a kernel without UDP GRO: plain datagrams */
    Py_BEGIN_ALLOW_THREADS
    while (!sml_flag_set(&flag)) {
        int r = sml_rx_recv(fd, &b.rx);
        if (r < 0) {
            err = errno;
            break;
        }
        if (r == 0) {
            sml_wait(fd, POLLIN, 0.1); /* so the stop flag is seen within 100 ms */
            continue;
        }
        pthread_mutex_lock(&self->mu);
        for (int m = 0; m < r && !err; m++) {
            struct sockaddr_in *sa = &b.rx.addr[m];
            if (b.rx.msgs[m].msg_hdr.msg_namelen < sizeof(struct sockaddr_in) || sa->sin_family != AF_INET)
                continue; /* not IPv4: no admission entry could match it */
            size_t offset = 0, len;
            const uint8_t *d;
            while (sml_rx_segment(&b.rx, (unsigned)m, &offset, &d, &len) == 0) {
                if (b.n == CHUNK) {
                    pthread_mutex_unlock(&self->mu);
                    unsigned failed = bufs_flush(fd, &b);
                    if (failed) __atomic_add_fetch(&self->send_failures, failed, __ATOMIC_RELAXED);
                    pthread_mutex_lock(&self->mu);
                }
                if (b.n == 0 && bufs_dst(&b, (size_t)max_group(self->tables)) < 0) {
                    err = ENOMEM;
                    break;
                }
                reply_t *rep = &b.replies[b.n];
                rep->dst = b.dst + (size_t)b.n * b.max_dst;
                uint8_t *slot = b.out + (size_t)b.nres * SML_MAX_PACKET;
                process_one(self, d, len, ntohl(sa->sin_addr.s_addr), ntohs(sa->sin_port), slot, rep);
                if (rep->payload == slot) b.nres++; /* a RESET echo points into the receive buffer, alive until the flush */
                b.n++;
            }
        }
        pthread_mutex_unlock(&self->mu);
        unsigned failed = bufs_flush(fd, &b);
        if (failed) __atomic_add_fetch(&self->send_failures, failed, __ATOMIC_RELAXED);
    }
    Py_END_ALLOW_THREADS
    bufs_free(&b);
    PyBuffer_Release(&flag);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* rng_bits15(count): the next `count` loss draws (tests compare them with Python's). */
static PyObject *Switch_rng_bits15(SwitchObject *self, PyObject *args) {
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "n", &count)) return NULL;
    PyObject *list = PyList_New(count);
    if (!list) return NULL;
    pthread_mutex_lock(&self->mu);
    for (Py_ssize_t i = 0; i < count; i++) PyList_SET_ITEM(list, i, PyLong_FromUnsignedLong(mt_next(&self->rng) >> 17));
    pthread_mutex_unlock(&self->mu);
    return list;
}

static PyObject *Switch_get_send_failures(SwitchObject *self, void *Py_UNUSED(closure)) {
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&self->send_failures, __ATOMIC_RELAXED));
}

static PyMethodDef Switch_methods[] = {
    {"acquire", (PyCFunction)Switch_acquire, METH_NOARGS, "Take the state's mutex (waits without the GIL)."},
    {"release", (PyCFunction)Switch_release, METH_NOARGS, "Give the mutex back."},
    {"set_tables", (PyCFunction)Switch_set_tables, METH_VARARGS,
     "set_tables(admission, port_of, loss, default_loss, groups, upstream): replace the tables (lock held)."},
    {"process", (PyCFunction)Switch_process, METH_VARARGS,
     "process(data, ip, port) -> [(payload, (ip, port))]: one packet, as SoftwareSwitch.process."},
    {"serve", (PyCFunction)Switch_serve, METH_VARARGS,
     "serve(fd, batch, stop_flag, offload=True): the UDP loop, GIL released, until stop_flag[0] != 0."},
    {"rng_bits15", (PyCFunction)Switch_rng_bits15, METH_VARARGS, "rng_bits15(count): next loss draws."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Switch_getset[] = {
    {"send_failures", (getter)Switch_get_send_failures, NULL, "datagrams sendmmsg could not send", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SwitchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "emulation._native_switch.Switch",
    .tp_basicsize = sizeof(SwitchObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Native data path state over numpy arrays owned by emulation.switch.SoftwareSwitch.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Switch_init,
    .tp_dealloc = (destructor)Switch_dealloc,
    .tp_methods = Switch_methods,
    .tp_getset = Switch_getset,
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "emulation._native_switch",
                                       "The software switch's data plane in C (see emulation/native.py).", -1,
                                       NULL};

PyMODINIT_FUNC PyInit__native_switch(void) {
    if (PyType_Ready(&SwitchType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&SwitchType);
    if (PyModule_AddObject(m, "Switch", (PyObject *)&SwitchType) < 0) {
        Py_DECREF(&SwitchType);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *c = Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}",
        "PREAMBLE_BYTES",
        SML_PREAMBLE_BYTES, "MAX_K", SML_MAX_K, "SLOT_MASK", SML_SLOT_MASK, "UPDATE", SML_MSG_UPDATE, "RESULT",
        SML_MSG_RESULT, "RESET", SML_MSG_RESET, "MALFORMED", DROP_MALFORMED, "BAD_SIZE", DROP_BAD_SIZE, "BAD_MSG_TYPE",
        DROP_BAD_MSG_TYPE, "NOT_ADMITTED", DROP_NOT_ADMITTED, "SLOT_OUT_OF_RANGE", DROP_SLOT_OUT_OF_RANGE,
        "JOB_MISMATCH", DROP_JOB_MISMATCH, "RESET_NOT_FROM_CONTROLLER", DROP_RESET_NOT_FROM_CONTROLLER,
        "RETRANSMISSION_INCOMPLETE", DROP_RETRANSMISSION_INCOMPLETE, "EMULATED_LOSS", DROP_EMULATED_LOSS,
        "SIZE_MISMATCH", DROP_SIZE_MISMATCH, "NUM_DROP_REASONS", NUM_DROPS, "RECEIVED", PKT_RECEIVED, "AGGREGATED",
        PKT_AGGREGATED, "RESETS", PKT_RESETS, "SENT_UPSTREAM", LEAF_SENT_UPSTREAM, "RESENT_UPSTREAM",
        LEAF_RESENT_UPSTREAM, "RESULTS_FROM_UPSTREAM", LEAF_RESULTS_FROM_UPSTREAM, "IGNORED_FROM_UPSTREAM",
        LEAF_IGNORED_FROM_UPSTREAM, "NUM_LEAF_COUNTERS", NUM_LEAF);
    if (!c || PyModule_AddObject(m, "CONSTANTS", c) < 0) {
        Py_XDECREF(c);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
