/* The kernels of cpu_kernels.c for one dtype: T (the storage type), SFX (name suffix),
 * LOAD/STORE (to and from float32) and STORED (a float32 as T holds it: rounded to T and back).
 *
 * Rounding: in float32 the kernels make the eager path's tensor operations, in its order, and
 * round as ATen does on the CPU (its lerp, add(alpha=) and addcmul are fused multiply-adds,
 * addcdiv is not), so they agree with it to an ulp per operation (ATen's vectorized square root
 * is not always correctly rounded; these kernels' is). In bfloat16 they compute in float32
 * and round only what they store, as torch's fused optimizers and the compiled kernels do (the
 * eager path rounds after every operation; repeating that costs twice the time), and use the
 * moments as stored, so that the two passes of a masked step see the same values. */

/* ---- Adam-mini, one block per row -------------------------------------------------------
 * For each row of C elements:
 *     s    = sum(g^2)
 *     v    = beta2 * v + (1 - beta2) * (s / C)
 *     step = (lr / bc1) / (sqrt(v) / bc2_sqrt + eps)
 *     m    = lerp(m, sign * g, 1 - beta1)                        (torch.lerp's two formulas)
 *     p    = p * decay - m * step
 * in one pass over memory: the sum of row r + 1 is taken inside the loop that updates row r,
 * so g is read from memory once and is still in cache when its own row is updated. */

static inline float SFX(am_step)(T *v, int64_t r, double s, const double *h) {
    float vn = STORED(fmaf((float)h[AM_GAIN2], (float)s / (float)h[AM_COUNT], LOAD(v, r) * (float)h[AM_BETA2]));
    STORE(v, r, vn);
    return (float)h[AM_LR_BC1] / (sqrtf(vn) / (float)h[AM_BC2_SQRT] + (float)h[AM_EPS]);
}

/* the step from a v another thread stored */
static inline float SFX(am_step_of)(const T *v, int64_t r, const double *h) {
    return (float)h[AM_LR_BC1] / (sqrtf(LOAD(v, r)) / (float)h[AM_BC2_SQRT] + (float)h[AM_EPS]);
}

/* sums of g^2 are float32 over chunks of AM_CHUNK elements and double across them: as exact
 * as the eager path's cascade sums also for blocks of millions of elements. A square that is
 * not finite (NaN, Inf) adds 0: a NaN gradient element reaches its own m and p, not its
 * block's v (docs/algorithms.md, section 0). `q < INFINITY` is false for both. */
#define FINITE_SQ(q) ((q) < INFINITY ? (q) : 0.0f)
#define AM_CHUNK 4096

static inline double SFX(am_sq_sum)(const T *restrict g, int64_t n) {
    double total = 0.0;
    for (int64_t c = 0; c < n; c += AM_CHUNK) {
        int64_t e = c + AM_CHUNK < n ? c + AM_CHUNK : n;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = c; j < e; ++j) {
            float x = LOAD(g, j);
            s += FINITE_SQ(x * x);
        }
        total += s;
    }
    return total;
}

/* torch.lerp's two formulas, chosen once per row */
#define AM_LERP_LOW(m, g) STORED(fmaf(w, (g) - (m), (m)))
#define AM_LERP_HIGH(m, g) STORED(fmaf(w - 1.0f, (g) - (m), (g)))
#define AM_LOOP(LERP, NEXT)                                                             \
    _Pragma("omp simd reduction(+ : s)") for (int64_t j = c; j < e; ++j) {              \
        float gj = sign * LOAD(g, j), mj = LOAD(m, j);                                  \
        float mn = LERP(mj, gj);                                                        \
        STORE(m, j, mn);                                                                \
        STORE(p, j, fmaf(-mn, step, LOAD(p, j) * decay));                               \
        NEXT                                                                            \
    }
#define AM_NEXT_SUM { float x = LOAD(next, j); s += FINITE_SQ(x * x); }

/* elements [0, n) of a row; with `next` (the next row's g), returns that row's sum of g^2 */
static inline double SFX(am_update)(T *restrict p, const T *restrict g, T *restrict m, const T *restrict next, int64_t n,
                                    float step, const double *h) {
    const float sign = (float)h[AM_SIGN], w = (float)h[AM_W], decay = (float)h[AM_DECAY];
    double total = 0.0;
    for (int64_t c = 0; c < n; c += AM_CHUNK) {
        int64_t e = c + AM_CHUNK < n ? c + AM_CHUNK : n;
        float s = 0.0f;
        if (w < 0.5f) {
            if (next) AM_LOOP(AM_LERP_LOW, AM_NEXT_SUM) else AM_LOOP(AM_LERP_LOW, )
        } else {
            if (next) AM_LOOP(AM_LERP_HIGH, AM_NEXT_SUM) else AM_LOOP(AM_LERP_HIGH, )
        }
        total += s;
    }
    return total;
}

/* rows [r0, r1) of one tensor, by one thread. given: v already holds this step's values (a
 * shard's rows, whose blocks were summed over every rank): each row steps from its v, no sums */
static void SFX(am_rows)(T *p, const T *g, T *m, T *v, int64_t C, int64_t r0, int64_t r1, const double *h, int given) {
    if (r0 >= r1) return;
    if (given) {
        for (int64_t r = r0; r < r1; ++r)
            SFX(am_update)(p + r * C, g + r * C, m + r * C, 0, C, SFX(am_step_of)(v, r, h), h);
        return;
    }
    double s = SFX(am_sq_sum)(g + r0 * C, C);
    for (int64_t r = r0; r < r1; ++r) {
        float step = SFX(am_step)(v, r, s, h);
        const T *next = r + 1 < r1 ? g + (r + 1) * C : 0;
        s = SFX(am_update)(p + r * C, g + r * C, m + r * C, next, C, step, h);
    }
}

/* one row of a tensor with few rows, split over the threads: partial sums, then the update
 * (given: the row's v is this step's, as in am_rows) */
static void SFX(am_wide_row)(T *p, const T *g, T *m, T *v, int64_t r, int64_t C, const double *h, int nt, int given) {
    double partial[1024];
    p += r * C, g += r * C, m += r * C;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), n = omp_get_num_threads();
        int64_t j0 = C * tid / n, j1 = C * (tid + 1) / n;
        float step = 0.0f;
        if (given) { /* the same on every thread: no barrier is skipped by some only */
            step = SFX(am_step_of)(v, r, h);
        } else {
            partial[tid] = SFX(am_sq_sum)(g + j0, j1 - j0);
#pragma omp barrier
            if (tid == 0) {
                double s = 0.0;
                for (int k = 0; k < n; ++k) s += partial[k];
                step = SFX(am_step)(v, r, s, h);
            }
#pragma omp barrier
            if (tid != 0) step = SFX(am_step_of)(v, r, h);
        }
        SFX(am_update)(p + j0, g + j0, m + j0, 0, j1 - j0, step, h);
    }
}

/* the sums of g^2 of rows [r0, r1) of C elements (a shard's part of its blocks' sums) */
static void SFX(am_row_sums)(const T *g, int64_t C, int64_t r0, int64_t r1, double *out) {
    for (int64_t r = r0; r < r1; ++r) out[r] = SFX(am_sq_sum)(g + r * C, C);
}
/* ---- Adam-mini with column blocks (a transposed weight, as transformers' Conv1D) -----------
 * Every column c of an R x C tensor lies in one block. The caller sums each column's g^2
 * (am_col_sums, over the rows held here), turns them into the blocks' v of this step and
 * gives that v per column (V[c]); then, row by row:
 *     m = lerp(m, sign * g, 1 - beta1);  p = p * decay - m * step_c,
 *     step_c = (lr / bc1) / (sqrt(V[c]) / bc2_sqrt + eps)    (computed once per column) */
static void SFX(am_col_sums)(const T *g, int64_t C, int64_t r0, int64_t r1, double *acc) {
    for (int64_t r = r0; r < r1; ++r) {
        const T *gr = g + r * C;
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) {
            float x = LOAD(gr, j);
            acc[j] += FINITE_SQ(x * x);
        }
    }
}

#define AM_COLS_LOOP(LERP)                                                              \
    for (int64_t r = r0; r < r1; ++r) {                                                 \
        T *pr = p + r * C, *mr = m + r * C;                                             \
        const T *gr = g + r * C;                                                        \
        _Pragma("omp simd") for (int64_t j = 0; j < C; ++j) {                           \
            float gj = sign * LOAD(gr, j), mn = LERP(LOAD(mr, j), gj);                  \
            STORE(mr, j, mn);                                                           \
            STORE(pr, j, fmaf(-mn, step[j], LOAD(pr, j) * decay));                      \
        }                                                                               \
    }

/* step_c of every column, from V (only read): C floats */
static void SFX(am_col_steps)(const T *v, int64_t C, const double *h, float *step) {
    for (int64_t j = 0; j < C; ++j) step[j] = SFX(am_step_of)(v, j, h);
}

/* rows [r0, r1), by the steps of am_col_steps */
static void SFX(am_cols_apply)(T *p, const T *g, T *m, int64_t C, int64_t r0, int64_t r1, const double *h,
                               const float *step) {
    const float sign = (float)h[AM_SIGN], w = (float)h[AM_W], decay = (float)h[AM_DECAY];
    if (w < 0.5f)
        AM_COLS_LOOP(AM_LERP_LOW)
    else
        AM_COLS_LOOP(AM_LERP_HIGH)
}

/* rows [r0, r1); step: C floats of scratch */
static void SFX(am_cols)(T *p, const T *g, T *m, const T *v, int64_t C, int64_t r0, int64_t r1, const double *h,
                         float *step) {
    SFX(am_col_steps)(v, C, h, step);
    SFX(am_cols_apply)(p, g, m, C, r0, r1, h, step);
}
#undef AM_COLS_LOOP

/* ---- Adam-mini with the mask component (leanopt.mask), one block per row: two calls -------
 *     u = m_new * scale,   scale = 1 / (bc1 (sqrt(v) / bc2_sqrt + eps))   (the row's block v)
 * Pass 1 (am_mask_sums) moves v (unless `given`: a shard's rows, v from every rank's sums) and
 * adds ||u||^2, ||phi u||^2, ||phi||_0 of the finite u^2 to sums[3]; it writes nothing else,
 * since the asynchronous phi needs the old m. Pass 2 (am_mask_apply) recomputes m_new, u and
 * phi and moves p and m. mask MASK_NONE (the count scale alone): no sums, phi = 1.
 * Column blocks (transformers' Conv1D): `cols` holds every column's scale (am_col_scales, from
 * each column's block v of this step, which the caller moved); v is then not read. */
static inline float SFX(am_mask_scale)(const T *v, int64_t r, const double *h) {
    return 1.0f / ((float)h[AM_BC1] * (sqrtf(LOAD(v, r)) / (float)h[AM_BC2_SQRT] + (float)h[AM_EPS]));
}

static void SFX(am_col_scales)(const T *v, int64_t C, const double *h, float *cols) {
    for (int64_t j = 0; j < C; ++j) cols[j] = SFX(am_mask_scale)(v, j, h);
}

#define AMM_SUMS(LERP, PHI_M, SCALE)                                                        \
    _Pragma("omp simd reduction(+ : uu, su, count)") for (int64_t j = c; j < e; ++j) {      \
        float gj = sign * LOAD(gr, j), mo = LOAD(mr, j);                                    \
        float mn = LERP(mo, gj), u = mn * (SCALE);                                          \
        int phi = gj * PHI_M > 0.0f;                                                        \
        float q = u * u;                                                                    \
        int finite = q < INFINITY;                                                          \
        float f = finite ? q : 0.0f, kept = (float)(phi & finite);                          \
        uu += f;                                                                            \
        su += f * kept;                                                                     \
        count += kept;                                                                      \
    }
/* each (lerp form, mask) its own loop: a branch inside one leaves it scalar */
#define AMM_FORMS(BODY, SCALE)             \
    if (w < 0.5f && sync) {                \
        BODY(AM_LERP_LOW, mn, SCALE)       \
    } else if (w < 0.5f) {                 \
        BODY(AM_LERP_LOW, mo, SCALE)       \
    } else if (sync) {                     \
        BODY(AM_LERP_HIGH, mn, SCALE)      \
    } else {                               \
        BODY(AM_LERP_HIGH, mo, SCALE)      \
    }

static void SFX(am_mask_sums)(const T *g, const T *m, T *v, int64_t C, int64_t r0, int64_t r1, const double *h, int mask,
                              int given, const float *cols, double *sums) {
    const float sign = (float)h[AM_SIGN], w = (float)h[AM_W];
    const int sync = mask == MASK_SYNC;
    for (int64_t r = r0; r < r1; ++r) {
        if (!given && !cols) SFX(am_step)(v, r, SFX(am_sq_sum)(g + r * C, C), h);
        if (mask == MASK_NONE) continue;
        const float scale = cols ? 0.0f : SFX(am_mask_scale)(v, r, h);
        const T *gr = g + r * C, *mr = m + r * C;
        for (int64_t c = 0; c < C; c += AM_CHUNK) {
            int64_t e = c + AM_CHUNK < C ? c + AM_CHUNK : C;
            float uu = 0.0f, su = 0.0f, count = 0.0f;
            if (cols) {
                AMM_FORMS(AMM_SUMS, cols[j])
            } else {
                AMM_FORMS(AMM_SUMS, scale)
            }
            sums[0] += uu, sums[1] += su, sums[2] += count;
        }
    }
}

#define AMM_APPLY(LERP, PHI_M, SCALE)                                                       \
    _Pragma("omp simd") for (int64_t j = 0; j < C; ++j) {                                   \
        float gj = sign * LOAD(gr, j), mo = LOAD(mr, j);                                    \
        float mn = LERP(mo, gj), u = mn * (SCALE);                                          \
        int phi = (gj * PHI_M > 0.0f) | all;                                                \
        STORE(pr, j, fmaf(-(u * (float)phi), step, LOAD(pr, j) * decay));                   \
        STORE(mr, j, mn);                                                                   \
    }

static void SFX(am_mask_apply)(T *p, const T *g, T *m, const T *v, int64_t C, int64_t r0, int64_t r1, const double *h,
                               int mask, float step, int all, const float *cols) {
    const float sign = (float)h[AM_SIGN], w = (float)h[AM_W], decay = (float)h[AM_DECAY];
    const int sync = mask == MASK_SYNC;
    for (int64_t r = r0; r < r1; ++r) {
        const T *gr = g + r * C;
        T *pr = p + r * C, *mr = m + r * C;
        if (cols) {
            AMM_FORMS(AMM_APPLY, cols[j])
        } else {
            const float scale = SFX(am_mask_scale)(v, r, h);
            AMM_FORMS(AMM_APPLY, scale)
        }
    }
}
#undef AMM_SUMS
#undef AMM_FORMS
#undef AMM_APPLY
#undef AM_LERP_LOW
#undef AM_LERP_HIGH
#undef AM_LOOP
#undef AM_NEXT_SUM
#undef AM_CHUNK

/* ---- the Adam family: AlphaAdam, C-AdamW, AdamW-PMA (leanopt.alpha_adam.AdamStep) ----------
 *     m = m_keep m + m_gain g   (torch.lerp when m_keep + m_gain = 1)
 *     v = v_keep v + v_gain g^2
 *     u = (m / (sqrt(v) / v_div + eps)) / m_div
 *     p = p decay - lr u                                 (no mask)
 *     p = p decay - lr alpha count_scale (phi u)         (mask: leanopt.mask)
 *     m, v = rescale m, rescale v
 * Unmasked: one
 * pass. Masked: the mask needs whole-tensor sums of u before any element moves; pass 1 updates
 * m and v and takes the sums, and keeps phi in the sign bit of v (v >= 0, so the bit is free);
 * pass 2 reads p, m and v, recomputes u, restores v's sign and moves p. That reads g, m, v
 * and then p, m, v: 24 bytes per float32 element instead of the 28 of re-reading g too. The
 * sign bits never leave this call. */

/* the first moment's three forms, chosen once per tensor (a branch inside a loop would keep
 * it from being vectorized): torch.lerp's two formulas, and keep/gain for the PMA steps */
#define AD_M_LOW(m, g) STORED(fmaf(w, (g) - (m), (m)))
#define AD_M_HIGH(m, g) STORED(fmaf(w - 1.0f, (g) - (m), (g)))
#define AD_M_KEEP_GAIN(m, g) STORED(fmaf(gain, (g), (m) * keep))
#define AD_FORMS(BODY)                                               \
    if (h[AD_LERP] == 0.0) {                                         \
        BODY(AD_M_KEEP_GAIN)                                         \
    } else if (w < 0.5f) {                                           \
        BODY(AD_M_LOW)                                               \
    } else {                                                         \
        BODY(AD_M_HIGH)                                              \
    }
#define AD_SCALARS                                                                                 \
    const float sign = (float)h[AD_SIGN], w = (float)h[AD_M_GAIN], keep = (float)h[AD_M_KEEP];     \
    const float gain = w, v_keep = (float)h[AD_V_KEEP], v_gain = (float)h[AD_V_GAIN];              \
    const float v_div = (float)h[AD_V_DIV], eps = (float)h[AD_EPS], m_div = (float)h[AD_M_DIV];    \
    const float decay = (float)h[AD_DECAY], r = (float)h[AD_RESCALE];                              \
    const float inv_v_div = (float)(1.0 / h[AD_V_DIV]), inv_m_div = (float)(1.0 / h[AD_M_DIV]);     \
    (void)inv_v_div, (void)inv_m_div, (void)v_div, (void)sign, (void)w, (void)keep, (void)gain, (void)v_keep, (void)v_gain, (void)m_div, (void)decay, (void)r;
#define AD_V(v, g) STORED(fmaf(v_gain * (g), (g), (v) * v_keep))
#define AD_DENOM(v) (sqrtf(v) / v_div + eps)
#define AD_U(m, v) ((m) / AD_DENOM(v) / m_div)
/* the masked passes compute u twice per element, and their square roots and divisions cost
 * nearly as much as their memory traffic: there, the divisions by the tensor's constants are
 * multiplications by their reciprocals (at most an ulp from the eager rounding) */
#define AD_U_MASKED(m, v) ((m) / (sqrtf(v) * inv_v_div + eps) * inv_m_div)

/* one pass over [j0, j1) without a mask. scaled: the count scale without a mask, whose factor
 * n/(n+1) the caller put into the lr; the eager path then steps with p.add_(u, alpha=-lr) */
static void SFX(ad_plain)(T *restrict p, const T *restrict g, T *restrict m, T *restrict v, int64_t j0, int64_t j1,
                          const double *h, int scaled) {
    AD_SCALARS
    const float value = (float)(-h[AD_LR] / h[AD_M_DIV]), neg_lr = (float)-h[AD_LR];
#define AD_PLAIN(M_NEW, P_NEW)                                            \
    _Pragma("omp simd") for (int64_t j = j0; j < j1; ++j) {               \
        float gj = sign * LOAD(g, j), mj = LOAD(m, j);                    \
        float mn = M_NEW(mj, gj), vn = AD_V(LOAD(v, j), gj);              \
        float pd = LOAD(p, j) * decay;                                    \
        STORE(p, j, P_NEW);                                               \
        STORE(m, j, mn * r);                                              \
        STORE(v, j, vn * r);                                              \
    }
#define AD_ADDCDIV(M_NEW) AD_PLAIN(M_NEW, pd + (value * mn) / AD_DENOM(vn))
#define AD_ADD(M_NEW) AD_PLAIN(M_NEW, fmaf(neg_lr, AD_U(mn, vn), pd))
    if (scaled) {
        AD_FORMS(AD_ADD)
    } else {
        AD_FORMS(AD_ADDCDIV)
    }
#undef AD_PLAIN
#undef AD_ADDCDIV
#undef AD_ADD
}

#define SIGN_SHIFT (8 * sizeof(UINT_T) - 1)
#define SIGN_BIT ((UINT_T)1 << SIGN_SHIFT)

/* pass 1 over [j0, j1): m, v and phi (in v's sign bit); sums[3] += ||u||^2, ||phi u||^2,
 * ||phi||_0 over the elements whose u^2 is finite (leanopt.mask.mask_sums): float32 over
 * chunks of AD_CHUNK elements, double across them (the mask's scale is a ratio of two long
 * sums; double lanes in the loop itself would cost 10x in bfloat16) */
#define AD_CHUNK 2048
static void SFX(ad_sums)(const T *restrict g, T *restrict m, T *restrict v, int64_t j0, int64_t j1, const double *h,
                         int sync, double *sums) {
    AD_SCALARS
/* gcc 12 vectorizes this loop only in this form: an int phi (an unsigned one converted to
 * float, or a "c ? 1.0f : 0.0f", leaves it scalar, 4x slower) */
#define AD_SUMS(M_NEW)                                                                      \
    {                                                                                       \
        float uu = 0.0f, su = 0.0f, count = 0.0f;                                           \
        _Pragma("omp simd reduction(+ : uu, su, count)") for (int64_t j = c; j < e; ++j) { \
            float gj = sign * LOAD(g, j), mo = LOAD(m, j);                                  \
            float mn = M_NEW(mo, gj), vn = AD_V(LOAD(v, j), gj);                            \
            float u = AD_U_MASKED(mn, vn);                                                  \
            int phi = gj * (sync ? mn : mo) > 0.0f;                                         \
            STORE(m, j, mn);                                                                \
            RAW_STORE(v, j, (ENCODE(vn) & ~SIGN_BIT) | ((UINT_T)phi << SIGN_SHIFT));        \
            float q = u * u;                                                                \
            int finite = q < INFINITY;                                                      \
            float f = finite ? q : 0.0f, kept = (float)(phi & finite);                      \
            uu += f;                                                                        \
            su += f * kept;                                                                 \
            count += kept;                                                                  \
        }                                                                                   \
        sums[0] += uu, sums[1] += su, sums[2] += count;                                     \
    }
    for (int64_t c = j0; c < j1; c += AD_CHUNK) {
        int64_t e = c + AD_CHUNK < j1 ? c + AD_CHUNK : j1;
        AD_FORMS(AD_SUMS)
    }
#undef AD_SUMS
}

/* pass 2 over [j0, j1): p moves by step (phi u), or by step u where the mask fell back ("all");
 * v gets its sign back (or m and v their rescale). phi multiplies u, so that a NaN u reaches p
 * also where phi = 0, as in the eager path; as (float)phi, since gcc 12 takes phi ? 1 : 0 for a
 * branch and leaves the whole loop scalar (4x slower) */
static void SFX(ad_apply)(T *restrict p, T *restrict m, T *restrict v, int64_t j0, int64_t j1, const double *h, float step,
                          int all) {
    AD_SCALARS
    const UINT_T select = all ? SIGN_BIT : 0;
#define AD_APPLY(STATE)                                                     \
    _Pragma("omp simd") for (int64_t j = j0; j < j1; ++j) {                 \
        UINT_T bits = RAW_LOAD(v, j);                                       \
        int phi = ((bits | select) & SIGN_BIT) != 0;                        \
        bits &= ~SIGN_BIT;                                                  \
        float vn = DECODE(bits), mn = LOAD(m, j);                           \
        float sel = AD_U_MASKED(mn, vn) * (float)phi;                       \
        STORE(p, j, fmaf(-sel, step, LOAD(p, j) * decay));                  \
        STATE                                                               \
    }
    if (r != 1.0f) {
        AD_APPLY(STORE(m, j, mn * r); STORE(v, j, vn * r);)
    } else {
        AD_APPLY(RAW_STORE(v, j, bits);)
    }
#undef AD_APPLY
}
#undef SIGN_BIT
#undef SIGN_SHIFT
#undef AD_M_LOW
#undef AD_M_HIGH
#undef AD_M_KEEP_GAIN
#undef AD_FORMS
#undef AD_SCALARS
#undef AD_V
#undef AD_DENOM
#undef AD_U
#undef AD_U_MASKED
#undef AD_CHUNK
#undef FINITE_SQ

/* ---- Lion and Lion-PMA (leanopt.lion.LionStep), no mask: one pass ---------------------------
 *     c = c_keep m + c_gain g ;  m = m_keep m + m_gain g
 *     p = p decay - lr sign(c) ;  m = rescale m
 * ---- SGD-SaI (leanopt.sgd_sai), no mask: one pass ---------------------------------------
 *     m = keep m + gain g  (a fresh buffer already holds g: keep 1, gain 0; no buffer: m = g)
 *     p = p decay - lr scale m */

static void SFX(lion_plain)(T *restrict p, const T *restrict g, T *restrict m, int64_t j0, int64_t j1, const double *h) {
    const float sign = (float)h[LI_SIGN], c_keep = (float)h[LI_C_KEEP], c_gain = (float)h[LI_C_GAIN];
    const float m_keep = (float)h[LI_M_KEEP], m_gain = (float)h[LI_M_GAIN], decay = (float)h[LI_DECAY];
    const float neg_lr = (float)-h[LI_LR], r = (float)h[LI_RESCALE];
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) {
        float gj = sign * LOAD(g, j), mj = LOAD(m, j);
        float c = fmaf(c_gain, gj, mj * c_keep);
        /* leanopt.lion.nan_sign: torch.sign, plus c - c (0, or NaN where c is not finite) */
        float u = (float)(c > 0.0f) - (float)(c < 0.0f) + (c - c);
        float mn = fmaf(m_gain, gj, mj * m_keep);
        STORE(p, j, fmaf(neg_lr, u, LOAD(p, j) * decay));
        STORE(m, j, mn * r);
    }
}

static void SFX(sgd_plain)(T *restrict p, const T *restrict g, T *restrict m, int64_t j0, int64_t j1, const double *h) {
    const float sign = (float)h[SG_SIGN], keep = (float)h[SG_KEEP], gain = (float)h[SG_GAIN];
    const float decay = (float)h[SG_DECAY], neg_lr = (float)-h[SG_LR], scale = (float)h[SG_SCALE];
    if (h[SG_HAS_M] == 0.0) {
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j)
            STORE(p, j, fmaf(neg_lr * (sign * LOAD(g, j)), scale, LOAD(p, j) * decay));
    } else if (h[SG_FRESH] != 0.0) {
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) STORE(p, j, fmaf(neg_lr * LOAD(m, j), scale, LOAD(p, j) * decay));
    } else {
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {
            float mn = STORED(fmaf(gain, sign * LOAD(g, j), LOAD(m, j) * keep));
            STORE(m, j, mn);
            STORE(p, j, fmaf(neg_lr * mn, scale, LOAD(p, j) * decay));
        }
    }
}

/* ---- Lion (kind 0) and SGD-SaI with a momentum buffer (kind 1) with the mask component --------
 * Two calls, as Adam-mini's: pass 1 (ew_mask_sums) adds the mask sums of [j0, j1) to sums[3] and
 * writes nothing (the asynchronous phi needs the old m, and m has no free bit); pass 2
 * (ew_mask_apply) recomputes u, m_new and phi and moves p and m. Per element:
 *     Lion:    u = sign(c_keep m + c_gain g) (NaN where that is not finite),  m_new = m_keep m + m_gain g
 *     SGD-SaI: m_new = keep m + gain g,  u = scale m_new
 *     phi = g m_old > 0 (async) or g m_new > 0 (sync);  p = decay p - step (phi u);  m = rescale m_new */
#define EW_SCALARS                                                                                    \
    const float sign = (float)h[kind ? SG_SIGN : LI_SIGN];                                            \
    const float c_keep = kind ? 0.0f : (float)h[LI_C_KEEP], c_gain = kind ? 0.0f : (float)h[LI_C_GAIN]; \
    const float m_keep = (float)h[kind ? SG_KEEP : LI_M_KEEP], m_gain = (float)h[kind ? SG_GAIN : LI_M_GAIN]; \
    const float scale = kind ? (float)h[SG_SCALE] : 1.0f, r = kind ? 1.0f : (float)h[LI_RESCALE];     \
    const int sync = mask == MASK_SYNC;                                                               \
    (void)r, (void)c_keep, (void)c_gain, (void)scale;
/* u and m_new of one element (gj: the signed gradient, mj: the old m), one form per family: the
 * family is chosen outside the loops (a branch inside one keeps gcc from vectorizing it) */
#define EW_LION(gj, mj, u, mn)                                                                        \
    float mn = STORED(fmaf(m_gain, (gj), (mj) * m_keep)), c_ = fmaf(c_gain, (gj), (mj) * c_keep);     \
    float u = (float)(c_ > 0.0f) - (float)(c_ < 0.0f) + (c_ - c_);
#define EW_SGD(gj, mj, u, mn)                                                                         \
    float mn = STORED(fmaf(m_gain, (gj), (mj) * m_keep)), u = mn * scale;

#define EW_SUMS(UM, PHI_M)                                                                            \
    for (int64_t c = j0; c < j1; c += 2048) {                                                         \
        int64_t e = c + 2048 < j1 ? c + 2048 : j1;                                                    \
        float uu = 0.0f, su = 0.0f, count = 0.0f;                                                     \
        _Pragma("omp simd reduction(+ : uu, su, count)") for (int64_t j = c; j < e; ++j) {            \
            float gj = sign * LOAD(g, j), mj = LOAD(m, j);                                            \
            UM(gj, mj, u, mn)                                                                         \
            (void)mn;                                                                                 \
            int phi = gj * PHI_M > 0.0f;                                                              \
            float q = u * u;                                                                          \
            int finite = q < INFINITY;                                                                \
            float f = finite ? q : 0.0f, kept = (float)(phi & finite);                                \
            uu += f;                                                                                  \
            su += f * kept;                                                                           \
            count += kept;                                                                            \
        }                                                                                             \
        sums[0] += uu, sums[1] += su, sums[2] += count;                                               \
    }

static void SFX(ew_mask_sums)(const T *restrict g, const T *restrict m, int64_t j0, int64_t j1, const double *h, int kind,
                              int mask, double *sums) {
    EW_SCALARS
    /* each (family, mask) its own loop: gcc leaves a loop with a branch inside scalar (here 25x slower) */
    if (kind && sync) {
        EW_SUMS(EW_SGD, mn)
    } else if (kind) {
        EW_SUMS(EW_SGD, mj)
    } else if (sync) {
        EW_SUMS(EW_LION, mn)
    } else {
        EW_SUMS(EW_LION, mj)
    }
}

#define EW_APPLY(UM, PHI_M)                                                                           \
    _Pragma("omp simd") for (int64_t j = j0; j < j1; ++j) {                                           \
        float gj = sign * LOAD(g, j), mj = LOAD(m, j);                                                \
        UM(gj, mj, u, mn)                                                                             \
        int phi = (gj * PHI_M > 0.0f) | all;                                                          \
        STORE(p, j, fmaf(-(u * (float)phi), step, LOAD(p, j) * decay));                               \
        STORE(m, j, mn * r);                                                                          \
    }

static void SFX(ew_mask_apply)(T *restrict p, const T *restrict g, T *restrict m, int64_t j0, int64_t j1, const double *h,
                               int kind, int mask, float step, int all) {
    EW_SCALARS
    const float decay = (float)h[kind ? SG_DECAY : LI_DECAY];
    if (kind && sync) {
        EW_APPLY(EW_SGD, mn)
    } else if (kind) {
        EW_APPLY(EW_SGD, mj)
    } else if (sync) {
        EW_APPLY(EW_LION, mn)
    } else {
        EW_APPLY(EW_LION, mj)
    }
}
#undef EW_SCALARS
#undef EW_LION
#undef EW_SGD
#undef EW_SUMS
#undef EW_APPLY
