/* vlmc CPU kernels: the thread pool every parallel kernel runs on. The calling thread
 * takes part 0 of a job and a small persistent pool of pthreads the others; workers spin
 * ~200 us for the next job (decode issues one GEMV after another), then sleep on a
 * condition variable. One job at a time: callers from several Python threads queue on
 * a lock.
 *
 * Parts are claimed, not assigned: part i is open for job generation g (claim[i] = 2g)
 * until its worker or the caller turns it to 2g + 1, and whoever does runs it. The caller,
 * done with part 0, claims and runs every part whose worker has not started, and then
 * waits only for the parts workers are running. On a loaded machine a worker descheduled
 * for a time slice so delays nothing (the caller did its part), where waiting for it cost
 * milliseconds per call. A part's work does not depend on the thread that runs it (the
 * kernels partition by part index or take chunks from a shared counter), so the results
 * are the same bits whichever thread ran which part. */
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
    _Atomic int active;                /* workers between their claim attempt and the end of their part */
    _Atomic uint64_t claim[MAXTH];     /* part i of job generation g: 2g open, 2g + 1 taken */
    task_fn fn;
    void *ctx;
    int nth;
    long spin_ns;
    _Atomic uint64_t job; /* the current job's generation (64 bits: never wraps) */
} P = {.job_mu = PTHREAD_MUTEX_INITIALIZER, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER,
       .spin_ns = 200000};

/* part i of job g, if still open: take it (exactly one thread succeeds) */
static int take_part(int i, uint64_t g) {
    uint64_t open = 2 * g;
    return atomic_compare_exchange_strong(&P.claim[i], &open, 2 * g + 1);
}

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
        /* counted active before the claim, so the caller cannot finish the job between a
         * successful claim and the part's run; a stale generation finds its part taken */
        atomic_fetch_add(&P.active, 1);
        if (take_part(a.ith, atomic_load(&P.job))) P.fn(P.ctx, a.ith, P.nth);
        atomic_fetch_sub_explicit(&P.active, 1, memory_order_release);
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
    atomic_store(&P.active, 0); /* a worker caught between claim steps did not come along */
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
    const uint64_t g = atomic_load(&P.job) + 1;
    atomic_store(&P.job, g);
    for (int i = 1; i < nth; i++) atomic_store(&P.claim[i], 2 * g);
    pthread_mutex_lock(&P.mu);
    atomic_fetch_add_explicit(&P.gen, 1, memory_order_release);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    fn(ctx, 0, nth);
    for (int i = 1; i < nth; i++) /* the parts no worker has started */
        if (take_part(i, g)) fn(ctx, i, nth);
    for (int i = 0; atomic_load_explicit(&P.active, memory_order_acquire) != 0; i++) {
        if (i < 20000) cpu_relax();
        else sched_yield();
    }
    pthread_mutex_unlock(&P.job_mu);
}
