/* vlmc CPU kernels: what the library's source files share. Each .c file holds one
 * concern (threadpool.c, gemv.c, dequant.c, kv_attention.c, gemm_i8.c, elementwise.c,
 * decode_layer.c, affine_search.c, probe.c,
 * moe.c, kv_turbo.c) and includes this header first; build.py
 * compiles them into one shared library. Here: the instruction-set switches, the
 * scalar and SIMD helpers several files inline, the thread pool's interface, and the
 * prototype of every exported function (vlmc/kernels/cpu/bindings.py declares the same
 * signatures to ctypes). */
#ifndef VLMC_H
#define VLMC_H

#define _GNU_SOURCE
#include <math.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VLMC_SIMD 1
#else
#define VLMC_SIMD 0
#endif
/* codes x int8 activations (gemv.c's qv kernels, gemm_i8.c) */
#if VLMC_SIMD && defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define VLMC_VNNI 1
#else
#define VLMC_VNNI 0
#endif
/* Intel AMX tiles for the int8-x GEMVs of several x rows (gemv.c's amx panels): compiled
 * where the compiler targets AMX (-march=native on a CPU that has it); used only where
 * amx.c finds the CPU, the OS and the process allowed to use the tiles */
#if VLMC_VNNI && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__) && defined(__x86_64__)
#define VLMC_AMX 1
#else
#define VLMC_AMX 0
#endif
/* 2/3/5/6-bit codes widened in registers (codes_packed) */
#if VLMC_SIMD && defined(__AVX512VBMI__) && defined(__AVX512BW__)
#define VLMC_CODES_PACKED 1
#else
#define VLMC_CODES_PACKED 0
#endif

#ifndef VLMC_ABI
#error "VLMC_ABI is not defined: the ABI number comes from vlmc/kernels/cpu/bindings.py (build.py passes -DVLMC_ABI=N)"
#endif
#define ALWAYS __attribute__((always_inline)) inline
#define UNROLL _Pragma("GCC unroll 16")
#define MAYBE_UNUSED __attribute__((unused))
/* functions one source file provides to the others, not exported from the library */
#define VLMC_INTERNAL __attribute__((visibility("hidden")))

enum { ST_F32 = 0, ST_BF16 = 1, ST_F16 = 2 };

/* ---- scalar helpers ------------------------------------------------------------------ */

static ALWAYS float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static MAYBE_UNUSED float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: renormalize */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* 4 bytes as one int32 (memcpy: one load, without reading int8 data through an int32 lvalue) */
static ALWAYS int32_t ld_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* element i of a scales/biases array of type st */
static ALWAYS float ld_param(const void *p, size_t i, int st) {
    if (st == ST_F32) return ((const float *)p)[i];
    if (st == ST_BF16) return bf16_to_f32(((const uint16_t *)p)[i]);
    return f16_to_f32(((const uint16_t *)p)[i]);
}

/* 2-, 3-, 5- and 6-bit codes ("packed": MLX's layout puts every 8 codes in `bits` bytes
 * of the row's little-endian bit stream) widened to one byte each: in registers, 64 at
 * a time (codes_packed, AVX512-VBMI; the int8-x GEMVs of 1-4 x rows read the codes this
 * way), or a row into a buffer (expand_packed, K a multiple of 64; dequantize, and the
 * GEMV with float x or 5+ x rows, which then runs the 8-bit kernels). A 6-bit weight so
 * streams 6/8 of the bytes of an 8-bit copy, a 3-bit one 3/4 of those of a 4-bit copy. */
static ALWAYS int is_packed(int bits) { return bits == 2 || bits == 3 || bits == 5 || bits == 6; }

/* the constants of codes_packed for one width: qword j of the widened vector gathers the
 * `bits` bytes of codes 8j .. 8j + 7 (byte t of it: byte bits*j + min(t, bits - 1) of
 * the source; bytes past `bits` are masked away below), then multishift picks bits
 * bits*i .. bits*i + 7 of the qword for its code i */
typedef struct {
    uint8_t idx[64];
    uint64_t shift;   /* byte i: bits * i */
    uint64_t load;    /* mask of the 8 * bits source bytes of 64 codes */
    uint8_t mask;     /* (1 << bits) - 1 */
    int bits;
} packed_t;

static MAYBE_UNUSED void packed_init(packed_t *u, int bits) {
    u->bits = bits;
    u->shift = 0;
    for (int i = 0; i < 8; i++) u->shift |= (uint64_t)(bits * i) << (8 * i);
    for (int b = 0; b < 64; b++) u->idx[b] = (uint8_t)(bits * (b >> 3) + ((b & 7) < bits ? (b & 7) : bits - 1));
    u->load = (1ULL << (8 * bits)) - 1; /* bits <= 6: at most 48 bytes */
    u->mask = (uint8_t)((1u << bits) - 1);
}

#if VLMC_CODES_PACKED
/* packed_t in registers */
typedef struct {
    __m512i idx, shift, mask;
    __mmask64 load;
} packed_v;
static ALWAYS packed_v packed_regs(const packed_t *u) {
    return (packed_v){_mm512_loadu_si512((const void *)u->idx), _mm512_set1_epi64((long long)u->shift),
                      _mm512_set1_epi8((char)u->mask), (__mmask64)u->load};
}
/* the 64 codes in the 8 * bits bytes at p, one per byte */
static ALWAYS __m512i codes_packed(const packed_v *u, const uint8_t *p) {
    const __m512i v = _mm512_maskz_loadu_epi8(u->load, p);
    return _mm512_and_si512(_mm512_multishift_epi64_epi8(u->shift, _mm512_permutexvar_epi8(u->idx, v)), u->mask);
}
#endif

static MAYBE_UNUSED void expand_packed(const packed_t *u, const uint8_t *src, uint8_t *dst, int K) {
    const int bits = u->bits;
    int k = 0;
#if VLMC_CODES_PACKED
    const packed_v r = packed_regs(u);
    for (; k + 64 <= K; k += 64) _mm512_storeu_si512((void *)(dst + k), codes_packed(&r, src + (size_t)k / 8 * bits));
#endif
    for (; k < K; k += 8) {
        uint64_t v = 0;
        memcpy(&v, src + (size_t)k / 8 * bits, (size_t)bits); /* little-endian host */
        for (int i = 0; i < 8; i++) dst[k + i] = (uint8_t)((v >> (bits * i)) & u->mask);
    }
}

#if VLMC_SIMD
static ALWAYS float hsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

static ALWAYS __m256 ld8_bf16(const uint16_t *p) {
    __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}
#endif

/* ---- exp for float32, scalar (exp1), 8 lanes (exp8), 16 (exp16) ----------------------------
 * Cephes-style: e^x = 2^n e^r with |r| <= ln2/2 and a degree-6 polynomial for e^r (~1 ulp
 * over the float range); x below -87.3 gives 0 (the true value is under 2^-126, flushed
 * where numpy's denormals would barely differ), x above 88.7 gives inf (as expf). */

#define EXP_HI 88.7f
#define EXP_LO (-87.3f)

static ALWAYS float exp_poly(float r) {
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    return y * r * r + r + 1.0f;
}

static ALWAYS float exp1(float x) {
    if (!(x >= EXP_LO)) return x != x ? x : 0.f; /* NaN stays NaN */
    if (x > EXP_HI) return INFINITY;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    union { uint32_t u; float f; } p;
    if (n > 127.f) { /* 2^n overflows the exponent field: e^x is over FLT_MAX or just under */
        p.u = (uint32_t)(127 + 127) << 23;
        return exp_poly(r) * p.f * 2.f;
    }
    p.u = (uint32_t)((int)n + 127) << 23;
    return exp_poly(r) * p.f;
}

#if VLMC_SIMD
static ALWAYS __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(EXP_LO), hi = _mm256_set1_ps(EXP_HI);
    const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);          /* false for NaN too */
    const __m256 over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
    const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(_mm256_mul_ps(y, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n as two halves, so n = 128 (inputs just under the overflow point) stays finite */
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i h1 = _mm256_srai_epi32(ni, 1), h2 = _mm256_sub_epi32(ni, h1);
    const __m256i b = _mm256_set1_epi32(127);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h1, b), 23)));
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h2, b), 23)));
    y = _mm256_and_ps(y, keep);
    y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), over);
    return _mm256_blendv_ps(y, x, nan);
}
#endif

#if VLMC_SIMD && defined(__AVX512F__)
/* e^x for 16 lanes: exp8's steps on zmm (same constants and order, so the same values) */
static ALWAYS __m512 exp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(EXP_LO), hi = _mm512_set1_ps(EXP_HI);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
    const __mmask16 over = _mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
    const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i ni = _mm512_cvtps_epi32(n);
    const __m512i h1 = _mm512_srai_epi32(ni, 1), h2 = _mm512_sub_epi32(ni, h1);
    const __m512i b = _mm512_set1_epi32(127);
    y = _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(h1, b), 23)));
    y = _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(h2, b), 23)));
    y = _mm512_maskz_mov_ps(keep, y);
    y = _mm512_mask_mov_ps(y, over, _mm512_set1_ps(INFINITY));
    return _mm512_mask_mov_ps(y, nan, x);
}
#endif

/* ---- int8 activations ------------------------------------------------------------------ */

/* the rounding residual of x for 8-bit codes (x8_block); off only to measure it (gemv.c) */
VLMC_INTERNAL extern int vlmc_x8_residual;

#if VLMC_VNNI
/* 64 values of x to int8 with scale amax / 127 (cvtps rounds to nearest even, as lrintf),
 * stored in the order the codes they meet are read (4-bit codes: a byte holds codes 2b and
 * 2b + 1 in its low and high nibble):
 *   X8_NATURAL  byte codes;
 *   X8_OCTETS   4-bit codes read a dword (8 codes) at a time: each 8 values as its 4
 *               even-indexed ones, then its 4 odd ones (gemv.c's panel kernels);
 *   X8_HALVES   4-bit codes read 32 bytes (64 codes) at a time: the 32 even-indexed values
 *               at q, the odd ones at q + odd (gemv.c's one-row kernel).
 * With qr (natural order only), the rounding residual too: t = x / scale, q = rint(t),
 * qr = rint(256 (t - q)) saturated to int8 (t - q is exact), so x ~ scale (q + qr / 256)
 * to ~1 / 65000 of the block's largest value; *sum is then the sum of 256 q + qr and the
 * returned scale that of 256 q + qr. */
enum { X8_NATURAL = 0, X8_OCTETS = 1, X8_HALVES = 2 };
static ALWAYS float x8_block(const float *xr, int order, int8_t *q, size_t odd, int8_t *qr, int *sum) {
    __m512 v[4], a = _mm512_setzero_ps();
    UNROLL for (int i = 0; i < 4; i++) {
        v[i] = _mm512_loadu_ps(xr + 16 * i);
        a = _mm512_max_ps(a, _mm512_abs_ps(v[i]));
    }
    const float amax = _mm512_reduce_max_ps(a), inv = amax > 0.f ? 127.f / amax : 0.f;
    if (order == X8_OCTETS) {
        const __m512i eo = _mm512_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
        UNROLL for (int i = 0; i < 4; i++) v[i] = _mm512_permutexvar_ps(eo, v[i]);
    } else if (order == X8_HALVES) {
        const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
        const __m512 e0 = _mm512_permutex2var_ps(v[0], ev, v[1]), e1 = _mm512_permutex2var_ps(v[2], ev, v[3]);
        const __m512 o0 = _mm512_permutex2var_ps(v[0], od, v[1]), o1 = _mm512_permutex2var_ps(v[2], od, v[3]);
        v[0] = e0, v[1] = e1, v[2] = o0, v[3] = o1;
    }
    const __m512 iv = _mm512_set1_ps(inv);
    __m512i s = _mm512_setzero_si512(), sr = _mm512_setzero_si512();
    UNROLL for (int i = 0; i < 4; i++) {
        const __m512 t = _mm512_mul_ps(v[i], iv);
        const __m512i qi = _mm512_cvtps_epi32(t);
        s = _mm512_add_epi32(s, qi);
        const size_t at = order == X8_HALVES && i >= 2 ? odd + 16 * (i - 2) : 16 * (size_t)i;
        _mm_storeu_si128((__m128i *)(q + at), _mm512_cvtepi32_epi8(qi));
        if (qr) {
            __m512i ri = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(t, _mm512_cvtepi32_ps(qi)), _mm512_set1_ps(256.f)));
            ri = _mm512_min_epi32(ri, _mm512_set1_epi32(127)); /* t - q = +0.5 exactly: 128 */
            sr = _mm512_add_epi32(sr, ri);
            _mm_storeu_si128((__m128i *)(qr + 16 * i), _mm512_cvtepi32_epi8(ri));
        }
    }
    *sum = _mm512_reduce_add_epi32(s) * (qr ? 256 : 1) + (qr ? _mm512_reduce_add_epi32(sr) : 0);
    return qr ? amax / 127.f / 256.f : amax / 127.f;
}
#endif

/* ---- thread pool (threadpool.c) ------------------------------------------------------ */

#define MAXTH 64
typedef void (*task_fn)(void *ctx, int ith, int nth);
/* Run fn(ctx, i, nth) for i in [0, nth): i = 0 on the calling thread. */
VLMC_INTERNAL void run_parallel(task_fn fn, void *ctx, int nth);

/* most rows per scheduling chunk (sizes gemv.c's partial-sum buffer): long sequential runs
 * per thread stream faster than many short ones */
#ifndef CHUNK_MAX
#define CHUNK_MAX 2048
#endif

/* rows per scheduling chunk: multiple of 4, ~8 chunks per thread, >= 16 rows */
static MAYBE_UNUSED int pick_chunk(int N, int nth) {
    int c = N / (nth * 8);
    if (c < 16) c = 16;
    if (c > CHUNK_MAX) c = CHUNK_MAX;
    return (c + 3) & ~3;
}

/* bytes of W below which threading costs more than it saves */
#define MIN_BYTES_PER_THREAD (96 * 1024)

static MAYBE_UNUSED int eff_threads(int n_threads, double wbytes, int N) {
    int nth = n_threads < 1 ? 1 : n_threads;
    int by_size = (int)(wbytes / MIN_BYTES_PER_THREAD);
    if (by_size < 1) by_size = 1;
    if (nth > by_size) nth = by_size;
    if (nth > (N + 15) / 16) nth = (N + 15) / 16;
    return nth < 1 ? 1 : nth;
}

/* the arguments of a quantized weight (gemv.c, dequant.c): 0, or why not */
static MAYBE_UNUSED int check_q(int K, int N, int bits, int gs, int st) {
    if (K < 1 || N < 1) return -1;
    if (bits < 2 || bits > 8 || bits == 7) return -2;
    if (gs < 8 || gs % 8 || K % gs) return -3;
    if ((size_t)K * bits % 32) return -3;
    if (st < 0 || st > 2) return -4;
    return 0;
}

/* one row of codes dequantized to float32, any width (dequant.c; the portable GEMV path) */
VLMC_INTERNAL void dequant_row_generic(const uint8_t *row, int K, int bits, int gs, const void *sc, const void *bi,
                                       int st, size_t goff, float *out);

/* ---- KV caches (kv_attention.c) ------------------------------------------------------- */

/* rows of affine codes with their bfloat16 scales and minimums (vlmc.runtime.kv_codecs.Affine) */
typedef struct {
    const uint8_t *codes;
    const uint16_t *scales, *mins;
} kv_codes;

/* vlmc_kv_affine_decode_n with rows held - T .. held - 1 of every (sequence, KV head)
 * taken from xk / xv ([B, HKV, T, *] each; both NULL: none), not from the cache, which then
 * holds the held - T rows before them; out [B, T, H, D] where tok_major, else [B, H, T, D] */
VLMC_INTERNAL int kv_affine_decode_x(const float *q, const uint8_t *kc, const uint16_t *ks, const uint16_t *kb,
                                     const uint8_t *vc, const uint16_t *vs, const uint16_t *vb, const kv_codes *xk,
                                     const kv_codes *xv, const int32_t *starts, int B, int H, int HKV, int D, int T,
                                     int cap, int held, int bits, int gs, float scale, int window, float softcap,
                                     float *out, int tok_major, int n_threads);
/* vlmc_kv_dense_decode_n, out [B, T, H, D] where tok_major */
VLMC_INTERNAL int kv_dense_decode_t(const float *q, const float *k, const float *v, const float *xk, const float *xv,
                                    const int32_t *starts, int B, int H, int HKV, int D, int T, int cap, int held,
                                    float scale, int window, float softcap, float *out, int tok_major, int n_threads);
/* rows of TurboQuant codes with their float32 norms (vlmc.runtime.kv_codecs.Turbo) */
typedef struct {
    const uint8_t *codes;
    const float *norms;
} kv_turbo;
/* vlmc_kv_turbo_decode_n with this step's rows from xk / xv (as kv_affine_decode_x), a
 * sliding window, soft-capped scores; out [B, T, H, D] where tok_major */
VLMC_INTERNAL int kv_turbo_decode_x(const float *q, const uint8_t *kc, const float *kn, const uint8_t *vc,
                                    const float *vn, const float *kcb, const float *vcb, const kv_turbo *xk,
                                    const kv_turbo *xv, const int32_t *starts, int B, int H, int HKV, int D, int T,
                                    int cap, int held, int kbits, int vbits, float scale, int window, float softcap,
                                    float *out, int tok_major, int n_threads);
/* kv_turbo.c: y = x @ M per row of D; TurboQuant codes and norms of rows (tmp: D floats) */
VLMC_INTERNAL void kv_rotate_rows(const float *x, size_t rows, int D, const float *M, float *y);
VLMC_INTERNAL void kv_turbo_encode_rows(const float *x, size_t rows, int D, int bits, const float *R,
                                        const float *cb, uint8_t *codes, float *norms, float *tmp);
/* vlmc_kv_affine_encode without the argument checks */
VLMC_INTERNAL void kv_affine_encode_rows(const float *x, size_t rows, int D, int bits, int gs, uint8_t *codes,
                                         uint16_t *scales, uint16_t *mins);

/* ---- decode_layer.c's description of a layer ------------------------------------------ */

/* A projection: float32 [N, K], bfloat16 [N, K] (raw uint16) or affine codes with their
 * scales/biases (float32 or bfloat16, st as vlmc_gemv_q); bias [N] float32 or NULL. */
typedef struct {
    int kind; /* 0 float32, 1 bfloat16, 2 affine codes */
    int N, K, bits, gs, st;
    const void *w, *scales, *biases;
    const float *bias;
} vlmc_proj;

/* A decoder layer: pre-norm attention and gated MLP (Llama, Qwen2), with the options of the
 * Gemma and Qwen3 layers: QK-norm (RMSNorm over each query / key head before rotary),
 * sandwich norms (the attention's and the MLP's outputs normed before their residual adds),
 * soft-capped attention scores. Norm weights are final (Gemma's 1 + w folded at compile time). */
typedef struct {
    int hidden, heads, kv_heads, head_dim, inter; /* inter: the MLP's gate (= up) width */
    float eps1, eps2, scale, act_a, act_c;        /* act_a, act_c: SIGMOID_SCALE of the activation */
    float eps_q, eps_k, eps_pa, eps_pf;           /* the optional norms' epsilons */
    float softcap;                                /* > 0: attention scores soft-capped */
    const float *norm1, *norm2;                   /* [hidden]: before attention, before the MLP */
    const float *q_norm, *k_norm;                 /* [head_dim] or NULL: QK-norm */
    const float *post_attn, *post_ff;             /* [hidden] or NULL: sandwich norms */
    vlmc_proj qkv, o, gate_up, down;
    /* options any family may combine (Gemma 4 uses them all) */
    int v_norm;                                   /* 1: values RMS-normed per head, by v_norm_w (NULL: unscaled) */
    float eps_v;
    const float *v_norm_w;                        /* [head_dim] or NULL */
    int shared;                                   /* 1: qkv makes queries only; the attention reads the tokens
                                                   * kv holds (another layer wrote this step's) and stores none */
    int ple_dim;                                  /* > 0: after the MLP, a per-layer input branch of that width:
                                                   * out += ple_norm(ple_proj(act(ple_gate(out)) * input)) */
    float ple_act_a, ple_act_c, eps_ple;          /* its activation (SIGMOID_SCALE) and norm epsilon */
    const float *ple_norm;                        /* [hidden] */
    vlmc_proj ple_gate, ple_proj;                 /* [ple_dim, hidden], [hidden, ple_dim] */
    const float *out_scale;                       /* [1] or NULL: the layer's output times this scalar */
    /* Qwen3.5's gated attention */
    int rope_dim;                                 /* > 0: rotary on the first rope_dim of each head only */
    int q_gate;                                   /* 1: each query head's qkv columns are [q (D), gate (D)];
                                                   * the attention output times sigmoid(gate) */
} vlmc_layer;

/* Stacked expert weights (moe.c): expert e's [N, K] projection is p with its w, scales and
 * biases advanced by e times these byte strides. */
typedef struct {
    vlmc_proj p;
    int64_t w_stride, s_stride, b_stride;
} vlmc_experts;

/* A mixture-of-experts layer's routed experts: gate_up [E, 2 inter, hidden] (gate rows
 * first), down [E, hidden, inter]; act_a, act_c: SIGMOID_SCALE of the activation */
typedef struct {
    int experts, hidden, inter;
    float act_a, act_c;
    vlmc_experts gate_up, down;
} vlmc_moe;

/* A layer's KV cache as vlmc_decode_layers reads and extends it (bindings.py mirrors it) */
enum { VLMC_KV_DENSE = 0, VLMC_KV_AFFINE = 1, VLMC_KV_TURBO = 2 };
typedef struct {
    void *k, *v;                      /* dense: float32 [B, HKV, cap, D]; affine: codes [B, HKV, cap, D * bits / 8] */
    uint16_t *ks, *kb, *vs, *vb;      /* affine: bfloat16 scales and minimums [B, HKV, cap, D / gs] */
    void *nk, *nv;                    /* out: this step's keys and values as stored, [B, HKV, T, D] / [B, HKV, T, D * bits / 8] */
    uint16_t *nks, *nkb, *nvs, *nvb;  /* out, affine: their scales and minimums [B, HKV, T, D / gs] */
    const float *cs, *sn;             /* the layer's rotary tables (its own base: Gemma 3's local layers), NULL: the call's */
    const int32_t *starts;            /* each sequence's first visible key as a column of this cache */
    int32_t layout;                   /* VLMC_KV_DENSE or VLMC_KV_AFFINE */
    int32_t bits, gs;                 /* affine: 4 or 8 bits, groups of gs (dividing D) */
    int32_t cap, held;                /* buffer columns; tokens held before this step (>= 1) */
    int32_t inplace;                  /* also write this step's T tokens into columns held .. held + T - 1 */
    int32_t window;                   /* > 0: a sliding window (a rotating cache, its oldest rows first) */
    /* TurboQuant (VLMC_KV_TURBO): k, v codes [B, HKV, cap, D * kbits / 8] / [.., D * vbits / 8], nk, nv
     * this step's; the attention runs in the rotated space (q R_k, its output times R_v^T) */
    const float *kn, *vn;             /* float32 norms [B, HKV, cap] */
    float *nkn, *nvn;                 /* out: this step's norms [B, HKV, T] */
    const float *krot, *vrot, *vrot_t; /* [D, D]: R_k, R_v (y = x R), R_v^T */
    const float *kcb, *vcb;           /* codebooks of 2^kbits / 2^vbits levels */
    int32_t kbits, vbits;
} vlmc_kv;

/* ---- exported functions (0 on success, a negative code for bad arguments or no memory,
 * unless stated otherwise) ------------------------------------------------------------ */

/* probe.c */
int vlmc_abi_version(void);
int vlmc_simd(void);
float vlmc_stream_read(const float *p, int64_t n, int n_threads);
/* threadpool.c */
void vlmc_set_spin_us(int us);
/* gemv.c */
int vlmc_gemv_f32(const float *x, int M, int K, const float *w, int N, const float *bias, float *y, int n_threads);
int vlmc_gemv_bf16(const float *x, int M, int K, const uint16_t *w, int N, const float *bias, float *y,
                   int n_threads);
int vlmc_gemv_q(const float *x, int M, int K, const uint32_t *w, const void *scales, const void *biases, int st,
                int N, int bits, int gs, const float *bias, float *y, int n_threads);
void vlmc_set_int8_x(int on);
void vlmc_set_x8_residual(int on);
int vlmc_int8_x_available(void);
int vlmc_packed_direct(void);
/* dequant.c */
int vlmc_dequantize(const uint32_t *w, const void *scales, const void *biases, int st, int N, int K, int bits,
                    int gs, float *out, int n_threads);
void vlmc_bf16_to_f32(const uint16_t *src, int64_t n, float *dst, int n_threads);
/* kv_attention.c */
int vlmc_kv_dense_decode(const float *q, const float *k, const float *v, const float *xk, const float *xv,
                         const int32_t *starts, int B, int H, int HKV, int D, int cap, int held, float scale,
                         int window, float softcap, float *out, int n_threads);
int vlmc_kv_affine_decode(const float *q, const uint8_t *kc, const uint16_t *ks, const uint16_t *kb,
                          const uint8_t *vc, const uint16_t *vs, const uint16_t *vb, const int32_t *starts,
                          int B, int H, int HKV, int D, int cap, int held, int bits, int gs, float scale,
                          int window, float softcap, float *out, int n_threads);
int vlmc_kv_turbo_decode(const float *q, const uint8_t *kc, const float *kn, const uint8_t *vc, const float *vn,
                         const float *kcb, const float *vcb, const int32_t *starts, int B, int H, int HKV, int D,
                         int cap, int held, int kbits, int vbits, float scale, float *out, int n_threads);
int vlmc_kv_affine_encode(const float *x, int64_t rows, int D, int bits, int gs, uint8_t *codes, uint16_t *scales,
                          uint16_t *mins);
/* kv_turbo.c */
int vlmc_kv_turbo_encode(const float *x, int64_t rows, int D, int bits, const float *R, const float *cb,
                         uint8_t *codes, float *norms);
int vlmc_kv_rotate(const float *x, int64_t rows, int D, const float *M, float *y);
/* T query tokens per sequence: q [B, H, T, D] -> out [B, H, T, D]; the last T of the held
 * rows are this step's, and query t sees the keys before row held - T + 1 + t (and, with a
 * window > 0, none before row held - T + 1 + t - window); softcap > 0: soft-capped scores */
int vlmc_kv_dense_decode_n(const float *q, const float *k, const float *v, const float *xk, const float *xv,
                           const int32_t *starts, int B, int H, int HKV, int D, int T, int cap, int held,
                           float scale, int window, float softcap, float *out, int n_threads);
int vlmc_kv_affine_decode_n(const float *q, const uint8_t *kc, const uint16_t *ks, const uint16_t *kb,
                            const uint8_t *vc, const uint16_t *vs, const uint16_t *vb, const int32_t *starts,
                            int B, int H, int HKV, int D, int T, int cap, int held, int bits, int gs, float scale,
                            int window, float softcap, float *out, int n_threads);
int vlmc_kv_turbo_decode_n(const float *q, const uint8_t *kc, const float *kn, const uint8_t *vc, const float *vn,
                           const float *kcb, const float *vcb, const int32_t *starts, int B, int H, int HKV, int D,
                           int T, int cap, int held, int kbits, int vbits, float scale, float *out, int n_threads);
/* attention_rows.c */
int vlmc_attention_rows_available(void);
int vlmc_attention_rows(const float *q, int64_t q_sh, int64_t q_sl, const float *k, int64_t k_sh, int64_t k_sl,
                        const float *v, int64_t v_sh, int64_t v_sl, float *out, int64_t o_sh, int64_t o_sl,
                        int64_t Hq, int64_t Hk, int64_t L, int64_t S, int64_t D, int64_t Dv, float scale,
                        const uint8_t *keep, int64_t keep_ld, int n_threads);
/* attention_lanes.c */
int vlmc_attention_lanes(const float *q, int64_t q_sh, int64_t q_sl, const float *k, int64_t k_sh, int64_t k_sl,
                         const float *v, int64_t v_sh, int64_t v_sl, float *out, int64_t o_sh, int64_t o_sl,
                         int64_t Hq, int64_t Hk, int64_t L, int64_t S, int64_t D, int64_t Dv, float scale,
                         int bf16, int n_threads);
/* gemm_i8.c */
int vlmc_gemm_q_i8_available(void);
int vlmc_gemm_q_i8(const float *x, int M, int K, const uint32_t *w, const void *scales, const void *biases, int st,
                   int N, int bits, int gs, const float *bias, float *y, int n_threads);
/* elementwise.c */
/* softmax(scale * s) of one row in place; keep[c] = 0 masks key c (NULL: none) */
VLMC_INTERNAL void softmax_row(float *s, long cols, float scale, const uint8_t *keep);
int vlmc_softmax_rows(float *s, int64_t rows, int64_t cols, float scale, const uint8_t *keep, int64_t keep_rows,
                      int n_threads);
int vlmc_sigmoid_gate(const float *x, int64_t x_ld, const float *up, int64_t up_ld, float *out, int64_t rows,
                      int64_t cols, float a, float c, int n_threads);
int vlmc_norm(const float *x, int64_t rows, int64_t cols, const float *w, const float *b, float eps, int layer,
              float *out, int n_threads);
int vlmc_rope(const float *x, int64_t A, int64_t H, int64_t L, int64_t D, int64_t sa, int64_t sh, int64_t sl,
              const float *cs, const float *sn, int64_t ca, int64_t cl, float *out, int n_threads);
/* decode_layer.c */
int vlmc_decode_layers(const vlmc_layer *const *L, const vlmc_kv *kv, int nl, const float *x, const float *normed,
                       int B, int T, const float *cs, const float *sn, int64_t ca, int64_t cl,
                       const float *const *inputs, int64_t in_ld, float *out, int n_threads);
/* affine_search.c */
int vlmc_affine_search(const float *w, int N, int K, int gs, int bits, const float *s0, const float *b0,
                       const float *shrink, int nshrink, int nrefit, float *scales, float *biases, int n_threads);
int vlmc_affine_codes(const float *w, int N, int K, int gs, int bits, const float *scales, const float *biases,
                      uint8_t *out, int n_threads);

/* moe.c */
int vlmc_moe_experts(const vlmc_moe *moe, const float *x, int M, int topk, const int32_t *idx, const float *wts,
                     float *out, int n_threads);

/* ---- deltanet.c: a Gated DeltaNet layer's decode step ---------------------------------- */

/* decode_layer.c's projection runner (f32 / bf16 / affine codes GEMV), shared */
VLMC_INTERNAL int vlmc_proj_run(const vlmc_proj *p, const float *x, int M, float *y, int n_threads);

/* A Gated DeltaNet decoder layer (pre-norm linear attention + gated MLP, Qwen3.5's): the
 * in-projections of the conv channels (q, k, v: C = 2 Hk Dk + Hv Dv), the output gate z
 * [Hv Dv], the rate b and decay a [Hv]; the conv taps [C, K]; the gated norm's weight [Dv]. */
typedef struct {
    int hidden, key_heads, value_heads, key_dim, value_dim, conv_kernel, inter;
    float eps1, eps2, eps_o, scale, act_a, act_c; /* eps_o: the gated norm's; scale: the queries' */
    const float *norm1, *norm2, *conv_w, *a_log, *dt_bias, *o_norm;
    vlmc_proj qkv, z, b, a, out, gate_up, down;
} vlmc_deltanet;
/* deltanet.c, shared with deltanet_prompt.c: one token's l2-normed q and k rows per value head */
void dn_qk_heads(const vlmc_deltanet *L, const float *cv, float *q, float *k, size_t stride);

/* A layer's recurrent cache as vlmc_deltanet_layers reads it (before) and writes its step
 * (after, and the step's inputs a rewind replays) */
typedef struct {
    const float *conv, *state; /* [B, K-1, C], [B, Hv, Dk, Dv] */
    float *rows, *conv_out, *state_out; /* [B, C] conv inputs, [B, K-1, C], [B, Hv, Dk, Dv] */
    float *k, *v, *g, *beta;   /* [B, Hv, Dk] (l2-normed), [B, Hv, Dv], [B, Hv], [B, Hv] */
} vlmc_dn_state;

int vlmc_deltanet_layers(const vlmc_deltanet *const *L, const vlmc_dn_state *st, int nl, const float *x,
                         const float *normed, int B, float *out, int n_threads);

/* deltanet_prompt.c: a prompt chunk's conv, heads, gates, recurrence and gated norm (T
 * tokens per sequence; st's rows are read, its records are [B, Hv, T, *]) */
int vlmc_deltanet_prompt(const vlmc_deltanet *L, const vlmc_dn_state *st, int B, int T, const float *a,
                         const float *b, float *z, float *o, float *work, int n_threads);

/* ---- moe.c: a whole MoE block's decode step ------------------------------------------ */
/* A whole mixture-of-experts block (Qwen3.5-MoE, Qwen3-MoE): the router [experts, hidden],
 * softmax, top_k (renormalised when normalize), the routed experts, and when shared_inter
 * > 0 the shared expert (gate_up [2 shared_inter, hidden], down [hidden, shared_inter]; the
 * strides of these two unused) times sigmoid(shared_gate [1, hidden] x) */
typedef struct {
    vlmc_moe moe;
    vlmc_proj router;
    int top_k, normalize, shared_inter;
    vlmc_experts shared_gate_up, shared_down;
    vlmc_proj shared_gate;
} vlmc_moe_layer;
int vlmc_moe_block(const vlmc_moe_layer *L, const float *x, int M, float *out, int32_t *experts, float *weights,
                   int n_threads);

/* moe.c: the block with the router reading its own input router_x (NULL: x) and each chosen
 * expert's weight times expert_scale[expert] after the renormalisation (NULL: none) */
int vlmc_moe_block_ex(const vlmc_moe_layer *L, const float *x, const float *router_x, const float *expert_scale,
                      int M, float *out, int32_t *experts, float *weights, int n_threads);

/* ---- amx.c: whether the AMX tile kernels run ----------------------------------------- */
/* The mode in effect (amx.c): 0 off (also where the library lacks the AMX kernels, or the
 * CPU, the OS or the process's permission rules them out), 1 (the default) jobs of 5+ x
 * rows of 8-bit codes and 9+ of 4-bit codes, 2 every job of 2 or more x rows.
 * VLMC_CPU_AMX sets the first mode. */
int vlmc_amx(void);
/* set the mode (0, 1 or 2); returns vlmc_amx() */
int vlmc_set_amx(int mode);
VLMC_INTERNAL int amx_mode(void);

#endif /* VLMC_H */
