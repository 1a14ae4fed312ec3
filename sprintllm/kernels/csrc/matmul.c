/* Entry points called from Python through ctypes.
 *
 * Threads come from OpenMP. torch's CPU build ships its own libgomp.so.1 and loads it
 * before this library; our NEEDED libgomp.so.1 then binds to that same copy, so both share
 * one thread pool (and torch.set_num_threads' setting) instead of two pools of spinning
 * threads fighting over the cores.
 */
#include <stdlib.h>
#include <time.h>

#include "matmul.h"

/* Below this many weight bytes per call (times activation rows, up to 8) one thread is
 * faster. Measured on the 2-core EPYC, M = 1: a fork/join costs ~2.6 us, and a call that
 * streams a few hundred KiB spends much of its time ramping up DRAM streams anyway; one
 * decode token (SmolLM2, 121 calls) was fastest with the cut at 256-384 KiB. */
#define SL_PARALLEL_MIN_BYTES (384 * 1024)

int sl_is_simd(void) { return SL_AVX512; }

/* Grow-only scratch for the quantized activations, one per calling thread so concurrent
 * callers (ctypes releases the GIL) never share it. */
static _Thread_local void *scratch;
static _Thread_local size_t scratch_size;

static void *scratch_for(size_t size) {
    if (size > scratch_size) {
        free(scratch);
        scratch_size = 0;
        scratch = aligned_alloc(64, size);
        if (!scratch) return NULL;
        scratch_size = size;
    }
    return scratch;
}

#define SL_ALIGN64(n) (((n) + 63) / 64 * 64)

size_t sl_act_carve(sl_act *a, int kind, int qtype, int64_t M, int64_t K, void *base) {
    const size_t pairs = (size_t)(M * ((K / 32 + 1) / 2)), b32 = (size_t)(M * K / 32);
    const int P = kind == SL_ACT_PAIRS, B = kind == SL_ACT_BLOCKS, S = kind == SL_ACT_SUPER;
    const size_t sizes[8] = {
        P ? 64 * pairs : (size_t)(M * K),             /* q */
        P ? 64 * pairs : 0,                           /* lane_scale */
        P ? 64 * pairs : 0,                           /* lane_init */
        P ? 16 * pairs : 0,                           /* pair_sums */
        B ? 4 * b32 : S ? (size_t)(M * K / 256 * 4) : 0, /* d */
        B ? 4 * b32 : 0,                              /* block_sums */
        S ? 4 * b32 : 0,                              /* sum32 */
        S ? 8 * b32 : 0,                              /* sum16 */
    };
    size_t total = 0;
    for (int i = 0; i < 8; i++) total += SL_ALIGN64(sizes[i]);
    if (!base) return total;
    uint8_t *at = base;
    void *part[8];
    for (int i = 0; i < 8; i++) part[i] = at, at += SL_ALIGN64(sizes[i]);
    *a = (sl_act){.K = K, .kind = kind, .interleaved = qtype != SL_Q8_0, .offset = sl_offset(qtype),
                  .q = part[0], .lane_scale = part[1], .lane_init = part[2], .pair_sums = part[3],
                  .d = part[4], .block_sums = part[5], .sum32 = part[6], .sum16 = part[7]};
    return total;
}

/* Carve the activation buffers of `kind` out of the scratch, each 64-byte aligned. */
static int act_layout(sl_act *a, int kind, int qtype, int64_t M, int64_t K) {
    void *base = scratch_for(sl_act_carve(a, kind, qtype, M, K, NULL));
    if (!base) return SL_ERR_NOMEM;
    sl_act_carve(a, kind, qtype, M, K, base);
    return SL_OK;
}

/* [begin, end) of `n` items for this thread, in multiples of `align` items. */
static void split(int64_t n, int64_t align, int64_t *begin, int64_t *end) {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t per = ((n + nt - 1) / nt + align - 1) / align * align;
    *begin = t * per < n ? t * per : n;
    *end = *begin + per < n ? *begin + per : n;
}

static int64_t row_bytes(int qtype, int64_t K) { return K / (sl_legacy_supported(qtype) ? 32 : 256) * sl_type_size(qtype); }

static int threads_for(int64_t bytes) { return bytes >= SL_PARALLEL_MIN_BYTES ? omp_get_max_threads() : 1; }

/* Activation rows from which the team quantizes them in parallel; fewer are quantized by
 * the calling thread before the fork (a few microseconds at most), which spares the team
 * a barrier. */
#define SL_PARALLEL_ACT_ROWS 16

/* Contention guard. When other processes keep both cores busy, a 2-thread region waits
 * for the OS to schedule the late thread, at the fork (libgomp docks the previous team's
 * threads first) or at the join: measured 4-12 ms per call, against 10-700 us of work (a
 * decode token went from 3.5 ms to 1.4 s), while one thread alone runs at full speed. So a
 * call whose calling thread waited more than SL_STALL_NS in total, and longer than it
 * worked (a legitimately unbalanced last chunk waits less), makes the next
 * SL_BACKOFF_CALLS calls single-threaded; then one call probes again. A native decode
 * forward (decode.c) shares the counter: it counts as one call per matmul it runs, and
 * trips the guard by the same rule over its whole parallel region. */
#define SL_STALL_NS 500000
#define SL_BACKOFF_CALLS 4096
static int backoff; /* calls left to run on one thread; any thread may update it */
static int64_t backoffs; /* times the guard tripped, for benchmarks to report */

int64_t sl_contention_backoffs(void) { return __atomic_load_n(&backoffs, __ATOMIC_RELAXED); }

int64_t sl_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

int sl_contention_take(int64_t calls) {
    if (__atomic_load_n(&backoff, __ATOMIC_RELAXED) <= 0) return 0;
    __atomic_fetch_sub(&backoff, (int)(calls < SL_BACKOFF_CALLS ? calls : SL_BACKOFF_CALLS), __ATOMIC_RELAXED);
    return 1;
}

void sl_contention_note(int64_t stall_ns, int64_t work_ns) {
    if (stall_ns > SL_STALL_NS && stall_ns > work_ns) {
        __atomic_store_n(&backoff, SL_BACKOFF_CALLS, __ATOMIC_RELAXED);
        __atomic_fetch_add(&backoffs, 1, __ATOMIC_RELAXED);
    }
}

int sl_act_kind(int layout, int qtype) {
    return layout == SL_PACKED ? SL_ACT_BLOCKS : sl_legacy_supported(qtype) ? SL_ACT_PAIRS : SL_ACT_SUPER;
}

int64_t sl_matmul_unit(int layout) { return layout == SL_PACKED ? 16 : 4; }

int64_t sl_matmul_chunk(int64_t units, int threads) { return (units + 8 * threads - 1) / (8 * threads); }

void sl_matmul_units(int layout, int qtype, const sl_problem *p, int64_t u0, int64_t u1) {
    const int64_t unit = sl_matmul_unit(layout), n1 = u1 * unit < p->N ? u1 * unit : p->N;
    if (layout == SL_PACKED)
        sl_packed_rows(qtype, p, u0, u1);
    else if (sl_legacy_supported(qtype))
        sl_legacy_rows(qtype, p, u0 * unit, n1);
    else
        sl_kquant_rows(qtype, p, u0 * unit, n1);
}

typedef struct {
    int layout, qtype;
    const void *x;
    int x_bf16;
    int act_in_team; /* quantize the activations inside the team (else done already) */
    sl_act *act;
    const sl_problem *p;
    int64_t main_start_ns, main_done_ns; /* when the calling thread began and ended its share */
} matmul_job;

/* Run by each thread of the team (or alone, outside any parallel region). */
static void matmul_body(matmul_job *job) {
    const sl_problem *p = job->p;
    if (omp_get_thread_num() == 0) job->main_start_ns = sl_now_ns();
    if (job->act_in_team) {
        int64_t begin, end;
        split(p->M, 1, &begin, &end);
        sl_quantize_act_rows(job->x, job->x_bf16, begin, end, job->act);
#pragma omp barrier
    }
    /* Units: 16-row groups (packed) or 4-row tiles. Chunks are handed out dynamically, 8 per
     * thread, so a thread that starts late or is preempted costs its chunks to the others,
     * not a fixed half of the matrix. */
    const int64_t units = (p->N + sl_matmul_unit(job->layout) - 1) / sl_matmul_unit(job->layout);
    const int64_t per = sl_matmul_chunk(units, omp_get_num_threads());
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t c = 0; c < (units + per - 1) / per; c++) {
        const int64_t u0 = c * per, u1 = u0 + per < units ? u0 + per : units;
        sl_matmul_units(job->layout, job->qtype, p, u0, u1);
    }
    if (omp_get_thread_num() == 0) job->main_done_ns = sl_now_ns();
}

static int matmul(int layout, const void *x, int x_bf16, int64_t M, int64_t K, const uint8_t *w, int64_t w_stride,
                  int qtype, int64_t N, float *out, int64_t out_stride) {
    const int legacy = sl_legacy_supported(qtype);
    if (layout == SL_PACKED ? !sl_packed_supported(qtype) : !legacy && !sl_kquant_supported(qtype)) return SL_ERR_TYPE;
    if (K <= 0 || K % (legacy ? 32 : 256) || M < 0 || N < 0 || out_stride < N) return SL_ERR_SHAPE;
    if (M == 0 || N == 0) return SL_OK;
    const int kind = sl_act_kind(layout, qtype);
    sl_act act;
    if (act_layout(&act, kind, qtype, M, K)) return SL_ERR_NOMEM;
    const sl_problem p = {w, w_stride, N, M, &act, out, out_stride};
    int threads = threads_for(row_bytes(qtype, K) * N * (M < 8 ? M : 8));
    if (threads > 1 && sl_contention_take(1)) threads = 1;
    matmul_job job = {layout, qtype, x, x_bf16, threads > 1 && M >= SL_PARALLEL_ACT_ROWS, &act, &p, 0, 0};
    if (!job.act_in_team) sl_quantize_act_rows(x, x_bf16, 0, M, &act);
    if (threads == 1) {
        matmul_body(&job); /* no fork/join */
        return SL_OK;
    }
    const int64_t start = sl_now_ns();
#pragma omp parallel num_threads(threads)
    matmul_body(&job);
    const int64_t work = job.main_done_ns - job.main_start_ns;
    sl_contention_note(sl_now_ns() - start - work, work);
    return SL_OK;
}

/* out[M, N] = x[M, K] @ W[N, K]^T, W stored as GGUF rows of type `qtype`; out rows are
 * `out_stride` floats apart (>= N), so out may be a column slice of a wider buffer. */
int sl_gguf_matmul(const void *x, int x_bf16, int64_t M, int64_t K, const uint8_t *w, int64_t w_stride, int qtype,
                   int64_t N, float *out, int64_t out_stride) {
    return matmul(SL_RAW, x, x_bf16, M, K, w, w_stride, qtype, N, out, out_stride);
}

/* Bytes of the packed layout of an [N, K] weight, or -1 if `qtype` has none. */
int64_t sl_pack_size(int qtype, int64_t N, int64_t K) {
    return sl_packed_supported(qtype) && K > 0 && K % 32 == 0 && N >= 0 ? sl_packed_bytes(qtype, N, K) : -1;
}

int sl_pack(const uint8_t *w, int64_t w_stride, int qtype, int64_t N, int64_t K, uint8_t *out) {
    if (sl_pack_size(qtype, N, K) < 0) return SL_ERR_TYPE;
#pragma omp parallel num_threads(threads_for(row_bytes(qtype, K) * N))
    {
        int64_t begin, end;
        split((N + 15) / 16, 1, &begin, &end);
        sl_pack_rows(qtype, w, w_stride, N, K, begin, end, out);
    }
    return SL_OK;
}

/* out[N, K] (float32, or bfloat16 if out_bf16) = the dequantized weight rows. */
int sl_dequantize(const uint8_t *w, int64_t w_stride, int qtype, int64_t N, int64_t K, void *out, int out_bf16) {
    const int legacy = sl_legacy_supported(qtype);
    if (!legacy && !sl_kquant_supported(qtype)) return SL_ERR_TYPE;
    if (K <= 0 || K % (legacy ? 32 : 256) || N < 0) return SL_ERR_SHAPE;
#pragma omp parallel num_threads(threads_for(row_bytes(qtype, K) * N))
    {
        int64_t begin, end;
        split(N, 4, &begin, &end);
        sl_dequantize_rows(qtype, w, w_stride, K, begin, end, out, out_bf16);
    }
    return SL_OK;
}

/* out[N, K] (float32, or bfloat16 if out_bf16) = the dequantized weight of a packed W: each
 * thread unpacks 16 rows at a time to GGUF rows in its scratch, then dequantizes them. */
int sl_dequantize_packed(const uint8_t *packed, int qtype, int64_t N, int64_t K, void *out, int out_bf16) {
    if (sl_pack_size(qtype, N, K) < 0) return SL_ERR_TYPE;
    const int64_t rb = row_bytes(qtype, K), elt = out_bf16 ? 2 : 4;
    int failed = 0;
#pragma omp parallel num_threads(threads_for(rb * N)) reduction(| : failed)
    {
        int64_t begin, end;
        split((N + 15) / 16, 1, &begin, &end);
        uint8_t *rows = begin < end ? scratch_for((size_t)(16 * rb)) : NULL;
        failed = begin < end && !rows;
        for (int64_t g = begin; g < end && rows; g++) {
            const int64_t n = 16 * g, count = N - n < 16 ? N - n : 16;
            sl_unpack_rows(qtype, packed, N, K, g, g + 1, rows, rb);
            sl_dequantize_rows(qtype, rows, rb, K, 0, count, (uint8_t *)out + n * K * elt, out_bf16);
        }
    }
    return failed ? SL_ERR_NOMEM : SL_OK;
}

/* GGUF rows [N, row_bytes] back from a packed W (the inverse of sl_pack). */
int sl_unpack(const uint8_t *packed, int qtype, int64_t N, int64_t K, uint8_t *out) {
    if (sl_pack_size(qtype, N, K) < 0) return SL_ERR_TYPE;
    sl_unpack_rows(qtype, packed, N, K, 0, (N + 15) / 16, out, row_bytes(qtype, K));
    return SL_OK;
}

int sl_plan_check(const sl_plan *plan) {
    const int qt = plan->qtype, legacy = sl_legacy_supported(qt);
    if (plan->packed ? !sl_packed_supported(qt) : !legacy && !sl_kquant_supported(qt)) return SL_ERR_TYPE;
    if (plan->K <= 0 || plan->K % (legacy ? 32 : 256) || plan->N < 0) return SL_ERR_SHAPE;
    return SL_OK;
}

/* sl_gguf_matmul, or its packed twin, for a bound weight. */
int sl_plan_matmul(const sl_plan *plan, const void *x, int64_t M, float *out, int64_t out_stride, int x_bf16) {
    return matmul(plan->packed ? SL_PACKED : SL_RAW, x, x_bf16, M, plan->K, plan->w, plan->w_stride, plan->qtype,
                  plan->N, out, out_stride);
}
