/* Blockwise codes of compact optimizer state (leanopt/precision.py, docs/algorithms.md §8),
 * one pass each way: decode codes + block scales to float32, encode float32 to codes + scales.
 * The operations and their order are the eager codec's, so both give the same bits.
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

CODEC_INLINE int codec_get(const uint8_t *row, int64_t j, int kind, int packed) {
    if (packed) return (int)((row[j >> 1] >> ((j & 1) * 4)) & 15) - 8;
    return kind ? (int)row[j] : (int)(int8_t)row[j];
}

CODEC_INLINE void decode_block(const uint8_t *codes, float a, float *out, int64_t j0, int64_t j1, int kind, int packed,
                               float top) {
    for (int64_t j = j0; j < j1; ++j) {
        float y = (float)codec_get(codes, j, kind, packed) / top;
        if (kind) {
            float s = (y * y) * a;
            out[j] = s * s;
        } else {
            out[j] = copysignf(fabsf(y) * fabsf(y), y) * a;
        }
    }
}

/* sqrt(max(v, 0)), a NaN kept (as torch's clamp then sqrt) */
CODEC_INLINE float root_of(float v) { return sqrtf(v > 0 || v != v ? v : 0.0f); }

CODEC_INLINE void encode_block(const float *x, uint8_t *codes, float *scale, int64_t j0, int64_t j1, int kind, int packed,
                               float top) {
    float a = 0.0f;
    int nan = 0;
    for (int64_t j = j0; j < j1; ++j) {
        float v = kind ? root_of(x[j]) : fabsf(x[j]);
        nan |= v != v;
        a = v > a ? v : a;
    }
    a = nan ? NAN : a; /* a NaN is the block's scale, as torch's amax */
    *scale = a;
    float safe = a > 0 ? a : 1.0f;
    for (int64_t j = j0; j < j1; ++j) {
        float y = (kind ? root_of(x[j]) : x[j]) / safe;
        /* fminf: the code of a non-finite block stays in range */
        float c = fminf(nearbyintf(sqrtf(fabsf(y)) * top), top);
        if (kind) {
            codes[j] = (uint8_t)(y > 0 && c < 1 ? 1.0f : c);
        } else if (packed) {
            int q = (int)copysignf(c, y) + 8;
            uint8_t *b = codes + (j >> 1);
            *b = (j & 1) ? (uint8_t)((*b & 15) | (q << 4)) : (uint8_t)((*b & 0xf0) | q);
        } else {
            codes[j] = (uint8_t)(int8_t)copysignf(c, y);
        }
    }
    if (packed && (j1 & 1)) { /* a row of odd length: its pad nibble holds code 0 */
        uint8_t *b = codes + (j1 >> 1);
        *b = (uint8_t)((*b & 15) | (8 << 4));
    }
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
        float *xr = x + r * L;
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

int leanopt_stochastic_round(int nt, const float *X, uint16_t *out, int64_t n, uint32_t key) {
    if (nt < 1 || nt > 1024 || n < 0) return 1;
#pragma omp parallel for num_threads(n >= 65536 ? nt : 1) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        uint32_t u = f32_bits(X[i]);
        uint32_t finite = (u & 0x7f800000u) != 0x7f800000u;
        uint32_t r = finite ? u + rounding_bits((uint64_t)i, key) : u;
        if (!finite && (u & 0x7fffffu)) r = u | 0x400000u; /* a NaN stays a (quiet) NaN */
        out[i] = (uint16_t)(r >> 16);
    }
    return 0;
}
