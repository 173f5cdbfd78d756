// Operator schemas of the puzzlecam extension and the Python module that loads them.
// Importing puzzlecam._C runs the static registrations below; the CPU kernels live in
// csrc/cpu/, the CUDA ones in csrc/cuda/ (built only against a CUDA torch).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A bare Python extension module: `import puzzlecam._C` loads this shared library, which registers
// the ops with the dispatcher. `with_cuda` says whether CUDA kernels were compiled in.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "puzzlecam C++/CUDA ops (torch.ops.puzzlecam)",
                                          -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef PUZZLECAM_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(puzzlecam, m) {
  // (re fp32 scalar, merged_logits fp32 (B, C)); semantics of puzzlecam.puzzle.reconstruction_loss.
  m.def("reconstruction_loss(Tensor cam, Tensor cam_tiles, Tensor labels, int n, str level, str kind, "
        "bool masking) -> (Tensor, Tensor)");
  // (grad_cam, grad_cam_tiles) in the input dtypes, from the upstream grads of both outputs.
  m.def("reconstruction_loss_backward(Tensor grad_re, Tensor grad_logits, Tensor cam, Tensor cam_tiles, "
        "Tensor labels, int n, str level, str kind, bool masking) -> (Tensor, Tensor)");
  // (cam (K, sh, sw), hr_cam (K, H, W)) fp32; semantics of puzzlecam.puzzle.multiscale_cam.
  // An empty flipped_maps list means "no flipped pass".
  m.def("multiscale_cam(Tensor[] maps, Tensor[] flipped_maps, Tensor keys, int[] image_size) -> (Tensor, Tensor)");
  // x T^(2^exp_times) (K, h, w) of cams (K, h, w) and edge (h, w), fp32 (fp64 for fp64 cams); semantics of
  // puzzlecam.affinity.random_walk_reference. Inference only (no gradient).
  m.def("random_walk(Tensor cams, Tensor edge, float beta, int exp_times, int radius) -> Tensor");
  // (sums (3,), counts (3,)) [bg, fg, neg] of the AffinityNet loss over every pair of radius; semantics of
  // puzzlecam.affinity.affinity_sums_reference. sums fp32 (fp64 for fp64 edge), counts fp32.
  m.def("affinity_sums(Tensor edge, Tensor seg, int radius) -> (Tensor, Tensor)");
  // d (grad_sums . sums) / d edge, in edge's dtype and shape.
  m.def("affinity_sums_backward(Tensor grad_sums, Tensor edge, Tensor seg, int radius) -> Tensor");
}
