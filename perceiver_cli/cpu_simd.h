/* SIMD helpers shared by the C kernels (cpu_attention.c, cpu_decode.c); AVX-512F. */
#pragma once
#include <immintrin.h>

#define INLINE static inline __attribute__((always_inline))

/* the first `remaining` of 16 lanes */
INLINE __mmask16 tail_mask(long remaining) { return remaining >= 16 ? 0xFFFF : (__mmask16)((1u << remaining) - 1); }

INLINE __m512 exp2_ps(__m512 x) {
    /* 2^x for x <= 0: 2^floor(x) by vscalefps times a degree-6 polynomial of the fraction (rel. error ~2e-7) */
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
    __m512 whole = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, whole);
    __m512 p = _mm512_set1_ps(1.5353362e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3398874e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503367e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022652e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, whole);
}
