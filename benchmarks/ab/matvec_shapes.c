/* The decode step's products against one big matvec, in C alone (BENCHMARKS.md "Per-token overhead and the
   products' shapes (stop 28)"). The same bytes (the bench config's 46 step matrices, 109 MB of fp32) read as
   one 4096-row matrix, as the step's matrices with a barrier after each (as cpu_decode.c runs them), without
   the barriers, in a layout that interleaves each group of four rows (one sequential stream per thread) with a
   software prefetch 4 KB ahead, and with the current kernel's prefetch hint changed to NTA. Alternated within
   each round; best of 12 per variant.

       cc -O3 -march=native -fopenmp benchmarks/ab/matvec_shapes.c -o /tmp/matvec_shapes && /tmp/matvec_shapes */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* cpu_decode.c's dot_rows for one input row: four weight rows at a time, the next four prefetched */
static void rows(const float *W, int out, int in, const float *x, float *y, int id, int T, int nta) {
    int quads = out / 4, lo = 4 * (int)((long)quads * id / T), hi = 4 * (int)((long)quads * (id + 1) / T);
    for (int o = lo; o < hi; o += 4) {
        const float *w = W + (long)o * in;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int i = 0; i < in; i += 16) {
            for (int j = 4; j < 8; j++)
                if (nta) _mm_prefetch((const char *)(w + j * (long)in + i), _MM_HINT_NTA);
                else _mm_prefetch((const char *)(w + j * (long)in + i), _MM_HINT_T1);
            __m512 xv = _mm512_loadu_ps(x + i);
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + in + i), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 2 * in + i), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 3 * in + i), xv, a3);
        }
        y[o] = _mm512_reduce_add_ps(a0), y[o + 1] = _mm512_reduce_add_ps(a1);
        y[o + 2] = _mm512_reduce_add_ps(a2), y[o + 3] = _mm512_reduce_add_ps(a3);
    }
}

/* the same on a packed copy: per group of four rows, blocks of 16 floats of each row in turn */
static void packed(const float *P, int out, int in, const float *x, float *y, int id, int T) {
    int quads = out / 4, lo = 4 * (int)((long)quads * id / T), hi = 4 * (int)((long)quads * (id + 1) / T);
    for (int o = lo; o < hi; o += 4) {
        const float *w = P + (long)o * in;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int i = 0; i < in; i += 16) {
            const float *b = w + 4 * i;
            for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(b + 1024 + 16 * j), _MM_HINT_T1);
            __m512 xv = _mm512_loadu_ps(x + i);
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(b), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(b + 16), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(b + 32), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(b + 48), xv, a3);
        }
        y[o] = _mm512_reduce_add_ps(a0), y[o + 1] = _mm512_reduce_add_ps(a1);
        y[o + 2] = _mm512_reduce_add_ps(a2), y[o + 3] = _mm512_reduce_add_ps(a3);
    }
}

enum { BIG, STEP, NO_BARRIERS, PACKED, NTA, VARIANTS };
static const char *names[] = {"one 4096-row matrix", "step matrices + barriers", "step matrices, no barriers",
                              "step matrices packed", "step matrices, NTA hint"};

int main(void) {
    const int D = 512, F = 2048, T = 2;
    const int shapes[5][2] = {{D, D}, {2 * D, D}, {D, D}, {F, D}, {D, F}}; /* q, kv, out, up, down per block */
    long total = 0;
    for (int k = 0; k < 5; k++) total += 9L * shapes[k][0] * shapes[k][1]; /* the cross block + 8 latent layers */
    float *A = aligned_alloc(64, total * 4), *P = aligned_alloc(64, total * 4);
    for (long i = 0; i < total; i++) A[i] = (float)(i % 7) * 0.1f;
    for (long off = 0, b = 0; b < 9; b++) /* the packed copy, matrix by matrix */
        for (int k = 0; k < 5; k++) {
            int out = shapes[k][0], in = shapes[k][1];
            for (int o = 0; o < out; o += 4)
                for (int i = 0; i < in; i += 16)
                    for (int j = 0; j < 4; j++)
                        memcpy(P + off + (long)o * in + 4 * i + 16 * j, A + off + (long)(o + j) * in + i, 64);
            off += (long)out * in;
        }
    const int big_in = (int)(total / 4096 / 16 * 16);
    float *x = aligned_alloc(64, F * 4), *y = aligned_alloc(64, 8192 * 4);
    for (int i = 0; i < F; i++) x[i] = 1;
    for (int round = 0; round < 3; round++) {
        double best[VARIANTS];
        for (int v = 0; v < VARIANTS; v++) best[v] = 1e9;
        for (int rep = 0; rep < 12; rep++)
            for (int v = 0; v < VARIANTS; v++) {
                double t0 = now();
#pragma omp parallel num_threads(T)
                {
                    int id = omp_get_thread_num();
                    if (v == BIG) rows(A, 4096, big_in, x, y, id, T, 0);
                    else {
                        long off = 0;
                        for (int b = 0; b < 9; b++)
                            for (int k = 0; k < 5; k++) {
                                int out = shapes[k][0], in = shapes[k][1];
                                if (v == PACKED) packed(P + off, out, in, x, y, id, T);
                                else rows(A + off, out, in, x, y, id, T, v == NTA);
                                off += (long)out * in;
                                if (v != NO_BARRIERS) {
#pragma omp barrier
                                }
                            }
                    }
                }
                double t = now() - t0;
                if (t < best[v]) best[v] = t;
            }
        printf("round %d:", round);
        for (int v = 0; v < VARIANTS; v++)
            printf(" %s %.1f GB/s%s", names[v], (v == BIG ? 4096.0 * big_in : (double)total) * 4 / best[v] / 1e9,
                   v + 1 < VARIANTS ? " |" : "\n");
    }
    return 0;
}
