// A periodic callback on its own thread, driven by a libuv event loop
// (a timer, and an async handle to stop it from any thread).
// Thread-safety: Start/Stop from one owner thread; the callback runs on the
// ticker's thread only.
#pragma once

#include <functional>
#include <memory>

#include "faultline/status.hpp"

namespace faultline::internal {

class Ticker {
 public:
  Ticker();
  ~Ticker();  // Stop()
  Ticker(const Ticker&) = delete;
  Ticker& operator=(const Ticker&) = delete;

  // Calls on_start once on the new thread, then tick every interval_ms.
  Status Start(unsigned interval_ms, std::function<void()> on_start, std::function<void()> tick);
  // Returns after the thread has left its loop (a tick in progress finishes).
  void Stop();

 private:
  struct State;
  std::unique_ptr<State> s_;
};

}  // namespace faultline::internal
