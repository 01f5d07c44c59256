// Kernels for the GPU tier's tests and benchmarks; see kernels.h.
#include <cuda_runtime.h>

#include "kernels.h"

namespace faultline::test {

namespace {

__global__ void LayerKernel(const float* w, const float* bias, const float* x, float* y, int d, int batch) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  int b = blockIdx.y;
  if (i >= d || b >= batch) return;
  const float* row = w + static_cast<size_t>(i) * d;
  const float* xb = x + static_cast<size_t>(b) * d;
  float s = 0;
  for (int k = 0; k < d; k++) s = fmaf(row[k], xb[k], s);
  s += bias[i];
  y[static_cast<size_t>(b) * d + i] = s > 0 ? s : 0;
}

__global__ void BiasReluKernel(const float* bias, float* y, int d, int batch) {
  size_t n = static_cast<size_t>(d) * batch;
  for (size_t j = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<size_t>(gridDim.x) * blockDim.x) {
    float s = y[j] + bias[j % d];
    y[j] = s > 0 ? s : 0;
  }
}

}  // namespace

void LayerForward(const float* w, const float* bias, const float* x, float* y, int d, int batch, void* stream) {
  dim3 grid((d + 127) / 128, batch);
  LayerKernel<<<grid, 128, 0, static_cast<cudaStream_t>(stream)>>>(w, bias, x, y, d, batch);
}

void BiasRelu(const float* bias, float* y, int d, int batch, void* stream) {
  BiasReluKernel<<<256, 256, 0, static_cast<cudaStream_t>(stream)>>>(bias, y, d, batch);
}

}  // namespace faultline::test
