// Guard-page mode's SIGSEGV handler. Engines in guard mode register here; a
// fault inside a registered range is served by asking the engine's workers
// and waiting on the frame's futex (both async-signal-safe: write(2) and
// futex(2)); any other fault goes to the previous handler. The registry is a
// fixed array of atomic pointers: the handler never locks or allocates.
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/ucontext.h>
#include <unistd.h>

#include <atomic>
#include <mutex>

#include "pager/pager.h"

namespace faultline::internal {

namespace {

constexpr int kMaxEngines = 64;
// Each entry belongs to the process that registered it: after fork the
// child inherits the parent's entries, whose service threads it does not
// have; the handler and GuardRegister ignore (and reuse) them.
std::atomic<Engine*> g_engines[kMaxEngines];
std::atomic<pid_t> g_pids[kMaxEngines];
// Threads inside the handler for a slot, counted before the slot's engine
// is read: an engine being destroyed waits for them (GuardDrain) before it
// frees what they use; a slot being drained is not reused.
std::atomic<int> g_inflight[kMaxEngines];
std::atomic<bool> g_draining[kMaxEngines];
std::mutex g_mu;
int g_users = 0;
struct sigaction g_previous;

bool IsWrite(void* uctx) {
#if defined(__x86_64__)
  auto* uc = static_cast<ucontext_t*>(uctx);
  return (uc->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#else
  (void)uctx;
  return false;
#endif
}

void Chain(int sig, siginfo_t* info, void* uctx) {
  if (g_previous.sa_flags & SA_SIGINFO) {
    if (g_previous.sa_sigaction) return g_previous.sa_sigaction(sig, info, uctx);
  } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
    return g_previous.sa_handler(sig);
  }
  // Default action: restore it and return; the access faults again and kills.
  signal(sig, SIG_DFL);
}

// A frame that cannot be read: SIGBUS at the address, as the kernel gives
// for a bad page of a mapped file (si_code BUS_ADRERR, si_addr set). Like
// the kernel's for a fault, it cannot be blocked or ignored: a thread that
// blocks it (or a process that ignores it) is killed by it, where a
// pending signal would have the access fault again forever.
void RaiseSigbus(void* addr, void* uctx) {
  auto* uc = static_cast<ucontext_t*>(uctx);
  struct sigaction now;
  sigaction(SIGBUS, nullptr, &now);
  if (sigismember(&uc->uc_sigmask, SIGBUS) || (!(now.sa_flags & SA_SIGINFO) && now.sa_handler == SIG_IGN)) {
    struct sigaction dfl = {};
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGBUS, &dfl, nullptr);
    sigdelset(&uc->uc_sigmask, SIGBUS);
    sigset_t bus;
    sigemptyset(&bus);
    sigaddset(&bus, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &bus, nullptr);
  }
  siginfo_t si = {};
  si.si_signo = SIGBUS;
  si.si_code = BUS_ADRERR;
  si.si_addr = addr;
  pid_t pid = getpid(), tid = static_cast<pid_t>(syscall(SYS_gettid));
  if (syscall(SYS_rt_tgsigqueueinfo, pid, tid, SIGBUS, &si) != 0) syscall(SYS_tgkill, pid, tid, SIGBUS);
}

void Handler(int sig, siginfo_t* info, void* uctx) {
  int saved = errno;
  // Tensors are read-only: a write is a bug in the caller, not a page to load.
  if (!IsWrite(uctx)) {
    pid_t self = getpid();
    for (int i = 0; i < kMaxEngines; i++) {
      if (!g_engines[i].load(std::memory_order_relaxed)) continue;
      g_inflight[i].fetch_add(1);  // before the engine is read (seq_cst, against GuardUnregister's store)
      Engine* e = g_engines[i].load();
      if (e && g_pids[i].load(std::memory_order_relaxed) == self && e->Owns(info->si_addr)) {
        Engine::GuardResult r = e->GuardFault(info->si_addr);
        g_inflight[i].fetch_sub(1);  // before SIGBUS: its handler may siglongjmp and never come back
        if (r == Engine::GuardResult::kNotOurs) break;
        if (r == Engine::GuardResult::kSigbus) RaiseSigbus(info->si_addr, uctx);
        errno = saved;
        return;
      }
      g_inflight[i].fetch_sub(1);
    }
  }
  errno = saved;
  Chain(sig, info, uctx);
}

}  // namespace

Status GuardRegister(Engine* e) {
  std::lock_guard<std::mutex> lock(g_mu);
  int free_slot = -1;
  pid_t self = getpid();
  for (int i = 0; i < kMaxEngines; i++) {
    // A slot inherited from the parent (a fork child) is free whatever its
    // counts say: the threads they counted do not exist here.
    bool inherited = g_pids[i].load() != self;
    if (inherited || (!g_engines[i].load() && !g_draining[i].load())) {
      free_slot = i;
      break;
    }
  }
  if (free_slot < 0) return Status::Error(EMFILE, "more than %d bundles open in guard mode", kMaxEngines);
  if (g_users++ == 0) {
    struct sigaction sa = {};
    sa.sa_sigaction = Handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, &g_previous) != 0) {
      g_users--;
      return Status::Error(errno, "cannot install the SIGSEGV handler");
    }
  }
  g_engines[free_slot].store(nullptr, std::memory_order_release);
  g_inflight[free_slot].store(0);
  g_draining[free_slot].store(false);
  g_pids[free_slot].store(self, std::memory_order_relaxed);
  g_engines[free_slot].store(e, std::memory_order_release);
  return Status::Ok();
}

int GuardUnregister(Engine* e) {
  std::lock_guard<std::mutex> lock(g_mu);
  int found = -1;
  for (int i = 0; i < kMaxEngines; i++)
    if (g_engines[i].load() == e) {
      g_draining[i].store(true);
      g_engines[i].store(nullptr);  // seq_cst: a handler counted after this sees no engine
      found = i;
    }
  if (found >= 0 && --g_users == 0) sigaction(SIGSEGV, &g_previous, nullptr);
  return found;
}

void GuardDrain(int slot) {
  if (slot < 0 || slot >= kMaxEngines) return;
  while (g_inflight[slot].load() != 0) usleep(100);
  std::lock_guard<std::mutex> lock(g_mu);
  g_draining[slot].store(false);
}

}  // namespace faultline::internal
