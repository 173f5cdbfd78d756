// CUDA kernels of the affinity ops. Needs only the CUDA toolkit (no torch headers), so CI compiles it with nvcc
// alone. Semantics: puzzlecam.affinity (random_walk_reference, affinity_sums_reference); the CPU kernels of
// csrc/cpu/affinity_cpu.cpp do the same arithmetic in the same order.
//
// Random walk: the per-direction weight planes and the inverse column sums are computed once; then one
// launch per step, one thread per (class, pixel), reads the 2D + 1 taps from zero-haloed planes (no branch).
// Affinity sums: one thread per (image, source pixel) loops over the directions (a NaN edge propagates as in
// the reference: all three sums NaN, NaN gradient at the NaN element). The forward reduces each
// block's sums in fp64 and a single block adds the block partials in a fixed order (deterministic); the
// backward adds each pair's gradient at its path's maximum with an atomic add.
#include <cuda_runtime.h>

#include <algorithm>

#include "affinity_kernels.h"

namespace puzzlecam {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kIgnoreLabel = 255;  // labels >= 255 (the ignore value) make a pair invalid; 0..C are valid
constexpr double kLogEps = 1e-5;

enum PairClass : int { kBackground = 0, kForeground = 1, kNegative = 2, kIgnored = 3 };

__device__ __forceinline__ int pair_class(int64_t from, int64_t to) {
  if (from >= kIgnoreLabel || to >= kIgnoreLabel) return kIgnored;
  if (from != to) return kNegative;
  if (from == 0) return kBackground;
  return from > 0 ? kForeground : kIgnored;  // equal negative labels: valid, but neither bg nor fg
}

__device__ __forceinline__ float pow_t(float x, float y) { return powf(x, y); }
__device__ __forceinline__ double pow_t(double x, double y) { return pow(x, y); }
__device__ __forceinline__ float log_t(float x) { return logf(x); }
__device__ __forceinline__ double log_t(double x) { return log(x); }

// Table views (affinity_kernels.h).
struct PathTable {
  const int32_t* dirs;    // (dy, dx) per direction
  const int32_t* starts;  // first point of each direction, D + 1 entries
  const int32_t* points;  // (dy, dx) per point
  __device__ PathTable(const int32_t* table, int64_t D)
      : dirs(table), starts(table + 2 * D), points(table + 3 * D + 1) {}
};

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

// ------------------------------------------------------------------------------------------------
// Random walk

// weight[d] at source p = (1 - max of edge over the path p -> p + d)^beta; 0 (the workspace's zeros) where
// p + d leaves the map.
template <typename T>
__global__ void walk_weights_kernel(const T* __restrict__ edge, const int32_t* __restrict__ table, WalkArgs a,
                                    T beta, T* __restrict__ weight) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t hw = a.h * a.w;
  if (i >= a.D * hw) return;
  const PathTable t(table, a.D);
  const int d = static_cast<int>(i / hw);
  const int p = static_cast<int>(i - d * hw);
  const int w = static_cast<int>(a.w), y = p / w, x = p - y * w;
  const int dy = t.dirs[2 * d], dx = t.dirs[2 * d + 1];
  if (y + dy >= a.h || x + dx < 0 || x + dx >= w) return;
  T peak = edge[p];
  for (int k = t.starts[d]; k < t.starts[d + 1]; ++k) {
    const T v = edge[(y + t.points[2 * k]) * w + x + t.points[2 * k + 1]];
    peak = v > peak ? v : peak;
  }
  weight[d * a.plane + (y + a.R) * a.pw + x + a.R] = pow_t(T(1) - peak, beta);
}

// inv_degree = 1 / column sum of A^beta: the diagonal's 1, the forward and the backward neighbours.
template <typename T>
__global__ void walk_degree_kernel(const T* __restrict__ weight, const int32_t* __restrict__ table, WalkArgs a,
                                   T* __restrict__ inv_degree) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.h * a.w) return;
  const PathTable t(table, a.D);
  const int64_t y = i / a.w, x = i - y * a.w;
  const int64_t q = (y + a.R) * a.pw + x + a.R;
  T degree = 1;
  for (int d = 0; d < a.D; ++d) {
    const int64_t o = t.dirs[2 * d] * a.pw + t.dirs[2 * d + 1];
    degree += weight[d * a.plane + q] + weight[d * a.plane + q - o];
  }
  inv_degree[q] = T(1) / degree;
}

// y0 = cams * (1 - edge) (to_padded) or out = the walk's final planes (from padded).
template <typename T>
__global__ void walk_copy_kernel(const T* __restrict__ src, const T* __restrict__ edge, WalkArgs a, bool to_padded,
                                 T* __restrict__ dst) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t hw = a.h * a.w;
  if (i >= a.K * hw) return;
  const int64_t k = i / hw, p = i - k * hw, y = p / a.w, x = p - y * a.w;
  const int64_t q = k * a.plane + (y + a.R) * a.pw + x + a.R;
  if (to_padded) {
    dst[q] = src[i] * (T(1) - edge[p]);
  } else {
    dst[i] = src[q];
  }
}

// One step y <- y T for one (class, pixel).
template <typename T>
__global__ void walk_step_kernel(const T* __restrict__ y_in, const T* __restrict__ weight,
                                 const T* __restrict__ inv_degree, const int32_t* __restrict__ table, WalkArgs a,
                                 T* __restrict__ y_out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t hw = a.h * a.w;
  if (i >= a.K * hw) return;
  const PathTable t(table, a.D);
  const int64_t k = i / hw, p = i - k * hw, y = p / a.w, x = p - y * a.w;
  const int64_t q = (y + a.R) * a.pw + x + a.R;
  const T* yk = y_in + k * a.plane;
  T acc = yk[q];
  for (int d = 0; d < a.D; ++d) {
    const int64_t o = t.dirs[2 * d] * a.pw + t.dirs[2 * d + 1];
    const T* wd = weight + d * a.plane;
    acc += wd[q] * yk[q + o] + wd[q - o] * yk[q - o];
  }
  y_out[k * a.plane + q] = acc * inv_degree[q];
}

template <typename T>
cudaError_t random_walk_typed(const T* cams, const T* edge, const int32_t* table, const WalkArgs& a, T beta,
                              T* weight, T* inv_degree, T* y0, T* y1, T* out, cudaStream_t stream) {
  const int64_t hw = a.h * a.w;
  walk_weights_kernel<T><<<blocks_for(a.D * hw), kThreads, 0, stream>>>(edge, table, a, beta, weight);
  walk_degree_kernel<T><<<blocks_for(hw), kThreads, 0, stream>>>(weight, table, a, inv_degree);
  walk_copy_kernel<T><<<blocks_for(a.K * hw), kThreads, 0, stream>>>(cams, edge, a, true, y0);
  for (int64_t step = 0; step < a.steps; ++step) {
    walk_step_kernel<T><<<blocks_for(a.K * hw), kThreads, 0, stream>>>(y0, weight, inv_degree, table, a, y1);
    T* swap = y0;
    y0 = y1, y1 = swap;
  }
  walk_copy_kernel<T><<<blocks_for(a.K * hw), kThreads, 0, stream>>>(y0, nullptr, a, false, out);
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------------
// Affinity sums

// Sum of v over the block (every thread gets it); `shared` holds >= 32 doubles.
__device__ double block_sum(double v, double* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  __syncthreads();  // `shared` may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? shared[lane] : 0.0;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

// v replaces the running maximum `current` when greater, or when NaN (and current is not): a NaN stays, as
// torch's max propagates it.
template <typename T>
__device__ __forceinline__ bool takes_over(T v, T current) {
  return !(v <= current) & (current == current);
}

// Visits every valid pair of one source, and every ignored one whose path holds a NaN (the reference's masked
// sums are NaN then too: NaN * 0): visit(class, affinity, flat index of its path's maximum (the first maximum,
// or NaN, in path order, as max's)).
template <typename T, typename Visit>
__device__ __forceinline__ void visit_source_pairs(const T* edge, const int64_t* seg, const PathTable& t,
                                                   const AffinityArgs& a, int y, int x, Visit&& visit) {
  const int W = static_cast<int>(a.W);
  const int64_t from = seg[y * W + x];
  for (int d = 0; d < a.D; ++d) {
    const int cls = pair_class(from, seg[(y + t.dirs[2 * d]) * W + x + t.dirs[2 * d + 1]]);
    const int first = t.starts[d];
    int element = (y + t.points[2 * first]) * W + x + t.points[2 * first + 1];
    T peak = edge[element];
    for (int k = first + 1; k < t.starts[d + 1]; ++k) {
      const int e = (y + t.points[2 * k]) * W + x + t.points[2 * k + 1];
      const T v = edge[e];
      if (takes_over(v, peak)) peak = v, element = e;
    }
    if (cls == kIgnored && peak == peak) continue;
    visit(cls, T(1) - peak, element);
  }
}

template <typename T>
__global__ void affinity_forward_kernel(const T* __restrict__ edge, const int64_t* __restrict__ seg,
                                        const int32_t* __restrict__ table, AffinityArgs a,
                                        double* __restrict__ partials) {
  __shared__ double shared[32];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_image = a.rows * a.cols;
  double acc[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};  // sums, then counts
  if (i < a.B * per_image) {
    const PathTable t(table, a.D);
    const int64_t b = i / per_image, s = i - b * per_image;
    const int y = static_cast<int>(s / a.cols), x = static_cast<int>(s - y * a.cols + a.R);
    const T pos_eps = static_cast<T>(kLogEps), neg_one = static_cast<T>(1.0 + kLogEps);
    visit_source_pairs<T>(edge + b * a.H * a.W, seg + b * a.H * a.W, t, a, y, x, [&](int cls, T aff, int) {
      if (aff != aff) {  // a NaN in any pair's path makes all three sums NaN
        acc[0] = acc[1] = acc[2] = aff;
        if (cls == kIgnored) return;
      }
      acc[cls] += cls == kNegative ? -log_t(neg_one - aff) : -log_t(aff + pos_eps);
      acc[3 + cls] += 1.0;
    });
  }
  for (int j = 0; j < 6; ++j) {
    const double total = block_sum(acc[j], shared);
    if (threadIdx.x == 0) partials[blockIdx.x * 6 + j] = total;
  }
}

// One block adds the block partials in a fixed order: the same inputs give bitwise the same sums.
template <typename T>
__global__ void affinity_finish_kernel(const double* __restrict__ partials, int64_t blocks, T* __restrict__ sums,
                                       float* __restrict__ counts) {
  __shared__ double shared[32];
  for (int j = 0; j < 6; ++j) {
    double v = 0.0;
    for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) v += partials[b * 6 + j];
    const double total = block_sum(v, shared);
    if (threadIdx.x == 0) {
      if (j < 3) {
        sums[j] = static_cast<T>(total);
      } else {
        counts[j - 3] = static_cast<float>(total);
      }
    }
  }
}

template <typename T>
__global__ void affinity_backward_kernel(const T* __restrict__ edge, const int64_t* __restrict__ seg,
                                         const int32_t* __restrict__ table, AffinityArgs a,
                                         const T* __restrict__ grad_sums, T* __restrict__ grad) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_image = a.rows * a.cols;
  if (i >= a.B * per_image) return;
  const PathTable t(table, a.D);
  const int64_t b = i / per_image, s = i - b * per_image;
  const int y = static_cast<int>(s / a.cols), x = static_cast<int>(s - y * a.cols + a.R);
  const T pos_eps = static_cast<T>(kLogEps), neg_one = static_cast<T>(1.0 + kLogEps);
  const T g_bg = grad_sums[0], g_fg = grad_sums[1], g_neg = grad_sums[2];
  T* grad_b = grad + b * a.H * a.W;
  // d sum / d edge at the path's maximum = -d sum / d a: 1 / (a + eps) for bg and fg, -1 / (1 + eps - a) for neg.
  visit_source_pairs<T>(edge + b * a.H * a.W, seg + b * a.H * a.W, t, a, y, x, [&](int cls, T aff, int element) {
    // An ignored pair comes here only with a NaN affinity: NaN, as 0 * NaN.
    const T g = cls == kNegative     ? -g_neg / (neg_one - aff)
                : cls == kBackground ? g_bg / (aff + pos_eps)
                : cls == kForeground ? g_fg / (aff + pos_eps)
                                     : aff;
    atomicAdd(grad_b + element, g);
  });
}

}  // namespace

cudaError_t random_walk(bool fp64, const void* cams, const void* edge, const int32_t* table, const WalkArgs& args,
                        double beta, void* weight, void* inv_degree, void* y0, void* y1, void* out,
                        cudaStream_t stream) {
  if (args.K * args.h * args.w == 0) return cudaSuccess;
  if (fp64) {
    return random_walk_typed<double>(static_cast<const double*>(cams), static_cast<const double*>(edge), table, args,
                                     beta, static_cast<double*>(weight), static_cast<double*>(inv_degree),
                                     static_cast<double*>(y0), static_cast<double*>(y1), static_cast<double*>(out),
                                     stream);
  }
  return random_walk_typed<float>(static_cast<const float*>(cams), static_cast<const float*>(edge), table, args,
                                  static_cast<float>(beta), static_cast<float*>(weight),
                                  static_cast<float*>(inv_degree), static_cast<float*>(y0), static_cast<float*>(y1),
                                  static_cast<float*>(out), stream);
}

int64_t affinity_sums_blocks(const AffinityArgs& args) {
  return std::max<int64_t>(1, blocks_for(args.B * args.rows * args.cols));
}

cudaError_t affinity_sums_forward(bool fp64, const void* edge, const int64_t* seg, const int32_t* table,
                                  const AffinityArgs& args, double* partials, void* sums, float* counts,
                                  cudaStream_t stream) {
  const int64_t blocks = affinity_sums_blocks(args);
  if (fp64) {
    affinity_forward_kernel<double>
        <<<blocks, kThreads, 0, stream>>>(static_cast<const double*>(edge), seg, table, args, partials);
    affinity_finish_kernel<double><<<1, kThreads, 0, stream>>>(partials, blocks, static_cast<double*>(sums), counts);
  } else {
    affinity_forward_kernel<float>
        <<<blocks, kThreads, 0, stream>>>(static_cast<const float*>(edge), seg, table, args, partials);
    affinity_finish_kernel<float><<<1, kThreads, 0, stream>>>(partials, blocks, static_cast<float*>(sums), counts);
  }
  return cudaGetLastError();
}

cudaError_t affinity_sums_backward(bool fp64, const void* edge, const int64_t* seg, const int32_t* table,
                                   const AffinityArgs& args, const void* grad_sums, void* grad, cudaStream_t stream) {
  const int64_t sources = args.B * args.rows * args.cols;
  if (sources == 0) return cudaSuccess;
  if (fp64) {
    affinity_backward_kernel<double><<<blocks_for(sources), kThreads, 0, stream>>>(
        static_cast<const double*>(edge), seg, table, args, static_cast<const double*>(grad_sums),
        static_cast<double*>(grad));
  } else {
    affinity_backward_kernel<float><<<blocks_for(sources), kThreads, 0, stream>>>(
        static_cast<const float*>(edge), seg, table, args, static_cast<const float*>(grad_sums),
        static_cast<float*>(grad));
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace puzzlecam
