// add_rms_norm (Metal body for mx.fast.metal_kernel): h = a + b; y = rms_norm(h) * w.
// One threadgroup of BLOCK threads per row of N elements; float32 accumulation.
// Inputs a, b [rows, N] (T), w [N] (T), eps [1] (float32); outputs h, y [rows, N] (T).
// Template: T (element type), N (row length), BLOCK (threads per row, a multiple of 32).
// Same semantics as vlmc.kernels.reference.add_rms_norm and add_rms_norm.cu.
constexpr int WARPS = BLOCK / 32;
threadgroup float partial[WARPS];
const uint row = threadgroup_position_in_grid.x;
const uint t = thread_position_in_threadgroup.x;
const uint lane = thread_index_in_simdgroup;
const uint warp = simdgroup_index_in_threadgroup;
const device T* ar = a + row * N;
const device T* br = b + row * N;
device T* hr = h + row * N;
device T* yr = y + row * N;
float ss = 0.0f;
for (uint i = t; i < uint(N); i += BLOCK) {
  T v = static_cast<T>(static_cast<float>(ar[i]) + static_cast<float>(br[i]));
  hr[i] = v;
  float f = static_cast<float>(v);
  ss += f * f;
}
ss = simd_sum(ss);
if (lane == 0) partial[warp] = ss;
threadgroup_barrier(mem_flags::mem_threadgroup);
if (warp == 0) {
  ss = lane < uint(WARPS) ? partial[lane] : 0.0f;
  ss = simd_sum(ss);
  if (lane == 0) partial[0] = ss;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
const float inv = metal::rsqrt(partial[0] / N + eps[0]);
for (uint i = t; i < uint(N); i += BLOCK) {
  yr[i] = static_cast<T>(static_cast<float>(hr[i]) * inv * static_cast<float>(w[i]));
}
