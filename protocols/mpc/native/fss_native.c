/* Compiled DCF key generation and evaluation for protocols/mpc/fss.py (loaded by fss_native.py).
 *
 * Bit-identical to the numpy path: the same PRG (fixed-key AES-128 in Matyas-Meyer-Oseas mode,
 * G_j(s) = AES_k(s ^ c_j) ^ s ^ c_j, key and tweaks handed in by fss_native_init from
 * fss_prg.py), the same tree walk and the same key layout (fss.DcfKey). AES runs on AES-NI
 * (checked at run time by fss_native_supported; the kernels are compiled for the "aes" target
 * only); several blocks are kept in flight per level so the AES unit's latency is hidden.
 * Large calls are split over plain pthreads (ranges of whole 64-element words of packed
 * control bits, so no two threads write the same word). All integer arithmetic is on uint64
 * (two's-complement wrap-around, as numpy's int64). No allocation, no I/O, nothing secret
 * leaves the caller's buffers.
 *
 * ABI 2 adds the bit-output, early-terminated DCF of protocols/mpc/fss_bit.py (fss_bit_gen,
 * fss_bit_eval): one AES block per child (bit 0 control, bit 1 value, the rest the seed), the
 * leaf's G_values(s) holding the outputs of the last 7 input bits.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <pthread.h>

#define FSS_NATIVE_ABI 2
#define MAX_THREADS 64

int fss_native_abi(void) { return FSS_NATIVE_ABI; }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include "aes_mmo.h"

int fss_native_supported(void) { return aes_ni_supported(); }

#define EVAL_LANES 4  /* points walked together: 8 AES blocks in flight per level */
#define GEN_LANES 2   /* elements walked together: 12 AES blocks in flight per level */
#define PREFETCH 16   /* keys ahead: a key's words lie in 3 bits rows, too many streams for the hardware prefetcher */

static uint64_t tweaks[3][2];   /* left seed, right seed, values */
static uint64_t right_delta;    /* tweaks[1] = tweaks[0] ^ (0, right_delta) */
static int ready;

/* The PRG's AES key (16 bytes) and its three tweaks (6 words); 0 on success. */
KERNEL int fss_native_init(const uint8_t *key, const uint64_t *tweak_words) {
    if (!fss_native_supported()) return -1;
    aes_set_key(key);
    memcpy(tweaks, tweak_words, sizeof tweaks);
    if (tweaks[1][0] != tweaks[0][0] || tweaks[2][1] != tweaks[0][1]) return -2;
    right_delta = tweaks[0][1] ^ tweaks[1][1];
    ready = 1;
    return 0;
}

static inline uint64_t lo64(__m128i v) { return (uint64_t)_mm_cvtsi128_si64(v); }
KERNEL static inline uint64_t hi64(__m128i v) { return (uint64_t)_mm_cvtsi128_si64(_mm_unpackhi_epi64(v, v)); }
KERNEL static inline __m128i words(uint64_t low, uint64_t high) { return _mm_set_epi64x((long long)high, (long long)low); }
static inline uint64_t negate_if(uint64_t value, uint64_t flag) { return (value ^ (0 - flag)) + flag; } /* flag ? -v : v */

/* ----- evaluation ------------------------------------------------------------------------- */
typedef struct {
    int party, bits;
    int64_t n, repeat, bit_words;
    const uint64_t *seed, *cw_seed, *cw_value, *cw_final, *cw_t, *x;
    uint64_t *out;
} EvalJob;

KERNEL static void eval_range(const EvalJob *job, int64_t lo, int64_t hi) {
    const int bits = job->bits;
    const int64_t n = job->n, w = job->bit_words;
    const uint64_t party = (uint64_t)job->party;
    const __m128i tweak_left = words(tweaks[0][0], tweaks[0][1]), tweak_values = words(tweaks[2][0], tweaks[2][1]);
    const __m128i clear_control = words(~(uint64_t)1, ~(uint64_t)0);
    for (int64_t first = lo; first < hi; first += EVAL_LANES) {
        __m128i s[EVAL_LANES], tweaked[2 * EVAL_LANES], block[2 * EVAL_LANES];
        uint64_t t[EVAL_LANES], value[EVAL_LANES], x[EVAL_LANES];
        int64_t k[EVAL_LANES];
        for (int j = 0; j < EVAL_LANES; j++) {  /* a short last group repeats its last point */
            int64_t e = first + j < hi ? first + j : hi - 1;
            k[j] = e / job->repeat;
            x[j] = job->x[e];
            s[j] = _mm_loadu_si128((const __m128i *)(job->seed + 2 * k[j]));
            t[j] = party;
            value[j] = 0;
        }
        for (int i = 0; i < bits; i++) {
            uint64_t right[EVAL_LANES];
            for (int j = 0; j < EVAL_LANES; j++) {
                right[j] = (x[j] >> (bits - 1 - i)) & 1;
                tweaked[2 * j] = _mm_xor_si128(_mm_xor_si128(s[j], tweak_left), words(0, right_delta & (0 - right[j])));
                tweaked[2 * j + 1] = _mm_xor_si128(s[j], tweak_values);
            }
            const int64_t ahead = k[0] + PREFETCH < n ? k[0] + PREFETCH : n - 1;  /* one stream per level and array */
            _mm_prefetch((const char *)(job->cw_seed + 2 * ((int64_t)i * n + ahead)), _MM_HINT_T0);
            _mm_prefetch((const char *)(job->cw_value + (int64_t)i * n + ahead), _MM_HINT_T0);
            MMO(tweaked, block, 2 * EVAL_LANES);
            for (int j = 0; j < EVAL_LANES; j++) {
                uint64_t on = 0 - t[j];
                __m128i cws = _mm_loadu_si128((const __m128i *)(job->cw_seed + 2 * ((int64_t)i * n + k[j])));
                uint64_t t_next = lo64(block[2 * j]) & 1;
                __m128i vs = block[2 * j + 1];
                uint64_t v = right[j] ? hi64(vs) : lo64(vs);
                s[j] = _mm_xor_si128(_mm_and_si128(block[2 * j], clear_control),
                                     _mm_and_si128(cws, _mm_set1_epi64x((long long)on)));
                uint64_t cw_t = (job->cw_t[(2 * (int64_t)i + (int64_t)right[j]) * w + (k[j] >> 6)] >> (k[j] & 63)) & 1;
                t[j] = t_next ^ (t[j] & cw_t);
                value[j] += negate_if(v + (job->cw_value[(int64_t)i * n + k[j]] & on), party);
            }
        }
        for (int j = 0; j < EVAL_LANES && first + j < hi; j++)
            job->out[first + j] = value[j] + negate_if(hi64(s[j]) + (job->cw_final[k[j]] & (0 - t[j])), party);
    }
}

/* ----- generation ------------------------------------------------------------------------- */
typedef struct {
    int bits;
    int64_t n, lo, bit_words;      /* key elements, first element written (a multiple of 64) */
    const uint64_t *alpha, *beta, *seeds;  /* of elements [lo, lo + m): seeds [2, m, 2] */
    int64_t m;
    uint64_t *cw_seed, *cw_value, *cw_final, *cw_t;
} GenJob;

typedef struct { __m128i s[2]; uint64_t t[2], v_alpha, alpha, beta; } GenLane;

/* One level of GEN_LANES elements' walks; writes their seed and value corrections, returns
   the left/right control-bit corrections of lane j in bits 2j and 2j + 1. */
KERNEL static unsigned gen_level(GenLane *lane, int bits, int i, uint64_t *cw_seed_out[GEN_LANES],
                                 uint64_t *cw_value_out[GEN_LANES]) {
    __m128i tweaked[6 * GEN_LANES], out[6 * GEN_LANES];
    unsigned cw_bits = 0;
    for (int j = 0; j < GEN_LANES; j++)
        for (int p = 0; p < 2; p++)
            for (int o = 0; o < 3; o++)
                tweaked[6 * j + 3 * p + o] = _mm_xor_si128(lane[j].s[p], words(tweaks[o][0], tweaks[o][1]));
    MMO(tweaked, out, 6 * GEN_LANES);
    for (int j = 0; j < GEN_LANES; j++) {
        GenLane *g = &lane[j];
        uint64_t a = (g->alpha >> (bits - 1 - i)) & 1, take = 0 - a;
        uint64_t keep[2][2], lose[2][2], t_left[2], t_right[2], keep_v[2], lose_v[2];
        for (int p = 0; p < 2; p++) {
            __m128i left = out[6 * j + 3 * p], right = out[6 * j + 3 * p + 1], values = out[6 * j + 3 * p + 2];
            uint64_t l0 = lo64(left), l1 = hi64(left), r0 = lo64(right), r1 = hi64(right);
            t_left[p] = l0 & 1;
            t_right[p] = r0 & 1;
            l0 &= ~(uint64_t)1;
            r0 &= ~(uint64_t)1;
            uint64_t d0 = (l0 ^ r0) & take, d1 = (l1 ^ r1) & take;
            keep[p][0] = l0 ^ d0; keep[p][1] = l1 ^ d1;
            lose[p][0] = r0 ^ d0; lose[p][1] = r1 ^ d1;
            uint64_t v_left = lo64(values), v_right = hi64(values), dv = (v_left ^ v_right) & take;
            keep_v[p] = v_left ^ dv;
            lose_v[p] = v_right ^ dv;
        }
        uint64_t cws0 = lose[0][0] ^ lose[1][0], cws1 = lose[0][1] ^ lose[1][1];
        cw_seed_out[j][0] = cws0;
        cw_seed_out[j][1] = cws1;
        uint64_t cwv = negate_if(lose_v[1] - lose_v[0] - g->v_alpha + (g->beta & take), g->t[1]);
        *cw_value_out[j] = cwv;
        g->v_alpha += keep_v[0] - keep_v[1] + negate_if(cwv, g->t[1]);
        uint64_t cwt_left = t_left[0] ^ t_left[1] ^ a ^ 1, cwt_right = t_right[0] ^ t_right[1] ^ a;
        cw_bits |= (unsigned)(cwt_left | (cwt_right << 1)) << (2 * j);
        uint64_t t_keep[2] = {a ? t_right[0] : t_left[0], a ? t_right[1] : t_left[1]};
        uint64_t t_cw_keep = t_keep[0] ^ t_keep[1] ^ 1;
        for (int p = 0; p < 2; p++) {
            uint64_t on = 0 - g->t[p];
            g->s[p] = words(keep[p][0] ^ (cws0 & on), keep[p][1] ^ (cws1 & on));
            g->t[p] = t_keep[p] ^ (g->t[p] & t_cw_keep);
        }
    }
    return cw_bits;
}

KERNEL static void gen_range(const GenJob *job, int64_t lo, int64_t hi) {  /* [lo, hi) relative to job->lo */
    const int bits = job->bits;
    const int64_t n = job->n, m = job->m, w = job->bit_words;
    uint64_t scratch_seed[GEN_LANES][2], scratch_value[GEN_LANES];
    for (int64_t block = lo; block < hi; block += 64) {
        int64_t end = block + 64 < hi ? block + 64 : hi;
        uint64_t packed[2 * 64];
        memset(packed, 0, sizeof(uint64_t) * 2 * (size_t)bits);
        for (int64_t first = block; first < end; first += GEN_LANES) {
            GenLane lane[GEN_LANES];
            int64_t el[GEN_LANES];
            for (int j = 0; j < GEN_LANES; j++) {
                int64_t e = first + j < end ? first + j : end - 1;  /* a short last group repeats its last element */
                el[j] = e;
                lane[j].alpha = job->alpha[e];
                lane[j].beta = job->beta[e];
                lane[j].s[0] = _mm_loadu_si128((const __m128i *)(job->seeds + 2 * e));
                lane[j].s[1] = _mm_loadu_si128((const __m128i *)(job->seeds + 2 * (m + e)));
                lane[j].t[0] = 0;
                lane[j].t[1] = 1;
                lane[j].v_alpha = 0;
            }
            for (int i = 0; i < bits; i++) {
                uint64_t *seed_out[GEN_LANES], *value_out[GEN_LANES];
                int64_t ahead = job->lo + el[0] + PREFETCH < n ? job->lo + el[0] + PREFETCH : n - 1;
                _mm_prefetch((const char *)(job->cw_seed + 2 * ((int64_t)i * n + ahead)), _MM_HINT_T0);
                _mm_prefetch((const char *)(job->cw_value + (int64_t)i * n + ahead), _MM_HINT_T0);
                for (int j = 0; j < GEN_LANES; j++) {
                    int real = first + j < end;
                    int64_t k = job->lo + el[j];
                    seed_out[j] = real ? job->cw_seed + 2 * ((int64_t)i * n + k) : scratch_seed[j];
                    value_out[j] = real ? job->cw_value + (int64_t)i * n + k : &scratch_value[j];
                }
                unsigned cw_bits = gen_level(lane, bits, i, seed_out, value_out);
                for (int j = 0; j < GEN_LANES && first + j < end; j++) {
                    int shift = (int)((first + j) & 63);
                    packed[2 * i] |= (uint64_t)((cw_bits >> (2 * j)) & 1) << shift;
                    packed[2 * i + 1] |= (uint64_t)((cw_bits >> (2 * j + 1)) & 1) << shift;
                }
            }
            for (int j = 0; j < GEN_LANES && first + j < end; j++) {
                GenLane *g = &lane[j];
                job->cw_final[job->lo + first + j] = negate_if(hi64(g->s[1]) - hi64(g->s[0]) - g->v_alpha, g->t[1]);
            }
        }
        for (int r = 0; r < 2 * bits; r++) job->cw_t[r * w + (job->lo + block) / 64] = packed[r];
    }
}


#include "fss_bit_kernels.h"

/* ----- threads ---------------------------------------------------------------------------- */
typedef struct { void (*run)(const void *, int64_t, int64_t); const void *job; int64_t lo, hi; } Part;

static void *run_part(void *arg) {
    Part *part = (Part *)arg;
    part->run(part->job, part->lo, part->hi);
    return NULL;
}

/* Split [0, total) into at most `threads` ranges aligned to `align` and run them; the calling
   thread takes the first range. */
static void parallel(void (*run)(const void *, int64_t, int64_t), const void *job, int64_t total, int64_t align,
                     int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    int64_t units = (total + align - 1) / align;
    if (threads > units) threads = (int)units;
    if (threads <= 1) { run(job, 0, total); return; }
    Part parts[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    int64_t per = (units + threads - 1) / threads * align;
    for (int p = 0; p < threads; p++) {
        parts[p] = (Part){run, job, p * per < total ? p * per : total, (p + 1) * per < total ? (p + 1) * per : total};
        if (p > 0) started[p] = pthread_create(&ids[p], NULL, run_part, &parts[p]) == 0;
    }
    run_part(&parts[0]);
    for (int p = 1; p < threads; p++) {
        if (started[p]) pthread_join(ids[p], NULL);
        else run_part(&parts[p]);  /* no thread to be had: do it here */
    }
}

static void eval_entry(const void *job, int64_t lo, int64_t hi) { eval_range((const EvalJob *)job, lo, hi); }
static void gen_entry(const void *job, int64_t lo, int64_t hi) { gen_range((const GenJob *)job, lo, hi); }

/* This party's shares at n * repeat points x (point e on key e / repeat) into out; 0 on success. */
int fss_dcf_eval(int party, int bits, int64_t n, int64_t repeat, const uint64_t *seed, const uint64_t *cw_seed,
                 const uint64_t *cw_value, const uint64_t *cw_final, const uint64_t *cw_t, const uint64_t *x,
                 uint64_t *out, int threads) {
    if (!ready) return -1;
    if (bits < 1 || bits > 64 || n < 0 || repeat < 1 || (party != 0 && party != 1)) return -2;
    EvalJob job = {party, bits, n, repeat, (n + 63) / 64, seed, cw_seed, cw_value, cw_final, cw_t, x, out};
    parallel(eval_entry, &job, n * repeat, 64, threads);
    return 0;
}

/* Correction words of key elements [lo, lo + m) of an n-element key (party 0's view), from
   alpha [m], beta [m] and both parties' initial seeds [2, m, 2]; lo a multiple of 64. */
int fss_dcf_gen(int bits, int64_t n, int64_t lo, int64_t m, const uint64_t *alpha, const uint64_t *beta,
                const uint64_t *seeds, uint64_t *cw_seed, uint64_t *cw_value, uint64_t *cw_final, uint64_t *cw_t,
                int threads) {
    if (!ready) return -1;
    if (bits < 1 || bits > 64 || lo < 0 || m < 0 || lo % 64 || lo + m > n) return -2;
    GenJob job = {bits, n, lo, (n + 63) / 64, alpha, beta, seeds, m, cw_seed, cw_value, cw_final, cw_t};
    parallel(gen_entry, &job, m, 64, threads);
    return 0;
}

static void bit_eval_entry(const void *job, int64_t lo, int64_t hi) { bit_eval_range((const BitEvalJob *)job, lo, hi); }
static void bit_gen_entry(const void *job, int64_t lo, int64_t hi) { bit_gen_range((const BitGenJob *)job, lo, hi); }

/* This party's XOR shares (0/1 bytes) of [x < alpha] at n points (point e on key e); `levels` =
   bits - min(7, bits); 0 on success. */
int fss_bit_eval(int party, int bits, int levels, int64_t n, const uint64_t *seed, const uint64_t *cw_seed,
                 const uint64_t *cw_leaf, const uint64_t *cw_bits, const uint64_t *x, uint8_t *out, int threads) {
    if (!ready) return -1;
    if (bits < 1 || bits > 64 || levels != bits - (bits < 7 ? bits : 7) || n < 0 || (party != 0 && party != 1))
        return -2;
    BitEvalJob job = {party, bits, levels, n, (n + 63) / 64, seed, cw_seed, cw_leaf, cw_bits, x, out};
    parallel(bit_eval_entry, &job, n, 64, threads);
    return 0;
}

/* Correction words of bit-output DCF key elements [lo, lo + m) of an n-element key (party 0's
   view), from alpha [m] and both parties' initial seeds [2, m, 2]; lo a multiple of 64. */
int fss_bit_gen(int bits, int levels, int64_t n, int64_t lo, int64_t m, const uint64_t *alpha, const uint64_t *seeds,
                uint64_t *cw_seed, uint64_t *cw_leaf, uint64_t *cw_bits, int threads) {
    if (!ready) return -1;
    if (bits < 1 || bits > 64 || levels != bits - (bits < 7 ? bits : 7) || lo < 0 || m < 0 || lo % 64 || lo + m > n)
        return -2;
    BitGenJob job = {bits, levels, n, lo, (n + 63) / 64, alpha, seeds, m, cw_seed, cw_leaf, cw_bits};
    parallel(bit_gen_entry, &job, m, 64, threads);
    return 0;
}

#else  /* not x86-64: the numpy path is used */
int fss_native_supported(void) { return 0; }
int fss_native_init(const uint8_t *key, const uint64_t *tweak_words) { (void)key; (void)tweak_words; return -1; }
int fss_dcf_eval(int party, int bits, int64_t n, int64_t repeat, const uint64_t *seed, const uint64_t *cw_seed,
                 const uint64_t *cw_value, const uint64_t *cw_final, const uint64_t *cw_t, const uint64_t *x,
                 uint64_t *out, int threads) {
    (void)party; (void)bits; (void)n; (void)repeat; (void)seed; (void)cw_seed; (void)cw_value; (void)cw_final;
    (void)cw_t; (void)x; (void)out; (void)threads;
    return -1;
}
int fss_dcf_gen(int bits, int64_t n, int64_t lo, int64_t m, const uint64_t *alpha, const uint64_t *beta,
                const uint64_t *seeds, uint64_t *cw_seed, uint64_t *cw_value, uint64_t *cw_final, uint64_t *cw_t,
                int threads) {
    (void)bits; (void)n; (void)lo; (void)m; (void)alpha; (void)beta; (void)seeds; (void)cw_seed; (void)cw_value;
    (void)cw_final; (void)cw_t; (void)threads;
    return -1;
}
int fss_bit_eval(int party, int bits, int levels, int64_t n, const uint64_t *seed, const uint64_t *cw_seed,
                 const uint64_t *cw_leaf, const uint64_t *cw_bits, const uint64_t *x, uint8_t *out, int threads) {
    (void)party; (void)bits; (void)levels; (void)n; (void)seed; (void)cw_seed; (void)cw_leaf; (void)cw_bits; (void)x;
    (void)out; (void)threads;
    return -1;
}
int fss_bit_gen(int bits, int levels, int64_t n, int64_t lo, int64_t m, const uint64_t *alpha, const uint64_t *seeds,
                uint64_t *cw_seed, uint64_t *cw_leaf, uint64_t *cw_bits, int threads) {
    (void)bits; (void)levels; (void)n; (void)lo; (void)m; (void)alpha; (void)seeds; (void)cw_seed; (void)cw_leaf;
    (void)cw_bits; (void)threads;
    return -1;
}
#endif
