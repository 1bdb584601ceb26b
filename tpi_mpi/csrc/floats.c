/* x @ W^T for 16-bit float weights (fp16: an F16 GGUF; bf16: a Hugging Face checkpoint) against float32
 * activations, on qdot.c's threads and tasks: the rows stay 16-bit in memory (half the bytes a token reads
 * of float32 rows) and are widened in registers, where torch multiplied them in 16 bits, with 16-bit
 * activations (a decode token at 1.6x llama.cpp's time, a prompt at 6x, docs/quant-kernels.md).
 *
 * A row and a token meet in two 8-lane float accumulators, a multiply-add per 8 columns in column
 * order, the even 8s in one and the odd 8s in the other, then a fixed sum of the two and of the 8
 * lanes: the same steps whatever the number of tokens and the other rows of the group (batch
 * invariance, batch.py). One or two tokens (decode) read the rows one at a time and widen them as
 * they read, once for both tokens; more (a prompt) widen 4 rows once into a buffer, which the tokens
 * then meet 2 rows and 3 tokens at a time (12 accumulators, enough to keep both FMA units busy), or, with
 * AVX-512, 4 rows and 6 tokens. Widening is exact, so every way gives the same bits.
 */
#include <stdlib.h>

#include "qdot.h"

#define ROWS FLOAT_ROWS

static void dot_scalar(int qt, const uint8_t *w, size_t rb, int nr, const float *const *x, int nt, int cols,
                       float *y, size_t ldy) {
    for (int r = 0; r < nr; r++, w += rb) {
        const uint16_t *row = (const uint16_t *)w;
        for (int t = 0; t < nt; t++) {
            float acc = 0;
            for (int k = 0; k < cols; k++) {
                float v = qt == BF16 ? bf16_bits_to_float(row[k]) : half_bits_to_float(row[k]);
                acc += v * x[t][k];
            }
            y[t * ldy + r] = acc;
        }
    }
}

#ifdef QDOT_X86
/* Every row, a row at a time (one stream for the prefetchers: 4 rows side by side read at half the
 * speed), widened as it is read, against nt (1 or 2) tokens: a decode step, bound by the memory. */
AVX2 static inline __attribute__((always_inline)) void dot_widening(int bf, const uint8_t *w, size_t rb, int nr,
                                                                    const float *const *x, const int nt, int cols,
                                                                    float *y, size_t ldy) {
    for (int r = 0; r < nr; r++, w += rb) {
        const uint16_t *row = (const uint16_t *)w;
        __m256 acc[2][2];
        for (int t = 0; t < nt; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
        for (int k = 0; k < cols; k += 16) {
            __m256 v0 = qdot_widen8(bf, row + k), v1 = qdot_widen8(bf, row + k + 8);
            for (int t = 0; t < nt; t++) {
                acc[t][0] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x[t] + k), acc[t][0]);
                acc[t][1] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x[t] + k + 8), acc[t][1]);
            }
        }
        for (int t = 0; t < nt; t++) y[t * ldy + r] = qdot_hsum_ps(_mm256_add_ps(acc[t][0], acc[t][1]));
    }
}

/* Two rows already widened to float32 (wide, cols apart) against nt <= PROMPT_TOKENS tokens: the same
 * multiply-adds in the same order as dot_widening, so the same bits, with 12 accumulators (enough
 * independent chains to keep both FMA units busy). */
#define PROMPT_TOKENS 3
AVX2 static inline __attribute__((always_inline)) void dot_wide(const float *wide, int nr, const float *const *x,
                                                                const int nt, int cols, float *y, size_t ldy) {
    __m256 acc[2][PROMPT_TOKENS][2];
    for (int r = 0; r < 2; r++)
        for (int t = 0; t < nt; t++) acc[r][t][0] = acc[r][t][1] = _mm256_setzero_ps();
    for (int k = 0; k < cols; k += 16)
        for (int h = 0; h < 2; h++) {               /* the even, then the odd 8 columns of the 16 */
            __m256 v0 = _mm256_loadu_ps(wide + k + 8 * h), v1 = _mm256_loadu_ps(wide + cols + k + 8 * h);
            for (int t = 0; t < nt; t++) {
                __m256 xv = _mm256_loadu_ps(x[t] + k + 8 * h);
                acc[0][t][h] = _mm256_fmadd_ps(v0, xv, acc[0][t][h]);
                acc[1][t][h] = _mm256_fmadd_ps(v1, xv, acc[1][t][h]);
            }
        }
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++) y[t * ldy + r] = qdot_hsum_ps(_mm256_add_ps(acc[r][t][0], acc[r][t][1]));
}

/* The same with AVX-512's 16-lane vectors and 32 registers: lanes 0-7 of an accumulator are the even 8
 * columns' (dot_widening's first accumulator), lanes 8-15 the odd 8's, so the multiply-adds, and the bits,
 * are the same, with all 4 rows against up to WIDE_TOKENS tokens at once (24 accumulators). */
#define WIDE_TOKENS 6
AVX512 static inline __attribute__((always_inline)) void dot_wide16(const float *wide, int nr, const float *const *x,
                                                                    const int nt, int cols, float *y, size_t ldy) {
    __m512 acc[ROWS][WIDE_TOKENS];
    for (int r = 0; r < ROWS; r++)
        for (int t = 0; t < nt; t++) acc[r][t] = _mm512_setzero_ps();
    for (int k = 0; k < cols; k += 16) {
        __m512 v[ROWS];
        for (int r = 0; r < ROWS; r++) v[r] = _mm512_loadu_ps(wide + (size_t)r * cols + k);
        for (int t = 0; t < nt; t++) {
            __m512 xv = _mm512_loadu_ps(x[t] + k);
            for (int r = 0; r < ROWS; r++) acc[r][t] = _mm512_fmadd_ps(v[r], xv, acc[r][t]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++) {
            __m256 even = _mm512_castps512_ps256(acc[r][t]);
            __m256 odd = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r][t]), 1));
            y[t * ldy + r] = qdot_hsum_ps(_mm256_add_ps(even, odd));
        }
}

AVX512 static void dot_wide_avx512(const float *wide, int nr, const float *const *x, int nt, int cols, float *y,
                                   size_t ldy) {
    for (int t = 0; t < nt; t += WIDE_TOKENS) {
        const float *const *xt = x + t;
        float *yt = y + (size_t)t * ldy;
        switch (nt - t) {
        case 1: dot_wide16(wide, nr, xt, 1, cols, yt, ldy); break;
        case 2: dot_wide16(wide, nr, xt, 2, cols, yt, ldy); break;
        case 3: dot_wide16(wide, nr, xt, 3, cols, yt, ldy); break;
        case 4: dot_wide16(wide, nr, xt, 4, cols, yt, ldy); break;
        case 5: dot_wide16(wide, nr, xt, 5, cols, yt, ldy); break;
        default: dot_wide16(wide, nr, xt, WIDE_TOKENS, cols, yt, ldy); break;
        }
    }
}

/* A prompt's many tokens: the rows are widened once into this thread's buffer, then met by the tokens
 * PROMPT_TOKENS at a time, two rows at once (all four and WIDE_TOKENS with AVX-512), so a token no longer
 * pays for widening them. -1 when the buffer cannot be had. */
AVX2 static int dot_prompt(int bf, const uint8_t *w, size_t rb, int nr, const float *const *x, int nt, int cols,
                           float *y, size_t ldy, int use_avx512) {
    static _Thread_local float *wide;
    static _Thread_local size_t wide_len;
    size_t need = (size_t)ROWS * cols;
    if (need > wide_len) {
        free(wide);
        wide = malloc(need * sizeof(float));
        wide_len = wide ? need : 0;
        if (!wide) return -1;
    }
    for (int r = 0; r < ROWS; r++) {           /* a short group repeats its last row */
        const uint16_t *row = (const uint16_t *)(w + (r < nr ? r : nr - 1) * rb);
        for (int k = 0; k < cols; k += 8) _mm256_storeu_ps(wide + (size_t)r * cols + k, qdot_widen8(bf, row + k));
    }
    if (use_avx512) {
        dot_wide_avx512(wide, nr, x, nt, cols, y, ldy);
        return 0;
    }
    for (int r = 0; r < nr; r += 2) {
        int pair = nr - r < 2 ? nr - r : 2;
        for (int t = 0; t < nt; t += PROMPT_TOKENS) {
            const float *wr = wide + (size_t)r * cols;
            float *yt = y + (size_t)t * ldy + r;
            switch (nt - t) {
            case 1: dot_wide(wr, pair, x + t, 1, cols, yt, ldy); break;
            case 2: dot_wide(wr, pair, x + t, 2, cols, yt, ldy); break;
            default: dot_wide(wr, pair, x + t, PROMPT_TOKENS, cols, yt, ldy); break;
            }
        }
    }
    return 0;
}

AVX2 static void dot_avx2(int qt, const uint8_t *w, size_t rb, int nr, const float *const *x, int nt, int cols,
                          float *y, size_t ldy, int use_avx512) {
    int bf = qt == BF16;
    if (nt > 2 && dot_prompt(bf, w, rb, nr, x, nt, cols, y, ldy, use_avx512) == 0) return;
    for (int t = 0; t < nt; t += 2) {       /* (or out of memory for the buffer) */
        int pair = nt - t > 1;
        float *yt = y + (size_t)t * ldy;
        if (bf && pair) dot_widening(1, w, rb, nr, x + t, 2, cols, yt, ldy);
        else if (bf) dot_widening(1, w, rb, nr, x + t, 1, cols, yt, ldy);
        else if (pair) dot_widening(0, w, rb, nr, x + t, 2, cols, yt, ldy);
        else dot_widening(0, w, rb, nr, x + t, 1, cols, yt, ldy);
    }
}
#endif

void qdot_float_rows(int qt, const uint8_t *w, size_t rb, int nr, const float *const *x, int nt, int cols, float *y,
                     size_t ldy, int use_avx2, int use_avx512) {
#ifdef QDOT_X86
    if (use_avx2) {
        dot_avx2(qt, w, rb, nr, x, nt, cols, y, ldy, use_avx512);
        return;
    }
#endif
    dot_scalar(qt, w, rb, nr, x, nt, cols, y, ldy);
}
