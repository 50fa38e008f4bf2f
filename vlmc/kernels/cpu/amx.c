/* vlmc CPU kernels: whether the AMX tile kernels (gemv.c's amx panels) may run.
 *
 * Compiling them in (VLMC_AMX: -march=native on an AMX CPU) is not enough: the OS must
 * enable the tile state in XCR0, and Linux gives a process the (8 KiB) tile data only after
 * it asks, once, with arch_prctl(ARCH_REQ_XCOMP_PERM); a thread touching the tiles without
 * that permission dies of SIGILL. So the kernels run only after all three checks passed,
 * made once per process before the first job that could use them, and never where
 * VLMC_CPU_AMX is 0 (the VNNI kernels then compute the same bits). */
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

static int env_off(void) {
    const char *v = getenv("VLMC_CPU_AMX");
    if (!v) return 0;
    return !strcmp(v, "0") || !strcasecmp(v, "false") || !strcasecmp(v, "no") || !strcasecmp(v, "off");
}

static int detect(void) {
    unsigned a, b, c, d;
    if (env_off()) return 0;
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
static _Atomic int wanted = 1;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static void detect_once(void) { available = detect(); }

/* called by a job's caller before its threads start (so the permission precedes any tile use) */
int amx_on(void) {
    pthread_once(&once, detect_once);
    return available && atomic_load_explicit(&wanted, memory_order_relaxed);
}

int vlmc_amx(void) { return amx_on(); }

int vlmc_set_amx(int on) {
    atomic_store(&wanted, on != 0);
    return amx_on();
}
