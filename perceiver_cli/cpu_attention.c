/* Flash attention in bf16 for x86 CPUs with AVX512-BF16: the forward pass, and the backward pass for training.

   Why it exists: PyTorch's CPU flash kernel runs bf16 at about 1.1x its fp32 speed on a CPU without AMX, so a bf16
   prefill spends two-thirds of its time in attention while its projections run at 85% of the bf16 GEMM peak
   (BENCHMARKS.md "bf16 prefill on the CPU"). This kernel computes both products of each tile with vdpbf16ps
   (bf16 pairs, fp32 sums), keeps the online softmax of FlashAttention (Dao et al. 2022) in fp32 registers and
   L1/L2-sized buffers, and never writes a score matrix to memory.

   Layout: q (n, D), k and v (Tk, D) per (batch, head), unit stride along D, any other strides. Query i of n sees
   keys [0, i + Tk - n] when causal (the bottom-right alignment Perceiver AR needs), all keys otherwise.
   Before the queries run, each head's keys and values are repacked once into the pair-interleaved layouts
   vdpbf16ps reads: K as [key block][D/2][KEY_BLOCK] 32-bit pairs along D, V as [key block][KEY_BLOCK/2][D] pairs
   of consecutive keys. Built by perceiver_cli/cpu_kernels.py with the system C compiler; no PyTorch headers.

   On CPUs with AMX (Intel Sapphire Rapids and later) the products of both passes run on AMX tiles instead
   (`attention_use_amx`): those packed layouts are already the pair-interleaved ("VNNI") right operands tdpbf16ps
   takes, so mainly the multiplication changes; the softmax stays in AVX-512.
*/
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_simd.h"

typedef uint16_t bf16;

#define KEY_BLOCK 64    /* keys per tile: four 16-lane vectors */
#define QUERY_BLOCK 96  /* queries per work item; a multiple of every row tile below */
#define AMX_QUERY_BLOCK 1056 /* the most queries of an item on AMX tiles (item_rows): each item reads its head's
                               keys and values once, so larger items read them fewer times (a multiple of 48:
                               whole 16-row tiles, and 6-row fp32 tiles where fp32 uses the buffers) */
#define LONG_QUERY_BLOCK 192 /* queries per item in fp32 over long keys (a multiple of 16 and of 6) */
#define LONG_KEYS 4096      /* fp32 takes LONG_QUERY_BLOCK from this many keys: over 1,024 keys the smaller items
                               balance the two threads better (4.0 against 4.2 ms), over 16k the larger read the
                               keys and values half as often (101 against 107 ms); items of up to 528 as on AMX
                               were no faster in fp32 (prefill 0.4056 against 0.4123 s median, 1 of 4 rounds) */
#define MAX_SLACK 8.0f      /* a row's running maximum moves only when a score exceeds it by this much (log2 units):
                               probabilities then reach 2^8 at most, harmless in fp32 sums, and most key blocks
                               need no horizontal maximum and no rescaling */
#define AMX_KEYS 128        /* keys per softmax step of the AMX forward: two packed blocks */
#define AMX_QUERY_TILE 64   /* queries per tile of a backward item on AMX: four tiles of 16 rows, two 32-query
                               steps of the products over keys */
#define ACCUMULATORS 24 /* zmm registers kept as accumulators (of 32) */

INLINE __m512bh pair_broadcast(const bf16 *at) { return (__m512bh)_mm512_set1_epi32(*(const int32_t *)at); }

/* scores[r][0:KEY_BLOCK] = scale * q[r] . k_packed for `rows` query rows (rows * 4 accumulators) */
INLINE void score_tile(int rows, int D, const bf16 *q, long q_row, const uint32_t *k_packed, float *scores,
                       __m512 scale) {
    __m512 acc[6][4];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int pair = 0; pair < D / 2; pair++) {
        const uint32_t *kp = k_packed + (long)pair * KEY_BLOCK;
        __m512bh k0 = (__m512bh)_mm512_loadu_si512(kp), k1 = (__m512bh)_mm512_loadu_si512(kp + 16);
        __m512bh k2 = (__m512bh)_mm512_loadu_si512(kp + 32), k3 = (__m512bh)_mm512_loadu_si512(kp + 48);
        for (int r = 0; r < rows; r++) {
            __m512bh qr = pair_broadcast(q + r * q_row + 2 * pair);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qr, k0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qr, k1);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], qr, k2);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], qr, k3);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(scores + r * KEY_BLOCK + 16 * c, _mm512_mul_ps(acc[r][c], scale));
}

/* out[r][0:D] += probs[r] . v_packed for `rows` rows (rows * D/16 accumulators) */
INLINE void value_tile(int rows, int D, const bf16 *probs, const uint32_t *v_packed, float *out) {
    __m512 acc[6][8];
    const int vectors = D / 16;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < vectors; c++) acc[r][c] = _mm512_loadu_ps(out + r * D + 16 * c);
    for (int pair = 0; pair < KEY_BLOCK / 2; pair++) {
        const uint32_t *vp = v_packed + (long)pair * D;
        for (int r = 0; r < rows; r++) {
            __m512bh pr = pair_broadcast(probs + r * KEY_BLOCK + 2 * pair);
            for (int c = 0; c < vectors; c++)
                acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pr, (__m512bh)_mm512_loadu_si512(vp + 16 * c));
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < vectors; c++) _mm512_storeu_ps(out + r * D + 16 * c, acc[r][c]);
}

/* fp32 (FMA) versions of the two tiles: keys packed as [D][KEY_BLOCK] floats, values as plain rows of D */
INLINE void score_tile_f32(int rows, int D, const float *q, long q_row, const float *k_packed, float *scores,
                           __m512 scale) {
    __m512 acc[6][4];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int d = 0; d < D; d++) {
        const float *kp = k_packed + (long)d * KEY_BLOCK;
        __m512 k0 = _mm512_loadu_ps(kp), k1 = _mm512_loadu_ps(kp + 16), k2 = _mm512_loadu_ps(kp + 32),
               k3 = _mm512_loadu_ps(kp + 48);
        for (int r = 0; r < rows; r++) {
            __m512 qr = _mm512_set1_ps(q[r * q_row + d]);
            acc[r][0] = _mm512_fmadd_ps(qr, k0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(qr, k1, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(qr, k2, acc[r][2]);
            acc[r][3] = _mm512_fmadd_ps(qr, k3, acc[r][3]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(scores + r * KEY_BLOCK + 16 * c, _mm512_mul_ps(acc[r][c], scale));
}

INLINE void value_tile_f32(int rows, int D, const float *probs, const float *v_rows, float *out) {
    __m512 acc[6][8];
    const int vectors = D / 16;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < vectors; c++) acc[r][c] = _mm512_loadu_ps(out + r * D + 16 * c);
    for (int j = 0; j < KEY_BLOCK; j++) {
        const float *vr = v_rows + (long)j * D;
        for (int r = 0; r < rows; r++) {
            __m512 pr = _mm512_set1_ps(probs[r * KEY_BLOCK + j]);
            for (int c = 0; c < vectors; c++) acc[r][c] = _mm512_fmadd_ps(pr, _mm512_loadu_ps(vr + 16 * c), acc[r][c]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < vectors; c++) _mm512_storeu_ps(out + r * D + 16 * c, acc[r][c]);
}

/* AMX tiles here (cpu_simd.h configures all eight full size): 0-3 hold fp32 sums (16 rows x 16 columns), 4 a left
   operand (16 rows x 32 bf16), 5-6 right operands (16 pairs of rows x 16 columns, pair-interleaved). */
#define AMX_ROWS 16

static int use_amx; /* set by attention_use_amx */

/* Turns the AMX products on (1) or off (0); returns whether they are on (where Linux refuses the tile state,
   they stay off). */
int attention_use_amx(int on) {
    use_amx = on && amx_request();
    return use_amx;
}

/* Whether the AMX products are on. */
int attention_amx(void) { return use_amx; }

/* tiles T0, T1 += tile 4 times the 16-column right operands at b and b + 16 (rows `stride` bytes apart) */
#define AMX_TWO_PRODUCTS(T0, T1, b, stride)                                                                          \
    do {                                                                                                             \
        _tile_loadd(5, b, stride);                                                                                   \
        _tile_loadd(6, (b) + 16, stride);                                                                            \
        _tile_dpbf16ps(T0, 4, 5);                                                                                    \
        _tile_dpbf16ps(T1, 4, 6);                                                                                    \
    } while (0)
/* tiles 0-3 to or from the 16 x 64 fp32 sums at `at` (op: _tile_loadd or _tile_stored) */
#define AMX_MOVE_FOUR(op, at, stride)                                                                                \
    do {                                                                                                             \
        op(0, at, stride);                                                                                           \
        op(1, (at) + 16, stride);                                                                                    \
        op(2, (at) + 32, stride);                                                                                    \
        op(3, (at) + 48, stride);                                                                                    \
    } while (0)

/* scores[r][0:KEY_BLOCK] = q[r] . k_packed (no scale) for 16 query rows of q (rows of D bf16, contiguous), rows of
   scores `row` floats apart */
AMX_TARGET static void amx_score_group(int D, const bf16 *q, const uint32_t *k_packed, float *scores, long row) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int step = 0; step < D / 32; step++) { /* 32 of the D dimensions: 16 pairs */
        const uint32_t *kp = k_packed + (long)step * 16 * KEY_BLOCK;
        _tile_loadd(4, q + 32 * step, 2 * D);
        AMX_TWO_PRODUCTS(0, 1, kp, 4 * KEY_BLOCK);
        AMX_TWO_PRODUCTS(2, 3, kp + 32, 4 * KEY_BLOCK);
    }
    AMX_MOVE_FOUR(_tile_stored, scores, 4 * row);
}

/* the same for `groups` groups of 16 rows, scores rows of KEY_BLOCK */
AMX_TARGET static void amx_score_tiles(int groups, int D, const bf16 *q, const uint32_t *k_packed, float *scores) {
    for (int g = 0; g < groups; g++)
        amx_score_group(D, q + (long)g * AMX_ROWS * D, k_packed, scores + (long)g * AMX_ROWS * KEY_BLOCK, KEY_BLOCK);
}

/* acc[r][0:D] += probs[r] . v_packed for 16 rows over `blocks` consecutive key blocks (probs: rows of `row` bf16,
   block b's keys at columns 64 b..), 64 columns of acc (four tiles) at a time, or the last 32 where D is 32 or 96:
   the accumulator's tiles are loaded and stored once for all the blocks */
AMX_TARGET static void amx_value_group(int blocks, int D, const bf16 *probs, long row, const uint32_t *v_packed,
                                       float *acc) {
    for (int c = 0; c < D / 16; c += 4) {
        float *a = acc + 16 * c;
        const int four = D / 16 - c >= 4;
        if (four) AMX_MOVE_FOUR(_tile_loadd, a, 4 * D);
        else {
            _tile_loadd(0, a, 4 * D);
            _tile_loadd(1, a + 16, 4 * D);
        }
        for (int step = 0; step < blocks * KEY_BLOCK / 32; step++) { /* 32 keys: 16 pairs */
            const uint32_t *vp = v_packed + (long)step * 16 * D + 16 * c;
            _tile_loadd(4, probs + 32 * step, 2 * row);
            AMX_TWO_PRODUCTS(0, 1, vp, 4 * D);
            if (four) AMX_TWO_PRODUCTS(2, 3, vp + 32, 4 * D);
        }
        if (four) AMX_MOVE_FOUR(_tile_stored, a, 4 * D);
        else {
            _tile_stored(0, a, 4 * D);
            _tile_stored(1, a + 16, 4 * D);
        }
    }
}

/* the same over one block for `groups` groups of 16 rows, probs rows of KEY_BLOCK: the backward pass's dQ */
AMX_TARGET static void amx_value_tiles(int groups, int D, const bf16 *probs, const uint32_t *v_packed, float *acc) {
    for (int g = 0; g < groups; g++)
        amx_value_group(1, D, probs + (long)g * AMX_ROWS * KEY_BLOCK, KEY_BLOCK, v_packed, acc + (long)g * AMX_ROWS * D);
}

/* acc_t[d][0:KEY_BLOCK] += x_t[d][q0:q0 + 64] . pairs for every d < D, pairs holding 32 pairs of query rows
   ([pair][KEY_BLOCK] words) and x_t a head of q or dO transposed (rows of `row` bf16): dK and dV of the backward
   pass, transposed (16 dimensions by 64 keys of tiles at a time) */
AMX_TARGET static void amx_key_tiles(int D, const bf16 *x_t, long row, long q0, const uint32_t *pairs, float *acc_t) {
    for (int g = 0; g < D / 16; g++) {
        float *a = acc_t + (long)g * 16 * KEY_BLOCK;
        AMX_MOVE_FOUR(_tile_loadd, a, 4 * KEY_BLOCK);
        for (int step = 0; step < AMX_QUERY_TILE / 32; step++) {
            const uint32_t *pp = pairs + (long)step * 16 * KEY_BLOCK;
            _tile_loadd(4, x_t + (long)g * 16 * row + q0 + 32 * step, 2 * row);
            AMX_TWO_PRODUCTS(0, 1, pp, 4 * KEY_BLOCK);
            AMX_TWO_PRODUCTS(2, 3, pp + 32, 4 * KEY_BLOCK);
        }
        AMX_MOVE_FOUR(_tile_stored, a, 4 * KEY_BLOCK);
    }
}

/* the tile functions with a constant row count, so that their accumulators stay in registers */
#define BY_ROWS(rows, call)                                                                                          \
    switch (rows) {                                                                                                  \
    case 6: call(6); break;                                                                                          \
    case 5: call(5); break;                                                                                          \
    case 4: call(4); break;                                                                                          \
    case 3: call(3); break;                                                                                          \
    case 2: call(2); break;                                                                                          \
    default: call(1); break;                                                                                         \
    }

typedef struct {
    int batch, heads, n, num_keys, D, causal, threads;
    const bf16 *q, *k, *v;
    long q_strides[3], k_strides[3], v_strides[3], out_strides[3]; /* batch, head, row; in elements */
    bf16 *out;
    float *lse; /* (batch, heads, n) contiguous, natural log; may be NULL */
    uint32_t *k_packed, *v_packed;
    int f32; /* fp32 tensors instead: the fields below instead of q, k, v, out, k_packed, v_packed */
    const float *q32, *k32, *v32;
    float *out32, *k_packed32, *v_packed32;
    float scale_log2; /* softmax scale times log2(e): scores are kept in base 2 */
    int key_blocks, block_rows, query_blocks, items; /* block_rows: queries per work item */
    int next; /* work counter */
} Job;

static int take(Job *job) { return __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED); }

/* Rows [0, count) of x (unit stride along D, `row` elements between rows) as 32-bit pairs along D in blocks of
   KEY_BLOCK rows, [block][D/2][KEY_BLOCK]: the right operand of score_tile. Rows past `count` are zeros. */
static void pack_along_dim(const bf16 *x, long row, long count, int D, uint32_t *packed) {
    /* gather offsets of 16 consecutive rows' pair p, in 32-bit words */
    const __m512i rows16 = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32((int)(row / 2)));
    const long blocks = (count + KEY_BLOCK - 1) / KEY_BLOCK, full_blocks = count / KEY_BLOCK;
    for (long block = 0; block < blocks; block++) {
        uint32_t *kb = packed + block * KEY_BLOCK * (D / 2);
        if (block < full_blocks && row % 2 == 0) {
            for (int group = 0; group < KEY_BLOCK; group += 16) {
                const int *base = (const int *)(x + (block * KEY_BLOCK + group) * row);
                for (int pair = 0; pair < D / 2; pair++)
                    _mm512_storeu_si512(kb + pair * KEY_BLOCK + group, _mm512_i32gather_epi32(rows16, base + pair, 4));
            }
            continue;
        }
        for (int j = 0; j < KEY_BLOCK; j++) { /* a last, partial block (or odd strides): zeros past the rows */
            long at = block * KEY_BLOCK + j;
            const bf16 *r = x + at * row;
            for (int pair = 0; pair < D / 2; pair++)
                kb[pair * KEY_BLOCK + j] = at < count ? r[2 * pair] | (uint32_t)r[2 * pair + 1] << 16 : 0;
        }
    }
}

/* Rows [0, count) of x as 32-bit pairs of consecutive rows, [count/2 rounded up to KEY_BLOCK/2][D]: the right
   operand of value_tile and key_rows_tile (rows pair up along the contracted dimension). Zeros past `count`. */
static void pack_along_rows(const bf16 *x, long row, long count, int D, uint32_t *packed) {
    const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                         37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
    const long pairs = (count + KEY_BLOCK - 1) / KEY_BLOCK * (KEY_BLOCK / 2);
    for (long pair = 0; pair < pairs; pair++) {
        const long at = 2 * pair;
        const bf16 *even = x + at * row, *odd = even + row;
        uint32_t *out = packed + pair * D;
        if (at + 1 < count) {
            for (int d = 0; d < D; d += 32) {
                __m512i e = _mm512_loadu_si512(even + d), o = _mm512_loadu_si512(odd + d);
                _mm512_storeu_si512(out + d, _mm512_permutex2var_epi16(e, low, o));
                _mm512_storeu_si512(out + d + 16, _mm512_permutex2var_epi16(e, high, o));
            }
            continue;
        }
        for (int d = 0; d < D; d++) {
            uint32_t lo = at < count ? even[d] : 0, hi = at + 1 < count ? odd[d] : 0;
            out[d] = lo | (hi << 16);
        }
    }
}

/* fp32 keys as [block][D][KEY_BLOCK] and values as contiguous rows, zeros past the keys */
static void pack_head_f32(Job *job, int bh) {
    const int D = job->D, b = bh / job->heads, h = bh % job->heads;
    const long size = (long)job->key_blocks * KEY_BLOCK * D, k_row = job->k_strides[2], v_row = job->v_strides[2];
    const float *k = job->k32 + b * job->k_strides[0] + h * job->k_strides[1];
    const float *v = job->v32 + b * job->v_strides[0] + h * job->v_strides[1];
    float *kp = job->k_packed32 + bh * size, *vp = job->v_packed32 + bh * size;
    const __m512i rows16 = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32((int)k_row));
    for (long key = 0; key < (long)job->key_blocks * KEY_BLOCK; key += 16) {
        float *kb = kp + key / KEY_BLOCK * KEY_BLOCK * D + key % KEY_BLOCK;
        const long here = job->num_keys - key;
        if (here >= 16 && 16 * k_row < (1L << 31))
            for (int d = 0; d < D; d++) _mm512_storeu_ps(kb + d * KEY_BLOCK, _mm512_i32gather_ps(rows16, k + key * k_row + d, 4));
        else
            for (int d = 0; d < D; d++)
                for (int j = 0; j < 16; j++) kb[d * KEY_BLOCK + j] = j < here ? k[(key + j) * k_row + d] : 0.0f;
        for (int j = 0; j < 16; j++)
            if (j < here) memcpy(vp + (key + j) * D, v + (key + j) * v_row, sizeof(float) * D);
            else memset(vp + (key + j) * D, 0, sizeof(float) * D);
    }
}

static void pack_head(Job *job, int bh) {
    if (job->f32) return pack_head_f32(job, bh);
    const int D = job->D, b = bh / job->heads, h = bh % job->heads;
    const long size = (long)job->key_blocks * KEY_BLOCK * (D / 2);
    pack_along_dim(job->k + b * job->k_strides[0] + h * job->k_strides[1], job->k_strides[2], job->num_keys, D,
                   job->k_packed + bh * size);
    pack_along_rows(job->v + b * job->v_strides[0] + h * job->v_strides[1], job->v_strides[2], job->num_keys, D,
                    job->v_packed + bh * size);
}

/* Query row i's online softmax over one key block: its scores (scaled here on AMX, whose tiles leave them unscaled)
   masked past the `visible` keys it sees, its running maximum and sum updated, its accumulator rescaled when the
   maximum moves, and its probabilities written for the product with the values (bf16, or fp32 where f32). */
INLINE void softmax_row(int i, long visible, int D, int f32, int amx, __m512 scale, float *scores, void *probs,
                        float *acc, float *row_max, float *sum_lanes) {
    float *s = scores + i * KEY_BLOCK;
    if (visible < KEY_BLOCK) {
        __mmask16 keep[4];
        for (int c = 0; c < 4; c++) {
            long n_keep = visible - 16 * c;
            keep[c] = n_keep >= 16 ? 0xFFFF : n_keep <= 0 ? 0 : (__mmask16)((1u << n_keep) - 1);
            _mm512_storeu_ps(s + 16 * c, _mm512_mask_blend_ps(keep[c], _mm512_set1_ps(-INFINITY),
                                                              _mm512_loadu_ps(s + 16 * c)));
        }
    }
    const __m512 s0 = _mm512_loadu_ps(s), s1 = _mm512_loadu_ps(s + 16), s2 = _mm512_loadu_ps(s + 32),
                 s3 = _mm512_loadu_ps(s + 48);
    /* the running maximum moves only past MAX_SLACK (a -inf maximum moves at the first finite score); on AMX the
       tiles leave the scores unscaled, so the maximum is found unscaled and scaled after (the scale is positive) */
    const __m512 lanes_max = _mm512_max_ps(_mm512_max_ps(s0, s1), _mm512_max_ps(s2, s3));
    float new_max = row_max[i];
    if (_mm512_cmp_ps_mask(amx ? _mm512_mul_ps(lanes_max, scale) : lanes_max, _mm512_set1_ps(row_max[i] + MAX_SLACK),
                           _CMP_GT_OQ))
        new_max = _mm512_reduce_max_ps(amx ? _mm512_mul_ps(lanes_max, scale) : lanes_max);
    __m512 m = _mm512_set1_ps(new_max);
    __m512 p0, p1, p2, p3;
    if (amx) /* scale and shift in one fmsub */
        p0 = exp2_bf16_ps(_mm512_fmsub_ps(s0, scale, m)), p1 = exp2_bf16_ps(_mm512_fmsub_ps(s1, scale, m)),
        p2 = exp2_bf16_ps(_mm512_fmsub_ps(s2, scale, m)), p3 = exp2_bf16_ps(_mm512_fmsub_ps(s3, scale, m));
    else
        p0 = exp2_ps(_mm512_sub_ps(s0, m)), p1 = exp2_ps(_mm512_sub_ps(s1, m)),
        p2 = exp2_ps(_mm512_sub_ps(s2, m)), p3 = exp2_ps(_mm512_sub_ps(s3, m));
    __m512 total;
    if (f32) {
        float *pf = (float *)probs + i * KEY_BLOCK;
        _mm512_storeu_ps(pf, p0), _mm512_storeu_ps(pf + 16, p1);
        _mm512_storeu_ps(pf + 32, p2), _mm512_storeu_ps(pf + 48, p3);
        total = _mm512_add_ps(_mm512_add_ps(p0, p1), _mm512_add_ps(p2, p3));
    } else { /* sum the probabilities as rounded to bf16, the values the product with V uses */
        __m512bh b01 = _mm512_cvtne2ps_pbh(p1, p0), b23 = _mm512_cvtne2ps_pbh(p3, p2);
        _mm512_storeu_si512((bf16 *)probs + i * KEY_BLOCK, (__m512i)b01);
        _mm512_storeu_si512((bf16 *)probs + i * KEY_BLOCK + 32, (__m512i)b23);
        __m512 ones = (__m512)_mm512_set1_epi32(0x3F803F80); /* bf16 pairs (1, 1) */
        total = _mm512_dpbf16_ps(_mm512_setzero_ps(), b01, (__m512bh)ones);
        total = _mm512_dpbf16_ps(total, b23, (__m512bh)ones);
    }
    float correction = new_max == row_max[i] ? 1.0f : exp2f(row_max[i] - new_max); /* rare after a few blocks */
    const __m512 lanes = _mm512_loadu_ps(sum_lanes + 16 * i); /* no horizontal sum per block */
    _mm512_storeu_ps(sum_lanes + 16 * i, _mm512_fmadd_ps(lanes, _mm512_set1_ps(correction), total));
    row_max[i] = new_max;
    if (correction != 1.0f) {
        __m512 c = _mm512_set1_ps(correction);
        for (int d = 0; d < D; d += 16) _mm512_storeu_ps(acc + i * D + d, _mm512_mul_ps(_mm512_loadu_ps(acc + i * D + d), c));
    }
}

/* Query row i's online softmax over AMX_KEYS keys (two packed blocks) on AMX: its unscaled scores `s` masked past
   the `visible` keys it sees, the running maximum and sum updated (the accumulator row rescaled when the maximum
   moves), the probabilities written to p in bf16. One maximum check and one sum update per 128 keys, where
   softmax_row's 64 took two. */
INLINE void amx_softmax_row(long visible, __m512 scale, const float *s, bf16 *p, float *row_max, float *sum_lanes,
                            float *acc_row, int D) {
    __m512 x[AMX_KEYS / 16];
    for (int c = 0; c < AMX_KEYS / 16; c++) {
        x[c] = _mm512_loadu_ps(s + 16 * c);
        if (visible < AMX_KEYS) {
            const long keep = visible - 16 * c;
            x[c] = _mm512_mask_blend_ps(keep <= 0 ? 0 : tail_mask(keep), _mm512_set1_ps(-INFINITY), x[c]);
        }
    }
    __m512 lanes_max = x[0];
    for (int c = 1; c < AMX_KEYS / 16; c++) lanes_max = _mm512_max_ps(lanes_max, x[c]);
    lanes_max = _mm512_mul_ps(lanes_max, scale); /* the scale is positive: the maximum of the scaled scores */
    float new_max = *row_max;
    if (_mm512_cmp_ps_mask(lanes_max, _mm512_set1_ps(*row_max + MAX_SLACK), _CMP_GT_OQ)) /* see softmax_row */
        new_max = _mm512_reduce_max_ps(lanes_max);
    const __m512 m = _mm512_set1_ps(new_max), ones = (__m512)_mm512_set1_epi32(0x3F803F80); /* bf16 pairs (1, 1) */
    __m512 total = _mm512_setzero_ps(); /* the probabilities as rounded to bf16, the values the product uses */
    for (int c = 0; c < AMX_KEYS / 16; c += 2) {
        const __m512 p0 = exp2_bf16_ps(_mm512_fmsub_ps(x[c], scale, m));
        const __m512 p1 = exp2_bf16_ps(_mm512_fmsub_ps(x[c + 1], scale, m));
        const __m512bh pair = _mm512_cvtne2ps_pbh(p1, p0);
        _mm512_storeu_si512(p + 16 * c, (__m512i)pair);
        total = _mm512_dpbf16_ps(total, pair, (__m512bh)ones);
    }
    const float correction = new_max == *row_max ? 1.0f : exp2f(*row_max - new_max);
    _mm512_storeu_ps(sum_lanes, _mm512_fmadd_ps(_mm512_loadu_ps(sum_lanes), _mm512_set1_ps(correction), total));
    *row_max = new_max;
    if (correction != 1.0f) {
        const __m512 c = _mm512_set1_ps(correction);
        for (int d = 0; d < D; d += 16) _mm512_storeu_ps(acc_row + d, _mm512_mul_ps(_mm512_loadu_ps(acc_row + d), c));
    }
}

/* Of the (at most `blocks`) 64-key blocks of the AMX step from key `start`, how many some query of group g (queries
   16 g.. of the item's `count` from `first`) sees: all of them without the causal mask, else up to its last row's
   last key. Groups wholly before the step's keys (the diagonal of a causal item) skip it. */
INLINE int seen_blocks(const Job *job, int first, int count, int g, long start, int blocks) {
    if (!job->causal) return blocks;
    const int last = (g + 1) * AMX_ROWS < count ? (g + 1) * AMX_ROWS - 1 : count - 1;
    const long end = first + last + ((long)job->num_keys - job->n) + 1 - start; /* keys of the step it sees */
    const long seen = end <= 0 ? 0 : (end + KEY_BLOCK - 1) / KEY_BLOCK;
    return seen < blocks ? (int)seen : blocks;
}

/* one block of queries of one (batch, head) over every key it sees; `f32` (a constant where inlined): fp32
   tensors and FMA tiles, else bf16 and vdpbf16ps */
INLINE void run_item(Job *job, int item, int D, int f32, int amx, float *scores, void *probs, float *acc,
                     float *row_max, float *row_sum, bf16 *q_rows, float *sum_lanes) {
    /* items run from the most keys to the fewest, so the causal tail balances across threads */
    const int qblock = job->query_blocks - 1 - item % job->query_blocks, bh = item / job->query_blocks;
    const int b = bh / job->heads, h = bh % job->heads, rows_per_tile = ACCUMULATORS / (D / 16) > 6 ? 6 : ACCUMULATORS / (D / 16);
    const int block_rows = job->block_rows;
    const int first = qblock * block_rows, count = job->n - first < block_rows ? job->n - first : block_rows;
    const long offset = (long)job->num_keys - job->n; /* query i sees keys <= i + offset when causal */
    const long key_end = job->causal ? first + count + offset : job->num_keys;
    const long q_at = b * job->q_strides[0] + h * job->q_strides[1] + (long)first * job->q_strides[2];
    /* the other precision's pointers are NULL in the job: no arithmetic on them */
    const long bf16_head = (long)bh * job->key_blocks * KEY_BLOCK * (D / 2), f32_head = 2 * bf16_head;
    const bf16 *q = f32 ? NULL : job->q + q_at;
    const float *q32 = f32 ? job->q32 + q_at : NULL;
    const uint32_t *kp = f32 ? NULL : job->k_packed + bf16_head, *vp = f32 ? NULL : job->v_packed + bf16_head;
    const float *kp32 = f32 ? job->k_packed32 + f32_head : NULL, *vp32 = f32 ? job->v_packed32 + f32_head : NULL;
    const __m512 scale = _mm512_set1_ps(job->scale_log2);
    for (int i = 0; i < count; i++) row_max[i] = -INFINITY, row_sum[i] = 0.0f;
    memset(acc, 0, sizeof(float) * count * D);
    const int groups = (count + AMX_ROWS - 1) / AMX_ROWS;
    memset(sum_lanes, 0, sizeof(float) * 16 * count); /* each row's sum in 16 lanes, reduced once at the end */
    if (amx) { /* whole tiles of 16 rows: the queries copied contiguous, zeros past the last */
        for (int i = 0; i < groups * AMX_ROWS; i++)
            if (i < count) memcpy(q_rows + i * D, q + i * job->q_strides[2], sizeof(bf16) * D);
            else memset(q_rows + i * D, 0, sizeof(bf16) * D);
    }
    for (long start = 0; start < key_end && amx; start += AMX_KEYS) {
        /* group by group, each group's softmax issued behind the next group's score tiles: the vector units work
           through one while the AMX unit works through the other, where a whole block's score tiles, then its
           softmax, then its value tiles left each unit idle a third to a half of the time */
        const long block = start / KEY_BLOCK, block_words = (long)KEY_BLOCK * (D / 2);
        const int blocks = key_end - start > KEY_BLOCK ? 2 : 1; /* the second block, where the item sees its keys */
        bf16 *group_probs = (bf16 *)probs;
        for (int g = -1; g < groups; g++) {
            if (g + 1 < groups) /* the next group's scores, into the other of two slots */
                for (int b = 0; b < seen_blocks(job, first, count, g + 1, start, blocks); b++)
                    amx_score_group(D, q_rows + (long)(g + 1) * AMX_ROWS * D, kp + (block + b) * block_words,
                                    scores + ((g + 1) & 1) * AMX_ROWS * AMX_KEYS + b * KEY_BLOCK, AMX_KEYS);
            const int seen = g < 0 ? 0 : seen_blocks(job, first, count, g, start, blocks);
            if (!seen) continue; /* no query of the group sees these keys (causal): nothing to add */
            const float *group_scores = scores + (g & 1) * AMX_ROWS * AMX_KEYS;
            for (int r = 0; r < AMX_ROWS && g * AMX_ROWS + r < count; r++) {
                const int i = g * AMX_ROWS + r;
                long visible = (job->causal ? first + i + offset + 1 : job->num_keys) - start;
                if (visible > seen * KEY_BLOCK) visible = seen * KEY_BLOCK; /* blocks not scored: masked */
                amx_softmax_row(visible, scale, group_scores + r * AMX_KEYS, group_probs + r * AMX_KEYS, row_max + i,
                                sum_lanes + 16 * i, acc + (long)i * D, D);
            }
            amx_value_group(seen, D, group_probs, AMX_KEYS, vp + block * block_words, acc + (long)g * AMX_ROWS * D);
        }
    }
    for (long start = 0; start < key_end && !amx; start += KEY_BLOCK) {
        const long block = start / KEY_BLOCK;
        for (int r = 0; r < count; r += rows_per_tile) {
            int rows = count - r < rows_per_tile ? count - r : rows_per_tile;
            const long q_row = job->q_strides[2];
            float *sr = scores + r * KEY_BLOCK;
            const uint32_t *kb = f32 ? NULL : kp + block * KEY_BLOCK * (D / 2);
            const float *kb32 = f32 ? kp32 + block * KEY_BLOCK * D : NULL;
            /* constant row counts let the compiler keep the accumulators in registers */
#define SCORE_TILE(R)                                                                                                \
    if (f32) score_tile_f32(R, D, q32 + r * q_row, q_row, kb32, sr, scale);                                           \
    else score_tile(R, D, q + r * q_row, q_row, kb, sr, scale)
            BY_ROWS(rows, SCORE_TILE)
#undef SCORE_TILE
        }
        for (int i = 0; i < count; i++)
            softmax_row(i, (job->causal ? first + i + offset + 1 : job->num_keys) - start, D, f32, 0, scale, scores,
                        probs, acc, row_max, sum_lanes);
        const uint32_t *vb = f32 ? NULL : vp + block * KEY_BLOCK * (D / 2);
        const float *vb32 = f32 ? vp32 + block * KEY_BLOCK * D : NULL;
        for (int r = 0; r < count; r += rows_per_tile) {
            int rows = count - r < rows_per_tile ? count - r : rows_per_tile;
            float *ar = acc + r * D;
#define VALUE_TILE(R)                                                                                                \
    if (f32) value_tile_f32(R, D, (const float *)probs + r * KEY_BLOCK, vb32, ar);                                   \
    else value_tile(R, D, (const bf16 *)probs + r * KEY_BLOCK, vb, ar)
            BY_ROWS(rows, VALUE_TILE)
#undef VALUE_TILE
        }
    }
    const long out_at = b * job->out_strides[0] + h * job->out_strides[1] + (long)first * job->out_strides[2];
    for (int i = 0; i < count; i++) row_sum[i] = _mm512_reduce_add_ps(_mm512_loadu_ps(sum_lanes + 16 * i));
    for (int i = 0; i < count; i++) {
        __m512 inv = _mm512_set1_ps(1.0f / row_sum[i]);
        for (int d = 0; d < D; d += 16) {
            const __m512 value = _mm512_mul_ps(_mm512_loadu_ps(acc + i * D + d), inv);
            if (f32) _mm512_storeu_ps(job->out32 + out_at + i * job->out_strides[2] + d, value);
            else _mm256_storeu_si256((__m256i *)(job->out + out_at + i * job->out_strides[2] + d), (__m256i)_mm512_cvtneps_pbh(value));
        }
        if (job->lse) job->lse[(long)bh * job->n + first + i] = (row_max[i] + log2f(row_sum[i])) * 0.69314718f;
    }
}

static void run_items(Job *job, int D) {
    const int amx = use_amx && !job->f32;
    float *scores = aligned_alloc(64, sizeof(float) * AMX_QUERY_BLOCK * KEY_BLOCK);
    void *probs = aligned_alloc(64, sizeof(float) * AMX_QUERY_BLOCK * KEY_BLOCK);
    float *acc = aligned_alloc(64, sizeof(float) * AMX_QUERY_BLOCK * 128);
    bf16 *q_rows = aligned_alloc(64, sizeof(bf16) * AMX_QUERY_BLOCK * 128);
    float *sum_lanes = aligned_alloc(64, sizeof(float) * AMX_QUERY_BLOCK * 16);
    float row_max[AMX_QUERY_BLOCK], row_sum[AMX_QUERY_BLOCK];
    memset(probs, 0, sizeof(float) * AMX_QUERY_BLOCK * KEY_BLOCK); /* AMX reads whole tiles: no uninitialised rows */
    const unsigned csr = amx ? flush_denormals_begin() : 0; /* exp2_bf16_ps's denormals */
    if (amx) amx_begin();
    for (int item = take(job); item < job->items; item = take(job)) {
        switch (D + job->f32) { /* one specialisation per supported head size and precision */
        case 32: run_item(job, item, 32, 0, amx, scores, probs, acc, row_max, row_sum, q_rows, sum_lanes); break;
        case 64: run_item(job, item, 64, 0, amx, scores, probs, acc, row_max, row_sum, q_rows, sum_lanes); break;
        case 96: run_item(job, item, 96, 0, amx, scores, probs, acc, row_max, row_sum, q_rows, sum_lanes); break;
        case 128: run_item(job, item, 128, 0, amx, scores, probs, acc, row_max, row_sum, q_rows, sum_lanes); break;
        case 33: run_item(job, item, 32, 1, 0, scores, probs, acc, row_max, row_sum, q_rows, sum_lanes); break;
        case 65: run_item(job, item, 64, 1, 0, scores, probs, acc, row_max, row_sum, q_rows, sum_lanes); break;
        case 97: run_item(job, item, 96, 1, 0, scores, probs, acc, row_max, row_sum, q_rows, sum_lanes); break;
        default: run_item(job, item, 128, 1, 0, scores, probs, acc, row_max, row_sum, q_rows, sum_lanes); break;
        }
    }
    if (amx) amx_end(), flush_denormals_end(csr);
    free(scores), free(probs), free(acc), free(q_rows), free(sum_lanes);
}

static void pack_worker(Job *job) {
    for (int bh = take(job); bh < job->batch * job->heads; bh = take(job)) pack_head(job, bh);
}

static void attend_worker(Job *job) { run_items(job, job->D); }

/* ---------------------------------------------------------------------------------------------------------
   Backward pass (training): FlashAttention-2's (Dao 2023) recomputation, one key block per work item.

   Each item owns KEY_BLOCK keys of one (batch, head) and walks the queries that see them in tiles of
   QUERY_TILE: it recomputes the scores S = scale q k^T, the probabilities P = exp(S - lse) from the forward's
   log-sum-exp, dP = dO v^T and dS = P (dP - delta) with delta = rowsum(dO * O); it sums dV += P^T dO and
   dK += scale dS^T q for its keys in fp32, and adds scale dS k into its thread's own fp32 copy of dQ (no two
   threads write one address); a last pass sums the copies. Every product runs on vdpbf16ps, so each operand is
   packed with its contracted dimension in pairs: k and v along D for S and dP (as the forward packs k), k along
   keys for dQ (as the forward packs v), q and dO along queries for dK and dV; P and dS are written in the same
   pair layouts as they are computed.
*/
#define QUERY_TILE 48 /* queries per tile of a backward item: even, and a multiple of the 6-row score tiles */

typedef struct {
    int batch, heads, n, num_keys, D, causal, threads;
    const bf16 *q, *k, *v, *out, *dout;
    long q_strides[3], k_strides[3], v_strides[3], out_strides[3], dout_strides[3];
    const float *lse; /* (batch, heads, n) contiguous, natural log, from the forward */
    bf16 *dq, *dk, *dv;
    long dq_strides[3], dk_strides[3], dv_strides[3];
    float scale;
    int key_blocks, query_words; /* query_words: 32-bit words of one head's q (or dO) packed along queries */
    uint32_t *k_dim, *k_rows, *v_dim, *q_rows, *dout_rows;
    float *lse2, *delta, *dq_partial; /* (BH, n), (BH, n), (threads, BH, dq_rows, D) */
    int amx, dq_rows;                  /* AMX tiles; rows of each dQ copy (n, padded for whole tiles on AMX) */
    bf16 *q_pad, *dout_pad, *q_t, *dout_t; /* AMX: (BH, dq_rows, D) with zero rows past n, and transposed */
    int next;
} Backward;

static int take_backward(Backward *job) { return __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED); }

/* acc[r][0:D] += sum_p pack[p][r] . x_pack[p][0:D] for `rows` key rows: the pair at word p*KEY_BLOCK + r of
   `pack` holds the values of two consecutive queries, x_pack[p] the same two queries' rows of q or dO */
INLINE void key_rows_tile(int rows, int D, const uint32_t *pack, int pairs, const uint32_t *x_pack, float *acc) {
    __m512 a[6][8];
    const int vectors = D / 16;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < vectors; c++) a[r][c] = _mm512_loadu_ps(acc + r * D + 16 * c);
    for (int p = 0; p < pairs; p++) {
        const uint32_t *xp = x_pack + (long)p * D;
        for (int r = 0; r < rows; r++) {
            __m512bh w = (__m512bh)_mm512_set1_epi32((int)pack[p * KEY_BLOCK + r]);
            for (int c = 0; c < vectors; c++)
                a[r][c] = _mm512_dpbf16_ps(a[r][c], w, (__m512bh)_mm512_loadu_si512(xp + 16 * c));
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < vectors; c++) _mm512_storeu_ps(acc + r * D + 16 * c, a[r][c]);
}

static void prepare_head(Backward *job, int bh) {
    const int D = job->D, b = bh / job->heads, h = bh % job->heads, n = job->n;
    const long block_words = (long)job->key_blocks * KEY_BLOCK * (D / 2);
    const bf16 *k = job->k + b * job->k_strides[0] + h * job->k_strides[1];
    const bf16 *v = job->v + b * job->v_strides[0] + h * job->v_strides[1];
    const bf16 *q = job->q + b * job->q_strides[0] + h * job->q_strides[1];
    const bf16 *o = job->out + b * job->out_strides[0] + h * job->out_strides[1];
    const bf16 *dout = job->dout + b * job->dout_strides[0] + h * job->dout_strides[1];
    pack_along_dim(k, job->k_strides[2], job->num_keys, D, job->k_dim + bh * block_words);
    pack_along_rows(k, job->k_strides[2], job->num_keys, D, job->k_rows + bh * block_words);
    pack_along_dim(v, job->v_strides[2], job->num_keys, D, job->v_dim + bh * block_words);
    if (!job->amx) { /* AMX reads q and dO from the padded copies below instead */
        pack_along_rows(q, job->q_strides[2], n, D, job->q_rows + (long)bh * job->query_words);
        pack_along_rows(dout, job->dout_strides[2], n, D, job->dout_rows + (long)bh * job->query_words);
    }
    for (int i = 0; i < n; i++) {
        __m512 sum = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 16) {
            __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(o + i * job->out_strides[2] + d))), 16));
            __m512 y = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(dout + i * job->dout_strides[2] + d))), 16));
            sum = _mm512_fmadd_ps(x, y, sum);
        }
        job->delta[(long)bh * n + i] = _mm512_reduce_add_ps(sum);
        job->lse2[(long)bh * n + i] = job->lse[(long)bh * n + i] * 1.44269504f;
    }
    const long BH = (long)job->batch * job->heads, rows = job->dq_rows;
    for (int t = 0; t < job->threads; t++)
        memset(job->dq_partial + ((long)t * BH + bh) * rows * D, 0, sizeof(float) * rows * D);
    if (job->amx) { /* whole 16-row tiles read zeros past the last query */
        bf16 *qp = job->q_pad + bh * rows * D, *op = job->dout_pad + bh * rows * D;
        bf16 *qt = job->q_t + bh * rows * D, *ot = job->dout_t + bh * rows * D;
        memset(qp, 0, sizeof(bf16) * rows * D), memset(op, 0, sizeof(bf16) * rows * D);
        memset(qt, 0, sizeof(bf16) * rows * D), memset(ot, 0, sizeof(bf16) * rows * D);
        for (int i = 0; i < n; i++) {
            memcpy(qp + (long)i * D, q + i * job->q_strides[2], sizeof(bf16) * D);
            memcpy(op + (long)i * D, dout + i * job->dout_strides[2], sizeof(bf16) * D);
            for (int d = 0; d < D; d++) qt[d * rows + i] = qp[(long)i * D + d], ot[d * rows + i] = op[(long)i * D + d];
        }
    }
}

/* two rows' values (`even`, `odd`: 16 keys each) as bf16 pairs, even row in the low half of each word */
INLINE __m512i pair_rows(__m512 even, __m512 odd) {
    __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(even));
    __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(odd));
    return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

typedef struct {
    float *scores, *dprobs, *dk, *dv; /* QUERY_TILE x KEY_BLOCK, the same, KEY_BLOCK x D twice */
    bf16 *ds_rows;                     /* QUERY_TILE x KEY_BLOCK, row-major: dS for dQ */
    uint32_t *p_pairs, *ds_pairs;      /* QUERY_TILE/2 x KEY_BLOCK words: P and dS in query pairs */
} Scratch;

INLINE void backward_item(Backward *job, int item, int D, int amx, const Scratch *w, float *dq_partial) {
    const int BH = job->batch * job->heads, kb = item / BH, bh = item % BH; /* the most-seen key blocks first */
    const int b = bh / job->heads, h = bh % job->heads, n = job->n;
    const int rows_per_tile = ACCUMULATORS / (D / 16) > 6 ? 6 : ACCUMULATORS / (D / 16);
    const long key_start = (long)kb * KEY_BLOCK, offset = (long)job->num_keys - n;
    const int keys_here = job->num_keys - key_start < KEY_BLOCK ? (int)(job->num_keys - key_start) : KEY_BLOCK;
    long q_first = job->causal && key_start > offset ? key_start - offset : 0;
    q_first &= ~1L; /* pairs of queries start at even rows */
    const long block_words = (long)KEY_BLOCK * (D / 2), at = ((long)bh * job->key_blocks + kb) * block_words;
    const uint32_t *k_dim = job->k_dim + at, *k_rows = job->k_rows + at, *v_dim = job->v_dim + at;
    const uint32_t *q_rows = job->q_rows + (long)bh * job->query_words;
    const uint32_t *dout_rows = job->dout_rows + (long)bh * job->query_words;
    const float *lse2 = job->lse2 + (long)bh * n, *delta = job->delta + (long)bh * n;
    const long q_row = job->q_strides[2], dout_row = job->dout_strides[2];
    const bf16 *q = job->q + b * job->q_strides[0] + h * job->q_strides[1];
    const bf16 *dout = job->dout + b * job->dout_strides[0] + h * job->dout_strides[1];
    float *dq = dq_partial + (long)bh * job->dq_rows * D;
    const long pad_at = (long)bh * job->dq_rows * D; /* this head in q_pad, dout_pad, q_t, dout_t */
    const int tile = amx ? AMX_QUERY_TILE : QUERY_TILE;
    const __m512 scale_log2 = _mm512_set1_ps(job->scale * 1.44269504f), one = _mm512_set1_ps(1.0f);
    const __m512 scale = _mm512_set1_ps(job->scale);
    memset(w->dk, 0, sizeof(float) * KEY_BLOCK * D), memset(w->dv, 0, sizeof(float) * KEY_BLOCK * D);
    for (long q0 = q_first; q0 < n; q0 += tile) {
        const int count = n - q0 < tile ? (int)(n - q0) : tile, pairs = amx ? tile / 2 : (count + 1) / 2;
        if (amx) { /* raw sums: S is scaled below */
            amx_score_tiles(tile / AMX_ROWS, D, job->q_pad + pad_at + q0 * D, k_dim, w->scores);
            amx_score_tiles(tile / AMX_ROWS, D, job->dout_pad + pad_at + q0 * D, v_dim, w->dprobs);
        }
        for (int r = 0; r < count && !amx; r += 6) {
            const int rows = count - r < 6 ? count - r : 6;
#define SCORES(R)                                                                                                    \
    score_tile(R, D, q + (q0 + r) * q_row, q_row, k_dim, w->scores + r * KEY_BLOCK, scale_log2);                   \
    score_tile(R, D, dout + (q0 + r) * dout_row, dout_row, v_dim, w->dprobs + r * KEY_BLOCK, one)
            BY_ROWS(rows, SCORES)
#undef SCORES
        }
        for (int i = 0; i < 2 * pairs; i += 2) {
            __m512 p[2][4], ds[2][4];
            for (int j = 0; j < 2; j++) {
                const long row = q0 + i + j;
                long visible = row >= n ? 0 : job->causal ? row + offset + 1 - key_start : keys_here;
                if (visible > keys_here) visible = keys_here;
                const __m512 top = _mm512_set1_ps(row < n ? lse2[row] : 0.0f), d = _mm512_set1_ps(row < n ? delta[row] : 0.0f);
                for (int c = 0; c < 4; c++) {
                    const __mmask16 keep = visible - 16 * c <= 0 ? 0 : tail_mask(visible - 16 * c);
                    const float *s = w->scores + (i + j) * KEY_BLOCK + 16 * c, *dp = w->dprobs + (i + j) * KEY_BLOCK + 16 * c;
                    const __m512 score = amx ? _mm512_mul_ps(_mm512_loadu_ps(s), scale_log2) : _mm512_loadu_ps(s);
                    const __m512 shifted = _mm512_sub_ps(score, top); /* P is rounded to bf16 where it is used */
                    p[j][c] = keep ? _mm512_maskz_mov_ps(keep, amx ? exp2_bf16_ps(shifted) : exp2_ps(shifted))
                                   : _mm512_setzero_ps();
                    ds[j][c] = keep ? _mm512_mul_ps(_mm512_mul_ps(p[j][c], _mm512_sub_ps(_mm512_loadu_ps(dp), d)), scale)
                                    : _mm512_setzero_ps();
                    if (i + j < count || amx) /* AMX tiles read whole rows */
                        _mm256_storeu_si256((__m256i *)(w->ds_rows + (i + j) * KEY_BLOCK + 16 * c),
                                            (__m256i)_mm512_cvtneps_pbh(ds[j][c]));
                }
            }
            for (int c = 0; c < 4; c++) {
                _mm512_storeu_si512(w->p_pairs + (i / 2) * KEY_BLOCK + 16 * c, pair_rows(p[0][c], p[1][c]));
                _mm512_storeu_si512(w->ds_pairs + (i / 2) * KEY_BLOCK + 16 * c, pair_rows(ds[0][c], ds[1][c]));
            }
        }
        if (amx) {
            amx_key_tiles(D, job->dout_t + pad_at, job->dq_rows, q0, w->p_pairs, w->dv);
            amx_key_tiles(D, job->q_t + pad_at, job->dq_rows, q0, w->ds_pairs, w->dk);
            amx_value_tiles(tile / AMX_ROWS, D, w->ds_rows, k_rows, dq + q0 * D);
            continue;
        }
        for (int k0 = 0; k0 < keys_here; k0 += rows_per_tile) {
            const int rows = keys_here - k0 < rows_per_tile ? keys_here - k0 : rows_per_tile;
#define KEY_ROWS(R)                                                                                                  \
    key_rows_tile(R, D, w->p_pairs + k0, pairs, dout_rows + (q0 / 2) * D, w->dv + k0 * D);                         \
    key_rows_tile(R, D, w->ds_pairs + k0, pairs, q_rows + (q0 / 2) * D, w->dk + k0 * D)
            BY_ROWS(rows, KEY_ROWS)
#undef KEY_ROWS
        }
        for (int r = 0; r < count; r += rows_per_tile) {
            const int rows = count - r < rows_per_tile ? count - r : rows_per_tile;
#define QUERY_ROWS(R) value_tile(R, D, w->ds_rows + r * KEY_BLOCK, k_rows, dq + (q0 + r) * D)
            BY_ROWS(rows, QUERY_ROWS)
#undef QUERY_ROWS
        }
    }
    bf16 *dk = job->dk + b * job->dk_strides[0] + h * job->dk_strides[1] + key_start * job->dk_strides[2];
    bf16 *dv = job->dv + b * job->dv_strides[0] + h * job->dv_strides[1] + key_start * job->dv_strides[2];
    const __m512i transposed = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                  _mm512_set1_epi32(KEY_BLOCK));
    for (int r = 0; r < keys_here && amx; r++) /* the AMX sums are [D][KEY_BLOCK] */
        for (int d = 0; d < D; d += 16) {
            const __m512 dk_row = _mm512_i32gather_ps(transposed, w->dk + d * KEY_BLOCK + r, 4);
            const __m512 dv_row = _mm512_i32gather_ps(transposed, w->dv + d * KEY_BLOCK + r, 4);
            _mm256_storeu_si256((__m256i *)(dk + r * job->dk_strides[2] + d), (__m256i)_mm512_cvtneps_pbh(dk_row));
            _mm256_storeu_si256((__m256i *)(dv + r * job->dv_strides[2] + d), (__m256i)_mm512_cvtneps_pbh(dv_row));
        }
    for (int r = 0; r < keys_here && !amx; r++)
        for (int d = 0; d < D; d += 16) {
            _mm256_storeu_si256((__m256i *)(dk + r * job->dk_strides[2] + d),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(w->dk + r * D + d)));
            _mm256_storeu_si256((__m256i *)(dv + r * job->dv_strides[2] + d),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(w->dv + r * D + d)));
        }
}

static void sum_query_gradients(Backward *job, int bh) {
    const int D = job->D, n = job->n, b = bh / job->heads, h = bh % job->heads;
    const long BH = (long)job->batch * job->heads;
    bf16 *dq = job->dq + b * job->dq_strides[0] + h * job->dq_strides[1];
    for (int i = 0; i < n; i++)
        for (int d = 0; d < D; d += 16) {
            __m512 sum = _mm512_setzero_ps();
            for (int t = 0; t < job->threads; t++)
                sum = _mm512_add_ps(sum, _mm512_loadu_ps(job->dq_partial + (((long)t * BH + bh) * job->dq_rows + i) * D + d));
            _mm256_storeu_si256((__m256i *)(dq + i * job->dq_strides[2] + d), (__m256i)_mm512_cvtneps_pbh(sum));
        }
}

static void backward_worker(Backward *job, int D) {
    Scratch w; /* sized for the larger of the two query tiles */
    w.scores = aligned_alloc(64, sizeof(float) * AMX_QUERY_TILE * KEY_BLOCK);
    w.dprobs = aligned_alloc(64, sizeof(float) * AMX_QUERY_TILE * KEY_BLOCK);
    w.dk = aligned_alloc(64, sizeof(float) * KEY_BLOCK * 128);
    w.dv = aligned_alloc(64, sizeof(float) * KEY_BLOCK * 128);
    w.ds_rows = aligned_alloc(64, sizeof(bf16) * AMX_QUERY_TILE * KEY_BLOCK);
    w.p_pairs = aligned_alloc(64, sizeof(uint32_t) * AMX_QUERY_TILE / 2 * KEY_BLOCK);
    w.ds_pairs = aligned_alloc(64, sizeof(uint32_t) * AMX_QUERY_TILE / 2 * KEY_BLOCK);
    float *dq_partial = job->dq_partial + (long)omp_get_thread_num() * job->batch * job->heads * job->dq_rows * D;
    const int items = job->key_blocks * job->batch * job->heads, amx = job->amx;
    const unsigned csr = amx ? flush_denormals_begin() : 0; /* exp2_bf16_ps's denormals */
    if (amx) amx_begin();
    for (int item = take_backward(job); item < items; item = take_backward(job)) {
        switch (D) {
        case 32: backward_item(job, item, 32, amx, &w, dq_partial); break;
        case 64: backward_item(job, item, 64, amx, &w, dq_partial); break;
        case 96: backward_item(job, item, 96, amx, &w, dq_partial); break;
        default: backward_item(job, item, 128, amx, &w, dq_partial); break;
        }
    }
    if (amx) amx_end(), flush_denormals_end(csr);
    free(w.scores), free(w.dprobs), free(w.dk), free(w.dv), free(w.ds_rows), free(w.p_pairs), free(w.ds_pairs);
}

static void run_parallel(Job *job, void (*worker)(Job *)) {
    /* OpenMP from the runtime PyTorch already loaded (libgomp, matched by its soname): the threads its last op
       left spinning take this work at once instead of competing with threads of our own for the cores */
    job->next = 0;
#pragma omp parallel num_threads(job->threads)
    worker(job);
}

/* 16 values to `at` (masked lanes untouched), fp32 or rounded to bf16 */
INLINE void store_values(void *at, __m512 values, int is_bf16, __mmask16 mask) {
    if (!is_bf16) _mm512_mask_storeu_ps(at, mask, values);
    else _mm256_mask_storeu_epi16(at, mask, (__m256i)_mm512_cvtneps_pbh(values));
}

/* One head's first 2 * half dimensions rotated as half-split pairs (d, d + half) by the angles whose cos and sin
   (half fp32 each) are given, times `sign` (-1: the negative angles): from fp32 or bf16 (`from_bf16`) to fp32 or
   bf16 (`to_bf16`), the arithmetic in fp32, rounded once. to may be from itself. */
INLINE void rotate_head(const char *from, int from_bf16, char *to, int to_bf16, int half, const float *cos,
                        const float *sin, __m512 sign) {
    const long from_element = from_bf16 ? 2 : 4, to_element = to_bf16 ? 2 : 4;
    for (int d = 0; d < half; d += 16) {
        const __mmask16 mask = tail_mask(half - d);
        const __m512 c = _mm512_maskz_loadu_ps(mask, cos + d);
        const __m512 s = _mm512_mul_ps(sign, _mm512_maskz_loadu_ps(mask, sin + d));
        const __m512 x1 = load_widened(from + d * from_element, from_bf16, mask);
        const __m512 x2 = load_widened(from + (d + half) * from_element, from_bf16, mask);
        store_values(to + d * to_element, _mm512_sub_ps(_mm512_mul_ps(x1, c), _mm512_mul_ps(x2, s)), to_bf16, mask);
        store_values(to + (d + half) * to_element, _mm512_add_ps(_mm512_mul_ps(x2, c), _mm512_mul_ps(x1, s)), to_bf16,
                     mask);
    }
}

/* Rotary position encoding: out = x rotated, x and out (batch, heads, length, D), fp32 or bf16 (`is_bf16`), unit
   stride along D and any other strides; out may be x itself (in place). The first 2 * half dimensions rotate as
   half-split pairs (d, d + half) by the angles whose cos and sin are the fp32 tables (table_batch, length, half),
   contiguous, table_batch 1 or batch; the rest are copied. `inverse` rotates by the negative angles: the
   backward pass, whose gradient is the transpose of the rotation. model.apply_rotary does the same in six
   PyTorch ops and a cat, each a pass over memory (9.0 ms for the keys of a 16k prefill at the bench config,
   against 0.8 ms in place here; forward and backward in training 26.5 against 5.5 ms: benchmarks/ab/rotary.py);
   this is one pass, its arithmetic in fp32 (bf16 values are rounded once, at the end). Returns 0, or 1 for
   unsupported sizes. */
int rotary(int batch, int heads, int length, int D, int half, int is_bf16, int threads, const void *x,
           const long *x_strides, void *out, const long *out_strides, const float *cos, const float *sin,
           int table_batch, int inverse) {
    if (half < 1 || 2 * half > D || (table_batch != 1 && table_batch != batch)) return 1;
    const long rows = (long)batch * length, element = is_bf16 ? 2 : 4;
    const __m512 sign = _mm512_set1_ps(inverse ? -1.0f : 1.0f);
#pragma omp parallel for schedule(static) num_threads(threads < 1 ? 1 : threads)
    for (long row = 0; row < rows; row++) {
        const long b = row / length, t = row % length;
        const long table_at = ((table_batch == 1 ? 0 : b) * length + t) * half;
        for (int h = 0; h < heads; h++) {
            const char *from = (const char *)x + (b * x_strides[0] + h * x_strides[1] + t * x_strides[2]) * element;
            char *to = (char *)out + (b * out_strides[0] + h * out_strides[1] + t * out_strides[2]) * element;
            rotate_head(from, is_bf16, to, is_bf16, half, cos + table_at, sin + table_at, sign);
            if (to != from) memcpy(to + 2 * half * element, from + 2 * half * element, (D - 2 * half) * element);
        }
    }
    return 0;
}

/* The cross-attention's keys and values from the projected vocabulary (model.CrossAttentionBlock.
   vocabulary_key_value): out[b, t] = table[rows[b, t]], each table row fp32 of 2 * heads * D numbers (the key
   heads, then the value heads), the key heads rotated by position t's angles as `rotary` rotates them (half, cos,
   sin, table_batch alike; half 0 rotates nothing), written to the contiguous (batch, length, 2 * heads * D) out
   in fp32 or bf16 (`out_bf16`: rounded once, after the rotation). One pass over the output. Returns 0, 1 for
   unsupported sizes, 2 for a row index outside [0, table_rows). */
int gather_rotary(int batch, int length, int heads, int D, int half, int out_bf16, int threads, const float *table,
                  long table_rows, const int64_t *rows, void *out, const float *cos, const float *sin,
                  int table_batch) {
    if (half < 0 || 2 * half > D || (table_batch != 1 && table_batch != batch)) return 1;
    const long count = (long)batch * length, width = 2L * heads * D, element = out_bf16 ? 2 : 4;
    const __m512 one = _mm512_set1_ps(1.0f);
    for (long i = 0; i < count; i++)
        if (rows[i] < 0 || rows[i] >= table_rows) return 2;
#pragma omp parallel for schedule(static) num_threads(threads < 1 ? 1 : threads)
    for (long row = 0; row < count; row++) {
        const long b = row / length, t = row % length;
        const long table_at = ((table_batch == 1 ? 0 : b) * length + t) * half;
        const float *from = table + rows[row] * width;
        char *to = (char *)out + row * width * element;
        for (int h = 0; h < heads; h++) {
            const float *x = from + (long)h * D;
            char *y = to + (long)h * D * element;
            rotate_head((const char *)x, 0, y, out_bf16, half, cos + table_at, sin + table_at, one);
            for (int d = 2 * half; d < D; d += 16) { /* the dimensions past the rotary ones: copied */
                const __mmask16 mask = tail_mask(D - d);
                store_values(y + d * element, _mm512_maskz_loadu_ps(mask, x + d), out_bf16, mask);
            }
        }
        for (long d = (long)heads * D; d < width; d += 16) { /* the values */
            const __mmask16 mask = tail_mask(width - d);
            store_values(to + d * element, _mm512_maskz_loadu_ps(mask, from + d), out_bf16, mask);
        }
    }
    return 0;
}

/* gather_rotary's backward pass: the gradients of its key and value halves, grad_key and grad_value (batch, heads,
   length, D) each, fp32 or bf16 (`grad_bf16`), unit stride along D and any other strides, added up per table row:
   the key heads' rotated back by the negative angles, in fp32. Each thread adds into its own zeroed fp32 table of
   grad_tables (threads, table_rows, 2 * heads * D), which the caller sums: no two threads write one address.
   Returns 0, or 1 for unsupported sizes (the rows were checked by the forward pass). */
int gather_rotary_backward(int batch, int length, int heads, int D, int half, int grad_bf16, int threads,
                           const void *grad_key, const long *key_strides, const void *grad_value,
                           const long *value_strides, const int64_t *rows, long table_rows, const float *cos,
                           const float *sin, int table_batch, float *grad_tables) {
    if (half < 0 || 2 * half > D || (table_batch != 1 && table_batch != batch) || threads < 1) return 1;
    const long count = (long)batch * length, width = 2L * heads * D, element = grad_bf16 ? 2 : 4;
#pragma omp parallel num_threads(threads)
    {
        float *table = grad_tables + (long)omp_get_thread_num() * table_rows * width;
#pragma omp for schedule(static)
        for (long row = 0; row < count; row++) {
            const long b = row / length, t = row % length;
            const long table_at = ((table_batch == 1 ? 0 : b) * length + t) * half;
            float *into = table + rows[row] * width;
            for (int h = 0; h < heads; h++) {
                const char *g = (const char *)grad_key + (b * key_strides[0] + h * key_strides[1] + t * key_strides[2]) * element;
                const char *gv = (const char *)grad_value + (b * value_strides[0] + h * value_strides[1] + t * value_strides[2]) * element;
                float *key = into + (long)h * D, *value = into + (long)(heads + h) * D;
                for (int d = 0; d < half; d += 16) {
                    const __mmask16 mask = tail_mask(half - d);
                    const __m512 c = _mm512_maskz_loadu_ps(mask, cos + table_at + d);
                    const __m512 s = _mm512_maskz_loadu_ps(mask, sin + table_at + d);
                    const __m512 g1 = load_widened(g + d * element, grad_bf16, mask);
                    const __m512 g2 = load_widened(g + (d + half) * element, grad_bf16, mask);
                    const __m512 x1 = _mm512_add_ps(_mm512_mul_ps(g1, c), _mm512_mul_ps(g2, s));
                    const __m512 x2 = _mm512_sub_ps(_mm512_mul_ps(g2, c), _mm512_mul_ps(g1, s));
                    _mm512_mask_storeu_ps(key + d, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, key + d), x1));
                    _mm512_mask_storeu_ps(key + d + half, mask,
                                          _mm512_add_ps(_mm512_maskz_loadu_ps(mask, key + d + half), x2));
                }
                for (int d = 2 * half; d < D; d += 16) {
                    const __mmask16 mask = tail_mask(D - d);
                    const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, key + d), load_widened(g + d * element, grad_bf16, mask));
                    _mm512_mask_storeu_ps(key + d, mask, sum);
                }
                for (int d = 0; d < D; d += 16) {
                    const __mmask16 mask = tail_mask(D - d);
                    const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, value + d), load_widened(gv + d * element, grad_bf16, mask));
                    _mm512_mask_storeu_ps(value + d, mask, sum);
                }
            }
        }
    }
    return 0;
}

/* Bytes of the workspace bf16_flash_attention needs for the packed keys and values. */
long bf16_flash_attention_workspace(int batch, int heads, int num_keys, int D) {
    return 2L * sizeof(uint32_t) * batch * heads * ((num_keys + KEY_BLOCK - 1) / KEY_BLOCK) * KEY_BLOCK * (D / 2);
}

/* Queries per work item on AMX: as few items per head as still give each thread at least four
   (dynamic scheduling then balances them), the head's queries split evenly among them, rounded up to a multiple of
   48, at most AMX_QUERY_BLOCK. At the bench config's 1,024 queries and 8 heads: one item of 1,024 per head,
   against six of up to 192 before (the bench's bf16 prefill: median 0.0925/0.0921 -> 0.0905/0.0904 s with items
   of up to 528, faster in 7 of 12 alternated rounds; 0.0872 -> 0.0864 s with 1,056, 5 of 8); a model with 5
   heads and 512 latents gets two of 288 and 224 rather than one of 512. */
static int item_rows(int n, int heads, int threads) {
    int per_head = (n + AMX_QUERY_BLOCK - 1) / AMX_QUERY_BLOCK;
    while (heads * per_head < 4 * threads && per_head * 48 < n) per_head++;
    const int rows = ((n + per_head - 1) / per_head + 47) / 48 * 48;
    return rows < AMX_QUERY_BLOCK ? rows : AMX_QUERY_BLOCK;
}

/* The same attention in fp32 (tensors, products and softmax): for fp32 inference. Workspace: twice
   bf16_flash_attention_workspace's bytes. Returns 0 on success, 1 for unsupported sizes. */
int f32_flash_attention(int batch, int heads, int n, int num_keys, int D, int causal, int threads, const float *q,
                        const long *q_strides, const float *k, const long *k_strides, const float *v,
                        const long *v_strides, float *out, const long *out_strides, float *lse, float scale,
                        void *workspace) {
    if (D % 32 || D > 128 || n <= 0 || num_keys < (causal ? n : 1)) return 1;
    Job job = {batch, heads, n, num_keys, D, causal, threads < 1 ? 1 : threads};
    for (int i = 0; i < 3; i++)
        job.q_strides[i] = q_strides[i], job.k_strides[i] = k_strides[i], job.v_strides[i] = v_strides[i],
        job.out_strides[i] = out_strides[i];
    job.f32 = 1, job.q32 = q, job.k32 = k, job.v32 = v, job.out32 = out;
    job.lse = lse, job.scale_log2 = scale * 1.44269504f;
    job.key_blocks = (num_keys + KEY_BLOCK - 1) / KEY_BLOCK;
    job.block_rows = num_keys >= LONG_KEYS ? LONG_QUERY_BLOCK : QUERY_BLOCK;
    job.query_blocks = (n + job.block_rows - 1) / job.block_rows;
    job.items = batch * heads * job.query_blocks;
    job.k_packed32 = workspace;
    job.v_packed32 = job.k_packed32 + (size_t)batch * heads * job.key_blocks * KEY_BLOCK * D;
    run_parallel(&job, pack_worker);
    run_parallel(&job, attend_worker);
    return 0;
}

/* Returns 0 on success, 1 for unsupported sizes. The caller passes the workspace (64-byte aligned is best): a
   fresh allocation per call would page-fault its way through tens of megabytes. */
int bf16_flash_attention(int batch, int heads, int n, int num_keys, int D, int causal, int threads,
                         const bf16 *q, const long *q_strides, const bf16 *k, const long *k_strides, const bf16 *v,
                         const long *v_strides, bf16 *out, const long *out_strides, float *lse, float scale,
                         void *workspace) {
    if (D % 32 || D > 128 || n <= 0 || num_keys < (causal ? n : 1)) return 1;
    Job job = {batch, heads, n, num_keys, D, causal, threads < 1 ? 1 : threads, q, k, v};
    for (int i = 0; i < 3; i++)
        job.q_strides[i] = q_strides[i], job.k_strides[i] = k_strides[i], job.v_strides[i] = v_strides[i],
        job.out_strides[i] = out_strides[i];
    job.out = out, job.lse = lse, job.scale_log2 = scale * 1.44269504f;
    job.key_blocks = (num_keys + KEY_BLOCK - 1) / KEY_BLOCK;
    job.block_rows = use_amx ? item_rows(n, batch * heads, job.threads) : QUERY_BLOCK;
    job.query_blocks = (n + job.block_rows - 1) / job.block_rows;
    job.items = batch * heads * job.query_blocks;
    job.k_packed = workspace;
    job.v_packed = job.k_packed + (size_t)batch * heads * job.key_blocks * KEY_BLOCK * (D / 2);
    run_parallel(&job, pack_worker);
    run_parallel(&job, attend_worker);
    return 0;
}


/* Rows of each fp32 dQ copy of the backward pass: on AMX, whole tiles of queries from any even start past n */
static long dq_rows(int n) { return use_amx ? (n + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS + AMX_QUERY_TILE : n; }

/* Bytes of the workspace bf16_flash_attention_backward needs: packed keys, values, queries and output
   gradients, two fp32 rows of statistics and one fp32 dQ per thread (and on AMX padded and transposed copies
   of q and dO). */
long bf16_flash_attention_backward_workspace(int batch, int heads, int n, int num_keys, int D, int threads) {
    const long BH = (long)batch * heads, key_words = (long)((num_keys + KEY_BLOCK - 1) / KEY_BLOCK) * KEY_BLOCK * (D / 2);
    const long query_words = (long)((n + KEY_BLOCK - 1) / KEY_BLOCK) * KEY_BLOCK * (D / 2), rows = dq_rows(n);
    return sizeof(uint32_t) * BH * (3 * key_words + 2 * query_words) + sizeof(float) * BH * (2L * n + (long)threads * rows * D) +
           (use_amx ? sizeof(bf16) * 4 * BH * rows * D : 0);
}

/* dq, dk, dv (bf16, any strides with unit stride along D) of the attention bf16_flash_attention computed, from
   its output `out`, its log-sum-exp `lse` and the output's gradient `dout`. Returns 0, or 1 for unsupported
   sizes. */
int bf16_flash_attention_backward(int batch, int heads, int n, int num_keys, int D, int causal, int threads,
                                  const bf16 *q, const long *q_strides, const bf16 *k, const long *k_strides,
                                  const bf16 *v, const long *v_strides, const bf16 *out, const long *out_strides,
                                  const bf16 *dout, const long *dout_strides, const float *lse, bf16 *dq,
                                  const long *dq_strides, bf16 *dk, const long *dk_strides, bf16 *dv,
                                  const long *dv_strides, float scale, void *workspace) {
    if (D % 32 || D > 128 || n <= 0 || num_keys < (causal ? n : 1)) return 1;
    Backward job = {batch, heads, n, num_keys, D, causal, threads < 1 ? 1 : threads, q, k, v, out, dout};
    for (int i = 0; i < 3; i++) {
        job.q_strides[i] = q_strides[i], job.k_strides[i] = k_strides[i], job.v_strides[i] = v_strides[i];
        job.out_strides[i] = out_strides[i], job.dout_strides[i] = dout_strides[i];
        job.dq_strides[i] = dq_strides[i], job.dk_strides[i] = dk_strides[i], job.dv_strides[i] = dv_strides[i];
    }
    job.lse = lse, job.dq = dq, job.dk = dk, job.dv = dv, job.scale = scale;
    job.key_blocks = (num_keys + KEY_BLOCK - 1) / KEY_BLOCK;
    job.query_words = (n + KEY_BLOCK - 1) / KEY_BLOCK * KEY_BLOCK * (D / 2);
    const long BH = (long)batch * heads, key_words = (long)job.key_blocks * KEY_BLOCK * (D / 2);
    job.k_dim = workspace, job.k_rows = job.k_dim + BH * key_words, job.v_dim = job.k_rows + BH * key_words;
    job.q_rows = job.v_dim + BH * key_words, job.dout_rows = job.q_rows + BH * job.query_words;
    job.lse2 = (float *)(job.dout_rows + BH * job.query_words), job.delta = job.lse2 + BH * n;
    job.dq_partial = job.delta + BH * n;
    job.amx = use_amx, job.dq_rows = (int)dq_rows(n);
    job.q_pad = (bf16 *)(job.dq_partial + (long)job.threads * BH * job.dq_rows * D);
    job.dout_pad = job.q_pad + BH * job.dq_rows * D;
    job.q_t = job.dout_pad + BH * job.dq_rows * D, job.dout_t = job.q_t + BH * job.dq_rows * D;
    /* the same OpenMP runtime as PyTorch's (see run_parallel); thread ids index the dQ copies */
    job.next = 0;
#pragma omp parallel num_threads(job.threads)
    for (int bh = take_backward(&job); bh < BH; bh = take_backward(&job)) prepare_head(&job, bh);
    job.next = 0;
#pragma omp parallel num_threads(job.threads)
    backward_worker(&job, D);
    job.next = 0;
#pragma omp parallel num_threads(job.threads)
    for (int bh = take_backward(&job); bh < BH; bh = take_backward(&job)) sum_query_gradients(&job, bh);
    return 0;
}
