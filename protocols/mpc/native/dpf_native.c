/* Compiled full-domain DPF evaluation and table lookup for protocols/mpc/fss_dpf.py (loaded by
 * protocols/mpc/dpf_native.py).
 *
 * Bit-identical to the numpy path: the same PRG (fixed-key AES-128 in Matyas-Meyer-Oseas mode,
 * G_j(s) = AES_k(s ^ c_j) ^ s ^ c_j, key and tweaks handed in by dpf_native_init from
 * fss_prg.py and fss_dpf.py), the same tree (children 2j, 2j + 1 of node j; control bit in the
 * seed's lowest bit), the same leaf conversion and key layout (fss_dpf.DpfKey). AES runs on
 * AES-NI (checked at run time by dpf_native_supported; the kernels are compiled for the "aes"
 * target only), four nodes (eight blocks) in flight. The tree of one element is expanded level
 * by level in place in a per-thread buffer (2^(bits-1) nodes of 16 bytes). Elements are split
 * over plain pthreads. All integer arithmetic is on uint64 (two's-complement wrap-around, as
 * numpy's int64). Nothing secret leaves the caller's buffers; scratch is zeroed before it is freed.
 * The AES key schedule repeats fss_native.c's (a few lines; the two kernels load independently).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

#define DPF_NATIVE_ABI 1
#define MAX_THREADS 64
#define MAX_BITS 20
#define MAX_PAYLOAD 4

int dpf_native_abi(void) { return DPF_NATIVE_ABI; }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include "aes_mmo.h"

int dpf_native_supported(void) { return aes_ni_supported(); }

#define LANES 4

static __m128i side_tweak[2];           /* left, right child seeds */
static __m128i leaf_tweak[MAX_PAYLOAD]; /* leaf block j: output words 2j, 2j + 1 */
static int ready;

/* The PRG's AES key (16 bytes), its left and right seed tweaks (4 words) and the leaf tweaks
 * (2 MAX_PAYLOAD words); 0 on success. */
KERNEL int dpf_native_init(const uint8_t *key, const uint64_t *sides, const uint64_t *leaves) {
    if (!dpf_native_supported()) return -1;
    aes_set_key(key);
    for (int j = 0; j < 2; j++) side_tweak[j] = _mm_loadu_si128((const __m128i *)(sides + 2 * j));
    for (int j = 0; j < MAX_PAYLOAD; j++) leaf_tweak[j] = _mm_loadu_si128((const __m128i *)(leaves + 2 * j));
    ready = 1;
    return 0;
}

typedef struct {
    int party, bits, payload, tables;
    int64_t n;                 /* elements of the whole key (row stride of cw_seed) */
    const uint64_t *seed, *cw_seed, *cw_t;
    const int64_t *cw_leaf;
    const int64_t *shift;      /* lookup: opened v - rho per element; NULL: full domain */
    const int64_t *table;      /* lookup: [tables, 2^bits] */
    int64_t lo;                /* first element of the call */
    int64_t *out;
    int failed;
} Job;

static inline uint64_t control_bit(const Job *job, int row, int64_t e) {
    int64_t words = (job->n + 63) / 64;
    return (job->cw_t[(int64_t)row * words + e / 64] >> (e % 64)) & 1;
}

/* One level: nodes[0 .. count) -> nodes[0 .. 2 count), in place from the last node down. */
KERNEL static void expand_level(__m128i *nodes, int64_t count, __m128i cw, uint64_t cw_left, uint64_t cw_right) {
    const __m128i one = _mm_set_epi64x(0, 1), zero = _mm_setzero_si128();
    const __m128i cw_bits[2] = {_mm_set_epi64x(0, (long long)cw_left), _mm_set_epi64x(0, (long long)cw_right)};
    int64_t j = count;
    while (j > 0) {
        int lanes = j >= LANES ? LANES : (int)j;
        __m128i seed[LANES], in[2 * LANES], out[2 * LANES];
        __m128i on[LANES];
        for (int l = 0; l < lanes; l++) {
            __m128i node = nodes[j - 1 - l];
            __m128i t = _mm_and_si128(node, one);
            on[l] = _mm_sub_epi64(zero, _mm_unpacklo_epi64(t, t));  /* all ones where the control bit is set */
            seed[l] = _mm_andnot_si128(one, node);
            in[2 * l] = _mm_xor_si128(seed[l], side_tweak[0]);
            in[2 * l + 1] = _mm_xor_si128(seed[l], side_tweak[1]);
        }
        if (lanes == LANES) { MMO(in, out, 2 * LANES); } else { for (int b = 0; b < 2 * lanes; b++) MMO(in + b, out + b, 1); }
        for (int l = 0; l < lanes; l++) {
            int64_t parent = j - 1 - l;
            for (int side = 0; side < 2; side++) {
                __m128i child = out[2 * l + side];  /* its lowest bit is the child's control bit */
                child = _mm_xor_si128(child, _mm_and_si128(on[l], _mm_or_si128(_mm_andnot_si128(one, cw), cw_bits[side])));
                nodes[2 * parent + side] = child;
            }
        }
        j -= lanes;
    }
}

/* The leaf outputs of one element into y [2^bits, payload]. */
KERNEL static void leaves(const Job *job, int64_t e, __m128i *nodes, int64_t count, uint64_t *y) {
    const __m128i one = _mm_set_epi64x(0, 1);
    int p = job->payload;
    const uint64_t *cw = (const uint64_t *)job->cw_leaf + e * 2 * p;
    uint64_t sign = job->party ? ~(uint64_t)0 : 0;
    for (int64_t j = 0; j < count; j++) {
        __m128i seed = _mm_andnot_si128(one, nodes[j]);
        uint64_t t = 0 - (uint64_t)_mm_cvtsi128_si64(_mm_and_si128(nodes[j], one));
        __m128i in[MAX_PAYLOAD], out[MAX_PAYLOAD];
        for (int b = 0; b < p; b++) in[b] = _mm_xor_si128(seed, leaf_tweak[b]);
        if (p == 1) { MMO(in, out, 1); } else if (p == 2) { MMO(in, out, 2); } else { for (int b = 0; b < p; b++) MMO(in + b, out + b, 1); }
        uint64_t words[2 * MAX_PAYLOAD];
        _mm_storeu_si128((__m128i *)words, out[0]);
        for (int b = 1; b < p; b++) _mm_storeu_si128((__m128i *)(words + 2 * b), out[b]);
        for (int w = 0; w < 2 * p; w++) {
            uint64_t value = words[w] + (cw[w] & t);
            y[2 * p * j + w] = (value ^ sign) - sign;  /* party 1 negates */
        }
    }
}

KERNEL static void eval_range(Job *job, int64_t first, int64_t last) {
    int bits = job->bits, p = job->payload;
    int64_t half = (int64_t)1 << (bits - 1), size = (int64_t)1 << bits;
    __m128i *nodes = aligned_alloc(16, (size_t)half * sizeof(__m128i));
    uint64_t *y = job->shift ? malloc((size_t)size * p * sizeof(uint64_t)) : NULL;
    if (!nodes || (job->shift && !y)) { job->failed = 1; free(nodes); free(y); return; }
    for (int64_t e = first; e < last; e++) {
        __m128i root = _mm_loadu_si128((const __m128i *)(job->seed + 2 * e));
        nodes[0] = _mm_or_si128(root, _mm_set_epi64x(0, job->party));
        for (int i = 0; i < bits - 1; i++) {
            __m128i cw = _mm_loadu_si128((const __m128i *)(job->cw_seed + 2 * ((int64_t)i * job->n + e)));
            expand_level(nodes, (int64_t)1 << i, cw, control_bit(job, 2 * i, e), control_bit(job, 2 * i + 1, e));
        }
        int64_t row = e - job->lo;
        if (!job->shift) { leaves(job, e, nodes, half, (uint64_t *)job->out + row * size * p); continue; }
        leaves(job, e, nodes, half, y);
        uint64_t *out = (uint64_t *)job->out + row * job->tables * p;
        uint64_t s = (uint64_t)job->shift[row];
        for (int k = 0; k < job->tables; k++) {
            const uint64_t *table = (const uint64_t *)job->table + (int64_t)k * size;
            uint64_t acc[MAX_PAYLOAD] = {0};
            for (int64_t u = 0; u < size; u++) {
                uint64_t entry = table[(u + s) & (uint64_t)(size - 1)];
                for (int w = 0; w < p; w++) acc[w] += entry * y[u * p + w];
            }
            for (int w = 0; w < p; w++) out[k * p + w] = acc[w];
        }
    }
    memset(nodes, 0, (size_t)half * sizeof(__m128i));
    free(nodes);
    if (y) { memset(y, 0, (size_t)size * p * sizeof(uint64_t)); free(y); }
}

#else
int dpf_native_supported(void) { return 0; }
int dpf_native_init(const uint8_t *key, const uint64_t *sides, const uint64_t *leaves) { (void)key; (void)sides; (void)leaves; return -1; }
typedef struct { int failed; } Job;
static void eval_range(Job *job, int64_t first, int64_t last) { (void)first; (void)last; job->failed = 1; }
static int ready;
#endif

/* ----- threads ---------------------------------------------------------------------------- */
typedef struct { Job *job; int64_t first, last; Job copy; } Part;

static void *run_part(void *arg) {
    Part *part = arg;
    eval_range(&part->copy, part->first, part->last);
    return NULL;
}

static int run(Job *job, int64_t lo, int64_t hi, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > hi - lo) threads = (int)(hi - lo);
    if (threads < 1) threads = 1;
    Part parts[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    int64_t per = (hi - lo + threads - 1) / threads;
    for (int p = 0; p < threads; p++) {
        parts[p].copy = *job;
        parts[p].first = lo + p * per;
        parts[p].last = lo + (p + 1) * per < hi ? lo + (p + 1) * per : hi;
        if (p > 0) started[p] = pthread_create(&ids[p], NULL, run_part, &parts[p]) == 0;
    }
    run_part(&parts[0]);
    int failed = parts[0].copy.failed;
    for (int p = 1; p < threads; p++) {
        if (started[p]) pthread_join(ids[p], NULL); else run_part(&parts[p]);
        failed |= parts[p].copy.failed;
    }
    return failed ? -3 : 0;
}

/* Full-domain outputs of elements [lo, hi) into out [hi - lo, 2^bits, payload] (shift == NULL), or
 * their lookups into out [hi - lo, tables, payload]; 0 on success. */
int dpf_native_eval(int party, int bits, int payload, int64_t n, const uint64_t *seed, const uint64_t *cw_seed,
                    const int64_t *cw_leaf, const uint64_t *cw_t, int64_t lo, int64_t hi, const int64_t *shift,
                    int tables, const int64_t *table, int64_t *out, int threads) {
    if (!ready) return -1;
    if (bits < 1 || bits > MAX_BITS || payload < 1 || payload > MAX_PAYLOAD || lo < 0 || hi > n || lo > hi) return -2;
    if (lo == hi) return 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    Job job = {party, bits, payload, tables, n, seed, cw_seed, cw_t, cw_leaf, shift, table, lo, out, 0};
    return run(&job, lo, hi, threads);
#else
    (void)party; (void)n; (void)seed; (void)cw_seed; (void)cw_leaf; (void)cw_t; (void)shift; (void)tables;
    (void)table; (void)out; (void)threads;
    return -1;
#endif
}
