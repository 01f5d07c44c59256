// libFuzzer target over safetensors import: the input is a whole safetensors
// file. The header parser must refuse it or return tensors whose offsets lie
// inside the data and whose sizes match dtype and shape; an accepted file is
// imported (as `faultline pack` does) and packed into a bundle in memory.
#include <cstdint>
#include <cstdlib>

#include <sys/mman.h>
#include <unistd.h>

#include <string>

#include "faultline/bundle.hpp"
#include "faultline/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto r = faultline::ParseSafetensorsHeader({reinterpret_cast<const std::byte*>(data), size}, size);
  if (!r.ok()) return 0;
  uint64_t data_size = size - r->data_offset;
  for (const auto& t : r->tensors)
    if (t.begin > t.end || t.end > data_size) abort();  // the parser's contract
  // The import path users take, through a file, into a bundle in a memfd
  // directory entry (/dev/shm when there is one, else the current one).
  int fd = memfd_create("fuzz-st", MFD_CLOEXEC);
  if (fd < 0) return 0;
  if (write(fd, data, size) == static_cast<ssize_t>(size)) {
    faultline::BundleBuilder b;
    faultline::TensorOptions o;
    o.page_size = 4096;
    faultline::Status s = faultline::ImportSafetensors({"/proc/self/fd/" + std::to_string(fd)}, b.AddModel("m"), o);
    if (s.ok()) {
      std::string out = (access("/dev/shm", W_OK) == 0 ? "/dev/shm/" : "./") + std::string("fuzz-st-") +
                        std::to_string(getpid()) + ".apbundle";
      (void)b.Build(out);
      unlink(out.c_str());
    }
  }
  close(fd);
  return 0;
}
