// The LD_PRELOAD shim over unmodified programs: the probe program (every
// allocation function's contract; large blocks well over the budget from
// several threads with fork and fork + exec; userfaultfd denied by seccomp)
// and the CLI. Paths come from meson: FAULTLINE_PRELOAD, FAULTLINE_SHIM_PROBE,
// FAULTLINE_CLI. Exits 77 where userfaultfd is not allowed.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdlib>
#include <sstream>
#include <string>

#include "helpers.h"
#include "os/uffd.h"

using namespace faultline::test;

namespace {

std::string Env(const char* name) {
  const char* v = getenv(name);
  return v ? v : "";
}

// Runs the probe under the shim with `env` (extra VAR=value words).
CommandResult Probe(const std::string& args, const std::string& env = "") {
  return Run("env LD_PRELOAD=" + Env("FAULTLINE_PRELOAD") + " FAULTLINE_SHOW_STATS=1 " + env + " " +
             Env("FAULTLINE_SHIM_PROBE") + " " + args);
}

}  // namespace

TEST_CASE("every allocation function keeps its contract under the shim") {
  auto r = Probe("contract", "FAULTLINE_BUDGET=32M");
  INFO(r.out);
  CHECK(r.status == 0);
  CHECK(r.out.find("faultline managed memory stats") != std::string::npos);
  CHECK(r.out.find("allocations 0,") == std::string::npos);  // large blocks were managed
}

TEST_CASE("eight times the budget from several threads, with fork and fork + exec, every byte checked") {
  TempDir spill;
  auto r = Probe("work 256 4", "FAULTLINE_BUDGET=32M FAULTLINE_SPILL_DIR=" + spill.path());
  INFO(r.out);
  CHECK(r.status == 0);
  CHECK(r.out.find("spilled 0 ") == std::string::npos);
  CHECK(spill.List().empty());  // the spill file is unlinked
}

TEST_CASE("the same allocation calls give the same results, errors and bytes with and without the shim") {
  auto plain = Run(Env("FAULTLINE_SHIM_PROBE") + " replay");
  REQUIRE(plain.status == 0);
  auto shim = Probe("replay", "FAULTLINE_SHOW_STATS=0 FAULTLINE_BUDGET=8M FAULTLINE_THRESHOLD=64K");
  CHECK(shim.status == 0);
  // Line by line, so that a difference names the call.
  std::istringstream a(plain.out), b(shim.out);
  std::string la, lb;
  int line = 0, differ = 0;
  while (std::getline(a, la)) {
    line++;
    if (!std::getline(b, lb)) lb = "(nothing)";
    if (la != lb && differ++ < 20) FAIL_CHECK("line " << line << ": without the shim '" << la << "', with it '" << lb << "'");
  }
  CHECK(line > 200);
  CHECK(differ == 0);
}

TEST_CASE("system calls read into and write from managed memory that was never touched or is spilled") {
  TempDir dir;
  auto r = Probe("syscalls " + dir / "src.bin", "FAULTLINE_BUDGET=8M FAULTLINE_VERBOSE=1");
  INFO(r.out);
  CHECK(r.status == 0);
  CHECK(r.out.find("system calls on spilled memory served (kernel-mode faults)") != std::string::npos);
  CHECK(r.out.find("spilled 0 ") == std::string::npos);
  // As an unprivileged process gets it (user-mode faults only): the shim's
  // wrappers touch the buffers first (EFAULT before them).
  r = Probe("syscalls " + dir / "src2.bin", "FAULTLINE_BUDGET=8M FAULTLINE_VERBOSE=1 FAULTLINE_KERNEL_FAULTS=0");
  INFO(r.out);
  CHECK(r.status == 0);
  CHECK(r.out.find("served by the shim's wrappers") != std::string::npos);
  CHECK(r.out.find("spilled 0 ") == std::string::npos);
}

TEST_CASE("raw spill codec and a small threshold work the same") {
  auto r = Probe("work 64 2", "FAULTLINE_BUDGET=8M FAULTLINE_SPILL_CODEC=raw FAULTLINE_THRESHOLD=64K");
  INFO(r.out);
  CHECK(r.status == 0);
}

TEST_CASE("where userfaultfd is denied, everything goes to the system allocator, said once") {
  for (const char* env : {"FAULTLINE_VERBOSE=1", "FAULTLINE_VERBOSE=0"}) {
    auto r = Probe("denied", env);
    INFO(r.out);
    if (r.status == 77) return;
    CHECK(r.status == 0);
    size_t at = r.out.find("managed memory is off");
    CHECK(at != std::string::npos);
    CHECK(r.out.find("managed memory is off", at + 1) == std::string::npos);
  }
  // An unusable spill directory: said too, not only when verbose.
  auto r = Probe("contract", "FAULTLINE_SPILL_DIR=/nonexistent/spill");
  INFO(r.out);
  CHECK(r.status == 0);
  CHECK(r.out.find("managed memory is off") != std::string::npos);
  CHECK(r.out.find("/nonexistent/spill") != std::string::npos);
}

TEST_CASE("bad option values warn once and keep the defaults") {
  auto r = Probe("contract", "FAULTLINE_BUDGET=lots FAULTLINE_SPILL_CODEC=lz4 FAULTLINE_THRESHOLD=-1");
  INFO(r.out);
  CHECK(r.status == 0);
  CHECK(r.out.find("FAULTLINE_BUDGET=lots is not") != std::string::npos);
  // It says what it uses (half the memory), not the paging default's text.
  CHECK(r.out.find("using the default (100MB)") == std::string::npos);
  CHECK(r.out.find("MiB\n") != std::string::npos);
  for (const char* bad : {"0", "-5", "64M%20"}) {
    std::string v = bad;
    if (v == "64M%20") v = "'64M '";
    auto b = Probe("contract", "FAULTLINE_BUDGET=" + v);
    INFO(b.out);
    CHECK(b.status == 0);
    CHECK(b.out.find("is not a size such as 512M; using ") != std::string::npos);
  }
  CHECK(r.out.find("FAULTLINE_SPILL_CODEC=lz4 is not") != std::string::npos);
  CHECK(r.out.find("FAULTLINE_THRESHOLD=-1 is not") != std::string::npos);
}

TEST_CASE("a real program: the CLI packs and verifies under the shim") {
  TempDir dir;
  std::vector<std::byte> data = RandomBytes(3 << 20, 5, true);
  WriteFileBytes(dir / "raw.bin", data);
  // A safetensors file of one 3 MiB u8 tensor.
  std::string header = R"({"t":{"dtype":"U8","shape":[3145728],"data_offsets":[0,3145728]}})";
  std::string st;
  uint64_t hl = header.size();
  st.append(reinterpret_cast<const char*>(&hl), 8);
  st += header;
  st.append(reinterpret_cast<const char*>(data.data()), data.size());
  WriteFileBytes(dir / "m.safetensors", st.data(), st.size());
  std::string pre = "env LD_PRELOAD=" + Env("FAULTLINE_PRELOAD") + " FAULTLINE_BUDGET=4M ";
  auto p = Run(pre + Env("FAULTLINE_CLI") + " pack " + dir / "m.safetensors" + " -o " + dir / "m.apbundle");
  INFO(p.out);
  CHECK(p.status == 0);
  auto v = Run(pre + Env("FAULTLINE_CLI") + " verify " + dir / "m.apbundle");
  INFO(v.out);
  CHECK(v.status == 0);
}

int main(int argc, char** argv) {
  if (!faultline::internal::UffdAvailable()) {
    fprintf(stderr, "skipped: userfaultfd is not allowed here\n");
    return 77;
  }
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
