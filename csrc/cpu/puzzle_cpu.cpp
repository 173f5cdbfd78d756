// CPU kernels of the puzzlecam ops: reconstruction loss (forward, backward) and multi-scale CAM fusion.
//
// Both ops work plane by plane ((b, c) or (class, row)), parallel over planes with at::parallel_for.
// Each plane is first converted to fp32 in a small contiguous buffer (the merged plane gathered from
// its n*n tiles), so the arithmetic loops are plain fp32 loops the compiler vectorizes (-O3, omp simd).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
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
// Plane I/O: the (b, c) plane of cam and of merge(cam_tiles), as fp32.

template <typename T>
struct LossPlanes {
  const LossGeometry& g;
  const T* cam;
  const T* tiles;

  int64_t plane_len() const { return g.h * g.w; }

  // Tile row `ty` of piece p = i*n + j of image b, class c.
  int64_t tile_row_offset(int64_t b, int64_t c, int64_t i, int64_t j, int64_t ty) const {
    const int64_t p = i * g.n + j;
    return (((p * g.B + b) * g.C + c) * g.th + ty) * g.tw;
  }

  void load(int64_t b, int64_t c, float* full, float* merged) const {
    const T* src = cam + (b * g.C + c) * plane_len();
    for (int64_t k = 0; k < plane_len(); ++k) full[k] = static_cast<float>(src[k]);
    for (int64_t y = 0; y < g.h; ++y) {
      for (int64_t j = 0; j < g.n; ++j) {
        const T* row = tiles + tile_row_offset(b, c, y / g.th, j, y % g.th);
        float* dst = merged + y * g.w + j * g.tw;
        for (int64_t x = 0; x < g.tw; ++x) dst[x] = static_cast<float>(row[x]);
      }
    }
  }

  static void store(const LossGeometry& g, int64_t b, int64_t c, const float* full, const float* merged, T* grad_cam,
                    T* grad_tiles) {
    const LossPlanes<T> at{g, nullptr, nullptr};
    T* dst = grad_cam + (b * g.C + c) * at.plane_len();
    for (int64_t k = 0; k < at.plane_len(); ++k) dst[k] = static_cast<T>(full[k]);
    for (int64_t y = 0; y < g.h; ++y) {
      for (int64_t j = 0; j < g.n; ++j) {
        T* row = grad_tiles + at.tile_row_offset(b, c, y / g.th, j, y % g.th);
        const float* src = merged + y * g.w + j * g.tw;
        for (int64_t x = 0; x < g.tw; ++x) row[x] = static_cast<T>(src[x]);
      }
    }
  }
};

int64_t plane_grain(int64_t plane_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(plane_len, 1)); }

// ------------------------------------------------------------------------------------------------
// Reconstruction loss

template <typename T>
void loss_forward(const LossGeometry& g, const at::Tensor& cam, const at::Tensor& tiles, const float* labels,
                  bool masking, float* logits, double* plane_err) {
  const LossPlanes<T> io{g, cam.data_ptr<T>(), tiles.data_ptr<T>()};
  const int64_t len = io.plane_len();
  at::parallel_for(0, g.B * g.C, plane_grain(len), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(2 * len);
    float* full = buf.data();
    float* merged = full + len;
    for (int64_t bc = begin; bc < end; ++bc) {
      io.load(bc / g.C, bc % g.C, full, merged);
      logits[bc] = plane_sum(merged, len) / static_cast<float>(len);
      if (g.cam_level) {
        plane_make_cam(full, len, plane_relu_max(full, len));
        plane_make_cam(merged, len, plane_relu_max(merged, len));
      }
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
  at::parallel_for(0, g.B * g.C, plane_grain(len), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(4 * len);
    float* full = buf.data();
    float* merged = full + len;
    float* grad_full = merged + len;
    float* grad_merged = grad_full + len;
    for (int64_t bc = begin; bc < end; ++bc) {
      io.load(bc / g.C, bc % g.C, full, merged);
      const float coef = masking ? grad_mean * labels[bc] : grad_mean;
      float peak_full = 0.f, peak_merged = 0.f;
      const float* a = full;
      const float* r = merged;
      if (g.cam_level) {  // compare the normalized maps; keep the raw ones for make_cam's backward
        peak_full = plane_relu_max(full, len);
        peak_merged = plane_relu_max(merged, len);
        std::copy(full, full + len, grad_full);
        std::copy(merged, merged + len, grad_merged);
        plane_make_cam(grad_full, len, peak_full);
        plane_make_cam(grad_merged, len, peak_merged);
        a = grad_full;
        r = grad_merged;
      }
      // grad of the error w.r.t. the compared full map; the merged map gets its negative.
      if (g.l2) {
#pragma omp simd
        for (int64_t k = 0; k < len; ++k) grad_full[k] = coef * 2.f * (a[k] - r[k]);
      } else {
#pragma omp simd
        for (int64_t k = 0; k < len; ++k) {
          const float d = a[k] - r[k];
          grad_full[k] = coef * static_cast<float>((d > 0.f) - (d < 0.f));
        }
      }
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) grad_merged[k] = -grad_full[k];
      if (g.cam_level) {
        plane_make_cam_backward(full, grad_full, len, peak_full);
        plane_make_cam_backward(merged, grad_merged, len, peak_merged);
      }
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
