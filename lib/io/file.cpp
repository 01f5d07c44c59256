// Positional I/O loops and AtomicFile; see file.h.
#include "io/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

namespace faultline::internal {

void UniqueFd::reset(int fd) noexcept {
  if (fd_ >= 0) close(fd_);
  fd_ = fd;
}

Status PreadFull(int fd, void* buf, size_t len, uint64_t offset, const char* what) {
  auto* p = static_cast<char*>(buf);
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd, p + done, len - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::Error(errno, "reading %s at offset %llu", what,
                           static_cast<unsigned long long>(offset + done));
    }
    if (n == 0)
      return Status::Error(EIO, "%s: file is truncated (wanted %zu bytes at offset %llu)", what,
                           len, static_cast<unsigned long long>(offset));
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status PwriteFull(int fd, const void* buf, size_t len, uint64_t offset, const char* what) {
  auto* p = static_cast<const char*>(buf);
  size_t done = 0;
  while (done < len) {
    ssize_t n = pwrite(fd, p + done, len - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::Error(errno, "writing %s", what);
    }
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Result<uint64_t> FileSize(int fd) {
  struct stat st;
  if (fstat(fd, &st) != 0) return Status::Error(errno, "fstat");
  return static_cast<uint64_t>(st.st_size);
}

namespace {
std::string DirOf(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}
}  // namespace

Result<AtomicFile> AtomicFile::Create(const std::string& path) {
  AtomicFile f;
  f.path_ = path;
  std::string dir = DirOf(path);
  int fd = open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0644);
  if (fd < 0) {
    if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
      return Status::Error(errno, "cannot create a file in '%s'", dir.c_str());
    std::string tmpl = path + ".tmp.XXXXXX";
    fd = mkostemp(tmpl.data(), O_CLOEXEC);
    if (fd < 0) return Status::Error(errno, "cannot create a temporary file for '%s'", path.c_str());
    fchmod(fd, 0644);
    f.temp_path_ = tmpl;
  }
  f.fd_.reset(fd);
  return f;
}

AtomicFile::AtomicFile(AtomicFile&& o) noexcept
    : path_(std::move(o.path_)),
      temp_path_(std::move(o.temp_path_)),
      fd_(std::move(o.fd_)),
      committed_(o.committed_) {
  o.committed_ = true;  // the moved-from object owns nothing to clean up
  o.temp_path_.clear();
}

AtomicFile::~AtomicFile() {
  if (!committed_ && !temp_path_.empty()) unlink(temp_path_.c_str());
}

Status AtomicFile::Commit() {
  if (committed_) return Status::Error(EINVAL, "file already committed");
  if (fsync(fd_.get()) != 0) return Status::Error(errno, "fsync '%s'", path_.c_str());
  std::string source = temp_path_;
  if (temp_path_.empty()) {
    // Give the unnamed file a name beside the target, then rename it over
    // the target: linkat cannot replace an existing file.
    std::string proc = "/proc/self/fd/" + std::to_string(fd_.get());
    for (int attempt = 0; attempt < 100; attempt++) {
      source = path_ + ".tmp." + std::to_string(getpid()) + "." + std::to_string(attempt);
      if (linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, source.c_str(), AT_SYMLINK_FOLLOW) == 0) break;
      if (errno != EEXIST) return Status::Error(errno, "cannot link '%s'", path_.c_str());
      source.clear();
    }
    if (source.empty()) return Status::Error(EEXIST, "cannot name a temporary for '%s'", path_.c_str());
  }
  if (rename(source.c_str(), path_.c_str()) != 0) {
    int err = errno;
    unlink(source.c_str());
    return Status::Error(err, "cannot rename into '%s'", path_.c_str());
  }
  committed_ = true;
  std::string dir = DirOf(path_);
  int dfd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    fsync(dfd);
    close(dfd);
  }
  return Status::Ok();
}

}  // namespace faultline::internal
