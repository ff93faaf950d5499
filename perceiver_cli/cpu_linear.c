/* bf16 linear layers, y = x W^T, on AMX tiles (Intel Sapphire Rapids and later), with the weights packed once.

   Why it exists: under bf16 autocast a 16k prefill of the bench model spent 20 ms of its ~140 in the nine MLP
   down projections (1,024 x 2,048 -> 512), which oneDNN runs at ~1 TFLOP/s in the model against the ~2.9 of its
   square GEMMs, 8 ms in their GELUs, and 11 ms casting every weight to bf16 again on every call
   (BENCHMARKS.md "Stop 34"). Here the weights are packed once into tdpbf16ps's right-operand layout, the input
   is read in fp32 or bf16 (an fp32 input is rounded to bf16 block by block, as autocast would round it whole),
   the sums stay in fp32 tiles over the whole depth K, and the epilogue applies the activation (exact GELU) to
   the fp32 sums before the one rounding to bf16. Two more passes over memory fold in where the model has them:
   the LayerNorm before a projection is applied to each row as it is read (no normed copy of the input), and the
   residual add after the attention's output projection and the MLP's down projection is made on the fp32 sums
   (the result is the fp32 residual stream itself, with no bf16 rounding of the projection in between); and the
   rotary position of the query and key projections is applied to the fp32 sums (the heads' first 32 columns).

   Layout (struct Linear below): x (M, K) with unit stride along K and `x_row_stride` elements between rows; W
   (N, K) likewise; out (M, N) and the residual likewise. K a multiple of 32. Packed weights: for each block of 16 output columns c, K/2 rows of
   16 column pairs, packed[(c * K/2 + k/2) * 32 + (n % 16) * 2 + k % 2] = W[16 c + n % 16][k], columns past N
   zero, N rounded up to 32.

   Work: items of 32 rows (two 16-row tiles) by a group of columns whose packed weights fit in ~1 MB of L2; a
   thread takes a run of consecutive items, so it keeps one group of weights in L2 while the rows stream past.
   Each 32 x 32 block of the output is four fp32 tiles over the whole K (two left tiles, two right: all eight
   tile registers). */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_simd.h"

typedef uint16_t bf16;

#define ROWS 32             /* rows of x per work item: two tiles of 16 */
#define COLUMNS 32          /* output columns per block: two tiles of 16 */
#define GROUP_BYTES (1 << 20) /* packed weights of one item's column group */

enum { NO_ACTIVATION = 0, GELU = 1 };

/* fp32 to bf16, rounding to nearest even (as PyTorch's casts do); NaN stays NaN */
static inline bf16 round_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    if ((bits & 0x7fffffff) > 0x7f800000) return (bf16)((bits >> 16) | 0x40);
    bits += 0x7fff + ((bits >> 16) & 1);
    return (bf16)(bits >> 16);
}

static inline float widen(const void *at, int is_bf16, long index) {
    if (!is_bf16) return ((const float *)at)[index];
    uint32_t bits = (uint32_t)((const bf16 *)at)[index] << 16;
    float value;
    memcpy(&value, &bits, 4);
    return value;
}

static long padded_columns(int N) { return (N + COLUMNS - 1) / COLUMNS * COLUMNS; }

/* bf16 elements of the packed weights of an (N, K) matrix */
long linear_packed_size(int N, int K) { return padded_columns(N) * K; }

/* 1 where this process may use AMX (Linux grants the tile state; cpu_simd.h) */
int linear_available(void) { return amx_request(); }

/* Packs W (N, K), fp32 or bf16, as the layout above. Returns 0, or 1 where K is not a multiple of 32. */
int linear_pack(int N, int K, const void *W, int w_is_bf16, long w_row_stride, bf16 *packed, int threads) {
    if (K % 32) return 1;
    const long blocks = padded_columns(N) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long c = 0; c < blocks; c++) {
        bf16 *block = packed + c * K * 16;
        for (int n = 0; n < 16; n++) {
            const long column = c * 16 + n;
            const char *row = (const char *)W + column * w_row_stride * (w_is_bf16 ? 2 : 4);
            for (int k = 0; k < K; k++)
                block[(k / 2) * 32 + n * 2 + k % 2] = column < N ? round_bf16(widen(row, w_is_bf16, k)) : 0;
        }
    }
    return 0;
}

/* 0.5 x (1 + erf(x / sqrt 2)) to ~1e-4 relative, for a result rounded to bf16 (half an ulp: 2e-3): erf by
   Abramowitz and Stegun 7.1.25 (absolute error <= 2.5e-5) with a 14-bit reciprocal and the cubic 2^x. For x < 0,
   1 + erf is the polynomial's small tail itself, not a difference of two numbers near 1. */
INLINE __m512 gelu_bf16_ps(__m512 x) {
    const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678f));
    const __m512 t = _mm512_rcp14_ps(_mm512_fmadd_ps(z, _mm512_set1_ps(0.47047f), _mm512_set1_ps(1.0f)));
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.7478556f), t, _mm512_set1_ps(-0.0958798f));
    p = _mm512_mul_ps(_mm512_fmadd_ps(p, t, _mm512_set1_ps(0.3480242f)), t);
    /* tail = 1 - erf(z) = p exp(-z^2) */
    const __m512 minus_z2_log2e = _mm512_mul_ps(_mm512_mul_ps(z, z), _mm512_set1_ps(-1.44269504f));
    const __m512 tail = _mm512_mul_ps(p, exp2_bf16_ps(minus_z2_log2e));
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 one_plus_erf = _mm512_mask_mov_ps(_mm512_sub_ps(_mm512_set1_ps(2.0f), tail), negative, tail);
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), one_plus_erf);
}

/* One call's operands. x (M, K) fp32 or bf16 with unit stride along K; out (M, N) likewise; the optional parts
   are NULL when unused. */
typedef struct {
    long M;
    int N, K;
    const void *x;
    int x_is_bf16;
    long x_row_stride;
    const int64_t *rows; /* input row r is x's row rows[r] (an embedding lookup), or NULL: row r */
    const float *norm_weight, *norm_bias; /* a LayerNorm applied to each row of x as it is read */
    float norm_eps;
    const bf16 *packed; /* W, by linear_pack */
    void *out;
    int out_is_bf16;
    long out_row_stride;
    const float *residual; /* fp32 rows added to the result (the residual stream) */
    long residual_row_stride;
    /* rotary position (model.apply_rotary) on the output's first rotary_columns: each head of head_dim columns
       rotates its first 32 in half-split pairs (j, j + 16) by the angles of output row r's position, whose cos and
       sin are row r % rotary_rows of the fp32 tables (rotary_rows x 16); head_dim a multiple of 32 */
    const float *rotary_cos, *rotary_sin;
    long rotary_rows, rotary_columns;
    int head_dim;
    int activation, threads;
} Linear;

/* x's row as bf16 in `to`, through the LayerNorm where there is one (fp32 statistics, two passes as PyTorch's) */
static void gather_row(const Linear *job, long row, bf16 *to) {
    const int K = job->K, is_bf16 = job->x_is_bf16;
    if (job->rows) row = job->rows[row];
    const char *from = (const char *)job->x + row * job->x_row_stride * (is_bf16 ? 2 : 4);
    if (!job->norm_weight && is_bf16) {
        memcpy(to, from, (size_t)K * 2);
        return;
    }
    __m512 shift = _mm512_setzero_ps(), scale = _mm512_set1_ps(1.0f);
    if (job->norm_weight) {
        __m512 sum = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16) sum = _mm512_add_ps(sum, load_widened(from + k * (is_bf16 ? 2 : 4), is_bf16, 0xFFFF));
        shift = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / K);
        __m512 squares = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16) {
            const __m512 centred = _mm512_sub_ps(load_widened(from + k * (is_bf16 ? 2 : 4), is_bf16, 0xFFFF), shift);
            squares = _mm512_fmadd_ps(centred, centred, squares);
        }
        scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / K + job->norm_eps));
    }
    for (int k = 0; k < K; k += 32) {
        __m512 low = load_widened(from + k * (is_bf16 ? 2 : 4), is_bf16, 0xFFFF);
        __m512 high = load_widened(from + (k + 16) * (is_bf16 ? 2 : 4), is_bf16, 0xFFFF);
        if (job->norm_weight) {
            low = _mm512_mul_ps(_mm512_sub_ps(low, shift), scale);
            high = _mm512_mul_ps(_mm512_sub_ps(high, shift), scale);
            low = _mm512_fmadd_ps(low, _mm512_loadu_ps(job->norm_weight + k), _mm512_loadu_ps(job->norm_bias + k));
            high = _mm512_fmadd_ps(high, _mm512_loadu_ps(job->norm_weight + k + 16),
                                   _mm512_loadu_ps(job->norm_bias + k + 16));
        }
        _mm512_storeu_si512(to + k, (__m512i)_mm512_cvtne2ps_pbh(high, low));
    }
}

/* the 32 x 32 fp32 block `sums` (rows 128 bytes apart) of output rows row0.. and columns column0.. through the
   activation and the residual into out */
static void finish_block(const Linear *job, const float *sums, int rows, int columns, long row0, long column0) {
    for (int r = 0; r < rows; r++) {
        __m512 low = _mm512_load_ps(sums + r * COLUMNS), high = _mm512_load_ps(sums + r * COLUMNS + 16);
        if (job->activation == GELU) low = gelu_bf16_ps(low), high = gelu_bf16_ps(high);
        if (job->rotary_cos && column0 < job->rotary_columns && column0 % job->head_dim == 0) {
            /* a head's first 32 columns: low holds x1, high x2 of the rotated pairs */
            const long position = (row0 + r) % job->rotary_rows;
            const __m512 c = _mm512_loadu_ps(job->rotary_cos + position * 16);
            const __m512 s = _mm512_loadu_ps(job->rotary_sin + position * 16);
            const __m512 x1 = low;
            low = _mm512_fmsub_ps(x1, c, _mm512_mul_ps(high, s));
            high = _mm512_fmadd_ps(high, c, _mm512_mul_ps(x1, s));
        }
        const __mmask16 low_mask = tail_mask(columns), high_mask = columns > 16 ? tail_mask(columns - 16) : 0;
        if (job->residual) {
            const float *residual = job->residual + (row0 + r) * job->residual_row_stride + column0;
            low = _mm512_add_ps(low, _mm512_maskz_loadu_ps(low_mask, residual));
            high = _mm512_add_ps(high, _mm512_maskz_loadu_ps(high_mask, residual + 16));
        }
        const long at = (row0 + r) * job->out_row_stride + column0;
        if (job->out_is_bf16 && columns == COLUMNS) { /* one 64-byte store */
            _mm512_storeu_si512((bf16 *)job->out + at, (__m512i)_mm512_cvtne2ps_pbh(high, low));
        } else if (job->out_is_bf16) {
            _mm256_mask_storeu_epi16((bf16 *)job->out + at, low_mask, (__m256i)_mm512_cvtneps_pbh(low));
            _mm256_mask_storeu_epi16((bf16 *)job->out + at + 16, high_mask, (__m256i)_mm512_cvtneps_pbh(high));
        } else {
            _mm512_mask_storeu_ps((float *)job->out + at, low_mask, low);
            _mm512_mask_storeu_ps((float *)job->out + at + 16, high_mask, high);
        }
    }
}

/* out = activation(norm(x) W^T) + residual (see Linear). Returns 0, 1 where K is not a multiple of 32, 2 where a
   buffer could not be allocated. */
int linear_forward(const Linear *job) {
    const long M = job->M;
    const int N = job->N, K = job->K;
    if (K % 32) return 1;
    const long padded = padded_columns(N);
    /* the fewest groups of at most GROUP_BYTES of packed weights, equal to a block, so that threads get equal work */
    const long most = GROUP_BYTES / (2L * K) / COLUMNS * COLUMNS;
    const long groups = most < COLUMNS ? padded / COLUMNS : (padded + most - 1) / most;
    const long group = (padded / COLUMNS + groups - 1) / groups * COLUMNS;
    const long row_blocks = (M + ROWS - 1) / ROWS, items = row_blocks * groups;
    /* rows of x straight into the tiles where they are bf16 and need no norm; else gathered 32 at a time */
    const int direct = job->x_is_bf16 && !job->norm_weight && !job->rows;
    int failed = 0;
#pragma omp parallel num_threads(job->threads) reduction(| : failed)
    {
        const int thread = omp_get_thread_num(), count = omp_get_num_threads();
        bf16 *buffer = aligned_alloc(64, (size_t)ROWS * K * 2);
        float sums[ROWS * COLUMNS] __attribute__((aligned(64)));
        if (!buffer) failed = 1;
        const long first = items * thread / count, last = items * (thread + 1) / count;
        const unsigned csr = flush_denormals_begin(); /* exp2_bf16_ps's denormals (GELU of x < -13) */
        if (buffer) amx_begin();
        for (long item = first; buffer && item < last; item++) {
            const long g = item / row_blocks, row0 = (item % row_blocks) * ROWS; /* one group's rows in a run */
            const int rows = M - row0 < ROWS ? (int)(M - row0) : ROWS;
            const bf16 *left = buffer;
            long left_stride = 2L * K; /* bytes between rows of the left operand */
            if (direct && rows == ROWS) {
                left = (const bf16 *)job->x + row0 * job->x_row_stride, left_stride = 2 * job->x_row_stride;
            } else {
                for (int r = 0; r < ROWS; r++)
                    if (r < rows) gather_row(job, row0 + r, buffer + (long)r * K);
                    else memset(buffer + (long)r * K, 0, (size_t)K * 2); /* whole tiles: zeros past the last row */
            }
            const long column_end = (g + 1) * group < padded ? (g + 1) * group : padded;
            for (long column0 = g * group; column0 < column_end; column0 += COLUMNS) {
                const bf16 *right0 = job->packed + column0 * K, *right1 = right0 + 16L * K;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int k = 0; k < K; k += 32) {
                    _tile_loadd(4, left + k, left_stride);
                    _tile_loadd(5, (const char *)(left + k) + 16 * left_stride, left_stride);
                    _tile_loadd(6, right0 + 16L * k, 64);
                    _tile_loadd(7, right1 + 16L * k, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
                _tile_stored(0, sums, 4 * COLUMNS);
                _tile_stored(1, sums + 16, 4 * COLUMNS);
                _tile_stored(2, sums + 16 * COLUMNS, 4 * COLUMNS);
                _tile_stored(3, sums + 16 * COLUMNS + 16, 4 * COLUMNS);
                const int columns = N - column0 < COLUMNS ? (int)(N - column0) : COLUMNS;
                if (columns > 0) finish_block(job, sums, rows, columns, row0, column0);
            }
        }
        if (buffer) amx_end();
        flush_denormals_end(csr);
        free(buffer);
    }
    return failed ? 2 : 0;
}
