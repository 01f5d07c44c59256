// Ring and ReadBatch; see uring.h. Each op's progress lives in a small
// per-batch vector indexed by the SQE's user_data, so partial reads continue
// where they stopped.
#include "io/uring.h"

#include <liburing.h>

#include <algorithm>
#include <vector>

#include "core/tsan.h"
#include "io/file.h"

namespace faultline::internal {

Result<std::unique_ptr<Ring>> Ring::Create(unsigned depth) {
  std::unique_ptr<Ring> r(new Ring());
  r->ring_ = std::make_unique<io_uring>();
  int rc = io_uring_queue_init(depth, r->ring_.get(), 0);
  if (rc < 0) return Status::Error(-rc, "io_uring_queue_init(%u)", depth);
  // liburing maps the rings with raw system calls: a ring made where an
  // ended thread's ring was would look to TSan like a race between them.
  FL_TSAN_MAPPING_NEW(r->ring_->sq.sqes);
  FL_TSAN_MAPPING_NEW(r->ring_->sq.ring_ptr);
  FL_TSAN_MAPPING_NEW(r->ring_->cq.ring_ptr);
  r->depth_ = depth;
  return r;
}

Ring::~Ring() {
  if (depth_ == 0) return;
  FL_TSAN_MAPPING_GONE(ring_->sq.sqes);
  FL_TSAN_MAPPING_GONE(ring_->sq.ring_ptr);
  FL_TSAN_MAPPING_GONE(ring_->cq.ring_ptr);
  io_uring_queue_exit(ring_.get());
}

Status Ring::ReadAll(std::span<ReadOp> ops, const char* what) {
  // Progress per op; grown once per thread, so steady-state reads (the
  // pager's fault path) do not allocate.
  thread_local std::vector<uint32_t> done;
  if (done.size() < ops.size()) done.resize(ops.size());
  std::fill(done.begin(), done.begin() + static_cast<std::ptrdiff_t>(ops.size()), 0u);
  size_t next = 0, in_flight = 0, finished = 0;
  Status first_error;
  auto queue = [&](size_t i) {
    io_uring_sqe* sqe = io_uring_get_sqe(ring_.get());
    if (ops[i].write)
      io_uring_prep_write(sqe, ops[i].fd, static_cast<char*>(ops[i].buf) + done[i], ops[i].len - done[i],
                          ops[i].offset + done[i]);
    else
      io_uring_prep_read(sqe, ops[i].fd, static_cast<char*>(ops[i].buf) + done[i], ops[i].len - done[i],
                         ops[i].offset + done[i]);
    io_uring_sqe_set_data64(sqe, i);
    in_flight++;
  };
  while (finished < ops.size()) {
    while (next < ops.size() && in_flight < depth_) {
      if (ops[next].len == 0) {
        next++;
        finished++;
        continue;
      }
      queue(next++);
    }
    if (in_flight == 0) continue;
    int rc = io_uring_submit_and_wait(ring_.get(), 1);
    if (rc < 0 && rc != -EINTR) return Status::Error(-rc, "io_uring_submit reading %s", what);
    io_uring_cqe* cqe;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(ring_.get(), head, cqe) {
      seen++;
      in_flight--;
      size_t i = io_uring_cqe_get_data64(cqe);
      int res = cqe->res;
      if (res == -EINTR || res == -EAGAIN) {
        queue(i);
        continue;
      }
      if (res <= 0) {
        if (first_error.ok()) {
          first_error = res == 0 ? Status::Error(EIO, "%s: file is truncated at offset %llu", what,
                                                 static_cast<unsigned long long>(ops[i].offset + done[i]))
                                 : Status::Error(-res, "%s %s at offset %llu", ops[i].write ? "writing" : "reading", what,
                                                 static_cast<unsigned long long>(ops[i].offset));
        }
        finished++;
        continue;
      }
      done[i] += static_cast<uint32_t>(res);
      if (done[i] < ops[i].len) queue(i);
      else finished++;
    }
    io_uring_cq_advance(ring_.get(), seen);
  }
  return first_error;
}

namespace {

struct ThreadRing {
  bool tried = false;
  std::unique_ptr<Ring> ring;
};
thread_local ThreadRing t_ring;

}  // namespace

bool UringAvailable() noexcept {
  static const bool available = [] {
    io_uring ring;
    if (io_uring_queue_init(2, &ring, 0) < 0) return false;
    io_uring_queue_exit(&ring);
    return true;
  }();
  return available;
}

Status ReadBatch(std::span<ReadOp> ops, const char* what) {
  if (!t_ring.tried) {
    t_ring.tried = true;
    if (UringAvailable()) {
      auto r = Ring::Create(64);
      if (r.ok()) t_ring.ring = std::move(r).value();
    }
  }
  if (t_ring.ring) return t_ring.ring->ReadAll(ops, what);
  for (auto& op : ops) {
    Status s = op.write ? PwriteFull(op.fd, op.buf, op.len, op.offset, what)
                        : PreadFull(op.fd, op.buf, op.len, op.offset, what);
    if (!s.ok()) return s;
  }
  return Status::Ok();
}

}  // namespace faultline::internal
