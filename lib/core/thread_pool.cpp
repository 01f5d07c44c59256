// ThreadPool: workers wait for a job generation, grab indices from a shared
// atomic counter, and the last one to finish wakes the caller.
#include "core/thread_pool.h"

#include <atomic>

namespace faultline::internal {

struct ThreadPool::Job {
  size_t n = 0;
  const std::function<void(size_t)>* fn = nullptr;
  std::atomic<size_t> next{0};
  int active = 0;  // workers inside RunJob; guarded by the pool's mu_
};

unsigned ThreadPool::DefaultThreads() noexcept {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : n;
}

ThreadPool::ThreadPool(unsigned threads) {
  if (threads == 0) threads = DefaultThreads();
  for (unsigned i = 1; i < threads; i++) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::RunJob(Job* job) {
  for (;;) {
    size_t i = job->next.fetch_add(1, std::memory_order_relaxed);
    if (i >= job->n) break;
    (*job->fn)(i);
  }
}

void ThreadPool::WorkerLoop() {
  uint64_t seen = 0;
  for (;;) {
    Job* job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || (job_ != nullptr && generation_ != seen); });
      if (stop_) return;
      seen = generation_;
      job = job_;
      job->active++;
    }
    RunJob(job);
    std::lock_guard<std::mutex> lock(mu_);
    if (--job->active == 0) done_cv_.notify_all();
  }
}

void ThreadPool::ParallelFor(size_t n, const std::function<void(size_t)>& fn) {
  if (n == 0) return;
  if (workers_.empty() || n == 1) {
    for (size_t i = 0; i < n; i++) fn(i);
    return;
  }
  std::lock_guard<std::mutex> loop_lock(loop_mu_);
  Job job;
  job.n = n;
  job.fn = &fn;
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = &job;
    generation_++;
  }
  cv_.notify_all();
  RunJob(&job);
  // Every index has been taken once the caller's RunJob returns; unpublish
  // the job, then wait for the workers still finishing their last index.
  std::unique_lock<std::mutex> lock(mu_);
  job_ = nullptr;
  done_cv_.wait(lock, [&] { return job.active == 0; });
}

}  // namespace faultline::internal
