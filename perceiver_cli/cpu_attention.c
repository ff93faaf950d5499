/* Flash attention forward in bf16 for x86 CPUs with AVX512-BF16 (inference only).

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
*/
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_simd.h"

typedef uint16_t bf16;

#define KEY_BLOCK 64    /* keys per tile: four 16-lane vectors */
#define QUERY_BLOCK 96  /* queries per work item; a multiple of every row tile below */
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

typedef struct {
    int batch, heads, n, num_keys, D, causal, threads;
    const bf16 *q, *k, *v;
    long q_strides[3], k_strides[3], v_strides[3], out_strides[3]; /* batch, head, row; in elements */
    bf16 *out;
    float *lse; /* (batch, heads, n) contiguous, natural log; may be NULL */
    uint32_t *k_packed, *v_packed;
    float scale_log2; /* softmax scale times log2(e): scores are kept in base 2 */
    int key_blocks, query_blocks, items;
    int next; /* work counter */
} Job;

static int take(Job *job) { return __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED); }

static void pack_head(Job *job, int bh) {
    const int D = job->D, b = bh / job->heads, h = bh % job->heads;
    const long k_row = job->k_strides[2], v_row = job->v_strides[2];
    const bf16 *k = job->k + b * job->k_strides[0] + h * job->k_strides[1];
    const bf16 *v = job->v + b * job->v_strides[0] + h * job->v_strides[1];
    uint32_t *kp = job->k_packed + (long)bh * job->key_blocks * KEY_BLOCK * (D / 2);
    uint32_t *vp = job->v_packed + (long)bh * job->key_blocks * KEY_BLOCK * (D / 2);
    /* gather offsets of 16 consecutive keys' pair p, in 32-bit words; interleave tables for two V rows */
    const __m512i rows16 = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32((int)(k_row / 2)));
    const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                         37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
    const int full_blocks = job->num_keys / KEY_BLOCK;
    for (int block = 0; block < job->key_blocks; block++) {
        uint32_t *kb = kp + (long)block * KEY_BLOCK * (D / 2), *vb = vp + (long)block * KEY_BLOCK * (D / 2);
        if (block < full_blocks && k_row % 2 == 0) {
            for (int group = 0; group < KEY_BLOCK; group += 16) {
                const int *base = (const int *)(k + ((long)block * KEY_BLOCK + group) * k_row);
                for (int pair = 0; pair < D / 2; pair++)
                    _mm512_storeu_si512(kb + pair * KEY_BLOCK + group, _mm512_i32gather_epi32(rows16, base + pair, 4));
            }
            for (int pair = 0; pair < KEY_BLOCK / 2; pair++) {
                const bf16 *even = v + ((long)block * KEY_BLOCK + 2 * pair) * v_row, *odd = even + v_row;
                for (int d = 0; d < D; d += 32) {
                    __m512i e = _mm512_loadu_si512(even + d), o = _mm512_loadu_si512(odd + d);
                    _mm512_storeu_si512(vb + pair * D + d, _mm512_permutex2var_epi16(e, low, o));
                    _mm512_storeu_si512(vb + pair * D + d + 16, _mm512_permutex2var_epi16(e, high, o));
                }
            }
            continue;
        }
        for (int j = 0; j < KEY_BLOCK; j++) { /* the last, partial block: zeros past the keys */
            long key = (long)block * KEY_BLOCK + j;
            const bf16 *row = k + key * k_row;
            for (int pair = 0; pair < D / 2; pair++)
                kb[pair * KEY_BLOCK + j] = key < job->num_keys ? row[2 * pair] | (uint32_t)row[2 * pair + 1] << 16 : 0;
        }
        for (int pair = 0; pair < KEY_BLOCK / 2; pair++) {
            long key = (long)block * KEY_BLOCK + 2 * pair;
            const bf16 *even = v + key * v_row, *odd = even + v_row;
            for (int d = 0; d < D; d++) {
                uint32_t lo = key < job->num_keys ? even[d] : 0, hi = key + 1 < job->num_keys ? odd[d] : 0;
                vb[pair * D + d] = lo | (hi << 16);
            }
        }
    }
}

INLINE void run_item(Job *job, int item, int D, float *scores, bf16 *probs, float *acc, float *row_max,
                     float *row_sum) {
    /* items run from the most keys to the fewest, so the causal tail balances across threads */
    const int qblock = job->query_blocks - 1 - item % job->query_blocks, bh = item / job->query_blocks;
    const int b = bh / job->heads, h = bh % job->heads, rows_per_tile = ACCUMULATORS / (D / 16) > 6 ? 6 : ACCUMULATORS / (D / 16);
    const int first = qblock * QUERY_BLOCK, count = job->n - first < QUERY_BLOCK ? job->n - first : QUERY_BLOCK;
    const long offset = (long)job->num_keys - job->n; /* query i sees keys <= i + offset when causal */
    const long key_end = job->causal ? first + count + offset : job->num_keys;
    const bf16 *q = job->q + b * job->q_strides[0] + h * job->q_strides[1] + (long)first * job->q_strides[2];
    const uint32_t *kp = job->k_packed + (long)bh * job->key_blocks * KEY_BLOCK * (D / 2);
    const uint32_t *vp = job->v_packed + (long)bh * job->key_blocks * KEY_BLOCK * (D / 2);
    const __m512 scale = _mm512_set1_ps(job->scale_log2);
    for (int i = 0; i < count; i++) row_max[i] = -INFINITY, row_sum[i] = 0.0f;
    memset(acc, 0, sizeof(float) * count * D);
    for (long start = 0; start < key_end; start += KEY_BLOCK) {
        const long block = start / KEY_BLOCK;
        for (int r = 0; r < count; r += rows_per_tile) {
            int rows = count - r < rows_per_tile ? count - r : rows_per_tile;
            const bf16 *qr = q + r * job->q_strides[2];
            float *sr = scores + r * KEY_BLOCK;
            const uint32_t *kb = kp + block * KEY_BLOCK * (D / 2);
            switch (rows) { /* constant row counts let the compiler keep the accumulators in registers */
            case 6: score_tile(6, D, qr, job->q_strides[2], kb, sr, scale); break;
            case 5: score_tile(5, D, qr, job->q_strides[2], kb, sr, scale); break;
            case 4: score_tile(4, D, qr, job->q_strides[2], kb, sr, scale); break;
            case 3: score_tile(3, D, qr, job->q_strides[2], kb, sr, scale); break;
            case 2: score_tile(2, D, qr, job->q_strides[2], kb, sr, scale); break;
            default: score_tile(1, D, qr, job->q_strides[2], kb, sr, scale); break;
            }
        }
        for (int i = 0; i < count; i++) {
            float *s = scores + i * KEY_BLOCK;
            long visible = (job->causal ? first + i + offset + 1 : job->num_keys) - start; /* keys of this block */
            if (visible < KEY_BLOCK) {
                __mmask16 keep[4];
                for (int c = 0; c < 4; c++) {
                    long n_keep = visible - 16 * c;
                    keep[c] = n_keep >= 16 ? 0xFFFF : n_keep <= 0 ? 0 : (__mmask16)((1u << n_keep) - 1);
                    _mm512_storeu_ps(s + 16 * c, _mm512_mask_blend_ps(keep[c], _mm512_set1_ps(-INFINITY),
                                                                      _mm512_loadu_ps(s + 16 * c)));
                }
            }
            __m512 s0 = _mm512_loadu_ps(s), s1 = _mm512_loadu_ps(s + 16), s2 = _mm512_loadu_ps(s + 32),
                   s3 = _mm512_loadu_ps(s + 48);
            float block_max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(s0, s1), _mm512_max_ps(s2, s3)));
            float new_max = block_max > row_max[i] ? block_max : row_max[i];
            __m512 m = _mm512_set1_ps(new_max);
            __m512 p0 = exp2_ps(_mm512_sub_ps(s0, m)), p1 = exp2_ps(_mm512_sub_ps(s1, m));
            __m512 p2 = exp2_ps(_mm512_sub_ps(s2, m)), p3 = exp2_ps(_mm512_sub_ps(s3, m));
            /* sum the probabilities as rounded to bf16, the values the product with V uses */
            __m512bh b01 = _mm512_cvtne2ps_pbh(p1, p0), b23 = _mm512_cvtne2ps_pbh(p3, p2);
            _mm512_storeu_si512(probs + i * KEY_BLOCK, (__m512i)b01);
            _mm512_storeu_si512(probs + i * KEY_BLOCK + 32, (__m512i)b23);
            __m512 ones = (__m512)_mm512_set1_epi32(0x3F803F80); /* bf16 pairs (1, 1) */
            __m512 total = _mm512_dpbf16_ps(_mm512_setzero_ps(), b01, (__m512bh)ones);
            total = _mm512_dpbf16_ps(total, b23, (__m512bh)ones);
            float correction = new_max == row_max[i] ? 1.0f : exp2f(row_max[i] - new_max); /* rare after a few blocks */
            row_sum[i] = row_sum[i] * correction + _mm512_reduce_add_ps(total);
            row_max[i] = new_max;
            if (correction != 1.0f) {
                __m512 c = _mm512_set1_ps(correction);
                for (int d = 0; d < D; d += 16) _mm512_storeu_ps(acc + i * D + d, _mm512_mul_ps(_mm512_loadu_ps(acc + i * D + d), c));
            }
        }
        const uint32_t *vb = vp + block * KEY_BLOCK * (D / 2);
        for (int r = 0; r < count; r += rows_per_tile) {
            int rows = count - r < rows_per_tile ? count - r : rows_per_tile;
            const bf16 *pr = probs + r * KEY_BLOCK;
            float *ar = acc + r * D;
            switch (rows) {
            case 6: value_tile(6, D, pr, vb, ar); break;
            case 5: value_tile(5, D, pr, vb, ar); break;
            case 4: value_tile(4, D, pr, vb, ar); break;
            case 3: value_tile(3, D, pr, vb, ar); break;
            case 2: value_tile(2, D, pr, vb, ar); break;
            default: value_tile(1, D, pr, vb, ar); break;
            }
        }
    }
    bf16 *out = job->out + b * job->out_strides[0] + h * job->out_strides[1] + (long)first * job->out_strides[2];
    for (int i = 0; i < count; i++) {
        __m512 inv = _mm512_set1_ps(1.0f / row_sum[i]);
        for (int d = 0; d < D; d += 16) {
            __m256bh rounded = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + i * D + d), inv));
            _mm256_storeu_si256((__m256i *)(out + i * job->out_strides[2] + d), (__m256i)rounded);
        }
        if (job->lse) job->lse[(long)bh * job->n + first + i] = (row_max[i] + log2f(row_sum[i])) * 0.69314718f;
    }
}

static void run_items(Job *job, int D) {
    float *scores = aligned_alloc(64, sizeof(float) * QUERY_BLOCK * KEY_BLOCK);
    bf16 *probs = aligned_alloc(64, sizeof(bf16) * QUERY_BLOCK * KEY_BLOCK);
    float *acc = aligned_alloc(64, sizeof(float) * QUERY_BLOCK * 128);
    float row_max[QUERY_BLOCK], row_sum[QUERY_BLOCK];
    for (int item = take(job); item < job->items; item = take(job)) {
        switch (D) { /* one specialisation per supported head size */
        case 32: run_item(job, item, 32, scores, probs, acc, row_max, row_sum); break;
        case 64: run_item(job, item, 64, scores, probs, acc, row_max, row_sum); break;
        case 96: run_item(job, item, 96, scores, probs, acc, row_max, row_sum); break;
        default: run_item(job, item, 128, scores, probs, acc, row_max, row_sum); break;
        }
    }
    free(scores), free(probs), free(acc);
}

static void pack_worker(Job *job) {
    for (int bh = take(job); bh < job->batch * job->heads; bh = take(job)) pack_head(job, bh);
}

static void attend_worker(Job *job) { run_items(job, job->D); }

static void run_parallel(Job *job, void (*worker)(Job *)) {
    /* OpenMP from the runtime PyTorch already loaded (libgomp, matched by its soname): the threads its last op
       left spinning take this work at once instead of competing with threads of our own for the cores */
    job->next = 0;
#pragma omp parallel num_threads(job->threads)
    worker(job);
}

/* Bytes of the workspace bf16_flash_attention needs for the packed keys and values. */
long bf16_flash_attention_workspace(int batch, int heads, int num_keys, int D) {
    return 2L * sizeof(uint32_t) * batch * heads * ((num_keys + KEY_BLOCK - 1) / KEY_BLOCK) * KEY_BLOCK * (D / 2);
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
    job.query_blocks = (n + QUERY_BLOCK - 1) / QUERY_BLOCK;
    job.items = batch * heads * job.query_blocks;
    job.k_packed = workspace;
    job.v_packed = job.k_packed + (size_t)batch * heads * job.key_blocks * KEY_BLOCK * (D / 2);
    run_parallel(&job, pack_worker);
    run_parallel(&job, attend_worker);
    return 0;
}
