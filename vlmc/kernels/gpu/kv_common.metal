// Helpers shared by the KV decode kernels (kv_affine_decode.metal, kv_turbo_decode.metal):
// the kernel loader puts this file in front of each kernel's header. The chunked scheme
// (a threadgroup per sequence, KV head and chunk of CHUNK tokens) is described in
// kv_common.cu.

// Code j of a row packed as vlmc.kernels.kv_quant.pack (see kv_common.cu).
inline uint kv_code(const device uint8_t* row, int j, int bits) {
  if (bits == 8) return uint(row[j]);
  const device uint8_t* g = row + (j >> 3) * bits;
  uint w = uint(g[0]) | (uint(g[1]) << 8);
  if (bits > 2) w |= uint(g[2]) << 16;
  if (bits > 3) w |= uint(g[3]) << 24;
  return (w >> ((j & 7) * bits)) & ((1u << bits) - 1);
}

// Softmax statistics of one chunk, a simdgroup per query head: p[h * CHUNK + i] holds the
// scores (-infinity where masked) and becomes exp(p - m); stats gets (m, sum) at
// [row + h, c]; a chunk with no visible key stores (-1e30, 0), which the merge ignores.
template <int G, int CHUNK, int WARPS>
inline void kv_chunk_softmax(threadgroup float* p, device float* stats, size_t row, int nch, int c, int lane,
                             int warp) {
  for (int h = warp; h < G; h += WARPS) {
    float m = -INFINITY;
    for (int i = lane; i < CHUNK; i += 32) m = max(m, p[h * CHUNK + i]);
    m = simd_max(m);
    float total = 0.0f;
    for (int i = lane; i < CHUNK; i += 32) {
      const float e = m == -INFINITY ? 0.0f : metal::exp(p[h * CHUNK + i] - m);
      p[h * CHUNK + i] = e;
      total += e;
    }
    total = simd_sum(total);
    if (lane == 0) {
      stats[((row + h) * nch + c) * 2] = m == -INFINITY ? -1e30f : m;
      stats[((row + h) * nch + c) * 2 + 1] = total;
    }
  }
}
