// A real, unmodified program under the shim inside a memory-limited cgroup
// (v1 memory.limit_in_bytes): Debian's python3 with NumPy computes on
// arrays six times the limit and prints the same result as an unlimited
// run, while the same command without the shim is killed for memory.
// Exits 77 when there is no userfaultfd, no python3 with NumPy, or no
// cgroup v1 memory controller this process may use.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include "helpers.h"
#include "os/uffd.h"

using namespace faultline::test;

namespace {

const char* kScript =
    "import numpy as np\n"
    "n = 64 * 1024 * 1024\n"  // 512 MiB of float64 per array
    "a = np.arange(n, dtype=np.float64)\n"
    "b = np.sqrt(a) * 3.0\n"
    "c = a + b\n"
    "print(repr(float(c[::4096].sum())), repr(float(b.sum())), repr(float(c[-1])))\n";

std::string g_cgroup;  // the test's cgroup directory
std::string g_python;
TempDir* g_dir;        // holds the script

std::string Env(const char* name, const char* fallback = "") {
  const char* v = getenv(name);
  return v && *v ? v : fallback;
}

bool WriteFile(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  f << text;
  f.close();
  return f.good();
}

// Runs the script with `prefix` (environment words), inside the cgroup when asked.
CommandResult Python(const std::string& prefix, bool limited) {
  std::string script = *g_dir / "script.py";
  WriteFileBytes(script, kScript, strlen(kScript));
  std::string cmd = "env " + prefix + " " + g_python + " " + script;
  if (limited) cmd = "sh -c 'echo $$ > " + g_cgroup + "/cgroup.procs && exec " + cmd + "'";
  return Run(cmd);
}

}  // namespace

TEST_CASE("NumPy on arrays six times a cgroup's memory limit: right under the shim, killed without") {
  auto free_run = Python("", false);
  REQUIRE(free_run.status == 0);
  auto shim = Python("LD_PRELOAD=" + Env("FAULTLINE_PRELOAD") + " FAULTLINE_BUDGET=96M FAULTLINE_SHOW_STATS=1", true);
  INFO(shim.out);
  CHECK(shim.status == 0);
  std::string want = free_run.out;
  CHECK(shim.out.find(want) != std::string::npos);
  MESSAGE(shim.out);
  auto plain = Python("", true);
  INFO(plain.out);
  CHECK(plain.status == 128 + 9);  // SIGKILL from the cgroup's OOM killer
}

TEST_CASE("a budget larger than the cgroup can hold is lowered to fit, and said, instead of an OOM kill") {
  auto r = Python("LD_PRELOAD=" + Env("FAULTLINE_PRELOAD") + " FAULTLINE_BUDGET=4G FAULTLINE_SHOW_STATS=1", true);
  INFO(r.out);
  CHECK(r.status == 0);  // 137 (SIGKILL) before: a 4 GiB budget in a 256 MiB cgroup
  CHECK(r.out.find("does not fit in this process's memory cgroup (limit 256.0 MiB") != std::string::npos);
  CHECK(r.out.find(Python("", false).out) != std::string::npos);
}

int main(int argc, char** argv) {
  if (!faultline::internal::UffdAvailable()) {
    fprintf(stderr, "skipped: userfaultfd is not allowed here\n");
    return 77;
  }
  g_python = Env("FAULTLINE_NUMPY_PYTHON", "/usr/bin/python3");
  if (Run(g_python + " -c 'import numpy'").status != 0) {
    fprintf(stderr, "skipped: %s has no NumPy (Debian: python3-numpy)\n", g_python.c_str());
    return 77;
  }
  g_cgroup = "/sys/fs/cgroup/memory/faultline-test-" + std::to_string(getpid());
  if (mkdir(g_cgroup.c_str(), 0755) != 0) {
    fprintf(stderr, "skipped: cannot create a cgroup v1 memory group (%s)\n", strerror(errno));
    return 77;
  }
  TempDir dir;
  g_dir = &dir;
  int rc = 77;
  if (WriteFile(g_cgroup + "/memory.limit_in_bytes", "268435456")) {
    WriteFile(g_cgroup + "/memory.memsw.limit_in_bytes", "268435456");  // where swap accounting exists
    doctest::Context ctx(argc, argv);
    rc = ctx.run();
  } else {
    fprintf(stderr, "skipped: cannot set the cgroup's memory limit\n");
  }
  rmdir(g_cgroup.c_str());
  return rc;
}
