// One plan step per name prefix, shared by the pager and the GPU tier
// (PagedBundle::SetPlan and DeviceBundle::SetPlan by model and prefixes,
// and the C ABI over them).
#pragma once

#include <algorithm>
#include <string>
#include <string_view>
#include <vector>

#include "faultline/status.hpp"

namespace faultline::internal {

// layer(prefix) gives the tensors whose names start with prefix; a prefix
// that matches none is ENOENT, named with the model.
template <typename Layer>
auto StepsByPrefix(std::string_view model, const std::vector<std::string>& prefixes, Layer&& layer)
    -> Result<std::vector<decltype(layer(std::string()))>> {
  std::vector<decltype(layer(std::string()))> steps;
  for (const std::string& p : prefixes) {
    steps.push_back(layer(p));
    if (steps.back().empty())
      return Status::Error(ENOENT, "no tensor of model '%.*s' starts with '%.64s'",
                           static_cast<int>(std::min<size_t>(model.size(), 64)), model.data(), p.c_str());
  }
  return steps;
}

}  // namespace faultline::internal
