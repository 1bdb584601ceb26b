/* A decode layer's small float steps: RMSNorm, RoPE, SiLU-and-multiply, and a one-row attention that
 * reads the KV pool where it lies (part of tpi_mpi._qdot; layer.c strings them with qdot.c's products).
 *
 * Under the int8 kernels a SmolLM2 token spent about 20 of its 28 ms outside the matrix products:
 * ~70 torch ops a layer of 5-10 us each, on rows of 576 values. These replace ~40 of them a layer
 * (rowops.py chooses them; the exact path keeps torch's ops, whose bits the parity tests read).
 *
 * Each row is computed alone, whatever the other rows of the call hold (batch invariance, batch.py):
 * a row's sums run in a fixed order, 8 lanes side by side, then the lanes added in a fixed order.
 * Plain C loops written so that GCC vectorizes them; on x86-64 Linux the norm, RoPE and SiLU are also
 * built for x86-64-v3 (AVX2, FMA, F16C) and the loader picks the build the CPU runs (target_clones);
 * the attention's inner loops are written with AVX2 intrinsics, chosen at run time (kernels_for).
 * Pointers come as integers (torch's data_ptr()); rowops.py checks dtypes, shapes and contiguity.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "qdot.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

#define LANES 8
#define MAX_HEAD_DIM 512
#define MAX_HEADS 1024

/* ---- 16-bit floats (round to nearest even, as torch's .to() does) ------------------------------ */

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);    /* NaN stays NaN */
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

#ifdef __FLT16_MAX__
typedef _Float16 half_t;
static inline float half_to_float(half_t h) { return (float)h; }
static inline half_t float_to_half(float f) { return (half_t)f; }
#else                                   /* no _Float16 (older compilers): IEEE half by hand */
typedef uint16_t half_t;
static inline float half_to_float(half_t h) { return half_bits_to_float(h); }
static inline half_t float_to_half(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffff;
    if (a > 0x7f800000) return sign | 0x7e00;                 /* NaN */
    if (a >= 0x477ff000) return sign | 0x7c00;                /* rounds to beyond 65504: inf */
    if (a < 0x38800000) {                                     /* a half subnormal (or zero): round at 2^-24 */
        float v = nearbyintf(fabsf(f) * 16777216.0f);         /* the current mode: to nearest even */
        return sign | (uint16_t)v;
    }
    uint32_t r = a + 0xfff + ((a >> 13) & 1);                 /* round to nearest even at 13 bits */
    return sign | (uint16_t)((r >> 13) - (112 << 10));
}
#endif

/* a . b in a fixed order: 8 lanes side by side, then the lanes added in order, then the tail */
static inline float dot_lanes(const float *a, const float *b, int64_t n) {
    float lane[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) lane[l] += a[i + l] * b[i + l];
    float sum = 0;
    for (int l = 0; l < LANES; l++) sum += lane[l];
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* ---- RMSNorm ----------------------------------------------------------------------------------- */

/* y = w * (x / sqrt(mean(x^2) + eps)), row by row; x and y (rows, cols) float32 (y may be x). */
CLONES void rows_rmsnorm(const float *x, const float *w, float *y, int64_t rows, int64_t cols, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        float *yr = y + r * cols;
        float inv = 1.0f / sqrtf(dot_lanes(xr, xr, cols) / (float)cols + eps);
        for (int64_t c = 0; c < cols; c++) yr[c] = w[c] * (xr[c] * inv);
    }
}

/* ---- RoPE -------------------------------------------------------------------------------------- */

/* x (rows, heads, hd) rotated in place, each row by its cos/sin (rows, hd): the two halves of each head
 * (the Hugging Face layout), x' = x * cos + rotate_half(x) * sin. */
CLONES void rows_rope(float *x, const float *cos, const float *sin, int64_t rows, int64_t heads, int64_t hd) {
    int64_t half = hd / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * hd, *s = sin + r * hd;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + (r * heads + h) * hd;
            float lo[MAX_HEAD_DIM / 2];
            memcpy(lo, v, half * sizeof(float));
            for (int64_t i = 0; i < half; i++) v[i] = v[i] * c[i] - v[half + i] * s[i];
            for (int64_t i = 0; i < half; i++) v[half + i] = v[half + i] * c[half + i] + lo[i] * s[half + i];
        }
    }
}

/* ---- SiLU and multiply (the MLP's gate) --------------------------------------------------------- */

CLONES void rows_silu_mul(const float *gate, const float *up, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* ---- one-row attention over the KV pool --------------------------------------------------------- */

static inline int64_t pool_position(place_t p, int64_t pos) { return p.index ? p.index[pos] : p.start + pos; }

/* a stored row (hd values at element offset `at`) widened into out */
static void load_row(const kvstore_t *s, const char *base, int64_t at, int64_t hd, float *out) {
    if (s->code == KV_F32) {
        memcpy(out, (const float *)base + at, hd * sizeof(float));
    } else if (s->code == KV_F16) {
        const half_t *h = (const half_t *)base + at;
        for (int64_t d = 0; d < hd; d++) out[d] = half_to_float(h[d]);
    } else {
        const uint16_t *h = (const uint16_t *)base + at;
        for (int64_t d = 0; d < hd; d++) out[d] = bf16_bits_to_float(h[d]);
    }
}

static inline void store_row(const kvstore_t *s, char *base, int64_t at, int64_t hd, const float *in) {
    if (s->code == KV_F32) {
        memcpy((float *)base + at, in, hd * sizeof(float));
    } else if (s->code == KV_F16) {
        half_t *h = (half_t *)base + at;
        for (int64_t d = 0; d < hd; d++) h[d] = float_to_half(in[d]);
    } else {
        uint16_t *h = (uint16_t *)base + at;
        for (int64_t d = 0; d < hd; d++) h[d] = float_to_bf16(in[d]);
    }
}

static void axpy(float p, const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += p * x[i];
}

/* The attention's inner loops: portable C, or AVX2 + FMA + F16C where the CPU has them and head_dim
 * is a multiple of 8 (GCC left the portable loops mostly scalar: 1.1 ms for 32 heads over 256
 * positions, torch's attention 0.66). One choice per process, so a row's bits never depend on the call. */
typedef struct {
    void (*widen)(const kvstore_t *s, const char *base, int64_t at, int64_t hd, float *out);
    float (*dot)(const float *a, const float *b, int64_t n);
    void (*axpy)(float p, const float *x, float *y, int64_t n);
} row_kernels;

#ifdef QDOT_X86

AVX2 static void widen_avx2(const kvstore_t *s, const char *base, int64_t at, int64_t hd, float *out) {
    if (s->code == KV_F32) {
        memcpy(out, (const float *)base + at, hd * sizeof(float));
        return;
    }
    const uint16_t *h = (const uint16_t *)base + at;
    for (int64_t d = 0; d < hd; d += 8) _mm256_storeu_ps(out + d, qdot_widen8(s->code == KV_BF16, h + d));
}

AVX2 static float dot_avx2(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return qdot_hsum_ps(acc);
}

AVX2 static void axpy_avx2(float p, const float *x, float *y, int64_t n) {
    __m256 pp = _mm256_set1_ps(p);
    for (int64_t i = 0; i < n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pp, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
}
#endif

static row_kernels kernels_for(int64_t hd) {
#ifdef QDOT_X86
    if (hd % 8 == 0 && qdot_cpu_has_avx2()) return (row_kernels){widen_avx2, dot_avx2, axpy_avx2};
#endif
    return (row_kernels){load_row, dot_lanes, axpy};
}

typedef struct {                    /* one query row's attention, shared by its kv heads' tasks */
    const float *q;
    float *out, *scores;                /* scores: L per query head */
    int64_t heads, hd, L;
    const int64_t *kv_index;
    const kvstore_t *s;
    place_t place;
    row_kernels kn;
} attend_t;

/* The query heads reading kv head g attend over positions 0..L-1: each stored row is widened once for
 * all of them. */
static void attend_kv_head(void *ctx, int g) {
    const attend_t *a = ctx;
    const kvstore_t *s = a->s;
    int64_t mine[MAX_HEADS], n = 0, L = a->L, hd = a->hd;
    for (int64_t h = 0; h < a->heads; h++)
        if (a->kv_index[h] == g) mine[n++] = h;
    float scale = 1.0f / sqrtf((float)hd), row[MAX_HEAD_DIM];
    for (int64_t j = 0; j < L; j++) {
        a->kn.widen(s, s->keys, g * s->head_stride + pool_position(a->place, j) * hd, hd, row);
        for (int64_t i = 0; i < n; i++) a->scores[mine[i] * L + j] = a->kn.dot(a->q + mine[i] * hd, row, hd) * scale;
    }
    for (int64_t i = 0; i < n; i++) {               /* softmax, in place */
        float *sc = a->scores + mine[i] * L, top = sc[0], total = 0;
        for (int64_t j = 1; j < L; j++) top = sc[j] > top ? sc[j] : top;
        for (int64_t j = 0; j < L; j++) total += (sc[j] = expf(sc[j] - top));
        for (int64_t j = 0; j < L; j++) sc[j] /= total;
        memset(a->out + mine[i] * hd, 0, hd * sizeof(float));
    }
    for (int64_t j = 0; j < L; j++) {
        a->kn.widen(s, s->values, g * s->head_stride + pool_position(a->place, j) * hd, hd, row);
        for (int64_t i = 0; i < n; i++) a->kn.axpy(a->scores[mine[i] * L + j], row, a->out + mine[i] * hd, hd);
    }
}

/* Multiply-adds below which one row's attention stays on the calling thread: waking the kernels'
 * threads costs a few microseconds, SmolLM2's 9 heads over 150 positions take 35. */
#define PARALLEL_ATTEND (1 << 18)

/* One query row at position `pos`: its k and v (kv heads, hd) are written to the pool first, then
 * each query head attends over positions 0..pos of its kv head (kv_index[h]) with softmax(q.k / sqrt(hd)).
 * q and out (heads, hd) float32. The kv heads are tasks for `threads` threads at long contexts; a
 * head's steps are the same on any thread. -1 when out of memory. */
int rows_attend(const float *q, const float *k, const float *v, float *out, int64_t heads, int64_t kv_heads,
                int64_t hd, const int64_t *kv_index, const kvstore_t *s, place_t place, int64_t pos, int threads) {
    for (int64_t g = 0; g < kv_heads; g++) {
        int64_t at = g * s->head_stride + pool_position(place, pos) * hd;
        store_row(s, s->keys, at, hd, k + g * hd);
        store_row(s, s->values, at, hd, v + g * hd);
    }
    attend_t a = {q, out, malloc(sizeof(float) * heads * (pos + 1)), heads, hd, pos + 1, kv_index, s, place,
                  kernels_for(hd)};
    if (!a.scores) return -1;
    if (threads > 1 && kv_heads > 1 && a.L * heads * hd >= PARALLEL_ATTEND)
        qdot_parallel(attend_kv_head, &a, (int)kv_heads, threads);
    else
        for (int64_t g = 0; g < kv_heads; g++) attend_kv_head(&a, (int)g);
    free(a.scores);
    return 0;
}

int rows_check_attend(int64_t heads, int64_t hd) {
    if (hd <= MAX_HEAD_DIM && hd % 2 == 0 && heads <= MAX_HEADS) return 0;
    PyErr_Format(PyExc_ValueError, "qdot: %lld heads of %lld values (at most %d heads of an even %d)", (long long)heads,
                 (long long)hd, MAX_HEADS, MAX_HEAD_DIM);
    return -1;
}

/* ---- Python ------------------------------------------------------------------------------------ */

PyObject *py_rmsnorm(PyObject *self, PyObject *args) {
    unsigned long long x, w, y;
    long long rows, cols;
    float eps;
    if (!PyArg_ParseTuple(args, "KKKLLf", &x, &w, &y, &rows, &cols, &eps)) return NULL;
    rows_rmsnorm((const float *)x, (const float *)w, (float *)y, rows, cols, eps);
    Py_RETURN_NONE;
}

PyObject *py_rope(PyObject *self, PyObject *args) {
    unsigned long long x, c, s;
    long long rows, heads, hd;
    if (!PyArg_ParseTuple(args, "KKKLLL", &x, &c, &s, &rows, &heads, &hd)) return NULL;
    if (rows_check_attend(heads, hd)) return NULL;
    rows_rope((float *)x, (const float *)c, (const float *)s, rows, heads, hd);
    Py_RETURN_NONE;
}

PyObject *py_silu_mul(PyObject *self, PyObject *args) {
    unsigned long long gate, up, out;
    long long n;
    if (!PyArg_ParseTuple(args, "KKKL", &gate, &up, &out, &n)) return NULL;
    rows_silu_mul((const float *)gate, (const float *)up, (float *)out, n);
    Py_RETURN_NONE;
}

/* attend(q, k, v, out, heads, kv_heads, hd, kv_index, keys, values, head_stride, code, start, index, pos,
 *        threads) */
PyObject *py_attend(PyObject *self, PyObject *args) {
    unsigned long long q, k, v, out, kv_index, keys, values, index;
    long long heads, kv_heads, hd, head_stride, start, pos;
    int code, err, threads;
    if (!PyArg_ParseTuple(args, "KKKKLLLKKKLiLKLi", &q, &k, &v, &out, &heads, &kv_heads, &hd, &kv_index, &keys,
                          &values, &head_stride, &code, &start, &index, &pos, &threads))
        return NULL;
    if (rows_check_attend(heads, hd)) return NULL;
    kvstore_t s = {(char *)keys, (char *)values, head_stride, code};
    place_t place = {start, (const int64_t *)index};
    Py_BEGIN_ALLOW_THREADS
    err = rows_attend((const float *)q, (const float *)k, (const float *)v, (float *)out, heads, kv_heads, hd,
                      (const int64_t *)kv_index, &s, place, pos, threads);
    Py_END_ALLOW_THREADS
    if (err) return PyErr_NoMemory();
    Py_RETURN_NONE;
}
