// libFuzzer target over the bundle reader: the input is a whole .apbundle
// file (in a memfd). Open must refuse or accept it; an accepted bundle is
// verified and every tensor and blob read. Nothing may crash, hang or
// allocate from an unchecked size.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>

#include "faultline/bundle.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  int fd = memfd_create("fuzz-bundle", MFD_CLOEXEC);
  if (fd < 0) return 0;
  if (size > 0 && write(fd, data, size) != static_cast<ssize_t>(size)) {
    close(fd);
    return 0;
  }
  faultline::ReaderOptions opts;
  opts.threads = 1;
  auto r = faultline::BundleReader::OpenFd(fd, opts);
  close(fd);
  if (!r.ok()) return 0;
  (void)(*r)->Verify();
  for (const auto& m : (*r)->info().models) {
    for (const auto& t : m.tensors)
      if (t.size <= (64u << 20)) (void)(*r)->ReadTensor(t);
    for (const auto& b : m.blobs)
      if (b.data.size <= (64u << 20)) (void)(*r)->ReadBlob(b);
  }
  return 0;
}
