// Helpers shared by the KV decode kernels (kv_affine_decode.metal, kv_turbo_decode.metal):
// the kernel loader puts this file in front of each kernel's header.

// Code j of a row packed as vlmc.kernels.kv_quant.pack (see kv_common.cu).
inline uint kv_code(const device uint8_t* row, int j, int bits) {
  if (bits == 8) return uint(row[j]);
  const device uint8_t* g = row + (j >> 3) * bits;
  uint w = uint(g[0]) | (uint(g[1]) << 8);
  if (bits > 2) w |= uint(g[2]) << 16;
  if (bits > 3) w |= uint(g[3]) << 24;
  return (w >> ((j & 7) * bits)) & ((1u << bits) - 1);
}
