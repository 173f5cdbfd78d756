// Launchers of the affinity CUDA kernels (random walk, affinity sums). Like puzzle_kernels.h, this interface
// needs only the CUDA toolkit's headers: raw device pointers, sizes and a stream. The ATen glue
// (affinity_cuda.cpp) checks the tensors, converts them to the compute dtype (fp32, or fp64 for fp64 inputs)
// and allocates every buffer; affinity_kernels.cu implements these and compiles with nvcc alone.
//
// Path table (int32, on the device): for D directions, table[0 .. 2D) = (dy, dx) per direction,
// table[2D .. 3D] = the first path point of each direction (and the total), then the path points as (dy, dx).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace puzzlecam {
namespace cuda {

// Planes of the walk are stored with a zero halo of R = radius - 1 pixels: pixel (y, x) at (y + R) * pw + x + R.
struct WalkArgs {
  int64_t K, h, w;  // classes, map size
  int64_t R, pw;    // halo, padded row length
  int64_t plane;    // padded plane size (h + 2R) * pw
  int64_t D;        // directions
  int64_t steps;    // 2^exp_times
};

// cams (K, h, w), edge (h, w) contiguous in the compute dtype (double when fp64, else float); weight
// (D * plane), inv_degree (plane), y0 and y1 (K * plane) zero-filled workspaces; out (K, h, w).
cudaError_t random_walk(bool fp64, const void* cams, const void* edge, const int32_t* table, const WalkArgs& args,
                        double beta, void* weight, void* inv_degree, void* y0, void* y1, void* out,
                        cudaStream_t stream);

// Sources in the cropped region rows [0, rows), cols [R, R + cols) of (B, H, W) maps.
struct AffinityArgs {
  int64_t B, H, W, R, rows, cols, D;
};

// Blocks of the forward kernel: the glue allocates 6 * blocks doubles of partials for it.
int64_t affinity_sums_blocks(const AffinityArgs& args);

// edge (B, H, W) in the compute dtype, seg (B, H, W) int64; sums (3) in the compute dtype, counts (3) fp32.
cudaError_t affinity_sums_forward(bool fp64, const void* edge, const int64_t* seg, const int32_t* table,
                                  const AffinityArgs& args, double* partials, void* sums, float* counts,
                                  cudaStream_t stream);

// grad_sums (3) and grad (B, H, W, zero-filled) in the compute dtype; adds each pair's d loss / d edge at its
// path's maximum (atomic adds: the order of the adds, hence the last bits of grad, may vary between runs).
cudaError_t affinity_sums_backward(bool fp64, const void* edge, const int64_t* seg, const int32_t* table,
                                   const AffinityArgs& args, const void* grad_sums, void* grad, cudaStream_t stream);

}  // namespace cuda
}  // namespace puzzlecam
