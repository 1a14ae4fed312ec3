/* Embedding lookup on a quantized table: only the rows a batch asks for are dequantized, so
 * the table stays in its block format (a tied LM head multiplies by the same bytes). */
#include <stdlib.h>

#include "blocks.h"

/* out[i] = row ids[i] of W [N, K] (float32, or bfloat16 if out_bf16). W is GGUF rows
 * `w_stride` bytes apart, or the packed layout of sl_pack when `packed`. */
int sl_gather_rows(const uint8_t *w, int64_t w_stride, int packed, int qtype, int64_t N, int64_t K,
                   const int64_t *ids, int64_t n, void *out, int out_bf16) {
    const int legacy = sl_legacy_supported(qtype);
    if (packed ? !sl_packed_supported(qtype) : !legacy && !sl_kquant_supported(qtype)) return SL_ERR_TYPE;
    if (K <= 0 || K % (legacy ? 32 : 256)) return SL_ERR_SHAPE;
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= N) return SL_ERR_SHAPE;
    const int64_t rb = K / (legacy ? 32 : 256) * sl_type_size(qtype), elt = out_bf16 ? 2 : 4;
    uint8_t *row = packed ? malloc((size_t)rb) : NULL;
    if (packed && !row) return SL_ERR_NOMEM;
    for (int64_t i = 0; i < n; i++) {
        uint8_t *dst = (uint8_t *)out + i * K * elt;
        if (packed) {
            sl_unpack_row(qtype, w, K, ids[i], row);
            sl_dequantize_rows(qtype, row, rb, K, 0, 1, dst, out_bf16);
        } else {
            /* sl_dequantize_rows writes row n at out + n * K: point it at the one row. */
            sl_dequantize_rows(qtype, w + ids[i] * w_stride, w_stride, K, 0, 1, dst, out_bf16);
        }
    }
    free(row);
    return SL_OK;
}
