/* Dequantize weight rows to float32 or bfloat16, for the large-batch path (dequantize,
 * then one dense GEMM in torch).
 *
 * The float32 arithmetic follows ggml's order -- (u - offset) * d, d * u + m,
 * (d * sc) * u - dmin * mn, (d * sc) * (u - 32) -- with separate multiply and add
 * (the library is built with -ffp-contract=off), so float32 results are bit-identical
 * to sprintllm.quant.gguf.dequantize; bfloat16 is that value rounded to nearest-even.
 */
#include "blocks.h"

#if SL_AVX512
/* 16 consecutive weights u[16 * half ..] -> (u - offset) * a (+ c if add_c). */
SL_INLINE __m512 affine16(__m256i u, int half, int32_t offset, float a, int add_c, float c) {
    __m512i ui = _mm512_cvtepu8_epi32(half ? _mm256_extracti128_si256(u, 1) : _mm256_castsi256_si128(u));
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(ui, _mm512_set1_epi32(offset))), _mm512_set1_ps(a));
    return add_c ? _mm512_add_ps(v, _mm512_set1_ps(c)) : v;
}

SL_INLINE void store16(void *out, int64_t i, int bf16, __m512 v) {
    if (!bf16) {
        _mm512_storeu_ps((float *)out + i, v);
        return;
    }
#ifdef __AVX512BF16__
    _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), (__m256i)_mm512_cvtneps_pbh(v));
#else
    __m512i b = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), _mm512_cvtepi32_epi16(b));
#endif
}
#else
SL_INLINE void store_scalar(void *out, int64_t i, int bf16, float v) {
    if (!bf16) {
        ((float *)out)[i] = v;
        return;
    }
    uint32_t b;
    memcpy(&b, &v, 4);
    ((uint16_t *)out)[i] = (uint16_t)((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}
#endif

SL_INLINE void row(const int qt, const uint8_t *w, int64_t K, void *out, int64_t o, int bf16) {
    const int64_t ts = sl_type_size(qt);
    const int legacy = sl_legacy_supported(qt);
    for (int64_t b = 0; b < K / (legacy ? 32 : 256); b++) {
        const uint8_t *blk = w + b * ts;
        uint8_t sc[8] = {0}, mn[8] = {0};
        const int8_t *sc6 = (const int8_t *)blk + 192;
        if (qt == SL_Q4_K || qt == SL_Q5_K) sl_k_scale_min(blk + 4, sc, mn);
        for (int c = 0; c < (legacy ? 1 : 8); c++) {
            const int64_t i0 = o + (legacy ? 32 * b : 256 * b + 32 * c);
#if SL_AVX512
            const __m256i u = legacy ? sl_unpack_legacy(qt, blk) : sl_unpack_kchunk(qt, blk, c);
#else
            uint8_t u[32];
            if (legacy)
                sl_unpack_legacy(qt, blk, u);
            else
                sl_unpack_kchunk(qt, blk, c, u);
#endif
            for (int half = 0; half < 2; half++) {
                int32_t off = 0;
                int add_c = 0;
                float a, cst = 0.0f;
                if (legacy) {
                    a = sl_f16(blk), off = sl_offset(qt), add_c = sl_has_min(qt);
                    if (add_c) cst = sl_f16(blk + 2);
                } else if (qt == SL_Q6_K) {
                    a = sl_f16(blk + 208) * (float)sc6[2 * c + half], off = 32;
                } else {
                    a = sl_f16(blk) * (float)sc[c], add_c = 1, cst = -(sl_f16(blk + 2) * (float)mn[c]);
                }
#if SL_AVX512
                store16(out, i0 + 16 * half, bf16, affine16(u, half, off, a, add_c, cst));
#else
                for (int j = 16 * half; j < 16 * half + 16; j++) {
                    float v = (float)((int32_t)u[j] - off) * a;
                    store_scalar(out, i0 + j, bf16, add_c ? v + cst : v);
                }
#endif
            }
        }
    }
}

void sl_dequantize_rows(int qt, const uint8_t *w, int64_t w_stride, int64_t K, int64_t n_begin, int64_t n_end,
                        void *out, int out_bf16) {
    for (int64_t n = n_begin; n < n_end; n++) {
        const uint8_t *r = w + n * w_stride;
        switch (qt) {
        case SL_Q4_0: row(SL_Q4_0, r, K, out, n * K, out_bf16); break;
        case SL_Q4_1: row(SL_Q4_1, r, K, out, n * K, out_bf16); break;
        case SL_Q5_0: row(SL_Q5_0, r, K, out, n * K, out_bf16); break;
        case SL_Q5_1: row(SL_Q5_1, r, K, out, n * K, out_bf16); break;
        case SL_Q8_0: row(SL_Q8_0, r, K, out, n * K, out_bf16); break;
        case SL_Q4_K: row(SL_Q4_K, r, K, out, n * K, out_bf16); break;
        case SL_Q5_K: row(SL_Q5_K, r, K, out, n * K, out_bf16); break;
        case SL_Q6_K: row(SL_Q6_K, r, K, out, n * K, out_bf16); break;
        }
    }
}
