// A layer stack on the GPU for the tests and benchmarks: activations in
// cudaMalloc memory, y = relu(W x + b) per layer by cuBLAS (+ BiasRelu) or
// by the deterministic kernel, on the runner's own stream.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <utility>
#include <vector>

#include "kernels.h"

namespace faultline::test {

class LayerRunner {
 public:
  // Creates the stream, the cuBLAS handle (and its workspace) and runs both
  // layer paths once, so that what they allocate on the device (workspace,
  // lazily loaded kernels) is there before anyone measures.
  LayerRunner(int d, int batch) : d_(d), batch_(batch) {
    cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    cublasCreate(&blas_);
    cublasSetStream(blas_, stream);
    cudaMalloc(&x_, sizeof(float) * d * batch);
    cudaMalloc(&y_, sizeof(float) * d * batch);
    cudaMemsetAsync(x_, 0, sizeof(float) * d * batch, stream);
    float* w = nullptr;
    cudaMalloc(&w, sizeof(float) * d * (d + 1));
    cudaMemsetAsync(w, 0, sizeof(float) * d * (d + 1), stream);
    Layer(w, w + size_t(d) * d, true);
    Layer(w, w + size_t(d) * d, false);
    cudaStreamSynchronize(stream);
    cudaFree(w);
  }
  ~LayerRunner() {
    cudaFree(x_);
    cudaFree(y_);
    cublasDestroy(blas_);
    cudaStreamDestroy(stream);
  }
  LayerRunner(const LayerRunner&) = delete;
  LayerRunner& operator=(const LayerRunner&) = delete;

  void Load(const std::vector<float>& in) {
    cudaMemcpyAsync(x_, in.data(), in.size() * 4, cudaMemcpyHostToDevice, stream);
  }
  // One layer: W row-major (d x d), bias (d). Row-major W is W^T in cuBLAS's
  // column-major terms, hence OP_T.
  void Layer(const float* w, const float* b, bool blas_path) {
    if (blas_path) {
      const float one = 1, zero = 0;
      cublasSgemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, d_, batch_, d_, &one, w, d_, x_, d_, &zero, y_, d_);
      BiasRelu(b, y_, d_, batch_, stream);
    } else {
      LayerForward(w, b, x_, y_, d_, batch_, stream);
    }
    std::swap(x_, y_);
  }
  std::vector<float> Result() {
    std::vector<float> out(static_cast<size_t>(d_) * batch_);
    cudaMemcpyAsync(out.data(), x_, out.size() * 4, cudaMemcpyDeviceToHost, stream);
    cudaStreamSynchronize(stream);
    return out;
  }

  cudaStream_t stream = nullptr;

 private:
  int d_, batch_;
  cublasHandle_t blas_ = nullptr;
  float* x_ = nullptr;
  float* y_ = nullptr;
};

}  // namespace faultline::test
