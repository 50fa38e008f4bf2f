// kv_turbo_decode (CUDA body for mx.fast.cuda_kernel): one decode step's attention over a
// TurboQuant-coded KV cache in the rotated space, reading the codes in place, split into
// chunks of CHUNK tokens (see kv_common.cu).
// Inputs: q_rot [B, H, D] float32 (q @ R); k_codes [B, HKV, CAP, D*KBITS/8], v_codes
// [B, HKV, CAP, D*VBITS/8] uint8; k_norms, v_norms [B, HKV, CAP, 1] float32; k_codebook
// [2**KBITS], v_codebook [2**VBITS] float32; starts [B] int32; held [1] int32; scale [1]
// float32. Outputs, NCH = ceil(held / CHUNK): partial [B, H, NCH, D] float32 (rotated:
// multiply the merged output by R^T) and stats [B, H, NCH, 2] float32, as in
// kv_affine_decode.cu. Template: H, HKV, D, KBITS, VBITS (2-4), CHUNK, BLOCK.
// Reference: vlmc.kernels.kv_quant.kv_turbo_decode (after merge_chunks). Helpers: kv_common.cu.
constexpr int G = H / HKV;
constexpr int WARPS = BLOCK / 32;
constexpr int KROW = D * KBITS / 8;
constexpr int VROW = D * VBITS / 8;
__shared__ float qs[G][D];
__shared__ float p[G][CHUNK];
__shared__ float kcb[1 << KBITS];
__shared__ float vcb[1 << VBITS];
const int n = held[0];
const int nch = (n + CHUNK - 1) / CHUNK;
const int c = blockIdx.x % nch;
const int bk = blockIdx.x / nch;  // sequence * HKV + KV head
const int b = bk / HKV;
const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
const int cap = k_codes_shape[2];
const int c0 = c * CHUNK;
const int lo = max(c0, starts[b]), hi = min(c0 + CHUNK, n);
const size_t base = (size_t)bk * cap;
const size_t row = (size_t)b * H + (bk % HKV) * G;  // first query head served
const float unit = rsqrtf((float)D);
for (int i = t; i < G * D; i += BLOCK) qs[i / D][i % D] = q_rot[row * D + i] * scale[0];
for (int i = t; i < (1 << KBITS); i += BLOCK) kcb[i] = k_codebook[i];
for (int i = t; i < (1 << VBITS); i += BLOCK) vcb[i] = v_codebook[i];
__syncthreads();
for (int i = c0 + warp; i < c0 + CHUNK; i += WARPS) {  // scores: a warp per key, lanes along D
  float s[G];
  for (int h = 0; h < G; ++h) s[h] = 0.0f;
  if (i >= lo && i < hi) {
    const uint8_t* codes = k_codes + (base + i) * KROW;
    for (int j = lane; j < D; j += 32) {
      const float k = kcb[kv_code(codes, j, KBITS)];
      for (int h = 0; h < G; ++h) s[h] += qs[h][j] * k;
    }
    const float norm = k_norms[base + i] * unit;
    for (int h = 0; h < G; ++h) s[h] = kv_warp_sum(s[h]) * norm;
  }
  if (lane == 0) {
    for (int h = 0; h < G; ++h) p[h][i - c0] = (i >= lo && i < hi) ? s[h] : __int_as_float(0xff800000);
  }
}
__syncthreads();
kv_chunk_softmax<G, CHUNK, WARPS>(p, stats, row, nch, c, lane, warp);
__syncthreads();
for (int d = t; d < D; d += BLOCK) {  // values: a thread per coordinate, every head at once
  float acc[G];
  for (int h = 0; h < G; ++h) acc[h] = 0.0f;
  for (int i = lo; i < hi; ++i) {
    const float v = v_norms[base + i] * vcb[kv_code(v_codes + (base + i) * VROW, d, VBITS)];
    for (int h = 0; h < G; ++h) acc[h] += p[h][i - c0] * v;
  }
  for (int h = 0; h < G; ++h) partial[((row + h) * nch + c) * D + d] = acc[h] * unit;
}
