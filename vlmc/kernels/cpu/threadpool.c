/* vlmc CPU kernels: the thread pool every parallel kernel runs on. The calling thread
 * takes part 0 of a job and a small persistent pool of pthreads the others; workers spin
 * ~200 us for the next job (decode issues one GEMV after another), then sleep on a
 * condition variable. One job at a time: callers from several Python threads queue on
 * a lock. */
#include "vlmc.h"

#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

static struct {
    pthread_mutex_t job_mu; /* one job at a time (callers from several Python threads) */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int nworkers;
    pid_t pid;
    _Atomic unsigned gen;
    _Atomic int pending;
    task_fn fn;
    void *ctx;
    int nth;
    long spin_ns;
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0,
       0, 0, 0, 200000};

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static ALWAYS void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

typedef struct { int ith; unsigned gen0; } worker_arg;

static void *worker_main(void *argp) {
    worker_arg a = *(worker_arg *)argp;
    free(argp);
    unsigned seen = a.gen0;
    for (;;) {
        unsigned g = atomic_load_explicit(&P.gen, memory_order_acquire);
        if (g == seen) {
            long t0 = now_ns();
            for (int i = 0;; i++) {
                cpu_relax();
                g = atomic_load_explicit(&P.gen, memory_order_acquire);
                if (g != seen) break;
                if ((i & 63) == 63 && now_ns() - t0 > P.spin_ns) break;
            }
            if (g == seen) {
                pthread_mutex_lock(&P.mu);
                while ((g = atomic_load_explicit(&P.gen, memory_order_acquire)) == seen)
                    pthread_cond_wait(&P.cv, &P.mu);
                pthread_mutex_unlock(&P.mu);
            }
        }
        seen = g;
        if (a.ith < P.nth) P.fn(P.ctx, a.ith, P.nth);
        atomic_fetch_sub_explicit(&P.pending, 1, memory_order_release);
    }
    return NULL;
}

void vlmc_set_spin_us(int us) { P.spin_ns = (long)us * 1000; }

/* fork(): hold the job lock across it so the child never inherits it locked mid-job;
 * the child has no workers (threads do not survive fork) and starts new ones. */
static void atfork_prepare(void) { pthread_mutex_lock(&P.job_mu); }
static void atfork_parent(void) { pthread_mutex_unlock(&P.job_mu); }
static void atfork_child(void) {
    P.nworkers = 0;
    P.pid = getpid();
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.cv, NULL);
    pthread_mutex_init(&P.job_mu, NULL);
}
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void install_atfork(void) { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); }

void run_parallel(task_fn fn, void *ctx, int nth) {
    if (nth > MAXTH) nth = MAXTH;
    if (nth <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    pthread_once(&atfork_once, install_atfork);
    pthread_mutex_lock(&P.job_mu);
    if (P.pid != getpid()) { /* first use */
        P.pid = getpid();
        P.nworkers = 0;
    }
    while (P.nworkers < nth - 1) {
        worker_arg *a = malloc(sizeof *a);
        pthread_t t;
        if (!a) break;
        a->ith = P.nworkers + 1;
        a->gen0 = atomic_load(&P.gen);
        if (pthread_create(&t, NULL, worker_main, a) != 0) {
            free(a);
            break;
        }
        pthread_detach(t);
        P.nworkers++;
    }
    if (nth > P.nworkers + 1) nth = P.nworkers + 1;
    if (nth <= 1) {
        pthread_mutex_unlock(&P.job_mu);
        fn(ctx, 0, 1);
        return;
    }
    P.fn = fn;
    P.ctx = ctx;
    P.nth = nth;
    atomic_store_explicit(&P.pending, P.nworkers, memory_order_relaxed);
    pthread_mutex_lock(&P.mu);
    atomic_fetch_add_explicit(&P.gen, 1, memory_order_release);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    fn(ctx, 0, nth);
    for (int i = 0; atomic_load_explicit(&P.pending, memory_order_acquire) != 0; i++) {
        if (i < 20000) cpu_relax();
        else sched_yield();
    }
    pthread_mutex_unlock(&P.job_mu);
}
