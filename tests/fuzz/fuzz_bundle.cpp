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
  // The reader's own limits, as a user sets them (--max-size): no size is
  // skipped here, so what they let through is read whole. The default
  // expansion limit applies as it does for every user.
  faultline::ReaderOptions opts;
  opts.threads = 1;
  opts.max_size = 256u << 20;
  auto r = faultline::BundleReader::OpenFd(fd, opts);
  close(fd);
  if (!r.ok()) return 0;
  if ((*r)->info().logical_bytes > (256u << 20)) abort();  // the limit's contract
  (void)(*r)->Verify();
  for (const auto& m : (*r)->info().models) {
    for (const auto& t : m.tensors) (void)(*r)->ReadTensor(t);
    for (const auto& b : m.blobs) (void)(*r)->ReadBlob(b);
  }
  return 0;
}
