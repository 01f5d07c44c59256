// Kernels for the GPU tier's tests and benchmarks, compiled by nvcc; the
// callers are plain C++ (streams as void*).
#pragma once

#include <cstddef>

namespace faultline::test {

// y[b][i] = relu(sum_k w[i][k] * x[b][k] + bias[i]) for a batch of `batch`
// vectors of length d; one thread per output, k in order: deterministic.
void LayerForward(const float* w, const float* bias, const float* x, float* y, int d, int batch, void* stream);
// y[b][i] = relu(y[b][i] + bias[i]) after a cuBLAS product.
void BiasRelu(const float* bias, float* y, int d, int batch, void* stream);

}  // namespace faultline::test
