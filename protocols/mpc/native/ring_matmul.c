/* Ring products y = x @ W^T mod 2^64 for protocols/mpc/ring_matmul.py (loaded with ctypes).
 *
 * x is int64 [n, in] (ring elements), W is [out, in] with int16, int32 or int64 entries, stored either
 * row-major ("rows": w[o * in + i], a linear layer's weight) or column-major ("cols":
 * w[i * out + o], an embedding table [vocab, dim] read as its transpose), y is int64 [n, out].
 * All arithmetic is on uint64 (two's-complement wrap-around): the exact result mod 2^64 of
 * torch's int64 matmul. Narrow weights are sign-extended, so an int32 (int16) table gives the same
 * ring product as its int64 copy while the pass over it reads half (a quarter of) the bytes (these
 * products are memory-bound: one pass over a 50,257 x 1,024 table per call).
 *
 * Each kernel is compiled three times (AVX-512, AVX2, the compiler's default target) from one
 * body; the widest the CPU supports is chosen at run time. Large calls are split over plain
 * pthreads: a row-major W by output columns (no two threads write the same element, each reads
 * whole rows of W); a column-major W (an embedding table) by input rows, each thread summing its
 * contiguous block of the table into a partial product of its own (malloc'd, [n, out]) that the
 * caller's thread adds up at the end: split by output columns, each thread would read half of
 * every table row and the prefetchers pull in the other half too (measured, one thread -> two:
 * 17.5 -> 16.9 ms for a 50,257 x 1,024 int16 table, 18.7 -> 9.5 ms for the row-major LM head). A
 * batch of products (ring_matmul_batched: one per attention head of a KV-stationary product) is
 * split by whole entries. No I/O.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

#define RING_MATMUL_ABI 3
#define MAX_THREADS 64
#define ROW_BLOCK 4     /* x rows per pass over a W row ("rows") */
#define COL_ROWS 8      /* x rows accumulated per pass over W ("cols") */
#define COL_BLOCK 2048  /* output columns per accumulator block ("cols") */

int ring_matmul_abi(void) { return RING_MATMUL_ABI; }

typedef struct {
    const int64_t *x;
    const void *w;
    int64_t *y;
    int64_t n, in, out, o_lo, o_hi;
    int bits;  /* weight width: 16, 32 or 64 */
    int cols;  /* 1: w[i * out + o], 0: w[o * in + i] */
    int64_t i_lo, i_hi;  /* input rows summed ("cols"; the whole of [0, in) otherwise) */
} Part;

/* One body per weight type and layout; KERNEL_ATTR picks the target. */
#define DEFINE_KERNELS(SUFFIX, KERNEL_ATTR, WTYPE)                                                     \
KERNEL_ATTR static void rows_##SUFFIX(const Part *p) {                                                \
    const WTYPE *w = (const WTYPE *)p->w;                                                             \
    const int64_t in = p->in;                                                                          \
    for (int64_t r0 = 0; r0 < p->n; r0 += ROW_BLOCK) {                                                 \
        int64_t rn = p->n - r0 < ROW_BLOCK ? p->n - r0 : ROW_BLOCK;                                    \
        const uint64_t *x0 = (const uint64_t *)p->x + r0 * in;                                         \
        for (int64_t o = p->o_lo; o < p->o_hi; o++) {                                                  \
            const WTYPE *row = w + o * in;                                                             \
            if (rn == ROW_BLOCK) {                                                                     \
                uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;                                               \
                for (int64_t i = 0; i < in; i++) {                                                     \
                    uint64_t wi = (uint64_t)(int64_t)row[i];                                           \
                    a0 += wi * x0[i]; a1 += wi * x0[in + i];                                           \
                    a2 += wi * x0[2 * in + i]; a3 += wi * x0[3 * in + i];                              \
                }                                                                                      \
                uint64_t *y = (uint64_t *)p->y + r0 * p->out + o;                                      \
                y[0] = a0; y[p->out] = a1; y[2 * p->out] = a2; y[3 * p->out] = a3;                     \
            } else {                                                                                   \
                for (int64_t r = 0; r < rn; r++) {                                                     \
                    const uint64_t *xr = x0 + r * in;                                                  \
                    uint64_t acc = 0;                                                                  \
                    for (int64_t i = 0; i < in; i++) acc += (uint64_t)(int64_t)row[i] * xr[i];         \
                    ((uint64_t *)p->y)[(r0 + r) * p->out + o] = acc;                                   \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
}                                                                                                      \
KERNEL_ATTR static void cols_##SUFFIX(const Part *p) {                                                \
    const WTYPE *w = (const WTYPE *)p->w;                                                             \
    const uint64_t *x = (const uint64_t *)p->x;                                                       \
    for (int64_t r0 = 0; r0 < p->n; r0 += COL_ROWS) {                                                  \
        int64_t rn = p->n - r0 < COL_ROWS ? p->n - r0 : COL_ROWS;                                      \
        for (int64_t ob = p->o_lo; ob < p->o_hi; ob += COL_BLOCK) {                                    \
            int64_t on = p->o_hi - ob < COL_BLOCK ? p->o_hi - ob : COL_BLOCK;                          \
            for (int64_t r = 0; r < rn; r++) memset(p->y + (r0 + r) * p->out + ob, 0, on * 8);         \
            for (int64_t i = p->i_lo; i < p->i_hi; i++) {                                              \
                const WTYPE *wi = w + i * p->out + ob;                                                 \
                for (int64_t r = 0; r < rn; r++) {                                                     \
                    uint64_t xv = x[(r0 + r) * p->in + i];                                             \
                    uint64_t *y = (uint64_t *)p->y + (r0 + r) * p->out + ob;                           \
                    for (int64_t o = 0; o < on; o++) y[o] += (uint64_t)(int64_t)wi[o] * xv;            \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
}                                                                                                      \
KERNEL_ATTR static void run_##SUFFIX(const Part *p) {                                                 \
    if (p->cols) cols_##SUFFIX(p); else rows_##SUFFIX(p);                                              \
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))
#define AVX2 __attribute__((target("avx2")))
DEFINE_KERNELS(i16_avx512, AVX512, int16_t)
DEFINE_KERNELS(i32_avx512, AVX512, int32_t)
DEFINE_KERNELS(i64_avx512, AVX512, int64_t)
DEFINE_KERNELS(i16_avx2, AVX2, int16_t)
DEFINE_KERNELS(i32_avx2, AVX2, int32_t)
DEFINE_KERNELS(i64_avx2, AVX2, int64_t)
#endif
DEFINE_KERNELS(i16_base, , int16_t)
DEFINE_KERNELS(i32_base, , int32_t)
DEFINE_KERNELS(i64_base, , int64_t)

/* 2: AVX-512, 1: AVX2, 0: the default target (what ring_matmul runs on this CPU). */
int ring_matmul_level(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) return 2;
    if (__builtin_cpu_supports("avx2")) return 1;
#endif
    return 0;
}

static int level = -1;

/* Chooses the kernels for this CPU (call once, before ring_matmul); returns ring_matmul_level(). */
int ring_matmul_init(void) {
    level = ring_matmul_level();
    return level;
}

static void run_part(const Part *p) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (level == 2) {
        if (p->bits == 64) run_i64_avx512(p); else if (p->bits == 32) run_i32_avx512(p); else run_i16_avx512(p);
        return;
    }
    if (level == 1) {
        if (p->bits == 64) run_i64_avx2(p); else if (p->bits == 32) run_i32_avx2(p); else run_i16_avx2(p);
        return;
    }
#endif
    if (p->bits == 64) run_i64_base(p); else if (p->bits == 32) run_i32_base(p); else run_i16_base(p);
}

static void *run_thread(void *arg) {
    run_part((const Part *)arg);
    return NULL;
}

/* Runs parts[0] on the caller's thread and the others on threads of their own (or the caller's,
   where a thread cannot be started); returns when all are done. */
static void run_parts(Part *parts, int used) {
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < used; t++) started[t] = pthread_create(&ids[t], NULL, run_thread, &parts[t]) == 0;
    for (int t = 0; t < used; t++) if (t == 0 || !started[t]) run_part(&parts[t]);
    for (int t = 1; t < used; t++) if (started[t]) pthread_join(ids[t], NULL);
}

/* A column-major W split by input rows: thread t sums rows [i_lo, i_hi) of the table into y (t = 0)
   or a partial product of its own, added into y at the end (mod 2^64). Without memory for the
   partials, the caller's thread does it all. */
static int cols_split(const int64_t *x, int64_t n, int64_t in, const void *w, int w_bits, int64_t out, int64_t *y,
                      int threads) {
    if (threads > in) threads = (int)in;
    int64_t step = (in + threads - 1) / threads;
    int used = (int)((in + step - 1) / step);
    int64_t *partial = used > 1 ? malloc((size_t)(used - 1) * (size_t)(n * out) * sizeof(int64_t)) : NULL;
    if (partial == NULL) used = 1;
    step = (in + used - 1) / used;
    Part parts[MAX_THREADS];
    for (int t = 0; t < used; t++) {
        int64_t *target = t == 0 ? y : partial + (int64_t)(t - 1) * n * out;
        Part part = {x, w, target, n, in, out, 0, out, w_bits, 1, t * step, (t + 1) * step < in ? (t + 1) * step : in};
        parts[t] = part;
    }
    run_parts(parts, used);
    uint64_t *sum = (uint64_t *)y;
    for (int t = 1; t < used; t++) {
        const uint64_t *add = (const uint64_t *)(partial + (int64_t)(t - 1) * n * out);
        for (int64_t e = 0; e < n * out; e++) sum[e] += add[e];
    }
    free(partial);
    return 0;
}

/* y [n, out] = x [n, in] @ W^T mod 2^64; w_bits 16, 32 or 64; cols: W's layout (see above);
 * threads: at most this many (1: the caller's thread only). 0 on success. */
int ring_matmul(const int64_t *x, int64_t n, int64_t in, const void *w, int w_bits, int cols, int64_t out,
                int64_t *y, int threads) {
    if (n < 0 || in < 1 || out < 1 || (w_bits != 16 && w_bits != 32 && w_bits != 64) || (cols != 0 && cols != 1)) return -1;
    if (level < 0) return -2;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (cols) return cols_split(x, n, in, w, w_bits, out, y, threads);
    if (threads > out) threads = (int)out;
    Part parts[MAX_THREADS];
    int64_t step = (out + threads - 1) / threads;
    int used = 0;
    for (int t = 0; t < threads && t * step < out; t++, used++) {
        Part part = {x, w, y, n, in, out, t * step, (t + 1) * step < out ? (t + 1) * step : out, w_bits, cols, 0, in};
        parts[t] = part;
    }
    run_parts(parts, used);
    return 0;
}

typedef struct {
    const int64_t *x;
    const char *w;
    int64_t *y;
    int64_t x_stride, w_stride_bytes, n, in, out, g_lo, g_hi;
    int bits, cols;
} Batch;

static void run_batch(const Batch *b) {
    for (int64_t g = b->g_lo; g < b->g_hi; g++) {
        Part part = {b->x + g * b->x_stride, b->w + g * b->w_stride_bytes, b->y + g * b->n * b->out,
                     b->n, b->in, b->out, 0, b->out, b->bits, b->cols, 0, b->in};
        run_part(&part);
    }
}

static void *run_batch_thread(void *arg) {
    run_batch((const Batch *)arg);
    return NULL;
}

/* batch products y_g [n, out] = x_g [n, in] @ W_g^T mod 2^64: x_g at x + g * x_stride (rows of in
 * elements), W_g at w + g * w_stride entries (laid out as in ring_matmul), y_g at y + g * n * out;
 * threads: at most this many, each taking whole entries. 0 on success. */
int ring_matmul_batched(const int64_t *x, int64_t x_stride, int64_t n, int64_t in, const void *w, int64_t w_stride,
                        int w_bits, int cols, int64_t out, int64_t batch, int64_t *y, int threads) {
    if (n < 0 || in < 1 || out < 1 || batch < 0 || x_stride < 0 || w_stride < 0 ||
        (w_bits != 16 && w_bits != 32 && w_bits != 64) || (cols != 0 && cols != 1)) return -1;
    if (level < 0) return -2;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > batch) threads = batch > 0 ? (int)batch : 1;
    Batch parts[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    int64_t step = (batch + threads - 1) / threads;
    int used = 0;
    for (int t = 0; t < threads && t * step < batch; t++, used++) {
        Batch part = {x, (const char *)w, y, x_stride, w_stride * (w_bits / 8), n, in, out,
                      t * step, (t + 1) * step < batch ? (t + 1) * step : batch, w_bits, cols};
        parts[t] = part;
    }
    for (int t = 1; t < used; t++) started[t] = pthread_create(&ids[t], NULL, run_batch_thread, &parts[t]) == 0;
    for (int t = 0; t < used; t++) if (t == 0 || !started[t]) run_batch(&parts[t]);
    for (int t = 1; t < used; t++) if (started[t]) pthread_join(ids[t], NULL);
    return 0;
}
