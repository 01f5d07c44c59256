// Test helpers: a temporary directory removed at scope exit, deterministic
// pseudo-random bytes, whole-file read/write, and running a command.
#pragma once

#include <dirent.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace faultline::test {

class TempDir {
 public:
  TempDir() {
    const char* base = getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/faultline-test-XXXXXX";
    if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() { Remove(path_); }
  const std::string& path() const { return path_; }
  // Entries in a directory (no "." or ".."); 0 where it does not exist.
  static size_t Count(const std::string& path) {
    size_t n = 0;
    if (DIR* d = opendir(path.c_str())) {
      while (dirent* e = readdir(d)) n += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
      closedir(d);
    }
    return n;
  }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }
  // Names of the entries in the directory (no "." or "..").
  std::vector<std::string> List() const {
    std::vector<std::string> out;
    if (DIR* d = opendir(path_.c_str())) {
      while (dirent* e = readdir(d))
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) out.push_back(e->d_name);
      closedir(d);
    }
    return out;
  }

 private:
  static void Remove(const std::string& p) {
    if (DIR* d = opendir(p.c_str())) {
      while (dirent* e = readdir(d)) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        std::string c = p + "/" + e->d_name;
        struct stat st;
        if (lstat(c.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) Remove(c);
        else unlink(c.c_str());
      }
      closedir(d);
    }
    rmdir(p.c_str());
  }
  std::string path_;
};

inline std::vector<std::byte> RandomBytes(size_t n, uint64_t seed, bool compressible = false) {
  std::vector<std::byte> out(n);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 0x1234567;
  for (size_t i = 0; i < n; i++) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    out[i] = static_cast<std::byte>(compressible ? (s % 7 == 0 ? s >> 56 : i / 97) : s >> 32);
  }
  return out;
}

inline std::vector<std::byte> ReadFileBytes(const std::string& path) {
  std::vector<std::byte> out;
  FILE* f = fopen(path.c_str(), "rb");
  if (!f) return out;
  std::byte buf[65536];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), f)) > 0) out.insert(out.end(), buf, buf + n);
  fclose(f);
  return out;
}

inline void WriteFileBytes(const std::string& path, const void* data, size_t len) {
  FILE* f = fopen(path.c_str(), "wb");
  if (!f) throw std::runtime_error("cannot write " + path);
  fwrite(data, 1, len, f);
  fclose(f);
}
inline void WriteFileBytes(const std::string& path, const std::vector<std::byte>& b) {
  WriteFileBytes(path, b.data(), b.size());
}

// Runs `body` in a forked child and returns the child's wait status. The
// child ends with _exit(body()), so no destructor or atexit handler of the
// parent's state runs twice. For behaviour that must crash (SIGBUS on a bad
// page) or that changes process-wide limits (rlimits, seccomp).
template <typename F>
int RunInChild(F&& body) {
  fflush(stdout);
  fflush(stderr);
  pid_t child = fork();
  if (child == 0) _exit(body());
  int status = 0;
  waitpid(child, &status, 0);
  return status;
}

// Installs a seccomp filter in this process that denies userfaultfd(2) and
// the /dev/userfaultfd ioctl with EPERM (a system that forbids them).
// False if the filter cannot be installed.
inline bool DenyUserfaultfd() {
  sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_userfaultfd, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_ioctl, 0, 3),
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, args[1])),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0xAA00, 0, 1),  // USERFAULTFD_IOC_NEW
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  sock_fprog prog = {static_cast<unsigned short>(sizeof(filter) / sizeof(filter[0])), filter};
  return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 && prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) == 0;
}

struct CommandResult {
  int status = -1;  // exit status, or 128 + signal
  std::string out;  // stdout and stderr together
};

// Runs `cmd` through the shell, capturing stdout and stderr.
inline CommandResult Run(const std::string& cmd) {
  CommandResult r;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

}  // namespace faultline::test
