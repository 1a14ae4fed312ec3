/* Shared declarations of sprintllm's GGUF matmul kernels.
 *
 * The product x @ W^T is computed the way llama.cpp does it for small batches: every
 * activation row is quantized once to int8 (one float scale per block, plus the block's
 * integer sums), then each weight block is dotted with the matching activation block in
 * integers (AVX-512 VNNI `vpdpbusd`: unsigned 8-bit x signed 8-bit -> int32) and scaled in
 * float. Weight quants are always fed to `vpdpbusd` as *unsigned* bytes; a signed format
 * (Q4_0, Q5_0, Q8_0, Q6_K) is read as `q + offset` and the offset is taken back with the
 * activation block's integer sum, so no per-weight sign handling is needed.
 *
 * Kernels: legacy.c and kquants.c work on GGUF rows as stored; packed.c on Q4_0/Q4_1/Q8_0
 * repacked 16 rows side by side (the fast decode path); dequant.c dequantizes to
 * float32/bfloat16 for the large-batch path; matmul.c holds the entry points.
 *
 * With -march=native on a CPU with AVX-512 F/BW/VL/VNNI the SIMD paths are compiled;
 * otherwise the portable scalar code below each of them, which computes the same integers.
 */
#ifndef SL_COMMON_H
#define SL_COMMON_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define SL_AVX512 1
#include <immintrin.h>
#else
#define SL_AVX512 0
#endif

#define SL_INLINE static inline __attribute__((always_inline))

/* ggml type ids (enum ggml_type), as the Python side passes them. */
enum {
    SL_Q4_0 = 2,
    SL_Q4_1 = 3,
    SL_Q5_0 = 6,
    SL_Q5_1 = 7,
    SL_Q8_0 = 8,
    SL_Q4_K = 12,
    SL_Q5_K = 13,
    SL_Q6_K = 14,
};

/* Error codes returned to Python (0 = success). */
enum { SL_OK = 0, SL_ERR_TYPE = 1, SL_ERR_SHAPE = 2, SL_ERR_NOMEM = 3 };

/* How the activations are quantized and laid out, by kernel family. */
enum {
    SL_ACT_PAIRS = 0,  /* raw 32-weight formats (legacy.c): 32-blocks in pair layout (act.c) */
    SL_ACT_BLOCKS = 1, /* packed 32-weight formats (packed.c): 32-blocks, natural order */
    SL_ACT_SUPER = 2,  /* k-quants (kquants.c): one scale per 256, natural order */
};

/* Quantized activations, M rows of K values. One scale per 256 for the k-quants
 * (llama.cpp's Q8_K) lets their integer sub-block scales stay integer. */
typedef struct {
    int64_t K;
    int kind;            /* SL_ACT_* */
    int interleaved;     /* PAIRS: the 4-bit formats' pair layout (else Q8_0's) */
    int32_t offset;      /* the format's unsigned-quant offset (8, 16, 128; 0 with a min) */
    int8_t *q;           /* round(x / d), in [-127, 127] */
    /* PAIRS, per row and pair of blocks (np = ceil(K / 64) pairs per row): */
    float *lane_scale;   /* [M][np][16]: d of the block each int32 lane of the pair's dot sums */
    int32_t *lane_init;  /* [M][np][16]: -offset * sum(q) in each block's first lane, else 0 */
    float *pair_sums;    /* [M][np][4]: 0, d0 * sum(q0), 0, d1 * sum(q1) */
    /* BLOCKS and SUPER: */
    float *d;            /* [M][K / block]: amax / 127 (0 for an all-zero block) */
    /* BLOCKS: */
    float *block_sums;   /* [M][K / 32]: d * sum(q), times -offset for the symmetric formats */
    /* SUPER: */
    int32_t *sum32;      /* [M][K / 32]: sum of q over each 32 values */
    int32_t *sum16;      /* [M][K / 16]: sum of q over each 16 values (Q6_K's sub-blocks) */
} sl_act;

void sl_quantize_act_rows(const void *x, int x_bf16, int64_t m_begin, int64_t m_end, sl_act *a);

/* Each kernel computes out[m, n] for all m < M and n in [n_begin, n_end). */
typedef struct {
    const uint8_t *w; /* GGUF row n starts at w + n * w_stride (packed: the packed weight) */
    int64_t w_stride;
    int64_t N;
    int64_t M;
    const sl_act *act;
    float *out; /* [M][N], row m at out + m * out_stride */
    int64_t out_stride;
} sl_problem;

int sl_legacy_supported(int qtype);
int sl_packed_supported(int qtype);
int sl_kquant_supported(int qtype);
void sl_legacy_rows(int qtype, const sl_problem *p, int64_t n_begin, int64_t n_end);
void sl_kquant_rows(int qtype, const sl_problem *p, int64_t n_begin, int64_t n_end);
void sl_packed_rows(int qtype, const sl_problem *p, int64_t g_begin, int64_t g_end);
int64_t sl_packed_bytes(int qtype, int64_t N, int64_t K);
void sl_pack_rows(int qtype, const uint8_t *w, int64_t w_stride, int64_t N, int64_t K, int64_t g_begin,
                  int64_t g_end, uint8_t *out);
void sl_unpack_row(int qtype, const uint8_t *packed, int64_t K, int64_t n, uint8_t *out);
void sl_unpack_rows(int qtype, const uint8_t *packed, int64_t N, int64_t K, int64_t g_begin, int64_t g_end,
                    uint8_t *out, int64_t out_stride);
void sl_dequantize_rows(int qtype, const uint8_t *w, int64_t w_stride, int64_t K, int64_t n_begin,
                        int64_t n_end, void *out, int out_bf16);

/* IEEE half -> float, exact for every input (normal, subnormal, inf, nan). */
SL_INLINE float sl_f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if SL_AVX512
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: man * 2^-24, exact in float */
        float f = (float)man * (1.0f / 16777216.0f);
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

#if SL_AVX512
SL_INLINE float sl_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 bytes of nibbles -> 32 unsigned quants: the low nibbles first, then the high ones
 * (ggml's plane order within a run). */
SL_INLINE __m256i sl_nibbles16(const uint8_t *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}
#endif

#endif
