/* What the three files of tpi_mpi._qdot share: qdot.c's matrix products, rowops.c's row steps, and
 * layer.c's decode half-layers built from both. */
#ifndef TPI_QDOT_H
#define TPI_QDOT_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QDOT_X86 1
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512vl")))          /* 32 registers, 16-lane floats */
#define AVX512_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))   /* 256-bit vpdpbusd */
#endif

#define MAX_MATS 4              /* matrices one call multiplies by the same x (q, k, v; gate, up) */
#define QDOT_MAX_TOKENS 256     /* rows of x one call takes */

enum { Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q5_0, Q5_1, F16, BF16, N_TYPES };    /* quant_int8.TYPE_IDS */

/* The K-quants (256-value blocks, kquants.c); the 16-bit floats (floats.c, counted in 32-value blocks of
 * 64 bytes); the others are 32-value blocks (qdot.c). */
static inline int qdot_is_kquant(int qt) { return qt == Q4_K || qt == Q5_K || qt == Q6_K; }
static inline int qdot_is_float(int qt) { return qt == F16 || qt == BF16; }

/* An IEEE half's bits as a float, exactly (the blocks' scales; a half-precision KV cache without _Float16). */
static inline float half_bits_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023, bits;
    if (e == 31) {
        bits = sign | 0x7F800000u | (m << 13);
    } else if (e == 0) {
        float v = ldexpf((float)m, -24);                   /* subnormal or zero: exact */
        return sign ? -v : v;
    } else {
        bits = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* A bfloat16's bits as a float, exactly (bf16 weights; a bf16 KV cache). */
static inline float bf16_bits_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* The little-endian fp16 at p, as bits (a block's scale or min). */
static inline uint16_t qdot_half_at(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

/* Q4_K/Q5_K: sub-block j's 6-bit scale and min from the 12 packed bytes (ggml's get_scale_min_k4). */
static inline void qdot_scale_min_k4(int j, const uint8_t *s, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* ---- the 8-row layout ------------------------------------------------------------------------------
 * quant_int8.pack_rows stores each group of 8 rows of a block type block column by block column (the last
 * rows % 8 rows stay row after row). A block's bytes fall in three parts: its leading 2-byte fields (the fp16
 * scale; the min of Q4_1, Q5_1, Q4_K, Q5_K), then 4-byte chunks (everything else: quants, Q5_0/Q5_1's fifth
 * bits, the K-quants' sub-block scales), then trailing 2-byte fields (Q6_K's fp16 scale). Within a column each
 * part holds the 8 rows' units side by side, unit by unit: row 0's scale, row 1's, ..., row 7's; row 0's
 * chunk 0, ..., row 7's chunk 0, row 0's chunk 1, and so on. One vector load then holds the same 4 bytes of
 * every row, so lane r of an integer dot product is row r's with no horizontal adds, and the 8 scales are one
 * load (llama.cpp's repack.cpp does the like with 8 bytes). The sizes stay the same, so the regrouping is done
 * in place. bb: a block's bytes, which tell the type. */
static inline int packed_lead(int bb) { return bb == 210 ? 0 : bb == 20 || bb == 24 || bb == 144 || bb == 176 ? 4 : 2; }
static inline int packed_tail(int bb) { return bb == 210 ? 2 : 0; }

static inline size_t packed_at(int bb, int r, int i) {        /* row r's byte i of its block, in its column */
    int lead = packed_lead(bb), tail = bb - packed_tail(bb);
    if (i < lead) return (size_t)(16 * (i / 2) + 2 * r + i % 2);
    if (i >= tail) return (size_t)(8 * tail + 16 * ((i - tail) / 2) + 2 * r + i % 2);
    i -= lead;
    return (size_t)(8 * lead + 32 * (i / 4) + 4 * r + i % 4);
}

/* The 4 bytes at p as one int32 (an activation block's 4 values, to broadcast). */
static inline int32_t qdot_load4(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#ifdef QDOT_X86
AVX2 static inline float qdot_hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 16-bit floats at p (bf16 if bf, else fp16) widened to float32, exactly. */
AVX2 static inline __m256 qdot_widen8(int bf, const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return bf ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

/* The largest magnitude of the 32 floats at x. */
AVX2 static inline float qdot_amax32(const float *x) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x)),
                                           _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 8))),
                             _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + 16)),
                                           _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 24))));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    return _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
}

/* 32 int32 values within int8's range, i0 first, stored as int8 at out in order. */
AVX2 static inline void qdot_store_int8x32(int8_t *out, __m256i i0, __m256i i1, __m256i i2, __m256i i3) {
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));   /* undo lane interleave */
    _mm256_storeu_si256((__m256i *)out, p);
}

AVX2 static inline int qdot_hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}
#endif

/* ---- qdot.c ---- */
int qdot_cpu_has_avx2(void);    /* AVX2, FMA and F16C: the kernels' x86 code (asked once) */
typedef struct {
    int qt, rows, interleaved;  /* the GGML type (quant_int8.TYPE_IDS), rows, rows regrouped by 8 */
    const uint8_t *w;
    float *y;                   /* (tokens, rows) */
} qmat_t;

/* A (qtype, w_ptr, rows, y_ptr[, interleaved]) tuple into m, checked against `cols`; -1 with a Python error set. */
int qdot_parse_mat(PyObject *item, int cols, qmat_t *m);
/* Each matrix's y = x @ W^T, x (nt, cols) float32 quantized once; -1 when out of memory. Call without the GIL. */
int qdot_matmul(const qmat_t *mats, int n, int cols, const float *x, int nt, int threads);

/* ---- pool.c ---- */
#define QDOT_MAX_THREADS 64
/* fn(ctx, task) for tasks 0..ntasks - 1 on up to `threads` threads (the caller's among them), in any
 * order; one job at a time. */
void qdot_parallel(void (*fn)(void *ctx, int task), void *ctx, int ntasks, int threads);

/* ---- kquants.c ---- */
#define TILE_K 4                /* tokens a K-quant dot product takes at once */

#define KQ_MULTIPLES 8          /* a 32-value group's scale is d times 1..KQ_MULTIPLES */

typedef struct {                /* 256 activations: value i = d * s[i / 32] * q[i] */
    float d;
    int16_t bsums[16];          /* of every 16 values, s * sum of q */
    int8_t s[8];
    int8_t q[256];
    /* the same, as the packed kernels broadcast them (kq_pairs): */
    int32_t s32[8];             /* s widened */
    int32_t msums[4];           /* 32-value sums of groups 0 and 2, 1 and 3, 4 and 6, 5 and 7, as int16 pairs */
    int32_t bpairs[8];          /* bsums 4i and 4i + 2, then 4i + 1 and 4i + 3, as int16 pairs */
} kxblock;

/* Two int16 values in one int32's low and high halves, as madd_epi16 pairs them. */
static inline int32_t qdot_pair16(int a, int b) { return (int32_t)((uint16_t)a | (uint32_t)(uint16_t)b << 16); }

static inline void kq_pairs(kxblock *b) {
    int sums[8];                /* each up to 2 * 8 * 16 * 127: an int16 */
    for (int j = 0; j < 8; j++) {
        b->s32[j] = b->s[j];
        sums[j] = b->bsums[2 * j] + b->bsums[2 * j + 1];
    }
    for (int i = 0; i < 4; i++) {
        int j = 4 * (i / 2) + i % 2;
        b->msums[i] = qdot_pair16(sums[j], sums[j + 2]);
        b->bpairs[2 * i] = qdot_pair16(b->bsums[4 * i], b->bsums[4 * i + 2]);
        b->bpairs[2 * i + 1] = qdot_pair16(b->bsums[4 * i + 1], b->bsums[4 * i + 3]);
    }
}

void kq_quantize_scalar(const float *x, kxblock *out, int nb);
/* out[r * stride + t] = row r . token t: nr rows of K-quant type qt, rb bytes apart, and nt <= TILE_K tokens;
 * or, if packed, the 8 rows of the packed group at w */
void kq_dot_scalar(int qt, const uint8_t *w, size_t rb, int nr, int packed, const kxblock *const *x, int nt, int cols,
                   float *out, int stride);
#ifdef QDOT_X86
void kq_quantize_avx2(const float *x, kxblock *out, int nb);
void kq_dot_avx2(int qt, const uint8_t *w, size_t rb, int nr, const kxblock *const *x, int nt, int cols, float *out,
                 int stride);
/* out[r * tile + t]: the 8 rows of the packed group at w, and nt <= tile tokens (kpack.inc), tile KP_TILE_AVX2 or
 * KP_TILE_VNNI */
#define KP_TILE_AVX2 4
#define KP_TILE_VNNI 8
void kq_dot_packed_avx2(int qt, const uint8_t *w, const kxblock *const *x, int nt, int cols, float *out);
void kq_dot_packed_vnni(int qt, const uint8_t *w, const kxblock *const *x, int nt, int cols, float *out);
#endif

/* ---- floats.c ---- */
#define FLOAT_ROWS 4            /* rows a call of floats.c takes (a prompt widens them once) */
/* y[t * ldy + r] = row r . token t: nr <= FLOAT_ROWS rows of F16 or BF16, rb bytes apart, and all nt tokens
 * (use_avx512: AVX-512F and VL may be used too) */
void qdot_float_rows(int qt, const uint8_t *w, size_t rb, int nr, const float *const *x, int nt, int cols, float *y,
                     size_t ldy, int use_avx2, int use_avx512);

/* ---- rowops.c ---- */
enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2 };   /* rowops.py's KV_CODES */

typedef struct {
    char *keys, *values;        /* a layer's (kv heads, pool positions, hd) stores */
    int64_t head_stride;        /* values between two kv heads' rows */
    int code;                   /* KV_F32 / KV_F16 / KV_BF16 */
} kvstore_t;

typedef struct {                /* where one sequence's positions lie in the pool (kv.Place) */
    int64_t start;              /* pool position of position 0, when its blocks are one run */
    const int64_t *index;       /* else each position's pool position; NULL for one run */
} place_t;

void rows_rmsnorm(const float *x, const float *w, float *y, int64_t rows, int64_t cols, float eps);
void rows_rope(float *x, const float *cos, const float *sin, int64_t rows, int64_t heads, int64_t hd);
void rows_silu_mul(const float *gate, const float *up, float *out, int64_t n);
int rows_attend(const float *q, const float *k, const float *v, float *out, int64_t heads, int64_t kv_heads,
                int64_t hd, const int64_t *kv_index, const kvstore_t *s, place_t place, int64_t pos, int threads);
int rows_check_attend(int64_t heads, int64_t hd);   /* 0, or -1 with a Python error set */

PyObject *py_rmsnorm(PyObject *self, PyObject *args);
PyObject *py_rope(PyObject *self, PyObject *args);
PyObject *py_silu_mul(PyObject *self, PyObject *args);
PyObject *py_attend(PyObject *self, PyObject *args);

/* ---- layer.c ---- */
PyObject *py_attention_rows(PyObject *self, PyObject *args);
PyObject *py_mlp_rows(PyObject *self, PyObject *args);

#endif
