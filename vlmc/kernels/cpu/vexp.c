/* vlmc CPU kernels: exp for float32, scalar (exp1) and 8 lanes (exp8); included by gemv.c
 * before the kernels that use it.
 *
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
