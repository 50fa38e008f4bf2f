// Helpers shared by the KV decode kernels (kv_affine_decode.cu, kv_turbo_decode.cu): the
// kernel loader puts this file in front of each kernel's header.

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

// Max (is_max) or sum of v over a block of WARPS warps; red holds WARPS floats of shared
// memory. Every thread gets the result; the barriers also publish earlier global writes.
template <int WARPS>
__device__ inline float kv_block_reduce(float v, bool is_max, float* red, int t) {
  for (int o = 16; o > 0; o >>= 1) {
    float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, other) : v + other;
  }
  __syncthreads();
  if ((t & 31) == 0) red[t >> 5] = v;
  __syncthreads();
  v = red[0];
  for (int w = 1; w < WARPS; ++w) v = is_max ? fmaxf(v, red[w]) : v + red[w];
  return v;
}
