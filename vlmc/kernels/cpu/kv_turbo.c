/* vlmc CPU kernels: TurboQuant KV codes (vlmc.runtime.kv_codecs.Turbo) written in C, and
 * the rotations into and out of their space.
 *
 * A decode step over TurboQuant caches rotates each query head into the keys' space (q R_k),
 * attends there over the codes (kv_attention.c) and rotates the output back (out R_v^T);
 * the step's keys and values are rotated and coded here. Through MLX these were ~10 small
 * ops per layer and step, outside the one-call decoder stack (decode_layer.c), which cost a
 * 28-layer decoder more than its attention at 4k tokens of context.
 *
 * Every row is computed alone in a fixed order (a rotation sums over d in order, 16 output
 * lanes at a time), so a row's codes and rotated values do not depend on how many rows a
 * call holds: a prompt coded in chunks or in a batch gives the bytes a lone decode step
 * gives. MLX's encode (a BLAS matmul) rounds the rotation differently: a coordinate within
 * float32 rounding of a codebook boundary may take the neighbouring code there. */
#include "vlmc.h"

/* y [rows, D] = x [rows, D] @ M (M [D, D] row-major): y_e = sum over d, in order, of x_d M[d][e] */
void kv_rotate_rows(const float *x, size_t rows, int D, const float *M, float *y) {
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * D;
        float *yr = y + r * D;
        for (int e = 0; e < D; e++) yr[e] = 0.f;
        for (int d = 0; d < D; d++) {
            const float a = xr[d];
            const float *m = M + (size_t)d * D;
            for (int e = 0; e < D; e++) yr[e] += a * m[e];
        }
    }
}

/* Codes of rows of D floats: norm = sqrt(sum of x^2, in order), the row rotated by R, times
 * sqrt(D) / max(norm, 1e-30), each coordinate's code the number of codebook midpoints
 * (cb[i] + cb[i + 1]) / 2 below it (NaN: 0), packed as vlmc.kernels.kv_quant.pack (8 codes
 * in `bits` bytes, code i at bit i * bits of their little-endian word). codes [rows, D *
 * bits / 8], norms [rows] float32; tmp: D floats. */
void kv_turbo_encode_rows(const float *x, size_t rows, int D, int bits, const float *R, const float *cb,
                          uint8_t *codes, float *norms, float *tmp) {
    const int nb = (1 << bits) - 1;
    float bounds[15];
    for (int i = 0; i < nb; i++) bounds[i] = (cb[i] + cb[i + 1]) / 2.f;
    const float sd = sqrtf((float)D);
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * D;
        float ss = 0.f;
        for (int d = 0; d < D; d++) ss += xr[d] * xr[d];
        const float nrm = sqrtf(ss), f = sd / fmaxf(nrm, 1e-30f);
        norms[r] = nrm;
        kv_rotate_rows(xr, 1, D, R, tmp);
        uint8_t *cr = codes + r * (size_t)(D * bits / 8);
        for (int g = 0; g < D / 8; g++) {
            uint32_t w = 0;
            for (int i = 0; i < 8; i++) {
                const float u = tmp[g * 8 + i] * f;
                uint32_t c = 0;
                for (int k = 0; k < nb; k++) c += u > bounds[k];
                w |= c << (i * bits);
            }
            for (int k = 0; k < bits; k++) cr[g * bits + k] = (uint8_t)(w >> (8 * k));
        }
    }
}

int vlmc_kv_turbo_encode(const float *x, int64_t rows, int D, int bits, const float *R, const float *cb,
                         uint8_t *codes, float *norms) {
    if (rows < 0 || bits < 2 || bits > 4 || D < 8 || D % 8) return -2;
    float *tmp = malloc(sizeof(float) * (size_t)D);
    if (!tmp) return -5;
    kv_turbo_encode_rows(x, (size_t)rows, D, bits, R, cb, codes, norms, tmp);
    free(tmp);
    return 0;
}

int vlmc_kv_rotate(const float *x, int64_t rows, int D, const float *M, float *y) {
    if (rows < 0 || D < 1 || x == y) return -1;
    kv_rotate_rows(x, (size_t)rows, D, M, y);
    return 0;
}
