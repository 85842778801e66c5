// Per-row statistics and row combinations: the O(rows x dim) part of the representation
// objectives (the triplet loss's distances and their gradients; objectives/triplet.rs), so the
// captured hidden states never leave the GPU. The hinge and the weights run on the host over
// the O(rows) statistics.
// CPU twin: src/backend/cpu/rows.rs; launcher: src/backend/cuda/rows.rs.
//
// Contract (row-major; x, y, v side tensors: f32 or bf16 per flag)
//   row_stats
//     x [rows, dim]; y [rows, dim], or [dim] when y_vec (the same vector for every row);
//     scale [rows] f32 or null (all 1). With a = scale_r x_r and b = scale_r y_r (b = y when
//     y_vec: not scaled):
//       stats [rows, 4] f32 (=) = (|a|^2, |b|^2, a.b, |a - b|^2), each summed in f64
//     (|a - b|^2 summed directly, so equal rows give exactly 0: the L2 distance's gradient
//     needs that).
//     grid = rows, block = 256.
//   row_combine
//     out [rows, dim] (= or += per accumulate) = cx_r x_r + cy_r y_r + cv_r v
//     x, y [rows, dim], v [dim]; cx, cy, cv [rows] f32; a term whose tensor or coefficient
//     pointer is null is skipped. f32 math; out f32 or bf16 (out_f32).
//     grid = rows, block = 256.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256)
    row_stats(const void* __restrict__ x, int x_f32, const void* __restrict__ y, int y_f32, int y_vec,
              const float* __restrict__ scale, int dim, float* __restrict__ stats) {
  const long long r = blockIdx.x;
  const float s = scale ? scale[r] : 1.0f;
  const float sy = y_vec ? 1.0f : s;
  const long long xo = r * dim, yo = y_vec ? 0 : r * dim;
  double aa = 0.0, bb = 0.0, ab = 0.0, dd = 0.0;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    const double a = (double)(s * load_side(x, x_f32, xo + c));
    const double b = (double)(sy * load_side(y, y_f32, yo + c));
    aa += a * a;
    bb += b * b;
    ab += a * b;
    dd += (a - b) * (a - b);
  }
  __shared__ double part[4][8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  aa = warp_sum(aa);
  bb = warp_sum(bb);
  ab = warp_sum(ab);
  dd = warp_sum(dd);
  if (lane == 0) {
    part[0][warp] = aa;
    part[1][warp] = bb;
    part[2][warp] = ab;
    part[3][warp] = dd;
  }
  __syncthreads();
  if (threadIdx.x < 4) {
    double t = 0.0;
    for (int w = 0; w < nwarps; w++) t += part[threadIdx.x][w];
    stats[r * 4 + threadIdx.x] = (float)t;
  }
}

extern "C" __global__ void __launch_bounds__(256)
    row_combine(void* __restrict__ out, int out_f32, int accumulate, const void* __restrict__ x, int x_f32,
                const float* __restrict__ cx, const void* __restrict__ y, int y_f32, const float* __restrict__ cy,
                const void* __restrict__ v, int v_f32, const float* __restrict__ cv, int dim) {
  const long long r = blockIdx.x, o = r * dim;
  const float ax = (x && cx) ? cx[r] : 0.0f;
  const float ay = (y && cy) ? cy[r] : 0.0f;
  const float av = (v && cv) ? cv[r] : 0.0f;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float t = accumulate ? load_side(out, out_f32, o + c) : 0.0f;
    if (ax != 0.0f) t += ax * load_side(x, x_f32, o + c);
    if (ay != 0.0f) t += ay * load_side(y, y_f32, o + c);
    if (av != 0.0f) t += av * load_side(v, v_f32, c);
    store_any(out, out_f32, o + c, t);
  }
}
