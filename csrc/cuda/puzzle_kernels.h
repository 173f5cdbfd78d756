// Launchers of the puzzlecam CUDA kernels. This interface needs only the CUDA toolkit's headers:
// raw device pointers, sizes and a stream. The ATen glue (puzzle_cuda.cpp) reads the tensors, checks
// them and calls these; puzzle_kernels.cu implements them and compiles with nvcc alone.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace puzzlecam {
namespace cuda {

// Element type of the input maps (every computation is fp32).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// cam (B,C,h,w) and cam_tiles (n*n*B,C,th,tw), both contiguous, of the same DType.
struct LossArgs {
  int64_t B, C, h, w, n, th, tw;
  bool cam_level;  // compare make_cam of both maps
  bool l2;         // squared error (else absolute)
  bool masking;    // multiply each (b, c) plane's error by labels[b, c]
};

// re[0] = mean error over all B*C*h*w elements; logits (B,C) = GAP of the merged tiles.
// plane_err is a workspace of B*C floats. labels: fp32 (B,C).
cudaError_t reconstruction_loss_forward(DType dtype, const void* cam, const void* cam_tiles, const float* labels,
                                        const LossArgs& args, float* plane_err, float* re, float* logits,
                                        cudaStream_t stream);

// grad_re: one fp32 value on the device; grad_logits: fp32 (B,C). Writes grad_cam, grad_tiles in DType.
cudaError_t reconstruction_loss_backward(DType dtype, const void* cam, const void* cam_tiles, const float* labels,
                                         const LossArgs& args, const float* grad_re, const float* grad_logits,
                                         void* grad_cam, void* grad_tiles, cudaStream_t stream);

constexpr int kMaxScales = 8;  // scales per kernel launch (more are fused over several launches)

// Scale s: maps[s] (and flipped[s], or null) of shape (C, h[s], w[s]), contiguous, of one DType.
struct FusionArgs {
  const void* maps[kMaxScales];
  const void* flipped[kMaxScales];
  int64_t h[kMaxScales];
  int64_t w[kMaxScales];
  int num_scales;
  int64_t C, K;    // classes in the maps, kept classes (keys)
  int64_t H, W;    // image size = hr output size
  int64_t sh, sw;  // stride-4 output size
  int64_t uh, uw;  // stride-16 up size that hr is resized to (then cropped to H x W)
};

// Adds (accumulate) or writes the resized, fused maps of args' scales into cam (K,sh,sw), hr (K,H,W).
// keys: K int64 class indices on the device, each in [0, C).
cudaError_t multiscale_cam_resize(DType dtype, const FusionArgs& args, const int64_t* keys, bool accumulate,
                                  float* cam, float* hr, cudaStream_t stream);

// Divides each class map of cam and hr by (its max + 1e-5), in place.
cudaError_t multiscale_cam_normalize(const FusionArgs& args, float* cam, float* hr, cudaStream_t stream);

}  // namespace cuda
}  // namespace puzzlecam
