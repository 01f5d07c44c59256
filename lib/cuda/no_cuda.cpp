// The GPU tier in a build without CUDA: Available() is false and Open says
// why; no DeviceBundle can exist, so its other members are never reached.
#include "faultline/cuda.hpp"

namespace faultline::cuda {

struct DeviceBundle::Impl {
  DeviceConfig config;
  BundleInfo info;
};

bool Available() noexcept { return false; }
std::string Describe() { return "built without CUDA (configure with -Dcuda=enabled where the CUDA toolkit is installed)"; }

Result<std::unique_ptr<DeviceBundle>> DeviceBundle::Open(const std::string&, const DeviceConfig&) {
  return Status::Error(ENOTSUP, "faultline was built without CUDA: the GPU tier is not available");
}

DeviceBundle::~DeviceBundle() = default;
const BundleInfo& DeviceBundle::info() const noexcept { return impl_->info; }
const DeviceConfig& DeviceBundle::config() const noexcept { return impl_->config; }
Result<DeviceTensor> DeviceBundle::tensor(std::string_view, std::string_view) const {
  return Status::Error(ENOTSUP, "built without CUDA");
}
std::vector<DeviceTensor> DeviceBundle::layer(std::string_view, std::string_view) const { return {}; }
Status DeviceBundle::Advise(const DeviceTensor&, const Advice&) { return Status::Error(ENOTSUP, "built without CUDA"); }
Status DeviceBundle::MarkWritten(const DeviceTensor&) { return Status::Error(ENOTSUP, "built without CUDA"); }
Status DeviceBundle::SetPlan(std::vector<std::vector<DeviceTensor>>) { return Status::Error(ENOTSUP, "built without CUDA"); }
Status DeviceBundle::SetPlan(std::string_view, const std::vector<std::string>&) {
  return Status::Error(ENOTSUP, "built without CUDA");
}
size_t DeviceBundle::plan_size() const noexcept { return 0; }
Status DeviceBundle::Begin(size_t, void*) { return Status::Error(ENOTSUP, "built without CUDA"); }
void DeviceBundle::End(size_t, void*) {}
Status DeviceBundle::Synchronize() { return Status::Error(ENOTSUP, "built without CUDA"); }
DeviceStats DeviceBundle::stats() const { return {}; }

}  // namespace faultline::cuda
