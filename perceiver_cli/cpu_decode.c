/* One cached decoding step of Perceiver AR, the whole model in one call (x86 with AVX-512); fp32 arithmetic on
   fp32, bf16 or int8 weight matrices and fp32, bf16 or int8 key/value caches (bf16 values are widened as they are
   loaded; int8 ones widened and times their row's fp32 scale).
   With bf16 weights and Model.products_bf16 (batches, AVX512-BF16) the products' input rows are rounded to bf16
   too, and multiplied by vdpbf16ps.

   Why it exists: a cached step multiplies one to a few rows by every weight once, so it should run at the speed
   the memory streams the weights and caches. In PyTorch eager a step of the bench config is ~1,200 small ops
   (layer norms, rotary, views, softmax, 46 matrix products), each with microseconds of fixed cost: at batch 1
   that overhead, not the memory, set the speed (BENCHMARKS.md "Decode per-token overhead"). Here every thread
   runs the same step from start to end and the threads meet at a spin barrier between phases; each phase
   splits its work (output rows of a product, heads of the attention) between them.

   The step is generate.DecodeState.step: the newest token's embedding is the new latent; it attends through
   the cross-attention block to the cross-attention cache (keys/values of the window, the newest included:
   written by DecodeState.append_inputs, or with `append` by this step) and through each latent layer to that
   layer's cache, into which the step writes its own key and value at slot `num_latents`; then the final norm
   and the head give its logits. With Model.vocabulary, once the window is long enough, the cross-attention
   reads no cache: the same keys and values come from the projected vocabulary (attend_vocabulary).
   Pre-LayerNorm blocks (eps from the model), rotary on the first 2 * rotary_half dims of each head in
   half-split pairs, exact GELU, nn.Linear weights without biases, packed by cpu_decode.pack (below).
   Built by perceiver_cli/cpu_kernels.py with the system C compiler; no PyTorch headers. */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_simd.h"

#define MAX_THREADS 64

typedef struct {
    const float *norm_weight, *norm_bias; /* before the attention (the cross-attention block's norm_query) */
    const void *query, *key_value, *out; /* (D, D), (2D, D), (D, D), fp32 or bf16 (Model.weights_bf16) */
    const float *norm_mlp_weight, *norm_mlp_bias;
    const void *up, *down; /* (F, D), (D, F) */
    void *keys, *values;    /* this block's caches, fp32, bf16 (Model.caches_bf16) or int8 (Model.caches_int8) */
    long cache_strides[4];  /* batch, head, position, dim, in elements; rows: unit stride along dim */
} Block;

typedef struct {
    int batch, d_model, heads, head_dim, rotary_half, hidden, vocab, layers;
    int weights_bf16; /* the products' weights (not the embedding, norms or caches) are bf16: half the bytes */
    int caches_bf16;  /* the key/value caches are bf16: half the bytes a step reads from them (most, at batch 16) */
    int products_bf16; /* with bf16 weights: round each product's input rows to bf16 and multiply by vdpbf16ps
                          (AVX512-BF16; twice the multiply-adds per instruction, for batches that make the
                          products compute-bound) */
    float eps;
    const float *embedding, *final_weight, *final_bias;
    const void *head;
    const float *input_norm_weight, *input_norm_bias; /* the cross-attention block's norm of its inputs */
    const Block *blocks; /* the cross-attention block, then each latent layer */
    const double *inverse_frequencies; /* (rotary_half,): the rotary frequencies (model.rotary_tables') */
    int weights_int8; /* the products' weights are int8 with an fp32 scale per output row: a quarter of fp32's
                         bytes (after the older fields, so that builds without it read the same structure) */
    int caches_int8;  /* the key/value caches are int8: each cached row of head_dim values is followed by its
                         fp32 scale (head_dim + 4 bytes a row, cache_strides in bytes) */
    int products_amx; /* with products_bf16: multiply on AMX tiles (decode_request_amx must have succeeded) */
    /* Cross-attention from the projected vocabulary (attend_vocabulary); vocabulary NULL: always from the caches */
    const float *vocabulary; /* (vocab, 2D): each token's cross-attention key (before the rotary) and value */
    int vocabulary_from;     /* attend from `vocabulary` when the window holds at least this many positions */
    const float *rotary_cos, *rotary_sin; /* (rotary_positions, rotary_half): the tables of every position */
    long rotary_positions;
} Model;

typedef struct {
    const Model *m;
    const long *tokens;     /* the newest token of each row, at tokens[b * token_stride] */
    long token_stride;
    const float *cos, *sin; /* (rotary_half,): the newest position's rotary tables */
    int cross_length, num_latents, threads;
    int append; /* also compute the newest token's cross-attention key and value, into slot cross_length - 1 */
    float *logits;                                            /* (B, V) */
    float *hidden, *query, *key_value, *mixed, *up; /* shared, per row: D, D, 2D, D, F */
    long scores_length;
    uint16_t *rows_bf16[MAX_THREADS]; /* each thread's bf16 copy of a product's input rows (products_bf16) */
    __m512 *saved[MAX_THREADS]; /* each thread's accumulators of a product's passes between chunks (product) */
    uint32_t *columns_amx[MAX_THREADS]; /* each thread's bf16 input rows as AMX's right operand (products_amx) */
    long position;                      /* the newest token's: the window's slot t is position - cross_length + 1 + t */
    float *vocabulary_work[MAX_THREADS]; /* each thread's per-token tables of attend_vocabulary */
    /* Slots [0, shared) of every row's cross-attention cache / latent caches hold row 0's values (a batch of one
       prompt: generate.DecodeState.shared_rows): the rows read them from row 0, each slot once for a group of
       rows of a head (attend_cache_rows), instead of each row streaming its own copy from memory */
    long shared_cross, shared_latents;
} Step;

static void barrier(Step *s) {
    (void)s;
#pragma omp barrier
}

INLINE __m512 gelu_ps(__m512 x) {
    /* 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7) */
    __m512 z = _mm512_abs_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678f)));
    __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
    __m512 poly = _mm512_set1_ps(1.061405429f);
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
    poly = _mm512_mul_ps(poly, t);
    __m512 e = exp2_ps(_mm512_mul_ps(_mm512_mul_ps(z, z), _mm512_set1_ps(-1.44269504f)));
    __m512 erf_abs = _mm512_fnmadd_ps(poly, e, _mm512_set1_ps(1.0f));
    __m512 erf = _mm512_mask_sub_ps(erf_abs, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ),
                                    _mm512_setzero_ps(), erf_abs);
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(erf, _mm512_set1_ps(1.0f)));
}

/* 16 weights from element `at` of an fp32 or bf16 row, as fp32 (bf16 is the top half of an fp32) */
INLINE __m512 load_weights(const void *w, long at, int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)w + at);
    __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + at));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

/* 16 int8 values from `at`, as fp32 (int8 weights and caches, before their scale) */
INLINE __m512 load_int8(const void *at) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)at)));
}

/* The products' weights are packed (cpu_decode.pack): per group of four output rows, 64-byte blocks (16 fp32 or
   32 bf16 values) of the four rows in turn, the last group padded with zero rows. A bf16 block holds elements
   i..i+31 of its row as 16 pairs (i + k, i + 16 + k): its low halves widen to elements i..i+15 and its high
   halves to i+16..i+31, so the input rows pair with them unpermuted. A thread's share of a matrix is then one sequential stream. In the (out, in) layout the four rows of a group were
   four streams of 2-8 KB each, and the step's products read at ~80% of one big matvec when this VM's memory was
   fast, against ~95% packed (benchmarks/ab/matvec_shapes.c, BENCHMARKS.md "Packed weights"). */
#define GROUP_BYTES 256     /* one block of each of the four rows */
#define PREFETCH_BYTES 4096 /* how far ahead of its loads a single pass over the stream prefetches it into L2 */
#define CHUNK_BLOCKS 32     /* with several passes, a group is taken in chunks of this many blocks (8 KB) */

/* A pass over a chunk of a group, one of several (`chunked`, below): its accumulators come from `saved` unless
   it is the group's first chunk and go back there unless it is the last, where they are summed into y; with each
   block it prefetches `lines` cache lines from `prefetch` on into L2 (its share of the next group's chunk). */
typedef struct {
    __m512 *saved;
    int first, last;
    const char *prefetch;
    int lines;
} Chunk;

/* a pass's prefetches into L2 with one block: a single pass, the 256 bytes PREFETCH_BYTES past it; a chunked
   pass, its next lines of the next group */
INLINE void prefetch_block(int chunked, const char *block, Chunk *chunk) {
    if (!chunked)
        for (int line = 0; line < GROUP_BYTES; line += 64) _mm_prefetch(block + PREFETCH_BYTES + line, _MM_HINT_T1);
    else {
        for (int line = 0; line < chunk->lines; line++) _mm_prefetch(chunk->prefetch + 64 * line, _MM_HINT_T1);
        chunk->prefetch += 64 * chunk->lines;
    }
}

/* the accumulators at the start of a pass: zero, or where the pass over the group's previous chunk left them */
INLINE void begin(int R, __m512 acc[4][4], int chunked, Chunk chunk) {
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 4; j++)
            acc[r][j] = !chunked || chunk.first ? _mm512_setzero_ps() : chunk.saved[4 * r + j];
}

/* Element k: _mm512_reduce_add_ps(v[k]), by the same additions in the same order (GCC's: lanes i + (i + 8), then
   i + (i + 4) of those, i + (i + 2), and the last two), done for 16 vectors at once: 15 shuffle pairs and adds
   and a permutation instead of 16 reductions of 8 dependent steps each. */
INLINE __m512 reduce_16(const __m512 v[16]) {
    __m512 halves[8], quarters[4], pairs[2];
    for (int j = 0; j < 8; j++) /* vector 2j's 8 sums in the low half, 2j + 1's in the high half */
        halves[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int j = 0; j < 4; j++) /* vectors 4j .. 4j + 3, 4 sums each, one per 128-bit lane */
        quarters[j] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * j], halves[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(halves[2 * j], halves[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int j = 0; j < 2; j++) /* lane L: vectors 8j + L and 8j + 4 + L, 2 sums each */
        pairs[j] = _mm512_add_ps(_mm512_shuffle_ps(quarters[2 * j], quarters[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(quarters[2 * j], quarters[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* element 4L + e holds vector L + 4e */
    const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                      _mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, sums);
}

/* the accumulators at the end of a pass: kept for the next chunk, or summed into y (times the output rows'
   `scale`, int8 weights) */
INLINE void finish(int R, __m512 acc[4][4], float *y, long y_stride, int accumulate, int chunked, Chunk chunk,
                   const float *scale) {
    if (R == 4 && (!chunked || chunk.last)) { /* four rows of four sums: reduced together, row r in lane r */
        const __m512 sums = reduce_16(&acc[0][0]);
        const __m128 rows[4] = {_mm512_extractf32x4_ps(sums, 0), _mm512_extractf32x4_ps(sums, 1),
                                _mm512_extractf32x4_ps(sums, 2), _mm512_extractf32x4_ps(sums, 3)};
        for (int r = 0; r < 4; r++) {
            __m128 row = rows[r];
            if (scale) row = _mm_mul_ps(row, _mm_loadu_ps(scale));
            if (accumulate) row = _mm_add_ps(_mm_loadu_ps(y + r * y_stride), row);
            _mm_storeu_ps(y + r * y_stride, row);
        }
        return;
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 4; j++) {
            if (chunked && !chunk.last) {
                chunk.saved[4 * r + j] = acc[r][j];
                continue;
            }
            float sum = _mm512_reduce_add_ps(acc[r][j]);
            if (scale) sum *= scale[j];
            y[r * y_stride + j] = accumulate ? y[r * y_stride + j] + sum : sum;
        }
}

/* One packed group of four weight rows against `R` input rows: y[r][o] (+)= w_o . x[r]; each weight is read once
   for all R. `format` 0, fp32 weights: 16 values a block; 1, bf16: 32, widened to fp32 as they are loaded (the
   arithmetic stays fp32); 2, int8: 64, widened the same way, each output row's sum then times its `scale`.
   `chunked` (a constant at each call, so that each case is its own loop): 0, the single pass over a whole group,
   which streams the matrix and prefetches it PREFETCH_BYTES ahead; 1, a pass over one chunk of a group (Chunk).
   Past the end of the matrix the prefetches are hints to addresses that may not exist, which x86 ignores. */
INLINE void dot_rows(int R, int format, int chunked, const void *group, int in, const float *x, long x_stride,
                     float *y, long y_stride, int accumulate, Chunk chunk, const float *scale) {
    __m512 acc[4][4];
    begin(R, acc, chunked, chunk);
    const char *block = group;
    if (format == 2) {
        for (int i = 0; i < in; i += 64, block += GROUP_BYTES) {
            prefetch_block(chunked, block, &chunk);
            for (int k = 0; k < 4; k++) { /* values 16k..16k+15 of each of the four rows */
                __m512 w[4];
                for (int j = 0; j < 4; j++)
                    w[j] = load_int8(block + 64 * j + 16 * k);
                for (int r = 0; r < R; r++) {
                    __m512 xv = _mm512_loadu_ps(x + r * x_stride + i + 16 * k);
                    for (int j = 0; j < 4; j++) acc[r][j] = _mm512_fmadd_ps(w[j], xv, acc[r][j]);
                }
            }
        }
    } else if (format == 0) {
        for (int i = 0; i < in; i += 16, block += GROUP_BYTES) {
            prefetch_block(chunked, block, &chunk);
            const float *w = (const float *)block;
            __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
            __m512 w2 = _mm512_loadu_ps(w + 32), w3 = _mm512_loadu_ps(w + 48);
            for (int r = 0; r < R; r++) {
                __m512 xv = _mm512_loadu_ps(x + r * x_stride + i);
                acc[r][0] = _mm512_fmadd_ps(w0, xv, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(w1, xv, acc[r][1]);
                acc[r][2] = _mm512_fmadd_ps(w2, xv, acc[r][2]);
                acc[r][3] = _mm512_fmadd_ps(w3, xv, acc[r][3]);
            }
        }
    } else {
        for (int i = 0; i < in; i += 32, block += GROUP_BYTES) {
            prefetch_block(chunked, block, &chunk);
            __m512 low[4], high[4]; /* each row's 32 bf16 as two times 16 fp32 (bf16 is the top half of an fp32) */
            for (int j = 0; j < 4; j++) {
                __m512i pairs = _mm512_loadu_si512((const void *)(block + 64 * j));
                low[j] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
                high[j] = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32((int)0xFFFF0000)));
            }
            for (int r = 0; r < R; r++) {
                __m512 x_low = _mm512_loadu_ps(x + r * x_stride + i), x_high = _mm512_loadu_ps(x + r * x_stride + i + 16);
                for (int j = 0; j < 4; j++)
                    acc[r][j] = _mm512_fmadd_ps(high[j], x_high, _mm512_fmadd_ps(low[j], x_low, acc[r][j]));
            }
        }
    }
    finish(R, acc, y, y_stride, accumulate, chunked, chunk, format == 2 ? scale : NULL); /* NULL: a constant */
}

#define BF16_TARGET __attribute__((target("avx512bf16")))

/* dot_rows on bf16 pairs: one packed group of four bf16 weight rows against `R` input rows already rounded to
   bf16, 32 products a vdpbf16ps; fp32 sums */
BF16_TARGET INLINE void dot_pairs(int R, int chunked, const void *group, int in, const uint16_t *x, long x_stride,
                                  float *y, long y_stride, int accumulate, Chunk chunk) {
    __m512 acc[4][4];
    begin(R, acc, chunked, chunk);
    const char *block = group;
    for (int i = 0; i < in; i += 32, block += GROUP_BYTES) {
        prefetch_block(chunked, block, &chunk);
        __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)block);
        __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void *)(block + 64));
        __m512bh w2 = (__m512bh)_mm512_loadu_si512((const void *)(block + 128));
        __m512bh w3 = (__m512bh)_mm512_loadu_si512((const void *)(block + 192));
        for (int r = 0; r < R; r++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * x_stride + i);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, xv);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, xv);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], w2, xv);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], w3, xv);
        }
    }
    finish(R, acc, y, y_stride, accumulate, chunked, chunk, NULL);
}

#define ARGUMENTS group, in, x, x_stride, y, y_stride, accumulate, chunk

BF16_TARGET static void dot_pairs_rows(int R, int chunked, const void *group, int in, const uint16_t *x,
                                       long x_stride, float *y, long y_stride, int accumulate, Chunk chunk) {
    switch (R + 4 * chunked) { /* constants keep the accumulators in registers */
    case 4: dot_pairs(4, 0, ARGUMENTS); break;
    case 3: dot_pairs(3, 0, ARGUMENTS); break;
    case 2: dot_pairs(2, 0, ARGUMENTS); break;
    case 1: dot_pairs(1, 0, ARGUMENTS); break;
    case 8: dot_pairs(4, 1, ARGUMENTS); break;
    case 7: dot_pairs(3, 1, ARGUMENTS); break;
    case 6: dot_pairs(2, 1, ARGUMENTS); break;
    default: dot_pairs(1, 1, ARGUMENTS); break;
    }
}

#define DOT_ROWS(R, format, chunked) \
    case R + 4 * format + 12 * chunked: dot_rows(R, format, chunked, ARGUMENTS, scale); break;
#define DOT_ROWS_ANY_R(format, chunked) \
    DOT_ROWS(4, format, chunked) DOT_ROWS(3, format, chunked) DOT_ROWS(2, format, chunked) DOT_ROWS(1, format, chunked)

INLINE void dot_rows_any(int R, int format, int chunked, const void *group, int in, const float *x, long x_stride,
                         float *y, long y_stride, int accumulate, Chunk chunk, const float *scale) {
    switch (R + 4 * format + 12 * chunked) { /* constants keep the accumulators in registers */
        DOT_ROWS_ANY_R(0, 0) DOT_ROWS_ANY_R(1, 0) DOT_ROWS_ANY_R(2, 0)
        DOT_ROWS_ANY_R(0, 1) DOT_ROWS_ANY_R(1, 1) DOT_ROWS_ANY_R(2, 1)
    }
}

/* rows x (rows, in; stride x_stride) rounded to nearest even bf16 into `out` (rows, in), each block of 32 in the
   packed weights' pair order: (i + k, i + 16 + k) */
BF16_TARGET static void rows_to_bf16(const float *x, long x_stride, int rows, int in, uint16_t *out) {
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < in; i += 32) {
            __m512i low = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + r * x_stride + i)));
            __m512i high = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + r * x_stride + i + 16)));
            _mm512_storeu_si512(out + (long)r * in + i, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
        }
}

/* bytes of an int8 packed matrix's scales: one fp32 per output row, padded to whole groups and to 64 bytes */
static long int8_scale_bytes(int out) { return ((long)(out + 3) / 4 * 16 + 63) / 64 * 64; }

/* One pass of `product`: input rows b.. (up to four) against the group (or chunk of it) at `part`, `width` values
   of each row from column c on, into y's columns o..o+3 (`count` of them valid: a last group's padding rows go
   to a spare). */
INLINE void pass_rows(const Step *s, int chunked, const char *part, int width, int c, int in, const float *x,
                      long x_stride, const uint16_t *x16, float *y, long y_stride, int accumulate, int o, int count,
                      int b, Chunk chunk, const float *scale) {
    const int rows = s->m->batch - b < 4 ? s->m->batch - b : 4;
    float spare[4 * 4];
    float *target = count == 4 ? y + b * y_stride + o : spare;
    const long stride = count == 4 ? y_stride : 4;
    const int add = count == 4 && accumulate;
    if (s->m->products_bf16)
        dot_pairs_rows(rows, chunked, part, width, x16 + (long)b * in + c, in, target, stride, add, chunk);
    else
        dot_rows_any(rows, s->m->weights_int8 ? 2 : s->m->weights_bf16, chunked, part, width, x + b * x_stride + c,
                     x_stride, target, stride, add, chunk, scale);
    if (count < 4 && (!chunked || chunk.last))
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < count; j++) {
                float *at = y + (b + r) * y_stride + o + j;
                *at = accumulate ? *at + spare[4 * r + j] : spare[4 * r + j];
            }
}

/* AMX (Intel Sapphire Rapids and later) for products_amx. A packed bf16 group's 256-byte block holds four weight
   rows' 32 values in the pair order of rows_to_bf16, and consecutive groups lie group_bytes apart, so row j of
   16 consecutive groups loads as one 16-row left tile (stride group_bytes). The right tile is 16 input rows'
   same 32 values as 16 pairs by 16 rows (columns_amx), loaded once per block for the four left tiles. So one
   pass takes 16 groups (64 outputs) in four 16 x 16 tiles of sums (tiles 0-3; 4-6 take the weights in turn,
   7 the inputs); a thread's last few groups go the vdpbf16ps way. The configuration is loaded per thread and
   step, and released after it. */
#define AMX_GROUPS 16

/* 1 where the step may use AMX tiles: Linux granted the process their state (amx_request). */
int decode_request_amx(void) { return amx_request(); }

/* `rows` rows of x16 (rows_to_bf16's rows of `in` values) as 16 pairs by 16 rows per block of 32 values: word
   [i / 2 + k][r] is row r's pair k of the block at i (zeros past `rows`) */
static void amx_columns(const uint16_t *x16, int rows, int in, uint32_t *columns) {
    const uint32_t *words = (const uint32_t *)x16;
    for (int k = 0; k < in / 2; k++)
        for (int r = 0; r < 16; r++) columns[k * 16 + r] = r < rows ? words[(long)r * (in / 2) + k] : 0;
}

/* sums[j][g][r] = row j of group g (of the 16 from `first`) times input row r, over all `in` values */
AMX_TARGET static void amx_groups(const char *first, long group_bytes, int in, const uint32_t *columns, float *sums) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int i = 0; i < in; i += 32) {
        const char *block = first + (long)(i / 32) * GROUP_BYTES;
        _tile_loadd(7, columns + (long)(i / 2) * 16, 64);
        _tile_loadd(4, block, group_bytes);
        _tile_dpbf16ps(0, 4, 7);
        _tile_loadd(5, block + 64, group_bytes);
        _tile_dpbf16ps(1, 5, 7);
        _tile_loadd(6, block + 128, group_bytes);
        _tile_dpbf16ps(2, 6, 7);
        _tile_loadd(4, block + 192, group_bytes);
        _tile_dpbf16ps(3, 4, 7);
    }
    _tile_stored(0, sums, 64);
    _tile_stored(1, sums + 256, 64);
    _tile_stored(2, sums + 512, 64);
    _tile_stored(3, sums + 768, 64);
}

/* product's body on AMX for this thread's outputs [lo, hi) in whole passes of 16 groups, the batch 16 rows at a
   time; returns the first output it left to the vdpbf16ps loop */
static int amx_product(const Step *s, int id, const char *W, int out, int in, long group_bytes, int lo, int hi,
                       float *y, long y_stride, int accumulate) {
    const int end = hi < out ? hi : out, passes = ((end - lo + 3) / 4) / AMX_GROUPS;
    float sums[4 * AMX_GROUPS * 16]; /* [row j of a group][group][input row] */
    /* output 16 q + l of a pass is row l % 4 of group 4 q + l / 4: where each lane finds it in `sums` */
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512i from[4];
    for (int q = 0; q < 4; q++)
        from[q] = _mm512_add_epi32(_mm512_slli_epi32(_mm512_and_si512(lanes, _mm512_set1_epi32(3)), 8),
                                   _mm512_slli_epi32(_mm512_add_epi32(_mm512_set1_epi32(4 * q), _mm512_srli_epi32(lanes, 2)), 4));
    for (int b0 = 0; b0 < s->m->batch && passes; b0 += 16) {
        const int rows = s->m->batch - b0 < 16 ? s->m->batch - b0 : 16;
        amx_columns(s->rows_bf16[id] + (long)b0 * in, rows, in, s->columns_amx[id]);
        for (int pass = 0; pass < passes; pass++) {
            const int o = lo + 4 * AMX_GROUPS * pass;
            amx_groups(W + (long)(o / 4) * group_bytes, group_bytes, in, s->columns_amx[id], sums);
            for (int r = 0; r < rows; r++) /* each row's 64 outputs, gathered into order 16 at a time */
                for (int q = 0; q < 4 && o + 16 * q < out; q++) {
                    float *at = y + (long)(b0 + r) * y_stride + o + 16 * q;
                    const __mmask16 valid = tail_mask(out - (o + 16 * q));
                    __m512 value = _mm512_i32gather_ps(from[q], sums + r, 4);
                    if (accumulate) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(valid, at));
                    _mm512_mask_storeu_ps(at, valid, value);
                }
        }
    }
    return lo + 4 * AMX_GROUPS * passes;
}

/* y[b][lo:hi] (+)= W[lo:hi] x[b] for this thread's share [lo, hi) of the `out` rows of the packed W (out, in);
   with `gelu`, y[b][lo:hi] = GELU(W[lo:hi] x[b]) (the MLP's up-projection, so that no barrier separates the two).
   One pass over a group per four input rows. Up to four rows: a single pass streams the matrix and prefetches
   it as it goes. Several passes (batches) compute more than they load: the group is taken in chunks of
   CHUNK_BLOCKS blocks, each chunk by every pass in turn while it is in L1 (a pass keeps its accumulators between
   chunks: the same sums in the same order), and each of the first four passes over a chunk prefetches its share
   of the same chunk of the next group as it goes, so that the next group's loads are spread over the passes'
   arithmetic. Whole groups (32 KB for the MLP's down-projection, as much as L1 beside four input rows), with the
   next group prefetched by the first pass alone, left a batch-16 step's products ~20% slower (BENCHMARKS.md
   "Stop 29"). */
static void product(const Step *s, int id, const void *W, int out, int in, const float *x, long x_stride, float *y,
                    long y_stride, int accumulate, int gelu) {
    const int groups = (out + 3) / 4, lo = 4 * (int)((long)groups * id / s->threads);
    const int hi = 4 * (int)((long)groups * (id + 1) / s->threads);
    const int per_block = s->m->weights_int8 ? 64 : s->m->weights_bf16 ? 32 : 16; /* a row's values in one block */
    /* int8: the packed matrix starts with each (padded) output row's fp32 scale, then the blocks */
    const float *scales = s->m->weights_int8 ? (const float *)W : NULL;
    if (scales) W = (const char *)W + int8_scale_bytes(out);
    const long group_bytes = (long)in / per_block * GROUP_BYTES;
    /* the first (up to) four passes over a chunk prefetch the next group's chunk, in equal shares */
    const int passes = (s->m->batch + 3) / 4, sharers = passes < 4 ? passes : 4, lines = (4 + sharers - 1) / sharers;
    uint16_t *x16 = s->rows_bf16[id];
    if (s->m->products_bf16) rows_to_bf16(x, x_stride, s->m->batch, in, x16); /* each thread its own copy */
    const int first = s->m->products_amx ? amx_product(s, id, W, out, in, group_bytes, lo, hi, y, y_stride, accumulate) : lo;
    const Chunk whole = {s->saved[id], 1, 1, NULL, 0}; /* a single pass: the whole group at once */
    for (int o = first; o < hi && o < out; o += 4) {
        const int count = out - o < 4 ? out - o : 4; /* a last group padded with zero rows: its valid outputs */
        const char *group = (const char *)W + (long)(o / 4) * group_bytes;
        if (passes == 1) {
            pass_rows(s, 0, group, in, 0, in, x, x_stride, x16, y, y_stride, accumulate, o, count, 0, whole,
                      scales ? scales + o : NULL);
            continue;
        }
        for (int c = 0; c < in; c += CHUNK_BLOCKS * per_block) {
            const int width = in - c < CHUNK_BLOCKS * per_block ? in - c : CHUNK_BLOCKS * per_block;
            const char *part = group + (long)(c / per_block) * GROUP_BYTES;
            const long quarter = (long)width / per_block * GROUP_BYTES / 4; /* of the chunk's bytes */
            for (int b = 0; b < s->m->batch; b += 4) {
                const int index = b / 4;
                const Chunk chunk = {s->saved[id] + 16 * index, c == 0, c + width == in,
                                     part + group_bytes + index * quarter * lines, index < sharers ? lines : 0};
                pass_rows(s, 1, part, width, c, in, x, x_stride, x16, y, y_stride, accumulate, o, count, b, chunk,
                          scales ? scales + o : NULL);
            }
        }
    }
    for (int b = 0; gelu && b < s->m->batch; b++)
        for (int o = lo; o < hi && o < out; o += 16) {
            const __mmask16 mask = tail_mask((hi < out ? hi : out) - o);
            float *at = y + b * y_stride + o;
            _mm512_mask_storeu_ps(at, mask, gelu_ps(_mm512_maskz_loadu_ps(mask, at)));
        }
}

/* LayerNorm(x) of every row, by each thread into its own buffer: a few microseconds, and no barrier after it */
static void layer_norm(const Step *s, const float *x, const float *weight, const float *bias, float *y) {
    const int D = s->m->d_model;
    for (int b = 0; b < s->m->batch; b++) {
        const float *row = x + (long)b * D;
        __m512 sum = _mm512_setzero_ps();
        for (int i = 0; i < D; i += 16) sum = _mm512_add_ps(sum, _mm512_loadu_ps(row + i));
        const float mean = _mm512_reduce_add_ps(sum) / D;
        __m512 squares = _mm512_setzero_ps(), m = _mm512_set1_ps(mean);
        for (int i = 0; i < D; i += 16) {
            __m512 d = _mm512_sub_ps(_mm512_loadu_ps(row + i), m);
            squares = _mm512_fmadd_ps(d, d, squares);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / D + s->m->eps));
        for (int i = 0; i < D; i += 16) {
            __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row + i), m), inv);
            _mm512_storeu_ps(y + (long)b * D + i,
                             _mm512_fmadd_ps(d, _mm512_loadu_ps(weight + i), _mm512_loadu_ps(bias + i)));
        }
    }
}

static void rotate(const Step *s, float *x) {
    const int half = s->m->rotary_half;
    for (int i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[half + i];
        x[i] = x1 * s->cos[i] - x2 * s->sin[i];
        x[half + i] = x2 * s->cos[i] + x1 * s->sin[i];
    }
}

/* 16 cached values from element `at` of a cache of `format` 0 fp32, 1 bf16 or 2 int8 (unscaled), as fp32 */
INLINE __m512 load_cache(const void *cache, long at, int format) {
    return format < 2 ? load_weights(cache, at, format) : load_int8((const int8_t *)cache + at);
}

/* the scale of the int8 cache row starting at byte `at`: the fp32 after its D values */
INLINE float row_scale(const void *cache, long at, int D) {
    float scale;
    memcpy(&scale, (const char *)cache + at + D, sizeof scale);
    return scale;
}

/* scores[t] = exp(scores[t] - max) in place; returns 1 / their sum */
INLINE float exponentiate_scores(float *scores, long length) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (long t = 0; t < length; t += 16)
        top = _mm512_mask_max_ps(top, tail_mask(length - t), top, _mm512_maskz_loadu_ps(tail_mask(length - t), scores + t));
    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top)), log2e = _mm512_set1_ps(1.44269504f);
    __m512 total = _mm512_setzero_ps();
    for (long t = 0; t < length; t += 16) {
        __mmask16 m = tail_mask(length - t);
        __m512 p = exp2_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + t), shift), log2e));
        p = _mm512_maskz_mov_ps(m, p);
        _mm512_mask_storeu_ps(scores + t, m, p);
        total = _mm512_add_ps(total, p);
    }
    return 1.0f / _mm512_reduce_add_ps(total);
}

/* How far ahead of its loads the attention over a cache prefetches it. Without, its loops waited on each load's
   latency, too few loads in flight to draw the memory's bandwidth (perf: half of this function's samples on the
   first use of a loaded key or value); 2 KB ahead, batch-16 steps of the bench model ran 1,161-1,187 -> 1,273-1,348
   tokens/s with bf16 caches, 709-714 -> 725-750 with fp32 ones. Into L2 rather than L1 (T1): then perf put the
   stalls on the prefetches themselves, each holding one of the core's few L1 fill buffers until its line came;
   batch 16 3-5% faster again in three alternated rounds, batch 1 level (BENCHMARKS.md "Stop 36"). */
#define CACHE_PREFETCH_BYTES 2048

/* prefetch into L2 the cache row that starts CACHE_PREFETCH_BYTES after element `at` (of `element` bytes) */
INLINE void prefetch_ahead(const void *cache, long at, int element, long row_bytes) {
    const char *ahead = (const char *)cache + at * element + CACHE_PREFETCH_BYTES;
    for (long offset = 0; offset < row_bytes; offset += 64) _mm_prefetch(ahead + offset, _MM_HINT_T1);
}

/* One query per row over `length` cached keys and values, for the R rows b0 .. b0 + R - 1 of head h:
   out = softmax(q K^T / sqrt Dh) V. bf16 caches are widened to fp32 as they are loaded, like bf16 weights; int8
   ones are widened and each row's dot product (keys) or weight (values) times the row's scale. The first `shared`
   slots of every row's cache hold row 0's values (Step.shared_cross): each of those keys and values is loaded
   once for the R rows, from row 0, then each row's own slots follow. `scores`: R rows of `stride` floats.
   R * head_dim / 16 accumulators: R <= 4, and <= 2 from head_dim 128; one row and no shared slot where the rows'
   caches differ. */
INLINE void attend_cache_rows(const Step *s, const Block *block, int b0, int R, int h, long length, long shared,
                              float *scores, long stride, int format) {
    const Model *m = s->m;
    const int D = m->head_dim;
    const long *st = block->cache_strides;
    const float scale = 1.0f / sqrtf((float)D);
    const int element = format == 0 ? 4 : format == 1 ? 2 : 1;
    const long row_bytes = st[2] * element;
    const float *q[4];
    for (int r = 0; r < R; r++) q[r] = s->query + (long)(b0 + r) * m->d_model + h * D;
    for (long t = 0; t < shared; t++) { /* the shared keys, row 0's */
        const long at = h * st[1] + t * st[2];
        prefetch_ahead(block->keys, at, element, row_bytes);
        __m512 acc[4];
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 16) {
            const __m512 k = load_cache(block->keys, at + d, format);
            for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(k, _mm512_loadu_ps(q[r] + d), acc[r]);
        }
        const float factor = format == 2 ? row_scale(block->keys, at, D) * scale : scale;
        for (int r = 0; r < R; r++) scores[r * stride + t] = _mm512_reduce_add_ps(acc[r]) * factor;
    }
    float inverse[4];
    for (int r = 0; r < R; r++) { /* each row's own keys, then its softmax */
        const long own = (long)(b0 + r) * st[0] + h * st[1];
        for (long t = shared; t < length; t++) {
            const long at = own + t * st[2];
            prefetch_ahead(block->keys, at, element, row_bytes);
            __m512 acc = _mm512_setzero_ps();
            for (int d = 0; d < D; d += 16)
                acc = _mm512_fmadd_ps(load_cache(block->keys, at + d, format), _mm512_loadu_ps(q[r] + d), acc);
            scores[r * stride + t] = _mm512_reduce_add_ps(acc) * (format == 2 ? row_scale(block->keys, at, D) * scale : scale);
        }
        inverse[r] = exponentiate_scores(scores + r * stride, length);
    }
    __m512 acc[4][8]; /* out[r] += p[r][t] V[t] */
    for (int r = 0; r < R; r++)
        for (int c = 0; c < D / 16; c++) acc[r][c] = _mm512_setzero_ps();
    for (long t = 0; t < shared; t++) { /* the shared values, row 0's */
        const long at = h * st[1] + t * st[2];
        prefetch_ahead(block->values, at, element, row_bytes);
        const float factor = format == 2 ? row_scale(block->values, at, D) : 1.0f;
        __m512 p[4];
        for (int r = 0; r < R; r++) p[r] = _mm512_set1_ps(format == 2 ? scores[r * stride + t] * factor : scores[r * stride + t]);
        for (int c = 0; c < D / 16; c++) {
            const __m512 v = load_cache(block->values, at + 16 * c, format);
            for (int r = 0; r < R; r++) acc[r][c] = _mm512_fmadd_ps(p[r], v, acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++) { /* each row's own values */
        const long own = (long)(b0 + r) * st[0] + h * st[1];
        for (long t = shared; t < length; t++) {
            const long at = own + t * st[2];
            prefetch_ahead(block->values, at, element, row_bytes);
            const float *p = scores + r * stride + t;
            const __m512 pv = _mm512_set1_ps(format == 2 ? *p * row_scale(block->values, at, D) : *p);
            for (int c = 0; c < D / 16; c++)
                acc[r][c] = _mm512_fmadd_ps(pv, load_cache(block->values, at + 16 * c, format), acc[r][c]);
        }
        float *out = s->mixed + (long)(b0 + r) * m->d_model + h * D;
        for (int c = 0; c < D / 16; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[r][c], _mm512_set1_ps(inverse[r])));
    }
}

/* attend_cache_rows with R and the cache format constants, so that each case is its own loop */
static void attend_rows(const Step *s, const Block *block, int b0, int R, int h, long length, long shared,
                        float *scores, long stride) {
    const int format = s->m->caches_int8 ? 2 : s->m->caches_bf16 ? 1 : 0;
#define ROWS_CASE(rows, f)                                                                                        \
    case 3 * (rows) + (f): attend_cache_rows(s, block, b0, rows, h, length, shared, scores, stride, f); break;
    switch (3 * R + format) {
    ROWS_CASE(1, 0) ROWS_CASE(1, 1) ROWS_CASE(1, 2) ROWS_CASE(2, 0) ROWS_CASE(2, 1) ROWS_CASE(2, 2)
    ROWS_CASE(3, 0) ROWS_CASE(3, 1) ROWS_CASE(3, 2) ROWS_CASE(4, 0) ROWS_CASE(4, 1) ROWS_CASE(4, 2)
    }
#undef ROWS_CASE
}

/* whole vectors of 16 floats for n */
#define VECTORS(n) (((n) + 15) / 16 * 16)

/* Floats of attend_vocabulary's tables for one (row, head), per token: A and B of its rotated pairs (below; a
   vector of 16 for each 16 pairs), its score from the unrotated dims, its summed probability. */
static long vocabulary_work_floats(const Model *m) { return (long)m->vocab * (2 * VECTORS(m->rotary_half) + 2); }

/* One query over the window's `length` positions with their keys and values from the projected vocabulary
   (Model.vocabulary) instead of the caches. Window slot t holds token v at absolute position p: its key is
   row v's key rotated by p's angles, its value row v's value. With (x1, x2) a rotated pair of row v's key,
   (q1, q2) the query's and (c, s) the pair's cos and sin at p, the pair adds to the score
       q1 (x1 c - x2 s) + q2 (x2 c + x1 s) = c (q1 x1 + q2 x2) + s (q2 x1 - q1 x2) = c A[v] + s B[v],
   and A, B and the unrotated dims' dot product depend on the token alone. So each (row, head) first takes them
   for every token of the vocabulary, then a position costs two multiply-adds per 16 pairs, read from tables
   that stay in the caches, where the cache path streams its 2 x head_dim cached numbers from memory (a third of
   a batch-16 step's bytes); the output is the value rows weighted by each token's summed probability. */
static void attend_vocabulary(const Step *s, int b, int h, const float *q, long length, float *scores, float *out,
                              float *work) {
    const Model *m = s->m;
    const int D = m->d_model, Dh = m->head_dim, half = m->rotary_half, V = m->vocab, pairs = VECTORS(half);
    float *AB = work, *unrotated = work + (long)V * 2 * pairs, *summed = unrotated + V;
    float scaled[128]; /* the query times 1 / sqrt(Dh): the scores come out scaled */
    for (int d = 0; d < Dh; d++) scaled[d] = q[d] / sqrtf((float)Dh);
    for (int v = 0; v < V; v++) {
        const float *key = m->vocabulary + (long)v * 2 * D + (long)h * Dh;
        float *record = AB + (long)v * 2 * pairs;
        for (int i = 0; i < pairs; i += 16) {
            const __mmask16 mask = tail_mask(half - i);
            const __m512 x1 = _mm512_maskz_loadu_ps(mask, key + i), x2 = _mm512_maskz_loadu_ps(mask, key + half + i);
            const __m512 q1 = _mm512_maskz_loadu_ps(mask, scaled + i);
            const __m512 q2 = _mm512_maskz_loadu_ps(mask, scaled + half + i);
            _mm512_store_ps(record + i, _mm512_fmadd_ps(q1, x1, _mm512_mul_ps(q2, x2)));
            _mm512_store_ps(record + pairs + i, _mm512_fmsub_ps(q2, x1, _mm512_mul_ps(q1, x2)));
        }
        __m512 dot = _mm512_setzero_ps();
        for (int d = 2 * half; d < Dh; d += 16) {
            const __mmask16 mask = tail_mask(Dh - d);
            dot = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, key + d), _mm512_maskz_loadu_ps(mask, scaled + d), dot);
        }
        unrotated[v] = _mm512_reduce_add_ps(dot);
        summed[v] = 0.0f;
    }
    const long first = s->position - (length - 1); /* the window's first position, at slot 0 */
    const long *tokens = s->tokens + (long)b * s->token_stride - (length - 1);
    for (long t = 0; t < length; t++) {
        const long v = tokens[t];
        const float *record = AB + v * 2 * pairs;
        const float *cos = m->rotary_cos + (first + t) * half, *sin = m->rotary_sin + (first + t) * half;
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < pairs; i += 16) {
            const __mmask16 mask = tail_mask(half - i);
            acc = _mm512_fmadd_ps(_mm512_load_ps(record + i), _mm512_maskz_loadu_ps(mask, cos + i), acc);
            acc = _mm512_fmadd_ps(_mm512_load_ps(record + pairs + i), _mm512_maskz_loadu_ps(mask, sin + i), acc);
        }
        scores[t] = _mm512_reduce_add_ps(acc) + unrotated[v];
    }
    const float inverse = exponentiate_scores(scores, length);
    for (long t = 0; t < length; t++) summed[tokens[t]] += scores[t];
    __m512 acc[8]; /* out += summed[v] value[v] */
    for (int c = 0; c < Dh / 16; c++) acc[c] = _mm512_setzero_ps();
    for (int v = 0; v < V; v++) {
        if (summed[v] == 0.0f) continue; /* a token not in the window */
        const __m512 p = _mm512_set1_ps(summed[v]);
        const float *value = m->vocabulary + (long)v * 2 * D + D + (long)h * Dh;
        for (int c = 0; c < Dh / 16; c++) acc[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(value + 16 * c), acc[c]);
    }
    for (int c = 0; c < Dh / 16; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], _mm512_set1_ps(inverse)));
}

/* fp32 to bf16, rounding to nearest even as PyTorch's conversion does (the refills write bf16 caches that way) */
INLINE uint16_t to_bf16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

/* x (D floats) into an int8 cache row: each value over scale = max |x| / 127, rounded to nearest even, then the
   scale; the same operations, in the same fp32, as cpu_decode.quantize_int8 (the refills' writes) */
static void store_int8_row(char *row, const float *x, int D) {
    float largest = 0.0f;
    for (int d = 0; d < D; d++) largest = fabsf(x[d]) > largest ? fabsf(x[d]) : largest;
    const float scale = (largest > FLT_MIN ? largest : FLT_MIN) / 127.0f;
    for (int d = 0; d < D; d++) {
        const float v = nearbyintf(x[d] / scale);
        row[d] = (int8_t)(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
    }
    memcpy(row + D, &scale, sizeof scale);
}

/* this step's query of (row b, head h) rotated in place; its key and value rotated and written into the block's
   cache at `slot` */
static void prepare_row(Step *s, const Block *block, int b, int h, int write, long slot) {
    const Model *m = s->m;
    const int D = m->d_model, Dh = m->head_dim;
    rotate(s, s->query + (long)b * D + h * Dh);
    if (!write) return;
    float *key = s->key_value + (long)b * 2 * D + h * Dh, *value = key + D;
    rotate(s, key);
    const long *st = block->cache_strides, at = b * st[0] + h * st[1] + slot * st[2];
    if (m->caches_int8) {
        store_int8_row((char *)block->keys + at, key, Dh);
        store_int8_row((char *)block->values + at, value, Dh);
        return;
    }
    for (int d = 0; d < Dh; d++) {
        if (m->caches_bf16) {
            ((uint16_t *)block->keys)[at + d * st[3]] = to_bf16(key[d]);
            ((uint16_t *)block->values)[at + d * st[3]] = to_bf16(value[d]);
        } else {
            ((float *)block->keys)[at + d * st[3]] = key[d];
            ((float *)block->values)[at + d * st[3]] = value[d];
        }
    }
}

/* the attention part of a block for this thread's items, then its output projection. An item is one (row, head),
   or, where the rows share their first cache slots (Step.shared_cross), a group of rows of one head, which
   reads each shared slot once for the group (attend_cache_rows). `scores`: SHARED_GROUP rows of s->scores_length. */
#define SHARED_GROUP 4
static void attention_phase(Step *s, int id, const Block *block, int is_cross, float *scores) {
    const Model *m = s->m;
    const int D = m->d_model, Dh = m->head_dim;
    const long slot = is_cross ? s->cross_length - 1 : s->num_latents;
    const long length = is_cross ? s->cross_length : s->num_latents + 1;
    const int from_vocabulary = is_cross && m->vocabulary && length >= m->vocabulary_from;
    const long shared = from_vocabulary ? 0 : is_cross ? s->shared_cross : s->shared_latents;
    const int group = shared > 0 ? (Dh <= 64 ? SHARED_GROUP : 2) : 1; /* attend_cache_rows' accumulators */
    const int groups = (m->batch + group - 1) / group;
    float *work = s->vocabulary_work[id];
    for (int item = id; item < groups * m->heads; item += s->threads) {
        const int b0 = item / m->heads * group, h = item % m->heads;
        const int rows = m->batch - b0 < group ? m->batch - b0 : group;
        for (int b = b0; b < b0 + rows; b++) prepare_row(s, block, b, h, !is_cross || s->append, slot);
        if (from_vocabulary) attend_vocabulary(s, b0, h, s->query + (long)b0 * D + h * Dh, length, scores,
                                               s->mixed + (long)b0 * D + h * Dh, work);
        else attend_rows(s, block, b0, rows, h, length, shared, scores, s->scores_length);
    }
    barrier(s);
    product(s, id, block->out, D, D, s->mixed, D, s->hidden, D, 1, 0); /* hidden += W_out mixed */
    barrier(s);
}

static void mlp_phase(Step *s, int id, const Block *block, float *normed) {
    const int D = s->m->d_model, F = s->m->hidden;
    layer_norm(s, s->hidden, block->norm_mlp_weight, block->norm_mlp_bias, normed);
    product(s, id, block->up, F, D, normed, D, s->up, F, 0, 1); /* up = GELU(W_up normed) */
    barrier(s);
    product(s, id, block->down, D, F, s->up, F, s->hidden, D, 1, 0); /* hidden += W_down up */
    barrier(s);
}

static void run_step(Step *s, int id) {
    const Model *m = s->m;
    const int D = m->d_model;
    float *scores = aligned_alloc(64, sizeof(float) * s->scores_length * SHARED_GROUP);
    float *normed = aligned_alloc(64, sizeof(float) * m->batch * D);
    s->rows_bf16[id] = m->products_bf16 ? aligned_alloc(64, sizeof(uint16_t) * m->batch * (m->hidden > D ? m->hidden : D)) : NULL;
    s->saved[id] = aligned_alloc(64, sizeof(__m512) * 16 * ((m->batch + 3) / 4));
    s->columns_amx[id] = m->products_amx ? aligned_alloc(64, sizeof(uint32_t) * 8 * (m->hidden > D ? m->hidden : D)) : NULL;
    s->vocabulary_work[id] = m->vocabulary ? aligned_alloc(64, (sizeof(float) * vocabulary_work_floats(m) + 63) / 64 * 64) : NULL;
    if (m->products_amx) amx_begin();
    for (int b = id; b < m->batch; b += s->threads)
        memcpy(s->hidden + (long)b * D, m->embedding + s->tokens[b * s->token_stride] * D, sizeof(float) * D);
    barrier(s);
    for (int index = 0; index <= m->layers; index++) {
        const Block *block = &m->blocks[index];
        const int is_cross = index == 0;
        layer_norm(s, s->hidden, block->norm_weight, block->norm_bias, normed);
        product(s, id, block->query, D, D, normed, D, s->query, D, 0, 0);
        if (!is_cross) product(s, id, block->key_value, 2 * D, D, normed, D, s->key_value, 2 * D, 0, 0);
        if (is_cross && s->append && m->vocabulary) { /* the newest token's key (unrotated) and value: its row */
            for (int b = id; b < m->batch; b += s->threads)
                memcpy(s->key_value + (long)b * 2 * D, m->vocabulary + s->tokens[b * s->token_stride] * 2 * D,
                       sizeof(float) * 2 * D);
        } else if (is_cross && s->append) { /* the newest token as an input: LayerNorm of its embedding, keys, values */
            layer_norm(s, s->hidden, m->input_norm_weight, m->input_norm_bias, normed);
            product(s, id, block->key_value, 2 * D, D, normed, D, s->key_value, 2 * D, 0, 0);
        }
        barrier(s);
        attention_phase(s, id, block, is_cross, scores);
        mlp_phase(s, id, block, normed);
    }
    layer_norm(s, s->hidden, m->final_weight, m->final_bias, normed);
    product(s, id, m->head, m->vocab, D, normed, D, s->logits, m->vocab, 0, 0);
    if (m->products_amx) amx_end();
    free(scores), free(normed), free(s->rows_bf16[id]), free(s->saved[id]), free(s->columns_amx[id]);
    free(s->vocabulary_work[id]);
}

/* Bytes of the workspace f32_decode_step needs. */
long f32_decode_workspace(const Model *m) {
    return sizeof(float) * (long)m->batch * (5L * m->d_model + m->hidden);
}

/* Returns 0 on success, 1 for unsupported sizes. `workspace` holds f32_decode_workspace(m) bytes. The first
   `shared_cross` slots of the cross-attention cache and `shared_latents` of the latent caches hold the same values
   in every row (Step.shared_cross): 0 where the rows' caches may differ. */
int f32_decode_step(const Model *m, const long *tokens, long token_stride, long position, int cross_length,
                    int num_latents, int append, int threads, float *logits, float *workspace, int shared_cross,
                    int shared_latents) {
    if (m->d_model % 16 || m->hidden % 16 || m->head_dim % 16 || m->head_dim > 128 || cross_length < 1) return 1;
    if (m->weights_bf16 && (m->d_model % 32 || m->hidden % 32)) return 1; /* bf16 blocks of 32 */
    if (m->weights_int8 && (m->d_model % 64 || m->hidden % 64 || m->weights_bf16)) return 1; /* int8: of 64 */
    if (m->products_bf16 && !m->weights_bf16) return 1;
    if (m->products_amx && !m->products_bf16) return 1;
    /* the position's rotary tables, in double and then rounded, as model.rotary_tables computes them */
    float cos_table[64], sin_table[64];
    if (m->rotary_half > 64) return 1;
    if (m->vocabulary && (position >= m->rotary_positions || cross_length > position + 1)) return 1;
    for (int i = 0; i < m->rotary_half; i++) {
        cos_table[i] = (float)cos((double)position * m->inverse_frequencies[i]);
        sin_table[i] = (float)sin((double)position * m->inverse_frequencies[i]);
    }
    Step s = {m, tokens, token_stride, cos_table, sin_table, cross_length, num_latents, threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads,
              append};
    const long B = m->batch, D = m->d_model;
    s.logits = logits, s.position = position;
    /* never the newest slot, each row's own token (cross) or latent */
    s.shared_cross = shared_cross < 0 ? 0 : shared_cross < cross_length ? shared_cross : cross_length - 1;
    s.shared_latents = shared_latents < 0 ? 0 : shared_latents < num_latents ? shared_latents : num_latents;
    s.hidden = workspace, s.query = s.hidden + B * D, s.key_value = s.query + B * D;
    s.mixed = s.key_value + 2 * B * D, s.up = s.mixed + B * D;
    s.scores_length = ((cross_length > num_latents + 1 ? cross_length : num_latents + 1) + 15) / 16 * 16;
    /* OpenMP from the runtime PyTorch already loaded (libgomp, matched by its soname): the threads PyTorch's
       last op left spinning take this work at once instead of competing with threads of our own */
#pragma omp parallel num_threads(s.threads)
    {
#pragma omp single
        s.threads = omp_get_num_threads();
        run_step(&s, omp_get_thread_num());
    }
    return 0;
}

/* y (rows, out) = x (rows, in) W^T with the step's own product, W (out, in) fp32 packed by cpu_decode.pack: lets
   `perceiver bench --efficiency` measure the streaming bandwidth with every matvec kernel a step may use. */
int f32_matvec(const float *W, int out, int in, const float *x, int rows, float *y, int threads) {
    if (in % 16 || rows < 1) return 1;
    Model m = {0};
    m.batch = rows;
    Step s = {&m};
    s.threads = threads < 1 ? 1 : threads;
#pragma omp parallel num_threads(s.threads)
    {
#pragma omp single
        s.threads = omp_get_num_threads();
        const int id = omp_get_thread_num();
        s.saved[id] = aligned_alloc(64, sizeof(__m512) * 16 * ((rows + 3) / 4));
        product(&s, id, W, out, in, x, in, y, out, 0, 0);
        free(s.saved[id]);
    }
    return 0;
}
