/* The K-quants (Q4_K, Q5_K, Q6_K: 256-value super-blocks cut into sub-blocks of 32 or 16 values, each
 * with a small integer scale) against activations quantized per 256 values, as llama.cpp's q8_K does,
 * with one refinement: each 32 values' scale is the block's float scale d times a small integer s
 * (1..KQ_MULTIPLES), the smallest that holds their largest value. With one float scale across the
 * super-block, its sub-blocks add up in integers (the weights' integer scales times the activations'
 * s), and one float step per 256 values and row remains. Against qdot.c's 32-value activation blocks
 * (a float step per sub-block) that was 2.5-3x the speed here (docs/quant-kernels.md); against one
 * plain scale per 256 (q8_K), a group 8x smaller than the block's largest keeps 8x the resolution:
 * SmolLM2's MLP activations have outliers, and q8_K's perplexity cost there was twice this one's.
 *
 * A super-block's integer sums are exact, and every kernel takes the same float step per super-block and
 * row after them (kstep, unfused), so the portable loops, AVX2 and AVX-512 VNNI, rows as stored or packed by
 * 8 (kpack.inc), all give the same bits. Each row is one fixed sequence of steps whatever the other tokens
 * of the call (batch invariance, batch.py).
 */
#include "qdot.h"

/* ---- activations to 256-value blocks ------------------------------------------------------------- */

/* Group j's multiple of d: the smallest that keeps its largest magnitude within 127 steps. */
static inline int group_multiple(float amax_j, float d) {
    if (d == 0) return 1;
    float s = ceilf(amax_j / (d * 127));
    return s < 1 ? 1 : s > KQ_MULTIPLES ? KQ_MULTIPLES : (int)s;
}

static inline int clamp127(int q) { return q > 127 ? 127 : q < -127 ? -127 : q; }

void kq_quantize_scalar(const float *x, kxblock *out, int nb) {
    for (int b = 0; b < nb; b++, x += 256) {
        float gmax[8], amax = 0;
        for (int j = 0; j < 8; j++) {
            gmax[j] = 0;
            for (int i = 0; i < 32; i++) gmax[j] = fmaxf(gmax[j], fabsf(x[32 * j + i]));
            amax = fmaxf(amax, gmax[j]);
        }
        float d = amax / (127 * KQ_MULTIPLES);
        for (int j = 0; j < 8; j++) {
            int s = group_multiple(gmax[j], d), sum[2] = {0, 0};
            float id = d ? 1 / (d * (float)s) : 0;
            for (int i = 0; i < 32; i++) {
                int q = clamp127((int)nearbyintf(x[32 * j + i] * id));    /* half to even */
                out[b].q[32 * j + i] = (int8_t)q;
                sum[i / 16] += q;
            }
            out[b].s[j] = (int8_t)s;
            out[b].bsums[2 * j] = (int16_t)(s * sum[0]);
            out[b].bsums[2 * j + 1] = (int16_t)(s * sum[1]);
        }
        out[b].d = d;
        kq_pairs(&out[b]);
    }
}

/* ---- a super-block's integer sums, portable --------------------------------------------------------
 * S: the weights' integers times the activations', each sub-block's times its scale; M: each sub-block's
 * min times the activations' sum there (Q4_K, Q5_K). Q6_K's values are stored plus 32: S takes 32 times
 * each sub-block's activation sum times its scale off. */

static void sums_scalar(int qt, const uint8_t *b, const kxblock *y, int32_t *S, int32_t *M) {
    int32_t s = 0, m = 0;
    if (qt == Q6_K) {
        for (int j = 0; j < 16; j++) {               /* 16 values at 128h + 32sub + 16half */
            int h = j / 8, sub = (j % 8) / 2, half = j % 2, dot = 0;
            const uint8_t *ql = b + 64 * h + 32 * (sub & 1), *qh = b + 128 + 32 * h;
            for (int i = 16 * half; i < 16 * half + 16; i++) {
                int v = ((ql[i] >> (4 * (sub >> 1))) & 15) | (((qh[i] >> (2 * sub)) & 3) << 4);
                dot += v * y->q[128 * h + 32 * sub + i];
            }
            s += (int8_t)b[192 + j] * (y->s[j / 2] * dot - 32 * y->bsums[j]);
        }
    } else {
        for (int j = 0; j < 8; j++) {                /* 32 values at 32j */
            int sc, mn, dot = 0;
            qdot_scale_min_k4(j, b + 4, &sc, &mn);
            const uint8_t *qs = b + (qt == Q5_K ? 48 : 16) + 32 * (j / 2);
            for (int i = 0; i < 32; i++) {
                int v = j & 1 ? qs[i] >> 4 : qs[i] & 15;
                if (qt == Q5_K) v |= ((b[16 + i] >> j) & 1) << 4;
                dot += v * y->q[32 * j + i];
            }
            s += sc * y->s[j] * dot;
            m += mn * (y->bsums[2 * j] + y->bsums[2 * j + 1]);
        }
    }
    *S = s;
    *M = m;
}

/* The float step of one super-block: d and dmin its scales (Q6_K: dmin 0, M 0); xd the activations'. */
static inline float kstep(float acc, float d, float dmin, float xd, int32_t S, int32_t M) {
    return acc + d * xd * (float)S - dmin * xd * (float)M;
}

#define D_AT(qt) ((qt) == Q6_K ? 208 : 0)            /* a super-block's fp16 scale; Q4_K/Q5_K's min follows it */

#define KQ_BYTES(qt) ((qt) == Q4_K ? 144 : (qt) == Q5_K ? 176 : 210)

/* out[r * stride + t] = row r . token t, for nr rows rb bytes apart and nt tokens; or, if packed, for the 8
 * rows of the packed group at w (qdot.h's packed_at). */
void kq_dot_scalar(int qt, const uint8_t *w, size_t rb, int nr, int packed, const kxblock *const *x, int nt, int cols,
                   float *out, int stride) {
    const int bb = KQ_BYTES(qt);
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++) {
            float acc = 0;
            for (int k = 0; k < cols / 256; k++) {
                const uint8_t *b = packed ? w + (size_t)k * 8 * bb : w + r * rb + (size_t)k * bb;
                uint8_t block[210];
                if (packed) {
                    for (int i = 0; i < bb; i++) block[i] = b[packed_at(bb, r, i)];
                    b = block;
                }
                int32_t S, M;
                sums_scalar(qt, b, &x[t][k], &S, &M);
                float dmin = qt == Q6_K ? 0 : half_bits_to_float(qdot_half_at(b + 2));
                acc = kstep(acc, half_bits_to_float(qdot_half_at(b + D_AT(qt))), dmin, x[t][k].d, S, M);
            }
            out[r * stride + t] = acc;
        }
}

#ifdef QDOT_X86
/* ---- AVX2 ---------------------------------------------------------------------------------------- */

AVX2 static inline __m256i quantize8(const float *x, __m256 id) {     /* round half to even, within +-127 */
    __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), id));
    return _mm256_max_epi32(_mm256_min_epi32(q, _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
}

AVX2 void kq_quantize_avx2(const float *x, kxblock *out, int nb) {
    for (int b = 0; b < nb; b++, x += 256) {
        float gmax[8], amax = 0;
        for (int j = 0; j < 8; j++) {
            gmax[j] = qdot_amax32(x + 32 * j);
            amax = fmaxf(amax, gmax[j]);
        }
        float d = amax / (127 * KQ_MULTIPLES);
        for (int i = 0; i < 256; i += 32) {
            int sj = group_multiple(gmax[i / 32], d);
            __m256 s = _mm256_set1_ps(d ? 1 / (d * (float)sj) : 0);
            __m256i i0 = quantize8(x + i, s), i1 = quantize8(x + i + 8, s);
            __m256i i2 = quantize8(x + i + 16, s), i3 = quantize8(x + i + 24, s);
            out[b].s[i / 32] = (int8_t)sj;
            out[b].bsums[i / 16] = (int16_t)(sj * qdot_hsum_epi32(_mm256_add_epi32(i0, i1)));
            out[b].bsums[i / 16 + 1] = (int16_t)(sj * qdot_hsum_epi32(_mm256_add_epi32(i2, i3)));
            qdot_store_int8x32(out[b].q + i, i0, i1, i2, i3);
        }
        out[b].d = d;
        kq_pairs(&out[b]);
    }
}

#define YQ(t, at) _mm256_loadu_si256((const __m256i *)(y[t]->q + (at)))

/* Q4_K/Q5_K's 8 scales and 8 mins as bytes, from their 12 packed bytes (qdot_scale_min_k4, 4 at a time). */
static inline void scales_mins_k4(const uint8_t *s, uint64_t *sc, uint64_t *mn) {
    uint32_t a, b, c;
    memcpy(&a, s, 4);
    memcpy(&b, s + 4, 4);
    memcpy(&c, s + 8, 4);
    *sc = (a & 0x3f3f3f3fu) | (uint64_t)((c & 0x0f0f0f0fu) | ((a >> 6) & 0x03030303u) << 4) << 32;
    *mn = (b & 0x3f3f3f3fu) | (uint64_t)(((c >> 4) & 0x0f0f0f0fu) | ((b >> 6) & 0x03030303u) << 4) << 32;
}

/* 16 int16 lanes each holding byte i of v (i < 8), or byte i and byte i + 1 in the two halves (pairs) */
/* v's int16 lanes i and j (of its 128-bit half, the same in both halves) in every lane of the low
 * and the high half */
AVX2 static inline __m256i spread16(__m256i v, int i, int j) {
    char a = (char)(2 * i), b = (char)(2 * i + 1), c = (char)(2 * j), d = (char)(2 * j + 1);
    return _mm256_shuffle_epi8(v, _mm256_setr_epi8(a, b, a, b, a, b, a, b, a, b, a, b, a, b, a, b,
                                                   c, d, c, d, c, d, c, d, c, d, c, d, c, d, c, d));
}

AVX2 static inline __m128i multiples(const kxblock *y) {         /* its 8 group multiples as int16 */
    return _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)y->s));
}

/* Q4_K and Q5_K: S and M of one super-block b against nt tokens' blocks y[t], each as 8 partial sums. */
AVX2 static inline __attribute__((always_inline)) void sums_q45k(int qt, const uint8_t *b, const kxblock *const *y,
                                                                 const int nt, __m256i *S, __m256i *M) {
    uint64_t sc8, mn8;
    scales_mins_k4(b + 4, &sc8, &mn8);
    __m128i sc = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)sc8));
    /* M: each min twice, against the two 16-value sums of its sub-block */
    __m256i mins = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(_mm_cvtsi64_si128((long long)mn8),
                                                         _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7)));
    __m256i scs[TILE_K];                             /* each sub-block's scale times the token's multiple */
    for (int t = 0; t < nt; t++) {
        S[t] = _mm256_setzero_si256();
        M[t] = _mm256_madd_epi16(mins, _mm256_loadu_si256((const __m256i *)y[t]->bsums));
        scs[t] = _mm256_broadcastsi128_si256(_mm_mullo_epi16(sc, multiples(y[t])));   /* up to 63 * 8 */
    }
    const __m256i low = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    const uint8_t *qs = b + (qt == Q5_K ? 48 : 16);
    __m256i qh = qt == Q5_K ? _mm256_loadu_si256((const __m256i *)(b + 16)) : _mm256_setzero_si256();
    for (int g = 0; g < 4; g++) {                    /* 64 values: sub-blocks 2g (low nibbles) and 2g + 1 */
        __m256i bytes = _mm256_loadu_si256((const __m256i *)(qs + 32 * g));
        __m256i lo = _mm256_and_si256(bytes, low), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
        if (qt == Q5_K) {
            lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * g), one), 4));
            hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * g + 1), one), 4));
        }
        for (int t = 0; t < nt; t++) {               /* pairs of products fit int16 (2 * 31 * 127) */
            __m256i a = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, YQ(t, 64 * g)), spread16(scs[t], 2 * g, 2 * g));
            __m256i c = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, YQ(t, 64 * g + 32)),
                                          spread16(scs[t], 2 * g + 1, 2 * g + 1));
            S[t] = _mm256_add_epi32(S[t], _mm256_add_epi32(a, c));
        }
    }
}

AVX2 static inline __attribute__((always_inline)) void sums_q6k(const uint8_t *b, const kxblock *const *y,
                                                                const int nt, __m256i *S) {
    __m256i scales = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192)));
    __m256i acc[TILE_K], off[TILE_K], scs[2][TILE_K];
    for (int t = 0; t < nt; t++) {                   /* the +32 of every value: 32 * sum of scale * 16-sum */
        off[t] = _mm256_slli_epi32(_mm256_madd_epi16(scales, _mm256_loadu_si256((const __m256i *)y[t]->bsums)), 5);
        acc[t] = _mm256_setzero_si256();
        /* each 16-value sub-block's scale times its group's multiple (up to 128 * 8), one half per h */
        __m256i m = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(_mm_loadl_epi64((const __m128i *)y[t]->s),
                                                          _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7)));
        __m256i prod = _mm256_mullo_epi16(scales, m);
        scs[0][t] = _mm256_permute2x128_si256(prod, prod, 0x00);
        scs[1][t] = _mm256_permute2x128_si256(prod, prod, 0x11);
    }
    const __m256i low = _mm256_set1_epi8(15), two = _mm256_set1_epi8(3);
    for (int h = 0; h < 2; h++) {                    /* 128 values: 4 x 32, sub-blocks of 16 */
        __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
        __m256i ql0 = _mm256_loadu_si256((const __m256i *)(b + 64 * h));
        __m256i ql1 = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32));
        __m256i v[4] = {
            _mm256_or_si256(_mm256_and_si256(ql0, low), _mm256_slli_epi16(_mm256_and_si256(qh, two), 4)),
            _mm256_or_si256(_mm256_and_si256(ql1, low),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), two), 4)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), two), 4)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), two), 4)),
        };
        for (int s = 0; s < 4; s++)                  /* sub-blocks 8h + 2s and 8h + 2s + 1 */
            for (int t = 0; t < nt; t++)             /* pairs of products fit int16 (2 * 63 * 127) */
                acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(_mm256_maddubs_epi16(v[s], YQ(t, 128 * h + 32 * s)),
                                                                    spread16(scs[h][t], 2 * s, 2 * s + 1)));
    }
    for (int t = 0; t < nt; t++) S[t] = _mm256_sub_epi32(acc[t], off[t]);
}
#undef YQ

AVX2 static inline __attribute__((always_inline)) void dot_n(int qt, const uint8_t *w, size_t rb, int nr,
                                                             const kxblock *const *x, const int nt, int cols,
                                                             float *out, int stride) {
    for (int r = 0; r < nr; r++, w += rb) {
        float acc[TILE_K];
        for (int t = 0; t < nt; t++) acc[t] = 0;
        for (int k = 0; k < cols / 256; k++) {
            const uint8_t *b = w + (size_t)k * KQ_BYTES(qt);
            const kxblock *y[TILE_K];
            __m256i S[TILE_K], M[TILE_K];
            for (int t = 0; t < nt; t++) y[t] = &x[t][k];
            if (qt == Q6_K)
                sums_q6k(b, y, nt, S);
            else
                sums_q45k(qt, b, y, nt, S, M);
            float d = _cvtsh_ss(qdot_half_at(b + D_AT(qt))), dmin = qt == Q6_K ? 0 : _cvtsh_ss(qdot_half_at(b + 2));
            for (int t = 0; t < nt; t++)
                acc[t] = kstep(acc[t], d, dmin, y[t]->d, qdot_hsum_epi32(S[t]), qt == Q6_K ? 0 : qdot_hsum_epi32(M[t]));
        }
        for (int t = 0; t < nt; t++) out[r * stride + t] = acc[t];
    }
}

AVX2 void kq_dot_avx2(int qt, const uint8_t *w, size_t rb, int nr, const kxblock *const *x, int nt, int cols,
                      float *out, int stride) {
    switch (nt) {                                    /* the token count a constant: accumulators in registers */
    case 1: dot_n(qt, w, rb, nr, x, 1, cols, out, stride); break;
    case 2: dot_n(qt, w, rb, nr, x, 2, cols, out, stride); break;
    case 3: dot_n(qt, w, rb, nr, x, 3, cols, out, stride); break;
    default: dot_n(qt, w, rb, nr, x, 4, cols, out, stride); break;
    }
}

/* The packed layout's kernel (kpack.inc) with AVX2's integer dot products, */
#define KP_TARGET AVX2
#define KP_SUFFIX avx2
#define KP_VNNI 0
#define KP_TILE KP_TILE_AVX2
#include "kpack.inc"
#undef KP_TARGET
#undef KP_SUFFIX
#undef KP_VNNI
#undef KP_TILE

/* and with AVX-512 VNNI's on 256-bit vectors. */
#define KP_TARGET AVX512_VNNI
#define KP_SUFFIX vnni
#define KP_VNNI 1
#define KP_TILE KP_TILE_VNNI
#include "kpack.inc"
#endif
