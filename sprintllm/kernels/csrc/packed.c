/* Repacked 32-weight formats (Q4_0, Q4_1, Q8_0) for decode-speed dot products.
 *
 * GGUF stores each row's blocks one after another, so a SIMD dot over one row pays for
 * unpacking, scale conversion and a horizontal sum per block. The packed layout puts 16
 * rows side by side instead: one int32 lane per row, so a block of 16 rows is a handful
 * of full-width vpdpbusd and one float fma, with no horizontal work at all.
 *
 * Layout: rows in groups of 16 (the last group zero-padded), and for each group and
 * block index b, contiguously:
 *   d[16]  fp16 scales of the 16 rows      (32 bytes)
 *   m[16]  fp16 mins (Q4_1 only)           (32 bytes)
 *   quants, 64-byte chunks: chunk c is, for row r = 0..15 in turn, the row's quant bytes
 *          4c .. 4c+3 (Q4: 4 chunks of the 16 nibble bytes; Q8_0: 8 chunks of 32).
 * That is the same number of bytes as GGUF (16 blocks of 18, 20 or 34), and the same
 * values: only the order changes. Nibble byte j of a Q4 block holds weights j (low) and
 * j + 16 (high), so chunk c's low nibbles meet activations 4c..4c+3 and its high nibbles
 * 16+4c..16+4c+3, each broadcast to all lanes.
 *
 * Activations: natural int8 order, one float scale per 32 and a float per block:
 * dx * sum(q) for Q4_1's min, -offset * dx * sum(q) for the symmetric types (sl_act).
 */
#include "blocks.h"

int sl_packed_supported(int qt) { return qt == SL_Q4_0 || qt == SL_Q4_1 || qt == SL_Q8_0; }

SL_INLINE int64_t header_bytes(int qt) { return qt == SL_Q4_1 ? 64 : 32; }

/* Bytes of one group's block: 16 GGUF blocks. */
SL_INLINE int64_t group_block_bytes(int qt) { return 16 * sl_type_size(qt); }

int64_t sl_packed_bytes(int qt, int64_t N, int64_t K) { return (N + 15) / 16 * (K / 32) * group_block_bytes(qt); }

void sl_pack_rows(int qt, const uint8_t *w, int64_t w_stride, int64_t N, int64_t K, int64_t g_begin, int64_t g_end,
                  uint8_t *out) {
    const int64_t nb = K / 32, ts = sl_type_size(qt), qs = ts - (qt == SL_Q8_0 ? 32 : 16);
    const int64_t gb = group_block_bytes(qt), hb = header_bytes(qt), chunks = qt == SL_Q8_0 ? 8 : 4;
    for (int64_t g = g_begin; g < g_end; g++) {
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *dst = out + (g * nb + b) * gb;
            memset(dst, 0, (size_t)gb);
            for (int r = 0; r < 16 && g * 16 + r < N; r++) {
                const uint8_t *blk = w + (g * 16 + r) * w_stride + b * ts;
                memcpy(dst + 2 * r, blk, 2);
                if (qt == SL_Q4_1) memcpy(dst + 32 + 2 * r, blk + 2, 2);
                for (int64_t c = 0; c < chunks; c++) memcpy(dst + hb + 64 * c + 4 * r, blk + qs + 4 * c, 4);
            }
        }
    }
}

/* Row n of a packed W back to its GGUF bytes. */
void sl_unpack_row(int qt, const uint8_t *packed, int64_t K, int64_t n, uint8_t *out) {
    const int64_t nb = K / 32, ts = sl_type_size(qt), qs = ts - (qt == SL_Q8_0 ? 32 : 16);
    const int64_t gb = group_block_bytes(qt), hb = header_bytes(qt), chunks = qt == SL_Q8_0 ? 8 : 4;
    const int64_t g = n / 16, r = n % 16;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *src = packed + (g * nb + b) * gb;
        uint8_t *blk = out + b * ts;
        memcpy(blk, src + 2 * r, 2);
        if (qt == SL_Q4_1) memcpy(blk + 2, src + 32 + 2 * r, 2);
        for (int64_t c = 0; c < chunks; c++) memcpy(blk + qs + 4 * c, src + hb + 64 * c + 4 * r, 4);
    }
}

/* The inverse of sl_pack_rows: groups [g_begin, g_end) back to GGUF rows (row stride
 * `out_stride`, rows past N skipped). */
void sl_unpack_rows(int qt, const uint8_t *packed, int64_t N, int64_t K, int64_t g_begin, int64_t g_end, uint8_t *out,
                    int64_t out_stride) {
    for (int64_t n = g_begin * 16; n < g_end * 16 && n < N; n++)
        sl_unpack_row(qt, packed, K, n, out + (n - g_begin * 16) * out_stride);
}

#if SL_AVX512
SL_INLINE __m512 f16x16(const uint8_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

SL_INLINE __m512i bcast4(const int8_t *p) { return _mm512_set1_epi32((int)sl_u32((const uint8_t *)p)); }

/* out rows [16 g, 16 g + 16) for activation rows m0 .. m0 + MR. */
SL_INLINE void group(const int qt, const int MR, const sl_problem *p, const uint8_t *packed, int64_t g, int64_t m0) {
    const sl_act *a = p->act;
    const int64_t K = a->K, nb = K / 32, gb = group_block_bytes(qt), hb = header_bytes(qt);
    __m512 acc[4];
    for (int i = 0; i < MR; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *hdr = packed + (g * nb + b) * gb, *q = hdr + hb;
        const __m512 d = f16x16(hdr);
        __m512i w[8];
        if (qt == SL_Q8_0) {
            for (int j = 0; j < 8; j++)
                w[j] = _mm512_xor_si512(_mm512_loadu_si512(q + 64 * j), _mm512_set1_epi8((char)0x80));
        } else {
            for (int c = 0; c < 4; c++) {
                const __m512i v = _mm512_loadu_si512(q + 64 * c);
                w[c] = _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
                w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F));
            }
        }
        for (int i = 0; i < MR; i++) {
            const int64_t xb = (m0 + i) * nb + b;
            const int8_t *x = a->q + xb * 32;
            /* w[j] meets activations 4j..4j+3 in both layouts (for Q4: j = c and c + 4). Two
             * independent chains halve the vpdpbusd latency on the critical path. */
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            for (int j = 0; j < 4; j++) {
                s0 = _mm512_dpbusd_epi32(s0, w[j], bcast4(x + 4 * j));
                s1 = _mm512_dpbusd_epi32(s1, w[j + 4], bcast4(x + 16 + 4 * j));
            }
            const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
            const __m512 dx = _mm512_set1_ps(a->d[xb]), s = _mm512_set1_ps(a->block_sums[xb]);
            if (qt == SL_Q4_1) {
                acc[i] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, dx), acc[i]);
                acc[i] = _mm512_fmadd_ps(f16x16(hdr + 32), s, acc[i]);
            } else {
                acc[i] = _mm512_fmadd_ps(_mm512_fmadd_ps(dot, dx, s), d, acc[i]);
            }
        }
    }
    const int64_t rows = p->N - 16 * g < 16 ? p->N - 16 * g : 16;
    const __mmask16 valid = (__mmask16)((1u << rows) - 1);
    for (int i = 0; i < MR; i++) _mm512_mask_storeu_ps(p->out + (m0 + i) * p->out_stride + 16 * g, valid, acc[i]);
}

SL_INLINE void groups(const int qt, const sl_problem *p, int64_t g_begin, int64_t g_end) {
    for (int64_t g = g_begin; g < g_end; g++) {
        int64_t m0 = 0;
        for (; m0 + 4 <= p->M; m0 += 4) group(qt, 4, p, p->w, g, m0);
        switch (p->M - m0) {
        case 3: group(qt, 3, p, p->w, g, m0); break;
        case 2: group(qt, 2, p, p->w, g, m0); break;
        case 1: group(qt, 1, p, p->w, g, m0); break;
        }
    }
}
#else
SL_INLINE void groups(const int qt, const sl_problem *p, int64_t g_begin, int64_t g_end) {
    const sl_act *a = p->act;
    const int64_t nb = a->K / 32, gb = group_block_bytes(qt), hb = header_bytes(qt);
    for (int64_t g = g_begin; g < g_end; g++) {
        for (int r = 0; r < 16 && 16 * g + r < p->N; r++) {
            for (int64_t m = 0; m < p->M; m++) {
                float acc = 0.0f;
                for (int64_t b = 0; b < nb; b++) {
                    const uint8_t *hdr = p->w + (g * nb + b) * gb, *q = hdr + hb;
                    const int64_t xb = m * nb + b;
                    const int8_t *x = a->q + xb * 32;
                    int32_t dot = 0;
                    for (int c = 0; c < (qt == SL_Q8_0 ? 8 : 4); c++) {
                        for (int t = 0; t < 4; t++) {
                            const uint8_t v = q[64 * c + 4 * r + t];
                            if (qt == SL_Q8_0)
                                dot += (int32_t)(v ^ 0x80) * x[4 * c + t];
                            else
                                dot += (int32_t)(v & 0x0F) * x[4 * c + t] + (int32_t)(v >> 4) * x[16 + 4 * c + t];
                        }
                    }
                    const float d = sl_f16(hdr + 2 * r), dx = a->d[xb], s = a->block_sums[xb];
                    if (qt == SL_Q4_1)
                        acc += dot * (d * dx) + sl_f16(hdr + 32 + 2 * r) * s;
                    else
                        acc += (dot * dx + s) * d;
                }
                p->out[m * p->out_stride + 16 * g + r] = acc;
            }
        }
    }
}
#endif

void sl_packed_rows(int qt, const sl_problem *p, int64_t g_begin, int64_t g_end) {
    switch (qt) {
    case SL_Q4_0: groups(SL_Q4_0, p, g_begin, g_end); break;
    case SL_Q4_1: groups(SL_Q4_1, p, g_begin, g_end); break;
    case SL_Q8_0: groups(SL_Q8_0, p, g_begin, g_end); break;
    }
}
