// The libuv ticker; see ticker.h.
#include "os/ticker.h"

#include <uv.h>

#include <thread>

namespace faultline::internal {

struct Ticker::State {
  uv_loop_t loop{};
  uv_timer_t timer{};
  uv_async_t stop{};
  std::thread thread;
  std::function<void()> tick;
  bool running = false;
};

Ticker::Ticker() : s_(std::make_unique<State>()) {}
Ticker::~Ticker() { Stop(); }

Status Ticker::Start(unsigned interval_ms, std::function<void()> on_start, std::function<void()> tick) {
  if (s_->running) return Status::Error(EBUSY, "ticker already running");
  if (int rc = uv_loop_init(&s_->loop)) return Status::Error(-rc, "uv_loop_init: %s", uv_strerror(rc));
  State* s = s_.get();
  s->tick = std::move(tick);
  uv_timer_init(&s->loop, &s->timer);
  s->timer.data = s;
  uv_async_init(&s->loop, &s->stop, [](uv_async_t* a) {
    auto* st = static_cast<State*>(a->data);
    uv_timer_stop(&st->timer);
    uv_close(reinterpret_cast<uv_handle_t*>(&st->timer), nullptr);
    uv_close(reinterpret_cast<uv_handle_t*>(&st->stop), nullptr);
  });
  s->stop.data = s;
  if (interval_ms == 0) interval_ms = 1;
  uv_timer_start(&s->timer, [](uv_timer_t* t) { static_cast<State*>(t->data)->tick(); }, interval_ms, interval_ms);
  s->running = true;
  s->thread = std::thread([s, on_start = std::move(on_start)] {
    if (on_start) on_start();
    uv_run(&s->loop, UV_RUN_DEFAULT);
  });
  return Status::Ok();
}

void Ticker::Stop() {
  if (!s_ || !s_->running) return;
  uv_async_send(&s_->stop);
  s_->thread.join();
  uv_loop_close(&s_->loop);
  s_->running = false;
}

}  // namespace faultline::internal
