// CPU kernels of the affinity ops (docs/extension.md): the random walk of the stride-4 CAMs and the fused
// sums of the AffinityNet loss (forward, backward). Semantics: puzzlecam.affinity.
//
// Affinity sums: per (image, source row) and direction, the path maxima of the row's sources are taken
// along the path's points (contiguous rows of the edge map, vectorized), the pair labels read from the
// label map, and the pair's loss term added to its class's sum: the (B, D, N) tensors of the eager loss
// are never built. The backward recomputes each maximum and its element (the first maximum in path order,
// as max's) and adds the pair's d loss / d edge there; source rows are processed in bands of >= R rows,
// even bands in parallel, then odd ones, so no two threads ever add to one element.
//
// Random walk: y <- y T with T = A^beta column-normalized, A the radius neighbourhood's affinities (both
// directions, 1 on the diagonal). Planes are stored with a zero halo of R = radius - 1 pixels, so every tap
// of a row is a branch-free, contiguous multiply-add the compiler vectorizes; the per-direction weight
// planes are computed once. Threads split the classes (each walks all 2^exp_times steps alone) when there
// are at least as many classes as threads, else each step's rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
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
void walk_row(const acc_t* y, acc_t* out, const acc_t* weight, const acc_t* inv_degree, const int64_t* offsets,
              int64_t D, int64_t plane, int64_t w) {
  // 16 lanes measured fastest on x86-64 (8 and 32/64 lanes took 1.5-2x longer: chains, spills). Measured and
  // not faster (94x125, 3 classes): an AVX2 clone picked at run time, weights interleaved by row
  // ([row][direction][x]), explicit 4-float vectors with 8 accumulators per block.
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

  // Step s reads buffer s % 2 and writes the other one. One row of a range of classes per call: the classes
  // share the row's weights while they are in cache.
  std::vector<acc_t>* buffers[2] = {&current, &next};
  auto step_rows = [&](int64_t step, int64_t y0, int64_t y1, int64_t k0, int64_t k1) {
    const acc_t* src = buffers[step % 2]->data();
    acc_t* dst = buffers[(step + 1) % 2]->data();
    for (int64_t y = y0; y < y1; ++y) {
      const int64_t row = P.at(y, 0);
      for (int64_t k = k0; k < k1; ++k)
        walk_row(src + k * P.size + row, dst + k * P.size + row, weight.data() + row, inv_degree.data() + row,
                 offsets.data(), D, P.size, g.w);
    }
  };
  if (g.K >= at::get_num_threads()) {
    // Enough classes for every thread: each walks its classes through every step alone, with no barrier
    // between steps (a per-step barrier costs a time slice whenever a thread is preempted on a busy machine).
    at::parallel_for(0, g.K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t step = 0; step < g.steps; ++step) step_rows(step, 0, g.h, k0, k1);
    });
  } else {
    // Fewer classes than threads: every step is split over rows.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>((2 * D + 1) * g.w * g.K, 1));
    for (int64_t step = 0; step < g.steps; ++step)
      at::parallel_for(0, g.h, grain, [&](int64_t y0, int64_t y1) { step_rows(step, y0, y1, 0, g.K); });
  }
  const acc_t* walked = buffers[g.steps % 2]->data();
  for (int64_t k = 0; k < g.K; ++k)
    for (int64_t y = 0; y < g.h; ++y)
      std::copy_n(walked + k * P.size + P.at(y, 0), g.w, result + (k * g.h + y) * g.w);
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

// ------------------------------------------------------------------------------------------------
// Affinity sums

enum PairClass : int { kBackground = 0, kForeground = 1, kNegative = 2, kIgnored = 3 };

inline int pair_class(int64_t from, int64_t to) {
  if (from >= kIgnoreLabel || to >= kIgnoreLabel) return kIgnored;
  if (from != to) return kNegative;
  if (from == 0) return kBackground;
  return from > 0 ? kForeground : kIgnored;  // equal negative labels: valid, but neither bg nor fg (as the original)
}

// v replaces the running maximum `current` when greater, or when NaN (and current is not): a NaN stays, as
// torch's max propagates it.
template <typename acc_t>
inline bool takes_over(acc_t v, acc_t current) {
  return !(v <= current) & (current == current);  // non-short-circuit &: a select, not a branch
}

// peak = max(peak, row) elementwise (branch-free and restrict-qualified, so the compiler vectorizes it).
template <typename acc_t>
void running_max(const acc_t* __restrict__ row, int64_t cols, acc_t* __restrict__ peak) {
#pragma omp simd
  for (int64_t x = 0; x < cols; ++x) peak[x] = takes_over(row[x], peak[x]) ? row[x] : peak[x];
}

// The same, also keeping in arg the path index of the maximum: the first maximum (or NaN) in path order
// keeps it, as max's.
template <typename acc_t>
void running_argmax(const acc_t* __restrict__ row, int32_t k, int64_t cols, acc_t* __restrict__ peak,
                    int32_t* __restrict__ arg) {
#pragma omp simd
  for (int64_t x = 0; x < cols; ++x) {
    const acc_t v = row[x], current = peak[x];
    const bool replace = takes_over(v, current);
    const int32_t mask = -static_cast<int32_t>(replace);  // all bits set where v is the new maximum
    peak[x] = replace ? v : current;
    arg[x] = (arg[x] & ~mask) | (k & mask);
  }
}

// The pairs of one source row `y` of image `b`: for each, its class, affinity and (kBackward) the element of
// the edge map holding its path's maximum. Calls visit(class, affinity, element) for every valid pair, and
// for every ignored pair whose path holds a NaN (the reference's masked sums are NaN then too: NaN * 0).
template <typename acc_t, bool kBackward, typename Visit>
void visit_row_pairs(const acc_t* edge, const int64_t* seg, const AffinityGeometry& g,
                     const std::vector<AffinityDirection>& dirs, int64_t y, std::vector<acc_t>& peak,
                     std::vector<int32_t>& arg, Visit&& visit) {
  const int64_t cols = g.cols, W = g.W, x0 = g.R;
  const int64_t* from = seg + y * W + x0;
  for (const AffinityDirection& dir : dirs) {
    const PathPoint first = dir.path[0];
    std::copy_n(edge + (y + first.dy) * W + x0 + first.dx, cols, peak.data());
    if (kBackward) std::fill(arg.begin(), arg.begin() + cols, 0);
    for (size_t k = 1; k < dir.path.size(); ++k) {
      const PathPoint p = dir.path[k];
      const acc_t* row = edge + (y + p.dy) * W + x0 + p.dx;
      if (kBackward) {
        running_argmax(row, static_cast<int32_t>(k), cols, peak.data(), arg.data());
      } else {
        running_max(row, cols, peak.data());
      }
    }
    const int64_t* to = seg + (y + dir.dy) * W + x0 + dir.dx;
    for (int64_t x = 0; x < cols; ++x) {
      const int cls = pair_class(from[x], to[x]);
      if (cls == kIgnored && peak[x] == peak[x]) continue;
      int64_t element = 0;
      if (kBackward) {
        const PathPoint p = dir.path[arg[x]];
        element = (y + p.dy) * W + x0 + x + p.dx;
      }
      visit(cls, acc_t(1) - peak[x], element);
    }
  }
}

template <typename acc_t>
void affinity_sums_kernel(const acc_t* edge, const int64_t* seg, const AffinityGeometry& g, int64_t radius,
                          acc_t* sums_out, float* counts_out) {
  const std::vector<AffinityDirection> dirs = affinity_directions(radius);
  const int64_t items = g.B * g.rows;
  // Per (image, row) partials, added in a fixed order afterwards: the result does not depend on threads.
  std::vector<double> sums(items * 3, 0.0);
  std::vector<int64_t> counts(items * 3, 0);
  const acc_t pos_eps = static_cast<acc_t>(kLogEps), neg_one = static_cast<acc_t>(1.0 + kLogEps);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> peak(g.cols);
    std::vector<int32_t> arg;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.rows, y = item % g.rows;
      double row_sums[3] = {0.0, 0.0, 0.0};
      int64_t row_counts[3] = {0, 0, 0};
      visit_row_pairs<acc_t, false>(edge + b * g.H * g.W, seg + b * g.H * g.W, g, dirs, y, peak, arg,
                                    [&](int cls, acc_t a, int64_t) {
                                      if (a != a) {  // a NaN in any pair's path makes all three sums NaN
                                        for (double& sum : row_sums) sum = std::numeric_limits<double>::quiet_NaN();
                                        if (cls == kIgnored) return;
                                      }
                                      const acc_t term = cls == kNegative ? -std::log(neg_one - a)
                                                                          : -std::log(a + pos_eps);
                                      row_sums[cls] += term;
                                      row_counts[cls] += 1;
                                    });
      for (int c = 0; c < 3; ++c) sums[item * 3 + c] = row_sums[c], counts[item * 3 + c] = row_counts[c];
    }
  });
  double total[3] = {0.0, 0.0, 0.0};
  int64_t total_counts[3] = {0, 0, 0};
  for (int64_t item = 0; item < items; ++item)
    for (int c = 0; c < 3; ++c) total[c] += sums[item * 3 + c], total_counts[c] += counts[item * 3 + c];
  for (int c = 0; c < 3; ++c) {
    sums_out[c] = static_cast<acc_t>(total[c]);
    counts_out[c] = static_cast<float>(total_counts[c]);
  }
}

template <typename acc_t>
void affinity_sums_backward_kernel(const acc_t* edge, const int64_t* seg, const AffinityGeometry& g, int64_t radius,
                                   const acc_t* grad_sums, acc_t* grad) {
  const std::vector<AffinityDirection> dirs = affinity_directions(radius);
  std::fill_n(grad, g.B * g.H * g.W, acc_t(0));
  const acc_t pos_eps = static_cast<acc_t>(kLogEps), neg_one = static_cast<acc_t>(1.0 + kLogEps);
  // d sum / d edge at the path's maximum = -d sum / d a: 1 / (a + eps) for bg and fg, -1 / (1 + eps - a) for neg.
  const acc_t g_bg = grad_sums[0], g_fg = grad_sums[1], g_neg = grad_sums[2];
  // A band of `band` source rows adds to edge rows [start, start + band + R): bands two apart never share a row.
  const int64_t band = std::max<int64_t>(g.R, 8);
  const int64_t bands = (g.rows + band - 1) / band;
  for (int64_t parity = 0; parity < 2; ++parity) {
    const int64_t items = g.B * ((bands - parity + 1) / 2);
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> peak(g.cols);
      std::vector<int32_t> arg(g.cols);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t per_image = (bands - parity + 1) / 2;
        const int64_t b = item / per_image, first = (2 * (item % per_image) + parity) * band;
        acc_t* grad_b = grad + b * g.H * g.W;
        for (int64_t y = first; y < std::min(first + band, g.rows); ++y) {
          visit_row_pairs<acc_t, true>(edge + b * g.H * g.W, seg + b * g.H * g.W, g, dirs, y, peak, arg,
                                       [&](int cls, acc_t a, int64_t element) {
                                         // An ignored pair comes here only with a NaN affinity: NaN, as 0 * NaN.
                                         grad_b[element] += cls == kNegative     ? -g_neg / (neg_one - a)
                                                            : cls == kBackground ? g_bg / (a + pos_eps)
                                                            : cls == kForeground ? g_fg / (a + pos_eps)
                                                                                 : a;
                                       });
        }
      }
    });
  }
}

// fp64 edges are computed in fp64, every other dtype in fp32.
at::ScalarType affinity_acc_type(const at::Tensor& edge) {
  return edge.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> affinity_sums_cpu(const at::Tensor& edge_in, const at::Tensor& seg_in,
                                                     int64_t radius) {
  const AffinityGeometry g = check_affinity_args("puzzlecam::affinity_sums", edge_in, seg_in, radius, at::kCPU);
  const at::ScalarType acc = affinity_acc_type(edge_in);
  const at::Tensor edge = edge_in.to(acc).contiguous(), seg = seg_in.to(at::kLong).contiguous();
  at::Tensor sums = new_output({3}, edge.options());
  at::Tensor counts = new_output({3}, edge.options().dtype(at::kFloat));
  if (acc == at::kDouble) {
    affinity_sums_kernel<double>(edge.data_ptr<double>(), seg.data_ptr<int64_t>(), g, radius,
                                 sums.data_ptr<double>(), counts.data_ptr<float>());
  } else {
    affinity_sums_kernel<float>(edge.data_ptr<float>(), seg.data_ptr<int64_t>(), g, radius, sums.data_ptr<float>(),
                                counts.data_ptr<float>());
  }
  return {sums, counts};
}

at::Tensor affinity_sums_backward_cpu(const at::Tensor& grad_sums_in, const at::Tensor& edge_in,
                                      const at::Tensor& seg_in, int64_t radius) {
  const char* op = "puzzlecam::affinity_sums_backward";
  const AffinityGeometry g = check_affinity_args(op, edge_in, seg_in, radius, at::kCPU);
  check_affinity_grad(op, grad_sums_in, at::kCPU);
  const at::ScalarType acc = affinity_acc_type(edge_in);
  const at::Tensor edge = edge_in.to(acc).contiguous(), seg = seg_in.to(at::kLong).contiguous();
  const at::Tensor grad_sums = grad_sums_in.to(acc).contiguous().view({3});
  // Accumulated in the compute dtype, returned in the edge's dtype (a copy only for fp16/bf16 edges).
  at::Tensor grad = acc == edge_in.scalar_type() ? new_output(edge_in.sizes(), edge.options())
                                                 : at::empty(edge_in.sizes(), edge.options());
  if (acc == at::kDouble) {
    affinity_sums_backward_kernel<double>(edge.data_ptr<double>(), seg.data_ptr<int64_t>(), g, radius,
                                          grad_sums.data_ptr<double>(), grad.data_ptr<double>());
  } else {
    affinity_sums_backward_kernel<float>(edge.data_ptr<float>(), seg.data_ptr<int64_t>(), g, radius,
                                         grad_sums.data_ptr<float>(), grad.data_ptr<float>());
  }
  return grad.to(edge_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(puzzlecam, CPU, m) {
  m.impl("random_walk", &random_walk_cpu);
  m.impl("affinity_sums", &affinity_sums_cpu);
  m.impl("affinity_sums_backward", &affinity_sums_backward_cpu);
}

}  // namespace puzzlecam
