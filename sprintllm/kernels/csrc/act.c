/* Activation quantization: x (float32 or bfloat16) -> int8 blocks with a float scale.
 *
 * d = amax / 127 and q = round-to-nearest-even(x * 127 / amax), so |x - d * q| <= d / 2
 * (up to float rounding). The scale stays float32, unlike llama.cpp's fp16 in Q8_0,
 * so that error bound is the only one the activations add.
 *
 * For the 32-weight formats the quants are laid out for the pair kernels (legacy.c),
 * which dot two weight blocks with one 64-byte vpdpbusd. A 4-bit block unpacks to
 * [low nibbles = weights 0-15 | high nibbles = weights 16-31], so for those formats a pair
 * of activation blocks b, b+1 is stored as [b 0-15 | b+1 0-15 | b 16-31 | b+1 16-31];
 * Q8_0 keeps [b | b+1]. Each pair also gets, per int32 lane of that dot, the lane's
 * activation scale, the offset correction and the block sums (see sl_act). A last
 * unpaired block keeps its natural order and owns lanes 0-7.
 */
#include <math.h>

#include "common.h"

#if SL_AVX512
static __m512 load16(const void *x, int x_bf16, int64_t i) {
    if (!x_bf16) return _mm512_loadu_ps((const float *)x + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* `bs` values (a multiple of 16) from x[i0..]: q, the scale, and the sums per 16. */
static float quantize_run(const void *x, int x_bf16, int64_t i0, int64_t bs, int8_t *q, int32_t *s16) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t i = 0; i < bs; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x, x_bf16, i0 + i)));
    const float m = _mm512_reduce_max_ps(amax);
    const __m512 inv = _mm512_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
    for (int64_t i = 0; i < bs; i += 16) {
        __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x, x_bf16, i0 + i), inv));
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtsepi32_epi8(qi));
        s16[i / 16] = _mm512_reduce_add_epi32(qi);
    }
    return m / 127.0f;
}
#else
static float load_x(const void *x, int x_bf16, int64_t i) {
    if (!x_bf16) return ((const float *)x)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)x)[i] << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float quantize_run(const void *x, int x_bf16, int64_t i0, int64_t bs, int8_t *q, int32_t *s16) {
    float m = 0.0f;
    for (int64_t i = 0; i < bs; i++) m = fmaxf(m, fabsf(load_x(x, x_bf16, i0 + i)));
    const float inv = m > 0.0f ? 127.0f / m : 0.0f;
    for (int64_t j = 0; j < bs / 16; j++) {
        int32_t s = 0;
        for (int64_t i = 16 * j; i < 16 * j + 16; i++) {
            q[i] = (int8_t)lrintf(load_x(x, x_bf16, i0 + i) * inv);
            s += q[i];
        }
        s16[j] = s;
    }
    return m / 127.0f;
}
#endif

/* Which block of its pair (0 or 1) int32 lane l of the pair's dot belongs to. */
static int lane_block(int interleaved, int paired, int l) {
    if (!paired) return 0;
    return interleaved ? (l / 4) % 2 : l / 8;
}

/* GGUF-rows 32-weight formats: the pair layout described at the top of this file. */
static void pairs_row(const void *x, int x_bf16, int64_t m, sl_act *a) {
    const int64_t K = a->K, nb = K / 32, np = (nb + 1) / 2;
    for (int64_t p = 0; p < np; p++) {
        const int paired = 2 * p + 1 < nb;
        const int64_t pi = m * np + p;
        int8_t *dst = a->q + pi * 64;
        float d[2] = {0.0f, 0.0f};
        int32_t sum[2] = {0, 0};
        memset(dst, 0, 64);
        for (int h = 0; h < 1 + paired; h++) {
            int8_t q[32];
            int32_t s16[2];
            d[h] = quantize_run(x, x_bf16, m * K + (2 * p + h) * 32, 32, q, s16);
            sum[h] = s16[0] + s16[1];
            if (a->interleaved && paired) {
                memcpy(dst + 16 * h, q, 16);
                memcpy(dst + 32 + 16 * h, q + 16, 16);
            } else {
                memcpy(dst + 32 * h, q, 32);
            }
        }
        for (int l = 0; l < 16; l++) {
            const int h = lane_block(a->interleaved, paired, l);
            a->lane_scale[pi * 16 + l] = paired || l < 8 ? d[h] : 0.0f;
            /* The block's first lane carries its correction -offset * sum(q). */
            const int first = paired ? (a->interleaved ? 4 * h : 8 * h) : 0;
            a->lane_init[pi * 16 + l] = l == first ? -a->offset * sum[h] : 0;
        }
        for (int h = 0; h < 2; h++) a->pair_sums[pi * 4 + 2 * h] = 0.0f, a->pair_sums[pi * 4 + 2 * h + 1] = d[h] * sum[h];
    }
}

/* Packed 32-weight formats: natural order, a scale and a (pre-scaled) sum per block. */
static void blocks_row(const void *x, int x_bf16, int64_t m, sl_act *a) {
    const int64_t K = a->K;
    for (int64_t b = 0; b < K / 32; b++) {
        const int64_t i0 = m * K + b * 32;
        int32_t s16[2];
        const float d = quantize_run(x, x_bf16, i0, 32, a->q + i0, s16);
        a->d[i0 / 32] = d;
        a->block_sums[i0 / 32] = (a->offset ? (float)-a->offset : 1.0f) * (d * (float)(s16[0] + s16[1]));
    }
}

/* k-quants: one scale per 256 values, sums per 16 and per 32, natural order. */
static void super_row(const void *x, int x_bf16, int64_t m, sl_act *a) {
    const int64_t K = a->K;
    for (int64_t b = 0; b < K / 256; b++) {
        const int64_t i0 = m * K + b * 256;
        int32_t *s16 = a->sum16 + i0 / 16;
        a->d[i0 / 256] = quantize_run(x, x_bf16, i0, 256, a->q + i0, s16);
        for (int j = 0; j < 8; j++) a->sum32[i0 / 32 + j] = s16[2 * j] + s16[2 * j + 1];
    }
}

void sl_quantize_act_rows(const void *x, int x_bf16, int64_t m_begin, int64_t m_end, sl_act *a) {
    for (int64_t m = m_begin; m < m_end; m++) {
        switch (a->kind) {
        case SL_ACT_PAIRS: pairs_row(x, x_bf16, m, a); break;
        case SL_ACT_BLOCKS: blocks_row(x, x_bf16, m, a); break;
        default: super_row(x, x_bf16, m, a); break;
        }
    }
}
