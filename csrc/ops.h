// Host entry points of the CUDA kernels, shared by the .cu files that define them and bindings.cpp that exposes them.
//
// Every op works in place on tensors the Python side allocated (ceu_kernels/cuda.py runs the chunk loop and the
// cuBLAS GEMMs through torch). "acc" below is the math type: float32 for half, bfloat16 and float32 inputs, float64
// for float64 ones. Logits may be a row-strided view (unit column stride).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace ceu {

// Per row of logits [rows, cols]: max (acc), first index of the max (int64; NaN counts as the largest value, as in
// torch.max) and, when row_sum is given, the row sum (acc), all in one read of the logits.
void lmf_reduce(const at::Tensor& logits, const at::Tensor& row_max, const at::Tensor& argmax,
                const std::optional<at::Tensor>& row_sum);

// grad_hidden[n] = coef[n] * (weight[argmax[n]] - weight_mean), in the weight's dtype.
void lmf_grad_hidden(const at::Tensor& coef, const at::Tensor& argmax, const at::Tensor& weight,
                     const at::Tensor& weight_mean, const at::Tensor& grad_hidden);

// acc[slot[argmax[n]]] += coef[n] * hidden[n] (fp32/fp64 atomics) and column_sum += sum_n coef[n] * hidden[n].
void lmf_scatter(const at::Tensor& coef, const at::Tensor& argmax, const at::Tensor& slot, const at::Tensor& hidden,
                 const at::Tensor& acc, const at::Tensor& column_sum);

// grad_weight[v] = acc[slot[v]] (where slot[v] >= 0) - column_sum / vocab_size (where v < vocab_size), cast once.
void lmf_grad_weight(const at::Tensor& acc, const at::Tensor& slot, const at::Tensor& column_sum, int64_t vocab_size,
                     const at::Tensor& grad_weight);

// Per row of logits: log-sum-exp (acc) and loss = lse - logits[label] (0 where label == ignore_index).
void ce_reduce(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, const at::Tensor& loss,
               const at::Tensor& lse);

// In place: logits[r, j] = token_grad[r] * (exp(logits[r, j] - lse[r]) - [labels[r] == column_offset + j]).
void ce_grad_(const at::Tensor& logits, const at::Tensor& labels, int64_t column_offset, const at::Tensor& lse,
              const at::Tensor& token_grad);

// Per row of logits, the gradients formed in the forward: log-sum-exp and loss (acc, as ce_reduce), then in place
// logits[r, j] = softmax - [labels[r] == j], the whole row 0 where labels[r] == ignore_index.
void ce_fused_grad_(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, const at::Tensor& loss,
                    const at::Tensor& lse);

}  // namespace ceu
