/* Dot kernels for the 256-weight k-quant formats Q4_K, Q5_K, Q6_K.
 *
 * Activations carry one scale dx per 256 values (llama.cpp's Q8_K), so a whole
 * super-block reduces in integers with the small integer sub-block scales:
 *
 *   Q4_K/Q5_K: sum w x = dx (d sum_j sc_j (u_j . qx_j) - dmin sum_j mn_j sum(qx_j))    (j: 8 x 32)
 *   Q6_K:      sum w x = dx d (sum_k sc_k (u_k . qx_k) - 32 sum_k sc_k sum(qx_k))       (k: 16 x 16)
 *
 * Largest magnitudes: 8 * 63 * 32 * 31 * 127 < 2^26 (Q5_K) and 16 * 128 * 16 * 63 * 127
 * < 2^28 (Q6_K): int32 is exact.
 */
#include "blocks.h"

int sl_kquant_supported(int qt) { return qt == SL_Q4_K || qt == SL_Q5_K || qt == SL_Q6_K; }

/* The min term sum_j mn_j sum(qx_j) of Q4_K/Q5_K, or Q6_K's 32 sum_k sc_k sum(qx_k). */
SL_INLINE int32_t min_term(int qt, const uint8_t *mn, const int8_t *sc6, const int32_t *s32, const int32_t *s16) {
    int32_t t = 0;
    if (qt == SL_Q6_K) {
        for (int k = 0; k < 16; k++) t += sc6[k] * s16[k];
        return 32 * t;
    }
    for (int j = 0; j < 8; j++) t += mn[j] * s32[j];
    return t;
}

#if SL_AVX512
/* Q6_K's scales for chunk c as int32 lanes: sub-block 2c in lanes 0-3, 2c+1 in lanes 4-7,
 * matching the int32 lanes of vpdpbusd over the chunk's 32 bytes. */
SL_INLINE __m256i q6_chunk_scales(__m128i sc, int c) {
    const int64_t pattern = (int64_t)(0x01010101u * (uint32_t)(2 * c)) | (int64_t)(0x01010101u * (uint32_t)(2 * c + 1)) << 32;
    return _mm256_cvtepi8_epi32(_mm_shuffle_epi8(sc, _mm_cvtsi64_si128(pattern)));
}

SL_INLINE void tile(const int qt, const int NR, const int MR, const sl_problem *p, int64_t n0, int64_t m0) {
    const sl_act *a = p->act;
    const int64_t K = a->K, nsb = K / 256, ts = sl_type_size(qt);
    __m256 acc[4][4]; /* fixed sizes: arrays sized NR, MR would be VLAs living in memory */
    float macc[4][4];
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MR; i++) acc[r][i] = _mm256_setzero_ps(), macc[r][i] = 0.0f;
    for (int64_t sb = 0; sb < nsb; sb++) {
        for (int r = 0; r < NR; r++) {
            const uint8_t *blk = p->w + (n0 + r) * p->w_stride + sb * ts;
            uint8_t sc[8] = {0}, mn[8] = {0};
            __m128i sc6 = _mm_setzero_si128();
            float d, dmin = 0.0f;
            if (qt == SL_Q6_K) {
                sc6 = _mm_loadu_si128((const __m128i *)(blk + 192));
                d = sl_f16(blk + 208);
            } else {
                sl_k_scale_min(blk + 4, sc, mn);
                d = sl_f16(blk), dmin = sl_f16(blk + 2);
            }
            __m256i iacc[4];
            for (int i = 0; i < MR; i++) iacc[i] = _mm256_setzero_si256();
            for (int c = 0; c < 8; c++) {
                const __m256i u = sl_unpack_kchunk(qt, blk, c);
                const __m256i s = qt == SL_Q6_K ? q6_chunk_scales(sc6, c) : _mm256_set1_epi32(sc[c]);
                for (int i = 0; i < MR; i++) {
                    const int8_t *xq = a->q + (m0 + i) * K + sb * 256 + 32 * c;
                    __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, _mm256_loadu_si256((const __m256i *)xq));
                    iacc[i] = _mm256_add_epi32(iacc[i], _mm256_mullo_epi32(dot, s));
                }
            }
            int8_t sc6_bytes[16];
            _mm_storeu_si128((__m128i *)sc6_bytes, sc6);
            for (int i = 0; i < MR; i++) {
                const int64_t xb = (m0 + i) * nsb + sb;
                const float dx = a->d[xb];
                const int32_t t = min_term(qt, mn, sc6_bytes, a->sum32 + xb * 8, a->sum16 + xb * 16);
                acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[i]), _mm256_set1_ps(d * dx), acc[r][i]);
                macc[r][i] -= (qt == SL_Q6_K ? d : dmin) * dx * (float)t;
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MR; i++) p->out[(m0 + i) * p->out_stride + n0 + r] = sl_hsum256(acc[r][i]) + macc[r][i];
}

SL_INLINE void rows(const int qt, const sl_problem *p, int64_t n_begin, int64_t n_end) {
    for (int64_t n = n_begin; n < n_end; n++) {
        int64_t m0 = 0;
        for (; m0 + 4 <= p->M; m0 += 4) tile(qt, 1, 4, p, n, m0);
        switch (p->M - m0) {
        case 3: tile(qt, 1, 3, p, n, m0); break;
        case 2: tile(qt, 1, 2, p, n, m0); break;
        case 1: tile(qt, 1, 1, p, n, m0); break;
        }
    }
}
#else
SL_INLINE void rows(const int qt, const sl_problem *p, int64_t n_begin, int64_t n_end) {
    const sl_act *a = p->act;
    const int64_t K = a->K, nsb = K / 256, ts = sl_type_size(qt);
    uint8_t u[32], sc[8] = {0}, mn[8] = {0};
    for (int64_t n = n_begin; n < n_end; n++) {
        for (int64_t m = 0; m < p->M; m++) {
            float acc = 0.0f;
            for (int64_t sb = 0; sb < nsb; sb++) {
                const uint8_t *blk = p->w + n * p->w_stride + sb * ts;
                const int64_t xb = m * nsb + sb;
                const int8_t *sc6 = (const int8_t *)blk + 192;
                if (qt != SL_Q6_K) sl_k_scale_min(blk + 4, sc, mn);
                int32_t dot = 0;
                for (int c = 0; c < 8; c++) {
                    sl_unpack_kchunk(qt, blk, c, u);
                    const int8_t *xq = a->q + m * K + sb * 256 + 32 * c;
                    for (int half = 0; half < 2; half++) {
                        int32_t s = 0;
                        for (int j = 16 * half; j < 16 * half + 16; j++) s += (int32_t)u[j] * xq[j];
                        dot += (qt == SL_Q6_K ? sc6[2 * c + half] : sc[c]) * s;
                    }
                }
                const int32_t t = min_term(qt, mn, sc6, a->sum32 + xb * 8, a->sum16 + xb * 16);
                const float dx = a->d[xb];
                if (qt == SL_Q6_K)
                    acc += sl_f16(blk + 208) * dx * (float)(dot - t);
                else
                    acc += sl_f16(blk) * dx * (float)dot - sl_f16(blk + 2) * dx * (float)t;
            }
            p->out[m * p->out_stride + n] = acc;
        }
    }
}
#endif

void sl_kquant_rows(int qt, const sl_problem *p, int64_t n_begin, int64_t n_end) {
    switch (qt) {
    case SL_Q4_K: rows(SL_Q4_K, p, n_begin, n_end); break;
    case SL_Q5_K: rows(SL_Q5_K, p, n_begin, n_end); break;
    case SL_Q6_K: rows(SL_Q6_K, p, n_begin, n_end); break;
    }
}
