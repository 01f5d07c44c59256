// Core: Status, sizes, dtypes, the thread pool, checked JSON.
#include <doctest/doctest.h>

#include <atomic>
#include <cstring>
#include <string>

#include "core/json_util.h"
#include "core/thread_pool.h"
#include "faultline/dtype.hpp"
#include "faultline/size.hpp"
#include "faultline/status.hpp"
#include "os/meminfo.h"

using namespace faultline;

TEST_CASE("a status carries its code and formatted message without allocating") {
  Status ok;
  CHECK(ok.ok());
  CHECK(std::string(ok.message()).empty());
  Status s = Status::Error(EBADMSG, "frame %d of '%s'", 12, "w");
  CHECK_FALSE(s.ok());
  CHECK(s.code() == EBADMSG);
  CHECK(std::string(s.message()) == "frame 12 of 'w'");
  Status p = s.WithPrefix("model '%s'", "m");
  CHECK(std::string(p.message()) == "model 'm': frame 12 of 'w'");
  CHECK(p.code() == EBADMSG);
  CHECK(s.ToString().find("frame 12") != std::string::npos);
}

TEST_CASE("a status message longer than its buffer is truncated, not overflowed") {
  std::string big(1000, 'x');
  Status s = Status::Error(EINVAL, "%s", big.c_str());
  CHECK(strlen(s.message()) < 300);
  CHECK(strlen(s.message()) > 100);
}

TEST_CASE("a result holds either a value or an error") {
  Result<int> good = 5;
  CHECK(good.ok());
  CHECK(*good == 5);
  Result<int> bad = Status::Error(ENOENT, "missing");
  CHECK_FALSE(bad.ok());
  CHECK(bad.status().code() == ENOENT);
}

TEST_CASE("sizes parse with K/M/G/T suffixes and reject anything else") {
  uint64_t v = 0;
  CHECK(ParseSize("4096", &v));
  CHECK(v == 4096);
  CHECK(ParseSize("64K", &v));
  CHECK(v == 65536);
  CHECK(ParseSize("64KiB", &v));
  CHECK(v == 65536);
  CHECK(ParseSize("1.5G", &v));
  CHECK(v == 1610612736ull);
  CHECK(ParseSize("2m", &v));
  CHECK(v == 2097152);
  CHECK(ParseSize("100MB", &v));
  CHECK(v == 100ull << 20);
  CHECK(ParseSize("7b", &v));
  CHECK(v == 7);
  for (const char* bad : {"", "K", "-1", "12Q", "1.2.3", "1 G", "99999999999999999999", "16777216T"})
    CHECK_MESSAGE(!ParseSize(bad, &v), bad);
  CHECK(FormatSize(512) == "512 B");
  CHECK(FormatSize(1536) == "1.50 KiB");
}

TEST_CASE("every dtype has a size and names that parse back") {
  for (int i = 0; i < kDTypeCount; i++) {
    DType t = static_cast<DType>(i);
    CHECK(DTypeSize(t) >= 1);
    CHECK(ParseDType(DTypeName(t)) == t);
    CHECK(ParseSafetensorsDType(DTypeSafetensorsName(t)) == t);
  }
  CHECK(DTypeSize(DType::kBF16) == 2);
  CHECK(DTypeSize(DType::kF8E4M3) == 1);
  CHECK_FALSE(ParseDType("f128").has_value());
}

TEST_CASE("the thread pool runs every index exactly once, repeatedly") {
  internal::ThreadPool pool(4);
  CHECK(pool.size() == 4);
  for (int round = 0; round < 50; round++) {
    std::vector<std::atomic<int>> hits(1000);
    pool.ParallelFor(hits.size(), [&](size_t i) { hits[i]++; });
    for (auto& h : hits) REQUIRE(h.load() == 1);
  }
}

TEST_CASE("the thread pool serves loops from several threads at once") {
  internal::ThreadPool pool(3);
  std::atomic<long> sum{0};
  std::vector<std::thread> callers;
  for (int t = 0; t < 4; t++)
    callers.emplace_back([&] {
      for (int r = 0; r < 20; r++) pool.ParallelFor(100, [&](size_t i) { sum += static_cast<long>(i); });
    });
  for (auto& c : callers) c.join();
  CHECK(sum.load() == 4L * 20 * 4950);
}

TEST_CASE("checked JSON rejects deep nesting before parsing") {
  std::string deep(100000, '[');
  auto r = internal::ParseJsonChecked(deep, "doc");
  REQUIRE_FALSE(r.ok());
  CHECK(std::string(r.status().message()).find("nested deeper") != std::string::npos);
  std::string brackets_in_string = "{\"a\":\"" + std::string(200, '[') + "\"}";
  CHECK(internal::ParseJsonChecked(brackets_in_string, "doc").ok());
}

TEST_CASE("checked JSON names the field whose type is wrong") {
  auto r = internal::ParseJsonChecked("{\"size\": \"12\"}", "doc");
  REQUIRE(r.ok());
  uint64_t v;
  Status s = internal::GetU64(*r, "size", &v, "obj");
  REQUIRE_FALSE(s.ok());
  CHECK(std::string(s.message()).find("'size'") != std::string::npos);
  s = internal::GetU64(*r, "missing", &v, "obj");
  CHECK(std::string(s.message()).find("missing field 'missing'") != std::string::npos);
  auto neg = internal::ParseJsonChecked("{\"size\": -3}", "doc");
  CHECK_FALSE(internal::GetU64(*neg, "size", &v, "obj").ok());
  CHECK_FALSE(internal::ParseJsonChecked("{\"a\": ", "doc").ok());
}

TEST_CASE("host memory readings are consistent") {
  faultline::internal::HostMemory m;
  REQUIRE(faultline::internal::ReadHostMemory(&m));
  CHECK(m.total > 0);
  CHECK(m.available <= m.total);
  double p = m.Pressure();
  CHECK(p >= 0);
  CHECK(p <= 1);
  CHECK(m.Basis() > 0);
  if (m.cgroup_limit) CHECK(m.cgroup_limit < m.total);
}
