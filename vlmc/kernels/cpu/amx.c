/* vlmc CPU kernels: whether the AMX tile kernels (gemv.c's amx panels) run, and for which
 * jobs.
 *
 * Compiling them in (VLMC_AMX: -march=native on an AMX CPU) is not enough: the OS must
 * enable the tile state in XCR0, and Linux gives a process the (8 KiB) tile data only after
 * it asks, once, with arch_prctl(ARCH_REQ_XCOMP_PERM); a thread touching the tiles without
 * that permission dies of SIGILL. So the kernels run only after all three checks passed,
 * made once per process before the first job that could use them.
 *
 * Modes (VLMC_CPU_AMX, read once; vlmc_set_amx): 0 never; 1 (the default) the jobs where
 * they measured faster than the VNNI kernels (benchmarks/README.md): 8-bit codes from 5 x
 * rows, 4-bit codes from 9; 2 every job of 2 or more x rows (tests, A/B runs). Each mode
 * gives the same output bits: the AMX kernels compute exactly what the VNNI ones do. */
#include "vlmc.h"

#include <pthread.h>
#include <strings.h>

#if VLMC_AMX
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int detect(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!(d & (1u << 24)) || !(d & (1u << 25))) return 0; /* AMX-TILE, AMX-INT8 */
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0; /* OSXSAVE */
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return 0; /* XTILECFG, XTILEDATA enabled by the OS */
    /* process-wide; fails e.g. on kernels before 5.16 or where a thread's signal stack is
     * too small for the larger signal frame */
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return 0;
    unsigned long perm = 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &perm) != 0) return 0;
    return (perm >> XFEATURE_XTILEDATA) & 1;
}
#else
static int detect(void) { return 0; }
#endif

static int available = 0;
static _Atomic int mode = -1; /* -1: VLMC_CPU_AMX not read yet */
static pthread_once_t once = PTHREAD_ONCE_INIT;
static void detect_once(void) { available = detect(); }

static int env_mode(void) {
    const char *v = getenv("VLMC_CPU_AMX");
    if (!v || !*v) return 1;
    if (!strcmp(v, "2") || !strcasecmp(v, "all")) return 2;
    if (!strcmp(v, "0") || !strcasecmp(v, "false") || !strcasecmp(v, "no") || !strcasecmp(v, "off")) return 0;
    return 1;
}

/* the mode in effect, 0 where the tiles are unavailable; detection (and the permission
 * request) happens at the first call with a mode above 0, by a job's caller before its
 * threads start, so the permission precedes any tile use */
int amx_mode(void) {
    int m = atomic_load_explicit(&mode, memory_order_relaxed);
    if (m < 0) {
        int want = env_mode(), unset = -1;
        atomic_compare_exchange_strong(&mode, &unset, want);
        m = atomic_load(&mode);
    }
    if (m == 0) return 0;
    pthread_once(&once, detect_once);
    return available ? m : 0;
}

int vlmc_amx(void) { return amx_mode(); }

int vlmc_set_amx(int m) {
    atomic_store(&mode, m < 0 ? 0 : m > 2 ? 2 : m);
    return amx_mode();
}
