/*
 * flexkv_core.native._index.IndexCore: the per-block state transitions of the prefix index, in C.
 *
 * The index (flexkv_core/index.py, read its docstring first) keeps one row per block in numpy arrays it owns
 * and hands to this core: hash, parent row, per tier (CPU, SSD) state / slot / pins / children held, hits and
 * the policy key (k1, k2). The core adds what numpy cannot do in a few vector operations:
 *
 *   map    block hash (uint64) -> row. Open addressing, linear probing, a table of row + 1 (0 = empty):
 *          4 bytes per bucket at load <= 0.7; the key of a bucket is read from the rows' hash array.
 *          Deletion shifts later entries back (no tombstones). calloc'ed: untouched pages cost nothing.
 *   heaps  per tier, an indexed binary min-heap holding exactly the evictable copies (READY, unpinned, no
 *          child held in that tier), ordered by (k1[row], k2[row], row). Every change of evictability adds,
 *          discards or re-sorts a row in O(log n).
 *   rows   a stack of freed rows (reused first) above which rows were never used.
 *
 * Every method takes a batch and validates all of it before changing anything, so an error leaves the
 * index as it was. Nothing releases the GIL: callers serialise access (the cache's lock).
 * Portable C11, no numpy C API (arrays are read through the buffer protocol).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#endif

#define NT 2 /* tiers: 0 = CPU, 1 = SSD */
enum { ABSENT = 0, FILLING = 1, READY = 2 };
enum { LRU, LFU, FIFO, MRU, FILO, SLRU };
static const char *POLICY_NAMES[] = {"lru", "lfu", "fifo", "mru", "filo", "slru", NULL};
static const char *TIER_NAMES[] = {"CPU", "SSD"};
#define NO_ROW (-1)
#define FREE_ROW (-2) /* parent[] of a row on the free stack */

/* ------------------------------------------------------------------------------------ batch arguments */

/* A batch of integers: a list/tuple/range of ints, or a contiguous buffer of 4- or 8-byte integers. */
typedef struct {
    PyObject *seq;
    Py_buffer buf;
    int has_buf;
    int is_unsigned;
    Py_ssize_t n;
} Ints;

static int
ints_open(PyObject *obj, Ints *a, const char *what)
{
    memset(a, 0, sizeof(*a));
    if (PyObject_CheckBuffer(obj)) {
        if (PyObject_GetBuffer(obj, &a->buf, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
            return -1;
        }
        a->has_buf = 1;
        const char *f = a->buf.format ? a->buf.format : "B";
        if (*f == '<' || *f == '=' || *f == '@') {
            f++;
        }
        if ((a->buf.itemsize != 4 && a->buf.itemsize != 8) || f[0] == '\0' || f[1] != '\0'
            || strchr("iIlLqQnN", f[0]) == NULL) {
            PyErr_Format(PyExc_TypeError, "%s must be an array of 4- or 8-byte integers, got format '%s'",
                         what, a->buf.format ? a->buf.format : "B");
            PyBuffer_Release(&a->buf);
            a->has_buf = 0;
            return -1;
        }
        a->is_unsigned = strchr("ILQN", f[0]) != NULL;
        a->n = a->buf.len / a->buf.itemsize;
        return 0;
    }
    a->seq = PySequence_Fast(obj, what);
    if (a->seq == NULL) {
        return -1;
    }
    a->n = PySequence_Fast_GET_SIZE(a->seq);
    return 0;
}

static void
ints_close(Ints *a)
{
    if (a->has_buf) {
        PyBuffer_Release(&a->buf);
    }
    Py_XDECREF(a->seq);
}

/* Item i as uint64 (block hashes: ints in [0, 2**64)). */
static int
ints_u64(Ints *a, Py_ssize_t i, uint64_t *out)
{
    if (a->has_buf) {
        if (a->buf.itemsize == 8) {
            *out = ((const uint64_t *)a->buf.buf)[i];
        } else {
            *out = a->is_unsigned ? ((const uint32_t *)a->buf.buf)[i] : (uint64_t)((const int32_t *)a->buf.buf)[i];
        }
        return 0;
    }
    PyObject *item = PySequence_Fast_GET_ITEM(a->seq, i);
    uint64_t v;
    if (PyLong_CheckExact(item)) {
        v = PyLong_AsUnsignedLongLong(item);
    } else {
        PyObject *idx = PyNumber_Index(item); /* numpy integer scalars */
        if (idx == NULL) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "block hash %R is not an int", item);
            return -1;
        }
        v = PyLong_AsUnsignedLongLong(idx);
        Py_DECREF(idx);
    }
    if (v == (uint64_t)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "block hash %R is not an int in [0, 2**64)", item);
        return -1;
    }
    *out = v;
    return 0;
}

/* Item i as a signed integer (rows, slots). */
static int
ints_i64(Ints *a, Py_ssize_t i, int64_t *out)
{
    if (a->has_buf) {
        *out = a->buf.itemsize == 8 ? ((const int64_t *)a->buf.buf)[i] : ((const int32_t *)a->buf.buf)[i];
        return 0;
    }
    PyObject *item = PySequence_Fast_GET_ITEM(a->seq, i);
    long long v = PyLong_AsLongLong(item);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    *out = v;
    return 0;
}

static int
out_open(PyObject *obj, Py_buffer *view, Py_ssize_t need, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        return -1;
    }
    if (view->itemsize != 4 || view->len / 4 < need) {
        PyErr_Format(PyExc_ValueError, "%s must be a writable int32 array of at least %zd entries", what, need);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int
tier_arg(int tier)
{
    if (tier < 0 || tier >= NT) {
        PyErr_Format(PyExc_ValueError, "tier index %d is not 0 (CPU) or 1 (SSD)", tier);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ the core */

typedef struct {
    int32_t *heap; /* rows in heap order */
    int32_t *pos;  /* per row: heap index + 1; 0 = not in the heap */
    Py_ssize_t size;
} Heap;

typedef struct {
    PyObject_HEAD
    Py_ssize_t rows;
    Py_buffer views[13];
    int nviews;
    uint64_t *hash;
    int32_t *parent;
    uint8_t *state[NT];
    int32_t *slot[NT];
    int32_t *pins[NT];
    int32_t *kids[NT];
    uint32_t *hits;
    double *k1, *k2;
    /* map */
    int32_t *table;
    uint64_t mask;
    Py_ssize_t mapped;
    /* eviction */
    Heap heap[NT];
    /* rows */
    uint8_t *mark; /* scratch: finds a row repeated within one batch */
    int32_t *free_rows;
    Py_ssize_t nfree, hwm;
    /* counters */
    Py_ssize_t capacity[NT], used[NT], ready[NT], pinned[NT], blocks;
    int policy;
    double reward;
} Core;

static inline uint64_t
mix64(uint64_t x)
{
    /* splitmix64's finaliser: spreads sequential or structured keys over the table */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static void
err_block(PyObject *type, Core *c, int32_t row, const char *what)
{
    char buf[32];
    snprintf(buf, sizeof(buf), "%#llx", (unsigned long long)c->hash[row]);
    PyErr_Format(type, "block %s %s", buf, what);
}

/* ---- map */

static inline int32_t
map_find(const Core *c, uint64_t key)
{
    uint64_t i = mix64(key) & c->mask;
    for (;;) {
        int32_t e = c->table[i];
        if (e == 0) {
            return NO_ROW;
        }
        if (c->hash[e - 1] == key) {
            return e - 1;
        }
        i = (i + 1) & c->mask;
    }
}

#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(addr) __builtin_prefetch(addr)
#else
#define PREFETCH(addr) ((void)0)
#endif
#define CHUNK 32

/* Rows of keys[off:off+m] (m <= CHUNK) into out. The table and hash reads of a batch are independent:
 * prefetching them all first lets their cache misses overlap instead of paying them one after the other
 * (a lookup of a long chain in a large index is otherwise a cache miss per block). */
static int
find_chunk(const Core *c, Ints *keys, Py_ssize_t off, Py_ssize_t m, int32_t *out)
{
    uint64_t k[CHUNK], b[CHUNK];
    for (Py_ssize_t i = 0; i < m; i++) {
        if (ints_u64(keys, off + i, &k[i]) < 0) {
            return -1;
        }
        b[i] = mix64(k[i]) & c->mask;
        PREFETCH(&c->table[b[i]]);
    }
    for (Py_ssize_t i = 0; i < m; i++) {
        int32_t e = c->table[b[i]];
        if (e) {
            PREFETCH(&c->hash[e - 1]);
        }
    }
    for (Py_ssize_t i = 0; i < m; i++) {
        uint64_t j = b[i];
        int32_t row = NO_ROW;
        for (;;) {
            int32_t e = c->table[j];
            if (e == 0) {
                break;
            }
            if (c->hash[e - 1] == k[i]) {
                row = e - 1;
                break;
            }
            j = (j + 1) & c->mask;
        }
        out[i] = row;
    }
    return 0;
}

static void
map_insert(Core *c, int32_t row)
{
    uint64_t i = mix64(c->hash[row]) & c->mask;
    while (c->table[i] != 0) {
        i = (i + 1) & c->mask;
    }
    c->table[i] = row + 1;
    c->mapped++;
}

static void
map_erase(Core *c, int32_t row)
{
    uint64_t i = mix64(c->hash[row]) & c->mask;
    while (c->table[i] != row + 1) {
        i = (i + 1) & c->mask;
    }
    /* backward-shift deletion (Knuth's algorithm R): keep every later entry reachable */
    uint64_t j = i;
    c->table[i] = 0;
    for (;;) {
        j = (j + 1) & c->mask;
        int32_t e = c->table[j];
        if (e == 0) {
            break;
        }
        uint64_t home = mix64(c->hash[e - 1]) & c->mask;
        int stays = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
        if (!stays) {
            c->table[i] = e;
            c->table[j] = 0;
            i = j;
        }
    }
    c->mapped--;
}

/* ---- heaps */

static inline int
key_less(const Core *c, int32_t a, int32_t b)
{
    if (c->k1[a] != c->k1[b]) {
        return c->k1[a] < c->k1[b];
    }
    if (c->k2[a] != c->k2[b]) {
        return c->k2[a] < c->k2[b];
    }
    return a < b;
}

static inline void
heap_place(Heap *h, Py_ssize_t i, int32_t row)
{
    h->heap[i] = row;
    h->pos[row] = (int32_t)(i + 1);
}

static void
sift_up(const Core *c, Heap *h, Py_ssize_t i)
{
    int32_t row = h->heap[i];
    while (i > 0) {
        Py_ssize_t up = (i - 1) / 2;
        if (!key_less(c, row, h->heap[up])) {
            break;
        }
        heap_place(h, i, h->heap[up]);
        i = up;
    }
    heap_place(h, i, row);
}

static void
sift_down(const Core *c, Heap *h, Py_ssize_t i)
{
    int32_t row = h->heap[i];
    for (;;) {
        Py_ssize_t d = 2 * i + 1;
        if (d >= h->size) {
            break;
        }
        if (d + 1 < h->size && key_less(c, h->heap[d + 1], h->heap[d])) {
            d++;
        }
        if (!key_less(c, h->heap[d], row)) {
            break;
        }
        heap_place(h, i, h->heap[d]);
        i = d;
    }
    heap_place(h, i, row);
}

/* The key of the row at ``i`` changed: move it up or down to where it belongs. */
static void
heap_fix(const Core *c, Heap *h, Py_ssize_t i)
{
    int32_t row = h->heap[i];
    sift_up(c, h, i);
    if (h->pos[row] - 1 == i) {
        sift_down(c, h, i);
    }
}

static void
heap_add(const Core *c, Heap *h, int32_t row)
{
    if (h->pos[row]) {
        heap_fix(c, h, h->pos[row] - 1);
        return;
    }
    heap_place(h, h->size, row);
    h->size++;
    sift_up(c, h, h->size - 1);
}

static void
heap_discard(const Core *c, Heap *h, int32_t row)
{
    Py_ssize_t i = h->pos[row] - 1;
    if (i < 0) {
        return;
    }
    h->pos[row] = 0;
    h->size--;
    if (i == h->size) {
        return;
    }
    heap_place(h, i, h->heap[h->size]);
    heap_fix(c, h, i);
}

/* ---- rows and their relations */

static inline int
held_nowhere(const Core *c, int32_t r)
{
    return c->state[0][r] == ABSENT && c->state[1][r] == ABSENT;
}

static inline int
evictable(const Core *c, int t, int32_t r)
{
    return c->state[t][r] == READY && c->pins[t][r] == 0 && c->kids[t][r] == 0;
}

static void
set_keys(Core *c, int32_t r, double now, int inserted)
{
    switch (c->policy) {
    case LRU: c->k1[r] = now + c->reward * (double)c->hits[r]; c->k2[r] = 0.0; break;
    case LFU: c->k1[r] = (double)c->hits[r]; c->k2[r] = now; break;
    case MRU: c->k1[r] = -now; c->k2[r] = 0.0; break;
    case SLRU: c->k1[r] = c->hits[r] >= 2 ? 1.0 : 0.0; c->k2[r] = now; break;
    case FIFO: if (inserted) { c->k1[r] = now; c->k2[r] = 0.0; } break;
    case FILO: if (inserted) { c->k1[r] = -now; c->k2[r] = 0.0; } break;
    }
}

static int32_t
take_row(Core *c, uint64_t key)
{
    int32_t r = c->nfree > 0 ? c->free_rows[--c->nfree] : (int32_t)c->hwm++;
    c->hash[r] = key;
    c->parent[r] = NO_ROW;
    map_insert(c, r);
    return r;
}

/* A row that holds no copy and counts no child is not needed any more. */
static void
maybe_free(Core *c, int32_t r)
{
    if (c->parent[r] == FREE_ROW || !held_nowhere(c, r)) {
        return;
    }
    for (int t = 0; t < NT; t++) {
        if (c->kids[t][r]) {
            return; /* a ghost: its children still count on it */
        }
    }
    map_erase(c, r);
    c->parent[r] = FREE_ROW;
    c->free_rows[c->nfree++] = r;
}

static void
child_added(Core *c, int t, int32_t p)
{
    if (p >= 0 && c->kids[t][p]++ == 0) {
        heap_discard(c, &c->heap[t], p); /* no longer a leaf in this tier */
    }
}

static void
child_removed(Core *c, int t, int32_t p)
{
    if (p >= 0 && --c->kids[t][p] == 0 && evictable(c, t, p)) {
        heap_add(c, &c->heap[t], p);
    }
}

/* The copy of row r in tier t goes (abort or removal; checked by the caller). Returns its slot. */
static int32_t
drop(Core *c, int t, int32_t r)
{
    int32_t slot = c->slot[t][r];
    c->state[t][r] = ABSENT;
    c->used[t]--;
    heap_discard(c, &c->heap[t], r);
    int32_t p = c->parent[r];
    child_removed(c, t, p);
    if (held_nowhere(c, r)) {
        c->blocks--;
        c->parent[r] = NO_ROW; /* stored again, it is given its parent again */
        maybe_free(c, r);
        if (p >= 0) {
            maybe_free(c, p); /* it may have been a ghost kept for this child alone */
        }
    }
    return slot;
}

/* ---- validation shared by the batch methods */

/* Every row is a live row of the index and none appears twice (a batch is a set of blocks). */
static int
check_rows(Core *c, Ints *rows)
{
    Py_ssize_t i = 0;
    int bad = 0;
    for (; i < rows->n; i++) {
        int64_t r;
        if (ints_i64(rows, i, &r) < 0) {
            bad = 1;
            break;
        }
        if (r < 0 || r >= c->hwm || c->parent[r] == FREE_ROW) {
            PyErr_Format(PyExc_IndexError, "row %lld is not a row of the index", (long long)r);
            bad = 1;
            break;
        }
        if (c->mark[r]) {
            err_block(PyExc_ValueError, c, (int32_t)r, "appears twice in one batch");
            bad = 1;
            break;
        }
        c->mark[r] = 1;
    }
    for (Py_ssize_t j = 0; j < i; j++) {
        int64_t r;
        ints_i64(rows, j, &r);
        c->mark[r] = 0;
    }
    return bad ? -1 : 0;
}

static int
u64_cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* ------------------------------------------------------------------------------------------- methods */

/* The hash table: zeroed, mapped lazily by the OS. Large tables ask for transparent huge pages: a lookup
 * touches one random bucket per block, and with 4 KiB pages each would also miss the TLB. (A large table is
 * fully touched after a few thousand blocks whatever the page size.) */
static int32_t *
table_alloc(size_t bytes)
{
#if defined(MAP_ANONYMOUS) && defined(MADV_HUGEPAGE)
    if (bytes >= (64u << 20)) {
        void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p != MAP_FAILED) {
            madvise(p, bytes, MADV_HUGEPAGE);
            return p;
        }
    }
#endif
    return calloc(bytes / sizeof(int32_t), sizeof(int32_t));
}

static void
table_free(int32_t *table, size_t bytes)
{
#if defined(MAP_ANONYMOUS) && defined(MADV_HUGEPAGE)
    if (bytes >= (64u << 20)) {
        munmap(table, bytes);
        return;
    }
#endif
    free(table);
}

static void
Core_dealloc(Core *self)
{
    if (self->table != NULL) {
        table_free(self->table, (self->mask + 1) * sizeof(int32_t));
    }
    free(self->mark);
    free(self->free_rows);
    for (int t = 0; t < NT; t++) {
        free(self->heap[t].heap);
        free(self->heap[t].pos);
    }
    for (int i = 0; i < self->nviews; i++) {
        PyBuffer_Release(&self->views[i]);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static void *
take_view(Core *self, PyObject *obj, Py_ssize_t itemsize, const char *format, const char *name)
{
    Py_buffer *v = &self->views[self->nviews];
    if (PyObject_GetBuffer(obj, v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        return NULL;
    }
    const char *f = v->format ? v->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') {
        f++;
    }
    if (v->itemsize != itemsize || strchr(format, f[0]) == NULL || f[1] != '\0'
        || v->len / itemsize != self->rows) {
        PyErr_Format(PyExc_TypeError, "%s must be a writable array of %zd %zd-byte items (format %s)", name,
                     self->rows, itemsize, format);
        PyBuffer_Release(v);
        return NULL;
    }
    self->nviews++;
    return v->buf;
}

static int
Core_init(Core *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity_cpu", "capacity_ssd", "policy", "hit_reward", "hash", "parent",
                             "state_cpu", "state_ssd", "slot_cpu", "slot_ssd", "pins_cpu", "pins_ssd",
                             "kids_cpu", "kids_ssd", "hits", "k1", "k2", NULL};
    Py_ssize_t cap0, cap1;
    const char *policy;
    double reward;
    PyObject *a[13];
    if (self->hash != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "IndexCore is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nnsd$OOOOOOOOOOOOO", kwlist, &cap0, &cap1, &policy, &reward,
                                     &a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6], &a[7], &a[8], &a[9],
                                     &a[10], &a[11], &a[12])) {
        return -1;
    }
    self->policy = -1;
    for (int i = 0; POLICY_NAMES[i]; i++) {
        if (strcmp(policy, POLICY_NAMES[i]) == 0) {
            self->policy = i;
        }
    }
    if (self->policy < 0) {
        PyErr_Format(PyExc_ValueError, "unknown eviction policy %s", policy);
        return -1;
    }
    Py_ssize_t n = PyObject_Length(a[0]);
    if (n < 0) {
        return -1;
    }
    self->rows = n;
    const char *U64 = "QLN", *I32 = "il", *U8 = "B", *U32 = "IL", *F64 = "d";
    if (!(self->hash = take_view(self, a[0], 8, U64, "hash")) || !(self->parent = take_view(self, a[1], 4, I32, "parent"))
        || !(self->state[0] = take_view(self, a[2], 1, U8, "state_cpu"))
        || !(self->state[1] = take_view(self, a[3], 1, U8, "state_ssd"))
        || !(self->slot[0] = take_view(self, a[4], 4, I32, "slot_cpu"))
        || !(self->slot[1] = take_view(self, a[5], 4, I32, "slot_ssd"))
        || !(self->pins[0] = take_view(self, a[6], 4, I32, "pins_cpu"))
        || !(self->pins[1] = take_view(self, a[7], 4, I32, "pins_ssd"))
        || !(self->kids[0] = take_view(self, a[8], 4, I32, "kids_cpu"))
        || !(self->kids[1] = take_view(self, a[9], 4, I32, "kids_ssd"))
        || !(self->hits = take_view(self, a[10], 4, U32, "hits")) || !(self->k1 = take_view(self, a[11], 8, F64, "k1"))
        || !(self->k2 = take_view(self, a[12], 8, F64, "k2"))) {
        return -1;
    }
    uint64_t buckets = 16;
    while ((double)buckets * 0.7 < (double)n) {
        buckets <<= 1;
    }
    self->mask = buckets - 1;
    self->table = table_alloc(buckets * sizeof(int32_t));
    self->free_rows = malloc((size_t)(n > 0 ? n : 1) * sizeof(int32_t)); /* touched only as rows are freed */
    self->mark = calloc((size_t)(n > 0 ? n : 1), 1);
    for (int t = 0; t < NT; t++) {
        self->heap[t].heap = malloc((size_t)(n > 0 ? n : 1) * sizeof(int32_t));
        self->heap[t].pos = calloc((size_t)(n > 0 ? n : 1), sizeof(int32_t));
        if (self->heap[t].heap == NULL || self->heap[t].pos == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    if (self->table == NULL || self->free_rows == NULL || self->mark == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->capacity[0] = cap0;
    self->capacity[1] = cap1;
    self->reward = reward;
    return 0;
}

PyDoc_STRVAR(find_doc,
"find(keys, out, prefix=False) -> int\n\nWrite the row of each block hash into ``out`` (int32), -1 where unknown.\n"
"Returns how many leading keys are known; with ``prefix`` it may stop soon after the first unknown one\n"
"(entries past it are then unspecified).");

static PyObject *
Core_find(Core *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"keys", "out", "prefix", NULL};
    PyObject *keys_obj, *out_obj;
    int prefix = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|p", kwlist, &keys_obj, &out_obj, &prefix)) {
        return NULL;
    }
    Ints keys;
    Py_buffer out;
    if (ints_open(keys_obj, &keys, "block hashes") < 0) {
        return NULL;
    }
    if (out_open(out_obj, &out, keys.n, "out") < 0) {
        ints_close(&keys);
        return NULL;
    }
    int32_t *o = out.buf;
    Py_ssize_t leading = -1;
    PyObject *result = NULL;
    for (Py_ssize_t off = 0; off < keys.n && (leading < 0 || !prefix); off += CHUNK) {
        Py_ssize_t m = keys.n - off < CHUNK ? keys.n - off : CHUNK;
        if (find_chunk(self, &keys, off, m, o + off) < 0) {
            goto done;
        }
        for (Py_ssize_t i = off; i < off + m && leading < 0; i++) {
            if (o[i] < 0) {
                leading = i;
            }
        }
    }
    result = PyLong_FromSsize_t(leading < 0 ? keys.n : leading);
done:
    ints_close(&keys);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(lookup_doc,
"lookup(keys) -> (cpu, ssd, total)\n\nLeading blocks READY in CPU, READY on SSD, and READY in either.");

static PyObject *
Core_lookup(Core *self, PyObject *keys_obj)
{
    Ints keys;
    if (ints_open(keys_obj, &keys, "block hashes") < 0) {
        return NULL;
    }
    Py_ssize_t cpu = 0, ssd = 0, total = 0;
    int cpu_run = 1, ssd_run = 1, more = 1;
    int32_t rows[CHUNK];
    for (Py_ssize_t off = 0; off < keys.n && more; off += CHUNK) {
        Py_ssize_t m = keys.n - off < CHUNK ? keys.n - off : CHUNK;
        if (find_chunk(self, &keys, off, m, rows) < 0) {
            ints_close(&keys);
            return NULL;
        }
        for (Py_ssize_t i = 0; i < m; i++) {
            int32_t r = rows[i];
            int in_cpu = r >= 0 && self->state[0][r] == READY, in_ssd = r >= 0 && self->state[1][r] == READY;
            if (!in_cpu && !in_ssd) {
                more = 0;
                break;
            }
            total++;
            cpu_run &= in_cpu;
            ssd_run &= in_ssd;
            cpu += cpu_run;
            ssd += ssd_run;
        }
    }
    ints_close(&keys);
    return Py_BuildValue("nnn", cpu, ssd, total);
}

PyDoc_STRVAR(begin_fill_doc,
"begin_fill(tier, keys, slots, parents, now, out)\n\nABSENT -> FILLING in ``tier`` for each block hash, into\n"
"its slot; unknown blocks get rows. ``parents`` (a sequence of hash or None, one per key, or None) gives\n"
"the parent of blocks no tier holds (unknown parents get ghost rows). Rows go to ``out``.");

static PyObject *
Core_begin_fill(Core *self, PyObject *args)
{
    int t;
    PyObject *keys_obj, *slots_obj, *parents_obj, *out_obj;
    double now;
    if (!PyArg_ParseTuple(args, "iOOOdO", &t, &keys_obj, &slots_obj, &parents_obj, &now, &out_obj)) {
        return NULL;
    }
    if (tier_arg(t) < 0) {
        return NULL;
    }
    Ints keys, slots, parents;
    int have_parents = parents_obj != Py_None;
    Py_buffer out;
    PyObject *result = NULL;
    uint64_t *sorted = NULL;
    memset(&parents, 0, sizeof(parents));
    if (ints_open(keys_obj, &keys, "block hashes") < 0) {
        return NULL;
    }
    if (ints_open(slots_obj, &slots, "slots") < 0) {
        ints_close(&keys);
        return NULL;
    }
    if (have_parents) {
        parents.seq = PySequence_Fast(parents_obj, "parents must be a sequence (of hash or None)");
        if (parents.seq == NULL) {
            goto done_noout;
        }
        parents.n = PySequence_Fast_GET_SIZE(parents.seq);
    }
    if (out_open(out_obj, &out, keys.n, "out") < 0) {
        goto done_noout;
    }
    Py_ssize_t n = keys.n;
    if (slots.n != n || (have_parents && parents.n != n)) {
        PyErr_Format(PyExc_ValueError, "%zd block hashes, %zd slots, %zd parents", n, slots.n, parents.n);
        goto done;
    }
    if (self->used[t] + n > self->capacity[t]) {
        PyErr_Format(PyExc_RuntimeError, "%s tier is full (%zd slots)", TIER_NAMES[t], self->capacity[t]);
        goto done;
    }
    if ((self->rows - self->hwm) + self->nfree < 2 * n) {
        PyErr_Format(PyExc_RuntimeError, "index out of rows (%zd)", self->rows); /* cannot happen: rows = 2 x capacity */
        goto done;
    }
    /* pass 1: validate everything */
    sorted = malloc((size_t)(n > 0 ? n : 1) * (sizeof(uint64_t) + sizeof(int32_t)));
    if (sorted == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int32_t *known = (int32_t *)(sorted + (n > 0 ? n : 1)); /* each key's row before this call, -1: new */
    for (Py_ssize_t off = 0; off < n; off += CHUNK) {
        if (find_chunk(self, &keys, off, n - off < CHUNK ? n - off : CHUNK, known + off) < 0) {
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t key;
        int64_t slot;
        if (ints_u64(&keys, i, &key) < 0 || ints_i64(&slots, i, &slot) < 0) {
            goto done;
        }
        if (slot < 0 || slot >= self->capacity[t]) {
            PyErr_Format(PyExc_ValueError, "slot %lld is outside the %s tier's 0..%zd", (long long)slot,
                         TIER_NAMES[t], self->capacity[t] - 1);
            goto done;
        }
        sorted[i] = key;
        int32_t r = known[i];
        if (r >= 0 && self->state[t][r] != ABSENT) {
            err_block(PyExc_RuntimeError, self, r, t == 0 ? "is already held in CPU" : "is already held in SSD");
            goto done;
        }
        if (r < 0 || held_nowhere(self, r)) {
            if (!have_parents) {
                char buf[32];
                snprintf(buf, sizeof(buf), "%#llx", (unsigned long long)key);
                PyErr_Format(PyExc_ValueError, "block %s is new to the index: its parent is needed", buf);
                goto done;
            }
            PyObject *p = PySequence_Fast_GET_ITEM(parents.seq, i);
            uint64_t pkey;
            if (p != Py_None) {
                Ints one = {.seq = parents.seq, .n = parents.n};
                if (ints_u64(&one, i, &pkey) < 0) {
                    goto done;
                }
            }
        }
    }
    qsort(sorted, (size_t)n, sizeof(uint64_t), u64_cmp);
    for (Py_ssize_t i = 1; i < n; i++) {
        if (sorted[i] == sorted[i - 1]) {
            char buf[32];
            snprintf(buf, sizeof(buf), "%#llx", (unsigned long long)sorted[i]);
            PyErr_Format(PyExc_ValueError, "block %s appears twice in one batch", buf);
            goto done;
        }
    }
    /* pass 2: apply */
    int32_t *o = out.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t key;
        int64_t slot;
        ints_u64(&keys, i, &key);
        ints_i64(&slots, i, &slot);
        int32_t r = known[i] >= 0 ? known[i] : map_find(self, key); /* an earlier key may have made it a parent */
        if (r < 0) {
            r = take_row(self, key);
        }
        if (held_nowhere(self, r)) { /* new, or a ghost stored again */
            self->blocks++;
            self->hits[r] = 0;
            set_keys(self, r, now, 1);
            PyObject *p = have_parents ? PySequence_Fast_GET_ITEM(parents.seq, i) : Py_None;
            if (p != Py_None) {
                uint64_t pkey;
                Ints one = {.seq = parents.seq, .n = parents.n};
                ints_u64(&one, i, &pkey);
                int32_t pr = map_find(self, pkey);
                self->parent[r] = pr >= 0 ? pr : take_row(self, pkey);
            }
        }
        self->state[t][r] = FILLING;
        self->slot[t][r] = (int32_t)slot;
        self->used[t]++;
        child_added(self, t, self->parent[r]);
        o[i] = r;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&out);
done_noout:
    free(sorted);
    Py_XDECREF(parents.seq);
    ints_close(&keys);
    ints_close(&slots);
    return result;
}

/* Shared shape of the row-batch methods: parse (tier, rows[, extra]), validate rows, run. */
typedef int (*row_check_fn)(Core *, int, int32_t);
typedef void (*row_apply_fn)(Core *, int, int32_t, Py_ssize_t, void *);

static PyObject *
row_batch(Core *self, int t, PyObject *rows_obj, row_check_fn check, row_apply_fn apply, void *ctx)
{
    if (tier_arg(t) < 0) {
        return NULL;
    }
    Ints rows;
    if (ints_open(rows_obj, &rows, "rows") < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    if (check_rows(self, &rows) < 0) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < rows.n; i++) {
        int64_t r;
        ints_i64(&rows, i, &r);
        if (check != NULL && check(self, t, (int32_t)r) < 0) {
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < rows.n; i++) {
        int64_t r;
        ints_i64(&rows, i, &r);
        apply(self, t, (int32_t)r, i, ctx);
    }
    result = Py_NewRef(Py_None);
done:
    ints_close(&rows);
    return result;
}

static int
check_absent_held_elsewhere(Core *c, int t, int32_t r)
{
    if (c->state[t][r] != ABSENT) {
        err_block(PyExc_RuntimeError, c, r, t == 0 ? "is already held in CPU" : "is already held in SSD");
        return -1;
    }
    if (held_nowhere(c, r)) {
        err_block(PyExc_RuntimeError, c, r, "is held by no tier: it needs begin_fill (with its parent)");
        return -1;
    }
    return 0;
}

static int
check_filling_unpinned(Core *c, int t, int32_t r)
{
    if (c->state[t][r] != FILLING) {
        err_block(PyExc_RuntimeError, c, r, t == 0 ? "is not filling in CPU" : "is not filling in SSD");
        return -1;
    }
    if (c->pins[t][r]) {
        err_block(PyExc_RuntimeError, c, r, t == 0 ? "is pinned in CPU" : "is pinned in SSD");
        return -1;
    }
    return 0;
}

static int
check_filling(Core *c, int t, int32_t r)
{
    if (c->state[t][r] != FILLING) {
        err_block(PyExc_RuntimeError, c, r, t == 0 ? "is not filling in CPU" : "is not filling in SSD");
        return -1;
    }
    return 0;
}

static int
check_ready_unpinned(Core *c, int t, int32_t r)
{
    if (c->state[t][r] != READY) {
        err_block(PyExc_RuntimeError, c, r, t == 0 ? "is not ready in CPU" : "is not ready in SSD");
        return -1;
    }
    if (c->pins[t][r]) {
        err_block(PyExc_RuntimeError, c, r, t == 0 ? "is pinned in CPU" : "is pinned in SSD");
        return -1;
    }
    return 0;
}

static int
check_held(Core *c, int t, int32_t r)
{
    if (c->state[t][r] == ABSENT) {
        err_block(PyExc_RuntimeError, c, r, t == 0 ? "is not held in CPU" : "is not held in SSD");
        return -1;
    }
    return 0;
}

static int
check_pinned(Core *c, int t, int32_t r)
{
    if (c->pins[t][r] <= 0) {
        err_block(PyExc_RuntimeError, c, r, t == 0 ? "is not pinned in CPU" : "is not pinned in SSD");
        return -1;
    }
    return 0;
}

static void
apply_begin(Core *c, int t, int32_t r, Py_ssize_t i, void *ctx)
{
    int64_t slot;
    ints_i64((Ints *)ctx, i, &slot);
    c->state[t][r] = FILLING;
    c->slot[t][r] = (int32_t)slot;
    c->used[t]++;
    child_added(c, t, c->parent[r]);
}

static void
apply_readd(Core *c, int t, int32_t r, Py_ssize_t i, void *ctx)
{
    if (evictable(c, t, r)) {
        heap_add(c, &c->heap[t], r);
    }
}

static void
apply_finish(Core *c, int t, int32_t r, Py_ssize_t i, void *ctx)
{
    c->state[t][r] = READY;
    c->ready[t]++;
    if (evictable(c, t, r)) {
        heap_add(c, &c->heap[t], r);
    }
}

static void
apply_abort(Core *c, int t, int32_t r, Py_ssize_t i, void *ctx)
{
    ((int32_t *)ctx)[i] = drop(c, t, r);
}

static void
apply_remove(Core *c, int t, int32_t r, Py_ssize_t i, void *ctx)
{
    c->ready[t]--;
    ((int32_t *)ctx)[i] = drop(c, t, r);
}

static void
apply_pin(Core *c, int t, int32_t r, Py_ssize_t i, void *ctx)
{
    if (c->pins[t][r]++ == 0) {
        c->pinned[t]++;
        heap_discard(c, &c->heap[t], r);
    }
}

static void
apply_unpin(Core *c, int t, int32_t r, Py_ssize_t i, void *ctx)
{
    if (--c->pins[t][r] == 0) {
        c->pinned[t]--;
        if (evictable(c, t, r)) {
            heap_add(c, &c->heap[t], r);
        }
    }
}

PyDoc_STRVAR(begin_fill_rows_doc,
"begin_fill_rows(tier, rows, slots)\n\nABSENT -> FILLING in ``tier`` for blocks another tier holds.");

static PyObject *
Core_begin_fill_rows(Core *self, PyObject *args)
{
    int t;
    PyObject *rows_obj, *slots_obj;
    if (!PyArg_ParseTuple(args, "iOO", &t, &rows_obj, &slots_obj)) {
        return NULL;
    }
    Ints slots;
    if (ints_open(slots_obj, &slots, "slots") < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t n = PyObject_Length(rows_obj);
    if (n < 0) {
        goto done;
    }
    if (n != slots.n) {
        PyErr_Format(PyExc_ValueError, "%zd rows, %zd slots", n, slots.n);
        goto done;
    }
    if (tier_arg(t) < 0) {
        goto done;
    }
    if (self->used[t] + n > self->capacity[t]) {
        PyErr_Format(PyExc_RuntimeError, "%s tier is full (%zd slots)", TIER_NAMES[t], self->capacity[t]);
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t s;
        if (ints_i64(&slots, i, &s) < 0) {
            goto done;
        }
        if (s < 0 || s >= self->capacity[t]) {
            PyErr_Format(PyExc_ValueError, "slot %lld is outside the %s tier's 0..%zd", (long long)s,
                         TIER_NAMES[t], self->capacity[t] - 1);
            goto done;
        }
    }
    result = row_batch(self, t, rows_obj, check_absent_held_elsewhere, apply_begin, &slots);
done:
    ints_close(&slots);
    return result;
}

#define ROWS_METHOD(name, check, apply)                                                    \
    static PyObject *Core_##name(Core *self, PyObject *args)                               \
    {                                                                                      \
        int t;                                                                             \
        PyObject *rows_obj;                                                                \
        if (!PyArg_ParseTuple(args, "iO", &t, &rows_obj)) {                                \
            return NULL;                                                                   \
        }                                                                                  \
        return row_batch(self, t, rows_obj, check, apply, NULL);                          \
    }

ROWS_METHOD(finish_fill, check_filling, apply_finish)
ROWS_METHOD(pin, check_held, apply_pin)
ROWS_METHOD(unpin, check_pinned, apply_unpin)
ROWS_METHOD(readd, NULL, apply_readd)

#define DROP_METHOD(name, check, apply)                                                    \
    static PyObject *Core_##name(Core *self, PyObject *args)                               \
    {                                                                                      \
        int t;                                                                             \
        PyObject *rows_obj, *out_obj;                                                      \
        if (!PyArg_ParseTuple(args, "iOO", &t, &rows_obj, &out_obj)) {                     \
            return NULL;                                                                   \
        }                                                                                  \
        Py_ssize_t n = PyObject_Length(rows_obj);                                          \
        if (n < 0) {                                                                       \
            return NULL;                                                                   \
        }                                                                                  \
        Py_buffer out;                                                                     \
        if (out_open(out_obj, &out, n, "out") < 0) {                                       \
            return NULL;                                                                   \
        }                                                                                  \
        PyObject *r = row_batch(self, t, rows_obj, check, apply, out.buf);                 \
        PyBuffer_Release(&out);                                                            \
        return r;                                                                          \
    }

DROP_METHOD(abort_fill, check_filling_unpinned, apply_abort)
DROP_METHOD(remove, check_ready_unpinned, apply_remove)

PyDoc_STRVAR(touch_doc,
"touch(rows, hit, now)\n\nA use of these blocks at ``now``: recency (and, with ``hit``, frequency) for every tier.");

static PyObject *
Core_touch(Core *self, PyObject *args)
{
    PyObject *rows_obj;
    int hit;
    double now;
    if (!PyArg_ParseTuple(args, "Opd", &rows_obj, &hit, &now)) {
        return NULL;
    }
    Ints rows;
    if (ints_open(rows_obj, &rows, "rows") < 0) {
        return NULL;
    }
    if (check_rows(self, &rows) < 0) {
        ints_close(&rows);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < rows.n; i++) {
        int64_t r64;
        ints_i64(&rows, i, &r64);
        int32_t r = (int32_t)r64;
        if (held_nowhere(self, r)) {
            continue;
        }
        self->hits[r] += (uint32_t)hit;
        set_keys(self, r, now, 0);
        for (int t = 0; t < NT; t++) {
            if (self->heap[t].pos[r]) {
                heap_fix(self, &self->heap[t], self->heap[t].pos[r] - 1);
            }
        }
    }
    ints_close(&rows);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(pop_doc,
"pop(tier, out) -> int\n\nTake up to len(out) evictable copies of ``tier`` off its heap, smallest key first.");

static PyObject *
Core_pop(Core *self, PyObject *args)
{
    int t;
    PyObject *out_obj;
    if (!PyArg_ParseTuple(args, "iO", &t, &out_obj) || tier_arg(t) < 0) {
        return NULL;
    }
    Py_buffer out;
    if (out_open(out_obj, &out, 0, "out") < 0) {
        return NULL;
    }
    int32_t *o = out.buf;
    Heap *h = &self->heap[t];
    Py_ssize_t k = 0;
    for (; k < out.len / 4 && h->size > 0; k++) {
        o[k] = h->heap[0];
        heap_discard(self, h, h->heap[0]);
    }
    PyBuffer_Release(&out);
    return PyLong_FromSsize_t(k);
}

PyDoc_STRVAR(counts_doc,
"counts() -> dict\n\nblocks, rows (high-water mark), mapped, and per tier lists used, ready, pinned, evictable.");

static PyObject *
Core_counts(Core *self, PyObject *unused)
{
    return Py_BuildValue("{s:n,s:n,s:n,s:[nn],s:[nn],s:[nn],s:[nn]}", "blocks", self->blocks, "rows", self->hwm,
                         "mapped", self->mapped, "used", self->used[0], self->used[1], "ready", self->ready[0],
                         self->ready[1], "pinned", self->pinned[0], self->pinned[1], "evictable",
                         self->heap[0].size, self->heap[1].size);
}

PyDoc_STRVAR(heap_rows_doc, "heap_rows(tier) -> list\n\nRows in ``tier``'s eviction heap, checked for heap order (tests).");

static PyObject *
Core_heap_rows(Core *self, PyObject *arg)
{
    int t = (int)PyLong_AsLong(arg);
    if ((t == -1 && PyErr_Occurred()) || tier_arg(t) < 0) {
        return NULL;
    }
    Heap *h = &self->heap[t];
    PyObject *list = PyList_New(h->size);
    if (list == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < h->size; i++) {
        if (h->pos[h->heap[i]] != i + 1 || (i > 0 && key_less(self, h->heap[i], h->heap[(i - 1) / 2]))) {
            Py_DECREF(list);
            PyErr_Format(PyExc_AssertionError, "%s eviction heap is broken at %zd", TIER_NAMES[t], i);
            return NULL;
        }
        PyList_SET_ITEM(list, i, PyLong_FromLong(h->heap[i]));
    }
    return list;
}

PyDoc_STRVAR(free_rows_doc, "free_rows() -> list\n\nRows below the high-water mark that are free (tests).");

static PyObject *
Core_free_rows(Core *self, PyObject *unused)
{
    PyObject *list = PyList_New(self->nfree);
    if (list == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < self->nfree; i++) {
        PyList_SET_ITEM(list, i, PyLong_FromLong(self->free_rows[i]));
    }
    return list;
}

static PyObject *
Core_table_bytes(Core *self, void *closure)
{
    return PyLong_FromUnsignedLongLong((self->mask + 1) * sizeof(int32_t));
}

static PyMethodDef Core_methods[] = {
    {"find", (PyCFunction)(void (*)(void))Core_find, METH_VARARGS | METH_KEYWORDS, find_doc},
    {"lookup", (PyCFunction)Core_lookup, METH_O, lookup_doc},
    {"begin_fill", (PyCFunction)Core_begin_fill, METH_VARARGS, begin_fill_doc},
    {"begin_fill_rows", (PyCFunction)Core_begin_fill_rows, METH_VARARGS, begin_fill_rows_doc},
    {"finish_fill", (PyCFunction)Core_finish_fill, METH_VARARGS, "finish_fill(tier, rows): FILLING -> READY."},
    {"abort_fill", (PyCFunction)Core_abort_fill, METH_VARARGS,
     "abort_fill(tier, rows, out): FILLING -> ABSENT (unpinned); slots to out."},
    {"remove", (PyCFunction)Core_remove, METH_VARARGS,
     "remove(tier, rows, out): READY -> ABSENT (unpinned); slots to out."},
    {"pin", (PyCFunction)Core_pin, METH_VARARGS, "pin(tier, rows): one more pin on held copies."},
    {"unpin", (PyCFunction)Core_unpin, METH_VARARGS, "unpin(tier, rows): one pin less."},
    {"touch", (PyCFunction)Core_touch, METH_VARARGS, touch_doc},
    {"readd", (PyCFunction)Core_readd, METH_VARARGS,
     "readd(tier, rows): give back copies taken by pop but kept (those still evictable rejoin the heap)."},
    {"pop", (PyCFunction)Core_pop, METH_VARARGS, pop_doc},
    {"counts", (PyCFunction)Core_counts, METH_NOARGS, counts_doc},
    {"heap_rows", (PyCFunction)Core_heap_rows, METH_O, heap_rows_doc},
    {"free_rows", (PyCFunction)Core_free_rows, METH_NOARGS, free_rows_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Core_getset[] = {
    {"table_bytes", (getter)Core_table_bytes, NULL, "bytes of the hash table (mapped lazily by the OS)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "flexkv_core.native._index.IndexCore",
    .tp_doc = PyDoc_STR("The prefix index's per-block transitions over its numpy arrays (see index.c)."),
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_getset = Core_getset,
};

static struct PyModuleDef index_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "flexkv_core.native._index",
    .m_doc = "Compiled core of flexkv_core's prefix index (IndexCore).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__index(void)
{
    if (PyType_Ready(&CoreType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&index_module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "IndexCore", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
