// The embedding attack's update: signed-gradient or Adam step on the soft-token embeddings,
// then projection of the perturbation onto an L2 (per row) or L-infinity ball.
// CPU twin: src/attack/pgd.rs (sign_step, adam_step, project); launcher: src/backend/cuda/pgd.rs.
//
// Contract (rows of width dim, row-major)
//   e     [rows, dim] f32, updated in place; init [rows, dim] f32 (the embeddings at step 0)
//   grad  [rows, dim] side tensor (f32 when grad_f32 != 0, else bf16)
//   m, v  [rows, dim] f32 Adam moments (updated in place; may be null when adam == 0)
//   adam == 0:  e -= step * sign(grad)  (sign(0) = 0, like torch.sign)
//   adam == 1:  m = B1 m + (1 - B1) g;  v = B2 v + (1 - B2) g g;
//               e -= step * (m / c1) / (sqrt(v / c2) + 1e-8), B1 = 0.9, B2 = 0.999 (pgd.rs's
//               constants), c1 = 1 - B1^t and c2 = 1 - B2^t from the host
//   ball == 0: none; 1: L2, each row's e - init scaled to norm eps when its norm exceeds eps;
//   2: Linf, e clamped to [init - eps, init + eps].
//   Explicitly rounded intrinsics keep the step bit-identical to the CPU; the L2 norm is a block
//   reduction (another summation order than the CPU's sequential sum: last-bit differences).
// Launch: grid.x = rows, block = 256 (a multiple of 32).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
    pgd_step(float* __restrict__ e, const void* __restrict__ grad, int grad_f32, const float* __restrict__ init,
             float* __restrict__ m, float* __restrict__ v, int dim, int adam, float step, float c1, float c2,
             int ball, float eps) {
  __shared__ float scratch[32];
  constexpr float B1 = 0.9f, B2 = 0.999f, EPS = 1e-8f;
  const long long base = (long long)blockIdx.x * dim;
  float ss = 0.0f;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    const long long i = base + c;
    const float g = load_side(grad, grad_f32, i);
    float x = e[i];
    if (!adam) {
      if (g > 0.0f) {
        x = __fsub_rn(x, step);
      } else if (g < 0.0f) {
        x = __fadd_rn(x, step);
      }
    } else {
      const float mi = __fadd_rn(__fmul_rn(B1, m[i]), __fmul_rn(1.0f - B1, g));
      const float vi = __fadd_rn(__fmul_rn(B2, v[i]), __fmul_rn(__fmul_rn(1.0f - B2, g), g));
      m[i] = mi;
      v[i] = vi;
      const float denom = __fadd_rn(__fsqrt_rn(__fdiv_rn(vi, c2)), EPS);
      x = __fsub_rn(x, __fdiv_rn(__fmul_rn(step, __fdiv_rn(mi, c1)), denom));
    }
    const float x0 = init[i];
    if (ball == 2) x = fminf(fmaxf(x, __fsub_rn(x0, eps)), __fadd_rn(x0, eps));
    const float d = __fsub_rn(x, x0);
    ss = __fadd_rn(ss, __fmul_rn(d, d));
    e[i] = x;
  }
  if (ball != 1) return;  // uniform across the grid: no thread is left at the barrier
  const float n = __fsqrt_rn(block_sum(ss, scratch));
  if (!(n > eps)) return;
  const float s = __fdiv_rn(eps, n);
  // Each thread rescales exactly the elements it wrote above.
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    const long long i = base + c;
    const float x0 = init[i];
    e[i] = __fadd_rn(x0, __fmul_rn(__fsub_rn(e[i], x0), s));
  }
}
