/* The pieces of matmul.c that other entry points reuse (decode.c runs whole decoder layers
 * inside one OpenMP parallel region and shares out the matmul work itself). */
#ifndef SL_MATMUL_H
#define SL_MATMUL_H

#include <stddef.h>

#ifdef _OPENMP
#include <omp.h>
#else /* a build without OpenMP runs every team as the one calling thread */
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
#endif

#include "blocks.h"

/* A weight bound once (by the Python GGUFWeight), so that each call passes few arguments:
 * ctypes converts every argument on every call, ~0.1 us each. Mirrored by ops._Plan. */
typedef struct {
    const uint8_t *w;
    int64_t w_stride;
    int64_t N;
    int64_t K;
    int32_t qtype;
    int32_t packed;
} sl_plan;

/* Weight layouts: GGUF rows as stored, or packed.c's 16-row groups. */
enum { SL_RAW = 0, SL_PACKED = 1 };

/* CLOCK_MONOTONIC in nanoseconds. */
int64_t sl_now_ns(void);

/* SL_OK if `plan` is a product the kernels take (type, K), else an SL_ERR_* code. */
int sl_plan_check(const sl_plan *plan);

/* The SL_ACT_* kind of the activations a weight of this layout and type needs. */
int sl_act_kind(int layout, int qtype);

/* Bytes of the activation buffers for M rows of K values; with `base` non-NULL, also point
 * `a`'s buffers into base (64-byte aligned, which base must be). */
size_t sl_act_carve(sl_act *a, int kind, int qtype, int64_t M, int64_t K, void *base);

/* Output rows per work unit: a 16-row group (packed) or a 4-row tile (GGUF rows). */
int64_t sl_matmul_unit(int layout);

/* Units per dynamically scheduled chunk when `threads` threads share `units` units. */
int64_t sl_matmul_chunk(int64_t units, int threads);

/* Output rows of units [u0, u1) of p (activations already quantized). */
void sl_matmul_units(int layout, int qtype, const sl_problem *p, int64_t u0, int64_t u1);

/* Contention guard (see matmul.c). sl_contention_take: whether a caller about to run `calls`
 * matmul calls' worth of parallel work must run it on one thread instead (and consumes that
 * much of the backoff). sl_contention_note: after a parallel run whose calling thread spent
 * `stall_ns` waiting and `work_ns` working, trips the guard if it stalled badly. */
int sl_contention_take(int64_t calls);
void sl_contention_note(int64_t stall_ns, int64_t work_ns);

#endif
