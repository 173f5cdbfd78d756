// CPU kernels of the puzzlecam ops: reconstruction loss (forward, backward) and multi-scale CAM fusion.
//
// Both ops work plane by plane ((b, c) or (class, row)), parallel over planes with at::parallel_for.
// The reconstruction loss at level feature reads and writes the tensors directly, tile row by tile row
// (the merged plane is never gathered), with explicit 4-lane vectors for its sums; at level cam, and in
// the fusion, each plane is first converted to fp32 in a small contiguous buffer, so the arithmetic
// loops are plain fp32 loops the compiler vectorizes (-O3, omp simd).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"

namespace puzzlecam {
namespace {

constexpr float kCamEps = 1e-5f;  // puzzlecam.puzzle.CAM_EPS

// ------------------------------------------------------------------------------------------------
// fp32 plane helpers

float plane_sum(const float* x, int64_t len) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < len; ++i) s += x[i];
  return s;
}

// max over the plane of relu(x) (0 when every value is <= 0), as make_cam's peak.
float plane_relu_max(const float* x, int64_t len) {
  // Eight independent lanes: a single running max is a serial dependency chain the compiler keeps scalar.
  float lanes[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    for (int j = 0; j < 8; ++j) lanes[j] = x[i + j] > lanes[j] ? x[i + j] : lanes[j];
  float m = 0.f;
  for (; i < len; ++i) m = x[i] > m ? x[i] : m;
  for (int j = 0; j < 8; ++j) m = lanes[j] > m ? lanes[j] : m;
  return m;
}

// make_cam in place: relu(x - eps) / (peak + eps).
void plane_make_cam(float* x, int64_t len, float peak) {
  const float denom = peak + kCamEps;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float t = x[i] - kCamEps;
    x[i] = (t > 0.f ? t : 0.f) / denom;
  }
}

// Backward of make_cam, given the upstream grad `g` (overwritten with the grad w.r.t. the raw `x`).
// out = relu(x - eps) / d with d = amax(relu(x)) + eps. torch distributes amax's grad evenly over
// the ties and relu's backward keeps it only where x > 0, so the peak term reaches the maxima only
// when the peak is positive.
void plane_make_cam_backward(const float* x, float* g, int64_t len, float peak) {
  const float denom = peak + kCamEps;
  float grad_denom = 0.f;  // d loss / d denom = sum_i -g_i * relu(x_i - eps) / denom^2
  int64_t ties = 0;
#pragma omp simd reduction(+ : grad_denom, ties)
  for (int64_t i = 0; i < len; ++i) {
    const float t = x[i] - kCamEps;
    grad_denom += -g[i] * (t > 0.f ? t : 0.f) / (denom * denom);
    ties += (x[i] > 0.f ? x[i] : 0.f) == peak;
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    // A 0/1 factor instead of a branch, so the loop vectorizes (g is finite).
    g[i] = g[i] / denom * static_cast<float>((x[i] - kCamEps) > 0.f);
  }
  if (peak > 0.f) {
    const float share = grad_denom / static_cast<float>(ties);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) g[i] += x[i] == peak ? share : 0.f;
  }
}

// ------------------------------------------------------------------------------------------------
// Plane I/O: the (b, c) plane of cam and of merge(cam_tiles).

template <typename T>
struct LossPlanes {
  const LossGeometry& g;
  const T* cam;
  const T* tiles;

  int64_t plane_len() const { return g.h * g.w; }

  // Calls fn(full, tile, at) for every tile row of plane (b, c): `full` is the offset of the row's
  // tw elements in cam (and grad_cam), `tile` their offset in cam_tiles (and grad_cam_tiles), `at`
  // their offset in a contiguous h x w plane. Tile piece p = i*n + j of image b sits at batch p*B + b.
  // Offsets advance by additions only (no divisions per row).
  template <typename Fn>
  static void for_each_row(const LossGeometry& g, int64_t b, int64_t c, Fn&& fn) {
    const int64_t tile_len = g.th * g.tw, piece_stride = g.B * g.C * tile_len;
    const int64_t full_plane = (b * g.C + c) * g.h * g.w;
    int64_t tile = (b * g.C + c) * tile_len;  // piece 0
    for (int64_t i = 0; i < g.n; ++i) {
      for (int64_t j = 0; j < g.n; ++j, tile += piece_stride) {
        int64_t at = i * g.th * g.w + j * g.tw;
        for (int64_t ty = 0; ty < g.th; ++ty, at += g.w) fn(full_plane + at, tile + ty * g.tw, at);
      }
    }
  }

  void load(int64_t b, int64_t c, float* full, float* merged) const {
    for_each_row(g, b, c, [&](int64_t f, int64_t t, int64_t at) {
      for (int64_t x = 0; x < g.tw; ++x) full[at + x] = static_cast<float>(cam[f + x]);
      for (int64_t x = 0; x < g.tw; ++x) merged[at + x] = static_cast<float>(tiles[t + x]);
    });
  }

  static void store(const LossGeometry& g, int64_t b, int64_t c, const float* full, const float* merged, T* grad_cam,
                    T* grad_tiles) {
    for_each_row(g, b, c, [&](int64_t f, int64_t t, int64_t at) {
      for (int64_t x = 0; x < g.tw; ++x) grad_cam[f + x] = static_cast<T>(full[at + x]);
      for (int64_t x = 0; x < g.tw; ++x) grad_tiles[t + x] = static_cast<T>(merged[at + x]);
    });
  }
};

int64_t plane_grain(int64_t plane_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(plane_len, 1)); }

// ------------------------------------------------------------------------------------------------
// Reconstruction loss
//
// Level feature compares the raw maps, so each element is used once: forward and backward run straight
// on the tensors, tile row by tile row, with no copy. Sums run in vector registers across the rows and
// are added at the end of the plane.
// Level cam needs each plane's peaks first: the plane is copied to fp32 buffers (L1-resident).

// GNU vector extension (gcc, clang): 4 fp32 lanes, one SSE/NEON register (a 32-byte vector measured 4x
// slower on a build without AVX). gcc vectorizes neither a reduction kept in a lane array nor one
// carried across the loop over rows, and `omp simd reduction` folds its lanes after every short row.
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

template <typename T>
inline f32x4 load4(const T* p) {
  return f32x4{static_cast<float>(p[0]), static_cast<float>(p[1]), static_cast<float>(p[2]), static_cast<float>(p[3])};
}
inline f32x4 load4(const float* p) {
  f32x4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f32x4 abs4(f32x4 v) { return reinterpret_cast<f32x4>(reinterpret_cast<i32x4>(v) & 0x7fffffff); }
inline float sum4(f32x4 v) { return (v[0] + v[1]) + (v[2] + v[3]); }

// Level feature forward of plane (b, c): the sum of the merged plane and the summed error, in 8 fp32
// lanes (two vectors: two independent add chains) plus a scalar tail for rows whose width is not a
// multiple of 8.
template <typename T, bool L2>
void feature_forward_plane(const LossPlanes<T>& io, int64_t b, int64_t c, float& merged_sum, float& err_sum) {
  const int64_t tw = io.g.tw;
  f32x4 ms0 = {}, ms1 = {}, es0 = {}, es1 = {};
  float ms = 0.f, es = 0.f;
  LossPlanes<T>::for_each_row(io.g, b, c, [&](int64_t f, int64_t t, int64_t) {
    const T* a = io.cam + f;
    const T* r = io.tiles + t;
    int64_t x = 0;
    for (; x + 8 <= tw; x += 8) {
      const f32x4 r0 = load4(r + x), r1 = load4(r + x + 4);
      const f32x4 d0 = load4(a + x) - r0, d1 = load4(a + x + 4) - r1;
      ms0 += r0;
      ms1 += r1;
      es0 += L2 ? d0 * d0 : abs4(d0);
      es1 += L2 ? d1 * d1 : abs4(d1);
    }
    for (; x < tw; ++x) {
      const float rv = static_cast<float>(r[x]);
      const float d = static_cast<float>(a[x]) - rv;
      ms += rv;
      es += L2 ? d * d : std::fabs(d);
    }
  });
  merged_sum = sum4(ms0 + ms1) + ms;
  err_sum = sum4(es0 + es1) + es;
}

constexpr int64_t kRowChunk = 64;  // fp32 staging of half-precision rows

// Level feature backward of plane (b, c), written straight to the gradients: the error's gradient
// w.r.t. the full map, its negative plus GAP's gradient for the merged map.
template <typename T, bool L2>
void feature_backward_plane(const LossPlanes<T>& io, int64_t b, int64_t c, float coef, float grad_logit,
                            T* grad_cam, T* grad_tiles) {
  const int64_t tw = io.g.tw;
  LossPlanes<T>::for_each_row(io.g, b, c, [&](int64_t f, int64_t t, int64_t) {
    const T* a = io.cam + f;
    const T* r = io.tiles + t;
    T* ga = grad_cam + f;
    T* gr = grad_tiles + t;
    if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
      for (int64_t x = 0; x < tw; ++x) {
        const float d = a[x] - r[x];
        const float gd = L2 ? coef * 2.f * d : coef * static_cast<float>((d > 0.f) - (d < 0.f));
        ga[x] = gd;
        gr[x] = -gd + grad_logit;
      }
    } else {  // `omp simd` over the half-precision conversions measured 2-3x slower than plain loops
      float gd[kRowChunk];
      for (int64_t x0 = 0; x0 < tw; x0 += kRowChunk) {
        const int64_t m = std::min<int64_t>(kRowChunk, tw - x0);
        for (int64_t x = 0; x < m; ++x) {
          const float d = static_cast<float>(a[x0 + x]) - static_cast<float>(r[x0 + x]);
          gd[x] = L2 ? coef * 2.f * d : coef * static_cast<float>((d > 0.f) - (d < 0.f));
        }
        for (int64_t x = 0; x < m; ++x) ga[x0 + x] = static_cast<T>(gd[x]);
        for (int64_t x = 0; x < m; ++x) gr[x0 + x] = static_cast<T>(-gd[x] + grad_logit);
      }
    }
  });
}

template <typename T>
void loss_forward(const LossGeometry& g, const at::Tensor& cam, const at::Tensor& tiles, const float* labels,
                  bool masking, float* logits, double* plane_err) {
  const LossPlanes<T> io{g, cam.data_ptr<T>(), tiles.data_ptr<T>()};
  const int64_t len = io.plane_len();
  if (!g.cam_level) {
    at::parallel_for(0, g.B * g.C, plane_grain(len), [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        float merged_sum, err;
        if (g.l2)
          feature_forward_plane<T, true>(io, bc / g.C, bc % g.C, merged_sum, err);
        else
          feature_forward_plane<T, false>(io, bc / g.C, bc % g.C, merged_sum, err);
        logits[bc] = merged_sum / static_cast<float>(len);
        plane_err[bc] = masking ? static_cast<double>(err * labels[bc]) : static_cast<double>(err);
      }
    });
    return;
  }
  at::parallel_for(0, g.B * g.C, plane_grain(len), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(2 * len);
    float* full = buf.data();
    float* merged = full + len;
    for (int64_t bc = begin; bc < end; ++bc) {
      io.load(bc / g.C, bc % g.C, full, merged);
      logits[bc] = plane_sum(merged, len) / static_cast<float>(len);
      plane_make_cam(full, len, plane_relu_max(full, len));
      plane_make_cam(merged, len, plane_relu_max(merged, len));
      float err = 0.f;
      if (g.l2) {
#pragma omp simd reduction(+ : err)
        for (int64_t k = 0; k < len; ++k) err += (full[k] - merged[k]) * (full[k] - merged[k]);
      } else {
#pragma omp simd reduction(+ : err)
        for (int64_t k = 0; k < len; ++k) err += std::fabs(full[k] - merged[k]);
      }
      plane_err[bc] = masking ? static_cast<double>(err * labels[bc]) : static_cast<double>(err);
    }
  });
}

template <typename T>
void loss_backward(const LossGeometry& g, const at::Tensor& cam, const at::Tensor& tiles, const float* labels,
                   bool masking, float grad_re, const float* grad_logits, at::Tensor& grad_cam,
                   at::Tensor& grad_tiles) {
  const LossPlanes<T> io{g, cam.data_ptr<T>(), tiles.data_ptr<T>()};
  T* grad_cam_ptr = grad_cam.data_ptr<T>();
  T* grad_tiles_ptr = grad_tiles.data_ptr<T>();
  const int64_t len = io.plane_len();
  const float grad_mean = grad_re / static_cast<float>(g.B * g.C * len);  // mean's backward
  if (!g.cam_level) {
    at::parallel_for(0, g.B * g.C, plane_grain(len), [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const float coef = masking ? grad_mean * labels[bc] : grad_mean;
        const float grad_logit = grad_logits[bc] / static_cast<float>(len);  // GAP's backward
        if (g.l2)
          feature_backward_plane<T, true>(io, bc / g.C, bc % g.C, coef, grad_logit, grad_cam_ptr, grad_tiles_ptr);
        else
          feature_backward_plane<T, false>(io, bc / g.C, bc % g.C, coef, grad_logit, grad_cam_ptr, grad_tiles_ptr);
      }
    });
    return;
  }
  at::parallel_for(0, g.B * g.C, plane_grain(len), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(4 * len);
    float* full = buf.data();
    float* merged = full + len;
    float* grad_full = merged + len;
    float* grad_merged = grad_full + len;
    for (int64_t bc = begin; bc < end; ++bc) {
      io.load(bc / g.C, bc % g.C, full, merged);
      const float coef = masking ? grad_mean * labels[bc] : grad_mean;
      // compare the normalized maps; keep the raw ones for make_cam's backward
      const float peak_full = plane_relu_max(full, len);
      const float peak_merged = plane_relu_max(merged, len);
      std::copy(full, full + len, grad_full);
      std::copy(merged, merged + len, grad_merged);
      plane_make_cam(grad_full, len, peak_full);
      plane_make_cam(grad_merged, len, peak_merged);
      // grad of the error w.r.t. the compared full map (in place); the merged map gets its negative.
      if (g.l2) {
#pragma omp simd
        for (int64_t k = 0; k < len; ++k) {
          const float d = grad_full[k] - grad_merged[k];
          grad_full[k] = coef * 2.f * d;
          grad_merged[k] = -grad_full[k];
        }
      } else {
#pragma omp simd
        for (int64_t k = 0; k < len; ++k) {
          const float d = grad_full[k] - grad_merged[k];
          grad_full[k] = coef * static_cast<float>((d > 0.f) - (d < 0.f));
          grad_merged[k] = -grad_full[k];
        }
      }
      plane_make_cam_backward(full, grad_full, len, peak_full);
      plane_make_cam_backward(merged, grad_merged, len, peak_merged);
      const float grad_logit = grad_logits[bc] / static_cast<float>(len);  // GAP's backward
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) grad_merged[k] += grad_logit;
      LossPlanes<T>::store(g, bc / g.C, bc % g.C, grad_full, grad_merged, grad_cam_ptr, grad_tiles_ptr);
    }
  });
}

// Calls fn.template operator()<T>() for the C++ type T of a supported float dtype.
template <typename Fn>
void dispatch_float(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK_TYPE(false, "puzzlecam: unsupported dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor> reconstruction_loss_cpu(const at::Tensor& cam_in, const at::Tensor& tiles_in,
                                                           const at::Tensor& labels_in, int64_t n,
                                                           c10::string_view level, c10::string_view kind,
                                                           bool masking) {
  const LossGeometry g = check_loss_args(cam_in, tiles_in, labels_in, n, level, kind, at::kCPU);
  const at::Tensor cam = cam_in.contiguous(), tiles = tiles_in.contiguous();
  const at::Tensor labels = labels_in.to(at::kFloat).contiguous();
  at::Tensor logits = at::empty({g.B, g.C}, cam.options().dtype(at::kFloat));
  std::vector<double> plane_err(g.B * g.C, 0.0);
  if (cam.numel() > 0) {
    dispatch_float(cam.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      loss_forward<T>(g, cam, tiles, labels.data_ptr<float>(), masking, logits.data_ptr<float>(), plane_err.data());
    });
  } else {
    logits.fill_(std::numeric_limits<float>::quiet_NaN());  // GAP of empty maps, as torch's mean
  }
  double total = 0.0;
  for (double e : plane_err) total += e;
  // Mean over all B*C*h*w elements (nan for an empty input, as torch's mean).
  const double count = static_cast<double>(g.B * g.C * g.h * g.w);
  at::Tensor re = at::full({}, static_cast<float>(total / count), cam.options().dtype(at::kFloat));
  return {re, logits};
}

std::tuple<at::Tensor, at::Tensor> reconstruction_loss_backward_cpu(
    const at::Tensor& grad_re, const at::Tensor& grad_logits_in, const at::Tensor& cam_in, const at::Tensor& tiles_in,
    const at::Tensor& labels_in, int64_t n, c10::string_view level, c10::string_view kind, bool masking) {
  const LossGeometry g = check_loss_args(cam_in, tiles_in, labels_in, n, level, kind, at::kCPU);
  check_loss_grads(grad_re, grad_logits_in, g, at::kCPU);
  const at::Tensor cam = cam_in.contiguous(), tiles = tiles_in.contiguous();
  const at::Tensor labels = labels_in.to(at::kFloat).contiguous();
  const at::Tensor grad_logits = grad_logits_in.to(at::kFloat).contiguous();
  const float grad_re_value = grad_re.to(at::kFloat).item<float>();
  at::Tensor grad_cam = at::empty_like(cam, at::MemoryFormat::Contiguous);
  at::Tensor grad_tiles = at::empty_like(tiles, at::MemoryFormat::Contiguous);
  if (cam.numel() > 0) {
    dispatch_float(cam.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      loss_backward<T>(g, cam, tiles, labels.data_ptr<float>(), masking, grad_re_value,
                       grad_logits.data_ptr<float>(), grad_cam, grad_tiles);
    });
  }
  return {grad_cam, grad_tiles};
}

// ------------------------------------------------------------------------------------------------
// Multi-scale CAM fusion

// Bilinear (align_corners=False) source indices and weights along one axis, as torch computes them.
struct AxisWeights {
  std::vector<int64_t> i0, i1;
  std::vector<float> l0, l1;
};

AxisWeights axis_weights(int64_t in_size, int64_t out_size, int64_t keep) {
  AxisWeights a;
  a.i0.resize(keep), a.i1.resize(keep), a.l0.resize(keep), a.l1.resize(keep);
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  for (int64_t o = 0; o < keep; ++o) {
    float src = scale * (static_cast<float>(o) + 0.5f) - 0.5f;
    if (src < 0.f) src = 0.f;
    const int64_t i0 = std::min<int64_t>(static_cast<int64_t>(src), in_size - 1);
    const float lambda = std::min(std::max(src - static_cast<float>(i0), 0.f), 1.f);
    a.i0[o] = i0;
    a.i1[o] = i0 + (i0 < in_size - 1 ? 1 : 0);
    a.l1[o] = lambda;
    a.l0[o] = 1.f - lambda;
  }
  return a;
}

// One scale's relu(map) + flip(relu(flipped map)) for the kept classes, fp32 (K, h, w).
template <typename T>
std::vector<float> prepare_scale(const at::Tensor& map, const at::Tensor* flipped, const std::vector<int64_t>& keys) {
  const int64_t h = map.size(1), w = map.size(2), len = h * w, K = static_cast<int64_t>(keys.size());
  std::vector<float> out(K * len);
  const T* m = map.data_ptr<T>();
  const T* f = flipped ? flipped->data_ptr<T>() : nullptr;
  for (int64_t k = 0; k < K; ++k) {
    const T* mp = m + keys[k] * len;
    float* dst = out.data() + k * len;
    for (int64_t i = 0; i < len; ++i) dst[i] = std::max(static_cast<float>(mp[i]), 0.f);
    if (f) {
      const T* fp = f + keys[k] * len;
      for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < w; ++x) dst[y * w + x] += std::max(static_cast<float>(fp[y * w + (w - 1 - x)]), 0.f);
    }
  }
  return out;
}

struct ScaleMap {
  std::vector<float> data;  // (K, h, w)
  int64_t h, w;
};

// Sum over scales of each scale's map resized to (out_h, out_w), keeping the top-left (keep_h, keep_w),
// then each class divided by its max + eps. Output: out (K, keep_h, keep_w) fp32, contiguous.
void fuse_resize(const std::vector<ScaleMap>& scales, int64_t K, int64_t out_h, int64_t out_w, int64_t keep_h,
                 int64_t keep_w, float* out) {
  std::vector<float> row_max(K * keep_h, 0.f);
  // Few parallel regions, each with enough work (small ones run inline): a region costs a thread wake-up.
  const int64_t grain = std::max<int64_t>(1, 32768 / keep_w);
  std::vector<std::vector<float>> wide(scales.size());  // per scale: rows resized along x, (K, h, keep_w)
  std::vector<AxisWeights> xs, ys;
  std::vector<int64_t> first_row{0};  // scale s owns rows [first_row[s], first_row[s + 1]) of the x pass
  for (const ScaleMap& sm : scales) {
    xs.push_back(axis_weights(sm.w, out_w, keep_w));
    ys.push_back(axis_weights(sm.h, out_h, keep_h));
    wide[xs.size() - 1].resize(K * sm.h * keep_w);
    first_row.push_back(first_row.back() + K * sm.h);
  }
  at::parallel_for(0, first_row.back(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const size_t s = std::upper_bound(first_row.begin(), first_row.end(), row) - first_row.begin() - 1;
      const int64_t r = row - first_row[s];
      const AxisWeights& xw = xs[s];
      const float* src = scales[s].data.data() + r * scales[s].w;
      float* dst = wide[s].data() + r * keep_w;
      for (int64_t x = 0; x < keep_w; ++x) dst[x] = xw.l0[x] * src[xw.i0[x]] + xw.l1[x] * src[xw.i1[x]];
    }
  });
  at::parallel_for(0, K * keep_h, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t k = r / keep_h, y = r % keep_h;
      float* dst = out + r * keep_w;
      for (size_t s = 0; s < scales.size(); ++s) {
        const AxisWeights& yw = ys[s];
        const float* r0 = wide[s].data() + (k * scales[s].h + yw.i0[y]) * keep_w;
        const float* r1 = wide[s].data() + (k * scales[s].h + yw.i1[y]) * keep_w;
        const float w0 = yw.l0[y], w1 = yw.l1[y];
        if (s == 0) {
#pragma omp simd
          for (int64_t x = 0; x < keep_w; ++x) dst[x] = w0 * r0[x] + w1 * r1[x];
        } else {
#pragma omp simd
          for (int64_t x = 0; x < keep_w; ++x) dst[x] += w0 * r0[x] + w1 * r1[x];
        }
      }
      row_max[r] = plane_relu_max(dst, keep_w);  // sums of relus: >= 0
    }
  });
  std::vector<float> denom(K);
  for (int64_t k = 0; k < K; ++k)
    denom[k] = *std::max_element(row_max.begin() + k * keep_h, row_max.begin() + (k + 1) * keep_h) + kCamEps;
  at::parallel_for(0, K * keep_h, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float d = denom[r / keep_h];
      float* dst = out + r * keep_w;
#pragma omp simd
      for (int64_t x = 0; x < keep_w; ++x) dst[x] = dst[x] / d;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> multiscale_cam_cpu(at::TensorList maps, at::TensorList flipped_maps,
                                                      const at::Tensor& keys_in, at::IntArrayRef image_size) {
  const FusionGeometry g = check_fusion_args(maps, flipped_maps, keys_in, image_size, at::kCPU);
  const at::Tensor keys_cpu = checked_keys(keys_in, g.C);
  const std::vector<int64_t> keys(keys_cpu.data_ptr<int64_t>(), keys_cpu.data_ptr<int64_t>() + keys_cpu.numel());
  std::vector<ScaleMap> scales;
  for (size_t s = 0; s < maps.size(); ++s) {
    const at::Tensor m = maps[s].contiguous();
    const at::Tensor f = g.flipped ? flipped_maps[s].contiguous() : at::Tensor();
    dispatch_float(m.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      scales.push_back({prepare_scale<T>(m, g.flipped ? &f : nullptr, keys), m.size(1), m.size(2)});
    });
  }
  const auto opts = maps[0].options().dtype(at::kFloat);
  at::Tensor cam = at::empty({g.K, g.sh, g.sw}, opts);
  at::Tensor hr = at::empty({g.K, g.H, g.W}, opts);
  if (g.K > 0) {
    fuse_resize(scales, g.K, g.sh, g.sw, g.sh, g.sw, cam.data_ptr<float>());
    fuse_resize(scales, g.K, g.uh, g.uw, g.H, g.W, hr.data_ptr<float>());
  }
  return {cam, hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(puzzlecam, CPU, m) {
  m.impl("reconstruction_loss", &reconstruction_loss_cpu);
  m.impl("reconstruction_loss_backward", &reconstruction_loss_backward_cpu);
  m.impl("multiscale_cam", &multiscale_cam_cpu);
}

}  // namespace puzzlecam
