// The Python module that loads the puzzlecam extension. The ops' schemas are defined once, in Python
// (puzzlecam/library.py, SCHEMAS), which imports this module: loading it runs the static
// TORCH_LIBRARY_IMPL registrations of the kernels, the CPU ones in csrc/cpu/, the CUDA ones in
// csrc/cuda/ (built only against a CUDA torch).
#include <Python.h>

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
