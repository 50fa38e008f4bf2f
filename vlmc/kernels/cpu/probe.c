/* vlmc CPU kernels: what the library was built for (its ABI number, whether the SIMD
 * paths are compiled in) and the machine's streaming read bandwidth, the roofline that
 * decode GEMVs are measured against (benchmarks/cpu_kernels.py). */
#include "vlmc.h"

int vlmc_abi_version(void) { return VLMC_ABI; }
int vlmc_simd(void) { return VLMC_SIMD; }

/* ---- streaming read of a buffer (measures the machine's read bandwidth) -------------- */
typedef struct { const float *p; int64_t n; float part[MAXTH]; } rd_t;

static void read_task(void *ctx, int ith, int nth) {
    rd_t *R = ctx;
    int64_t per = ((R->n + nth - 1) / nth + 63) & ~(int64_t)63, i0 = per * ith, i1 = i0 + per < R->n ? i0 + per : R->n;
    float s = 0.f;
    int64_t i = i0;
#if VLMC_SIMD
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 32 <= i1; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps(R->p + i));
        a1 = _mm256_add_ps(a1, _mm256_loadu_ps(R->p + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_loadu_ps(R->p + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_loadu_ps(R->p + i + 24));
    }
    s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; i < i1; i++) s += R->p[i];
    R->part[ith] = s;
}

float vlmc_stream_read(const float *p, int64_t n, int n_threads) {
    rd_t R = {p, n, {0}};
    int nth = n_threads < 1 ? 1 : n_threads > MAXTH ? MAXTH : n_threads;
    run_parallel(read_task, &R, nth);
    float s = 0.f;
    for (int i = 0; i < nth; i++) s += R.part[i];
    return s;
}
