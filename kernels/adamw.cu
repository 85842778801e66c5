// AdamW step on f32 master parameters (the LoRA factors).
// CPU twin: src/train/adamw.rs (adamw_step); launcher: src/backend/cuda/adamw.rs.
//
// Contract
//   p, m, v [n] f32 (parameters, first and second moments; updated in place)
//   g       [n] side tensor (f32 when g_f32 != 0, else bf16), used as g * grad_scale (f32; 1 over
//           the gradient-accumulation count, as the CPU trainer scales it before its step)
//   per element, exactly the CPU's operations and roundings (torch.optim.AdamW semantics):
//     m = b1 m + omb1 g                       (f32; omb1 = 1 - b1 rounded to f32 on the host)
//     v = b2 v + (omb2 g) g                   (f32)
//     p = p decay - f32(step m / (sqrt(v / bc2) + eps))   (the quotient in f64)
//   with decay = f32(1 - lr wd), step = lr / (1 - b1^t), bc2 = 1 - b2^t computed on the host in
//   f64. Every operation is an explicitly rounded intrinsic, so nvcc cannot fuse a multiply and
//   an add into an fma that the CPU does not do: the result is bit-identical to the CPU's.
// Launch: grid-stride, block = 256.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
    adamw_step(float* __restrict__ p, const void* __restrict__ g, int g_f32, float grad_scale, float* __restrict__ m,
               float* __restrict__ v, long long n, float b1, float b2, float omb1, float omb2, float decay,
               double step, double bc2, double eps) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float gi = __fmul_rn(load_side(g, g_f32, i), grad_scale);
    const float mi = __fadd_rn(__fmul_rn(b1, m[i]), __fmul_rn(omb1, gi));
    const float vi = __fadd_rn(__fmul_rn(b2, v[i]), __fmul_rn(__fmul_rn(omb2, gi), gi));
    m[i] = mi;
    v[i] = vi;
    const double denom = __dadd_rn(__dsqrt_rn(__ddiv_rn((double)vi, bc2)), eps);
    const float upd = (float)__ddiv_rn(__dmul_rn(step, (double)mi), denom);
    p[i] = __fsub_rn(__fmul_rn(p[i], decay), upd);
  }
}
