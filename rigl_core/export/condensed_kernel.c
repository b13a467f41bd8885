/* Condensed sparse matrix-vector products: y[b, r] = bias[r] + sum_j w[r, j] * x[b, idx[r, j]] (bias may be NULL).
 *
 * One fused loop (gather, multiply, sum) over a constant fan-in layer: `w` and `idx` are (rows, k), row-major.
 * Compiled on first use by rigl_core/export/condensed_kernel.py with -O3 -march=native -ffast-math, so the
 * inner loop becomes vector gathers (AVX2/AVX-512) with a reassociated sum. Plain C, no Python or torch
 * headers: it compiles in well under a second wherever a C compiler is installed.
 */
#include <stdint.h>

/* Rows outer, batch inner: a row's k weights and indices stay in L1 while every sample of the batch uses them. */
#define CONDENSED(NAME, INDEX)                                                                       \
    void NAME(const float *restrict x, const INDEX *restrict idx, const float *restrict w,         \
              const float *restrict bias, float *restrict y, int64_t batch, int64_t in_features,   \
              int64_t rows, int64_t k) {                                                           \
        for (int64_t r = 0; r < rows; r++) {                                                         \
            const INDEX *restrict ir = idx + r * k;                                                  \
            const float *restrict wr = w + r * k;                                                    \
            for (int64_t b = 0; b < batch; b++) {                                                    \
                const float *restrict xb = x + b * in_features;                                      \
                float acc = bias ? bias[r] : 0.f;                                                    \
                for (int64_t j = 0; j < k; j++) acc += wr[j] * xb[ir[j]];                            \
                y[b * rows + r] = acc;                                                               \
            }                                                                                        \
        }                                                                                            \
    }

CONDENSED(condensed_u8, uint8_t)
CONDENSED(condensed_i16, int16_t)
CONDENSED(condensed_i32, int32_t)

