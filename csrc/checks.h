// Argument checks shared by the CPU and CUDA implementations of the puzzlecam ops.
// Shape and value errors raise ValueError in Python (TORCH_CHECK_VALUE), dtype errors TypeError,
// so every backend of puzzlecam.ops fails the same way as the pure-torch reference.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace puzzlecam {

inline std::string to_std(c10::string_view s) { return std::string(s.data(), s.size()); }

inline bool supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(supported_float(t.scalar_type()), op, ": ", name, " must be float32, float16 or bfloat16, got ",
                   t.scalar_type(), " (shape ", t.sizes(), ")");
}

// Geometry of one reconstruction-loss call: cam (B,C,h,w), cam_tiles (n*n*B,C,h/n,w/n).
struct LossGeometry {
  int64_t B, C, h, w, n, th, tw;
  bool cam_level;  // level == "cam": compare make_cam of both maps
  bool l2;         // kind == "l2": squared error
};

inline LossGeometry check_loss_args(const at::Tensor& cam, const at::Tensor& cam_tiles, const at::Tensor& labels,
                                    int64_t n, c10::string_view level_sv, c10::string_view kind_sv,
                                    at::DeviceType device) {
  const char* op = "puzzlecam::reconstruction_loss";
  const std::string level = to_std(level_sv), kind = to_std(kind_sv);
  TORCH_CHECK_VALUE(n >= 1, op, ": number of pieces per side n must be a positive int, got ", n);
  TORCH_CHECK_VALUE(level == "feature" || level == "cam", op, ": level must be 'feature' or 'cam', got '", level, "'");
  TORCH_CHECK_VALUE(kind == "l1" || kind == "l2", op, ": kind must be 'l1' or 'l2', got '", kind, "'");
  TORCH_CHECK_VALUE(cam.dim() == 4, op, ": cam must be 4-D (B, C, H, W), got shape ", cam.sizes());
  TORCH_CHECK_VALUE(cam_tiles.dim() == 4, op, ": cam_tiles must be 4-D (n*n*B, C, H/n, W/n), got shape ",
                    cam_tiles.sizes());
  check_float(op, "cam", cam);
  TORCH_CHECK_TYPE(cam_tiles.scalar_type() == cam.scalar_type(), op, ": cam_tiles dtype ", cam_tiles.scalar_type(),
                   " differs from cam dtype ", cam.scalar_type(), " (cam ", cam.sizes(), ", cam_tiles ",
                   cam_tiles.sizes(), ")");
  for (const at::Tensor* t : {&cam, &cam_tiles, &labels}) {
    TORCH_CHECK_VALUE(t->device().type() == device, op, ": expected every tensor on ", device, ", got cam on ",
                      cam.device(), ", cam_tiles on ", cam_tiles.device(), ", labels on ", labels.device());
  }
  TORCH_CHECK_VALUE(cam.device() == cam_tiles.device() && cam.device() == labels.device(), op,
                    ": cam (", cam.device(), "), cam_tiles (", cam_tiles.device(), ") and labels (", labels.device(),
                    ") must be on one device");
  LossGeometry g;
  g.B = cam.size(0), g.C = cam.size(1), g.h = cam.size(2), g.w = cam.size(3), g.n = n;
  g.th = cam_tiles.size(2), g.tw = cam_tiles.size(3);
  g.cam_level = level == "cam";
  g.l2 = kind == "l2";
  const int64_t nb = cam_tiles.size(0);
  TORCH_CHECK_VALUE(nb % (n * n) == 0, op, ": cam_tiles batch ", nb, " (shape ", cam_tiles.sizes(),
                    ") is not a multiple of n*n=", n * n);
  TORCH_CHECK_VALUE(nb / (n * n) == g.B && cam_tiles.size(1) == g.C && g.th * n == g.h && g.tw * n == g.w, op,
                    ": merged tiles have shape [", nb / (n * n), ", ", cam_tiles.size(1), ", ", g.th * n, ", ",
                    g.tw * n, "] (from cam_tiles ", cam_tiles.sizes(), ", n=", n, ") but cam has shape ",
                    cam.sizes());
  TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(0) == g.B && labels.size(1) == g.C, op,
                    ": labels must have shape (B, C)=(", g.B, ", ", g.C, ") to match cam ", cam.sizes(), ", got ",
                    labels.sizes());
  return g;
}

inline void check_loss_grads(const at::Tensor& grad_re, const at::Tensor& grad_logits, const LossGeometry& g,
                             at::DeviceType device) {
  const char* op = "puzzlecam::reconstruction_loss_backward";
  TORCH_CHECK_VALUE(grad_re.numel() == 1, op, ": grad_re must hold one value, got shape ", grad_re.sizes());
  TORCH_CHECK_VALUE(grad_logits.dim() == 2 && grad_logits.size(0) == g.B && grad_logits.size(1) == g.C, op,
                    ": grad_logits must have shape (", g.B, ", ", g.C, "), got ", grad_logits.sizes());
  TORCH_CHECK_VALUE(grad_re.device().type() == device && grad_logits.device().type() == device, op,
                    ": gradients must be on ", device, ", got grad_re on ", grad_re.device(), ", grad_logits on ",
                    grad_logits.device());
}

// Geometry of one multiscale_cam call.
struct FusionGeometry {
  int64_t C, K, H, W;   // classes, kept classes, image size
  int64_t sh, sw;       // stride-4 size of the image
  int64_t uh, uw;       // stride-16 up size (hr maps are resized to it, then cropped to H x W)
  bool flipped;
};

inline FusionGeometry check_fusion_args(at::TensorList maps, at::TensorList flipped_maps, const at::Tensor& keys,
                                        at::IntArrayRef image_size, at::DeviceType device) {
  const char* op = "puzzlecam::multiscale_cam";
  TORCH_CHECK_VALUE(!maps.empty(), op, ": no scale maps given");
  TORCH_CHECK_VALUE(flipped_maps.empty() || flipped_maps.size() == maps.size(), op, ": ", maps.size(),
                    " scale maps but ", flipped_maps.size(), " flipped maps");
  TORCH_CHECK_VALUE(image_size.size() == 2 && image_size[0] > 0 && image_size[1] > 0, op,
                    ": image_size must be two positive ints (H, W), got ", image_size);
  const at::Tensor& first = maps[0];
  for (size_t s = 0; s < maps.size(); ++s) {
    const at::Tensor& m = maps[s];
    TORCH_CHECK_VALUE(m.dim() == 3, op, ": scale ", s, " map must be (C, h, w), got shape ", m.sizes());
    check_float(op, "every scale map", m);
    TORCH_CHECK_VALUE(m.size(0) == first.size(0), op, ": scale ", s, " map has ", m.size(0),
                      " classes but scale 0 has ", first.size(0), " (shapes ", m.sizes(), " and ", first.sizes(), ")");
    TORCH_CHECK_VALUE(m.size(1) > 0 && m.size(2) > 0, op, ": scale ", s, " map is empty, shape ", m.sizes());
    TORCH_CHECK_TYPE(m.scalar_type() == first.scalar_type(), op, ": scale ", s, " map dtype ", m.scalar_type(),
                     " differs from scale 0 dtype ", first.scalar_type());
    TORCH_CHECK_VALUE(m.device().type() == device && m.device() == first.device(), op, ": scale ", s,
                      " map is on ", m.device(), ", expected ", first.device(), " (", device, ")");
    if (!flipped_maps.empty()) {
      const at::Tensor& f = flipped_maps[s];
      TORCH_CHECK_VALUE(f.sizes() == m.sizes(), op, ": scale ", s, " flipped map shape ", f.sizes(),
                        " differs from ", m.sizes());
      TORCH_CHECK_TYPE(f.scalar_type() == m.scalar_type(), op, ": scale ", s, " flipped map dtype ",
                       f.scalar_type(), " differs from ", m.scalar_type());
      TORCH_CHECK_VALUE(f.device() == m.device(), op, ": scale ", s, " flipped map is on ", f.device(),
                        ", map on ", m.device());
    }
  }
  TORCH_CHECK_VALUE(keys.dim() == 1, op, ": keys must be 1-D (K,), got shape ", keys.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(keys.scalar_type()) && !at::isComplexType(keys.scalar_type()) &&
                       keys.scalar_type() != at::kBool,
                   op, ": keys must be an integer tensor, got ", keys.scalar_type());
  FusionGeometry g;
  g.C = first.size(0), g.K = keys.size(0), g.H = image_size[0], g.W = image_size[1];
  g.sh = (g.H - 1) / 4 + 1, g.sw = (g.W - 1) / 4 + 1;
  g.uh = ((g.H - 1) / 16 + 1) * 16, g.uw = ((g.W - 1) / 16 + 1) * 16;
  g.flipped = !flipped_maps.empty();
  return g;
}

// The class keys as int64 on the CPU, each checked to be in [0, C) (keys are a handful of ints).
inline at::Tensor checked_keys(const at::Tensor& keys, int64_t C) {
  const at::Tensor k = keys.to(at::kCPU, at::kLong).contiguous();
  const int64_t* data = k.data_ptr<int64_t>();
  for (int64_t i = 0; i < k.numel(); ++i)
    TORCH_CHECK_VALUE(data[i] >= 0 && data[i] < C, "puzzlecam::multiscale_cam: class key ", data[i],
                      " out of range for ", C, " classes (keys ", k.sizes(), ")");
  return k;
}

}  // namespace puzzlecam
