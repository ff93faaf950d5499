/* Cross-entropy over a large vocabulary for x86 CPUs with AVX-512F: the training loss and its gradient.

   Why it exists: F.cross_entropy on bf16 logits, as latent_loss called it (logits.float() first, so that the
   loss is exact), makes four full passes over a (rows, V) fp32 copy of the logits forward (the cast, the
   log-softmax's max, exp and output) and as many backward (a zero-filled gradient, the log-softmax backward, the
   cast back). At text-v1's training shape (2,048 rows of 8,192 logits) that was 24 ms of a 283 ms bf16 step.
   Here each row is read twice forward (its maximum, then the sum of exponentials: one row of 8,192 bf16 logits
   is 16 KB, so the second read hits L1) and once backward, which writes the gradient in the logits' dtype.
   Arithmetic in fp32 throughout; exp by cpu_simd.h's exp2_ps (relative error ~2e-7).

   Layout: logits (rows, V), fp32 or bf16 (`is_bf16`), unit stride along V, `row_stride` elements between rows;
   targets int64 in [0, V). Rows are split across `threads` OpenMP threads.
*/
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "cpu_simd.h"

#define LOG2E 1.44269504f

/* logits [at, at + 16) of a row, widened to fp32 */
INLINE __m512 load_logits(const char *row, int is_bf16, long at, __mmask16 mask) {
    return load_widened(row + at * (is_bf16 ? 2 : 4), is_bf16, mask);
}

/* log(sum_j exp(x[j])) of one row */
static float row_logsumexp(const char *row, int is_bf16, int V) {
    __m512 most = _mm512_set1_ps(-INFINITY);
    for (long j = 0; j < V; j += 16)
        most = _mm512_max_ps(most, load_logits(row, is_bf16, j, tail_mask(V - j)));
    const float top = _mm512_reduce_max_ps(most);
    const __m512 shift = _mm512_set1_ps(top * LOG2E), scale = _mm512_set1_ps(LOG2E);
    __m512 sum = _mm512_setzero_ps();
    for (long j = 0; j < V; j += 16) {
        const __mmask16 mask = tail_mask(V - j);
        const __m512 e = exp2_ps(_mm512_fmsub_ps(load_logits(row, is_bf16, j, mask), scale, shift));
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
    }
    return top + logf(_mm512_reduce_add_ps(sum));
}

/* loss[r] = lse[r] - x[r][targets[r]], lse[r] = log(sum_j exp(x[r][j])). Returns 0, or 2 for a target outside
   [0, V). */
int cross_entropy_forward(long rows, int V, int is_bf16, int threads, const void *logits, long row_stride,
                          const int64_t *targets, float *loss, float *lse) {
    for (long r = 0; r < rows; r++)
        if (targets[r] < 0 || targets[r] >= V) return 2;
    const long element = is_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(threads < 1 ? 1 : threads)
    for (long r = 0; r < rows; r++) {
        const char *row = (const char *)logits + r * row_stride * element;
        const float total = row_logsumexp(row, is_bf16, V);
        const float target = is_bf16 ? _mm512_cvtss_f32(load_logits(row, 1, targets[r], 1))
                                     : ((const float *)row)[targets[r]];
        lse[r] = total, loss[r] = total - target;
    }
    return 0;
}

/* grad[r][j] = grad_loss[r] * (exp(x[r][j] - lse[r]) - (j == targets[r])), in the logits' dtype. */
int cross_entropy_backward(long rows, int V, int is_bf16, int threads, const void *logits, long row_stride,
                           const int64_t *targets, const float *lse, const float *grad_loss, void *grad,
                           long grad_row_stride) {
    const long element = is_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(threads < 1 ? 1 : threads)
    for (long r = 0; r < rows; r++) {
        const char *row = (const char *)logits + r * row_stride * element;
        char *out = (char *)grad + r * grad_row_stride * element;
        const __m512 shift = _mm512_set1_ps(lse[r] * LOG2E), scale = _mm512_set1_ps(LOG2E);
        const __m512 weight = _mm512_set1_ps(grad_loss[r]);
        const long target = targets[r];
        for (long j = 0; j < V; j += 16) {
            const __mmask16 mask = tail_mask(V - j);
            __m512 p = exp2_ps(_mm512_fmsub_ps(load_logits(row, is_bf16, j, mask), scale, shift));
            if (target >= j && target < j + 16) /* the one-hot target */
                p = _mm512_mask_sub_ps(p, (__mmask16)(1u << (target - j)), p, _mm512_set1_ps(1.0f));
            p = _mm512_mul_ps(p, weight);
            if (is_bf16) _mm256_mask_storeu_epi16((uint16_t *)out + j, mask, (__m256i)_mm512_cvtneps_pbh(p));
            else _mm512_mask_storeu_ps((float *)out + j, mask, p);
        }
    }
    return 0;
}
