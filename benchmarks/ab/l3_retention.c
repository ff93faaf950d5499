/* How long this VM's L3 keeps data one core has just read (BENCHMARKS.md "Stop 29"): read 4 MB (fits the 32 MB
   L3), run register-only arithmetic for a while, read the same 4 MB again; the second read's bandwidth against
   the gap. On a machine whose L3 is its own the re-read stays at L3 speed; here other tenants share it.

    cc -O2 -mavx512f -o /tmp/l3_retention benchmarks/ab/l3_retention.c && /tmp/l3_retention
*/
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static float sum(const float *p, long n) { __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a; for (long i = 0; i < n; i += 64) { a = _mm512_add_ps(a, _mm512_load_ps(p + i)); b = _mm512_add_ps(b, _mm512_load_ps(p + i + 16)); c = _mm512_add_ps(c, _mm512_load_ps(p + i + 32)); d = _mm512_add_ps(d, _mm512_load_ps(p + i + 48));} return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d))); }
static float compute(long iters) { __m512 a[8]; for (int j = 0; j < 8; j++) a[j] = _mm512_set1_ps(1.0f + j); __m512 m = _mm512_set1_ps(0.999f); for (long i = 0; i < iters; i++) for (int j = 0; j < 8; j++) a[j] = _mm512_fmadd_ps(a[j], m, m); float s = 0; for (int j = 0; j < 8; j++) s += _mm512_reduce_add_ps(a[j]); return s; }
int main(void) {
    float acc = 0;
    float *flush = aligned_alloc(64, 512L << 20); memset(flush, 1, 512L << 20);
    long n = 4096L << 8; float *r = aligned_alloc(64, n * 4); memset(r, 1, n * 4);
    for (long iters = 1000; iters <= 2000000; iters *= 4) {
        double tot = 0, comp = 0;
        for (int rep = 0; rep < 5; rep++) {
            acc += sum(flush, 128L << 18);
            acc += sum(r, n);
            double t0 = now(); acc += compute(iters); double t1 = now(); acc += sum(r, n); double t2 = now();
            tot += t2 - t1; comp += t1 - t0;
        }
        printf("gap %.3f ms: re-read 4 MB at %.1f GB/s\n", comp / 5 * 1e3, 5 * n * 4 / tot / 1e9);
    }
    return acc == 1;
}
