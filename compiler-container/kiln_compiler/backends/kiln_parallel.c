/* Kiln's parallel launcher for TVM kernels: tasks claimed one at a time, the calling thread included.
 *
 * TVM's generated code runs a parallel loop through the function pointer __TVMBackendParallelLaunch,
 * splitting the loop into penv->num_task static chunks. TVM's own pool hands chunk i to worker i, so a
 * worker that the OS has descheduled (another process holds its core) stalls the whole loop until it
 * runs again: measured, SqueezeNet at 2 threads went from 5 to 90-180 ms on a loaded 2-core host, while
 * 1 thread took 8 ms. Here a launch publishes more chunks than threads and every thread, the caller
 * first, claims the next unclaimed chunk until none is left; the caller waits only for chunks already
 * claimed. A late worker finds nothing to do, so a busy core costs at most the chunks it took.
 *
 * Linked into every Linux artifact by Kiln's compiler (kiln_compiler.backends.tvm); kiln-runtime points the
 * library's __TVMBackendParallelLaunch at kiln_parallel_launch after loading it (ADR 0032). */

#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
  void* sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;

typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

#define KILN_MAX_THREADS 256
#define KILN_CHUNKS_PER_THREAD 4
#define KILN_SPIN_PAUSE 20000 /* busy checks before yielding the core, then sched_yield() checks */
#define KILN_SPIN_YIELD 2000  /* before sleeping on the condition variable */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
  __asm__ __volatile__("yield");
#endif
}

static struct {
  pthread_mutex_t lock;
  pthread_cond_t wake;
  int threads;                /* including the caller */
  int started;
  atomic_uint_fast64_t claim; /* generation << 32 | next chunk */
  atomic_int done;            /* chunks finished in the current generation */
  atomic_int failed;
  atomic_uint generation;
  FTVMParallelLambda flambda;
  void* cdata;
  int num_task;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static __thread int in_launch;

static void run_chunks(uint32_t generation) {
  for (;;) {
    uint_fast64_t seen = atomic_load_explicit(&pool.claim, memory_order_acquire);
    uint32_t next = (uint32_t)(seen & 0xffffffffu);
    if ((uint32_t)(seen >> 32) != generation || next >= (uint32_t)pool.num_task) return;
    if (!atomic_compare_exchange_weak_explicit(&pool.claim, &seen, seen + 1, memory_order_acq_rel,
                                               memory_order_relaxed))
      continue;
    TVMParallelGroupEnv env = {NULL, pool.num_task};
    if (pool.flambda((int)next, &env, pool.cdata) != 0) atomic_store(&pool.failed, 1);
    atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
  }
}

static void* worker(void* arg) {
  (void)arg;
  in_launch = 1; /* a kernel that launches again from a worker runs serially */
  uint32_t last = 0;
  for (;;) {
    uint32_t generation = atomic_load_explicit(&pool.generation, memory_order_acquire);
    for (int spin = 0; generation == last && spin < KILN_SPIN_PAUSE + KILN_SPIN_YIELD; ++spin) {
      if (spin < KILN_SPIN_PAUSE) cpu_relax(); else sched_yield();
      generation = atomic_load_explicit(&pool.generation, memory_order_acquire);
    }
    if (generation == last) {
      pthread_mutex_lock(&pool.lock);
      while ((generation = atomic_load(&pool.generation)) == last) pthread_cond_wait(&pool.wake, &pool.lock);
      pthread_mutex_unlock(&pool.lock);
    }
    last = generation;
    run_chunks(generation);
  }
  return NULL;
}

static int configured_threads(void) {
  const char* env = getenv("TVM_NUM_THREADS");
  int n = env ? atoi(env) : 0;
  if (n <= 0) {
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
#endif
    if (n <= 0) n = (int)sysconf(_SC_NPROCESSORS_ONLN);
  }
  if (n < 1) n = 1;
  if (n > KILN_MAX_THREADS) n = KILN_MAX_THREADS;
  return n;
}

static void start_pool(void) {
  pool.threads = configured_threads();
  for (int i = 1; i < pool.threads; ++i) {
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&thread, &attr, worker, NULL) == 0) ++pool.started;
    pthread_attr_destroy(&attr);
  }
}

/* The number of threads a launch uses (the caller included). */
int kiln_parallel_threads(void) {
  pthread_once(&pool_once, start_pool);
  return pool.started + 1;
}

int kiln_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  pthread_once(&pool_once, start_pool);
  if (num_task <= 0) num_task = (pool.started + 1) * KILN_CHUNKS_PER_THREAD;
  /* Nested, one thread, or one chunk (nothing to share, and a spinning worker could otherwise claim it
   * before the caller does): run every chunk here. */
  if (in_launch || pool.started == 0 || num_task == 1) {
    TVMParallelGroupEnv env = {NULL, num_task};
    int failed = 0;
    for (int i = 0; i < num_task; ++i) failed |= flambda(i, &env, cdata) != 0;
    return failed ? -1 : 0;
  }
  in_launch = 1;
  pool.flambda = flambda;
  pool.cdata = cdata;
  pool.num_task = num_task;
  atomic_store(&pool.done, 0);
  atomic_store(&pool.failed, 0);
  uint32_t generation = atomic_load(&pool.generation) + 1;
  atomic_store_explicit(&pool.claim, (uint_fast64_t)generation << 32, memory_order_release);
  pthread_mutex_lock(&pool.lock);
  atomic_store_explicit(&pool.generation, generation, memory_order_release);
  pthread_cond_broadcast(&pool.wake);
  pthread_mutex_unlock(&pool.lock);
  run_chunks(generation);
  /* Only chunks a worker has claimed are left: wait for them, busy at first, then yielding the core. */
  for (int spin = 0; atomic_load_explicit(&pool.done, memory_order_acquire) < num_task; ++spin) {
    if (spin < KILN_SPIN_PAUSE) cpu_relax(); else sched_yield();
  }
  in_launch = 0;
  return atomic_load(&pool.failed) ? -1 : 0;
}
