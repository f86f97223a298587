/* The fixed-key AES-128 length-doubling PRG's common part, shared by the FSS kernels (fss_native.c,
 * dpf_native.c): AES-NI key expansion and Matyas-Meyer-Oseas blocks (G(s) = AES_k(s) ^ s, rounds
 * interleaved across several blocks). Included inside each kernel's x86-64 section; each kernel
 * keeps its own tweaks and entry points. protocols/mpc/fss_prg.py is the same PRG in numpy. */
#ifndef PRIVINF_AES_MMO_H
#define PRIVINF_AES_MMO_H

#include <immintrin.h>
#include <stdint.h>

#define KERNEL __attribute__((target("aes,sse2")))

static __m128i round_keys[11];

/* Whether this CPU has AES-NI (and SSE2). */
static int aes_ni_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("aes") && __builtin_cpu_supports("sse2");
}

KERNEL static __m128i expand_step(__m128i key, __m128i assist) {
    assist = _mm_shuffle_epi32(assist, 0xff);
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    return _mm_xor_si128(key, assist);
}

#define EXPAND(i, rcon) round_keys[i] = expand_step(round_keys[i - 1], _mm_aeskeygenassist_si128(round_keys[i - 1], rcon))

/* round_keys from the PRG's 16-byte AES key. */
KERNEL static void aes_set_key(const uint8_t *key) {
    round_keys[0] = _mm_loadu_si128((const __m128i *)key);
    EXPAND(1, 0x01); EXPAND(2, 0x02); EXPAND(3, 0x04); EXPAND(4, 0x08); EXPAND(5, 0x10);
    EXPAND(6, 0x20); EXPAND(7, 0x40); EXPAND(8, 0x80); EXPAND(9, 0x1b); EXPAND(10, 0x36);
}

/* out[j] = AES(in[j]) ^ in[j] for count blocks, rounds interleaved across the blocks. */
#define MMO(in, out, count) do { \
    __m128i state_[count]; \
    for (int j_ = 0; j_ < (count); j_++) state_[j_] = _mm_xor_si128((in)[j_], round_keys[0]); \
    for (int r_ = 1; r_ < 10; r_++) \
        for (int j_ = 0; j_ < (count); j_++) state_[j_] = _mm_aesenc_si128(state_[j_], round_keys[r_]); \
    for (int j_ = 0; j_ < (count); j_++) \
        (out)[j_] = _mm_xor_si128(_mm_aesenclast_si128(state_[j_], round_keys[10]), (in)[j_]); \
} while (0)

#endif
