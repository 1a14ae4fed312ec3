/* Native decode forward: every decoder layer of a Llama-family model (pre-norm, RMSNorm,
 * neox RoPE, GQA over the paged KV cache, SwiGLU MLP) for B decode tokens -- one new token
 * per sequence -- in one call and one OpenMP parallel region.
 *
 * Why: a decode step of a small model is ~40 torch ops per layer at ~5 us each, more than
 * the matmuls themselves. Here the team stays up for the whole forward and meets only at
 * barriers, six per layer:
 *
 *   qkv matmul | K/V rope + cache write | attention | o matmul | gate_up matmul | down matmul
 *
 * Matmuls share their output columns out in dynamic chunks (matmul.c's chunking, all of a
 * linear's segments in one loop); the cache write and attention go by (sequence, KV head).
 * The small vector work between them (residual add, RMSNorm, SiLU, activation quantization)
 * needs no barrier of its own: below SL_DECODE_SPLIT_ROWS rows every thread computes it
 * redundantly into its own slot of the workspace (its own residual stream and quantized
 * activations), which costs less than a barrier; from there on the rows are split between
 * the threads, in shared buffers, with a barrier after each.
 *
 * Numerics follow the torch model: float32 throughout, activations quantized to int8 per
 * block exactly as sl_plan_matmul does (same kernels), K/V rounded to the cache dtype
 * (bfloat16: round to nearest even), attention in float32 with a streaming softmax.
 */
#include <math.h>
#include <stdlib.h>

#include "matmul.h"

/* Rows from which the vector work is split between threads instead of repeated by each. */
#define SL_DECODE_SPLIT_ROWS 4
#define SL_MAX_SEGMENTS 4
#define SL_MAX_HEAD_DIM 256

/* Errors beyond common.h's, with the offending sequence in ws->error_index. */
enum { SL_ERR_POSITION = 10, SL_ERR_SEQ_LEN = 11, SL_ERR_SLOT = 12, SL_ERR_BLOCK = 13 };

/* The structs below are mirrored by ctypes in sprintllm/kernels/decode.py. */

/* y[:, offset : offset + plan.N] = x @ W^T; a linear's segments cover its output exactly. */
typedef struct {
    sl_plan plan;
    int64_t offset;
} sl_segment;

typedef struct {
    const sl_segment *segs;
    int64_t n_segs;
} sl_linear;

typedef struct {
    const float *input_norm, *post_norm;
    const float *qkv_bias; /* [(Hq + 2 Hkv) D] or NULL */
    void *k_cache, *v_cache; /* [num_blocks, block_size, Hkv, D], float32 or bfloat16 */
    sl_linear qkv, o, gate_up, down;
    int64_t window; /* sliding window, 0 for none */
} sl_layer;

typedef struct {
    const sl_layer *layers;
    int64_t n_layers, hidden, n_heads, n_kv_heads, head_dim, inter;
    int64_t block_size, num_blocks, cache_bf16;
    int64_t max_pos;      /* rows of cos/sin */
    int64_t max_window;   /* largest window if every layer has one, else 0 (input checks) */
    const float *cos, *sin; /* [max_pos, D / 2] */
    const float *final_norm;
    float eps, scale;
} sl_decoder;

/* Grow-only workspace, owned by the caller's handle (freed by sl_decode_ws_free). */
typedef struct {
    void *buf;
    int64_t rows, threads, act_bytes, error_index;
} sl_decode_ws;

/* ---- small vector helpers -------------------------------------------------------------- */

#if SL_AVX512
/* e^x, about 2 ulp: x = n ln2 + r, |r| <= ln2 / 2, degree-7 Taylor in r, scaled by 2^n. */
SL_INLINE __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(89.0f)), _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x); /* ln2, high bits: n * it is exact */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

SL_INLINE __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }
#endif

static float sum_squares(const float *x, int64_t n) {
#if SL_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(tail_mask(n - i), x + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += x[i] * x[i];
    return s;
#endif
}

/* Rows [r0, r1) of resid (+= add, if given), then dst = w * (resid / rms(resid)). */
static void add_rmsnorm(const float *add, float *resid, const float *w, float eps, int64_t n, int64_t r0, int64_t r1,
                        float *dst) {
    for (int64_t b = r0; b < r1; b++) {
        float *r = resid + b * n, *d = dst + b * n;
        if (add)
            for (int64_t i = 0; i < n; i++) r[i] += add[b * n + i];
        const float inv = 1.0f / sqrtf(sum_squares(r, n) / (float)n + eps);
        for (int64_t i = 0; i < n; i++) d[i] = w[i] * (r[i] * inv);
    }
}

/* Rows [r0, r1): dst[b, i] = silu(gu[b, i]) * gu[b, n + i], silu(x) = x / (1 + e^-x). */
static void silu_mul(const float *gu, int64_t n, int64_t r0, int64_t r1, float *dst) {
    for (int64_t b = r0; b < r1; b++) {
        const float *g = gu + b * 2 * n, *u = g + n;
        float *d = dst + b * n;
#if SL_AVX512
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 k = tail_mask(n - i);
            const __m512 x = _mm512_maskz_loadu_ps(k, g + i);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
            const __m512 s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            _mm512_mask_storeu_ps(d + i, k, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, u + i)));
        }
#else
        for (int64_t i = 0; i < n; i++) d[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
#endif
    }
}

/* neox RoPE of one head in place: x = [x1 | x2] -> [x1 c - x2 s | x2 c + x1 s]. */
static void rope(float *x, const float *c, const float *s, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[half + i];
        x[i] = x1 * c[i] - x2 * s[i];
        x[half + i] = x2 * c[i] + x1 * s[i];
    }
}

SL_INLINE uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}

SL_INLINE float kv_at(const int bf16, const void *base, int64_t i) {
    if (!bf16) return ((const float *)base)[i];
    const uint32_t bits = (uint32_t)((const uint16_t *)base)[i] << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ---- attention ------------------------------------------------------------------------- */

/* A unit attends for (a run of) the query heads that share one KV head, so each K and V row
 * is read from memory once for all of them. Keys go a chunk at a time: scores of the chunk
 * (on the stack), softmax with each head's running max, then the V sum; within a chunk the
 * K rows (then the V rows) are independent loads, prefetched ahead. (Scoring and V-summing
 * 16 keys at a time with the softmax in between waited on DRAM at each step, 3x slower at
 * B = 8. Units of whole cache rows -- all KV heads of a sequence -- were 5% slower.) */
#define SL_ATTN_CHUNK 128
#define SL_MAX_GROUP 16 /* query heads per attention unit */

/* The keys of one sequence: key j's row of the cache starts at element
 * (table[j / block_size] * block_size + j % block_size) * row. */
typedef struct {
    const int32_t *table;
    int64_t block_size, row;
    int64_t lo, hi; /* visible keys [lo, hi) */
} key_range;

static void key_offsets(const key_range *kr, int64_t j0, int64_t n, int64_t *at) {
    int64_t jb = j0 / kr->block_size, jo = j0 % kr->block_size;
    for (int64_t i = 0; i < n; i++) {
        at[i] = ((int64_t)kr->table[jb] * kr->block_size + jo) * kr->row;
        if (++jo == kr->block_size) jo = 0, jb++;
    }
}

/* One KV head's K and V: element at + d of each is the head's d-th value of the key whose
 * row starts at `at`; a head's values span `bytes`. */
typedef struct {
    const void *k, *v;
    int64_t bytes;
} kv_head;

#if SL_AVX512
SL_INLINE __m512 kv_load16(const int bf16, const void *base, int64_t i) {
    if (!bf16) return _mm512_loadu_ps((const float *)base + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Lane i = the sum of all lanes of v[i]: three halving steps across the 128-bit chunks and
 * lanes of pairs of vectors, then one permutation (the steps leave v[4i + k] in lane 4k + i). */
SL_INLINE __m512 hsum16(const __m512 v[16]) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[2 * i], b[2 * i + 1]), _mm512_unpackhi_ps(b[2 * i], b[2 * i + 1]));
    const __m512d c0 = _mm512_castps_pd(c[0]), c1 = _mm512_castps_pd(c[1]);
    const __m512 d = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c0, c1)),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(c0, c1)));
    return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), d);
}

/* Into L2: the L1 fill buffers are too few to cover DRAM latency. */
SL_INLINE void prefetch_rows(const void *base, int esize, const int64_t *at, int64_t n, int64_t bytes) {
    for (int64_t i = 0; i < n; i++)
        for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch((const char *)base + at[i] * esize + b, _MM_HINT_T2);
}

/* s[h][i] = scale * q_h . K[at[i]] for the G heads q[G][D], 16 keys per step (D = 16 DV): the
 * keys' K rows come from memory for the first head, from L1 for the others. Prefetches the
 * next 16 keys' K rows and these keys' V rows. */
SL_INLINE void scores16(const int bf16, const int64_t DV, const float *q, int64_t G, const kv_head *kh,
                        const int64_t *at, int64_t n, float scale, float (*s)[SL_ATTN_CHUNK]) {
    const int esize = bf16 ? 2 : 4;
    prefetch_rows(kh->k, esize, at, n < 16 ? n : 16, kh->bytes);
    for (int64_t i0 = 0; i0 < n; i0 += 16) {
        const int64_t m = n - i0 < 16 ? n - i0 : 16, next = n - i0 - 16 < 16 ? n - i0 - 16 : 16;
        if (next > 0) prefetch_rows(kh->k, esize, at + i0 + 16, next, kh->bytes);
        prefetch_rows(kh->v, esize, at + i0, m, kh->bytes);
        for (int64_t h = 0; h < G; h++) {
            __m512 qv[SL_MAX_HEAD_DIM / 16], part[16];
            for (int64_t v = 0; v < DV; v++) qv[v] = _mm512_loadu_ps(q + h * DV * 16 + 16 * v);
            for (int64_t i = 0; i < 16; i++) {
                part[i] = _mm512_setzero_ps();
                if (i < m)
                    for (int64_t v = 0; v < DV; v++)
                        part[i] = _mm512_fmadd_ps(qv[v], kv_load16(bf16, kh->k, at[i0 + i] + 16 * v), part[i]);
            }
            _mm512_mask_storeu_ps(s[h] + i0, tail_mask(m), _mm512_mul_ps(hsum16(part), _mm512_set1_ps(scale)));
        }
    }
}

/* acc[h][D] += sum_i p[h][i] V[at[i]] for the G heads: each V row is loaded once for up to
 * 16 / DV heads, whose accumulators stay in registers. */
SL_INLINE void accumulate16(const int bf16, const int64_t DV, float (*p)[SL_ATTN_CHUNK], int64_t G, const kv_head *kh,
                            const int64_t *at, int64_t n, float *acc) {
    enum { REGS = 16 };
    const int64_t HG = DV < REGS ? REGS / DV : 1, D = 16 * DV;
    for (int64_t h0 = 0; h0 < G; h0 += HG) {
        const int64_t hg = G - h0 < HG ? G - h0 : HG;
        __m512 a[REGS];
        for (int64_t h = 0; h < HG; h++)
            for (int64_t v = 0; v < DV; v++)
                a[h * DV + v] = h < hg ? _mm512_loadu_ps(acc + (h0 + h) * D + 16 * v) : _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i++) {
            __m512 row[SL_MAX_HEAD_DIM / 16];
            for (int64_t v = 0; v < DV; v++) row[v] = kv_load16(bf16, kh->v, at[i] + 16 * v);
            for (int64_t h = 0; h < HG; h++) {
                if (h >= hg) break;
                const __m512 w = _mm512_set1_ps(p[h0 + h][i]);
                for (int64_t v = 0; v < DV; v++) a[h * DV + v] = _mm512_fmadd_ps(w, row[v], a[h * DV + v]);
            }
        }
        for (int64_t h = 0; h < HG; h++)
            for (int64_t v = 0; v < DV; v++)
                if (h < hg) _mm512_storeu_ps(acc + (h0 + h) * D + 16 * v, a[h * DV + v]);
    }
}
#endif

/* The SIMD kernels with the head size as a compile-time constant (so that q and the
 * accumulators live in registers) for the usual sizes, else as a runtime value. */
#define SL_BY_HEAD_SIZE(D, F, ...)                                                                 \
    switch ((D) / 16) {                                                                        \
    case 1: F(1, __VA_ARGS__); break;                                                          \
    case 2: F(2, __VA_ARGS__); break;                                                          \
    case 4: F(4, __VA_ARGS__); break;                                                          \
    case 8: F(8, __VA_ARGS__); break;                                                          \
    default: F((D) / 16, __VA_ARGS__); break;                                                  \
    }
#define SL_SCORES16(DV, bf16, ...) ((bf16) ? scores16(1, DV, __VA_ARGS__) : scores16(0, DV, __VA_ARGS__))
#define SL_ACCUMULATE16(DV, bf16, ...) ((bf16) ? accumulate16(1, DV, __VA_ARGS__) : accumulate16(0, DV, __VA_ARGS__))

static void scores(const int bf16, const float *q, int64_t G, int64_t D, const kv_head *kh, const int64_t *at,
                   int64_t n, float scale, float (*s)[SL_ATTN_CHUNK]) {
#if SL_AVX512
    if (D % 16 == 0) {
        SL_BY_HEAD_SIZE(D, SL_SCORES16, bf16, q, G, kh, at, n, scale, s)
        return;
    }
#endif
    for (int64_t h = 0; h < G; h++) {
        for (int64_t i = 0; i < n; i++) {
            float dot = 0.0f;
            for (int64_t d = 0; d < D; d++) dot += q[h * D + d] * kv_at(bf16, kh->k, at[i] + d);
            s[h][i] = scale * dot;
        }
    }
}

static void accumulate(const int bf16, float (*p)[SL_ATTN_CHUNK], int64_t G, int64_t D, const kv_head *kh,
                       const int64_t *at, int64_t n, float *acc) {
#if SL_AVX512
    if (D % 16 == 0) {
        SL_BY_HEAD_SIZE(D, SL_ACCUMULATE16, bf16, p, G, kh, at, n, acc)
        return;
    }
#endif
    for (int64_t h = 0; h < G; h++)
        for (int64_t i = 0; i < n; i++)
            for (int64_t d = 0; d < D; d++) acc[h * D + d] += p[h][i] * kv_at(bf16, kh->v, at[i] + d);
}

/* s[i] = e^(s[i] - max), with the running max and sum of one head moved to the new max
 * (its accumulator acc[D] rescaled to match). */
static void softmax_step(float *s, int64_t n, float *mx, float *l, float *acc, int64_t D) {
    float top = *mx;
#if SL_AVX512
    __m512 t = _mm512_set1_ps(top);
    for (int64_t i = 0; i < n; i += 16) t = _mm512_max_ps(t, _mm512_mask_loadu_ps(t, tail_mask(n - i), s + i));
    top = _mm512_reduce_max_ps(t);
#else
    for (int64_t i = 0; i < n; i++) top = s[i] > top ? s[i] : top;
#endif
    if (top > *mx) {
        const float c = expf(*mx - top);
        for (int64_t d = 0; d < D; d++) acc[d] *= c;
        *l *= c;
        *mx = top;
    }
    float sum = 0.0f;
#if SL_AVX512
    t = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail_mask(n - i);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), _mm512_set1_ps(top)));
        _mm512_mask_storeu_ps(s + i, k, e);
        t = _mm512_add_ps(t, _mm512_maskz_mov_ps(k, e));
    }
    sum = _mm512_reduce_add_ps(t);
#else
    for (int64_t i = 0; i < n; i++) sum += s[i] = expf(s[i] - top);
#endif
    *l += sum;
}

/* softmax(scale q_h . K) @ V for the G <= SL_MAX_GROUP query heads q[G][D] (rotated) that
 * share KV head g, into out[G][D]. Each head's arithmetic is the same whichever heads share
 * the call, so results do not depend on how a group is split into units. */
static void attend(const int bf16, const void *k_cache, const void *v_cache, const key_range *kr, int64_t g,
                   const float *q, int64_t G, int64_t D, float scale, float *out) {
    const int64_t esize = bf16 ? 2 : 4;
    const kv_head kh = {(const char *)k_cache + g * D * esize, (const char *)v_cache + g * D * esize, D * esize};
    int64_t at[SL_ATTN_CHUNK];
    float s[SL_MAX_GROUP][SL_ATTN_CHUNK], mx[SL_MAX_GROUP], l[SL_MAX_GROUP];
    for (int64_t h = 0; h < G; h++) mx[h] = -INFINITY, l[h] = 0.0f;
    memset(out, 0, (size_t)(G * D) * sizeof(float));
    for (int64_t j0 = kr->lo; j0 < kr->hi; j0 += SL_ATTN_CHUNK) {
        const int64_t n = kr->hi - j0 < SL_ATTN_CHUNK ? kr->hi - j0 : SL_ATTN_CHUNK;
        key_offsets(kr, j0, n, at);
        scores(bf16, q, G, D, &kh, at, n, scale, s);
        for (int64_t h = 0; h < G; h++) softmax_step(s[h], n, &mx[h], &l[h], out + h * D, D);
        accumulate(bf16, s, G, D, &kh, at, n, out);
    }
    for (int64_t h = 0; h < G; h++)
        for (int64_t d = 0; d < D; d++) out[h * D + d] /= l[h];
}

/* ---- the forward ----------------------------------------------------------------------- */

/* Pointers into the workspace. Shared: the matmul outputs and attention output. Per slot
 * (one per thread, or slot 0 for all when rows are split): residual stream, normed or
 * gated vector, quantized activations. */
typedef struct {
    float *qkv, *attn, *o, *gu, *down;
    uint8_t *slots;
    size_t slot_bytes, vec_off, act_off;
} ws_view;

#define ALIGN64(n) (((size_t)(n) + 63) / 64 * 64)

static size_t ws_layout(const sl_decoder *m, int64_t rows, int64_t threads, size_t act_bytes, uint8_t *base,
                        ws_view *v) {
    const int64_t H = m->hidden, D = m->head_dim, I = m->inter;
    const size_t f = sizeof(float);
    const size_t shared[5] = {ALIGN64(rows * (m->n_heads + 2 * m->n_kv_heads) * D * f),
                              ALIGN64(rows * m->n_heads * D * f), ALIGN64(rows * H * f), ALIGN64(rows * 2 * I * f),
                              ALIGN64(rows * H * f)};
    const size_t resid = ALIGN64(rows * H * f), vec = ALIGN64(rows * (H > I ? H : I) * f);
    const size_t slot = resid + vec + ALIGN64(act_bytes);
    size_t total = 0;
    float *part[5];
    for (int i = 0; i < 5; i++) part[i] = base ? (float *)(base + total) : NULL, total += shared[i];
    if (v)
        *v = (ws_view){part[0], part[1], part[2], part[3], part[4], base ? base + total : NULL, slot, resid,
                       resid + vec};
    return total + (size_t)threads * slot;
}

/* Bytes of quantized activations the largest linear needs for `rows` rows. */
static size_t act_bytes_for(const sl_decoder *m, int64_t rows) {
    size_t most = 0;
    for (int64_t l = 0; l < m->n_layers; l++) {
        const sl_linear *lin[4] = {&m->layers[l].qkv, &m->layers[l].o, &m->layers[l].gate_up, &m->layers[l].down};
        for (int i = 0; i < 4; i++) {
            size_t bytes = 0;
            for (int64_t s = 0; s < lin[i]->n_segs; s++) {
                const sl_plan *p = &lin[i]->segs[s].plan;
                bytes += sl_act_carve(NULL, sl_act_kind(p->packed, p->qtype), p->qtype, rows, p->K, NULL);
            }
            most = bytes > most ? bytes : most;
        }
    }
    return most;
}

static int ensure_ws(const sl_decoder *m, sl_decode_ws *ws, int64_t rows, int64_t threads) {
    if (ws->buf && rows <= ws->rows && threads <= ws->threads) return SL_OK;
    rows = rows > ws->rows ? rows : ws->rows;
    threads = threads > ws->threads ? threads : ws->threads;
    const size_t act = act_bytes_for(m, rows), size = ws_layout(m, rows, threads, act, NULL, NULL);
    void *buf = aligned_alloc(64, ALIGN64(size));
    if (!buf) return SL_ERR_NOMEM;
    free(ws->buf);
    *ws = (sl_decode_ws){buf, rows, threads, (int64_t)act, -1};
    return SL_OK;
}

void sl_decode_ws_free(sl_decode_ws *ws) {
    free(ws->buf);
    ws->buf = NULL;
    ws->rows = ws->threads = ws->act_bytes = 0;
}

typedef struct {
    const sl_decoder *m;
    const float *x;
    int64_t B;
    const int64_t *pos, *slots;
    const int32_t *tables;
    int64_t table_stride;
    const int32_t *seq_lens;
    float *out;
    ws_view w;
    int64_t start_ns, done_ns, wait_ns; /* the calling thread's, for the contention guard */
} job;

/* A barrier; the calling thread notes how long it waited. */
static void sync_team(job *J) {
    if (omp_get_num_threads() == 1) return;
    const int main_thread = omp_get_thread_num() == 0;
    const int64_t t = main_thread ? sl_now_ns() : 0;
#pragma omp barrier
    if (main_thread) J->wait_ns += sl_now_ns() - t;
}

/* Quantized activations of one linear: one set per distinct kind of its segments. */
typedef struct {
    sl_act act[SL_MAX_SEGMENTS];
    const sl_act *use[SL_MAX_SEGMENTS];
} lin_acts;

/* Quantize rows [r0, r1) of x [M, K] for every segment of `lin` into `region`. Every
 * thread carves the same layout, so with a shared region each may quantize its own rows. */
static void quantize_for(const sl_linear *lin, const float *x, int64_t M, int64_t r0, int64_t r1, uint8_t *region,
                         lin_acts *la) {
    for (int64_t s = 0; s < lin->n_segs; s++) {
        const sl_plan *p = &lin->segs[s].plan;
        const int kind = sl_act_kind(p->packed, p->qtype);
        la->use[s] = NULL;
        for (int64_t t = 0; t < s && !la->use[s]; t++) {
            const sl_act *a = la->use[t];
            if (a->kind == kind && a->offset == sl_offset(p->qtype) && a->interleaved == (p->qtype != SL_Q8_0))
                la->use[s] = a;
        }
        if (la->use[s]) continue;
        region += sl_act_carve(&la->act[s], kind, p->qtype, M, p->K, region);
        sl_quantize_act_rows(x, 0, r0, r1, &la->act[s]);
        la->use[s] = &la->act[s];
    }
}

/* out[M, out_stride] = x @ W^T over all of lin's segments, shared out by chunks; no barrier. */
static void linear_run(const sl_linear *lin, const lin_acts *la, int64_t M, float *out, int64_t out_stride) {
    const int nt = omp_get_num_threads();
    int64_t units[SL_MAX_SEGMENTS], per[SL_MAX_SEGMENTS], chunks[SL_MAX_SEGMENTS], total = 0;
    for (int64_t s = 0; s < lin->n_segs; s++) {
        const int64_t unit = sl_matmul_unit(lin->segs[s].plan.packed);
        units[s] = (lin->segs[s].plan.N + unit - 1) / unit;
        per[s] = sl_matmul_chunk(units[s], nt);
        chunks[s] = per[s] ? (units[s] + per[s] - 1) / per[s] : 0;
        total += chunks[s];
    }
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t c = 0; c < total; c++) {
        int64_t s = 0, k = c;
        while (k >= chunks[s]) k -= chunks[s++];
        const sl_segment *seg = &lin->segs[s];
        const sl_problem p = {seg->plan.w, seg->plan.w_stride, seg->plan.N, M,
                              la->use[s], out + seg->offset, out_stride};
        const int64_t u0 = k * per[s], u1 = u0 + per[s] < units[s] ? u0 + per[s] : units[s];
        sl_matmul_units(seg->plan.packed, seg->plan.qtype, &p, u0, u1);
    }
}

/* Head h's D values of qkv row b, plus its bias, rotated to position `pos` if asked. */
static void head_of(const job *J, const sl_layer *L, int64_t b, int64_t h, int rotate, float *dst) {
    const sl_decoder *m = J->m;
    const int64_t D = m->head_dim, half = D / 2, width = (m->n_heads + 2 * m->n_kv_heads) * D;
    const float *src = J->w.qkv + b * width + h * D;
    for (int64_t i = 0; i < D; i++) dst[i] = L->qkv_bias ? src[i] + L->qkv_bias[h * D + i] : src[i];
    if (rotate) rope(dst, m->cos + J->pos[b] * half, m->sin + J->pos[b] * half, half);
}

static void store_head(const sl_decoder *m, void *cache, int64_t at, const float *x) {
    if (m->cache_bf16)
        for (int64_t i = 0; i < m->head_dim; i++) ((uint16_t *)cache)[at + i] = to_bf16(x[i]);
    else
        memcpy((float *)cache + at, x, (size_t)m->head_dim * sizeof(float));
}

/* Sequence b's new K and V of KV head g into its cache slot (a negative slot: not stored). */
static void write_kv(const job *J, const sl_layer *L, int64_t b, int64_t g) {
    const sl_decoder *m = J->m;
    if (J->slots[b] < 0) return;
    const int64_t at = (J->slots[b] * m->n_kv_heads + g) * m->head_dim;
    float x[SL_MAX_HEAD_DIM];
    head_of(J, L, b, m->n_heads + g, 1, x);
    store_head(m, L->k_cache, at, x);
    head_of(J, L, b, m->n_heads + m->n_kv_heads + g, 0, x);
    store_head(m, L->v_cache, at, x);
}

/* Query heads [h0, h1) of sequence b, all of KV head g's group or part of it. */
static void attention_unit(const job *J, const sl_layer *L, int64_t b, int64_t g, int64_t h0, int64_t h1) {
    const sl_decoder *m = J->m;
    const int64_t D = m->head_dim, pos = J->pos[b];
    float q[SL_MAX_GROUP * SL_MAX_HEAD_DIM];
    for (int64_t h = h0; h < h1; h++) head_of(J, L, b, h, 1, q + (h - h0) * D);
    const int64_t lo = L->window && pos - L->window + 1 > 0 ? pos - L->window + 1 : 0;
    const key_range kr = {J->tables + b * J->table_stride, m->block_size, m->n_kv_heads * D, lo, J->seq_lens[b]};
    attend((int)m->cache_bf16, L->k_cache, L->v_cache, &kr, g, q, h1 - h0, D, m->scale,
           J->w.attn + (b * m->n_heads + h0) * D);
}

/* Run by every thread of the team (or alone). */
static void body(job *J) {
    const sl_decoder *m = J->m;
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    const int split = nt > 1 && J->B >= SL_DECODE_SPLIT_ROWS;
    const int64_t B = J->B, H = m->hidden, I = m->inter, Hq = m->n_heads, Hkv = m->n_kv_heads;
    const int64_t qkv_width = (Hq + 2 * Hkv) * m->head_dim;
    if (tid == 0) J->start_ns = sl_now_ns();
    /* Attention units: (sequence, KV head, a run of at most SL_MAX_GROUP of its query heads).
     * Splitting a group further, to give the team more units at B = 1, was slower: the
     * group's K/V rows were then fetched from DRAM once per unit. */
    const int64_t G = Hq / Hkv, pieces = (G + SL_MAX_GROUP - 1) / SL_MAX_GROUP;
    int64_t r0 = 0, r1 = B;
    if (split) {
        const int64_t per = (B + nt - 1) / nt;
        r0 = tid * per < B ? tid * per : B;
        r1 = r0 + per < B ? r0 + per : B;
    }
    uint8_t *slot = J->w.slots + (size_t)(split ? 0 : tid) * J->w.slot_bytes;
    float *resid = (float *)slot, *vec = (float *)(slot + J->w.vec_off);
    uint8_t *act = slot + J->w.act_off;
    lin_acts la;

    memcpy(resid + r0 * H, J->x + r0 * H, (size_t)((r1 - r0) * H) * sizeof(float));
    for (int64_t l = 0; l < m->n_layers; l++) {
        const sl_layer *L = &m->layers[l];
        add_rmsnorm(l ? J->w.down : NULL, resid, L->input_norm, m->eps, H, r0, r1, vec);
        quantize_for(&L->qkv, vec, B, r0, r1, act, &la);
        if (split) sync_team(J);
        linear_run(&L->qkv, &la, B, J->w.qkv, qkv_width);
        sync_team(J);
#pragma omp for schedule(static) nowait
        for (int64_t u = 0; u < B * Hkv; u++) write_kv(J, L, u / Hkv, u % Hkv);
        sync_team(J);
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t u = 0; u < B * Hkv * pieces; u++) {
            const int64_t b = u / (Hkv * pieces), g = u / pieces % Hkv, k = u % pieces;
            attention_unit(J, L, b, g, g * G + k * G / pieces, g * G + (k + 1) * G / pieces);
        }
        sync_team(J);
        quantize_for(&L->o, J->w.attn, B, r0, r1, act, &la);
        if (split) sync_team(J);
        linear_run(&L->o, &la, B, J->w.o, H);
        sync_team(J);
        add_rmsnorm(J->w.o, resid, L->post_norm, m->eps, H, r0, r1, vec);
        quantize_for(&L->gate_up, vec, B, r0, r1, act, &la);
        if (split) sync_team(J);
        linear_run(&L->gate_up, &la, B, J->w.gu, 2 * I);
        sync_team(J);
        silu_mul(J->w.gu, I, r0, r1, vec);
        quantize_for(&L->down, vec, B, r0, r1, act, &la);
        if (split) sync_team(J);
        linear_run(&L->down, &la, B, J->w.down, H);
        sync_team(J);
    }
    if (split || tid == 0) add_rmsnorm(J->w.down, resid, m->final_norm, m->eps, H, r0, r1, J->out);
    if (tid == 0) J->done_ns = sl_now_ns();
}

/* Every index the forward will follow, checked before it starts. */
static int check_inputs(const sl_decoder *m, sl_decode_ws *ws, int64_t B, const int64_t *pos, const int64_t *slots,
                        const int32_t *tables, int64_t table_stride, const int32_t *seq_lens) {
    const int64_t bs = m->block_size;
    for (int64_t b = 0; b < B; b++) {
        ws->error_index = b;
        if (pos[b] < 0 || pos[b] >= m->max_pos) return SL_ERR_POSITION;
        if (seq_lens[b] <= pos[b] || seq_lens[b] > table_stride * bs) return SL_ERR_SEQ_LEN;
        if (slots[b] >= m->num_blocks * bs) return SL_ERR_SLOT;
        const int64_t lo = m->max_window && pos[b] - m->max_window + 1 > 0 ? pos[b] - m->max_window + 1 : 0;
        for (int64_t j = lo / bs; j < (seq_lens[b] + bs - 1) / bs; j++) {
            const int32_t id = tables[b * table_stride + j];
            if (id < 0 || id >= m->num_blocks) return SL_ERR_BLOCK;
        }
    }
    ws->error_index = -1;
    return SL_OK;
}

/* out[B, hidden] = final_norm(the decoder layers applied to x[B, hidden]), writing each
 * token's K/V into its cache slot. Sequence b's query is at positions[b]; it attends to
 * keys [0, seq_lens[b]) (from positions[b] - window + 1 on a sliding-window layer) through
 * its row of block_tables (rows table_stride apart). */
int sl_decode_forward(const sl_decoder *m, sl_decode_ws *ws, const float *x, int64_t B, const int64_t *positions,
                      const int64_t *slots, const int32_t *block_tables, int64_t table_stride,
                      const int32_t *seq_lens, float *out) {
    if (B <= 0) return B < 0 ? SL_ERR_SHAPE : SL_OK;
    int rc = check_inputs(m, ws, B, positions, slots, block_tables, table_stride, seq_lens);
    if (rc) return rc;
    int threads = omp_get_max_threads();
    if (threads > 1 && sl_contention_take(4 * m->n_layers)) threads = 1;
    if ((rc = ensure_ws(m, ws, B, threads))) return rc;
    job J = {m, x, B, positions, slots, block_tables, table_stride, seq_lens, out, {0}, 0, 0, 0};
    ws_layout(m, ws->rows, ws->threads, (size_t)ws->act_bytes, ws->buf, &J.w);
    if (threads == 1) {
        body(&J);
        return SL_OK;
    }
    const int64_t start = sl_now_ns();
#pragma omp parallel num_threads(threads)
    body(&J);
    const int64_t work = J.done_ns - J.start_ns - J.wait_ns;
    sl_contention_note(sl_now_ns() - start - work, work);
    return SL_OK;
}
