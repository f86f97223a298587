/* The bit-output, early-terminated DCF of protocols/mpc/fss_bit.py: its evaluation and key
 * generation ranges, included once by fss_native.c (after its AES, MMO and lane helpers; its
 * threads and exported entry points call these). Bit-identical to fss_bit.py's numpy path:
 * one AES block per child (bit 0 control, bit 1 value, the rest the seed), the leaf's
 * G_values(s) holding the outputs of the last min(7, bits) input bits, corrected by one 128-bit
 * word where the control bit is set.
 */
#ifndef FSS_BIT_KERNELS_H
#define FSS_BIT_KERNELS_H
/* ----- bit-output DCF with early termination (fss_bit.py) --------------------------------- */
#define BIT_EVAL_LANES 4  /* points of a block stepped together: 4 AES blocks in flight */
#define BIT_EVAL_BLOCK 256  /* points walked level by level (a multiple of BIT_EVAL_LANES) */
#define BIT_GEN_LANES 2   /* elements walked together: 8 AES blocks in flight per level */
#define BIT_MAX_LEVELS 64

typedef struct {
    int party, bits, levels;
    int64_t n, bit_words;
    const uint64_t *seed, *cw_seed, *cw_leaf, *cw_bits, *x;
    uint8_t *out;
} BitEvalJob;

static inline uint64_t packed_bit(const uint64_t *rows, int64_t row, int64_t w, int64_t k) {
    return (rows[row * w + (k >> 6)] >> (k & 63)) & 1;
}

/* Bit `index` (< 128) of a 128-bit block. */
static inline uint64_t block_bit(uint64_t low, uint64_t high, uint64_t index) {
    return (index >= 64 ? high >> (index - 64) : low >> index) & 1;
}

/* A block of BIT_EVAL_BLOCK points walked level by level: each level reads one contiguous run of
   the block's seed corrections (the key is level-major), where walking a few points through
   every level reads from `levels` rows at once, too many streams for the hardware prefetcher.
   Within a level, BIT_EVAL_LANES points at a time keep that many AES blocks in flight. */
KERNEL static void bit_eval_range(const BitEvalJob *job, int64_t lo, int64_t hi) {
    const int bits = job->bits, levels = job->levels;
    const int64_t n = job->n, w = job->bit_words;
    const uint64_t party = (uint64_t)job->party, leaf_mask = (1ULL << (bits - levels)) - 1;
    const __m128i tweak_left = words(tweaks[0][0], tweaks[0][1]), tweak_values = words(tweaks[2][0], tweaks[2][1]);
    const __m128i clear = words(~(uint64_t)3, ~(uint64_t)0);
    __m128i s[BIT_EVAL_BLOCK];
    uint64_t t[BIT_EVAL_BLOCK], value[BIT_EVAL_BLOCK], x[BIT_EVAL_BLOCK];
    for (int64_t first = lo; first < hi; first += BIT_EVAL_BLOCK) {
        const int64_t count = hi - first < BIT_EVAL_BLOCK ? hi - first : BIT_EVAL_BLOCK;
        const int64_t padded = (count + BIT_EVAL_LANES - 1) / BIT_EVAL_LANES * BIT_EVAL_LANES;
        for (int64_t j = 0; j < padded; j++) {  /* a short last group repeats its last point */
            const int64_t k = first + (j < count ? j : count - 1);
            x[j] = job->x[k];
            s[j] = _mm_loadu_si128((const __m128i *)(job->seed + 2 * k));
            t[j] = party;
            value[j] = 0;
        }
        for (int i = 0; i < levels; i++) {
            const uint64_t *cw_row = job->cw_seed + 2 * ((int64_t)i * n + first);
            const uint64_t *bits_row = job->cw_bits + 3 * (int64_t)i * w;
            for (int64_t g = 0; g < padded; g += BIT_EVAL_LANES) {
                __m128i tweaked[BIT_EVAL_LANES], block[BIT_EVAL_LANES];
                uint64_t right[BIT_EVAL_LANES];
                for (int j = 0; j < BIT_EVAL_LANES; j++) {
                    right[j] = (x[g + j] >> (bits - 1 - i)) & 1;
                    tweaked[j] = _mm_xor_si128(_mm_xor_si128(s[g + j], tweak_left), words(0, right_delta & (0 - right[j])));
                }
                MMO(tweaked, block, BIT_EVAL_LANES);
                for (int j = 0; j < BIT_EVAL_LANES; j++) {
                    const int64_t e = g + j < count ? g + j : count - 1, k = first + e;
                    uint64_t on = 0 - t[g + j], low = lo64(block[j]);
                    __m128i cws = _mm_loadu_si128((const __m128i *)(cw_row + 2 * e));
                    s[g + j] = _mm_xor_si128(_mm_and_si128(block[j], clear), _mm_and_si128(cws, _mm_set1_epi64x((long long)on)));
                    value[g + j] ^= ((low >> 1) & 1) ^ (t[g + j] & packed_bit(bits_row, 2, w, k));
                    t[g + j] = (low & 1) ^ (t[g + j] & packed_bit(bits_row, (int64_t)right[j], w, k));
                }
            }
        }
        for (int64_t g = 0; g < padded; g += BIT_EVAL_LANES) {
            __m128i tweaked[BIT_EVAL_LANES], block[BIT_EVAL_LANES];
            for (int j = 0; j < BIT_EVAL_LANES; j++) tweaked[j] = _mm_xor_si128(s[g + j], tweak_values);
            MMO(tweaked, block, BIT_EVAL_LANES);
            for (int j = 0; j < BIT_EVAL_LANES && g + j < count; j++) {
                const int64_t k = first + g + j;
                uint64_t on = 0 - t[g + j];
                uint64_t low = lo64(block[j]) ^ (job->cw_leaf[2 * k] & on);
                uint64_t high = hi64(block[j]) ^ (job->cw_leaf[2 * k + 1] & on);
                job->out[k] = (uint8_t)(value[g + j] ^ block_bit(low, high, x[g + j] & leaf_mask));
            }
        }
    }
}

typedef struct {
    int bits, levels;
    int64_t n, lo, bit_words;      /* key elements, first element written (a multiple of 64) */
    const uint64_t *alpha, *seeds;  /* of elements [lo, lo + m): seeds [2, m, 2] */
    int64_t m;
    uint64_t *cw_seed, *cw_leaf, *cw_bits;
} BitGenJob;

typedef struct { __m128i s[2]; uint64_t t[2], v_alpha, alpha; } BitLane;

/* One level of BIT_GEN_LANES walks; writes their seed corrections, returns lane j's left
   control, right control and value corrections in bits 3j, 3j + 1 and 3j + 2. */
KERNEL static unsigned bit_gen_level(BitLane *lane, int bits, int i, uint64_t *cw_seed_out[BIT_GEN_LANES]) {
    __m128i tweaked[4 * BIT_GEN_LANES], out[4 * BIT_GEN_LANES];
    unsigned cw_bits = 0;
    for (int j = 0; j < BIT_GEN_LANES; j++)
        for (int p = 0; p < 2; p++)
            for (int o = 0; o < 2; o++)
                tweaked[4 * j + 2 * p + o] = _mm_xor_si128(lane[j].s[p], words(tweaks[o][0], tweaks[o][1]));
    MMO(tweaked, out, 4 * BIT_GEN_LANES);
    for (int j = 0; j < BIT_GEN_LANES; j++) {
        BitLane *g = &lane[j];
        uint64_t a = (g->alpha >> (bits - 1 - i)) & 1;
        uint64_t keep[2][2], lose[2][2], t_side[2][2], v_side[2][2];
        for (int p = 0; p < 2; p++) {
            uint64_t side[2][2];
            for (int o = 0; o < 2; o++) {
                __m128i b = out[4 * j + 2 * p + o];
                side[o][0] = lo64(b);
                side[o][1] = hi64(b);
                t_side[p][o] = side[o][0] & 1;
                v_side[p][o] = (side[o][0] >> 1) & 1;
                side[o][0] &= ~(uint64_t)3;
            }
            for (int h = 0; h < 2; h++) {
                keep[p][h] = side[a][h];
                lose[p][h] = side[1 - a][h];
            }
        }
        uint64_t cws0 = lose[0][0] ^ lose[1][0], cws1 = lose[0][1] ^ lose[1][1];
        cw_seed_out[j][0] = cws0;
        cw_seed_out[j][1] = cws1;
        uint64_t cwv = v_side[0][1 - a] ^ v_side[1][1 - a] ^ g->v_alpha ^ a;
        g->v_alpha ^= v_side[0][a] ^ v_side[1][a] ^ cwv;
        uint64_t cw_left = t_side[0][0] ^ t_side[1][0] ^ a ^ 1, cw_right = t_side[0][1] ^ t_side[1][1] ^ a;
        uint64_t cw_keep = a ? cw_right : cw_left;
        cw_bits |= (unsigned)(cw_left | (cw_right << 1) | (cwv << 2)) << (3 * j);
        for (int p = 0; p < 2; p++) {
            uint64_t on = 0 - g->t[p];
            g->s[p] = words(keep[p][0] ^ (cws0 & on), keep[p][1] ^ (cws1 & on));
            g->t[p] = t_side[p][a] ^ (g->t[p] & cw_keep);
        }
    }
    return cw_bits;
}

/* Leaf corrections of BIT_GEN_LANES walks: G_values(s0) ^ G_values(s1) ^ V ^ [j < alpha_low]. */
KERNEL static void bit_gen_leaf(BitLane *lane, int leaf_bits, uint64_t *cw_leaf_out[BIT_GEN_LANES]) {
    __m128i tweaked[2 * BIT_GEN_LANES], out[2 * BIT_GEN_LANES];
    for (int j = 0; j < BIT_GEN_LANES; j++)
        for (int p = 0; p < 2; p++) tweaked[2 * j + p] = _mm_xor_si128(lane[j].s[p], words(tweaks[2][0], tweaks[2][1]));
    MMO(tweaked, out, 2 * BIT_GEN_LANES);
    for (int j = 0; j < BIT_GEN_LANES; j++) {
        uint64_t low = lane[j].alpha & ((1ULL << leaf_bits) - 1), v = 0 - lane[j].v_alpha;
        uint64_t first = low >= 64 ? ~(uint64_t)0 : (1ULL << low) - 1;
        uint64_t second = low > 64 ? (1ULL << (low - 64)) - 1 : 0;
        cw_leaf_out[j][0] = lo64(out[2 * j]) ^ lo64(out[2 * j + 1]) ^ first ^ v;
        cw_leaf_out[j][1] = hi64(out[2 * j]) ^ hi64(out[2 * j + 1]) ^ second ^ v;
    }
}

KERNEL static void bit_gen_range(const BitGenJob *job, int64_t lo, int64_t hi) {  /* relative to job->lo */
    const int bits = job->bits, levels = job->levels;
    const int64_t n = job->n, m = job->m, w = job->bit_words;
    uint64_t scratch[BIT_GEN_LANES][2];
    for (int64_t block = lo; block < hi; block += 64) {
        int64_t end = block + 64 < hi ? block + 64 : hi;
        uint64_t packed[3 * BIT_MAX_LEVELS];
        memset(packed, 0, sizeof(uint64_t) * 3 * (size_t)levels);
        for (int64_t first = block; first < end; first += BIT_GEN_LANES) {
            BitLane lane[BIT_GEN_LANES];
            int64_t el[BIT_GEN_LANES];
            uint64_t *seed_out[BIT_GEN_LANES], *leaf_out[BIT_GEN_LANES];
            for (int j = 0; j < BIT_GEN_LANES; j++) {
                int64_t e = first + j < end ? first + j : end - 1;  /* a short last group repeats its last element */
                el[j] = e;
                lane[j].alpha = job->alpha[e];
                lane[j].s[0] = _mm_loadu_si128((const __m128i *)(job->seeds + 2 * e));
                lane[j].s[1] = _mm_loadu_si128((const __m128i *)(job->seeds + 2 * (m + e)));
                lane[j].t[0] = 0;
                lane[j].t[1] = 1;
                lane[j].v_alpha = 0;
            }
            for (int i = 0; i < levels; i++) {
                for (int j = 0; j < BIT_GEN_LANES; j++)
                    seed_out[j] = first + j < end ? job->cw_seed + 2 * ((int64_t)i * n + job->lo + el[j]) : scratch[j];
                unsigned cw_bits = bit_gen_level(lane, bits, i, seed_out);
                for (int j = 0; j < BIT_GEN_LANES && first + j < end; j++) {
                    int shift = (int)((first + j) & 63);
                    for (int r = 0; r < 3; r++) packed[3 * i + r] |= (uint64_t)((cw_bits >> (3 * j + r)) & 1) << shift;
                }
            }
            for (int j = 0; j < BIT_GEN_LANES; j++)
                leaf_out[j] = first + j < end ? job->cw_leaf + 2 * (job->lo + el[j]) : scratch[j];
            bit_gen_leaf(lane, bits - levels, leaf_out);
        }
        for (int r = 0; r < 3 * levels; r++) job->cw_bits[r * w + (job->lo + block) / 64] = packed[r];
    }
}

#endif
