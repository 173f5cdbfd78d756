// CPU kernels of the affinity ops (docs/extension.md): the random walk of the stride-4 CAMs and the fused
// sums of the AffinityNet loss (forward, backward). Semantics: puzzlecam.affinity.
//
// Random walk: y <- y T with T = A^beta column-normalized, A the radius neighbourhood's affinities (both
// directions, 1 on the diagonal). Planes are stored with a zero halo of R = radius - 1 pixels, so every tap
// of a row is a branch-free, contiguous multiply-add the compiler vectorizes; the per-direction weight
// planes are computed once, and each of the 2^exp_times steps is one parallel pass over (row, class).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "affinity_common.h"

namespace puzzlecam {
namespace {

// Padded plane geometry: pixel (y, x) of an h x w map lives at (y + R) * pw + (x + R).
struct PaddedPlane {
  int64_t h, w, R, pw, size;
  PaddedPlane(int64_t h_, int64_t w_, int64_t R_) : h(h_), w(w_), R(R_), pw(w_ + 2 * R_), size((h_ + 2 * R_) * pw) {}
  int64_t at(int64_t y, int64_t x) const { return (y + R) * pw + x + R; }
};

// Half-stencil weights: weight[d][p] = A(p, p + offset_d)^beta for the forward direction d (0 where the
// destination leaves the map), and inv_degree[p] = 1 / column sum of A^beta at p (the diagonal's 1 included).
template <typename acc_t>
void walk_weights(const acc_t* edge, const PaddedPlane& P, const std::vector<AffinityDirection>& dirs, acc_t beta,
                  std::vector<acc_t>& weight, std::vector<acc_t>& inv_degree) {
  const int64_t D = static_cast<int64_t>(dirs.size());
  weight.assign(D * P.size, acc_t(0));
  inv_degree.assign(P.size, acc_t(0));
  at::parallel_for(0, D, 1, [&](int64_t begin, int64_t end) {
    for (int64_t d = begin; d < end; ++d) {
      const AffinityDirection& dir = dirs[d];
      acc_t* plane = weight.data() + d * P.size;
      for (int64_t y = 0; y + dir.dy < P.h; ++y) {
        for (int64_t x = std::max<int64_t>(0, -dir.dx); x < std::min<int64_t>(P.w, P.w - dir.dx); ++x) {
          acc_t peak = edge[y * P.w + x];
          for (const PathPoint& p : dir.path) peak = std::max(peak, edge[(y + p.dy) * P.w + x + p.dx]);
          plane[P.at(y, x)] = std::pow(acc_t(1) - peak, beta);
        }
      }
    }
  });
  for (int64_t y = 0; y < P.h; ++y) {
    for (int64_t x = 0; x < P.w; ++x) {
      const int64_t p = P.at(y, x);
      acc_t degree = 1;  // the diagonal: 1^beta
      for (int64_t d = 0; d < D; ++d) {
        const int64_t offset = dirs[d].dy * P.pw + dirs[d].dx;
        degree += weight[d * P.size + p] + weight[d * P.size + p - offset];
      }
      inv_degree[p] = acc_t(1) / degree;
    }
  }
}

// One step for kLanes pixels of one row of one class: out[x] = inv_degree[x] * (y[x] + sum_d (w_d[x] y[x + o_d]
// + w_d[x - o_d] y[x - o_d])). The kLanes accumulators stay in registers across the taps, enough independent
// chains to hide the add latency.
template <typename acc_t, int64_t kLanes>
inline __attribute__((always_inline)) void walk_block(const acc_t* __restrict__ y, acc_t* __restrict__ out,
                                                      const acc_t* __restrict__ weight,
                                                      const acc_t* __restrict__ inv_degree, const int64_t* offsets,
                                                      int64_t D, int64_t plane, int64_t x0) {
  acc_t acc[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) acc[j] = y[x0 + j];
  for (int64_t d = 0; d < D; ++d) {
    const int64_t o = offsets[d];
    const acc_t* wf = weight + d * plane + x0;
    const acc_t* wb = wf - o;
    const acc_t* yf = y + x0 + o;
    const acc_t* yb = y + x0 - o;
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += wf[j] * yf[j] + wb[j] * yb[j];
  }
  for (int64_t j = 0; j < kLanes; ++j) out[x0 + j] = acc[j] * inv_degree[x0 + j];
}

// One row: blocks of kLanes, the last one shifted back to end at the row's end (it recomputes a few pixels
// with the same result) so no scalar tail is left; rows narrower than a block take a narrower one.
template <typename acc_t, int64_t kLanes>
inline __attribute__((always_inline)) void walk_row_blocks(const acc_t* y, acc_t* out, const acc_t* weight,
                                                           const acc_t* inv_degree, const int64_t* offsets,
                                                           int64_t D, int64_t plane, int64_t w) {
  if constexpr (kLanes > 1) {
    if (w < kLanes) return walk_row_blocks<acc_t, kLanes / 2>(y, out, weight, inv_degree, offsets, D, plane, w);
  }
  int64_t x0 = 0;
  for (; x0 + kLanes <= w; x0 += kLanes) walk_block<acc_t, kLanes>(y, out, weight, inv_degree, offsets, D, plane, x0);
  if (x0 < w) walk_block<acc_t, kLanes>(y, out, weight, inv_degree, offsets, D, plane, w - kLanes);
}

template <typename acc_t>
void walk_row(const acc_t* y, acc_t* out, const acc_t* weight,
                                                    const acc_t* inv_degree, const int64_t* offsets, int64_t D,
                                                    int64_t plane, int64_t w) {
  // 16 lanes measured fastest on x86-64 (8 and 32/64 lanes took 1.5-2x longer: chains, spills).
  walk_row_blocks<acc_t, 16>(y, out, weight, inv_degree, offsets, D, plane, w);
}

template <typename acc_t>
void random_walk_kernel(const acc_t* cams, const acc_t* edge, const WalkGeometry& g, acc_t beta, int64_t radius,
                        acc_t* result) {
  const PaddedPlane P(g.h, g.w, g.R);
  const std::vector<AffinityDirection> dirs = affinity_directions(radius);
  const int64_t D = static_cast<int64_t>(dirs.size());
  std::vector<acc_t> weight, inv_degree;
  walk_weights(edge, P, dirs, beta, weight, inv_degree);
  std::vector<int64_t> offsets(D);
  for (int64_t d = 0; d < D; ++d) offsets[d] = dirs[d].dy * P.pw + dirs[d].dx;

  // x = cams * (1 - edge), in zero-haloed planes (the halo stays 0: its weights are 0 too).
  std::vector<acc_t> current(g.K * P.size, acc_t(0)), next(g.K * P.size, acc_t(0));
  for (int64_t k = 0; k < g.K; ++k)
    for (int64_t y = 0; y < g.h; ++y)
      for (int64_t x = 0; x < g.w; ++x)
        current[k * P.size + P.at(y, x)] = cams[(k * g.h + y) * g.w + x] * (acc_t(1) - edge[y * g.w + x]);

  // (row, class) items, classes inner: the rows of one thread share their weight rows across classes.
  const int64_t work = (2 * D + 1) * g.w;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(work, 1));
  for (int64_t step = 0; step < g.steps; ++step) {
    at::parallel_for(0, g.h * g.K, grain, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t y = item / g.K, k = item % g.K;
        const int64_t row = P.at(y, 0);
        walk_row(current.data() + k * P.size + row, next.data() + k * P.size + row, weight.data() + row,
                 inv_degree.data() + row, offsets.data(), D, P.size, g.w);
      }
    });
    std::swap(current, next);
  }
  for (int64_t k = 0; k < g.K; ++k)
    for (int64_t y = 0; y < g.h; ++y)
      std::copy_n(current.data() + k * P.size + P.at(y, 0), g.w, result + (k * g.h + y) * g.w);
}

at::Tensor random_walk_cpu(const at::Tensor& cams_in, const at::Tensor& edge_in, double beta, int64_t exp_times,
                           int64_t radius) {
  const WalkGeometry g = check_walk_args(cams_in, edge_in, beta, exp_times, radius, at::kCPU);
  // fp64 inputs walk in fp64; every other dtype in fp32 (the output's dtype).
  const at::ScalarType acc = cams_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor cams = cams_in.to(acc).contiguous(), edge = edge_in.to(acc).contiguous();
  at::Tensor result = new_output({g.K, g.h, g.w}, cams.options());
  if (result.numel() == 0) return result;
  if (acc == at::kDouble) {
    random_walk_kernel<double>(cams.data_ptr<double>(), edge.data_ptr<double>(), g, beta, radius,
                               result.data_ptr<double>());
  } else {
    random_walk_kernel<float>(cams.data_ptr<float>(), edge.data_ptr<float>(), g, static_cast<float>(beta), radius,
                              result.data_ptr<float>());
  }
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(puzzlecam, CPU, m) { m.impl("random_walk", &random_walk_cpu); }

}  // namespace puzzlecam
