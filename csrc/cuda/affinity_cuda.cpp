// ATen glue of the affinity CUDA kernels: checks the tensors, converts them to the compute dtype (fp32, fp64
// for fp64 inputs), allocates the outputs and workspaces, uploads the path table and launches the kernels
// of affinity_kernels.cu on the current stream. Compiled only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "affinity_common.h"
#include "affinity_kernels.h"

namespace puzzlecam {
namespace {

// The path table of affinity_kernels.h on `device`; sets D.
at::Tensor path_table(int64_t radius, const at::Device& device, int64_t& D) {
  const std::vector<AffinityDirection> dirs = affinity_directions(radius);
  D = static_cast<int64_t>(dirs.size());
  std::vector<int32_t> table(3 * D + 1);
  int32_t points = 0;
  for (int64_t d = 0; d < D; ++d) {
    table[2 * d] = dirs[d].dy, table[2 * d + 1] = dirs[d].dx;
    table[2 * D + d] = points;
    points += static_cast<int32_t>(dirs[d].path.size());
  }
  table[3 * D] = points;
  for (const AffinityDirection& dir : dirs)
    for (const PathPoint& p : dir.path) table.push_back(p.dy), table.push_back(p.dx);
  const at::Tensor host = at::from_blob(table.data(), {static_cast<int64_t>(table.size())}, at::kInt);
  return host.to(device);  // a copy: `table` may go away afterwards
}

// The kernels index inside a map with 32-bit ints.
void check_map_size(const char* op, int64_t h, int64_t w) {
  TORCH_CHECK_VALUE(h * w <= std::numeric_limits<int32_t>::max(), op, " (CUDA): maps of at most 2^31-1 pixels, got ",
                    h, "x", w);
}

at::Tensor random_walk_cuda(const at::Tensor& cams_in, const at::Tensor& edge_in, double beta, int64_t exp_times,
                            int64_t radius) {
  const WalkGeometry g = check_walk_args(cams_in, edge_in, beta, exp_times, radius, at::kCUDA);
  check_map_size("puzzlecam::random_walk", g.h + 2 * g.R, g.w + 2 * g.R);
  const c10::cuda::CUDAGuard guard(cams_in.device());
  const at::ScalarType acc = cams_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor cams = cams_in.to(acc).contiguous(), edge = edge_in.to(acc).contiguous();
  at::Tensor out = new_output({g.K, g.h, g.w}, cams.options());
  if (out.numel() == 0) return out;
  cuda::WalkArgs a{};
  a.K = g.K, a.h = g.h, a.w = g.w, a.R = g.R, a.pw = g.w + 2 * g.R, a.plane = (g.h + 2 * g.R) * a.pw;
  a.steps = g.steps;
  const at::Tensor table = path_table(radius, cams.device(), a.D);
  // Zero-filled: the halo of every plane must read as 0.
  at::Tensor weight = at::zeros({a.D * a.plane}, cams.options());
  at::Tensor inv_degree = at::zeros({a.plane}, cams.options());
  at::Tensor y0 = at::zeros({g.K * a.plane}, cams.options()), y1 = at::zeros({g.K * a.plane}, cams.options());
  C10_CUDA_CHECK(cuda::random_walk(acc == at::kDouble, cams.data_ptr(), edge.data_ptr(), table.data_ptr<int32_t>(),
                                   a, beta, weight.data_ptr(), inv_degree.data_ptr(), y0.data_ptr(), y1.data_ptr(),
                                   out.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

struct AffinityInputs {
  at::Tensor edge, seg, table;
  cuda::AffinityArgs args;
  bool fp64;
};

AffinityInputs affinity_inputs(const char* op, const at::Tensor& edge_in, const at::Tensor& seg_in, int64_t radius) {
  const AffinityGeometry g = check_affinity_args(op, edge_in, seg_in, radius, at::kCUDA);
  check_map_size(op, g.H, g.W);
  AffinityInputs in;
  in.fp64 = edge_in.scalar_type() == at::kDouble;
  in.edge = edge_in.to(in.fp64 ? at::kDouble : at::kFloat).contiguous();
  in.seg = seg_in.to(at::kLong).contiguous();
  in.args = cuda::AffinityArgs{g.B, g.H, g.W, g.R, g.rows, g.cols, 0};
  in.table = path_table(radius, edge_in.device(), in.args.D);
  return in;
}

std::tuple<at::Tensor, at::Tensor> affinity_sums_cuda(const at::Tensor& edge_in, const at::Tensor& seg_in,
                                                      int64_t radius) {
  const c10::cuda::CUDAGuard guard(edge_in.device());
  const AffinityInputs in = affinity_inputs("puzzlecam::affinity_sums", edge_in, seg_in, radius);
  at::Tensor sums = new_output({3}, in.edge.options());
  at::Tensor counts = new_output({3}, in.edge.options().dtype(at::kFloat));
  at::Tensor partials = at::empty({6 * cuda::affinity_sums_blocks(in.args)}, in.edge.options().dtype(at::kDouble));
  C10_CUDA_CHECK(cuda::affinity_sums_forward(in.fp64, in.edge.data_ptr(), in.seg.data_ptr<int64_t>(),
                                             in.table.data_ptr<int32_t>(), in.args, partials.data_ptr<double>(),
                                             sums.data_ptr(), counts.data_ptr<float>(),
                                             c10::cuda::getCurrentCUDAStream()));
  return {sums, counts};
}

at::Tensor affinity_sums_backward_cuda(const at::Tensor& grad_sums_in, const at::Tensor& edge_in,
                                       const at::Tensor& seg_in, int64_t radius) {
  const char* op = "puzzlecam::affinity_sums_backward";
  check_affinity_grad(op, grad_sums_in, at::kCUDA);
  const c10::cuda::CUDAGuard guard(edge_in.device());
  const AffinityInputs in = affinity_inputs(op, edge_in, seg_in, radius);
  const at::Tensor grad_sums = grad_sums_in.to(in.edge.device(), in.edge.scalar_type()).contiguous().view({3});
  // The kernel adds into zeros, in the compute dtype; returned in the edge's dtype.
  at::Tensor grad = at::zeros(edge_in.sizes(), in.edge.options());
  C10_CUDA_CHECK(cuda::affinity_sums_backward(in.fp64, in.edge.data_ptr(), in.seg.data_ptr<int64_t>(),
                                              in.table.data_ptr<int32_t>(), in.args, grad_sums.data_ptr(),
                                              grad.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return grad.to(edge_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(puzzlecam, CUDA, m) {
  m.impl("random_walk", &random_walk_cuda);
  m.impl("affinity_sums", &affinity_sums_cuda);
  m.impl("affinity_sums_backward", &affinity_sums_backward_cuda);
}

}  // namespace puzzlecam
