// Shared by the CPU kernels and the CUDA glue of the affinity ops (docs/extension.md): the directions and
// paths of the affinity neighbourhood (identical to puzzlecam.affinity.path_directions / direction_paths,
// in the original PathIndex's order) and the argument checks.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

namespace puzzlecam {

struct PathPoint {
  int32_t dy, dx;
};

struct AffinityDirection {
  int32_t dy, dx;                // destination offset (dy >= 0; dx > 0 when dy == 0)
  std::vector<PathPoint> path;   // every point of the path, (0, 0) and the destination included
};

// The directions of `radius`: (0, x) for 0 < x < radius, then (y, x) for 0 < y < radius, |x| < radius,
// x^2 + y^2 < radius^2; each with its path (points of the bounding box whose squared distance to the
// line through 0 and (dy, dx) is < 1, sorted by decreasing |y| + |x|, stable). Directions are grouped by
// path length (shortest first), keeping this order within a group, as the original's PathIndex.
inline std::vector<AffinityDirection> affinity_directions(int64_t radius) {
  const int32_t r = static_cast<int32_t>(radius);
  std::vector<AffinityDirection> dirs;
  for (int32_t x = 1; x < r; ++x) dirs.push_back({0, x, {}});
  for (int32_t y = 1; y < r; ++y)
    for (int32_t x = -r + 1; x < r; ++x)
      if (x * x + y * y < r * r) dirs.push_back({y, x, {}});
  for (AffinityDirection& d : dirs) {
    const int32_t length_sq = d.dy * d.dy + d.dx * d.dx;
    for (int32_t y = std::min(0, d.dy); y <= std::max(0, d.dy); ++y)
      for (int32_t x = std::min(0, d.dx); x <= std::max(0, d.dx); ++x) {
        const int32_t cross = d.dy * x - d.dx * y;
        if (cross * cross < length_sq) d.path.push_back({y, x});  // (cross^2 / length_sq) < 1, exactly
      }
    std::stable_sort(d.path.begin(), d.path.end(), [](const PathPoint& a, const PathPoint& b) {
      return std::abs(a.dy) + std::abs(a.dx) > std::abs(b.dy) + std::abs(b.dx);
    });
  }
  std::stable_sort(dirs.begin(), dirs.end(), [](const AffinityDirection& a, const AffinityDirection& b) {
    return a.path.size() < b.path.size();
  });
  return dirs;
}

// An output tensor. With PUZZLECAM_POISON_OUTPUTS=1 (the tests set it) it is filled with NaN first, so an
// element a kernel fails to write shows up as NaN instead of as stale memory that happens to be right.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  const char* poison = std::getenv("PUZZLECAM_POISON_OUTPUTS");
  if (poison != nullptr && std::strcmp(poison, "1") == 0) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

inline bool affinity_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Labels of valid pairs are < kIgnoreLabel: 0 background, 1..C classes (VOC 20, COCO 80); 255 (and anything
// larger) is ignored. The original's `< 21` for VOC: the same pairs on every label map the pipeline makes.
constexpr int64_t kIgnoreLabel = 255;
// The epsilon inside both logarithms of the loss.
constexpr double kLogEps = 1e-5;

// Sizes of one affinity_sums call: edge (B, 1, H, W), seg (B, H, W), sources in the cropped region
// rows [0, H - R), cols [R, W - R) with R = radius - 1 (none when the map is smaller than that).
struct AffinityGeometry {
  int64_t B, H, W, R, rows, cols;
};

inline AffinityGeometry check_affinity_args(const char* op, const at::Tensor& edge, const at::Tensor& seg,
                                            int64_t radius, at::DeviceType device) {
  TORCH_CHECK_VALUE(radius >= 2 && radius <= 64, op, ": radius must be an int in [2, 64], got ", radius);
  TORCH_CHECK_VALUE(edge.dim() == 4 && edge.size(1) == 1, op, ": edge must be (B, 1, H, W), got shape ",
                    edge.sizes());
  TORCH_CHECK_TYPE(affinity_float(edge.scalar_type()), op,
                   ": edge must be float32, float64, float16 or bfloat16, got ", edge.scalar_type());
  TORCH_CHECK_VALUE(seg.dim() == 3, op, ": seg must be a (B, H, W) label map, got shape ", seg.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(seg.scalar_type()) && !at::isComplexType(seg.scalar_type()) &&
                       seg.scalar_type() != at::kBool,
                   op, ": seg must be an integer label map, got ", seg.scalar_type());
  TORCH_CHECK_VALUE(seg.size(0) == edge.size(0) && seg.size(1) == edge.size(2) && seg.size(2) == edge.size(3), op,
                    ": seg ", seg.sizes(), " must be (B, H, W) of edge ", edge.sizes());
  TORCH_CHECK_VALUE(edge.device().type() == device && seg.device() == edge.device(), op, ": edge (", edge.device(),
                    ") and seg (", seg.device(), ") must both be on one ", device, " device");
  AffinityGeometry g;
  g.B = edge.size(0), g.H = edge.size(2), g.W = edge.size(3), g.R = radius - 1;
  g.rows = std::max<int64_t>(g.H - g.R, 0);
  g.cols = std::max<int64_t>(g.W - 2 * g.R, 0);
  return g;
}

inline void check_affinity_grad(const char* op, const at::Tensor& grad_sums, at::DeviceType device) {
  TORCH_CHECK_VALUE(grad_sums.numel() == 3, op, ": grad_sums must hold 3 values (bg, fg, neg), got shape ",
                    grad_sums.sizes());
  TORCH_CHECK_VALUE(grad_sums.device().type() == device, op, ": grad_sums must be on ", device, ", got ",
                    grad_sums.device());
}

// Sizes of one random_walk call: cams (K, h, w), edge (h, w); steps = 2^exp_times.
struct WalkGeometry {
  int64_t K, h, w, R, steps;
};

inline WalkGeometry check_walk_args(const at::Tensor& cams, const at::Tensor& edge, double beta, int64_t exp_times,
                                    int64_t radius, at::DeviceType device) {
  const char* op = "puzzlecam::random_walk";
  TORCH_CHECK_VALUE(cams.dim() == 3, op, ": cams must be (K, h, w), got shape ", cams.sizes());
  TORCH_CHECK_VALUE(edge.dim() == 2 && edge.size(0) == cams.size(1) && edge.size(1) == cams.size(2), op,
                    ": edge must be (h, w) = (", cams.size(1), ", ", cams.size(2), ") of cams ", cams.sizes(),
                    ", got shape ", edge.sizes());
  TORCH_CHECK_TYPE(affinity_float(cams.scalar_type()) && affinity_float(edge.scalar_type()), op,
                   ": cams and edge must be float32, float64, float16 or bfloat16, got ", cams.scalar_type(), " and ",
                   edge.scalar_type());
  TORCH_CHECK_VALUE(cams.device().type() == device && edge.device() == cams.device(), op, ": cams (", cams.device(),
                    ") and edge (", edge.device(), ") must both be on one ", device, " device");
  TORCH_CHECK_VALUE(std::isfinite(beta), op, ": beta must be finite, got ", beta);
  TORCH_CHECK_VALUE(exp_times >= 0 && exp_times <= 30, op, ": exp_times must be an int in [0, 30], got ", exp_times);
  TORCH_CHECK_VALUE(radius >= 2 && radius <= 64, op, ": radius must be an int in [2, 64], got ", radius);
  WalkGeometry g;
  g.K = cams.size(0), g.h = cams.size(1), g.w = cams.size(2), g.R = radius - 1;
  g.steps = int64_t{1} << exp_times;
  return g;
}

}  // namespace puzzlecam
