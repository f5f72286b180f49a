/*
 * The Linux guest's workload, its /init (tools/linux-guest/initramfs.py):
 * the user-mode counterpart of guest/mp-guest.S. On this host KVM emulates
 * a guest's kernel code (each CPL0 store goes through the emulator and
 * pushes a ring entry of its own) but runs user code natively, so these
 * stores dirty pages as they would on a hardware host.
 *
 * One thread per online CPU, each pinned to its CPU. The region is most of
 * the guest's RAM (all but KDS_RESERVE_MIB, 96 MiB by default: the kernel
 * and the page tables), filled once; then every thread, without pausing,
 * picks a pseudo-random page of it (an LCG) and writes one 64-bit word at
 * offset cpu * 8: the low half is the thread's store count, the high half
 * its CPU number (a stale page on the destination tells whose store it
 * missed). Every 2^KDS_BEAT_SHIFT stores (2^20 by default) a thread
 * prints "beat <cpu> <count>" on the console, the same line as
 * mp-guest.S's, which tests/qemu-migration.py reads.
 *
 * Settings come from the kernel command line (the kernel hands unknown
 * key=value words to init as its environment): KDS_RESERVE_MIB,
 * KDS_BEAT_SHIFT. Built static (no libc in the initramfs):
 *     gcc -O2 -static -pthread -o init guest/linux-writer.c
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#define PAGE 4096UL

static uint8_t *region;
static uint64_t region_pages;
static unsigned beat_shift = 20;
static pthread_mutex_t print_lock = PTHREAD_MUTEX_INITIALIZER;

static unsigned long env_ul(const char *name, unsigned long dflt)
{
    const char *v = getenv(name);

    return v && *v ? strtoul(v, NULL, 0) : dflt;
}

static void beat(unsigned cpu, uint32_t count)
{
    char line[48];
    int n = snprintf(line, sizeof(line), "beat %u %u\n", cpu, count);

    pthread_mutex_lock(&print_lock);
    if (write(1, line, n) < 0) {
        /* nothing to do: the host sees no beat */
    }
    pthread_mutex_unlock(&print_lock);
}

static void *writer(void *arg)
{
    unsigned cpu = (unsigned)(uintptr_t)arg;
    uint32_t state = (cpu + 1) * 0x9e3779b9u;
    uint32_t count = 0;
    uint32_t mask = (1u << beat_shift) - 1;
    cpu_set_t set;

    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof(set), &set);
    for (;;) {
        uint64_t page;
        volatile uint64_t *word;

        state = state * 1664525u + 1013904223u;
        page = ((uint64_t)state * region_pages) >> 32;
        word = (volatile uint64_t *)(region + page * PAGE + cpu * 8);
        count++;
        *word = ((uint64_t)cpu << 32) | count;
        if (!(count & mask)) {
            beat(cpu, count);
        }
    }
    return NULL;
}

int main(void)
{
    struct sysinfo si;
    cpu_set_t online;
    unsigned long reserve = env_ul("KDS_RESERVE_MIB", 96) << 20;
    unsigned ncpus, cpu;
    uint64_t bytes;

    beat_shift = env_ul("KDS_BEAT_SHIFT", 20);
    if (beat_shift < 8 || beat_shift > 31) {
        beat_shift = 20;
    }
    sysinfo(&si);
    bytes = (uint64_t)si.totalram * si.mem_unit;
    bytes = bytes > reserve + 64 * PAGE ? bytes - reserve : 64 * PAGE;
    region_pages = bytes / PAGE;
    region = mmap(NULL, region_pages * PAGE, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (region == MAP_FAILED) {
        perror("kds writer: mmap");
        for (;;) {
            pause();
        }
    }
    CPU_ZERO(&online);
    sched_getaffinity(0, sizeof(online), &online);
    ncpus = CPU_COUNT(&online);
    printf("kds writer: %u CPUs, region %llu pages (%llu MiB)\n", ncpus,
           (unsigned long long)region_pages,
           (unsigned long long)(region_pages * PAGE >> 20));
    fflush(stdout);
    /* Fill: every page holds data before the random stores begin. */
    for (uint64_t p = 0; p < region_pages; p++) {
        memset(region + p * PAGE, 0, 8 * ncpus);
        region[p * PAGE + 8 * ncpus] = 1;
    }
    printf("kds writer: filled\n");
    fflush(stdout);
    for (cpu = 1; cpu < ncpus; cpu++) {
        pthread_t t;

        pthread_create(&t, NULL, writer, (void *)(uintptr_t)cpu);
    }
    writer((void *)0);
    return 0;
}
