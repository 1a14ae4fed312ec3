/* Dot kernels for the 32-weight formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
 *
 * With w = d * u + c (blocks.h) and activations x = dx * qx:
 *
 *   sum w x = d dx [sum u qx]                 + m dx sum(qx)     (Q4_1, Q5_1)
 *   sum w x = d dx [sum u qx - offset sum(qx)]                   (Q4_0, Q5_0, Q8_0)
 *
 * The bracket is an exact int32 (at most 32 * 255 * 127 in magnitude). The AVX-512 path
 * takes two blocks per 64-byte vpdpbusd, against activations stored in the matching pair
 * layout with per-lane scales and offset corrections (act.c), so a pair costs about a
 * dozen instructions. Weight rows are streamed one at a time: interleaving the blocks of
 * several rows defeats the hardware prefetcher (measured: 4x slower from DRAM).
 */
#include "blocks.h"

int sl_legacy_supported(int qt) {
    return qt == SL_Q4_0 || qt == SL_Q4_1 || qt == SL_Q5_0 || qt == SL_Q5_1 || qt == SL_Q8_0;
}

SL_INLINE int64_t qs_offset(int qt) { return qt == SL_Q4_0 ? 2 : qt == SL_Q4_1 ? 4 : qt == SL_Q5_0 ? 6 : 8; }

#if SL_AVX512
/* Blocks b0, b1 as 64 unsigned quants in the activations' pair layout (act.c). */
SL_INLINE __m512i unpack_pair(int qt, const uint8_t *b0, const uint8_t *b1) {
    if (qt == SL_Q8_0) {
        __m256i lo = _mm256_loadu_si256((const __m256i *)(b0 + 2)), hi = _mm256_loadu_si256((const __m256i *)(b1 + 2));
        return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), _mm512_set1_epi8((char)0x80));
    }
    const int64_t qs = qs_offset(qt);
    __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(b0 + qs))),
                                        _mm_loadu_si128((const __m128i *)(b1 + qs)), 1);
    __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
    u = _mm512_and_si512(u, _mm512_set1_epi8(0x0F));
    if (qt == SL_Q5_0 || qt == SL_Q5_1) {
        const uint64_t h0 = sl_u32(b0 + qs - 4), h1 = sl_u32(b1 + qs - 4);
        const uint64_t mask = (h0 & 0xFFFF) | (h1 & 0xFFFF) << 16 | (h0 >> 16) << 32 | (h1 >> 16) << 48;
        u = _mm512_mask_add_epi8(u, mask, u, _mm512_set1_epi8(16));
    }
    return u;
}

/* Blocks 2 pr and 2 pr + 1 of `row` against MR activation rows from m0, into the
 * per-lane accumulators acc[i] and (Q4_1/Q5_1's min terms) macc[i]. */
SL_INLINE void pair_step(const int qt, const int MR, const sl_act *a, const uint8_t *row, int64_t pr, int64_t m0,
                         __m512 acc[4], __m128 macc[4]) {
    const int64_t np = (a->K / 32 + 1) / 2, ts = sl_type_size(qt);
    const uint8_t *b0 = row + 2 * pr * ts, *b1 = b0 + ts;
    const __m512i u = unpack_pair(qt, b0, b1);
    /* [d0, m0, d1, m1] -> d0 or d1 in each lane, by the lane's block in the pair layout. */
    const __m128 dm = _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128((int)sl_u32(b0)), (int)sl_u32(b1), 1));
    const __m512i d_index = qt == SL_Q8_0 ? _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0)
                                          : _mm512_set_epi32(2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0);
    const __m512 d = _mm512_permutexvar_ps(d_index, _mm512_castps128_ps512(dm));
    for (int i = 0; i < MR; i++) {
        const int64_t pi = (m0 + i) * np + pr;
        const int symmetric = !sl_has_min(qt);
        const __m512i init = symmetric ? _mm512_loadu_si512(a->lane_init + pi * 16) : _mm512_setzero_si512();
        const __m512i dot = _mm512_dpbusd_epi32(init, u, _mm512_loadu_si512(a->q + pi * 64));
        const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(a->lane_scale + pi * 16));
        acc[i] = _mm512_fmadd_ps(x, d, acc[i]);
        if (!symmetric) macc[i] = _mm_fmadd_ps(dm, _mm_loadu_ps(a->pair_sums + pi * 4), macc[i]);
    }
}

/* Per-lane sums of one weight row against MR activation rows from m0: out[i] holds
 * 16 partial sums of sum w x for activation row m0 + i. */
SL_INLINE void row_dot(const int qt, const int MR, const sl_problem *p, int64_t n, int64_t m0, __m512 out[4]) {
    const sl_act *a = p->act;
    const int64_t nb = a->K / 32, np = (nb + 1) / 2, ts = sl_type_size(qt);
    const uint8_t *row = p->w + n * p->w_stride;
    /* Two accumulators per activation row (even and odd pairs) break the fma latency chain. */
    __m512 acc[2][4];
    __m128 macc[4];
    for (int i = 0; i < MR; i++) acc[0][i] = acc[1][i] = _mm512_setzero_ps(), macc[i] = _mm_setzero_ps();
    int64_t pr = 0;
    for (; pr + 2 <= nb / 2; pr += 2) {
        pair_step(qt, MR, a, row, pr, m0, acc[0], macc);
        pair_step(qt, MR, a, row, pr + 1, m0, acc[1], macc);
    }
    if (pr < nb / 2) pair_step(qt, MR, a, row, pr, m0, acc[0], macc);
    /* The min terms sit in lanes 1 and 3 of macc (lanes 0 and 2 multiplied d by 0). */
    for (int i = 0; i < MR; i++) out[i] = _mm512_add_ps(_mm512_add_ps(acc[0][i], acc[1][i]), _mm512_zextps128_ps512(macc[i]));
    if (nb % 2) { /* the unpaired last block: natural order, lanes 0-7 */
        const uint8_t *blk = row + (nb - 1) * ts;
        const __m256i u = sl_unpack_legacy(qt, blk);
        const float d = sl_f16(blk), m = sl_has_min(qt) ? sl_f16(blk + 2) : 0.0f;
        for (int i = 0; i < MR; i++) {
            const int64_t pi = (m0 + i) * np + np - 1;
            const __m256i init = _mm256_loadu_si256((const __m256i *)(a->lane_init + pi * 16));
            const __m256i dot = _mm256_dpbusd_epi32(init, u, _mm256_loadu_si256((const __m256i *)(a->q + pi * 64)));
            __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * a->lane_scale[pi * 16]));
            t = _mm256_add_ps(t, _mm256_zextps128_ps256(_mm_set_ss(m * a->pair_sums[pi * 4 + 1])));
            out[i] = _mm512_add_ps(out[i], _mm512_zextps256_ps512(t));
        }
    }
}

/* The totals of four 16-lane vectors: [sum v0, sum v1, sum v2, sum v3]. */
SL_INLINE __m128 sum4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
    /* Halve twice across 128-bit chunks, then reduce within each chunk. */
    __m512 a = _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x44), _mm512_shuffle_f32x4(v0, v1, 0xEE));
    __m512 b = _mm512_add_ps(_mm512_shuffle_f32x4(v2, v3, 0x44), _mm512_shuffle_f32x4(v2, v3, 0xEE));
    __m512 c = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
    c = _mm512_add_ps(c, _mm512_permute_ps(c, 0x4E));
    c = _mm512_add_ps(c, _mm512_permute_ps(c, 0xB1));
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), c));
}

/* Weight rows [n0, n0 + 4) against MR activation rows: each row is streamed whole in
 * turn, and the 4 x MR horizontal sums share one shuffle tree. */
SL_INLINE void tile(const int qt, const int MR, const sl_problem *p, int64_t n0, int64_t m0) {
    __m512 r[4][4];
    for (int k = 0; k < 4; k++) row_dot(qt, MR, p, n0 + k, m0, r[k]);
    for (int i = 0; i < MR; i++) _mm_storeu_ps(p->out + (m0 + i) * p->out_stride + n0, sum4(r[0][i], r[1][i], r[2][i], r[3][i]));
}

SL_INLINE void rows(const int qt, const sl_problem *p, int64_t n_begin, int64_t n_end) {
    int64_t n = n_begin;
    for (; n + 4 <= n_end; n += 4) {
        int64_t m0 = 0;
        for (; m0 + 4 <= p->M; m0 += 4) tile(qt, 4, p, n, m0);
        switch (p->M - m0) {
        case 3: tile(qt, 3, p, n, m0); break;
        case 2: tile(qt, 2, p, n, m0); break;
        case 1: tile(qt, 1, p, n, m0); break;
        }
    }
    for (; n < n_end; n++) {
        for (int64_t m = 0; m < p->M; m++) {
            __m512 r[4];
            row_dot(qt, 1, p, n, m, r);
            p->out[m * p->out_stride + n] = _mm512_reduce_add_ps(r[0]);
        }
    }
}
#else
SL_INLINE void rows(const int qt, const sl_problem *p, int64_t n_begin, int64_t n_end) {
    const sl_act *a = p->act;
    const int64_t nb = a->K / 32, np = (nb + 1) / 2, ts = sl_type_size(qt);
    uint8_t u[32];
    for (int64_t n = n_begin; n < n_end; n++) {
        for (int64_t m = 0; m < p->M; m++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = p->w + n * p->w_stride + b * ts;
                const int64_t pi = m * np + b / 2, h = b % 2;
                const int paired = b / 2 * 2 + 1 < nb, split = a->interleaved && paired;
                const int64_t lane = paired ? (a->interleaved ? 4 * h : 8 * h) : 0;
                /* The block's two halves of 16, wherever the pair layout put them. */
                const int8_t *lo = a->q + pi * 64 + (split ? 16 * h : 32 * h), *hi = lo + (split ? 32 : 16);
                sl_unpack_legacy(qt, blk, u);
                int32_t dot = a->lane_init[pi * 16 + lane];
                for (int j = 0; j < 16; j++) dot += (int32_t)u[j] * lo[j] + (int32_t)u[j + 16] * hi[j];
                acc += sl_f16(blk) * a->lane_scale[pi * 16 + lane] * (float)dot;
                if (sl_has_min(qt)) acc += sl_f16(blk + 2) * a->pair_sums[pi * 4 + 2 * h + 1];
            }
            p->out[m * p->out_stride + n] = acc;
        }
    }
}
#endif

void sl_legacy_rows(int qt, const sl_problem *p, int64_t n_begin, int64_t n_end) {
    switch (qt) {
    case SL_Q4_0: rows(SL_Q4_0, p, n_begin, n_end); break;
    case SL_Q4_1: rows(SL_Q4_1, p, n_begin, n_end); break;
    case SL_Q5_0: rows(SL_Q5_0, p, n_begin, n_end); break;
    case SL_Q5_1: rows(SL_Q5_1, p, n_begin, n_end); break;
    case SL_Q8_0: rows(SL_Q8_0, p, n_begin, n_end); break;
    }
}
