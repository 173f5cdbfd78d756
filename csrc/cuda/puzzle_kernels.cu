// CUDA kernels of the puzzlecam ops. Needs only the CUDA toolkit (no torch headers), so CI compiles it
// with nvcc alone. Semantics: puzzlecam.puzzle (reconstruction_loss, make_cam, multiscale_cam).
//
// Reconstruction loss: one block per (b, c) plane; the merged map is read straight from the tiles
// (no merged copy). Everything is fp32; results are deterministic (no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>

#include "puzzle_kernels.h"

namespace puzzlecam {
namespace cuda {
namespace {

constexpr float kCamEps = 1e-5f;  // puzzlecam.puzzle.CAM_EPS
constexpr int kLossThreads = 256;
constexpr int kNormThreads = 1024;
constexpr int kResizeThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

struct SumOp {
  __device__ __forceinline__ static float identity() { return 0.f; }
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ static float identity() { return -FLT_MAX; }
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduces v over the block; every thread gets the result. `shared` holds >= 32 floats.
template <typename Op>
__device__ float block_reduce(float v, Op op, float* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
  __syncthreads();  // `shared` may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? shared[lane] : Op::identity();
    for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

// Index in cam_tiles of element k of the merged (b, c) plane. In-plane math in 32 bits (a plane has
// < 2^31 elements, checked by the glue): 64-bit division is slow on the GPU.
__device__ __forceinline__ int64_t merged_index(const LossArgs& a, int64_t b, int64_t c, int k) {
  const int w = static_cast<int>(a.w), th = static_cast<int>(a.th), tw = static_cast<int>(a.tw);
  const int y = k / w, x = k - y * w;
  const int ty = y / th, tx = x / tw;
  const int64_t piece = ty * static_cast<int>(a.n) + tx;
  return (((piece * a.B + b) * a.C + c) * a.th + (y - ty * th)) * a.tw + (x - tx * tw);
}

__device__ __forceinline__ float make_cam_value(float v, float denom) {
  const float t = v - kCamEps;
  return (t > 0.f ? t : 0.f) / denom;
}

// Peaks of relu(full) and relu(merged) over the plane (make_cam's max).
template <typename T>
__device__ void plane_peaks(const T* full, const T* tiles, const LossArgs& a, int64_t b, int64_t c, float* shared,
                            float& peak_full, float& peak_merged) {
  const int len = static_cast<int>(a.h * a.w);
  float pf = 0.f, pm = 0.f;
  for (int k = threadIdx.x; k < len; k += blockDim.x) {
    pf = fmaxf(pf, to_float(full[k]));
    pm = fmaxf(pm, to_float(tiles[merged_index(a, b, c, k)]));
  }
  peak_full = block_reduce(pf, MaxOp(), shared);
  peak_merged = block_reduce(pm, MaxOp(), shared);
}

template <typename T>
__global__ void loss_forward_kernel(const T* __restrict__ cam, const T* __restrict__ tiles,
                                    const float* __restrict__ labels, LossArgs a, float* __restrict__ plane_err,
                                    float* __restrict__ logits) {
  __shared__ float shared[32];
  const int64_t bc = blockIdx.x, b = bc / a.C, c = bc % a.C;
  const int len = static_cast<int>(a.h * a.w);
  const T* full = cam + bc * len;
  float denom_full = 1.f, denom_merged = 1.f;
  if (a.cam_level) {
    float peak_full, peak_merged;
    plane_peaks(full, tiles, a, b, c, shared, peak_full, peak_merged);
    denom_full = peak_full + kCamEps, denom_merged = peak_merged + kCamEps;
  }
  float err = 0.f, merged_sum = 0.f;
  for (int k = threadIdx.x; k < len; k += blockDim.x) {
    float f = to_float(full[k]), m = to_float(tiles[merged_index(a, b, c, k)]);
    merged_sum += m;
    if (a.cam_level) f = make_cam_value(f, denom_full), m = make_cam_value(m, denom_merged);
    const float d = f - m;
    err += a.l2 ? d * d : fabsf(d);
  }
  err = block_reduce(err, SumOp(), shared);
  merged_sum = block_reduce(merged_sum, SumOp(), shared);
  if (threadIdx.x == 0) {
    plane_err[bc] = a.masking ? err * labels[bc] : err;
    logits[bc] = merged_sum / static_cast<float>(len);
  }
}

// re = sum(plane_err) / count, in a fixed order (one block).
__global__ void loss_finalize_kernel(const float* __restrict__ plane_err, int64_t planes, float count,
                                     float* __restrict__ re) {
  __shared__ float shared[32];
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < planes; i += blockDim.x) s += plane_err[i];
  s = block_reduce(s, SumOp(), shared);
  if (threadIdx.x == 0) re[0] = s / count;
}

// d error / d (compared full value) for the compared pair (f, m); the merged value gets its negative.
__device__ __forceinline__ float error_grad(float f, float m, float coef, bool l2) {
  const float d = f - m;
  return l2 ? coef * 2.f * (d) : coef * static_cast<float>((d > 0.f) - (d < 0.f));
}

template <typename T>
__global__ void loss_backward_kernel(const T* __restrict__ cam, const T* __restrict__ tiles,
                                     const float* __restrict__ labels, LossArgs a, const float* __restrict__ grad_re,
                                     const float* __restrict__ grad_logits, T* __restrict__ grad_cam,
                                     T* __restrict__ grad_tiles) {
  __shared__ float shared[32];
  const int64_t bc = blockIdx.x, b = bc / a.C, c = bc % a.C;
  const int len = static_cast<int>(a.h * a.w);
  const T* full = cam + bc * len;
  const float grad_mean = grad_re[0] / static_cast<float>(a.B * a.C * len);  // mean's backward
  const float coef = a.masking ? grad_mean * labels[bc] : grad_mean;
  const float grad_logit = grad_logits[bc] / static_cast<float>(len);  // GAP's backward

  // make_cam(x) = relu(x - eps) / denom, denom = amax(relu(x)) + eps. torch spreads amax's grad evenly
  // over the ties, and relu's backward passes it only where x > 0 (so only when the peak is > 0).
  float peak_full = 0.f, peak_merged = 0.f, denom_full = 1.f, denom_merged = 1.f;
  float share_full = 0.f, share_merged = 0.f;  // the grad each tied maximum receives through denom
  if (a.cam_level) {
    plane_peaks(full, tiles, a, b, c, shared, peak_full, peak_merged);
    denom_full = peak_full + kCamEps, denom_merged = peak_merged + kCamEps;
    float gd_full = 0.f, gd_merged = 0.f, ties_full = 0.f, ties_merged = 0.f;
    for (int k = threadIdx.x; k < len; k += blockDim.x) {
      const float f = to_float(full[k]), m = to_float(tiles[merged_index(a, b, c, k)]);
      const float nf = make_cam_value(f, denom_full), nm = make_cam_value(m, denom_merged);
      const float g = error_grad(nf, nm, coef, a.l2);
      const float tf = f - kCamEps, tm = m - kCamEps;
      gd_full += -g * (tf > 0.f ? tf : 0.f) / (denom_full * denom_full);
      gd_merged += g * (tm > 0.f ? tm : 0.f) / (denom_merged * denom_merged);
      ties_full += fmaxf(f, 0.f) == peak_full;
      ties_merged += fmaxf(m, 0.f) == peak_merged;
    }
    gd_full = block_reduce(gd_full, SumOp(), shared);
    gd_merged = block_reduce(gd_merged, SumOp(), shared);
    ties_full = block_reduce(ties_full, SumOp(), shared);
    ties_merged = block_reduce(ties_merged, SumOp(), shared);
    share_full = gd_full / ties_full;
    share_merged = gd_merged / ties_merged;
  }
  for (int k = threadIdx.x; k < len; k += blockDim.x) {
    const int64_t mk = merged_index(a, b, c, k);
    const float f = to_float(full[k]), m = to_float(tiles[mk]);
    float gf, gm;
    if (a.cam_level) {
      const float g = error_grad(make_cam_value(f, denom_full), make_cam_value(m, denom_merged), coef, a.l2);
      gf = (f - kCamEps) > 0.f ? g / denom_full : 0.f;
      gm = (m - kCamEps) > 0.f ? -g / denom_merged : 0.f;
      if (peak_full > 0.f && f == peak_full) gf += share_full;
      if (peak_merged > 0.f && m == peak_merged) gm += share_merged;
    } else {
      gf = error_grad(f, m, coef, a.l2);
      gm = -gf;
    }
    grad_cam[bc * len + k] = from_float<T>(gf);
    grad_tiles[mk] = from_float<T>(gm + grad_logit);
  }
}

// ------------------------------------------------------------------------------------------------
// Multi-scale CAM fusion

// Bilinear (align_corners=False) source index pair and weight of the second, as torch computes them.
__device__ __forceinline__ void source_index(int64_t dst, int64_t in_size, int64_t out_size, int64_t& i0,
                                             int64_t& i1, float& lambda) {
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  float src = scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
  src = src < 0.f ? 0.f : src;
  i0 = static_cast<int64_t>(src);
  if (i0 > in_size - 1) i0 = in_size - 1;
  i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  lambda = fminf(fmaxf(src - static_cast<float>(i0), 0.f), 1.f);
}

// relu(map) + relu(flipped map) flipped back, at (y, x) of one class plane.
template <typename T>
__device__ __forceinline__ float fused_value(const T* map, const T* flipped, int64_t w, int64_t y, int64_t x) {
  float v = fmaxf(to_float(map[y * w + x]), 0.f);
  if (flipped != nullptr) v += fmaxf(to_float(flipped[y * w + (w - 1 - x)]), 0.f);
  return v;
}

// One thread per output pixel of cam (K*sh*sw) then hr (K*H*W); sums the scales in order.
template <typename T>
__global__ void resize_kernel(FusionArgs a, const int64_t* __restrict__ keys, bool accumulate, float* __restrict__ cam,
                              float* __restrict__ hr) {
  const int64_t small_total = a.K * a.sh * a.sw, total = small_total + a.K * a.H * a.W;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const bool small = idx < small_total;
  const int64_t local = small ? idx : idx - small_total;
  const int64_t ow = small ? a.sw : a.W, oh = small ? a.sh : a.H;  // stored size
  const int64_t rh = small ? a.sh : a.uh, rw = small ? a.sw : a.uw;  // resize target size
  const int64_t k = local / (oh * ow), y = (local / ow) % oh, x = local % ow;
  const int64_t cls = keys[k];
  float sum = 0.f;
  for (int s = 0; s < a.num_scales; ++s) {
    const int64_t h = a.h[s], w = a.w[s];
    const T* map = static_cast<const T*>(a.maps[s]) + cls * h * w;
    const T* flipped = a.flipped[s] ? static_cast<const T*>(a.flipped[s]) + cls * h * w : nullptr;
    int64_t y0, y1, x0, x1;
    float ly, lx;
    source_index(y, h, rh, y0, y1, ly);
    source_index(x, w, rw, x0, x1, lx);
    const float top = (1.f - lx) * fused_value(map, flipped, w, y0, x0) + lx * fused_value(map, flipped, w, y0, x1);
    const float bottom = (1.f - lx) * fused_value(map, flipped, w, y1, x0) + lx * fused_value(map, flipped, w, y1, x1);
    sum += (1.f - ly) * top + ly * bottom;
  }
  float* out = small ? cam : hr;
  out[local] = accumulate ? out[local] + sum : sum;
}

// Block i < K normalizes class i of cam, block K + i class i of hr: divide by (max + eps).
__global__ void normalize_kernel(int64_t K, int64_t small_len, int64_t hr_len, float* __restrict__ cam,
                                 float* __restrict__ hr) {
  __shared__ float shared[32];
  const bool small = blockIdx.x < K;
  const int64_t len = small ? small_len : hr_len;
  float* plane = small ? cam + blockIdx.x * small_len : hr + (blockIdx.x - K) * hr_len;
  float peak = 0.f;  // sums of relus are >= 0
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) peak = fmaxf(peak, plane[i]);
  const float denom = block_reduce(peak, MaxOp(), shared) + kCamEps;
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) plane[i] = plane[i] / denom;
}

// Calls fn(T{}) with the CUDA type T of dtype.
template <typename Fn>
cudaError_t dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat16: fn(__half{}); break;
    case DType::kBFloat16: fn(__nv_bfloat16{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t reconstruction_loss_forward(DType dtype, const void* cam, const void* cam_tiles, const float* labels,
                                        const LossArgs& args, float* plane_err, float* re, float* logits,
                                        cudaStream_t stream) {
  const int64_t planes = args.B * args.C;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (planes > 0) {
      loss_forward_kernel<T><<<static_cast<unsigned>(planes), kLossThreads, 0, stream>>>(
          static_cast<const T*>(cam), static_cast<const T*>(cam_tiles), labels, args, plane_err, logits);
    }
    loss_finalize_kernel<<<1, kNormThreads, 0, stream>>>(plane_err, planes,
                                                         static_cast<float>(planes * args.h * args.w), re);
  });
}

cudaError_t reconstruction_loss_backward(DType dtype, const void* cam, const void* cam_tiles, const float* labels,
                                         const LossArgs& args, const float* grad_re, const float* grad_logits,
                                         void* grad_cam, void* grad_tiles, cudaStream_t stream) {
  const int64_t planes = args.B * args.C;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (planes == 0 || args.h * args.w == 0) return;
    loss_backward_kernel<T><<<static_cast<unsigned>(planes), kLossThreads, 0, stream>>>(
        static_cast<const T*>(cam), static_cast<const T*>(cam_tiles), labels, args, grad_re, grad_logits,
        static_cast<T*>(grad_cam), static_cast<T*>(grad_tiles));
  });
}

cudaError_t multiscale_cam_resize(DType dtype, const FusionArgs& args, const int64_t* keys, bool accumulate,
                                  float* cam, float* hr, cudaStream_t stream) {
  const int64_t total = args.K * (args.sh * args.sw + args.H * args.W);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (total == 0) return;
    const unsigned blocks = static_cast<unsigned>((total + kResizeThreads - 1) / kResizeThreads);
    resize_kernel<T><<<blocks, kResizeThreads, 0, stream>>>(args, keys, accumulate, cam, hr);
  });
}

cudaError_t multiscale_cam_normalize(const FusionArgs& args, float* cam, float* hr, cudaStream_t stream) {
  if (args.K > 0) {
    normalize_kernel<<<static_cast<unsigned>(2 * args.K), kNormThreads, 0, stream>>>(
        args.K, args.sh * args.sw, args.H * args.W, cam, hr);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace puzzlecam
