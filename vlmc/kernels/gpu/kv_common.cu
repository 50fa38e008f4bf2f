// Helpers shared by the KV decode kernels (kv_affine_decode.cu, kv_turbo_decode.cu): the
// kernel loader puts this file in front of each kernel's header.
//
// Both kernels split a decode step's attention over the cached tokens (flash-decoding):
// one block of BLOCK threads per (sequence, KV head, chunk of CHUNK tokens) serves the
// G = H / HKV query heads that share that KV head, so every code is read once per step
// and a long cache spreads over many blocks. Each block writes its chunk's unnormalised
// partial output and softmax statistics; vlmc.kernels.kv_quant.merge_chunks combines the
// chunks exactly (log-sum-exp), which is where the output is normalised.

// Code j of a row packed as vlmc.kernels.kv_quant.pack: 8-bit codes are bytes; narrower
// ones come 8 to a run of `bits` bytes, code i at bit i * bits of their little-endian word.
__device__ inline uint32_t kv_code(const uint8_t* row, int j, int bits) {
  if (bits == 8) return row[j];
  const uint8_t* g = row + (j >> 3) * bits;
  uint32_t w = g[0] | ((uint32_t)g[1] << 8);
  if (bits > 2) w |= (uint32_t)g[2] << 16;
  if (bits > 3) w |= (uint32_t)g[3] << 24;
  return (w >> ((j & 7) * bits)) & ((1u << bits) - 1);
}

__device__ inline float kv_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ inline float kv_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Softmax statistics of one chunk, a warp per query head: row h of p holds CHUNK scores
// (-infinity where masked) and becomes exp(p - m); stats gets (m, sum of exp(p - m)) at
// [row + h, c]. A chunk with no visible key stores (-1e30, 0), which the merge ignores.
template <int G, int CHUNK, int WARPS>
__device__ inline void kv_chunk_softmax(float (*p)[CHUNK], float* stats, size_t row, int nch, int c, int lane,
                                        int warp) {
  const float neg_inf = __int_as_float(0xff800000);
  for (int h = warp; h < G; h += WARPS) {
    float m = neg_inf;
    for (int i = lane; i < CHUNK; i += 32) m = fmaxf(m, p[h][i]);
    m = kv_warp_max(m);
    float total = 0.0f;
    for (int i = lane; i < CHUNK; i += 32) {
      const float e = m == neg_inf ? 0.0f : expf(p[h][i] - m);
      p[h][i] = e;
      total += e;
    }
    total = kv_warp_sum(total);
    if (lane == 0) {
      stats[((row + h) * nch + c) * 2] = m == neg_inf ? -1e30f : m;
      stats[((row + h) * nch + c) * 2 + 1] = total;
    }
  }
}
