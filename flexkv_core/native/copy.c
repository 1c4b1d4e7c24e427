/* flexkv_core.native._copy: one call copies a whole batch of (destination, source, size) pieces of memory.
 *
 * The CPU data path of flexkv_core.transfer: a store or a load of N blocks is N x (layers x K/V) pieces,
 * often 4 KiB each; a Python loop of one copy per piece spends more time in the interpreter than in
 * memcpy. Here the loop is C and the GIL is released for the whole batch.
 *
 *     copy_batch(dst, src, sizes, threads=1) -> int (bytes copied)
 *
 * dst, src, sizes: C-contiguous buffers of native uint64 (numpy uint64 or int64 arrays), one entry per
 * piece: addresses in this process and byte counts. The caller guarantees that the memory is mapped, that
 * no two pieces write the same bytes, and that nothing frees the memory during the call
 * (flexkv_core.transfer builds the addresses from tensors and a pool mapping it holds).
 *
 * How it copies:
 * - The concatenation of all pieces is cut into chunks of CHUNK_BYTES; `threads` threads (the caller
 *   and threads-1 others) take the next chunk from a shared cursor until none is left. One thread gets only
 *   about half of the machine's copy bandwidth, and taking chunks (rather than fixed halves) keeps a
 *   thread that the OS descheduled from holding up the others.
 * - A batch of at least STREAM_MIN_BYTES is written with non-temporal stores (x86-64): the bytes do not
 *   fit in the caches anyway, and a plain store first reads every destination line it overwrites (a third
 *   more memory traffic). glibc's memcpy does the same for one large copy, which is why a batch of 4 KiB
 *   pieces copied with memcpy reaches only about two thirds of one large memcpy's bandwidth.
 * - The first lines of the next piece are prefetched while the current one is copied: the hardware
 *   prefetcher starts again at every piece.
 *
 * Plain C99 + POSIX threads + GCC builtins, no CPU-specific flags: SSE2 is part of every x86-64 CPU, and
 * other architectures copy with memcpy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#define HAVE_STREAM 1
#else
#define HAVE_STREAM 0
#endif

#define MAX_THREADS 64
#define CHUNK_BYTES ((uint64_t)1 << 20)
#define STREAM_MIN_BYTES ((uint64_t)16 << 20)
#define PREFETCH_BYTES 256

typedef struct {
    const uint64_t *dst;
    const uint64_t *src;
    const uint64_t *sizes;
    uint64_t *ends; /* ends[i]: offset just past piece i in the concatenation */
    Py_ssize_t n;
    uint64_t total;
    uint64_t cursor; /* next chunk to take (atomic) */
    int stream;
} batch_t;

#if HAVE_STREAM
/* memcpy with non-temporal 16-byte stores for the aligned middle part. */
static void copy_stream(char *d, const char *s, size_t n) {
    size_t head = (size_t)(-(uintptr_t)d & 15);
    if (head > n)
        head = n;
    memcpy(d, s, head);
    d += head, s += head, n -= head;
    for (; n >= 64; d += 64, s += 64, n -= 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)s);
        __m128i b = _mm_loadu_si128((const __m128i *)(s + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + 48));
        _mm_stream_si128((__m128i *)d, a);
        _mm_stream_si128((__m128i *)(d + 16), b);
        _mm_stream_si128((__m128i *)(d + 32), c);
        _mm_stream_si128((__m128i *)(d + 48), e);
    }
    memcpy(d, s, n);
}
#endif

/* Copy bytes [lo, hi) of the concatenation of all pieces. */
static void copy_range(const batch_t *b, uint64_t lo, uint64_t hi) {
    Py_ssize_t first = 0, last = b->n; /* the first piece that ends after lo */
    while (first < last) {
        Py_ssize_t mid = first + (last - first) / 2;
        if (b->ends[mid] <= lo)
            first = mid + 1;
        else
            last = mid;
    }
    for (Py_ssize_t i = first; i < b->n; i++) {
        uint64_t begin = b->ends[i] - b->sizes[i];
        if (begin >= hi)
            break;
        if (i + 1 < b->n) {
            const char *next = (const char *)(uintptr_t)b->src[i + 1];
            for (int k = 0; k < PREFETCH_BYTES && (uint64_t)k < b->sizes[i + 1]; k += 64)
                __builtin_prefetch(next + k, 0, 0);
        }
        uint64_t from = begin > lo ? begin : lo;
        uint64_t to = b->ends[i] < hi ? b->ends[i] : hi;
        if (from >= to)
            continue;
        char *d = (char *)(uintptr_t)(b->dst[i] + (from - begin));
        const char *s = (const char *)(uintptr_t)(b->src[i] + (from - begin));
#if HAVE_STREAM
        if (b->stream) {
            copy_stream(d, s, (size_t)(to - from));
            continue;
        }
#endif
        memcpy(d, s, (size_t)(to - from));
    }
}

static void *run(void *arg) {
    batch_t *b = (batch_t *)arg;
    for (;;) {
        uint64_t lo = __atomic_fetch_add(&b->cursor, CHUNK_BYTES, __ATOMIC_RELAXED);
        if (lo >= b->total)
            break;
        copy_range(b, lo, lo + CHUNK_BYTES < b->total ? lo + CHUNK_BYTES : b->total);
    }
#if HAVE_STREAM
    if (b->stream)
        _mm_sfence(); /* non-temporal stores are weakly ordered: make them visible before returning */
#endif
    return NULL;
}

static int check_buffer(const Py_buffer *b, const char *name, Py_ssize_t *n) {
    if (b->len % 8 != 0 || (b->itemsize != 8 && b->itemsize != 1)) {
        PyErr_Format(PyExc_ValueError, "%s must be a buffer of uint64 values", name);
        return -1;
    }
    if (!PyBuffer_IsContiguous(b, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous", name);
        return -1;
    }
    *n = b->len / 8;
    return 0;
}

static PyObject *copy_batch(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"dst", "src", "sizes", "threads", NULL};
    Py_buffer dst, src, sizes;
    int threads = 1;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*y*y*|i:copy_batch", keywords, &dst, &src, &sizes,
                                     &threads))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t nd, ns, nz;
    if (check_buffer(&dst, "dst", &nd) || check_buffer(&src, "src", &ns) || check_buffer(&sizes, "sizes", &nz))
        goto done;
    if (nd != ns || nd != nz) {
        PyErr_Format(PyExc_ValueError, "dst, src and sizes differ in length (%zd, %zd, %zd)", nd, ns, nz);
        goto done;
    }
    if (threads < 1 || threads > MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "threads must be 1..%d, got %d", MAX_THREADS, threads);
        goto done;
    }
    batch_t b = {(const uint64_t *)dst.buf, (const uint64_t *)src.buf, (const uint64_t *)sizes.buf, NULL, nd,
                 0, 0, 0};
    b.ends = PyMem_RawMalloc(nd > 0 ? (size_t)nd * sizeof(uint64_t) : 1);
    if (b.ends == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < nd; i++)
        b.ends[i] = b.total += b.sizes[i];
    b.stream = b.total >= STREAM_MIN_BYTES;
    uint64_t chunks = (b.total + CHUNK_BYTES - 1) / CHUNK_BYTES;
    if ((uint64_t)threads > chunks)
        threads = chunks > 0 ? (int)chunks : 1;

    pthread_t tids[MAX_THREADS];
    int started = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tids[started], NULL, run, &b) != 0)
            break; /* fewer threads: the others take more chunks */
        started++;
    }
    run(&b);
    for (int t = 0; t < started; t++)
        pthread_join(tids[t], NULL);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(b.ends);
    result = PyLong_FromUnsignedLongLong(b.total);
done:
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    PyBuffer_Release(&sizes);
    return result;
}

static PyMethodDef methods[] = {
    {"copy_batch", (PyCFunction)(void (*)(void))copy_batch, METH_VARARGS | METH_KEYWORDS,
     "copy_batch(dst, src, sizes, threads=1) -> int\n\n"
     "Copy sizes[i] bytes from address src[i] to address dst[i] for every i (uint64 buffers), with the GIL\n"
     "released, over `threads` threads. Returns the number of bytes copied."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_copy",
                                    "Batched memory copies for flexkv_core.transfer (see copy.c).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__copy(void) { return PyModule_Create(&module); }
