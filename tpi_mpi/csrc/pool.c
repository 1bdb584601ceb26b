/* The kernels' threads (part of tpi_mpi._qdot): qdot_parallel runs tasks 0..n-1 of one job on this
 * thread and a few workers of its own (pthreads: torch's OpenMP pool is not reachable from here, and a
 * second OpenMP runtime beside torch's would be a second set of spinning threads).
 *
 * Workers wait for a new generation of work, spinning for SPIN_NS first (the next product of a layer
 * usually comes within tens of microseconds; at 0.2 ms SmolLM2's ~120 calls a token each waited for a
 * worker to wake) and then sleeping on a condition variable. Tasks are handed out by an atomic counter.
 */
#include "qdot.h"     /* first: Python.h sets the POSIX feature macros clock_gettime needs */

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#define SPIN_NS 2000000

static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake;
    pthread_mutex_t call;                    /* one job at a time: the pool has one job slot */
    int workers, active;                     /* started; taking part in the current job */
    atomic_uint gen;
    atomic_int next, done, left;             /* next task; tasks done; workers still in this job */
    int ntasks;
    void (*fn)(void *ctx, int task);
    void *ctx;
    pid_t pid;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_MUTEX_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void take_tasks(void) {
    int t;
    while ((t = atomic_fetch_add(&pool.next, 1)) < pool.ntasks) {
        pool.fn(pool.ctx, t);
        atomic_fetch_add(&pool.done, 1);
    }
}

static void *worker_main(void *arg) {
    int id = (int)((uintptr_t)arg & 255);
    unsigned seen = (unsigned)((uintptr_t)arg >> 8);     /* the generation before its first job */
    for (;;) {
        int64_t until = now_ns() + SPIN_NS;
        unsigned g;
        int spins = 0;
        while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen) {
#ifdef QDOT_X86
            _mm_pause();
#endif
            if (++spins % 256 == 0 && now_ns() > until) {
                pthread_mutex_lock(&pool.mu);
                while ((g = atomic_load(&pool.gen)) == seen) pthread_cond_wait(&pool.wake, &pool.mu);
                pthread_mutex_unlock(&pool.mu);
                break;
            }
        }
        seen = g;
        if (id < pool.active) {
            take_tasks();
            atomic_fetch_sub_explicit(&pool.left, 1, memory_order_release);
        }
    }
    return NULL;
}

static int ensure_workers(int n) {
    if (pool.pid != getpid()) {              /* a forked child has none of its parent's threads */
        pool.workers = 0;
        pool.pid = getpid();
    }
    while (pool.workers < n) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int err = pthread_create(&th, &attr, worker_main,
                                 (void *)((uintptr_t)atomic_load(&pool.gen) << 8 | (uintptr_t)pool.workers));
        pthread_attr_destroy(&attr);
        if (err) return -1;
        pool.workers++;
    }
    return 0;
}

void qdot_parallel(void (*fn)(void *ctx, int task), void *ctx, int ntasks, int threads) {
    if (ntasks < 1) return;
    threads = threads < 1 ? 1 : threads > QDOT_MAX_THREADS ? QDOT_MAX_THREADS : threads;
    pthread_mutex_lock(&pool.call);
    int helpers = threads - 1 < ntasks - 1 ? threads - 1 : ntasks - 1;
    if (helpers > 0 && ensure_workers(helpers) != 0) helpers = 0;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.ntasks = ntasks;
    pool.active = helpers > 0 ? helpers : 0;
    atomic_store(&pool.next, 0);
    atomic_store(&pool.done, 0);
    atomic_store(&pool.left, pool.active);
    if (pool.active) {
        pthread_mutex_lock(&pool.mu);
        atomic_fetch_add_explicit(&pool.gen, 1, memory_order_release);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.mu);
    }
    take_tasks();
    /* until every task is done and every worker is out of take_tasks: none may touch the next job's counters */
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < ntasks ||
           atomic_load_explicit(&pool.left, memory_order_acquire) > 0) {
#ifdef QDOT_X86
        _mm_pause();
#endif
    }
    pthread_mutex_unlock(&pool.call);
}
