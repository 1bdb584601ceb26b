/* x @ W^T for 16-bit float weights (fp16: an F16 GGUF; bf16: a Hugging Face checkpoint) against float32
 * activations, on qdot.c's threads and tasks: the rows stay 16-bit in memory (half the bytes a token reads
 * of float32 rows) and are widened in registers, where torch multiplied them in 16 bits, with 16-bit
 * activations (a decode token at 1.6x llama.cpp's time, a prompt at 6x, docs/quant-kernels.md).
 *
 * A row and a token meet in one 8-lane float accumulator, a multiply-add per 8 columns in column order,
 * then a fixed sum of the 8 lanes: the same steps whatever the number of tokens and the other rows of
 * the group (batch invariance, batch.py). Rows come 4 at a time and tokens 2 at a time (8 accumulators:
 * enough independent chains to keep both FMA units busy on a prompt), so a row's 16 bytes widened once
 * serve two tokens, and a token's 32 bytes four rows.
 */
#include "qdot.h"

#define ROWS FLOAT_ROWS

static inline float bf16_bits_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

void fl_dot_scalar(int qt, const uint8_t *w, size_t rb, int nr, const float *const *x, int nt, int cols, float *out,
                   int stride) {
    for (int r = 0; r < nr; r++, w += rb) {
        const uint16_t *row = (const uint16_t *)w;
        for (int t = 0; t < nt; t++) {
            float acc = 0;
            for (int k = 0; k < cols; k++) {
                float v = qt == BF16 ? bf16_bits_to_float(row[k]) : half_bits_to_float(row[k]);
                acc += v * x[t][k];
            }
            out[r * stride + t] = acc;
        }
    }
}

#ifdef QDOT_X86
AVX2 static inline __m256 widen8(int bf, const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return bf ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

/* ROWS rows (a short group repeats its last row) against nt (1 or 2) tokens. */
AVX2 static inline __attribute__((always_inline)) void dot_n(int bf, const uint8_t *w, size_t rb, int nr,
                                                             const float *const *x, const int nt, int cols,
                                                             float *out, int stride) {
    const uint16_t *row[ROWS];
    for (int r = 0; r < ROWS; r++) row[r] = (const uint16_t *)(w + (r < nr ? r : nr - 1) * rb);
    __m256 acc[ROWS][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int k = 0; k < cols; k += 8) {
        __m256 v[ROWS];
        for (int r = 0; r < ROWS; r++) {
            _mm_prefetch((const char *)(row[r] + k + 256), _MM_HINT_T0);
            v[r] = widen8(bf, row[r] + k);
        }
        for (int t = 0; t < nt; t++) {
            __m256 xv = _mm256_loadu_ps(x[t] + k);
            for (int r = 0; r < ROWS; r++) acc[r][t] = _mm256_fmadd_ps(v[r], xv, acc[r][t]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++) out[r * stride + t] = qdot_hsum_ps(acc[r][t]);
}

AVX2 void fl_dot_avx2(int qt, const uint8_t *w, size_t rb, int nr, const float *const *x, int nt, int cols,
                      float *out, int stride) {
    for (int t = 0; t < nt; t += 2) {       /* the rows' bytes, just read, come from L1 for the next pair */
        int pair = nt - t > 1;
        if (qt == BF16 && pair) dot_n(1, w, rb, nr, x + t, 2, cols, out + t, stride);
        else if (qt == BF16) dot_n(1, w, rb, nr, x + t, 1, cols, out + t, stride);
        else if (pair) dot_n(0, w, rb, nr, x + t, 2, cols, out + t, stride);
        else dot_n(0, w, rb, nr, x + t, 1, cols, out + t, stride);
    }
}
#endif
