// The GPU tier's parts that need no CUDA: options and the statistics text.
#include <sstream>

#include "faultline/cuda.hpp"
#include "faultline/size.hpp"
#include "pager/options.h"

namespace faultline::cuda {

using internal::OptionId;

bool ParseEviction(std::string_view s, Eviction* out) noexcept {
  if (s != "host" && s != "discard") return false;
  *out = s == "host" ? Eviction::kToHost : Eviction::kDiscard;
  return true;
}

bool ParseMemory(std::string_view s, Memory* out) noexcept {
  if (s != "managed" && s != "mapped") return false;
  *out = s == "managed" ? Memory::kManaged : Memory::kMapped;
  return true;
}

DeviceConfig DeviceConfig::FromEnvironment() {
  DeviceConfig c;
  c.paging = PagingConfig::FromEnvironment();
  internal::OptionSize(OptionId::kGpuBudget, &c.gpu_budget);
  internal::OptionSize(OptionId::kGpuHostBudget, &c.host_budget);
  internal::OptionUnsigned(OptionId::kGpuLookahead, 64, &c.lookahead);
  if (const char* v = internal::OptionValue(OptionId::kGpuEvict); v && !ParseEviction(v, &c.eviction))
    internal::WarnBadOption(OptionId::kGpuEvict, v, "host or discard");
  internal::OptionFlag(OptionId::kGpuReadMostly, &c.advice.read_mostly);
  internal::OptionFlag(OptionId::kGpuMonitor, &c.monitor.enabled);
  double offload = -1, emergency = -1, reload = -1;
  internal::OptionFraction(OptionId::kGpuOffload, &offload);
  internal::OptionFraction(OptionId::kGpuEmergency, &emergency);
  internal::OptionFraction(OptionId::kGpuReload, &reload);
  for (Thresholds* t : {&c.monitor.gpu, &c.monitor.host}) {
    if (offload > 0) t->offload = offload;
    if (emergency > 0) t->emergency = emergency;
    if (reload > 0) t->reload = reload;
  }
  internal::OptionFlag(OptionId::kGpuDirect, &c.direct_host);
  if (const char* v = internal::OptionValue(OptionId::kGpuMemory); v && !ParseMemory(v, &c.memory))
    internal::WarnBadOption(OptionId::kGpuMemory, v, "managed or mapped");
  return c;
}

std::string DeviceStats::ToString() const {
  std::ostringstream o;
  o << "faultline GPU tier stats:\n"
    << "  to device " << to_device << " (" << FormatSize(bytes_to_device) << "), to host " << to_host << " ("
    << FormatSize(bytes_to_host) << "), discarded " << discards << " (" << FormatSize(bytes_discarded) << ")\n"
    << "  decoded " << decodes << " (" << FormatSize(bytes_decoded) << "), errors " << errors
    << ", Begin waited " << begin_waits << ", written tensors spilled " << spilled_written << " / restored "
    << restored_written << "\n"
    << "  device resident " << FormatSize(device_resident) << ", peak " << FormatSize(peak_device_resident)
    << ", budget " << FormatSize(gpu_budget) << " (effective " << FormatSize(effective_gpu_budget) << ")"
    << (device_pages ? ", mapped pages held " + FormatSize(device_pages) : std::string()) << "\n"
    << "  host resident " << FormatSize(host_resident) << ", peak " << FormatSize(peak_host_resident) << "\n"
    << "  monitor: ticks " << monitor_ticks << ", offloads " << offloads << ", emergencies " << emergencies
    << ", reloads " << reloads << ", host drops " << host_drops << ", last pressure gpu " << gpu_pressure
    << " host " << host_pressure << "\n";
  return o.str();
}

}  // namespace faultline::cuda
