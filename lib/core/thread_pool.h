// A fixed pool of worker threads running ParallelFor loops. The calling
// thread takes part in its own loop, so a pool of N threads uses N cores.
// Thread-safety: ParallelFor may be called from several threads; loops
// queue behind each other.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace faultline::internal {

class ThreadPool {
 public:
  // `threads` = total parallelism including the caller; 0 = all cores.
  explicit ThreadPool(unsigned threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  unsigned size() const noexcept { return static_cast<unsigned>(workers_.size()) + 1; }

  // Runs fn(i) for i in [0, n), spread over the pool; returns when all are done.
  void ParallelFor(size_t n, const std::function<void(size_t)>& fn);

  static unsigned DefaultThreads() noexcept;

 private:
  struct Job;
  void WorkerLoop();
  static void RunJob(Job* job);

  std::mutex mu_;
  std::mutex loop_mu_;  // one loop at a time
  std::condition_variable cv_;
  std::condition_variable done_cv_;
  Job* job_ = nullptr;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace faultline::internal
