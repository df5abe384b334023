/* Blockwise codes of compact optimizer state (leanopt/precision.py, docs/algorithms.md §8),
 * one pass each way: decode codes + block scales to float32, encode float32 to codes + scales.
 * The operations and their order are the eager codec's. The square root here is correctly
 * rounded and torch's vectorized one sometimes is not, so on an exact rounding tie the two
 * can pick neighbouring codes; decoding the same codes gives the same bits.
 *
 * A tensor is R rows of L elements (its last dimension), cut into blocks of B along each row
 * (the last one ragged); one float32 scale (absmax) per block, R x ceil(L/B) of them.
 * kind 0, a momentum:      x = a * sign(c) * (|c|/top)^2, c signed (int8, or int4 packed)
 * kind 1, a second moment: sqrt(x) = a * (c/top)^2, c in 0..top (uint8); a positive x never
 *                          gets code 0
 * packed: int4 codes, two per byte along the row (low nibble first) with an offset of 8; a
 * row of odd length ends in a pad nibble. Blocks have an even size, so a byte never holds
 * two blocks. */

#define CODEC_INLINE static inline __attribute__((always_inline))

/* one code's value: a sign(c) (|c|/top)^2, or for a second moment (a (c/top)^2)^2 */
CODEC_INLINE float value_of(int c, float a, int kind, float top) {
    float y = (float)c / top;
    if (kind) {
        float s = (y * y) * a;
        return s * s;
    }
    return copysignf(fabsf(y) * fabsf(y), y) * a;
}

/* elements [j0, j1) of a row of codes into out[0 .. j1 - j0) */
CODEC_INLINE void decode_block(const uint8_t *restrict codes, float a, float *restrict out, int64_t j0, int64_t j1,
                               int kind, int packed, float top) {
    if (!packed) {
        for (int64_t j = j0; j < j1; ++j) out[j - j0] = value_of(kind ? (int)codes[j] : (int)(int8_t)codes[j], a, kind, top);
        return;
    }
    /* two codes a byte, low nibble first, offset 8; j0 is even. A byte index, which vectorizes */
    int64_t k0 = j0 / 2, k1 = j1 / 2;
    for (int64_t k = k0; k < k1; ++k) {
        int b = codes[k];
        out[2 * (k - k0)] = value_of((b & 15) - 8, a, 0, top);
        out[2 * (k - k0) + 1] = value_of((b >> 4) - 8, a, 0, top);
    }
    if (j1 & 1) out[j1 - 1 - j0] = value_of((codes[k1] & 15) - 8, a, 0, top);
}

/* sqrt(max(v, 0)), a NaN kept (as torch's clamp then sqrt) */
CODEC_INLINE float root_of(float v) { return sqrtf(v > 0 || v != v ? v : 0.0f); }

/* round(top sqrt(|y|)) capped at top (a NaN y gives top; a compare, which vectorizes where fminf does not) */
CODEC_INLINE float code_of(float y, float top) {
    float c = (sqrtf(fabsf(y)) * top + 0x1.8p23f) - 0x1.8p23f;
    return c < top ? c : top;
}

/* x[0 .. j1 - j0) into elements [j0, j1) of a row of codes, and the block's scale */
CODEC_INLINE void encode_block(const float *restrict x, uint8_t *restrict codes, float *restrict scale, int64_t j0,
                               int64_t j1, int kind, int packed, float top) {
    /* the largest |x| (sqrt(max(x, 0)) for a second moment: sqrt is monotonic) as the largest
     * bit pattern, which the compiler vectorizes (a float max it may not reorder); a NaN
     * anywhere makes the scale NaN, as torch's amax */
    int32_t most = 0;
    int nan = 0;
    for (int64_t j = j0; j < j1; ++j) {
        float xv = x[j - j0];
        int32_t b = (int32_t)f32_bits(kind ? xv : fabsf(xv));
        most = b > most ? b : most;
        nan |= xv != xv;
    }
    float a = kind ? sqrtf(f32_of_bits((uint32_t)most)) : f32_of_bits((uint32_t)most);
    a = nan ? NAN : a;
    *scale = a;
    float safe = a > 0 ? a : 1.0f;
    /* c = round(top sqrt(|y|)), half to even: adding and subtracting 1.5 * 2^23 rounds a float
     * in [0, 2^22) to an integer in the current (nearest-even) mode, as nearbyintf, and
     * vectorizes; code_of keeps the code of a non-finite block (NaN y) in range */
#define CODE_OF(y) code_of(y, top)
    if (kind) {
        for (int64_t j = j0; j < j1; ++j) {
            float y = root_of(x[j - j0]) / safe, c = CODE_OF(y);
            codes[j] = (uint8_t)(int32_t)(y > 0 && c < 1 ? 1.0f : c); /* via int32: GCC vectorizes that */
        }
    } else if (!packed) {
        for (int64_t j = j0; j < j1; ++j) {
            float y = x[j - j0] / safe;
            codes[j] = (uint8_t)(int32_t)copysignf(CODE_OF(y), y);
        }
    } else { /* two codes a byte, offset 8; blocks start at even j (B is even) */
        int64_t k0 = j0 / 2, k1 = j1 / 2;
        for (int64_t k = k0; k < k1; ++k) {
            float y0 = x[2 * (k - k0)] / safe, y1 = x[2 * (k - k0) + 1] / safe;
            int32_t q0 = (int32_t)copysignf(CODE_OF(y0), y0) + 8, q1 = (int32_t)copysignf(CODE_OF(y1), y1) + 8;
            codes[k] = (uint8_t)(q0 | (q1 << 4));
        }
        if (j1 & 1) { /* the row's last element, alone in its byte with the pad nibble */
            float y = x[j1 - 1 - j0] / safe;
            codes[k1] = (uint8_t)(((int32_t)copysignf(CODE_OF(y), y) + 8) | (8 << 4));
        }
    }
#undef CODE_OF
}

/* one block of one format, the format's flags constants (the compiler specializes each) */
CODEC_INLINE void codec_block(int encode, float *xr, uint8_t *cr, float *s, int64_t j0, int64_t j1, int kind, int packed,
                              float top) {
    if (encode)
        encode_block(xr, cr, s, j0, j1, kind, packed, top);
    else
        decode_block(cr, *s, xr, j0, j1, kind, packed, top);
}

/* decode (encode = 0) or encode (encode = 1) one tensor; X: its float32 values, C: its codes
 * (R rows of L, or of ceil(L/2) bytes when packed), S: its scales. Returns 0, or 1 for a
 * bad argument. */
int leanopt_codec(int nt, int encode, void *X, void *C, void *S, int64_t R, int64_t L, int64_t B, int kind, int packed,
                  int top) {
    if (nt < 1 || nt > 1024 || B < 1 || ((B & 1) && B < L) || L < 1 || R < 0 || top < 1 || (kind && packed)) return 1;
    int64_t nb = (L + B - 1) / B, row_bytes = packed ? (L + 1) / 2 : L, items = R * nb;
    float *x = (float *)X, *s = (float *)S;
    uint8_t *c = (uint8_t *)C;
    float ftop = (float)top;
    int form = encode * 4 + kind * 2 + packed;
#pragma omp parallel for num_threads(items * B >= 65536 ? nt : 1) schedule(static)
    for (int64_t i = 0; i < items; ++i) {
        int64_t r = i / nb, k = i % nb, j0 = k * B, j1 = j0 + B < L ? j0 + B : L;
        float *xr = x + r * L + j0;
        uint8_t *cr = c + r * row_bytes;
        switch (form) {
            case 0: codec_block(0, xr, cr, s + i, j0, j1, 0, 0, ftop); break;
            case 1: codec_block(0, xr, cr, s + i, j0, j1, 0, 1, ftop); break;
            case 2: codec_block(0, xr, cr, s + i, j0, j1, 1, 0, ftop); break;
            case 4: codec_block(1, xr, cr, s + i, j0, j1, 0, 0, ftop); break;
            case 5: codec_block(1, xr, cr, s + i, j0, j1, 0, 1, ftop); break;
            default: codec_block(1, xr, cr, s + i, j0, j1, 1, 0, ftop); break;
        }
    }
    return 0;
}

/* Stochastic rounding of float32 to bfloat16 (leanopt/precision.py, stochastic_round_): add 16
 * bits of a counter-based hash of the element's index and `key` below the bf16 mantissa, then
 * truncate; +-Inf and NaN unchanged. The hash is precision.rounding_bits's, bit for bit. */
CODEC_INLINE uint32_t rounding_bits(uint64_t i, uint32_t key) {
    uint32_t x = (uint32_t)i * 0x9E3779B1u + key;
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x6C8E9CF5u;
    x ^= x >> 16;
    return x & 0xFFFFu;
}

/* x rounded to bfloat16 with the bits of element i */
CODEC_INLINE uint16_t stochastic_bf16(float x, uint64_t i, uint32_t key) {
    uint32_t u = f32_bits(x);
    uint32_t finite = (u & 0x7f800000u) != 0x7f800000u;
    uint32_t r = finite ? u + rounding_bits(i, key) : u;
    if (!finite && (u & 0x7fffffu)) r = u | 0x400000u; /* a NaN stays a (quiet) NaN */
    return (uint16_t)(r >> 16);
}

int leanopt_stochastic_round(int nt, const float *X, uint16_t *out, int64_t n, uint32_t key) {
    if (nt < 1 || nt > 1024 || n < 0) return 1;
#pragma omp parallel for num_threads(n >= 65536 ? nt : 1) schedule(static)
    for (int64_t i = 0; i < n; ++i) out[i] = stochastic_bf16(X[i], (uint64_t)i, key);
    return 0;
}

/* ---- one-pass steps over compact state ------------------------------------------------------
 * The unmasked Adam family (family 0), Lion (1) and SGD-SaI (2) on one float32 tensor of R rows
 * of L elements whose per-element states are compact: each block is decoded into a buffer on
 * the stack, stepped by the same code as the full-precision kernels (ad_plain, lion_plain,
 * sgd_plain), and encoded again -- one pass over memory, no temporaries. A state's format:
 * 0 float32 (M or V itself, MS/VS unused), 1 int8, 2 int4 (momenta only), 3 bfloat16 written
 * with stochastic rounding (the bits of the element's index in the tensor and the state's key;
 * MS/VS unused). */
#define COMPACT_MAX_BLOCK 4096

/* each format's loops with its flags as constants, so that the compiler vectorizes them */
CODEC_INLINE float *compact_load(void *S, const float *scales, int fmt, int kind, int64_t r, int64_t i, int64_t L,
                                 int64_t j0, int64_t j1, float *buf) {
    if (fmt == 0) return (float *)S + r * L + j0;
    if (fmt == 3) {
        const uint16_t *x = (const uint16_t *)S + r * L;
        for (int64_t j = j0; j < j1; ++j) buf[j - j0] = bf16_to_f32(x[j]);
        return buf;
    }
    const uint8_t *row = (const uint8_t *)S + r * (fmt == 2 ? (L + 1) / 2 : L);
    if (fmt == 2)
        decode_block(row, scales[i], buf, j0, j1, 0, 1, 7.0f);
    else if (kind)
        decode_block(row, scales[i], buf, j0, j1, 1, 0, 255.0f);
    else
        decode_block(row, scales[i], buf, j0, j1, 0, 0, 127.0f);
    return buf;
}

CODEC_INLINE void compact_store(void *S, float *scales, int fmt, int kind, int64_t r, int64_t i, int64_t L, int64_t j0,
                                int64_t j1, const float *buf, uint32_t key) {
    if (fmt == 0) return; /* stepped in place */
    if (fmt == 3) {
        uint16_t *x = (uint16_t *)S + r * L;
        for (int64_t j = j0; j < j1; ++j) x[j] = stochastic_bf16(buf[j - j0], (uint64_t)(r * L + j), key);
        return;
    }
    uint8_t *row = (uint8_t *)S + r * (fmt == 2 ? (L + 1) / 2 : L);
    if (fmt == 2)
        encode_block(buf, row, scales + i, j0, j1, 0, 1, 7.0f);
    else if (kind)
        encode_block(buf, row, scales + i, j0, j1, 1, 0, 255.0f);
    else
        encode_block(buf, row, scales + i, j0, j1, 0, 0, 127.0f);
}

/* a block of a state as compact_load gives it, but always in buf: pass 1 of a masked step
 * writes its m and v only to scratch */
CODEC_INLINE float *compact_copy(void *S, const float *scales, int fmt, int kind, int64_t r, int64_t i, int64_t L,
                                 int64_t j0, int64_t j1, float *buf) {
    float *x = compact_load(S, scales, fmt, kind, r, i, L, j0, j1, buf);
    if (x != buf) memcpy(buf, x, (size_t)(j1 - j0) * sizeof(float));
    return buf;
}

/* The masked steps over compact state, in the two passes of the full-precision kernels
 * (leanopt_adam's, leanopt_elementwise_masked's). Pass 1 decodes each block's state and adds its
 * mask sums, all blocks' added up: the Adam family (0) moves m and v in scratch to take them
 * (ad_sums), Lion (1) and SGD-SaI with a momentum buffer (2) only read m (ew_mask_sums). Pass 2
 * decodes the blocks again, steps p and the state by the step those sums give (ad_apply,
 * ew_mask_apply) and encodes the state. Only pass 2 writes: the state read twice is the step's
 * old one. SGD-SaI's asynchronous mask on a fresh buffer takes no sums (phi = 1). */
static void compact_masked(int nt, int family, float *P, const float *G, void *M, float *MS, int fm, void *V, float *VS,
                           int fv, int64_t R, int64_t L, int64_t B, const double *h, int mask, int alpha, int count_scale,
                           const uint32_t *keys) {
    int64_t nb = (L + B - 1) / B, items = R * nb;
    int threads = R * L >= 65536 ? nt : 1, kind = family - 1;
    int none = mask == MASK_NONE || (family == 2 && h[SG_FRESH] != 0.0 && mask == MASK_ASYNC);
    double s0 = 0.0, s1 = 0.0, s2 = 0.0;
    if (!none) {
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : s0, s1, s2)
        for (int64_t i = 0; i < items; ++i) {
            float mbuf[COMPACT_MAX_BLOCK], vbuf[COMPACT_MAX_BLOCK];
            int64_t r = i / nb, j0 = (i % nb) * B, j1 = j0 + B < L ? j0 + B : L, off = r * L + j0;
            double sums[3] = {0.0, 0.0, 0.0};
            if (family == 0)
                ad_sums_f32(G + off, compact_copy(M, MS, fm, 0, r, i, L, j0, j1, mbuf),
                            compact_copy(V, VS, fv, 1, r, i, L, j0, j1, vbuf), 0, j1 - j0, h, mask == MASK_SYNC, sums);
            else
                ew_mask_sums_f32(G + off, compact_load(M, MS, fm, 0, r, i, L, j0, j1, mbuf), 0, j1 - j0, h, kind, mask, sums);
            s0 += sums[0], s1 += sums[1], s2 += sums[2];
        }
    }
    double sums[3] = {s0, s1, s2};
    int all;
    float step = mask_step(sums, R * L, h[family == 0 ? AD_LR : family == 1 ? LI_LR : SG_LR], alpha, count_scale, &all);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < items; ++i) {
        float mbuf[COMPACT_MAX_BLOCK], vbuf[COMPACT_MAX_BLOCK];
        int64_t r = i / nb, j0 = (i % nb) * B, j1 = j0 + B < L ? j0 + B : L, off = r * L + j0;
        float *m = compact_load(M, MS, fm, 0, r, i, L, j0, j1, mbuf);
        if (family == 0) {
            float *v = compact_load(V, VS, fv, 1, r, i, L, j0, j1, vbuf);
            double unused[3] = {0.0, 0.0, 0.0};
            ad_sums_f32(G + off, m, v, 0, j1 - j0, h, mask == MASK_SYNC, unused);
            ad_apply_f32(P + off, m, v, 0, j1 - j0, h, step, all);
            compact_store(V, VS, fv, 1, r, i, L, j0, j1, v, keys[1]);
        } else {
            ew_mask_apply_f32(P + off, G + off, m, 0, j1 - j0, h, kind, mask, step, all);
        }
        compact_store(M, MS, fm, 0, r, i, L, j0, j1, m, keys[0]);
    }
}

/* h: the family's row of doubles (AD_N, LI_N or SG_N); scaled: ad_plain's; mask, alpha,
 * count_scale: the mask component (MASK_NONE: one pass; else compact_masked); keys: the rounding keys of M and V (bfloat16 formats).
 * Returns 0, or 1 for a bad argument. */
int leanopt_compact_step(int nt, int family, float *P, const float *G, void *M, float *MS, int fm, void *V, float *VS,
                         int fv, int64_t R, int64_t L, int64_t B, const double *h, int scaled, int mask, int alpha,
                         int count_scale, const uint32_t *keys) {
    if (nt < 1 || nt > 1024 || family < 0 || family > 2 || L < 1 || R < 0 || B < 1 || ((B & 1) && B < L)) return 1;
    if ((B < L ? B : L) > COMPACT_MAX_BLOCK || fm < 0 || fm > 3 || fv < 0 || fv > 3 || fv == 2 || (family == 0 && !V)) return 1;
    if (mask < MASK_NONE || mask > MASK_SYNC || (family != 0 && !M)) return 1;
    if (mask != MASK_NONE || (family != 0 && count_scale)) {
        compact_masked(nt, family, P, G, M, MS, fm, V, VS, fv, R, L, B, h, mask, alpha, count_scale, keys);
        return 0;
    }
    int64_t nb = (L + B - 1) / B, items = R * nb;
#pragma omp parallel for num_threads(R * L >= 65536 ? nt : 1) schedule(static)
    for (int64_t i = 0; i < items; ++i) {
        float mbuf[COMPACT_MAX_BLOCK], vbuf[COMPACT_MAX_BLOCK];
        int64_t r = i / nb, j0 = (i % nb) * B, j1 = j0 + B < L ? j0 + B : L, off = r * L + j0;
        float *m = compact_load(M, MS, fm, 0, r, i, L, j0, j1, mbuf);
        float *v = family == 0 ? compact_load(V, VS, fv, 1, r, i, L, j0, j1, vbuf) : NULL;
        if (family == 0)
            ad_plain_f32(P + off, G + off, m, v, 0, j1 - j0, h, scaled);
        else if (family == 1)
            lion_plain_f32(P + off, G + off, m, 0, j1 - j0, h);
        else
            sgd_plain_f32(P + off, G + off, m, 0, j1 - j0, h);
        compact_store(M, MS, fm, 0, r, i, L, j0, j1, m, keys[0]);
        if (family == 0) compact_store(V, VS, fv, 1, r, i, L, j0, j1, v, keys[1]);
    }
    return 0;
}

/* Adam-mini over one float32 tensor of R blocks of C contiguous elements (the row layouts of
 * leanopt_adam_mini_rows), whose momentum is compact (fm: 1 int8, 2 int4; rows of L elements,
 * blocks of B along them; 3 bfloat16) and whose v is float32, one per block. The tensor is cut into spans
 * of max(C, L) elements, whole blocks and whole rows of codes both (the caller checks that one
 * of C, L divides the other; fm 3: bfloat16 momentum, rows of L elements read in blocks of B,
 * written with the stochastic rounding bits of key); each span's momentum is decoded into a buffer, stepped by am_rows
 * and encoded again: one pass. With the mask (or the count scale alone), two, as
 * leanopt_adam_mini_masked's: every span's m decoded, v moved and the mask sums added
 * (am_mask_sums), then every span's m decoded again, stepped (am_mask_apply) and encoded.
 * Returns 0, 1 for a bad argument, 2 without memory. */
#define COMPACT_MAX_SPAN (1 << 20)

/* span s's momentum: decoded into buf (store 0) or encoded from it (store 1) */
static void amc_span(void *M, float *MS, int fm, int64_t L, int64_t B, int64_t s, int64_t rows_per_span, float *buf,
                     int store, uint32_t key) {
    int64_t nb = (L + B - 1) / B;
    for (int64_t t = 0; t < rows_per_span; ++t) {
        int64_t row = s * rows_per_span + t;
        for (int64_t k = 0; k < nb; ++k) {
            int64_t j0 = k * B, j1 = j0 + B < L ? j0 + B : L;
            if (store)
                compact_store(M, MS, fm, 0, row, row * nb + k, L, j0, j1, buf + t * L + j0, key);
            else
                compact_load(M, MS, fm, 0, row, row * nb + k, L, j0, j1, buf + t * L + j0);
        }
    }
}

int leanopt_adam_mini_compact(int nt, float *P, const float *G, void *M, float *MS, int fm, float *V, int64_t R, int64_t C,
                              int64_t L, int64_t B, const double *h, int mask, int alpha, int count_scale, uint32_t key) {
    int64_t span = C > L ? C : L;
    if (nt < 1 || nt > 1024 || fm < 1 || fm > 3 || C < 1 || L < 1 || R < 0 || B < 1 || ((B & 1) && B < L)) return 1;
    if (span % C || span % L || span > COMPACT_MAX_SPAN || (R * C) % span || mask < MASK_NONE || mask > MASK_SYNC) return 1;
    int64_t spans = R * C / span, bps = span / C, rps = span / L;
    int masked = mask != MASK_NONE || count_scale, failed = 0, all = 0;
    float step = 0.0f;
    double s0 = 0.0, s1 = 0.0, s2 = 0.0;
    for (int pass = masked ? 1 : 2; pass <= 2; ++pass) {
        if (pass == 2 && masked) {
            double sums[3] = {s0, s1, s2};
            step = mask_step(sums, R * C, h[AM_LR], alpha, count_scale, &all);
        }
#pragma omp parallel num_threads(R * C >= 65536 ? nt : 1) reduction(+ : s0, s1, s2)
        {
            float *buf = malloc((size_t)span * sizeof(float));
            if (!buf) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(static)
            for (int64_t s = 0; s < spans; ++s) {
                if (!buf) continue;
                float *p = P + s * span, *v = V + s * bps;
                const float *g = G + s * span;
                amc_span(M, MS, fm, L, B, s, rps, buf, 0, key);
                if (pass == 1) {
                    double sums[3] = {0.0, 0.0, 0.0};
                    am_mask_sums_f32(g, buf, v, C, 0, bps, h, mask, 0, NULL, sums);
                    s0 += sums[0], s1 += sums[1], s2 += sums[2];
                    continue;
                }
                if (masked)
                    am_mask_apply_f32(p, g, buf, v, C, 0, bps, h, mask, step, all, NULL);
                else
                    am_rows_f32(p, g, buf, v, C, 0, bps, h, 0);
                amc_span(M, MS, fm, L, B, s, rps, buf, 1, key);
            }
            free(buf);
        }
        if (failed) return 2;
    }
    return 0;
}

/* Adam-mini's column blocks (leanopt_adam_mini_cols) over one float32 tensor of R rows of C
 * elements whose momentum is compact in rows of the same C elements (fm as
 * leanopt_adam_mini_compact's; blocks of B along the rows): each row's momentum is decoded
 * into a buffer, stepped from every column's block v of this step (V, float32, only read:
 * the caller moved it from leanopt_col_sq_sums) and encoded again, the rows split over the
 * threads. Returns 0, 1 for a bad argument, 2 without memory. */
int leanopt_adam_mini_cols_compact(int nt, float *P, const float *G, void *M, float *MS, int fm, const float *V, int64_t R,
                                   int64_t C, int64_t B, const double *h, uint32_t key) {
    if (nt < 1 || nt > 1024 || fm < 1 || fm > 3 || C < 1 || R < 0 || B < 1 || ((B & 1) && B < C)) return 1;
    if ((B < C ? B : C) > COMPACT_MAX_BLOCK) return 1;
    int use = R * C < SMALL || R < 2 ? 1 : (R < nt ? (int)R : nt), failed = 0;
#pragma omp parallel num_threads(use) reduction(| : failed)
    {
        int tid = omp_get_thread_num(), n = omp_get_num_threads();
        int64_t r0 = R * tid / n, r1 = R * (tid + 1) / n;
        float *step = malloc((size_t)C * 2 * sizeof(float)); /* the columns' steps, then one row's m */
        if (!step) {
            failed = 1;
        } else {
            float *buf = step + C;
            am_col_steps_f32(V, C, h, step);
            for (int64_t r = r0; r < r1; ++r) {
                amc_span(M, MS, fm, C, B, r, 1, buf, 0, key);
                am_cols_apply_f32(P + r * C, G + r * C, buf, C, 0, 1, h, step);
                amc_span(M, MS, fm, C, B, r, 1, buf, 1, key);
            }
        }
        free(step);
    }
    return failed ? 2 : 0;
}
