// The Python module blipfast._C. Importing it loads this library, whose static initialisers register
// every blipfast_C op of csrc/ (TORCH_LIBRARY_FRAGMENT in each op's source file) with the dispatcher;
// the ops are then called as torch.ops.blipfast_C.<name>. The module itself only adds build_info().
#include <torch/extension.h>
#include <torch/version.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

// The build passes the CUDA archs as one preprocessor token, "80;90a" -> 80_90a (a quoted string with a
// ';' would not survive the shell of every build tool unharmed); it is turned into a string here.
#define BLIPFAST_STR_(x) #x
#define BLIPFAST_STR(x) BLIPFAST_STR_(x)
#ifdef BLIPFAST_CUDA_ARCHS_TOKEN
#define BLIPFAST_CUDA_ARCHS BLIPFAST_STR(BLIPFAST_CUDA_ARCHS_TOKEN)
#else
#define BLIPFAST_CUDA_ARCHS "unknown"
#endif

namespace {

std::vector<std::string> split_archs(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char ch : s + ";") {
    if (ch == '_' || ch == ';' || ch == ',' || ch == ' ') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(ch);
    }
  }
  return out;
}

std::vector<std::string> registered_ops() {
  std::vector<std::string> ops;
  for (const c10::OperatorName& op : c10::Dispatcher::singleton().getAllOpNames()) {
    if (op.name.rfind("blipfast_C::", 0) == 0) {
      ops.push_back(op.overload_name.empty() ? op.name : op.name + "." + op.overload_name);
    }
  }
  std::sort(ops.begin(), ops.end());
  return ops;
}

pybind11::dict build_info() {
  pybind11::dict d;
  d["cuda_archs"] = split_archs(BLIPFAST_CUDA_ARCHS);
  std::ostringstream cuda;
  cuda << CUDART_VERSION / 1000 << "." << (CUDART_VERSION % 1000) / 10;
  d["cuda_runtime_compiled"] = cuda.str();
  d["torch_compiled"] = std::string(TORCH_VERSION);
  d["ops"] = registered_ops();
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "blipfast CUDA kernels; the ops live in torch.ops.blipfast_C";
  m.def("build_info", &build_info,
        "What this extension was compiled for: cuda_archs, cuda_runtime_compiled, torch_compiled, ops");
}
