// ATen glue of the CUDA kernels: checks and reads the tensors, takes the current stream, launches the
// kernels of puzzle_kernels.cu. Compiled only when torch has CUDA (needs torch's CUDA headers).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "checks.h"
#include "puzzle_kernels.h"

namespace puzzlecam {
namespace {

cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "puzzlecam: unsupported dtype ", t);
  }
  return cuda::DType::kFloat32;  // unreachable
}

// The kernels run one block per (b, c) plane and index inside a plane with 32-bit ints.
void check_cuda_limits(const LossGeometry& g) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(g.B * g.C <= kMax && g.h * g.w <= kMax, "puzzlecam::reconstruction_loss (CUDA): at most 2^31-1 ",
                    "planes of at most 2^31-1 elements, got B*C=", g.B * g.C, " planes of ", g.h, "x", g.w);
}

cuda::LossArgs loss_args(const LossGeometry& g, bool masking) {
  cuda::LossArgs a;
  a.B = g.B, a.C = g.C, a.h = g.h, a.w = g.w, a.n = g.n, a.th = g.th, a.tw = g.tw;
  a.cam_level = g.cam_level, a.l2 = g.l2, a.masking = masking;
  return a;
}

std::tuple<at::Tensor, at::Tensor> reconstruction_loss_cuda(const at::Tensor& cam_in, const at::Tensor& tiles_in,
                                                            const at::Tensor& labels_in, int64_t n,
                                                            c10::string_view level, c10::string_view kind,
                                                            bool masking) {
  const LossGeometry g = check_loss_args(cam_in, tiles_in, labels_in, n, level, kind, at::kCUDA);
  check_cuda_limits(g);
  const c10::cuda::CUDAGuard guard(cam_in.device());
  const at::Tensor cam = cam_in.contiguous(), tiles = tiles_in.contiguous();
  const at::Tensor labels = labels_in.to(at::kFloat).contiguous();
  const auto opts = cam.options().dtype(at::kFloat);
  at::Tensor plane_err = at::empty({g.B * g.C}, opts);
  at::Tensor re = at::empty({}, opts);
  at::Tensor logits = at::empty({g.B, g.C}, opts);
  C10_CUDA_CHECK(cuda::reconstruction_loss_forward(kernel_dtype(cam.scalar_type()), cam.data_ptr(), tiles.data_ptr(),
                                                   labels.data_ptr<float>(), loss_args(g, masking),
                                                   plane_err.data_ptr<float>(), re.data_ptr<float>(),
                                                   logits.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {re, logits};
}

std::tuple<at::Tensor, at::Tensor> reconstruction_loss_backward_cuda(
    const at::Tensor& grad_re_in, const at::Tensor& grad_logits_in, const at::Tensor& cam_in, const at::Tensor& tiles_in,
    const at::Tensor& labels_in, int64_t n, c10::string_view level, c10::string_view kind, bool masking) {
  const LossGeometry g = check_loss_args(cam_in, tiles_in, labels_in, n, level, kind, at::kCUDA);
  check_loss_grads(grad_re_in, grad_logits_in, g, at::kCUDA);
  check_cuda_limits(g);
  const c10::cuda::CUDAGuard guard(cam_in.device());
  const at::Tensor cam = cam_in.contiguous(), tiles = tiles_in.contiguous();
  const at::Tensor labels = labels_in.to(at::kFloat).contiguous();
  const at::Tensor grad_re = grad_re_in.to(cam.device(), at::kFloat).reshape({1}).contiguous();
  const at::Tensor grad_logits = grad_logits_in.to(cam.device(), at::kFloat).contiguous();
  at::Tensor grad_cam = at::empty_like(cam, at::MemoryFormat::Contiguous);
  at::Tensor grad_tiles = at::empty_like(tiles, at::MemoryFormat::Contiguous);
  C10_CUDA_CHECK(cuda::reconstruction_loss_backward(
      kernel_dtype(cam.scalar_type()), cam.data_ptr(), tiles.data_ptr(), labels.data_ptr<float>(), loss_args(g, masking),
      grad_re.data_ptr<float>(), grad_logits.data_ptr<float>(), grad_cam.data_ptr(), grad_tiles.data_ptr(),
      c10::cuda::getCurrentCUDAStream()));
  return {grad_cam, grad_tiles};
}

std::tuple<at::Tensor, at::Tensor> multiscale_cam_cuda(at::TensorList maps_in, at::TensorList flipped_in,
                                                       const at::Tensor& keys_in, at::IntArrayRef image_size) {
  const FusionGeometry g = check_fusion_args(maps_in, flipped_in, keys_in, image_size, at::kCUDA);
  const c10::cuda::CUDAGuard guard(maps_in[0].device());
  // Keys are validated on the host (a handful of ints), then used on the device.
  const at::Tensor keys_cpu = checked_keys(keys_in, g.C);
  const at::Tensor keys = keys_cpu.to(maps_in[0].device());
  std::vector<at::Tensor> maps, flipped;  // contiguous copies kept alive until the launches are queued
  for (size_t s = 0; s < maps_in.size(); ++s) {
    maps.push_back(maps_in[s].contiguous());
    if (g.flipped) flipped.push_back(flipped_in[s].contiguous());
  }
  const auto opts = maps[0].options().dtype(at::kFloat);
  at::Tensor cam = at::empty({g.K, g.sh, g.sw}, opts);
  at::Tensor hr = at::empty({g.K, g.H, g.W}, opts);
  cuda::FusionArgs a{};
  a.C = g.C, a.K = g.K, a.H = g.H, a.W = g.W, a.sh = g.sh, a.sw = g.sw, a.uh = g.uh, a.uw = g.uw;
  const cuda::DType dtype = kernel_dtype(maps[0].scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Up to kMaxScales scales per launch; later launches add to the first one's sums.
  for (size_t first = 0; first < maps.size(); first += cuda::kMaxScales) {
    a.num_scales = static_cast<int>(std::min<size_t>(cuda::kMaxScales, maps.size() - first));
    for (int s = 0; s < a.num_scales; ++s) {
      const at::Tensor& m = maps[first + s];
      a.maps[s] = m.data_ptr();
      a.flipped[s] = g.flipped ? flipped[first + s].data_ptr() : nullptr;
      a.h[s] = m.size(1), a.w[s] = m.size(2);
    }
    C10_CUDA_CHECK(cuda::multiscale_cam_resize(dtype, a, keys.data_ptr<int64_t>(), first > 0, cam.data_ptr<float>(),
                                               hr.data_ptr<float>(), stream));
  }
  C10_CUDA_CHECK(cuda::multiscale_cam_normalize(a, cam.data_ptr<float>(), hr.data_ptr<float>(), stream));
  return {cam, hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(puzzlecam, CUDA, m) {
  m.impl("reconstruction_loss", &reconstruction_loss_cuda);
  m.impl("reconstruction_loss_backward", &reconstruction_loss_backward_cuda);
  m.impl("multiscale_cam", &multiscale_cam_cuda);
}

}  // namespace puzzlecam
