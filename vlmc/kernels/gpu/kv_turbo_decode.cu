// kv_turbo_decode (CUDA body for mx.fast.cuda_kernel): one decode step's attention over a
// TurboQuant-coded KV cache in the rotated space, reading the codes in place.
// Inputs: q_rot [B, H, D] float32 (q @ R); k_codes [B, HKV, CAP, D*KBITS/8], v_codes
// [B, HKV, CAP, D*VBITS/8] uint8; k_norms, v_norms [B, HKV, CAP, 1] float32; k_codebook
// [2**KBITS], v_codebook [2**VBITS] float32; starts [B] int32; held [1] int32; scale [1]
// float32. Outputs: out [B, H, D] float32 (rotated: multiply by R^T); scores [B, H, CAP]
// float32 (scratch). Template: H, HKV, D, KBITS, VBITS (2-4), BLOCK (a multiple of 32).
// Reference: vlmc.kernels.kv_quant.kv_turbo_decode. Helpers: kv_common.cu.
constexpr int WARPS = BLOCK / 32;
constexpr int KROW = D * KBITS / 8;
constexpr int VROW = D * VBITS / 8;
__shared__ float qs[D];
__shared__ float red[WARPS];
__shared__ float kcb[1 << KBITS];
__shared__ float vcb[1 << VBITS];
const int bh = blockIdx.x;
const int b = bh / H;
const int hk = (bh % H) / (H / HKV);
const int t = threadIdx.x;
const int n = held[0];
const int cap = k_codes_shape[2];
const int first = starts[b];
const size_t base = ((size_t)b * HKV + hk) * cap;
const float unit = rsqrtf((float)D);
float* sc = scores + (size_t)bh * cap;
for (int i = t; i < D; i += BLOCK) qs[i] = q_rot[(size_t)bh * D + i] * scale[0];
for (int i = t; i < (1 << KBITS); i += BLOCK) kcb[i] = k_codebook[i];
for (int i = t; i < (1 << VBITS); i += BLOCK) vcb[i] = v_codebook[i];
__syncthreads();
float m = __int_as_float(0xff800000);  // -infinity
for (int i = first + t; i < n; i += BLOCK) {
  const uint8_t* row = k_codes + (base + i) * KROW;
  float dot = 0.0f;
  for (int j = 0; j < D; ++j) dot += qs[j] * kcb[kv_code(row, j, KBITS)];
  const float s = dot * k_norms[base + i] * unit;
  sc[i] = s;
  m = fmaxf(m, s);
}
m = kv_block_reduce<WARPS>(m, true, red, t);
float total = 0.0f;
for (int i = first + t; i < n; i += BLOCK) {
  float e = expf(sc[i] - m);
  sc[i] = e;
  total += e;
}
total = kv_block_reduce<WARPS>(total, false, red, t);  // its barriers also publish every sc[i]
for (int d = t; d < D; d += BLOCK) {
  float acc = 0.0f;
  for (int i = first; i < n; ++i) {
    acc += sc[i] * v_norms[base + i] * vcb[kv_code(v_codes + (base + i) * VROW, d, VBITS)];
  }
  out[(size_t)bh * D + d] = n > first ? acc * unit / total : 0.0f;
}
