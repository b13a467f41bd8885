/* Condensed sparse matrix-vector products: y[b, r] = bias[r] + sum_j w[r, j] * x[b, idx[r, j]] (bias may be NULL).
 *
 * One fused loop (gather, multiply, sum) over a constant fan-in layer: `w` and `idx` are (rows, k), row-major.
 * Compiled on first use by rigl_core/export/condensed_kernel.py with -O3 -march=native -ffast-math. With AVX2
 * the loop is written with 8-wide gathers and two accumulators: gcc's own vectorisation of the plain loop
 * (kept below for other CPUs) was about 25% slower on an Intel Xeon with AVX-512. AMD's gathers are slower
 * (on an AMD EPYC with AVX-512 the plain loop took 5.9 µs for 300 rows of 62 where the gathers took 10.5):
 * there the build defines CONDENSED_PLAIN (bench/results/condensed_inference.md).
 * Plain C, no Python or torch headers: it compiles in well under a second wherever a C compiler is installed.
 */
#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__) && !defined(CONDENSED_PLAIN)
#include <immintrin.h>

/* Eight indices of each type, widened to the int32 lanes a gather takes. */
#define LOAD8_uint8_t(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define LOAD8_int16_t(p) _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define LOAD8_int32_t(p) _mm256_loadu_si256((const __m256i *)(p))

static inline float hsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_hadd_ps(h, h);
    return _mm_cvtss_f32(_mm_hadd_ps(h, h));
}

#define ROW_DOT(INDEX)                                                                               \
    static inline float dot_##INDEX(const float *restrict x, const INDEX *restrict ir,               \
                                    const float *restrict wr, int64_t k) {                           \
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                                   \
        int64_t j = 0;                                                                               \
        for (; j + 16 <= k; j += 16) {                                                               \
            a0 = _mm256_fmadd_ps(_mm256_i32gather_ps(x, LOAD8_##INDEX(ir + j), 4),                   \
                                 _mm256_loadu_ps(wr + j), a0);                                       \
            a1 = _mm256_fmadd_ps(_mm256_i32gather_ps(x, LOAD8_##INDEX(ir + j + 8), 4),               \
                                 _mm256_loadu_ps(wr + j + 8), a1);                                   \
        }                                                                                            \
        if (j + 8 <= k) {                                                                            \
            a0 = _mm256_fmadd_ps(_mm256_i32gather_ps(x, LOAD8_##INDEX(ir + j), 4),                   \
                                 _mm256_loadu_ps(wr + j), a0);                                       \
            j += 8;                                                                                  \
        }                                                                                            \
        float tail = 0.f;                                                                            \
        for (; j < k; j++) tail += wr[j] * x[ir[j]];                                                 \
        return hsum(_mm256_add_ps(a0, a1)) + tail;                                                   \
    }
#else
#define ROW_DOT(INDEX)                                                                               \
    static inline float dot_##INDEX(const float *restrict x, const INDEX *restrict ir,               \
                                    const float *restrict wr, int64_t k) {                           \
        float acc = 0.f;                                                                             \
        for (int64_t j = 0; j < k; j++) acc += wr[j] * x[ir[j]];                                     \
        return acc;                                                                                  \
    }
#endif

/* Rows outer, batch inner: a row's k weights and indices stay in L1 while every sample of the batch uses them. */
#define CONDENSED(NAME, INDEX)                                                                       \
    ROW_DOT(INDEX)                                                                                   \
    void NAME(const float *restrict x, const INDEX *restrict idx, const float *restrict w,         \
              const float *restrict bias, float *restrict y, int64_t batch, int64_t in_features,   \
              int64_t rows, int64_t k) {                                                           \
        for (int64_t r = 0; r < rows; r++) {                                                         \
            for (int64_t b = 0; b < batch; b++)                                                      \
                y[b * rows + r] = (bias ? bias[r] : 0.f) + dot_##INDEX(x + b * in_features, idx + r * k, \
                                                                      w + r * k, k);                 \
        }                                                                                            \
    }

CONDENSED(condensed_u8, uint8_t)
CONDENSED(condensed_i16, int16_t)
CONDENSED(condensed_i32, int32_t)
