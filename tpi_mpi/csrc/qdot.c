/* x @ W^T for GGML block weights, with x quantized to 8-bit blocks and integer dot products.
 *
 * llama.cpp's way of decoding on a CPU (ggml-cpu's vec_dot_q4_0_q8_0 and friends): each token's
 * activations are cut into blocks of 32 values, each stored as int8 with one float scale (and the
 * sum of its int8 values); a weight block then meets its activation block in an integer dot
 * product (AVX2: maddubs + madd), and one float multiply-add per 32 values applies both scales.
 * The activations lose a little precision (8 bits per value against a 32-value block's largest),
 * which docs/quant-kernels.md measures as perplexity; quant.py keeps the exact float path.
 *
 * Every output value is the same sequence of operations whatever the number of tokens T and
 * whatever the other tokens hold (batch invariance, batch.py): tokens are only ever computed side by
 * side, never summed together, and the split of rows between threads does not change a row's sum.
 *
 * One entry point, matmul(mats, cols, x, T, threads), for up to MAX_MATS matrices that multiply the same x
 * (a layer's q, k and v: x is quantized once, and one call's overhead is paid instead of three).
 * Pointers are passed as integers (torch's data_ptr()); quant_int8.py checks shapes, types and
 * contiguity before calling. The GIL is released while the kernel runs; rows are split in tasks
 * between this thread and pool.c's workers. The K-quants' dot products are kquants.c's; 16-bit float
 * rows (F16, BF16) take the same tasks with float32 activations, unquantized (floats.c).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qdot.h"

static const int BLOCK_VALUES[N_TYPES] = {32, 32, 32, 256, 256, 256, 32, 32, 32, 32};
static const int BLOCK_BYTES[N_TYPES] = {34, 18, 20, 144, 176, 210, 22, 24, 64, 64};

/* One activation block: 32 int8 values, their scale and their sum. */
typedef struct {
    float d;
    int32_t sum;
    int8_t q[32];
} xblock;

/* ---- scalar helpers ---------------------------------------------------------------------------- */

static float half_to_float(const uint8_t *p) { return half_bits_to_float(qdot_half_at(p)); }

/* The 32-value types below Q8_0: w = d * (q - offset) (Q4_0, Q5_0) or d * q + m (Q4_1, Q5_1), q a nibble
 * or, for Q5_x, a nibble plus a fifth bit from the block's 4 bytes qh (after d and m, before the nibbles). */
static inline int has_min(int qt) { return qt == Q4_1 || qt == Q5_1; }
static inline int has_fifth_bits(int qt) { return qt == Q5_0 || qt == Q5_1; }
static inline int q_offset(int qt) { return qt == Q4_0 ? 8 : qt == Q5_0 ? 16 : 0; }

/* ---- the 8-row layout (qdot.h's packed_at) ------------------------------------------------------ */

/* One column: the 8 rows' blocks at plain[r] to the packed column, or back. */
static void pack_column(int bb, uint8_t *const *plain, uint8_t *packed, int to_packed) {
    int lead = packed_lead(bb), tail = bb - packed_tail(bb);
    for (int r = 0; r < 8; r++)
        for (int i = 0; i < bb; i += i < lead || i >= tail ? 2 : 4) {
            uint8_t *a = plain[r] + i, *b = packed + packed_at(bb, r, i);
            size_t n = i < lead || i >= tail ? 2 : 4;
            if (to_packed) memcpy(b, a, n); else memcpy(a, b, n);
        }
}

/* ---- activations to 8-bit blocks --------------------------------------------------------------- */

static void quantize_row_scalar(const float *x, xblock *out, int nb) {
    for (int b = 0; b < nb; b++) {
        const float *v = x + 32 * b;
        float amax = 0;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(v[i]));
        float d = amax / 127, id = d ? 1 / d : 0;
        int32_t sum = 0;
        for (int i = 0; i < 32; i++) {
            int q = (int)nearbyintf(v[i] * id);            /* round half to even, as cvtps_epi32 */
            out[b].q[i] = (int8_t)q;
            sum += q;
        }
        out[b].d = d;
        out[b].sum = sum;
    }
}

#ifdef QDOT_X86
AVX2 static void quantize_row_avx2(const float *x, xblock *out, int nb) {
    for (int b = 0; b < nb; b++) {
        const float *v = x + 32 * b;
        float amax = qdot_amax32(v), d = amax / 127, id = d ? 1 / d : 0;
        __m256 s = _mm256_set1_ps(id);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v), s)),
                i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8), s)),
                i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 16), s)),
                i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 24), s));
        out[b].sum = qdot_hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
        qdot_store_int8x32(out[b].q, i0, i1, i2, i3);
        out[b].d = d;
    }
}
#endif

/* ---- dot products: weight rows against NT tokens' activation rows ------------------------------
 * w: the rows' blocks; x[t]: token t's activation blocks; out[r * TILE + t] = the dot product. Tokens
 * come in tiles of up to TILE: a weight block is unpacked once per tile. */

#define TILE 4
#define PREFETCH_BYTES 512   /* how far ahead in each row the 8-row kernel asks for its bytes */
#define ROWS_AT_ONCE 4   /* K-quant rows a task step takes */

/* w: the row's blocks, bb bytes apart; or, for row `packed` (0-7) of a packed group (see packed_at), the
 * group's columns, bb = 8 blocks' bytes apart, and packed < 0 otherwise */
static void dot_scalar(int qt, const uint8_t *w, size_t bb, int packed, const xblock *const *x, int nt, int cols,
                       float *out) {
    int nbx = cols / 32;
    for (int t = 0; t < nt; t++) out[t] = 0;
    for (int kb = 0; kb < nbx; kb++) {                       /* one 32-value activation block at a time */
        int8_t q[32];                                        /* the weights' integers */
        float dw, mw = 0;                                    /* w = dw * q (+ min mw) */
        const uint8_t *b = w + (size_t)kb * bb;
        uint8_t block[34];
        if (packed >= 0) {
            for (int i = 0; i < BLOCK_BYTES[qt]; i++) block[i] = b[packed_at(BLOCK_BYTES[qt], packed, i)];
            b = block;
        }
        dw = half_to_float(b);
        if (qt == Q8_0) {
            memcpy(q, b + 2, 32);
        } else {
            const uint8_t *qh = b + (has_min(qt) ? 4 : 2), *qs = qh + (has_fifth_bits(qt) ? 4 : 0);
            uint32_t high = has_fifth_bits(qt) ? (uint32_t)qh[0] | qh[1] << 8 | qh[2] << 16 | (uint32_t)qh[3] << 24 : 0;
            int off = q_offset(qt);
            for (int i = 0; i < 16; i++) {          /* value i's fifth bit is bit i of qh */
                q[i] = (int8_t)(((qs[i] & 15) | ((high >> i) & 1) << 4) - off);
                q[i + 16] = (int8_t)(((qs[i] >> 4) | ((high >> (i + 16)) & 1) << 4) - off);
            }
            if (has_min(qt)) mw = half_to_float(b + 2);
        }
        for (int t = 0; t < nt; t++) {
            const xblock *xb = x[t] + kb;
            int32_t isum = 0;
            for (int i = 0; i < 32; i++) isum += q[i] * xb->q[i];
            out[t] += (float)isum * (dw * xb->d) + mw * xb->d * (float)xb->sum;
        }
    }
}

#ifdef QDOT_X86
AVX2 static inline __m256i load_nibbles(const uint8_t *p) {      /* 16 bytes -> 32 values: low then high */
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
    return _mm256_and_si256(both, _mm256_set1_epi8(15));
}

/* Q5_0/Q5_1: 16 in byte i where bit i of the 4 bytes at p is set, to be or-ed onto the nibbles
 * (ggml's bytes_from_bits_32: byte i gets qh byte i / 8, then all its bits but bit i % 8 are set). */
AVX2 static inline __m256i fifth_bits(const uint8_t *p) {
    uint32_t qh;
    memcpy(&qh, p, 4);
    const __m256i spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    __m256i bytes = _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), spread),
                                    _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_and_si256(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(16));
}

#define XQ(t, kb) _mm256_loadu_si256((const __m256i *)x[t][kb].q)

/* The 32-value types, 8 rows at once: lane r of every float vector is row r. Per block, each row's
 * integer dot product (exact, so its order does not matter) is reduced into its lane by a tree of
 * horizontal adds, then one multiply-add applies the 8 rows' scales times the token's. The float
 * arithmetic per row is a fixed sequence over blocks, the same for any number of tokens. */
AVX2 static inline __m256i reduce8(__m256i p0, __m256i p1, __m256i p2, __m256i p3, __m256i p4, __m256i p5,
                                   __m256i p6, __m256i p7) {
    __m256i b0 = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
    __m256i b1 = _mm256_hadd_epi32(_mm256_hadd_epi32(p4, p5), _mm256_hadd_epi32(p6, p7));
    return _mm256_add_epi32(_mm256_permute2x128_si256(b0, b1, 0x20), _mm256_permute2x128_si256(b0, b1, 0x31));
}

AVX2 static inline __m256 scales8(const uint8_t *const *row, size_t at) {   /* 8 rows' fp16 at byte `at` */
    __m128i h = _mm_setr_epi16(*(const int16_t *)(row[0] + at), *(const int16_t *)(row[1] + at),
                               *(const int16_t *)(row[2] + at), *(const int16_t *)(row[3] + at),
                               *(const int16_t *)(row[4] + at), *(const int16_t *)(row[5] + at),
                               *(const int16_t *)(row[6] + at), *(const int16_t *)(row[7] + at));
    return _mm256_cvtph_ps(h);
}

AVX2 static inline __attribute__((always_inline)) void dot8_avx2_n(int qt, const uint8_t *w, size_t rb, size_t bb,
                                                                   int nr, const xblock *const *x, const int nt,
                                                                   int cols, float *out) {
    const uint8_t *row[8];
    for (int r = 0; r < 8; r++) row[r] = w + (r < nr ? r : nr - 1) * rb;    /* a short group repeats its last row */
    __m256 acc[TILE];
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    const int with_min = has_min(qt), fifth = has_fifth_bits(qt), offset = q_offset(qt);
    const int qh_at = with_min ? 4 : 2, qs_at = qh_at + (fifth ? 4 : 0);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int kb = 0; kb < cols / 32; kb++) {
        size_t at = (size_t)kb * bb;
        __m256i q[8];
        for (int r = 0; r < 8; r++) {                 /* 8 short streams: the prefetchers need help */
            _mm_prefetch((const char *)(row[r] + at + PREFETCH_BYTES), _MM_HINT_T0);
            q[r] = qt == Q8_0 ? _mm256_loadu_si256((const __m256i *)(row[r] + at + 2))
                              : load_nibbles(row[r] + at + qs_at);
            if (fifth) q[r] = _mm256_or_si256(q[r], fifth_bits(row[r] + at + qh_at));
        }
        __m256 d = scales8(row, at);
        __m256 m = with_min ? scales8(row, at + 2) : _mm256_setzero_ps();
        for (int t = 0; t < nt; t++) {
            __m256i y = XQ(t, kb), p[8];
            for (int r = 0; r < 8; r++)
                p[r] = qt == Q8_0 ? _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q[r], q[r]),
                                                                           _mm256_sign_epi8(y, q[r])), ones)
                                  : _mm256_madd_epi16(_mm256_maddubs_epi16(q[r], y), ones);
            __m256i isum = reduce8(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
            if (offset)                                       /* sum (q - off) * y = sum q * y - off * sum y */
                isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(offset * x[t][kb].sum));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, _mm256_set1_ps(x[t][kb].d)), acc[t]);
            if (with_min)                                     /* + m * (d_x * sum y) */
                acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(x[t][kb].d * (float)x[t][kb].sum), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) {
        float lanes[8];
        _mm256_storeu_ps(lanes, acc[t]);
        for (int r = 0; r < nr; r++) out[r * TILE + t] = lanes[r];
    }
}

/* A packed group of 8 rows (see packed_at) against NT tokens. Per column, lane r of every vector is row
 * r: each load of quants is 4 bytes of every row, met by the token's 4 matching bytes broadcast, so the
 * rows' integer sums build up lane by lane. The same integer sums and then the same float steps as
 * dot8_avx2_n, so the two layouts give the same bits. */
#define Y4(t, kb, i) _mm256_set1_epi32(qdot_load4(x[t][kb].q + (i)))   /* 4 values in every lane */

/* Q5_0/Q5_1 in the packed layout: lane r of qh is row r's 32 fifth bits; 16 in byte j of lane r where
 * bit 4c + j is set, for the lanes' values 4c..4c+3 (byte c / 2 of each lane spread over its 4 bytes). */
AVX2 static inline __m256i fifth_bits4(__m256i qh, int c) {
    const __m256i lane_bytes = _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                                0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
    const __m256i bit = _mm256_set1_epi32((int)(0x08040201u << (4 * (c % 2))));
    __m256i bytes = _mm256_shuffle_epi8(qh, _mm256_add_epi8(lane_bytes, _mm256_set1_epi8((char)(c / 2))));
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit), _mm256_set1_epi8(16));
}

/* The kernel (dotp.inc) with AVX2's integer dot products, */
#define DOTP_TARGET AVX2
#define DOTP_N dotp_avx2_n
#define DOTP dotp_avx2
#define DOTP_VNNI 0
#include "dotp.inc"
#undef DOTP_TARGET
#undef DOTP_N
#undef DOTP
#undef DOTP_VNNI

/* and with AVX-512 VNNI's on 256-bit vectors (Ice Lake, Zen 4 and later; llama.cpp's choice there). */
#define DOTP_TARGET AVX512_VNNI
#define DOTP_N dotp_vnni_n
#define DOTP dotp_vnni
#define DOTP_VNNI 1
#include "dotp.inc"
#undef Y4

/* rb: bytes from a row to the next, bb: from a block of a row to its next block (the plain layout). */
AVX2 static void dot8_avx2(int qt, const uint8_t *w, size_t rb, size_t bb, int nr, const xblock *const *x, int nt,
                           int cols, float *out) {
    switch (nt) {
    case 1: dot8_avx2_n(qt, w, rb, bb, nr, x, 1, cols, out); break;
    case 2: dot8_avx2_n(qt, w, rb, bb, nr, x, 2, cols, out); break;
    case 3: dot8_avx2_n(qt, w, rb, bb, nr, x, 3, cols, out); break;
    default: dot8_avx2_n(qt, w, rb, bb, nr, x, 4, cols, out); break;
    }
}

#endif

/* ---- a product's tasks (run on pool.c's threads) ----------------------------------------------------- */

#define TASKS_PER_THREAD 8

typedef struct {
    int qt, rows, interleaved;       /* interleaved: rows in groups of 8 stored block by block (see repack) */
    const uint8_t *w;
    size_t row_bytes;
    float *y;                /* (nt, rows) */
} mat_t;

typedef struct {
    mat_t m[MAX_MATS];
    int first_task[MAX_MATS + 1];    /* matrix i's tasks are first_task[i] .. first_task[i + 1] - 1 */
    int nmats, cols, nt, chunk;
    const xblock *const *x;          /* the tokens' 32-value blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) */
    const kxblock *const *xk;        /* and their 256-value blocks (the K-quants; kquants.c) */
    const float *const *xf;          /* and their float32 rows (16-bit float weights; floats.c) */
    int use_avx2, use_vnni;
} job_t;

static void run_task(void *ctx, int task) {
    const job_t *j = ctx;
    int i = 0;
    while (task >= j->first_task[i + 1]) i++;
    const mat_t *m = &j->m[i];
    int r0 = (task - j->first_task[i]) * j->chunk, r1 = r0 + j->chunk < m->rows ? r0 + j->chunk : m->rows;
    int kquant = qdot_is_kquant(m->qt), floats = qdot_is_float(m->qt);
    int group = floats ? FLOAT_ROWS : kquant && !m->interleaved ? ROWS_AT_ONCE : 8;
    size_t bytes = BLOCK_BYTES[m->qt];
    float out[8 * KP_TILE_VNNI];
    for (int r = r0; r < r1; r += group) {
        int nr = r1 - r < group ? r1 - r : group;
        const uint8_t *w = m->w + (size_t)r * m->row_bytes;
        if (floats) {           /* every token in one call: a prompt's rows are widened once (floats.c) */
            qdot_float_rows(m->qt, w, m->row_bytes, nr, j->xf, j->nt, j->cols, m->y + r, m->rows, j->use_avx2,
                            j->use_vnni);   /* the CPUs with AVX-512 VNNI have AVX-512F and VL */
            continue;
        }
        int packed = m->interleaved && nr == 8;                  /* a short last group is plain */
        int tile = !(kquant && packed && j->use_avx2) ? TILE : j->use_vnni ? KP_TILE_VNNI : KP_TILE_AVX2;
        for (int t0 = 0; t0 < j->nt; t0 += tile) {
            int n = j->nt - t0 < tile ? j->nt - t0 : tile;
#ifdef QDOT_X86
            if (j->use_avx2 && kquant && packed && j->use_vnni)
                kq_dot_packed_vnni(m->qt, w, j->xk + t0, n, j->cols, out);
            else if (j->use_avx2 && kquant && packed)
                kq_dot_packed_avx2(m->qt, w, j->xk + t0, n, j->cols, out);
            else if (j->use_avx2 && kquant)
                kq_dot_avx2(m->qt, w, m->row_bytes, nr, j->xk + t0, n, j->cols, out, TILE);
            else if (j->use_avx2 && packed && j->use_vnni)
                dotp_vnni(m->qt, w, j->x + t0, n, j->cols, out);
            else if (j->use_avx2 && packed)
                dotp_avx2(m->qt, w, j->x + t0, n, j->cols, out);
            else if (j->use_avx2)
                dot8_avx2(m->qt, w, m->row_bytes, bytes, nr, j->x + t0, n, j->cols, out);
            else
#endif
            if (kquant)
                kq_dot_scalar(m->qt, w, m->row_bytes, nr, packed, j->xk + t0, n, j->cols, out, TILE);
            else
                for (int k = 0; k < nr; k++)
                    dot_scalar(m->qt, packed ? w : w + k * m->row_bytes, packed ? 8 * bytes : bytes, packed ? k : -1,
                               j->x + t0, n, j->cols, out + k * TILE);
            for (int k = 0; k < nr; k++)
                for (int t = 0; t < n; t++) m->y[(size_t)(t0 + t) * m->rows + r + k] = out[k * tile + t];
        }
    }
}

/* ---- Python ------------------------------------------------------------------------------------ */

int qdot_cpu_has_avx2(void) {
    static int known = -1;
    if (known < 0) {
#ifdef QDOT_X86
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
        known = 0;
#endif
    }
    return known;
}

static int cpu_has_vnni(void) {
#ifdef QDOT_X86
    return qdot_cpu_has_avx2() && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

static int use_avx2 = -1, use_vnni = -1;     /* the instruction sets in use: the CPU's best, or as set_isa says */
static pthread_mutex_t matmul_lock = PTHREAD_MUTEX_INITIALIZER;   /* one product at a time: the buffers below */
static xblock *xbuf;
static size_t xbuf_len;
static kxblock *xkbuf;
static size_t xkbuf_len;

int qdot_parse_mat(PyObject *item, int cols, qmat_t *m) {
    unsigned long long wp, yp;
    m->interleaved = 0;
    if (!PyArg_ParseTuple(item, "iKiK|p", &m->qt, &wp, &m->rows, &yp, &m->interleaved)) return -1;
    if (m->qt < 0 || m->qt >= N_TYPES || m->rows < 1 || cols < 32 || cols % BLOCK_VALUES[m->qt]) {
        PyErr_Format(PyExc_ValueError, "qdot: a matrix of type %d with %d columns, %d rows", m->qt, cols, m->rows);
        return -1;
    }
    m->w = (const uint8_t *)(uintptr_t)wp;
    m->y = (float *)(uintptr_t)yp;
    return 0;
}

int qdot_matmul(const qmat_t *mats, int n, int cols, const float *x, int nt, int threads) {
    if (threads < 1) threads = 1;
    if (threads > QDOT_MAX_THREADS) threads = QDOT_MAX_THREADS;
    /* Rows per task: about TASKS_PER_THREAD tasks a thread for one token, more for several (a task of
     * many tokens is long, and finer tasks even out a thread that was descheduled), in multiples of 16
     * (whole 8-row groups). 16 rows at a time made SmolLM2's decode (3072 x 576: 192 tasks of ~0.5 us)
     * pay for the shared counter more than a second thread gave back. */
    int total = 0;
    for (int i = 0; i < n; i++) total += mats[i].rows;
    int chunk = (total / (threads * TASKS_PER_THREAD * (nt < 8 ? nt : 8)) + 15) / 16 * 16;
    job_t j = {.nmats = n, .cols = cols, .nt = nt, .chunk = chunk < 16 ? 16 : chunk};
    for (int i = 0; i < n; i++) {
        mat_t *m = &j.m[i];
        m->qt = mats[i].qt;
        m->rows = mats[i].rows;
        m->interleaved = mats[i].interleaved;
        m->w = mats[i].w;
        m->y = mats[i].y;
        m->row_bytes = (size_t)(cols / BLOCK_VALUES[m->qt]) * BLOCK_BYTES[m->qt];
        j.first_task[i + 1] = j.first_task[i] + (m->rows + j.chunk - 1) / j.chunk;
    }
    int nbx = cols / 32, nbk = cols / 256, ok = 0, small = 0, kquant = 0;   /* which activation blocks are needed */
    for (int i = 0; i < n; i++) {
        small |= !qdot_is_kquant(mats[i].qt) && !qdot_is_float(mats[i].qt);
        kquant |= qdot_is_kquant(mats[i].qt);
    }
    const xblock *xrows[QDOT_MAX_TOKENS];
    const kxblock *xkrows[QDOT_MAX_TOKENS];
    const float *xfrows[QDOT_MAX_TOKENS];
    pthread_mutex_lock(&matmul_lock);
    if (use_avx2 < 0) use_avx2 = qdot_cpu_has_avx2();
    if (use_vnni < 0) use_vnni = cpu_has_vnni();
    size_t need = small ? (size_t)nt * nbx : 0, need_k = kquant ? (size_t)nt * nbk : 0;
    if (need > xbuf_len) {
        free(xbuf);
        xbuf = malloc(need * sizeof(xblock));
        xbuf_len = xbuf ? need : 0;
    }
    if (need_k > xkbuf_len) {
        free(xkbuf);
        xkbuf = malloc(need_k * sizeof(kxblock));
        xkbuf_len = xkbuf ? need_k : 0;
    }
    if (xbuf_len >= need && xkbuf_len >= need_k) {
        for (int t = 0; t < nt; t++) {
            const float *row = x + (size_t)t * cols;
            xrows[t] = xbuf + (size_t)t * nbx;
            xkrows[t] = xkbuf + (size_t)t * nbk;
            xfrows[t] = row;
#ifdef QDOT_X86
            if (use_avx2) {
                if (small) quantize_row_avx2(row, xbuf + (size_t)t * nbx, nbx);
                if (kquant) kq_quantize_avx2(row, xkbuf + (size_t)t * nbk, nbk);
                continue;
            }
#endif
            if (small) quantize_row_scalar(row, xbuf + (size_t)t * nbx, nbx);
            if (kquant) kq_quantize_scalar(row, xkbuf + (size_t)t * nbk, nbk);
        }
        j.x = xrows;
        j.xk = xkrows;
        j.xf = xfrows;
        j.use_avx2 = use_avx2;
        j.use_vnni = use_vnni;
        qdot_parallel(run_task, &j, j.first_task[n], threads);
        ok = 1;
    }
    pthread_mutex_unlock(&matmul_lock);
    return ok ? 0 : -1;
}


/* matmul(mats, cols, x_ptr, tokens, threads), mats a sequence of (qtype, w_ptr, rows, y_ptr): each
 * matrix's y (tokens, rows) = x @ W^T, x (tokens, cols) float32 quantized once for all of them. */
static PyObject *py_matmul(PyObject *self, PyObject *args) {
    PyObject *mats;
    int cols, nt, threads;
    unsigned long long xp;
    if (!PyArg_ParseTuple(args, "OiKii", &mats, &cols, &xp, &nt, &threads)) return NULL;
    PyObject *seq = PySequence_Fast(mats, "qdot.matmul: mats must be a sequence of (qtype, w_ptr, rows, y_ptr)");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > MAX_MATS || nt < 1 || nt > QDOT_MAX_TOKENS || cols < 32 || cols % 32) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "qdot.matmul: %zd matrices (1 to %d), %d tokens (1 to %d), %d columns", n,
                     MAX_MATS, nt, QDOT_MAX_TOKENS, cols);
        return NULL;
    }
    qmat_t m[MAX_MATS];
    for (Py_ssize_t i = 0; i < n; i++)
        if (qdot_parse_mat(PySequence_Fast_GET_ITEM(seq, i), cols, &m[i])) {
            Py_DECREF(seq);
            return NULL;
        }
    Py_DECREF(seq);
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = qdot_matmul(m, (int)n, cols, (const float *)(uintptr_t)xp, nt, threads);
    Py_END_ALLOW_THREADS
    if (err) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* regroup(ptr, rows, row_bytes, block_bytes, to_interleaved): in place, rows in groups of 8 stored
 * block by block (row 0's block 0, row 1's block 0, ..., row 7's block 0, row 0's block 1, ...), or
 * back; the last rows % 8 rows stay as they are. In place, a group at a time through a small buffer: a
 * new buffer's first touch alone moved 1 GB/s (and a copy of a 7B model's blocks is 3.6 GB more). */
static PyObject *py_regroup(PyObject *self, PyObject *args) {
    unsigned long long p;
    Py_ssize_t rows, rb, bb;
    int forward;
    if (!PyArg_ParseTuple(args, "Knnnp", &p, &rows, &rb, &bb, &forward)) return NULL;
    int known = bb == 18 || bb == 20 || bb == 22 || bb == 24 || bb == 34 || bb == 144 || bb == 176 || bb == 210;
    if (rows < 0 || !known || rb % bb) {
        PyErr_Format(PyExc_ValueError, "qdot.regroup: rows of %zd bytes are not Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, "
                     "Q5_K or Q6_K blocks of %zd", rb, bb);
        return NULL;
    }
    uint8_t *tmp = malloc((size_t)(8 * rb));
    if (!tmp) return PyErr_NoMemory();
    uint8_t *w = (uint8_t *)(uintptr_t)p;
    Py_ssize_t nb = rb / bb;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t g = 0; g + 8 <= rows; g += 8) {
        uint8_t *group = w + g * rb, *plain[8];
        memcpy(tmp, group, (size_t)(8 * rb));
        for (Py_ssize_t b = 0; b < nb; b++) {
            for (int r = 0; r < 8; r++) plain[r] = (forward ? tmp : group) + r * rb + b * bb;
            pack_column((int)bb, plain, (forward ? group : tmp) + 8 * b * bb, forward);
        }
    }
    Py_END_ALLOW_THREADS
    free(tmp);
    Py_RETURN_NONE;
}

static PyObject *py_isa(PyObject *self, PyObject *noargs) {
    if (use_avx2 < 0) use_avx2 = qdot_cpu_has_avx2();
    if (use_vnni < 0) use_vnni = cpu_has_vnni();
    return PyUnicode_FromString(use_vnni && use_avx2 ? "avx512vnni" : use_avx2 ? "avx2" : "generic");
}

/* set_isa(name): compute with 'generic' (portable C), 'avx2' or 'avx512vnni' from now on (for tests and
 * benchmarks), or the CPU's best with None. */
static PyObject *py_set_isa(PyObject *self, PyObject *arg) {
    const char *name = arg == Py_None ? "best" : PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    int best = strcmp(name, "best") == 0, vnni = strcmp(name, "avx512vnni") == 0, avx2 = vnni || !strcmp(name, "avx2");
    if (!best && !avx2 && strcmp(name, "generic")) {
        PyErr_Format(PyExc_ValueError, "qdot.set_isa: %s is not one of generic, avx2, avx512vnni", name);
        return NULL;
    }
    if ((avx2 && !qdot_cpu_has_avx2()) || (vnni && !cpu_has_vnni())) {
        PyErr_Format(PyExc_ValueError, "qdot.set_isa: this CPU has no %s", name);
        return NULL;
    }
    use_avx2 = best ? qdot_cpu_has_avx2() : avx2;
    use_vnni = best ? cpu_has_vnni() : vnni;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"matmul", py_matmul, METH_VARARGS,
     "matmul(mats, cols, x_ptr, tokens, threads), mats ((qtype, w_ptr, rows, y_ptr), ...): y = x @ W^T each"},
    {"regroup", py_regroup, METH_VARARGS,
     "regroup(ptr, rows, row_bytes, block_bytes, to_interleaved): to or from the kernels' interleaved layout, in place"},
    {"isa", py_isa, METH_NOARGS, "the instruction set the kernels use: 'avx512vnni', 'avx2' or 'generic'"},
    {"set_isa", py_set_isa, METH_O, "set_isa('generic' | 'avx2' | 'avx512vnni' | None): the kernels' instruction set"},
    {"rmsnorm", py_rmsnorm, METH_VARARGS, "rmsnorm(x, w, y, rows, cols, eps): y = w * x / rms(x), row by row"},
    {"rope", py_rope, METH_VARARGS, "rope(x, cos, sin, rows, heads, hd): x rotated in place"},
    {"silu_mul", py_silu_mul, METH_VARARGS, "silu_mul(gate, up, out, n): out = silu(gate) * up"},
    {"attend", py_attend, METH_VARARGS, "attend(q, k, v, out, heads, kv_heads, hd, kv_index, keys, values, "
                                        "head_stride, code, start, index, pos, threads): one query row"},
    {"attention_rows", py_attention_rows, METH_VARARGS, "a decode step's attention half-layer, see layer.c"},
    {"mlp_rows", py_mlp_rows, METH_VARARGS, "a decode step's MLP half-layer, see layer.c"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_qdot", NULL, -1, methods};

PyMODINIT_FUNC PyInit__qdot(void) { return PyModule_Create(&module); }
