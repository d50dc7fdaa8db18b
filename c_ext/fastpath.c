/* The RISC-V IOMMU translation fast path (spec v1.0.1 §3.3, §3.3.4-§3.3.5; Privileged
 * spec Sv32/39/48/57 and their x4 forms, Svnapot, Svpbmt) for Untranslated requests.
 *
 * This is a second implementation of part of vfiouser_iommu/iommu/core.py, which stays
 * the reference: everything here follows that code step for step, and anything it does
 * not decide on the success path (a fault, an MSI interrupt-file page, a device or
 * process context that is not cached, memory outside the mapped regions, big-endian
 * tables, a compare-and-swap that lost a race) is answered FP_FALLBACK *before any side
 * effect*, so that Python runs the same request from the same state.
 *
 * Side effects are made transactional to allow that:
 *   - cache changes (LRU touches, inserts, evictions) are applied to the C mirror of
 *     the Python caches with an undo log, and rolled back on fallback;
 *   - A/D updates are recorded, not written: later reads of the same translation see
 *     them through an overlay, and the compare-and-swaps run (GCC atomics, shared
 *     memory) only once the whole translation has succeeded;
 *   - statistics and HPM event counts are added to the pending totals on commit.
 *
 * The mirror holds the exact contents and LRU order of the Python OrderedDicts; what C
 * changed since the last flush is exported (removed keys, the touched suffix of the
 * LRU list, statistics) so that Python can replay it. See docs/fastpath.md.
 */

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fastpath.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the fast path reads little-endian tables and integers with host loads"
#endif

#define NONE UINT64_MAX
#define NV 10            /* value words of a node */
#define MAXGL 8          /* G-stage leaves one IOTLB entry remembers */
#define MAXUNDO 96
#define MAXCAS 16
#define MAXSHIFT 64
#define PPN_MASK ((1ULL << 44) - 1)

#define PTE_V 1u
#define PTE_R 2u
#define PTE_W 4u
#define PTE_X 8u
#define PTE_U 16u
#define PTE_G 32u
#define PTE_A 64u
#define PTE_D 128u

/* TLB value words (TlbEntry fields) */
enum { T_GSCID, T_PSCID, T_VA, T_SIZE, T_OUT, T_FS, T_GS, T_PBMT, T_GPA, T_HAS_GPA };
/* device context words */
enum { DC_TC, DC_IOHGATP, DC_TA, DC_FSC, DC_MSIPTP, DC_MSI_MASK, DC_MSI_PATTERN };

typedef struct {
    uint64_t key[4];
    uint64_t v[NV];
    uint64_t gl[MAXGL][2];
    int32_t ngl;
    int32_t prev, next, hnext;
    uint64_t seq;
    uint8_t live, py_key, dirty;
} node_t;

typedef struct {
    node_t *n;
    int32_t cap, free_head;
    int32_t *bucket;
    uint32_t nbucket;
    int32_t head, tail;
    int64_t len, limit;
    int tlb;
    int nshift;
    int shift[MAXSHIFT];
    int64_t scount[MAXSHIFT];
    uint64_t *removed;   /* keys (4 words each) of Python entries C evicted */
    int32_t nremoved, capremoved;
} cache_t;

typedef struct {
    uint64_t gpa, size;
    unsigned char *host;
    int writable;
} region_t;

/* what one requester did since the last flush (RequesterStats, device_walks) */
typedef struct {
    uint64_t did;
    uint64_t v[FP_NDEV];
} dev_t_;

struct fp_iommu {
    pthread_mutex_t lock;
    cache_t c[4];
    region_t *regions;
    int nregions;
    uint64_t ddtp, fctl;
    int pas, svpbmt, msi_flat;
    uint64_t seq, flush_seq;
    uint64_t stats[FP_NSTAT];
    uint64_t events[FP_NEVENT];
    dev_t_ *dev;
    int32_t ndev, capdev, lastdev;
    int pending;
    int fallback_line;   /* where the last fallback was decided (tests, debugging) */
};

/* ---- paging modes ---------------------------------------------------------------- */
typedef struct {
    int levels, pte_size, vpn_bits, va_bits, widen;
} mode_t_;

static const mode_t_ SV32 = {2, 4, 10, 32, 0}, SV39 = {3, 8, 9, 39, 0},
                     SV48 = {4, 8, 9, 48, 0}, SV57 = {5, 8, 9, 57, 0},
                     SV32X4 = {2, 4, 10, 34, 2}, SV39X4 = {3, 8, 9, 41, 2},
                     SV48X4 = {4, 8, 9, 50, 2}, SV57X4 = {5, 8, 9, 59, 2};

/* FIRST_STAGE_MODES[(sxl, mode)] and G_STAGE_MODES[(gxl, mode)] of walk.py */
static const mode_t_ *first_stage_mode(int sxl, uint64_t mode) {
    if (sxl) return mode == 8 ? &SV32 : NULL;
    return mode == 8 ? &SV39 : mode == 9 ? &SV48 : mode == 10 ? &SV57 : NULL;
}

static const mode_t_ *g_stage_mode(int gxl, uint64_t mode) {
    if (gxl) return mode == 8 ? &SV32X4 : NULL;
    return mode == 8 ? &SV39X4 : mode == 9 ? &SV48X4 : mode == 10 ? &SV57X4 : NULL;
}

/* ---- the cache mirror ------------------------------------------------------------ */
static uint64_t hash_key(const uint64_t *k) {
    uint64_t h = k[0] * 0x9E3779B97F4A7C15ULL;
    h ^= (k[1] + 0x632BE59BD9B4E019ULL) * 0xC2B2AE3D27D4EB4FULL;
    h ^= (k[2] + 0x165667B19E3779F9ULL) * 0x27D4EB2F165667C5ULL;
    h ^= (k[3] + 0x85EBCA77C2B2AE63ULL) * 0x9E3779B97F4A7C15ULL;
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ULL;
    return h ^ (h >> 32);
}

static int key_eq(const uint64_t *a, const uint64_t *b) {
    return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static int32_t c_find(const cache_t *c, const uint64_t *key) {
    if (!c->nbucket) return -1;
    int32_t i = c->bucket[hash_key(key) & (c->nbucket - 1)];
    while (i >= 0) {
        if (key_eq(c->n[i].key, key)) return i;
        i = c->n[i].hnext;
    }
    return -1;
}

static int c_rehash(cache_t *c, uint32_t nbucket) {
    int32_t *b = malloc(sizeof(int32_t) * nbucket);
    if (!b) return -1;
    for (uint32_t k = 0; k < nbucket; k++) b[k] = -1;
    free(c->bucket);
    c->bucket = b;
    c->nbucket = nbucket;
    for (int32_t i = c->head; i >= 0; i = c->n[i].next) {
        uint32_t h = hash_key(c->n[i].key) & (nbucket - 1);
        c->n[i].hnext = b[h];
        b[h] = i;
    }
    return 0;
}

static void c_hash_add(cache_t *c, int32_t i) {
    uint32_t h = hash_key(c->n[i].key) & (c->nbucket - 1);
    c->n[i].hnext = c->bucket[h];
    c->bucket[h] = i;
}

static void c_hash_del(cache_t *c, int32_t i) {
    int32_t *p = &c->bucket[hash_key(c->n[i].key) & (c->nbucket - 1)];
    while (*p >= 0) {
        if (*p == i) {
            *p = c->n[i].hnext;
            return;
        }
        p = &c->n[*p].hnext;
    }
}

static void c_unlink(cache_t *c, int32_t i) {
    node_t *n = &c->n[i];
    if (n->prev >= 0) c->n[n->prev].next = n->next; else c->head = n->next;
    if (n->next >= 0) c->n[n->next].prev = n->prev; else c->tail = n->prev;
    n->prev = n->next = -1;
    c->len--;
}

/* link i after `after` (-1: at the head) */
static void c_link_after(cache_t *c, int32_t i, int32_t after) {
    node_t *n = &c->n[i];
    n->prev = after;
    n->next = after >= 0 ? c->n[after].next : c->head;
    if (n->next >= 0) c->n[n->next].prev = i; else c->tail = i;
    if (after >= 0) c->n[after].next = i; else c->head = i;
    c->len++;
}

static int32_t c_alloc(cache_t *c) {
    if (c->free_head < 0) {
        int32_t cap = c->cap ? c->cap * 2 : 64;
        node_t *n = realloc(c->n, sizeof(node_t) * cap);
        if (!n) return -1;
        c->n = n;
        for (int32_t i = cap - 1; i >= c->cap; i--) {
            n[i].live = 0;
            n[i].next = c->free_head;
            c->free_head = i;
        }
        c->cap = cap;
    }
    if ((uint32_t)c->len + 1 > c->nbucket &&
        c_rehash(c, c->nbucket ? c->nbucket * 2 : 64) < 0)
        return -1;
    int32_t i = c->free_head;
    c->free_head = c->n[i].next;
    memset(&c->n[i], 0, sizeof(node_t));
    c->n[i].live = 1;
    c->n[i].prev = c->n[i].next = c->n[i].hnext = -1;
    return i;
}

static void c_free_node(cache_t *c, int32_t i) {
    c->n[i].live = 0;
    c->n[i].next = c->free_head;
    c->free_head = i;
}

/* Tlb.shifts: a Counter whose key order is the order shifts went from 0 to 1 */
static void shift_inc(cache_t *c, int s) {
    for (int k = 0; k < c->nshift; k++)
        if (c->shift[k] == s) {
            c->scount[k]++;
            return;
        }
    if (c->nshift < MAXSHIFT) {
        c->shift[c->nshift] = s;
        c->scount[c->nshift++] = 1;
    }
}

static void shift_dec(cache_t *c, int s) {
    for (int k = 0; k < c->nshift; k++)
        if (c->shift[k] == s) {
            if (--c->scount[k] == 0) {
                memmove(&c->shift[k], &c->shift[k + 1], sizeof(int) * (c->nshift - k - 1));
                memmove(&c->scount[k], &c->scount[k + 1],
                        sizeof(int64_t) * (c->nshift - k - 1));
                c->nshift--;
            }
            return;
        }
}

static int c_remove_node(cache_t *c, int32_t i) {
    c_unlink(c, i);
    c_hash_del(c, i);
    if (c->tlb) shift_dec(c, (int)c->n[i].key[2]);
    return 0;
}

static int push_removed(cache_t *c, const uint64_t *key) {
    if (c->nremoved == c->capremoved) {
        int32_t cap = c->capremoved ? c->capremoved * 2 : 64;
        uint64_t *r = realloc(c->removed, sizeof(uint64_t) * 4 * cap);
        if (!r) return -1;
        c->removed = r;
        c->capremoved = cap;
    }
    memcpy(&c->removed[4 * c->nremoved++], key, 4 * sizeof(uint64_t));
    return 0;
}

static void cache_clear(cache_t *c) {
    free(c->n);
    free(c->bucket);
    free(c->removed);
    int tlb = c->tlb;
    int64_t limit = c->limit;
    memset(c, 0, sizeof(*c));
    c->tlb = tlb;
    c->limit = limit;
    c->head = c->tail = c->free_head = -1;
}

/* ---- transactions ---------------------------------------------------------------- */
enum { U_TOUCH, U_INSERT, U_REPLACE, U_EVICT };

typedef struct {
    int op, cache;
    int32_t node, old_node, old_prev;
    uint64_t old_seq;
} undo_t;

typedef struct {
    unsigned char *host;
    uint64_t old, new_;
    int size;
} cas_t;

typedef struct {
    fp_iommu *fp;
    uint64_t did;
    int nundo;
    undo_t undo[MAXUNDO];
    int saved[4];                 /* shifts and removed list saved for cache k */
    int nshift[4];
    int shift[4][MAXSHIFT];
    int64_t scount[4][MAXSHIFT];
    int32_t nremoved[4];
    uint64_t stats[FP_NSTAT];
    uint64_t events[FP_NEVENT];
    int ncas;
    cas_t cas[MAXCAS];
    int ngl;
    uint64_t gl[MAXGL][2];
} tx_t;

static void tx_begin(tx_t *tx, fp_iommu *fp) {
    tx->fp = fp;
    tx->nundo = 0;
    tx->ncas = 0;
    tx->ngl = 0;
    memset(tx->saved, 0, sizeof(tx->saved));
    memset(tx->stats, 0, sizeof(tx->stats));
    memset(tx->events, 0, sizeof(tx->events));
}

static void tx_save(tx_t *tx, int k) {
    if (tx->saved[k]) return;
    cache_t *c = &tx->fp->c[k];
    tx->saved[k] = 1;
    tx->nshift[k] = c->nshift;
    memcpy(tx->shift[k], c->shift, sizeof(int) * c->nshift);
    memcpy(tx->scount[k], c->scount, sizeof(int64_t) * c->nshift);
    tx->nremoved[k] = c->nremoved;
}

static int tx_log(tx_t *tx, int op, int k, int32_t node, int32_t old_node, int32_t old_prev,
                  uint64_t old_seq) {
    if (tx->nundo == MAXUNDO) return -1;
    undo_t *u = &tx->undo[tx->nundo++];
    u->op = op;
    u->cache = k;
    u->node = node;
    u->old_node = old_node;
    u->old_prev = old_prev;
    u->old_seq = old_seq;
    return 0;
}

static void tx_abort(tx_t *tx) {
    fp_iommu *fp = tx->fp;
    for (int j = tx->nundo - 1; j >= 0; j--) {
        undo_t *u = &tx->undo[j];
        cache_t *c = &fp->c[u->cache];
        switch (u->op) {
        case U_TOUCH:
            c_unlink(c, u->node);
            c_link_after(c, u->node, u->old_prev);
            c->n[u->node].seq = u->old_seq;
            break;
        case U_INSERT:
            c_unlink(c, u->node);
            c_hash_del(c, u->node);
            c_free_node(c, u->node);
            break;
        case U_REPLACE:
            c_unlink(c, u->node);
            c_hash_del(c, u->node);
            c_free_node(c, u->node);
            c_link_after(c, u->old_node, u->old_prev);
            c_hash_add(c, u->old_node);
            break;
        case U_EVICT:
            c_link_after(c, u->node, -1);
            c_hash_add(c, u->node);
            break;
        }
    }
    for (int k = 0; k < 4; k++) {
        if (!tx->saved[k]) continue;
        cache_t *c = &fp->c[k];
        c->nshift = tx->nshift[k];
        memcpy(c->shift, tx->shift[k], sizeof(int) * c->nshift);
        memcpy(c->scount, tx->scount[k], sizeof(int64_t) * c->nshift);
        c->nremoved = tx->nremoved[k];
    }
    tx->nundo = 0;
}

/* ---- guest memory ---------------------------------------------------------------- */
static const region_t *find_region(const fp_iommu *fp, uint64_t gpa, uint64_t len) {
    int lo = 0, hi = fp->nregions;
    while (lo < hi) {               /* first region whose gpa > addr */
        int mid = (lo + hi) / 2;
        if (fp->regions[mid].gpa <= gpa) lo = mid + 1; else hi = mid;
    }
    if (lo == 0) return NULL;
    const region_t *r = &fp->regions[lo - 1];
    uint64_t off = gpa - r->gpa;
    if (len > r->size || off > r->size - len) return NULL;
    return r;
}

static uint64_t raw_load(const unsigned char *p, int size) {
    if (size == 8) {
        if (((uintptr_t)p & 7) == 0) return __atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED);
        uint64_t v;
        memcpy(&v, p, 8);
        return v;
    }
    if (((uintptr_t)p & 3) == 0) return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED);
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* the value at host [p, p+size) as this translation sees it: memory, then the A/D
 * updates it has recorded, in order (little-endian host, as the callers check) */
static uint64_t tx_load(const tx_t *tx, const unsigned char *p, int size) {
    uint64_t v = raw_load(p, size);
    for (int j = 0; j < tx->ncas; j++) {
        const cas_t *w = &tx->cas[j];
        if (w->host + w->size <= p || p + size <= w->host) continue;
        unsigned char bytes[8], src[8];
        memcpy(bytes, &v, 8);
        memcpy(src, &w->new_, 8);
        for (int b = 0; b < size; b++) {
            const unsigned char *a = p + b;
            if (a >= w->host && a < w->host + w->size) bytes[b] = src[a - w->host];
        }
        memcpy(&v, bytes, 8);
        if (size == 4) v &= 0xFFFFFFFFULL;
    }
    return v;
}

static int within_pas(const fp_iommu *fp, uint64_t addr, int size) {
    if (fp->pas >= 64) return 1;
    uint64_t limit = 1ULL << fp->pas;
    return addr <= limit && (uint64_t)size <= limit - addr;
}

/* read_table_word of directory.py: only mapped RAM below 2^PAS, little-endian */
static int table_load(const tx_t *tx, uint64_t addr, int size, uint64_t *out) {
    if (!within_pas(tx->fp, addr, size)) return -1;
    const region_t *r = find_region(tx->fp, addr, size);
    if (!r) return -1;
    *out = tx_load(tx, r->host + (addr - r->gpa), size);
    return 0;
}

/* RiscvIommu._compare_exchange, recorded: 0 when it would succeed, -1 to fall back
 * (fault, read-only, misaligned, or the value changed: Python restarts the walk) */
static int table_cas(tx_t *tx, uint64_t addr, int size, uint64_t old, uint64_t new_) {
    if (!within_pas(tx->fp, addr, size)) return -1;
    const region_t *r = find_region(tx->fp, addr, size);
    if (!r || !r->writable || tx->ncas == MAXCAS) return -1;
    unsigned char *p = r->host + (addr - r->gpa);
    if ((uintptr_t)p % size) return -1;
    if (tx_load(tx, p, size) != old) return -1;
    cas_t *w = &tx->cas[tx->ncas++];
    w->host = p;
    w->old = old;
    w->new_ = new_;
    w->size = size;
    return 0;
}

static int tx_run_cas(tx_t *tx) {
    for (int j = 0; j < tx->ncas; j++) {
        cas_t *w = &tx->cas[j];
        if (w->size == 8) {
            uint64_t expected = w->old;
            if (!__atomic_compare_exchange_n((uint64_t *)w->host, &expected, w->new_, 0,
                                             __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
                return -1;
        } else {
            uint32_t expected = (uint32_t)w->old;
            if (!__atomic_compare_exchange_n((uint32_t *)w->host, &expected,
                                             (uint32_t)w->new_, 0, __ATOMIC_SEQ_CST,
                                             __ATOMIC_SEQ_CST))
                return -1;
        }
    }
    return 0;
}

/* ---- transactional cache operations ---------------------------------------------- */
static void touch(tx_t *tx, int k, int32_t i, int *err) {
    cache_t *c = &tx->fp->c[k];
    if (tx_log(tx, U_TOUCH, k, i, -1, c->n[i].prev, c->n[i].seq) < 0) {
        *err = 1;
        return;
    }
    c_unlink(c, i);
    c_link_after(c, i, c->tail);
    c->n[i].seq = ++tx->fp->seq;
}

/* Lru.lookup */
static int32_t lru_lookup(tx_t *tx, int k, const uint64_t *key, int *err) {
    int32_t i = c_find(&tx->fp->c[k], key);
    if (i >= 0) touch(tx, k, i, err);
    return i;
}

/* Tlb.lookup: probe each page size present, in the order they appeared */
static int32_t tlb_lookup(tx_t *tx, int k, uint64_t s0, uint64_t s1, uint64_t va, int *err) {
    cache_t *c = &tx->fp->c[k];
    for (int j = 0; j < c->nshift; j++) {
        int s = c->shift[j];
        uint64_t key[4] = {s0, s1, (uint64_t)s, s >= 64 ? 0 : va >> s};
        int32_t i = c_find(c, key);
        if (i >= 0) {
            touch(tx, k, i, err);
            return i;
        }
    }
    return -1;
}

static int log2u(uint64_t x) { return 63 - __builtin_clzll(x); }

/* Tlb.insert */
static int tlb_insert(tx_t *tx, int k, uint64_t s0, uint64_t s1, const uint64_t *v,
                      int ngl, uint64_t (*gl)[2]) {
    cache_t *c = &tx->fp->c[k];
    if (c->limit <= 0) return 0;
    tx_save(tx, k);
    int s = log2u(v[T_SIZE]);
    uint64_t key[4] = {s0, s1, (uint64_t)s, v[T_VA] >> s};
    int32_t old = c_find(c, key);
    int32_t j = c_alloc(c);
    if (j < 0) return -1;
    node_t *n = &c->n[j];
    memcpy(n->key, key, sizeof(key));
    memcpy(n->v, v, sizeof(uint64_t) * NV);
    n->ngl = ngl;
    if (ngl) memcpy(n->gl, gl, sizeof(uint64_t) * 2 * ngl);
    n->dirty = 1;
    n->seq = ++tx->fp->seq;
    if (old >= 0) {
        n->py_key = c->n[old].py_key;
        if (tx_log(tx, U_REPLACE, k, j, old, c->n[old].prev, 0) < 0) {
            c_free_node(c, j);
            return -1;
        }
        c_unlink(c, old);
        c_hash_del(c, old);
    } else {
        if (tx_log(tx, U_INSERT, k, j, -1, -1, 0) < 0) {
            c_free_node(c, j);
            return -1;
        }
        shift_inc(c, s);
    }
    c_link_after(c, j, c->tail);
    c_hash_add(c, j);
    while (c->len > c->limit) {
        int32_t h = c->head;
        /* the removed list is restored from tx_save on abort */
        if (c->n[h].py_key && push_removed(c, c->n[h].key) < 0) return -1;
        if (tx_log(tx, U_EVICT, k, h, -1, -1, 0) < 0) return -1;
        c_remove_node(c, h);
    }
    return 0;
}

/* the pending counters of device `did` (NULL only when out of memory) */
static uint64_t *dev_counters(fp_iommu *fp, uint64_t did) {
    if (fp->lastdev < fp->ndev && fp->dev[fp->lastdev].did == did) return fp->dev[fp->lastdev].v;
    for (int32_t j = 0; j < fp->ndev; j++)
        if (fp->dev[j].did == did) {
            fp->lastdev = j;
            return fp->dev[j].v;
        }
    if (fp->ndev == fp->capdev) {
        int32_t cap = fp->capdev ? fp->capdev * 2 : 8;
        dev_t_ *d = realloc(fp->dev, sizeof(dev_t_) * cap);
        if (!d) return NULL;
        fp->dev = d;
        fp->capdev = cap;
    }
    dev_t_ *d = &fp->dev[fp->ndev];
    memset(d, 0, sizeof(*d));
    d->did = did;
    fp->lastdev = fp->ndev++;
    return d->v;
}

static void tx_commit(tx_t *tx) {
    fp_iommu *fp = tx->fp;
    for (int j = 0; j < tx->nundo; j++) {
        undo_t *u = &tx->undo[j];
        if (u->op == U_EVICT) c_free_node(&fp->c[u->cache], u->node);
        else if (u->op == U_REPLACE) c_free_node(&fp->c[u->cache], u->old_node);
    }
    for (int j = 0; j < FP_NSTAT; j++) fp->stats[j] += tx->stats[j];
    for (int j = 0; j < FP_NEVENT; j++) fp->events[j] += tx->events[j];
    /* RiscvIommu.count_event also counts misses and walks per device */
    if (tx->events[4] | tx->events[7] | tx->events[8]) {
        uint64_t *d = dev_counters(fp, tx->did);
        if (d) {
            d[FP_DEV_IOTLB_MISS] += tx->events[4];
            d[FP_DEV_S_WALK] += tx->events[7];
            d[FP_DEV_G_WALK] += tx->events[8];
        }
    }
    fp->pending = 1;
    tx->nundo = 0;
}

/* ---- the translation (core.py, step for step) ------------------------------------ */
typedef struct {
    uint64_t out_base, size;
    unsigned flags;
    unsigned pbmt;
} leaf_t;

typedef struct {
    uint64_t device_id;
    int64_t process_id;   /* -1: none */
    int access;
    int privileged;       /* request privileged and with a PASID */
    int sum;
    const uint64_t *dc;
    const mode_t_ *fs, *gs;
    uint64_t fs_root, gs_root;
    uint64_t gscid, pscid;  /* NONE when the stage is Bare */
} ctx_t;

#define FALL (-1)
/* fall back, remembering where: fp_fallback_line tells tests and developers why */
#define FALL_AT (tx->fp->fallback_line = __LINE__, FALL)

static int permits(unsigned flags, int access) {
    return access == FP_READ ? (flags & PTE_R) != 0
         : access == FP_WRITE ? (flags & PTE_W) != 0 : (flags & PTE_X) != 0;
}

static int first_stage_permits(unsigned flags, int access, int priv, int sum) {
    if (!permits(flags, access)) return 0;
    if (!priv) return (flags & PTE_U) != 0;
    if (flags & PTE_U) return access != FP_EXEC && sum;
    return 1;
}

static int g_stage_permits(unsigned flags, int access) {
    return (flags & PTE_U) && permits(flags, access);
}

static int needs_ad_update(unsigned flags, int write) {
    return !(flags & PTE_A) || (write && !(flags & PTE_D));
}

static int input_in_range(const mode_t_ *m, uint64_t va, int sign_extended) {
    if (sign_extended) {
        uint64_t top = va >> (m->va_bits - 1);
        int width = 64 - m->va_bits + 1;
        return top == 0 || top == (width >= 64 ? UINT64_MAX : (1ULL << width) - 1);
    }
    return m->va_bits >= 64 || (va >> m->va_bits) == 0;
}

typedef int (*spa_fn)(tx_t *, ctx_t *, uint64_t, int, uint64_t *);

/* walk.py _walk_once; the caller's stage decides permissions and how tables are reached */
static int walk(tx_t *tx, ctx_t *ctx, const mode_t_ *m, uint64_t root, uint64_t va,
                int g_stage, int access, int ade, spa_fn spa_of, leaf_t *out) {
    int write = access == FP_WRITE;
    int sv32 = m->pte_size == 4;
    uint64_t a = root;
    unsigned g = 0;
    for (int i = m->levels - 1; i >= 0; i--) {
        int width = m->vpn_bits + (i == m->levels - 1 ? m->widen : 0);
        uint64_t addr = a + ((va >> (12 + i * m->vpn_bits)) & ((1ULL << width) - 1)) *
                                (uint64_t)m->pte_size;
        uint64_t spa, pte;
        if (spa_of(tx, ctx, addr, 0, &spa) < 0) return FALL_AT;
        if (table_load(tx, spa, m->pte_size, &pte) < 0) return FALL_AT;
        unsigned flags = pte & 0xFF;
        uint64_t ppn, reserved = 0, pbmt = 0, n = 0;
        if (sv32) {
            ppn = pte >> 10 & 0x3FFFFF;
        } else {
            ppn = pte >> 10 & PPN_MASK;
            reserved = pte & (0x7FULL << 54);
            pbmt = pte >> 61 & 3;
            n = pte >> 63;
        }
        if (!(flags & PTE_V) || ((flags & PTE_W) && !(flags & PTE_R)) || reserved) return FALL_AT;
        if (pbmt && (!tx->fp->svpbmt || pbmt == 3)) return FALL_AT;
        g |= flags & PTE_G;
        if (!(flags & (PTE_R | PTE_W | PTE_X))) {
            if (i == 0 || (flags & (PTE_A | PTE_D | PTE_U)) || pbmt || n) return FALL_AT;
            a = ppn << 12;
            continue;
        }
        int shift = 12 + i * m->vpn_bits;
        uint64_t size = 1ULL << shift;
        if (n) {
            if (i != 0 || (ppn & 0xF) != 8) return FALL_AT;
            size = 1ULL << 16;
        } else if (ppn & ((1ULL << (i * m->vpn_bits)) - 1)) {
            return FALL_AT;
        }
        int ok = g_stage ? g_stage_permits(flags, access)
                         : first_stage_permits(flags, access, ctx->privileged, ctx->sum);
        if (!ok) return FALL_AT;
        if (needs_ad_update(flags, write)) {
            if (!ade) return FALL_AT;
            uint64_t new_ = pte | PTE_A | (write ? PTE_D : 0);
            uint64_t store_spa;
            if (spa_of(tx, ctx, addr, 1, &store_spa) < 0) return FALL_AT;
            if (table_cas(tx, store_spa, m->pte_size, pte, new_) < 0) return FALL_AT;
            flags |= PTE_A | (write ? PTE_D : 0);
        }
        out->out_base = (ppn << 12) & ~(size - 1);
        out->size = size;
        out->flags = flags | g;
        out->pbmt = (unsigned)pbmt;
        return 0;
    }
    return FALL_AT;
}

static int identity_spa(tx_t *tx, ctx_t *ctx, uint64_t gpa, int write, uint64_t *spa) {
    (void)tx; (void)ctx; (void)write;
    *spa = gpa;
    return 0;
}

static int add_gleaf(tx_t *tx, uint64_t base, uint64_t size) {
    if (tx->ngl == MAXGL) return -1;
    tx->gl[tx->ngl][0] = base;
    tx->gl[tx->ngl][1] = size;
    tx->ngl++;
    return 0;
}

/* RiscvIommu._g_translate / _g_walk */
static int g_translate(tx_t *tx, ctx_t *ctx, uint64_t gpa, int access, leaf_t *leaf) {
    fp_iommu *fp = tx->fp;
    const mode_t_ *m = ctx->gs;
    if (!input_in_range(m, gpa, 0)) return FALL_AT;
    int write = access == FP_WRITE, err = 0;
    int32_t i = tlb_lookup(tx, FP_GTLB, ctx->gscid, 0, gpa, &err);
    if (err) return FALL_AT;
    const uint64_t *e = i >= 0 ? fp->c[FP_GTLB].n[i].v : NULL;
    if (e && g_stage_permits((unsigned)e[T_GS], access) &&
        !needs_ad_update((unsigned)e[T_GS], write)) {
        tx->stats[FP_HIT_GTLB]++;
        leaf->out_base = e[T_OUT];
        leaf->size = e[T_SIZE];
        leaf->flags = (unsigned)e[T_GS];
        leaf->pbmt = (unsigned)e[T_PBMT];
    } else {
        if (fp->fctl & 1) return FALL_AT;  /* fctl.BE: big-endian G-stage tables */
        tx->stats[FP_MISS_GTLB]++;
        tx->stats[FP_WALK_GS]++;
        tx->events[8]++;
        if (walk(tx, ctx, m, ctx->gs_root, gpa, 1, access, (ctx->dc[DC_TC] >> 7) & 1,
                 identity_spa, leaf) < 0)
            return FALL_AT;
        uint64_t base = gpa & ~(leaf->size - 1);
        uint64_t v[NV] = {ctx->gscid, NONE, base, leaf->size, leaf->out_base, NONE,
                          leaf->flags, leaf->pbmt, base, 1};
        if (tlb_insert(tx, FP_GTLB, ctx->gscid, 0, v, 0, NULL) < 0) return FALL_AT;
    }
    return add_gleaf(tx, gpa & ~(leaf->size - 1), leaf->size);
}

/* spa_of of RiscvIommu._first_stage: table accesses are implicit G-stage accesses */
static int nested_spa(tx_t *tx, ctx_t *ctx, uint64_t gpa, int write, uint64_t *spa) {
    if (!ctx->gs) {
        *spa = gpa;
        return 0;
    }
    leaf_t leaf;
    if (g_translate(tx, ctx, gpa, write ? FP_WRITE : FP_READ, &leaf) < 0) return FALL_AT;
    *spa = leaf.out_base | (gpa & (leaf.size - 1));
    return 0;
}

static int first_stage(tx_t *tx, ctx_t *ctx, uint64_t iova, leaf_t *leaf) {
    const mode_t_ *m = ctx->fs;
    if (!input_in_range(m, iova, m->pte_size != 4)) return FALL_AT;
    if (ctx->dc[DC_TC] >> 10 & 1) return FALL_AT;  /* SBE: big-endian first-stage tables */
    tx->stats[FP_WALK_FS]++;
    tx->events[7]++;
    return walk(tx, ctx, m, ctx->fs_root, iova, 0, ctx->access, (ctx->dc[DC_TC] >> 8) & 1,
                nested_spa, leaf);
}

/* msi.py */
static int msi_flat(const fp_iommu *fp, const uint64_t *dc) {
    return (dc[DC_MSIPTP] >> 60) == 1 && fp->msi_flat;
}

#define MASK52 ((1ULL << 52) - 1)

static int is_interrupt_file(const uint64_t *dc, uint64_t gpa) {
    uint64_t mask = dc[DC_MSI_MASK] & MASK52, pattern = dc[DC_MSI_PATTERN] & MASK52;
    return ((gpa >> 12) & ~mask) == (pattern & ~mask);
}

static int holds_interrupt_file(uint64_t base, uint64_t size, uint64_t mask,
                                uint64_t pattern) {
    uint64_t span = (size >> 12) - 1;
    return !((((base >> 12) ^ pattern) & ~mask & ~span));
}

static uint64_t unshadowed_size(const uint64_t *dc, uint64_t gpa, uint64_t size) {
    uint64_t mask = dc[DC_MSI_MASK] & MASK52, pattern = dc[DC_MSI_PATTERN] & MASK52;
    uint64_t candidates[2] = {size, 1ULL << 21};
    for (int j = 0; j < 2; j++) {
        uint64_t cand = candidates[j];
        if (cand <= size && !holds_interrupt_file(gpa & ~(cand - 1), cand, mask, pattern))
            return cand;
    }
    return 1ULL << 12;
}

static void result_of_entry(const uint64_t *e, uint64_t iova, uint64_t *out) {
    unsigned fs = e[T_FS] == NONE ? 0xFF : (unsigned)e[T_FS];
    unsigned gs = e[T_GS] == NONE ? 0xFF : (unsigned)e[T_GS];
    unsigned flags = fs & gs;
    uint64_t off = iova & (e[T_SIZE] - 1);
    out[0] = e[T_OUT] | off;
    out[1] = e[T_SIZE];
    out[2] = ((flags & PTE_R) ? 1 : 0) | ((flags & PTE_W) ? 2 : 0) | ((flags & PTE_X) ? 4 : 0) |
             ((e[T_FS] != NONE && (e[T_FS] & PTE_G)) ? 16 : 0);
    out[3] = e[T_PBMT];
    out[4] = e[T_HAS_GPA] ? e[T_GPA] | off : 0;
    out[5] = e[T_HAS_GPA];
}

static void bare_result(uint64_t iova, uint64_t size, uint64_t *out) {
    out[0] = iova;
    out[1] = size;
    out[2] = 1 | 2 | 4;
    out[3] = 0;
    out[4] = 0;
    out[5] = 0;
}

static int entry_permits(const ctx_t *ctx, const uint64_t *e) {
    int write = ctx->access == FP_WRITE;
    if (e[T_FS] != NONE) {
        unsigned fs = (unsigned)e[T_FS];
        if (!first_stage_permits(fs, ctx->access, ctx->privileged, ctx->sum) ||
            needs_ad_update(fs, write))
            return 0;
    }
    if (e[T_GS] == NONE) return 1;
    unsigned gs = (unsigned)e[T_GS];
    return g_stage_permits(gs, ctx->access) && !needs_ad_update(gs, write);
}

static int walk_and_fill(tx_t *tx, ctx_t *ctx, uint64_t iova, uint64_t *out) {
    fp_iommu *fp = tx->fp;
    leaf_t fs_leaf = {0}, gs_leaf = {0};
    int has_fs = ctx->fs != NULL, has_gs = ctx->gs != NULL;
    if (has_fs && first_stage(tx, ctx, iova, &fs_leaf) < 0) return FALL_AT;
    uint64_t gpa = has_fs ? fs_leaf.out_base | (iova & (fs_leaf.size - 1)) : iova;
    if (msi_flat(fp, ctx->dc) && is_interrupt_file(ctx->dc, gpa)) return FALL_AT;
    if (has_gs && g_translate(tx, ctx, gpa, ctx->access, &gs_leaf) < 0) return FALL_AT;
    uint64_t spa = has_gs ? gs_leaf.out_base | (gpa & (gs_leaf.size - 1)) : gpa;
    uint64_t size = has_fs ? fs_leaf.size : gs_leaf.size;
    if (has_fs && has_gs && gs_leaf.size < size) size = gs_leaf.size;
    if (msi_flat(fp, ctx->dc)) size = unshadowed_size(ctx->dc, gpa, size);
    uint64_t off = iova & (size - 1);
    unsigned pbmt = has_fs && fs_leaf.pbmt ? fs_leaf.pbmt : (has_gs ? gs_leaf.pbmt : 0);
    uint64_t v[NV] = {ctx->gscid, ctx->pscid, iova - off, size, spa - off,
                      has_fs ? fs_leaf.flags : NONE, has_gs ? gs_leaf.flags : NONE, pbmt,
                      has_gs ? gpa - off : 0, (uint64_t)has_gs};
    if (tlb_insert(tx, FP_IOTLB, ctx->gscid, ctx->pscid, v, tx->ngl, tx->gl) < 0) return FALL_AT;
    result_of_entry(v, iova, out);
    return 0;
}

static int two_stage(tx_t *tx, ctx_t *ctx, uint64_t iova, uint64_t *out) {
    fp_iommu *fp = tx->fp;
    const uint64_t *dc = ctx->dc;
    if (!ctx->fs && !ctx->gs) {
        uint64_t size = 1ULL << 30;
        if (msi_flat(fp, dc)) {
            if (is_interrupt_file(dc, iova)) return FALL_AT;
            size = unshadowed_size(dc, iova, size);
        }
        bare_result(iova, size, out);
        return 0;
    }
    int err = 0;
    int32_t i = tlb_lookup(tx, FP_IOTLB, ctx->gscid, ctx->pscid, iova, &err);
    if (err) return FALL_AT;
    if (i >= 0) {
        const uint64_t *e = fp->c[FP_IOTLB].n[i].v;
        if (entry_permits(ctx, e)) {
            if (!msi_flat(fp, dc)) {
                tx->stats[FP_HIT_IOTLB]++;
                result_of_entry(e, iova, out);
                return 0;
            }
            uint64_t off = iova & (e[T_SIZE] - 1);
            uint64_t gpa = (e[T_HAS_GPA] ? e[T_GPA] : e[T_OUT]) | off;
            if (!is_interrupt_file(dc, gpa)) {
                tx->stats[FP_HIT_IOTLB]++;
                result_of_entry(e, iova, out);
                out[1] = unshadowed_size(dc, gpa, e[T_SIZE]);
                return 0;
            }
        }
    }
    tx->stats[FP_MISS_IOTLB]++;
    tx->events[4]++;
    return walk_and_fill(tx, ctx, iova, out);
}

static int device_id_fits(const fp_iommu *fp, uint64_t did, int mode) {
    int b0 = fp->msi_flat ? 6 : 7, b1 = 9, b2 = fp->msi_flat ? 9 : 8;
    int width = mode == 2 ? b0 : mode == 3 ? b0 + b1 : b0 + b1 + b2;
    return did < (1ULL << width);
}

static int pid_bits(uint64_t pdtp_mode) {
    return pdtp_mode == 1 ? 8 : pdtp_mode == 2 ? 17 : pdtp_mode == 3 ? 20 : -1;
}

static int set_first_stage(ctx_t *ctx, uint64_t atp, uint64_t pscid, int sxl) {
    uint64_t mode = atp >> 60;
    if (mode == 0) return 0;
    ctx->fs = first_stage_mode(sxl, mode);
    if (!ctx->fs) return FALL;
    ctx->fs_root = (atp & PPN_MASK) << 12;
    ctx->pscid = pscid;
    return 0;
}

/* RiscvIommu.translate for an Untranslated request */
static int tx_translate(tx_t *tx, uint64_t did, int64_t pid, uint64_t iova, int access,
                        int priv, uint64_t *out) {
    fp_iommu *fp = tx->fp;
    tx->did = did;
    tx->events[1]++;
    int mode = fp->ddtp & 0xF;
    if (mode == 1) {
        bare_result(iova, 1ULL << 30, out);
        return 0;
    }
    if (mode < 2 || mode > 4 || !device_id_fits(fp, did, mode)) return FALL_AT;
    int err = 0;
    uint64_t dkey[4] = {did, 0, 0, 0};
    int32_t di = lru_lookup(tx, FP_DDT, dkey, &err);
    if (di < 0 || err) return FALL_AT;
    tx->stats[FP_HIT_DDT]++;
    const uint64_t *dc = fp->c[FP_DDT].n[di].v;
    uint64_t tc = dc[DC_TC];
    int pdtv = tc >> 5 & 1, dpe = tc >> 9 & 1, sxl = tc >> 11 & 1;
    uint64_t fsc_mode = dc[DC_FSC] >> 60;
    /* _check_transaction */
    if (pid >= 0 && !pdtv) return FALL_AT;
    if (pid >= 0 && fsc_mode != 0) {
        int bits = pid_bits(fsc_mode);
        if (bits < 0 || (uint64_t)pid >= (1ULL << bits)) return FALL_AT;
    }
    /* _stage_context */
    ctx_t ctx = {0};
    ctx.device_id = did;
    ctx.process_id = pid;
    ctx.access = access;
    ctx.privileged = priv && pid >= 0;
    ctx.dc = dc;
    ctx.gscid = ctx.pscid = NONE;
    uint64_t gmode = dc[DC_IOHGATP] >> 60;
    if (gmode != 0) {
        ctx.gs = g_stage_mode((fp->fctl >> 2) & 1, gmode);
        if (!ctx.gs) return FALL_AT;
        ctx.gs_root = (dc[DC_IOHGATP] & PPN_MASK) << 12;
        ctx.gscid = dc[DC_IOHGATP] >> 44 & 0xFFFF;
    }
    if (!pdtv) {
        if (set_first_stage(&ctx, dc[DC_FSC], dc[DC_TA] >> 12 & 0xFFFFF, sxl) < 0) return FALL_AT;
    } else {
        int64_t pid2 = pid >= 0 ? pid : (dpe ? 0 : -1);
        if (pid2 >= 0 && fsc_mode != 0) {
            uint64_t pkey[4] = {did, (uint64_t)pid2, 0, 0};
            int32_t pi = lru_lookup(tx, FP_PDT, pkey, &err);
            if (pi < 0 || err) return FALL_AT;
            tx->stats[FP_HIT_PDT]++;
            const uint64_t *pc = fp->c[FP_PDT].n[pi].v;
            if (ctx.privileged && !(pc[0] >> 1 & 1)) return FALL_AT;
            ctx.sum = pc[0] >> 2 & 1;
            if (set_first_stage(&ctx, pc[1], pc[0] >> 12 & 0xFFFFF, sxl) < 0) return FALL_AT;
        }
    }
    return two_stage(tx, &ctx, iova, out);
}

/* one translation, committed or rolled back; FP_OK or FP_FALLBACK */
static int translate_one(fp_iommu *fp, tx_t *tx, uint64_t did, int64_t pid, uint64_t iova,
                         int access, int priv, uint64_t *out) {
    tx_begin(tx, fp);
    if (tx_translate(tx, did, pid, iova, access, priv, out) < 0 ||
        (tx_run_cas(tx) < 0 && (fp->fallback_line = __LINE__))) {
        tx_abort(tx);
        return FP_FALLBACK;
    }
    tx_commit(tx);
    return FP_OK;
}

/* ---- public interface ------------------------------------------------------------ */
int fp_abi(void) { return FP_ABI; }

fp_iommu *fp_new(void) {
    fp_iommu *fp = calloc(1, sizeof(*fp));
    if (!fp) return NULL;
    pthread_mutex_init(&fp->lock, NULL);
    for (int k = 0; k < 4; k++) {
        fp->c[k].tlb = k >= FP_IOTLB;
        cache_clear(&fp->c[k]);
    }
    fp->pas = 56;
    return fp;
}

void fp_free(fp_iommu *fp) {
    if (!fp) return;
    for (int k = 0; k < 4; k++) cache_clear(&fp->c[k]);
    free(fp->regions);
    free(fp->dev);
    pthread_mutex_destroy(&fp->lock);
    free(fp);
}

#define LOCKED(fp) pthread_mutex_lock(&(fp)->lock)
#define UNLOCK(fp) pthread_mutex_unlock(&(fp)->lock)

void fp_configure(fp_iommu *fp, int pas, int svpbmt, int msi_flat) {
    LOCKED(fp);
    fp->pas = pas;
    fp->svpbmt = svpbmt;
    fp->msi_flat = msi_flat;
    UNLOCK(fp);
}

void fp_set_regs(fp_iommu *fp, uint64_t ddtp, uint64_t fctl) {
    LOCKED(fp);
    fp->ddtp = ddtp;
    fp->fctl = fctl;
    UNLOCK(fp);
}

int fp_set_regions(fp_iommu *fp, int n, const uint64_t *gpa, const uint64_t *size,
                   char **host, const int *writable) {
    region_t *r = n ? malloc(sizeof(region_t) * n) : NULL;
    if (n && !r) return -1;
    for (int j = 0; j < n; j++) {
        r[j].gpa = gpa[j];
        r[j].size = size[j];
        r[j].host = (unsigned char *)host[j];
        r[j].writable = writable[j];
    }
    LOCKED(fp);
    free(fp->regions);
    fp->regions = r;
    fp->nregions = n;
    UNLOCK(fp);
    return 0;
}

void fp_cache_reset(fp_iommu *fp, int k, int64_t limit) {
    LOCKED(fp);
    cache_clear(&fp->c[k]);
    fp->c[k].limit = limit;
    UNLOCK(fp);
}

void fp_cache_set_limit(fp_iommu *fp, int k, int64_t limit) {
    LOCKED(fp);
    fp->c[k].limit = limit;
    UNLOCK(fp);
}

/* OrderedDict.__setitem__: a new key goes last, an existing one keeps its place */
int fp_cache_set(fp_iommu *fp, int k, const uint64_t *key, const uint64_t *value) {
    int rc = FP_OK;
    LOCKED(fp);
    cache_t *c = &fp->c[k];
    if (fp->pending) {
        rc = FP_PENDING;
    } else {
        int32_t i = c_find(c, key);
        if (i < 0) {
            i = c_alloc(c);
            if (i < 0) {
                rc = FP_NOTFOUND;
                goto out;
            }
            memcpy(c->n[i].key, key, 4 * sizeof(uint64_t));
            c_link_after(c, i, c->tail);
            c_hash_add(c, i);
            if (c->tlb) shift_inc(c, (int)key[2]);
        }
        memcpy(c->n[i].v, value, NV * sizeof(uint64_t));
        c->n[i].ngl = 0;
        c->n[i].py_key = 1;
        c->n[i].dirty = 0;
        c->n[i].seq = fp->flush_seq;
    }
out:
    UNLOCK(fp);
    return rc;
}

int fp_cache_del(fp_iommu *fp, int k, const uint64_t *key) {
    int rc = FP_OK;
    LOCKED(fp);
    cache_t *c = &fp->c[k];
    if (fp->pending) {
        rc = FP_PENDING;
    } else {
        int32_t i = c_find(c, key);
        if (i < 0) {
            rc = FP_NOTFOUND;
        } else {
            c_remove_node(c, i);
            c_free_node(c, i);
        }
    }
    UNLOCK(fp);
    return rc;
}

int fp_cache_move(fp_iommu *fp, int k, const uint64_t *key, int last) {
    int rc = FP_OK;
    LOCKED(fp);
    cache_t *c = &fp->c[k];
    if (fp->pending) {
        rc = FP_PENDING;
    } else {
        int32_t i = c_find(c, key);
        if (i < 0) {
            rc = FP_NOTFOUND;
        } else {
            c_unlink(c, i);
            c_link_after(c, i, last ? c->tail : -1);
        }
    }
    UNLOCK(fp);
    return rc;
}

int fp_cache_popitem(fp_iommu *fp, int k, int last) {
    int rc = FP_OK;
    LOCKED(fp);
    cache_t *c = &fp->c[k];
    if (fp->pending) {
        rc = FP_PENDING;
    } else {
        int32_t i = last ? c->tail : c->head;
        if (i < 0) {
            rc = FP_NOTFOUND;
        } else {
            c_remove_node(c, i);
            c_free_node(c, i);
        }
    }
    UNLOCK(fp);
    return rc;
}

int fp_cache_clear(fp_iommu *fp, int k) {
    int rc = FP_OK;
    LOCKED(fp);
    if (fp->pending) rc = FP_PENDING;
    else cache_clear(&fp->c[k]);
    UNLOCK(fp);
    return rc;
}

int fp_cache_len(fp_iommu *fp, int k) {
    LOCKED(fp);
    int n = (int)fp->c[k].len;
    UNLOCK(fp);
    return n;
}

/* resync: Tlb.shifts' order (counts are derived from the keys) */
int fp_cache_set_shifts(fp_iommu *fp, int k, int n, const int *shifts) {
    LOCKED(fp);
    cache_t *c = &fp->c[k];
    int64_t count[MAXSHIFT];
    int order[MAXSHIFT];
    int rc = n <= MAXSHIFT ? FP_OK : FP_NOTFOUND;
    for (int j = 0; j < n && rc == FP_OK; j++) {
        order[j] = shifts[j];
        count[j] = 0;
        for (int m = 0; m < c->nshift; m++)
            if (c->shift[m] == shifts[j]) count[j] = c->scount[m];
        if (!count[j]) rc = FP_NOTFOUND;
    }
    if (rc == FP_OK && n == c->nshift) {
        memcpy(c->shift, order, sizeof(int) * n);
        memcpy(c->scount, count, sizeof(int64_t) * n);
    } else {
        rc = FP_NOTFOUND;
    }
    UNLOCK(fp);
    return rc;
}

int fp_cache_shifts(fp_iommu *fp, int k, int *shift, int64_t *count, int max) {
    LOCKED(fp);
    cache_t *c = &fp->c[k];
    int n = c->nshift < max ? c->nshift : max;
    memcpy(shift, c->shift, sizeof(int) * n);
    memcpy(count, c->scount, sizeof(int64_t) * n);
    UNLOCK(fp);
    return n;
}

int fp_pending(fp_iommu *fp) { return fp->pending; }

int fp_fallback_line(fp_iommu *fp) { return fp->fallback_line; }

/* the suffix of the LRU list C touched since the last flush (touched nodes are always a
 * suffix: a touch moves a node last, and Python-side changes need a flush first) */
static int32_t touched_start(const fp_iommu *fp, const cache_t *c, int64_t *count) {
    int64_t n = 0;
    int32_t i = c->tail, first = -1;
    while (i >= 0 && c->n[i].seq > fp->flush_seq) {
        first = i;
        n++;
        i = c->n[i].prev;
    }
    *count = n;
    return first;
}

static int64_t flush_words(const fp_iommu *fp) {
    int64_t words = FP_NSTAT + FP_NEVENT + 1 + (1 + FP_NDEV) * (int64_t)fp->ndev;
    for (int k = 0; k < 4; k++) {
        int64_t n;
        touched_start(fp, &fp->c[k], &n);
        words += 3 + 4 * (int64_t)fp->c[k].nremoved + FP_RECORD * n + 2 * fp->c[k].nshift;
    }
    return words;
}

/* Export what C did since the last flush and mark it flushed, atomically:
 *   stats[FP_NSTAT], events[FP_NEVENT], ndev, (did, counters[FP_NDEV]) per device,
 *   then per cache: nremoved, keys[4 * nremoved],
 *   ntouched, records[FP_RECORD * ntouched] (LRU order), nshift, (shift, count) pairs.
 * A record: key[4], dirty, value[NV], ngl, gl[2 * MAXGL], zero padding.
 * Returns the words written, or minus the words needed when capacity is too small. */
int64_t fp_flush(fp_iommu *fp, uint64_t *out, int64_t capacity) {
    LOCKED(fp);
    int64_t need = flush_words(fp);
    if (need > capacity) {
        UNLOCK(fp);
        return -need;
    }
    uint64_t *w = out;
    memcpy(w, fp->stats, sizeof(fp->stats));
    w += FP_NSTAT;
    memcpy(w, fp->events, sizeof(fp->events));
    w += FP_NEVENT;
    memset(fp->stats, 0, sizeof(fp->stats));
    memset(fp->events, 0, sizeof(fp->events));
    *w++ = (uint64_t)fp->ndev;
    for (int32_t j = 0; j < fp->ndev; j++) {
        *w++ = fp->dev[j].did;
        memcpy(w, fp->dev[j].v, sizeof(uint64_t) * FP_NDEV);
        w += FP_NDEV;
    }
    fp->ndev = 0;
    for (int k = 0; k < 4; k++) {
        cache_t *c = &fp->c[k];
        *w++ = (uint64_t)c->nremoved;
        memcpy(w, c->removed, sizeof(uint64_t) * 4 * c->nremoved);
        w += 4 * c->nremoved;
        c->nremoved = 0;
        int64_t n;
        int32_t i = touched_start(fp, c, &n);
        *w++ = (uint64_t)n;
        for (; i >= 0; i = c->n[i].next) {
            node_t *nd = &c->n[i];
            memset(w, 0, sizeof(uint64_t) * FP_RECORD);
            memcpy(w, nd->key, 4 * sizeof(uint64_t));
            w[4] = nd->dirty;
            memcpy(w + 5, nd->v, NV * sizeof(uint64_t));
            w[15] = (uint64_t)nd->ngl;
            memcpy(w + 16, nd->gl, sizeof(uint64_t) * 2 * nd->ngl);
            w += FP_RECORD;
            nd->py_key = 1;
            nd->dirty = 0;
        }
        *w++ = (uint64_t)c->nshift;
        for (int j = 0; j < c->nshift; j++) {
            *w++ = (uint64_t)c->shift[j];
            *w++ = (uint64_t)c->scount[j];
        }
    }
    fp->flush_seq = fp->seq;
    fp->pending = 0;
    UNLOCK(fp);
    return w - out;
}

int fp_translate(fp_iommu *fp, uint64_t did, int64_t pid, uint64_t iova, int access,
                 int priv, uint64_t *out) {
    tx_t tx;
    LOCKED(fp);
    int rc = translate_one(fp, &tx, did, pid, iova, access, priv, out);
    UNLOCK(fp);
    return rc;
}

int fp_translate_repeat(fp_iommu *fp, uint64_t did, int64_t pid, uint64_t iova, int access,
                        int priv, int64_t n, uint64_t *out) {
    tx_t tx;
    int rc = FP_OK;
    for (int64_t j = 0; j < n && rc == FP_OK; j++) {
        LOCKED(fp);
        rc = translate_one(fp, &tx, did, pid, iova, access, priv, out);
        UNLOCK(fp);
    }
    return rc;
}

/* DmaView.read_pieces/write_pieces, when every piece is RAM we may read or write */
static int copy_pieces(const fp_iommu *fp, const uint64_t *pieces, int64_t np, void *buf,
                       int write) {
    for (int64_t j = 0; j < np; j++) {
        const region_t *r = find_region(fp, pieces[2 * j], pieces[2 * j + 1]);
        if (!r || (write && !r->writable)) return FP_DMA_COPY_PY;
    }
    unsigned char *p = (unsigned char *)buf;
    for (int64_t j = 0; j < np; j++) {
        const region_t *r = find_region(fp, pieces[2 * j], pieces[2 * j + 1]);
        unsigned char *host = r->host + (pieces[2 * j] - r->gpa);
        uint64_t n = pieces[2 * j + 1];
        if (write) memcpy(host, p, n); else memcpy(p, host, n);
        p += n;
    }
    return FP_DMA_DONE;
}

/* IommuDmaView.pieces + DmaView.read_as/write_as: one translation per page, all of them
 * before any byte moves; then the copy, if every piece is writable/readable RAM */
int fp_dma(fp_iommu *fp, uint64_t did, int64_t pid, int priv, int access, uint64_t addr,
           uint64_t len, void *buf, uint64_t *pieces, int64_t max_pieces,
           uint64_t *stop) {
    tx_t tx;
    uint64_t out[FP_RESULT];
    int64_t np = 0;
    int rc = FP_DMA_DONE;
    int translate_only = access & FP_TRANSLATE_ONLY;
    access &= ~FP_TRANSLATE_ONLY;
    stop[0] = addr;
    stop[1] = 0;
    if (len == 0 || addr + len < addr) return FP_DMA_REFUSED;
    LOCKED(fp);
    /* IommuDmaView.pieces counts the request before translating anything */
    uint64_t *d = dev_counters(fp, did);
    if (!d) {
        UNLOCK(fp);
        return FP_DMA_REFUSED;
    }
    int write = access == FP_WRITE;
    d[write ? FP_DEV_WRITES : FP_DEV_READS]++;
    d[write ? FP_DEV_BYTES_WRITTEN : FP_DEV_BYTES_READ] += len;
    fp->pending = 1;
    uint64_t a = addr, end = addr + len;
    while (a < end) {
        if (np == max_pieces ||
            translate_one(fp, &tx, did, pid, a, access, priv, out) != FP_OK) {
            rc = FP_DMA_TRANSLATE_PY;
            break;
        }
        uint64_t size = out[1];
        uint64_t n = size - (a & (size - 1));
        if (n > end - a) n = end - a;
        pieces[2 * np] = out[0];
        pieces[2 * np + 1] = n;
        np++;
        a += n;
    }
    stop[0] = a;
    stop[1] = (uint64_t)np;
    if (rc == FP_DMA_DONE) {
        /* d may have moved: dev_counters of a translation's commit can realloc */
        d = dev_counters(fp, did);
        if (d) d[FP_DEV_TRANSLATIONS] += (uint64_t)np;
        if (!translate_only) rc = copy_pieces(fp, pieces, np, buf, access == FP_WRITE);
    }
    UNLOCK(fp);
    return rc;
}

/* ---- per-view entry points (FastDmaView) ----------------------------------------- */
fp_view *fp_view_new(fp_iommu *fp, uint64_t did, int64_t pid, int priv, int exec) {
    fp_view *v = calloc(1, sizeof(*v));
    if (!v) return NULL;
    v->fp = fp;
    v->device_id = did;
    v->process_id = pid;
    v->privileged = priv;
    v->execute = exec;
    return v;
}

void fp_view_free(fp_view *v) {
    if (!v) return;
    free(v->pieces);
    free(v);
}

static int view_room(fp_view *v, uint64_t len) {
    int64_t need = (int64_t)(len >> 12) + 2;
    if (need <= v->capacity) return 0;
    uint64_t *p = realloc(v->pieces, sizeof(uint64_t) * 2 * need);
    if (!p) return -1;
    v->pieces = p;
    v->capacity = need;
    return 0;
}

int fp_view_dma(fp_view *v, uint64_t addr, uint64_t len, int access, void *buf) {
    uint64_t stop[2];
    if (view_room(v, len) < 0) return v->status = FP_DMA_REFUSED;
    int rc = fp_dma(v->fp, v->device_id, v->process_id, v->privileged, access, addr, len, buf,
                    v->pieces, v->capacity, stop);
    v->stop = stop[0];
    v->npieces = (int64_t)stop[1];
    return v->status = rc;
}

uint64_t fp_view_read_int(fp_view *v, uint64_t addr, int size) {
    uint64_t value = 0;
    if (size < 1 || size > 8) {
        v->status = FP_DMA_REFUSED;
        return FP_AGAIN;
    }
    int rc = fp_view_dma(v, addr, (uint64_t)size, v->execute ? FP_EXEC : FP_READ, &value);
    if (rc != FP_DMA_DONE) return FP_AGAIN;
    if (size < 8) value &= (1ULL << (8 * size)) - 1;
    return value;
}

int fp_view_write_int(fp_view *v, uint64_t addr, int size, uint64_t value) {
    if (size < 1 || size > 8) return v->status = FP_DMA_REFUSED;
    return fp_view_dma(v, addr, (uint64_t)size, FP_WRITE, &value);
}
