// Python bindings of the CUDA kernels; the only translation unit that includes torch/extension.h.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ceu CUDA kernels: the row reductions and gradient kernels of the fused LM-head losses (in place)";
  m.def("lmf_reduce", &ceu::lmf_reduce, "Per-row max, first-index argmax and optional row sum of a logits chunk",
        py::arg("logits"), py::arg("row_max"), py::arg("argmax"), py::arg("row_sum") = py::none());
  m.def("lmf_grad_hidden", &ceu::lmf_grad_hidden, "grad_hidden = coef * (weight[argmax] - weight_mean)",
        py::arg("coef"), py::arg("argmax"), py::arg("weight"), py::arg("weight_mean"), py::arg("grad_hidden"));
  m.def("lmf_scatter", &ceu::lmf_scatter, "acc[slot[argmax]] += coef * hidden; column_sum += sum of coef * hidden",
        py::arg("coef"), py::arg("argmax"), py::arg("slot"), py::arg("hidden"), py::arg("acc"),
        py::arg("column_sum"));
  m.def("lmf_grad_weight", &ceu::lmf_grad_weight, "grad_weight = acc[slot] - column_sum / vocab_size, cast once",
        py::arg("acc"), py::arg("slot"), py::arg("column_sum"), py::arg("vocab_size"), py::arg("grad_weight"));
  m.def("ce_reduce", &ceu::ce_reduce, "Per-row log-sum-exp and cross-entropy of a logits chunk", py::arg("logits"),
        py::arg("labels"), py::arg("ignore_index"), py::arg("loss"), py::arg("lse"));
  m.def("ce_grad_", &ceu::ce_grad_, "In place: logits = token_grad * (softmax - onehot(labels - column_offset))",
        py::arg("logits"), py::arg("labels"), py::arg("column_offset"), py::arg("lse"), py::arg("token_grad"));
  m.def("ce_fused_grad_", &ceu::ce_fused_grad_,
        "Per-row log-sum-exp and cross-entropy, then in place: logits = softmax - onehot(labels), 0 at ignore_index",
        py::arg("logits"), py::arg("labels"), py::arg("ignore_index"), py::arg("loss"), py::arg("lse"));
}
