// The C ABI: build and read a bundle through faultline.h, and its error
// convention (-errno, NULL+errno, faultline_last_error).
#include <doctest/doctest.h>

#include "faultline/cuda.hpp"
#include "faultline/faultline.h"
#include "helpers.h"

using namespace faultline::test;

TEST_CASE("the C ABI builds a bundle and reads it back") {
  TempDir dir;
  std::string path = dir / "c.apbundle";
  auto w = RandomBytes(3 * 4096 + 10, 1, true);
  faultline_builder* b = nullptr;
  REQUIRE(faultline_builder_new(&b) == 0);
  int m = faultline_builder_add_model(b, "cmodel");
  REQUIRE(m == 0);
  CHECK(faultline_builder_set_metadata(b, m, "k", "v") == 0);
  faultline_tensor_options o;
  faultline_tensor_options_init(&o);
  CHECK(o.codec == FAULTLINE_CODEC_ZSTD);
  CHECK(o.page_size == 65536);
  o.page_size = 4096;
  uint64_t shape[] = {w.size()};
  REQUIRE(faultline_builder_add_tensor(b, m, "w", FAULTLINE_DTYPE_U8, shape, 1, w.data(), w.size(), &o) == 0);
  REQUIRE(faultline_builder_build(b, path.c_str()) == 0);
  faultline_builder_free(b);

  faultline_reader* r = nullptr;
  REQUIRE(faultline_reader_open(path.c_str(), &r) == 0);
  CHECK(faultline_reader_model_count(r) == 1);
  CHECK(std::string(faultline_reader_model_name(r, 0)) == "cmodel");
  CHECK(faultline_reader_tensor_count(r, 0) == 1);
  faultline_tensor_info info;
  info.struct_size = sizeof(info);
  REQUIRE(faultline_reader_tensor_info(r, 0, 0, &info) == 0);
  CHECK(std::string(info.name) == "w");
  CHECK(info.dtype == FAULTLINE_DTYPE_U8);
  CHECK(info.ndim == 1);
  CHECK(info.shape[0] == w.size());
  CHECK(info.frame_count == 4);
  int mi = -1, ti = -1;
  CHECK(faultline_reader_find(r, "cmodel", "w", &mi, &ti) == 0);
  CHECK(mi == 0);
  CHECK(ti == 0);
  std::vector<std::byte> out(w.size());
  REQUIRE(faultline_reader_read_tensor(r, 0, 0, out.data(), out.size()) == 0);
  CHECK(out == w);
  std::vector<std::byte> frame(4096);
  CHECK(faultline_reader_read_frame(r, 0, 0, 3, frame.data(), frame.size()) == 10);
  CHECK(memcmp(frame.data(), w.data() + 3 * 4096, 10) == 0);
  CHECK(faultline_reader_verify(r) == 0);
  faultline_reader_close(r);
}

TEST_CASE("C ABI errors are -errno with a message, never a crash") {
  TempDir dir;
  faultline_reader* r = nullptr;
  CHECK(faultline_reader_open((dir / "missing").c_str(), &r) == -ENOENT);
  CHECK(std::string(faultline_last_error()).find("missing") != std::string::npos);
  CHECK(faultline_reader_open(nullptr, &r) == -EINVAL);
  WriteFileBytes(dir / "junk", "not a bundle at all", 19);
  CHECK(faultline_reader_open((dir / "junk").c_str(), &r) < 0);
  CHECK(std::string(faultline_last_error()).find("truncated") != std::string::npos);
  CHECK(faultline_reader_model_count(nullptr) == -EINVAL);
  errno = 0;
  CHECK(faultline_reader_model_name(nullptr, 0) == nullptr);
  CHECK(errno == ERANGE);
  faultline_reader_close(nullptr);

  faultline_builder* b = nullptr;
  REQUIRE(faultline_builder_new(&b) == 0);
  int m = faultline_builder_add_model(b, "m");
  uint64_t shape[] = {4};
  char data[4] = {};
  CHECK(faultline_builder_add_tensor(b, 5, "w", FAULTLINE_DTYPE_U8, shape, 1, data, 4, nullptr) == -ERANGE);
  CHECK(faultline_builder_add_tensor(b, m, "w", 99, shape, 1, data, 4, nullptr) == -EINVAL);
  CHECK(faultline_builder_set_min_ratio(b, 0.5) == -EINVAL);
  CHECK(faultline_builder_set_min_ratio(nullptr, 2) == -EINVAL);
  CHECK(faultline_builder_add_tensor(b, m, "w", FAULTLINE_DTYPE_F32, shape, 1, data, 4, nullptr) == 0);
  CHECK(faultline_builder_build(b, (dir / "x.apbundle").c_str()) == -EINVAL);
  CHECK(std::string(faultline_last_error()).find("dtype and shape need 16") != std::string::npos);
  faultline_builder_free(b);
  CHECK(std::string(faultline_version()) == "0.1.0");
  CHECK(faultline_has_cuda() == (faultline::cuda::Available() ? 1 : 0));
}

TEST_CASE("the C ABI stores frames verbatim below a builder's min_ratio") {
  TempDir dir;
  std::string path = dir / "v.apbundle";
  auto w = RandomBytes(4 * 65536, 5, true);
  faultline_builder* b = nullptr;
  REQUIRE(faultline_builder_new(&b) == 0);
  int m = faultline_builder_add_model(b, "m");
  uint64_t shape[] = {w.size()};
  REQUIRE(faultline_builder_add_tensor(b, m, "packed", FAULTLINE_DTYPE_U8, shape, 1, w.data(), w.size(), nullptr) == 0);
  REQUIRE(faultline_builder_set_min_ratio(b, 1000) == 0);
  REQUIRE(faultline_builder_add_tensor(b, m, "verbatim", FAULTLINE_DTYPE_U8, shape, 1, w.data(), w.size(), nullptr) == 0);
  REQUIRE(faultline_builder_build(b, path.c_str()) == 0);
  faultline_builder_free(b);
  faultline_reader* r = nullptr;
  REQUIRE(faultline_reader_open(path.c_str(), &r) == 0);
  faultline_tensor_info info;
  info.struct_size = sizeof(info);
  REQUIRE(faultline_reader_tensor_info(r, 0, 0, &info) == 0);
  CHECK(info.stored_size < w.size());
  REQUIRE(faultline_reader_tensor_info(r, 0, 1, &info) == 0);
  CHECK(info.stored_size == w.size());
  std::vector<std::byte> back(w.size());
  REQUIRE(faultline_reader_read_tensor(r, 0, 1, back.data(), back.size()) == 0);
  CHECK(back == w);
  faultline_reader_close(r);
}

TEST_CASE("without a usable GPU the GPU tier says why instead of failing later") {
  if (faultline::cuda::Available()) return;  // tests/cuda covers the device
  TempDir dir;
  faultline_device* d = nullptr;
  faultline_device_config c;
  faultline_device_config_init(&c);
  CHECK(c.struct_size == sizeof c);
  CHECK(c.lookahead == 2);
  CHECK(faultline_device_open((dir / "any.apbundle").c_str(), &c, &d) == -ENOTSUP);
  CHECK(d == nullptr);
  CHECK(std::string(faultline_last_error()).size() > 0);
  auto r = faultline::cuda::DeviceBundle::Open(dir / "any.apbundle");
  CHECK(r.status().code() == ENOTSUP);
  CHECK_FALSE(faultline::cuda::Describe().empty());
  c.eviction = 7;
  CHECK(faultline_device_open("x", &c, &d) == -EINVAL);
}

TEST_CASE("the C ABI maps a bundle for demand paging and reports its statistics") {
  TempDir dir;
  std::string path = dir / "p.apbundle";
  auto w = RandomBytes(5 * 65536 + 17, 3, true);
  faultline_builder* b = nullptr;
  REQUIRE(faultline_builder_new(&b) == 0);
  int m = faultline_builder_add_model(b, "m");
  uint64_t shape[] = {w.size()};
  REQUIRE(faultline_builder_add_tensor(b, m, "w", FAULTLINE_DTYPE_U8, shape, 1, w.data(), w.size(), nullptr) == 0);
  REQUIRE(faultline_builder_build(b, path.c_str()) == 0);
  faultline_builder_free(b);

  faultline_paging_config cfg;
  faultline_paging_config_init(&cfg);
  CHECK(cfg.max_resident == 100000000ull);
  cfg.max_resident = 2 * 65536;
  faultline_paged* p = nullptr;
  int rc = faultline_paged_open(path.c_str(), &cfg, &p);
  if (rc == -EPERM || rc == -ENOSYS) return;  // no paging mode allowed here
  REQUIRE_MESSAGE(rc == 0, faultline_last_error());
  uint64_t size = 0;
  const void* data = faultline_paged_tensor(p, nullptr, "w", &size);
  REQUIRE(data != nullptr);
  CHECK(size == w.size());
  CHECK(memcmp(data, w.data(), w.size()) == 0);
  CHECK(faultline_paged_tensor(p, "m", "missing", nullptr) == nullptr);
  CHECK(errno == ENOENT);
  CHECK(faultline_paged_prefetch(p, "nope", "w") == -ENOENT);
  CHECK(faultline_paged_dont_need(p, "m", "w") == 0);
  const char* steps[] = {"w"};
  CHECK(faultline_paged_set_plan(p, nullptr, steps, 1) == 0);
  CHECK(faultline_paged_advance(p, "m", "w") == 0);
  CHECK(faultline_paged_advance(p, "m", "nope") == -ENOENT);
  const char* bad[] = {"w", "layers."};
  CHECK(faultline_paged_set_plan(p, "m", bad, 2) == -ENOENT);
  CHECK(std::string(faultline_last_error()).find("'layers.'") != std::string::npos);
  CHECK(faultline_paged_set_plan(p, "m", nullptr, 1) == -EINVAL);
  CHECK(faultline_paged_set_plan(p, "nope", steps, 1) == -ENOENT);
  faultline_paging_stats st;
  st.struct_size = sizeof(st);
  REQUIRE(faultline_paged_stats(p, &st) == 0);
  CHECK(st.version == 3);
  CHECK(st.huge_split == 0);
  CHECK(st.huge_installs == 0);  // a small tensor: no whole huge page
  CHECK(st.loads >= 6);
  CHECK(st.evictions > 0);
  CHECK(st.faults > 0);
  // An older, smaller struct gets only the fields it knows.
  struct {
    size_t struct_size;
    uint32_t version;
    uint64_t faults;
  } old = {sizeof(old), 0, 0};
  REQUIRE(faultline_paged_stats(p, reinterpret_cast<faultline_paging_stats*>(&old)) == 0);
  CHECK(old.faults == st.faults);
  faultline_paged_close(p);
}

TEST_CASE("GPU tier options come from the environment; bad values keep the defaults") {
  setenv("FAULTLINE_GPU_BUDGET", "1G", 1);
  setenv("FAULTLINE_GPU_LOOKAHEAD", "3", 1);
  setenv("FAULTLINE_GPU_EVICT", "discard", 1);
  setenv("FAULTLINE_GPU_READ_MOSTLY", "0", 1);
  setenv("FAULTLINE_GPU_OFFLOAD", "0.5", 1);
  setenv("FAULTLINE_GPU_RELOAD", "0.25", 1);
  setenv("FAULTLINE_GPU_MEMORY", "mapped", 1);
  auto c = faultline::cuda::DeviceConfig::FromEnvironment();
  CHECK(c.memory == faultline::cuda::Memory::kMapped);
  faultline_device_config cc;
  faultline_device_config_init(&cc);
  CHECK(cc.memory == FAULTLINE_GPU_MAPPED);
  // Bad configs are refused before any device is looked at.
  faultline_device* d = nullptr;
  cc.memory = 7;
  CHECK(faultline_device_open("any.apbundle", &cc, &d) == -EINVAL);
  CHECK(std::string(faultline_last_error()).find("GPU memory") != std::string::npos);
  cc.memory = FAULTLINE_GPU_MANAGED;
  cc.struct_size = offsetof(faultline_device_config, memory) - 1;
  CHECK(faultline_device_open("any.apbundle", &cc, &d) == -EINVAL);
  CHECK(d == nullptr);
  CHECK(c.gpu_budget == (1ull << 30));
  CHECK(c.lookahead == 3);
  CHECK(c.eviction == faultline::cuda::Eviction::kDiscard);
  CHECK_FALSE(c.advice.read_mostly);
  CHECK(c.monitor.gpu.offload == 0.5);
  CHECK(c.monitor.host.reload == 0.25);
  CHECK(c.monitor.gpu.emergency == 0.95);
  setenv("FAULTLINE_GPU_BUDGET", "lots", 1);
  setenv("FAULTLINE_GPU_EVICT", "somewhere", 1);
  setenv("FAULTLINE_GPU_OFFLOAD", "1.5", 1);
  setenv("FAULTLINE_GPU_MEMORY", "unified", 1);
  c = faultline::cuda::DeviceConfig::FromEnvironment();
  CHECK(c.memory == faultline::cuda::Memory::kManaged);
  CHECK(c.gpu_budget == 0);
  CHECK(c.eviction == faultline::cuda::Eviction::kToHost);
  CHECK(c.monitor.gpu.offload == 0.85);
  for (const char* v : {"FAULTLINE_GPU_BUDGET", "FAULTLINE_GPU_LOOKAHEAD", "FAULTLINE_GPU_EVICT",
                        "FAULTLINE_GPU_READ_MOSTLY", "FAULTLINE_GPU_OFFLOAD", "FAULTLINE_GPU_RELOAD",
                        "FAULTLINE_GPU_MEMORY"})
    unsetenv(v);
}
