/* Unpacking GGUF blocks into unsigned 8-bit quants, shared by the dot and dequant kernels.
 *
 * Every supported format is, per run of 16 or 32 weights, w = a * u + c with u unsigned:
 *   Q4_0  d|qs[16]            u = nibble            a = d        c = -8 d
 *   Q4_1  d|m|qs[16]          u = nibble            a = d        c = m
 *   Q5_0  d|qh[4]|qs[16]      u = nibble | bit<<4   a = d        c = -16 d
 *   Q5_1  d|m|qh[4]|qs[16]    u = nibble | bit<<4   a = d        c = m
 *   Q8_0  d|qs[32] int8       u = q + 128           a = d        c = -128 d
 *   Q4_K  per 32: a = d * scale_j, c = -dmin * min_j (6-bit scale/min pairs)
 *   Q5_K  as Q4_K with a fifth bit
 *   Q6_K  per 16: a = d * scale_k (int8), c = -32 a; u 6-bit
 * In the 32-weight formats byte j holds weight j (low nibble) and j + 16 (high nibble),
 * and bit j of the little-endian qh is bit 4 of weight j. The k-quant layouts are
 * described at each unpacker (and in sprintllm/quant/gguf/kquants.py).
 */
#ifndef SL_BLOCKS_H
#define SL_BLOCKS_H

#include "common.h"

SL_INLINE int64_t sl_type_size(int qt) {
    switch (qt) {
    case SL_Q4_0: return 18;
    case SL_Q4_1: return 20;
    case SL_Q5_0: return 22;
    case SL_Q5_1: return 24;
    case SL_Q8_0: return 34;
    case SL_Q4_K: return 144;
    case SL_Q5_K: return 176;
    default: return 210; /* Q6_K */
    }
}

SL_INLINE int sl_has_min(int qt) { return qt == SL_Q4_1 || qt == SL_Q5_1; }

/* The constant subtracted from u in the symmetric 32-weight formats. */
SL_INLINE int32_t sl_offset(int qt) { return qt == SL_Q4_0 ? 8 : qt == SL_Q5_0 ? 16 : qt == SL_Q8_0 ? 128 : 0; }

SL_INLINE uint32_t sl_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins. Bytes 0-3: scales 0-3 (top 2 bits:
 * high bits of scales 4-7); bytes 4-7: mins 0-3 (top 2 bits: high bits of mins 4-7);
 * bytes 8-11: low nibble = low 4 bits of scales 4-7, high nibble = of mins 4-7. */
SL_INLINE void sl_k_scale_min(const uint8_t *p, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = p[j] & 63;
        mn[j] = p[j + 4] & 63;
        sc[j + 4] = (p[j + 8] & 0x0F) | (p[j] >> 6) << 4;
        mn[j + 4] = (p[j + 8] >> 4) | (p[j + 4] >> 6) << 4;
    }
}

#if SL_AVX512
SL_INLINE __m256i sl_unpack_legacy(int qt, const uint8_t *blk) {
    if (qt == SL_Q8_0)
        return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(blk + 2)), _mm256_set1_epi8((char)0x80));
    if (qt == SL_Q4_0 || qt == SL_Q4_1) return sl_nibbles16(blk + (qt == SL_Q4_0 ? 2 : 4));
    /* Q5: the qh word is directly the byte mask of the weights whose bit 4 is set. */
    const uint8_t *h = blk + (qt == SL_Q5_0 ? 2 : 4);
    const __m256i lo = sl_nibbles16(h + 4);
    return _mm256_mask_add_epi8(lo, sl_u32(h), lo, _mm256_set1_epi8(16));
}

/* Weights 32c .. 32c+31 of a k-quant super-block. */
SL_INLINE __m256i sl_unpack_kchunk(int qt, const uint8_t *blk, int c) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    if (qt == SL_Q4_K || qt == SL_Q5_K) {
        /* qs: 4 runs of 32 bytes; run r holds chunk 2r in its low and 2r+1 in its high nibbles. */
        const uint8_t *qs = blk + (qt == SL_Q4_K ? 16 : 48);
        __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * (c / 2)));
        __m256i u = _mm256_and_si256(c % 2 ? _mm256_srli_epi16(v, 4) : v, low4);
        if (qt == SL_Q4_K) return u;
        /* Q5_K qh[32]: bit c of byte j is bit 4 of weight 32c + j. */
        __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 16));
        __mmask32 hi = _mm256_test_epi8_mask(qh, _mm256_set1_epi8((char)(1 << c)));
        return _mm256_mask_add_epi8(u, hi, u, _mm256_set1_epi8(16));
    }
    /* Q6_K: ql[128] = 2 runs of 64 bytes (half h = c / 4): chunks 4h, 4h+1 are the low
     * nibbles of the run's two 32-byte halves, 4h+2, 4h+3 their high nibbles; qh[64] = 2
     * runs of 32 bytes: bits 2i, 2i+1 of byte j are the top bits of weight 32(4h+i) + j. */
    const int h = c / 4, i = c % 4;
    __m256i ql = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32 * (i % 2)));
    __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
    __m256i lo = _mm256_and_si256(i >= 2 ? _mm256_srli_epi16(ql, 4) : ql, low4);
    __m256i top = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * i), _mm256_set1_epi8(3));
    return _mm256_or_si256(lo, _mm256_slli_epi16(top, 4));
}
#else
SL_INLINE void sl_unpack_legacy(int qt, const uint8_t *blk, uint8_t u[32]) {
    if (qt == SL_Q8_0) {
        for (int j = 0; j < 32; j++) u[j] = blk[2 + j] ^ 0x80;
        return;
    }
    const uint8_t *qs = blk + (qt == SL_Q4_0 ? 2 : qt == SL_Q4_1 ? 4 : qt == SL_Q5_0 ? 6 : 8);
    for (int j = 0; j < 16; j++) u[j] = qs[j] & 0x0F, u[j + 16] = qs[j] >> 4;
    if (qt == SL_Q5_0 || qt == SL_Q5_1) {
        const uint32_t qh = sl_u32(qs - 4);
        for (int j = 0; j < 32; j++) u[j] |= ((qh >> j) & 1) << 4;
    }
}

SL_INLINE void sl_unpack_kchunk(int qt, const uint8_t *blk, int c, uint8_t u[32]) {
    if (qt == SL_Q4_K || qt == SL_Q5_K) {
        const uint8_t *qs = blk + (qt == SL_Q4_K ? 16 : 48) + 32 * (c / 2);
        for (int j = 0; j < 32; j++) u[j] = (qs[j] >> (4 * (c % 2))) & 0x0F;
        if (qt == SL_Q5_K)
            for (int j = 0; j < 32; j++) u[j] |= ((blk[16 + j] >> c) & 1) << 4;
        return;
    }
    const int h = c / 4, i = c % 4;
    const uint8_t *ql = blk + 64 * h + 32 * (i % 2), *qh = blk + 128 + 32 * h;
    for (int j = 0; j < 32; j++) u[j] = ((ql[j] >> (4 * (i / 2))) & 0x0F) | ((qh[j] >> (2 * i)) & 3) << 4;
}
#endif

#endif
