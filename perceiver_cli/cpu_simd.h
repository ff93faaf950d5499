/* SIMD helpers shared by the C kernels (cpu_attention.c, cpu_decode.c, cpu_loss.c); AVX-512F, and AMX's set-up. */
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#define INLINE static inline __attribute__((always_inline))

/* the first `remaining` of 16 lanes */
INLINE __mmask16 tail_mask(long remaining) { return remaining >= 16 ? 0xFFFF : (__mmask16)((1u << remaining) - 1); }

/* 16 values from `at` (masked lanes zero), fp32 or bf16 widened to fp32 */
INLINE __m512 load_widened(const void *at, int is_bf16, __mmask16 mask) {
    if (!is_bf16) return _mm512_maskz_loadu_ps(mask, at);
    const __m256i raw = _mm256_maskz_loadu_epi16(mask, at);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

INLINE __m512 exp2_ps(__m512 x) {
    /* 2^x for -126 <= x < 128 (the attention kernel's x <= 8): 2^floor(x) by vscalefps times a degree-6
       polynomial of the fraction (rel. error ~2e-7); below -126, 2^-126 */
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

/* 2^x for x <= 8 to ~2e-4 relative (a cubic of the fraction; exp2_ps's sextic: ~2e-7): enough for values rounded
   to bf16 before they are used (the AMX attention's probabilities, cpu_linear.c's GELU). No clamp: -inf gives 0
   (vreduceps's fraction of -inf is 0, vscalefps by 2^-inf is 0), and below -126 the result is a denormal, which the
   callers flush to zero (flush_denormals_begin) rather than pay the CPU's microcode assist for each. */
INLINE __m512 exp2_bf16_ps(__m512 x) {
    /* the fraction x - floor(x) in one vreduceps; vscalefps multiplies by 2^floor(x) of x itself */
    const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(7.632546462e-2f), f, _mm512_set1_ps(2.283082455e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.950361667e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, x);
}

/* MXCSR's flush-to-zero and denormals-are-zero on for the calling thread, for the rest of a kernel's work; returns
   the previous MXCSR, which flush_denormals_end restores (the threads are PyTorch's too) */
static inline unsigned flush_denormals_begin(void) {
    const unsigned previous = _mm_getcsr();
    _mm_setcsr(previous | 0x8040);
    return previous;
}

static inline void flush_denormals_end(unsigned previous) { _mm_setcsr(previous); }

/* AMX (Intel Sapphire Rapids and later): eight tile registers of up to 16 rows of 64 bytes. Both kernels configure
   all eight full size; the configuration is per thread, so each worker loads it before its tiles and releases
   it after. Linux hands a process AMX's 8 KB of tile state only on request: amx_request first. */
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

/* 1 where Linux grants the process AMX's tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) */
static inline int amx_request(void) { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

AMX_TARGET static inline void amx_begin(void) {
    TileConfig config = {.palette = 1};
    for (int t = 0; t < 8; t++) config.bytes_per_row[t] = 64, config.rows[t] = 16;
    /* GCC 12 does not see ldtilecfg read the struct and drops the stores above without this barrier */
    __asm__ __volatile__("" : : "r"(&config) : "memory");
    _tile_loadconfig(&config);
}

AMX_TARGET static inline void amx_end(void) { _tile_release(); }
