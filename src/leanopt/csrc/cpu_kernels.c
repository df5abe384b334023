/* leanopt's hand-written CPU kernels; leanopt/_native.py builds this file with the system C
 * compiler on first use and calls it through ctypes. The optimizer math is the functional
 * cores' (leanopt/adam_mini.py ...), which stay the reference: the tests compare the two.
 *
 * Each kernel is one optimizer step over a list of contiguous tensors, float32 or bfloat16,
 * on `nt` OpenMP threads. It computes in float32 (rounding: cpu_kernels_body.h), rounds what
 * it stores to the tensor's dtype and uses the moments as stored. The per-dtype bodies are in
 * cpu_kernels_body.h, included once per dtype.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even, NaN kept (quiet), as c10::BFloat16 */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* a float32 rounded to bfloat16 and back, in 32-bit lanes (no narrowing and widening:
 * vectorized, those are shuffles) */
static inline float round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    r = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc00000u : r;
    memcpy(&f, &r, 4);
    return f;
}

/* per-tensor hyperparameters, one row of doubles per tensor, in these orders (_native.py
 * names them) */
enum { AM_SIGN, AM_W, AM_BETA2, AM_GAIN2, AM_COUNT, AM_BC2_SQRT, AM_EPS, AM_DECAY, AM_LR_BC1, AM_BC1, AM_LR, AM_V_GAIN,
       AM_N }; /* AM_BC1 .. AM_V_GAIN: for the other paths (unused here) */
enum { AD_SIGN, AD_M_KEEP, AD_M_GAIN, AD_LERP, AD_V_KEEP, AD_V_GAIN, AD_V_DIV, AD_EPS, AD_M_DIV, AD_DECAY, AD_LR,
       AD_RESCALE, AD_N };
enum { LI_SIGN, LI_C_KEEP, LI_C_GAIN, LI_M_KEEP, LI_M_GAIN, LI_DECAY, LI_LR, LI_RESCALE, LI_N };
enum { SG_SIGN, SG_KEEP, SG_GAIN, SG_FRESH, SG_HAS_M, SG_DECAY, SG_LR, SG_SCALE, SG_N };
enum { MASK_NONE, MASK_ASYNC, MASK_SYNC };
enum { ALPHA_SQUARED, ALPHA_ROOT, ALPHA_NONE };
enum { PHASE_BOTH, PHASE_SUMS, PHASE_APPLY };

static inline uint32_t f32_bits(float f) {
    union { float f; uint32_t u; } c = {.f = f};
    return c.u;
}
static inline float f32_of_bits(uint32_t u) {
    union { uint32_t u; float f; } c = {.u = u};
    return c.f;
}

/* per dtype: T the storage type, UINT_T its bits, LOAD/STORE to and from float32, STORED a
 * float32 as T holds it, ENCODE/DECODE a float32 to and from T's bits, RAW_LOAD/
 * RAW_STORE T's bits */
#define T float
#define UINT_T uint32_t
#define SFX(name) name##_f32
#define LOAD(x, i) ((x)[i])
#define STORE(x, i, val) ((x)[i] = (val))
#define STORED(x) (x)
#define ENCODE(x) f32_bits(x)
#define DECODE(b) f32_of_bits(b)
#define RAW_LOAD(x, i) f32_bits((x)[i])
#define RAW_STORE(x, i, b) ((x)[i] = f32_of_bits(b))
#include "cpu_kernels_body.h"
#undef T
#undef UINT_T
#undef SFX
#undef LOAD
#undef STORE
#undef STORED
#undef ENCODE
#undef DECODE
#undef RAW_LOAD
#undef RAW_STORE

#define T uint16_t
#define UINT_T uint16_t
#define SFX(name) name##_bf16
#define LOAD(x, i) bf16_to_f32((x)[i])
#define STORE(x, i, val) ((x)[i] = f32_to_bf16(val))
#define STORED(x) round_bf16(x)
#define ENCODE(x) f32_to_bf16(x)
#define DECODE(b) bf16_to_f32(b)
#define RAW_LOAD(x, i) ((x)[i])
#define RAW_STORE(x, i, b) ((x)[i] = (b))
#include "cpu_kernels_body.h"

/* a tensor with fewer rows than this many per thread (and enough elements) splits its rows */
#define WIDE(R, C, nt) ((R) < 2 * (nt) && (R) * (C) >= 65536)
/* below this many elements a tensor is not worth a parallel split */
#define SMALL 32768

/* Adam-mini over T tensors viewed as R[t] x C[t], one block per row (leanopt.adam_mini:
 * the "blocks", "whole" and "elements" layouts). dtype 0: float32, 1: bfloat16. h: T rows
 * of AM_N doubles. given 1: V holds each row's v of this step already (a shard's rows, their
 * blocks summed over the ranks by the caller), which the kernel only reads. Returns 0, or 1
 * for a bad thread count. */
int leanopt_adam_mini_rows(int nt, int T_, int dtype, void **P, void **G, void **M, void **V, const int64_t *R,
                           const int64_t *C, const double *h, int given) {
    if (nt < 1 || nt > 1024) return 1;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), n = omp_get_num_threads();
        for (int t = 0; t < T_; ++t) {
            if (WIDE(R[t], C[t], nt)) continue;
            int64_t r0, r1;
            if (R[t] * C[t] < SMALL) {
                if (tid != t % n) continue;
                r0 = 0, r1 = R[t];
            } else {
                r0 = R[t] * tid / n, r1 = R[t] * (tid + 1) / n;
            }
            const double *ht = h + (int64_t)t * AM_N;
            if (dtype == 0)
                am_rows_f32(P[t], G[t], M[t], V[t], C[t], r0, r1, ht, given);
            else
                am_rows_bf16(P[t], G[t], M[t], V[t], C[t], r0, r1, ht, given);
        }
    }
    for (int t = 0; t < T_; ++t) {
        if (!WIDE(R[t], C[t], nt)) continue;
        const double *ht = h + (int64_t)t * AM_N;
        for (int64_t r = 0; r < R[t]; ++r) {
            if (dtype == 0)
                am_wide_row_f32(P[t], G[t], M[t], V[t], r, C[t], ht, nt, given);
            else
                am_wide_row_bf16(P[t], G[t], M[t], V[t], r, C[t], ht, nt, given);
        }
    }
    return 0;
}

/* the sums of g^2 of every row of T tensors viewed as R[t] x C[t] into S[t] (R[t] doubles): a
 * shard's part of its Adam-mini blocks' sums, before they cross the ranks; the terms as
 * leanopt_adam_mini_rows takes them. Returns 0, or 1 for a bad thread count. */
int leanopt_row_sq_sums(int nt, int T_, int dtype, void **G, const int64_t *R, const int64_t *C, double **S) {
    if (nt < 1 || nt > 1024) return 1;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), n = omp_get_num_threads();
        for (int t = 0; t < T_; ++t) {
            if (WIDE(R[t], C[t], nt)) continue;
            int64_t r0 = R[t] * tid / n, r1 = R[t] * (tid + 1) / n;
            if (R[t] * C[t] < SMALL) {
                if (tid != t % n) continue;
                r0 = 0, r1 = R[t];
            }
            if (dtype == 0)
                am_row_sums_f32(G[t], C[t], r0, r1, S[t]);
            else
                am_row_sums_bf16(G[t], C[t], r0, r1, S[t]);
        }
    }
    for (int t = 0; t < T_; ++t) {
        if (!WIDE(R[t], C[t], nt)) continue;
        for (int64_t r = 0; r < R[t]; ++r) {
            double partial[1024];
#pragma omp parallel num_threads(nt)
            {
                int tid = omp_get_thread_num(), n = omp_get_num_threads();
                int64_t j0 = C[t] * tid / n, j1 = C[t] * (tid + 1) / n;
                double s[1];
                if (dtype == 0)
                    am_row_sums_f32((const float *)G[t] + r * C[t] + j0, j1 - j0, 0, 1, s);
                else
                    am_row_sums_bf16((const uint16_t *)G[t] + r * C[t] + j0, j1 - j0, 0, 1, s);
                partial[tid] = s[0];
#pragma omp barrier
#pragma omp single
                {
                    double total = 0.0;
                    for (int k = 0; k < n; ++k) total += partial[k];
                    S[t][r] = total;
                }
            }
        }
    }
    return 0;
}

/* Adam-mini's column blocks (leanopt.adam_mini, the "columns" layouts), in two calls around
 * the caller's block arithmetic. leanopt_col_sq_sums: the sums of g^2 of every column of T
 * tensors viewed as R[t] x C[t] into S[t] (C[t] doubles; of the rows held here, for a shard).
 * leanopt_adam_mini_cols: the step from V[t], each column's block v of this step (only read).
 * The rows are split over the threads. Return 0, 1 for a bad thread count, 2 out of memory. */
int leanopt_col_sq_sums(int nt, int T_, int dtype, void **G, const int64_t *R, const int64_t *C, double **S) {
    if (nt < 1 || nt > 1024) return 1;
    for (int t = 0; t < T_; ++t) {
        int use = R[t] * C[t] < SMALL || R[t] < 2 ? 1 : (R[t] < nt ? (int)R[t] : nt); /* threads split the rows */
        double *acc = calloc((size_t)use * (size_t)C[t] + 1, sizeof(double));
        if (!acc) return 2;
#pragma omp parallel num_threads(use)
        {
            int tid = omp_get_thread_num(), n = omp_get_num_threads();
            int64_t r0 = R[t] * tid / n, r1 = R[t] * (tid + 1) / n;
            if (dtype == 0)
                am_col_sums_f32(G[t], C[t], r0, r1, acc + tid * C[t]);
            else
                am_col_sums_bf16(G[t], C[t], r0, r1, acc + tid * C[t]);
        }
        for (int64_t j = 0; j < C[t]; ++j) {
            double total = 0.0;
            for (int k = 0; k < use; ++k) total += acc[k * C[t] + j];
            S[t][j] = total;
        }
        free(acc);
    }
    return 0;
}

int leanopt_adam_mini_cols(int nt, int T_, int dtype, void **P, void **G, void **M, void **V, const int64_t *R,
                           const int64_t *C, const double *h) {
    if (nt < 1 || nt > 1024) return 1;
    for (int t = 0; t < T_; ++t) {
        int use = R[t] * C[t] < SMALL || R[t] < 2 ? 1 : (R[t] < nt ? (int)R[t] : nt), failed = 0;
        const double *ht = h + (int64_t)t * AM_N;
#pragma omp parallel num_threads(use) reduction(| : failed)
        {
            int tid = omp_get_thread_num(), n = omp_get_num_threads();
            int64_t r0 = R[t] * tid / n, r1 = R[t] * (tid + 1) / n;
            float *step = malloc((size_t)C[t] * sizeof(float) + 1);
            if (!step)
                failed = 1;
            else if (dtype == 0)
                am_cols_f32(P[t], G[t], M[t], V[t], C[t], r0, r1, ht, step);
            else
                am_cols_bf16(P[t], G[t], M[t], V[t], C[t], r0, r1, ht, step);
            free(step);
        }
        if (failed) return 2;
    }
    return 0;
}

/* the masked step's scale from the whole tensor's sums (leanopt.mask.apply_mask_, in its float32
 * operations: the norms are rooted and squared again, as vector_norm(u).square() does); *all:
 * the mask selected nothing, so it falls back to phi = 1 */
static float mask_step(const double *sums, int64_t n, double lr, int alpha, int count_scale, int *all) {
    float uu = sqrtf((float)sums[0]), su = sqrtf((float)sums[1]), count = (float)sums[2];
    uu *= uu, su *= su;
    *all = su == 0.0f;
    if (*all) su = uu, count = (float)n;
    float a = su > 0.0f ? uu / su : 1.0f, step = (float)lr;
    if (alpha == ALPHA_SQUARED) step *= a;
    if (alpha == ALPHA_ROOT) step *= sqrtf(a);
    if (count_scale) step *= (float)n / (count + 1.0f);
    return step;
}

/* the two-call masked steps: each thread adds its part of tensor t's three sums to
 * partial[(tid T + t) 3 ..]; io[3t ..] gets their totals (in thread order), and partial is freed */
static void add_partials(double *partial, int nt, int T_, double *io) {
    for (int t = 0; t < T_; ++t)
        for (int k = 0; k < 3; ++k) {
            double total = 0.0;
            for (int q = 0; q < nt; ++q) total += partial[((int64_t)q * T_ + t) * 3 + k];
            io[3 * t + k] = total;
        }
    free(partial);
}

/* one row r of a wide tensor (few rows, many elements), its elements split over the threads:
 * PHASE_SUMS (v moved from the row's sum of g^2 unless given, then the mask sums added to
 * partial[(tid * T + t) * 3 ..]) or PHASE_APPLY (the step). */
#define AMM_WIDE(SFX_, TYPE)                                                                               \
    {                                                                                                      \
        TYPE *p_ = (TYPE *)P[t] + r * C[t], *m_ = (TYPE *)M[t] + r * C[t], *v_ = (TYPE *)V[t] + r;         \
        const TYPE *g_ = (const TYPE *)G[t] + r * C[t];                                                    \
        if (phase == PHASE_APPLY) {                                                                        \
            am_mask_apply_##SFX_(p_ + j0, g_ + j0, m_ + j0, v_, j1 - j0, 0, 1, ht, mask, step, all, NULL); \
        } else {                                                                                           \
            if (!given) {                                                                                  \
                sq[tid] = am_sq_sum_##SFX_(g_ + j0, j1 - j0);                                              \
                _Pragma("omp barrier") _Pragma("omp single") {                                             \
                    double s = 0.0;                                                                        \
                    for (int k = 0; k < n; ++k) s += sq[k];                                                \
                    am_step_##SFX_(v_, 0, s, ht);                                                          \
                }                                                                                          \
            }                                                                                              \
            double sums[3] = {0.0, 0.0, 0.0};                                                              \
            am_mask_sums_##SFX_(g_ + j0, m_ + j0, v_, j1 - j0, 0, 1, ht, mask, 1, NULL, sums);             \
            for (int k = 0; k < 3; ++k) partial[((int64_t)tid * T_ + t) * 3 + k] += sums[k];              \
        }                                                                                                  \
    }

static void amm_wide_rows(int nt, int t, int T_, int dtype, void **P, void **G, void **M, void **V, const int64_t *R,
                          const int64_t *C, const double *ht, int given, int mask, int phase, float step, int all,
                          double *partial) {
    double sq[1024];
    for (int64_t r = 0; r < R[t]; ++r) {
#pragma omp parallel num_threads(nt)
        {
            int tid = omp_get_thread_num(), n = omp_get_num_threads();
            int64_t j0 = C[t] * tid / n, j1 = C[t] * (tid + 1) / n;
            if (dtype == 0)
                AMM_WIDE(f32, float)
            else
                AMM_WIDE(bf16, uint16_t)
        }
    }
}
#undef AMM_WIDE

/* Adam-mini with the mask component over T tensors viewed as R[t] x C[t], one block per row
 * (cpu_kernels_body.h, am_mask_*), in two calls: PHASE_SUMS moves v (unless given: V holds the
 * rows' v of this step, a shard's) and writes each tensor's three mask sums to io[3t..3t+2],
 * writing nothing else; PHASE_APPLY moves p and m by the step of the sums in io and the whole
 * tensor's size whole[t] (as leanopt_adam's). given == GIVEN_COLUMNS: column blocks, V[t]
 * holds each column's block v of this step (the caller moved it; only read). Rows of a tensor
 * are split over the threads (one thread for a small tensor; a wide tensor's rows of blocks
 * one by one, each split over the threads). Returns 0, 1 for bad arguments, 2 out of memory. */
#define GIVEN_COLUMNS 2
#define AMM_ROWS_WIDE(t) (given != GIVEN_COLUMNS && WIDE(R[t], C[t], nt))
int leanopt_adam_mini_masked(int nt, int T_, int dtype, void **P, void **G, void **M, void **V, const int64_t *R,
                             const int64_t *C, const double *h, int given, int mask, int alpha, int count_scale, int phase,
                             double *io, const int64_t *whole) {
    if (nt < 1 || nt > 1024 || (phase != PHASE_SUMS && phase != PHASE_APPLY) || !io || !whole) return 1;
    if (given < 0 || given > GIVEN_COLUMNS) return 1;
    double *partial = phase == PHASE_SUMS ? calloc((size_t)nt * T_ * 3 + 1, sizeof(double)) : NULL;
    if (phase == PHASE_SUMS && !partial) return 2;
    int failed = 0;
#pragma omp parallel num_threads(nt) reduction(| : failed)
    {
        int tid = omp_get_thread_num(), n = omp_get_num_threads();
        for (int t = 0; t < T_; ++t) {
            int64_t r0 = R[t] * tid / n, r1 = R[t] * (tid + 1) / n;
            if (AMM_ROWS_WIDE(t)) continue; /* below */
            if (R[t] * C[t] < SMALL) {
                if (tid != t % n) continue;
                r0 = 0, r1 = R[t];
            }
            if (r0 >= r1) continue;
            const double *ht = h + (int64_t)t * AM_N;
            float *cols = NULL; /* column blocks: each column's scale, this thread's copy */
            if (given == GIVEN_COLUMNS) {
                cols = malloc((size_t)C[t] * sizeof(float));
                if (!cols) {
                    failed = 1;
                    continue;
                }
                if (dtype == 0)
                    am_col_scales_f32(V[t], C[t], ht, cols);
                else
                    am_col_scales_bf16(V[t], C[t], ht, cols);
            }
            if (phase == PHASE_SUMS) {
                double *sums = partial + ((int64_t)tid * T_ + t) * 3;
                if (dtype == 0)
                    am_mask_sums_f32(G[t], M[t], V[t], C[t], r0, r1, ht, mask, given, cols, sums);
                else
                    am_mask_sums_bf16(G[t], M[t], V[t], C[t], r0, r1, ht, mask, given, cols, sums);
            } else {
                int all;
                float step = mask_step(io + 3 * t, whole[t], ht[AM_LR], alpha, count_scale, &all);
                if (dtype == 0)
                    am_mask_apply_f32(P[t], G[t], M[t], V[t], C[t], r0, r1, ht, mask, step, all, cols);
                else
                    am_mask_apply_bf16(P[t], G[t], M[t], V[t], C[t], r0, r1, ht, mask, bf16_to_f32(f32_to_bf16(step)), all,
                                       cols);
            }
            free(cols);
        }
    }
    if (failed) {
        free(partial);
        return 2;
    }
    for (int t = 0; t < T_; ++t) {
        if (!AMM_ROWS_WIDE(t)) continue;
        const double *ht = h + (int64_t)t * AM_N;
        int all = 0;
        float step = 0.0f;
        if (phase == PHASE_APPLY) {
            step = mask_step(io + 3 * t, whole[t], ht[AM_LR], alpha, count_scale, &all);
            if (dtype == 1) step = bf16_to_f32(f32_to_bf16(step));
        }
        amm_wide_rows(nt, t, T_, dtype, P, G, M, V, R, C, ht, given, mask, phase, step, all, partial);
    }
    if (phase == PHASE_SUMS) add_partials(partial, nt, T_, io);
    return 0;
}
#undef AMM_ROWS_WIDE
#undef GIVEN_COLUMNS

/* [j0, j1): thread tid's share of n elements, in whole cache lines */
static void share(int64_t n, int tid, int nt, int64_t *j0, int64_t *j1) {
    *j0 = tid == 0 ? 0 : (n * tid / nt) & ~(int64_t)63;
    *j1 = tid + 1 == nt ? n : (n * (tid + 1) / nt) & ~(int64_t)63;
}

/* thread tid's part [j0, j1) of tensor t of n elements: a share of a large tensor, all of a
 * small one for one thread (round robin over the tensors). Returns 0 where tid has no part. */
static int part(int64_t n, int t, int tid, int nt, int64_t *j0, int64_t *j1) {
    if (n < SMALL) {
        *j0 = 0, *j1 = n;
        return tid == t % nt;
    }
    share(n, tid, nt, j0, j1);
    return 1;
}

/* The Adam family over T tensors of N[t] elements (leanopt.alpha_adam): dtype 0 float32,
 * 1 bfloat16; h: T rows of AD_N doubles; mask, alpha: the enums above; count_scale 0/1 (with
 * mask "none" the caller folds n/(n+1) into the lr).
 * phase (masked steps of shards, whose sums cross the ranks between the passes): PHASE_BOTH
 * makes both passes; PHASE_SUMS only pass 1, writing each tensor's three sums to io[3t..3t+2]
 * (phi stays in v's sign bit until PHASE_APPLY, which the caller must make next, with the same
 * tensors); PHASE_APPLY only pass 2, from the sums in io and the whole tensor's size whole[t].
 * Returns 0, 1 for bad arguments, 2 if out of memory. */
int leanopt_adam(int nt, int T_, int dtype, void **P, void **G, void **M, void **V, const int64_t *N, const double *h,
                 int mask, int alpha, int count_scale, int phase, double *io, const int64_t *whole) {
    if (nt < 1 || nt > 1024 || phase < PHASE_BOTH || phase > PHASE_APPLY) return 1;
    if (phase != PHASE_BOTH && (mask == MASK_NONE || !io || (phase == PHASE_APPLY && !whole))) return 1;
    /* each thread's part of the sums, for two tensors in turn: a thread may start the next
     * shared tensor while others still read this one's (it cannot get a third one ahead,
     * that needs the next barrier) */
    double(*partial)[3] = malloc(2 * (size_t)nt * sizeof *partial);
    if (!partial) return 2;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), n = omp_get_num_threads();
        int64_t shared = 0; /* shared (not small) masked tensors so far: the same count on every thread */
        for (int t = 0; t < T_; ++t) {
            const double *ht = h + (int64_t)t * AD_N;
            int small = N[t] < SMALL;
            int64_t j0, j1;
            if (!part(N[t], t, tid, n, &j0, &j1)) continue;
            if (mask == MASK_NONE) {
                if (dtype == 0)
                    ad_plain_f32(P[t], G[t], M[t], V[t], j0, j1, ht, count_scale);
                else
                    ad_plain_bf16(P[t], G[t], M[t], V[t], j0, j1, ht, count_scale);
                continue;
            }
            double sums[3] = {0.0, 0.0, 0.0};
            if (phase == PHASE_APPLY) {
                int all;
                float step = mask_step(io + 3 * t, whole[t], ht[AD_LR], alpha, count_scale, &all);
                if (dtype == 0)
                    ad_apply_f32(P[t], M[t], V[t], j0, j1, ht, step, all);
                else
                    ad_apply_bf16(P[t], M[t], V[t], j0, j1, ht, bf16_to_f32(f32_to_bf16(step)), all);
                continue;
            }
            if (dtype == 0)
                ad_sums_f32(G[t], M[t], V[t], j0, j1, ht, mask == MASK_SYNC, sums);
            else
                ad_sums_bf16(G[t], M[t], V[t], j0, j1, ht, mask == MASK_SYNC, sums);
            if (!small) {
                double(*part)[3] = partial + (shared++ % 2) * nt;
                for (int k = 0; k < 3; ++k) part[tid][k] = sums[k];
#pragma omp barrier
                for (int k = 0; k < 3; ++k) {
                    sums[k] = 0.0;
                    for (int q = 0; q < n; ++q) sums[k] += part[q][k];
                }
            }
            if (phase == PHASE_SUMS) {
                if (small || tid == 0)
                    for (int k = 0; k < 3; ++k) io[3 * t + k] = sums[k];
                continue;
            }
            int all;
            float step = mask_step(sums, N[t], ht[AD_LR], alpha, count_scale, &all);
            if (dtype == 0)
                ad_apply_f32(P[t], M[t], V[t], j0, j1, ht, step, all);
            else
                ad_apply_bf16(P[t], M[t], V[t], j0, j1, ht, bf16_to_f32(f32_to_bf16(step)), all);
        }
    }
    free(partial);
    return 0;
}

/* Lion (kind 0: h rows of LI_N) or SGD-SaI (kind 1: SG_N; M[t] may be G[t] when there is no
 * momentum buffer) over T tensors of N[t] elements, one pass each, no mask. Returns 0, or 1 for
 * a bad thread count or kind. */
int leanopt_elementwise(int nt, int T_, int dtype, void **P, void **G, void **M, const int64_t *N, const double *h,
                        int kind) {
    if (nt < 1 || nt > 1024 || kind < 0 || kind > 1) return 1;
    const int width = kind == 0 ? LI_N : SG_N;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), n = omp_get_num_threads();
        for (int t = 0; t < T_; ++t) {
            int64_t j0, j1;
            if (!part(N[t], t, tid, n, &j0, &j1)) continue;
            const double *ht = h + (int64_t)t * width;
            if (kind == 0 && dtype == 0) lion_plain_f32(P[t], G[t], M[t], j0, j1, ht);
            if (kind == 0 && dtype == 1) lion_plain_bf16(P[t], G[t], M[t], j0, j1, ht);
            if (kind == 1 && dtype == 0) sgd_plain_f32(P[t], G[t], M[t], j0, j1, ht);
            if (kind == 1 && dtype == 1) sgd_plain_bf16(P[t], G[t], M[t], j0, j1, ht);
        }
    }
    return 0;
}

/* Lion (kind 0) or SGD-SaI with a momentum buffer (kind 1) with the mask component over T
 * tensors of N[t] elements, in two calls (cpu_kernels_body.h, ew_mask_*): PHASE_SUMS writes each
 * tensor's three mask sums to io[3t..3t+2] and nothing else; PHASE_APPLY moves p and m by the
 * step of the sums in io and the whole tensor's size whole[t]. `none`: the mask is off for this
 * call (the count scale alone; SGD-SaI's asynchronous mask on a fresh buffer): no sums, phi = 1.
 * Returns 0, 1 for bad arguments, 2 out of memory. */
int leanopt_elementwise_masked(int nt, int T_, int dtype, void **P, void **G, void **M, const int64_t *N, const double *h,
                               int kind, int mask, int alpha, int count_scale, int phase, double *io, const int64_t *whole) {
    if (nt < 1 || nt > 1024 || kind < 0 || kind > 1 || (phase != PHASE_SUMS && phase != PHASE_APPLY) || !io || !whole)
        return 1;
    const int width = kind == 0 ? LI_N : SG_N;
    double *partial = phase == PHASE_SUMS ? calloc((size_t)nt * T_ * 3 + 1, sizeof(double)) : NULL;
    if (phase == PHASE_SUMS && !partial) return 2;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), n = omp_get_num_threads();
        for (int t = 0; t < T_; ++t) {
            int64_t j0, j1;
            if (!part(N[t], t, tid, n, &j0, &j1)) continue;
            const double *ht = h + (int64_t)t * width;
            int none = mask == MASK_NONE || (kind == 1 && ht[SG_FRESH] != 0.0 && mask == MASK_ASYNC);
            if (phase == PHASE_SUMS) {
                if (none) continue;
                double *sums = partial + ((int64_t)tid * T_ + t) * 3;
                if (dtype == 0)
                    ew_mask_sums_f32(G[t], M[t], j0, j1, ht, kind, mask, sums);
                else
                    ew_mask_sums_bf16(G[t], M[t], j0, j1, ht, kind, mask, sums);
                continue;
            }
            int all;
            float step = mask_step(io + 3 * t, whole[t], ht[kind ? SG_LR : LI_LR], alpha, count_scale, &all);
            if (dtype == 0)
                ew_mask_apply_f32(P[t], G[t], M[t], j0, j1, ht, kind, mask, step, all);
            else
                ew_mask_apply_bf16(P[t], G[t], M[t], j0, j1, ht, kind, mask, bf16_to_f32(f32_to_bf16(step)), all);
        }
    }
    if (phase == PHASE_SUMS) add_partials(partial, nt, T_, io);
    return 0;
}

/* A memory-traffic probe for `leanopt speed --patterns`: one pass over n float32 elements that
 * reads nin (<= 4) arrays and writes nout (<= 3) arrays (an output may also be an input: in place), with
 * next to no arithmetic. Its time is what an optimizer pass with the same reads and writes
 * cannot beat on this machine. */
int leanopt_stream(int nt, int64_t n, int nin, int nout, float **in, float **out) {
    if (nt < 1 || nt > 1024 || nin < 1 || nin > 4 || nout < 0 || nout > 3) return 1;
#pragma omp parallel num_threads(nt)
    {
        int64_t j0, j1;
        share(n, omp_get_thread_num(), omp_get_num_threads(), &j0, &j1);
        const float *a = in[0], *b = in[nin > 1], *c = in[nin > 2 ? 2 : 0], *d = in[nin > 3 ? 3 : 0];
        float *o[4] = {0, 0, 0, 0};
        for (int k = 0; k < nout; ++k) o[k] = out[k];
#define STREAM(EXPR, WRITES)                                \
    _Pragma("omp simd") for (int64_t j = j0; j < j1; ++j) { \
        float x = EXPR;                                     \
        WRITES                                              \
    }
#define W1 o[0][j] = x;
#define W2 W1 o[1][j] = x;
#define W3 W2 o[2][j] = x;
        float s = 0.0f;
        if (nout == 0) {
            _Pragma("omp simd reduction(+ : s)") for (int64_t j = j0; j < j1; ++j) s += a[j] + b[j] + c[j] + d[j];
            volatile float keep = s; /* the loads are the point */
            (void)keep;
        } else if (nin == 1 && nout == 1) STREAM(a[j] * 1.0000001f, W1)
        else if (nout == 1) STREAM(a[j] + b[j] * 1e-7f + c[j] * 1e-7f + d[j] * 1e-7f, W1)
        else if (nout == 2) STREAM(a[j] + b[j] * 1e-7f + c[j] * 1e-7f + d[j] * 1e-7f, W2)
        else STREAM(a[j] + b[j] * 1e-7f + c[j] * 1e-7f + d[j] * 1e-7f, W3)
#undef STREAM
#undef W1
#undef W2
#undef W3
    }
    return 0;
}
#include "cpu_codec.h"
