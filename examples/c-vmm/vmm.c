/*
 * A small C VMM using kvm-dirty-shim, built only with
 *     cc vmm.c $(pkg-config --cflags --libs kvm_dirty_shim) -lpthread
 * It creates a VM itself, adopts it, enables the dirty ring, runs the test
 * guest (guest/guest.bin: stores to pseudo-random pages, `out` per round) on
 * its own vCPU thread, handles KVM_EXIT_DIRTY_RING_FULL, flushes through a
 * kick callback that really signals the vCPU thread out of KVM_RUN, and
 * prints what it tracked.   Usage: vmm [guest.bin] [seconds]
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "kvm_dirty_shim.h"

#ifndef KVM_EXIT_DIRTY_RING_FULL
#define KVM_EXIT_DIRTY_RING_FULL 31
#endif
#define PAGE 4096ull
#define PAGES 4096ull                 /* 16 MiB test slot */
#define TEST_GPA 0x100000ull
#define MAILBOX 0x1000ull

static int kvm, vmfd, vcpufd;
static KdsVm *vm;
static uint8_t *code, *mem;
static struct kvm_run *run;
static pthread_t vcpu_thread;
static atomic_int stop;
static atomic_uint kick_seq, kick_ack;
static atomic_ulong rounds, ring_full_exits;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t acked = PTHREAD_COND_INITIALIZER;

static void fail(const char *what)
{
    fprintf(stderr, "vmm: %s: %s (%s)\n", what, strerror(errno), kds_last_error());
    exit(1);
}

static void on_sigusr1(int sig) { (void)sig; }

/* The kick: force the vCPU out of guest mode and wait until it is out. */
static void kick_all(void *opaque)
{
    (void)opaque;
    unsigned seq = atomic_fetch_add(&kick_seq, 1) + 1;
    pthread_mutex_lock(&lock);
    while (atomic_load(&kick_ack) < seq) {
        run->immediate_exit = 1;
        pthread_kill(vcpu_thread, SIGUSR1);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 10 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000) { ts.tv_sec++; ts.tv_nsec -= 1000000000; }
        pthread_cond_timedwait(&acked, &lock, &ts);
    }
    pthread_mutex_unlock(&lock);
}

static void ack_kicks(void)
{
    pthread_mutex_lock(&lock);
    run->immediate_exit = 0;
    atomic_store(&kick_ack, atomic_load(&kick_seq));
    pthread_cond_broadcast(&acked);
    pthread_mutex_unlock(&lock);
}

static void *vcpu_main(void *arg)
{
    (void)arg;
    uint32_t it = 1;
    while (!atomic_load(&stop)) {
        if (ioctl(vcpufd, KVM_RUN, 0) < 0) {
            if (errno != EINTR) {
                fail("KVM_RUN");
            }
            ack_kicks(); /* out of guest mode because of a kick */
            continue;
        }
        if (atomic_load(&kick_seq) != atomic_load(&kick_ack)) {
            ack_kicks(); /* out of guest mode anyway: a kick is satisfied */
        }
        switch (run->exit_reason) {
        case KVM_EXIT_IO: /* end of a guest round: start the next one */
            atomic_fetch_add(&rounds, 1);
            __atomic_store_n((uint32_t *)(code + MAILBOX), ++it, __ATOMIC_RELAXED);
            break;
        case KVM_EXIT_DIRTY_RING_FULL:
            atomic_fetch_add(&ring_full_exits, 1);
            if (kds_vcpu_reap(vm, 0) < 0) {
                fprintf(stderr, "vmm: kds_vcpu_reap: %s\n", kds_last_error());
                atomic_store(&stop, 1);
            }
            break;
        default:
            fprintf(stderr, "vmm: unexpected exit %u\n", run->exit_reason);
            exit(1);
        }
    }
    ack_kicks();
    return NULL;
}

static void setup_vcpu(void)
{
    struct kvm_sregs s;
    if (ioctl(vcpufd, KVM_GET_SREGS, &s) < 0) fail("KVM_GET_SREGS");
    struct kvm_segment seg = { .limit = 0xffffffff, .g = 1, .db = 1, .present = 1,
                               .s = 1, .type = 0xb, .selector = 8 };
    s.cs = seg;
    seg.type = 3;
    seg.selector = 0x10;
    s.ds = s.es = s.ss = s.fs = s.gs = seg;
    s.cr0 |= 1;
    if (ioctl(vcpufd, KVM_SET_SREGS, &s) < 0) fail("KVM_SET_SREGS");
    struct kvm_regs r = { .rip = 0, .rflags = 2, .rsi = MAILBOX, .rsp = 8 * PAGE };
    if (ioctl(vcpufd, KVM_SET_REGS, &r) < 0) fail("KVM_SET_REGS");
    uint32_t mb[6] = { 1, 2000, 1, PAGES - 1, TEST_GPA, 12 }; /* see guest.S */
    memcpy(code + MAILBOX, mb, sizeof(mb));
}

int main(int argc, char **argv)
{
    const char *guest = argc > 1 ? argv[1] : "guest/guest.bin";
    int seconds = argc > 2 ? atoi(argv[2]) : 2;

    kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0 || (vmfd = ioctl(kvm, KVM_CREATE_VM, 0)) < 0) fail("KVM_CREATE_VM");
    if (kds_vm_adopt(vmfd, &vm) < 0) fail("kds_vm_adopt");
    if (kds_dirty_ring_enable(vm, 4096) < 0) fail("kds_dirty_ring_enable");
    if (kds_board_init(vm, 0) < 0) fail("kds_board_init"); /* no ITS on this board */

    code = mmap(NULL, 8 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    mem = mmap(NULL, PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    FILE *f = fopen(guest, "rb");
    if (!f || fread(code, 1, PAGE, f) == 0) fail(guest);
    fclose(f);
    KdsMemslot m0 = { 0, 0, 0, 8 * PAGE, (uintptr_t)code };
    KdsMemslot m1 = { 1, KDS_MEM_LOG_DIRTY_PAGES, TEST_GPA, PAGES * PAGE, (uintptr_t)mem };
    if (kds_memslot_update(vm, &m0, sizeof(KdsMemslot)) < 0 || kds_memslot_update(vm, &m1, sizeof(KdsMemslot)) < 0) fail("kds_memslot_set");

    if ((vcpufd = ioctl(vmfd, KVM_CREATE_VCPU, 0)) < 0) fail("KVM_CREATE_VCPU");
    if (kds_vcpu_add(vm, vcpufd, 0) < 0) fail("kds_vcpu_add");
    run = mmap(NULL, (size_t)ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0), PROT_READ | PROT_WRITE,
               MAP_SHARED, vcpufd, 0);
    if (run == MAP_FAILED) fail("mmap kvm_run");
    setup_vcpu();

    struct sigaction sa = { .sa_handler = on_sigusr1 }; /* no SA_RESTART */
    sigaction(SIGUSR1, &sa, NULL);
    kds_kick_set(vm, kick_all, NULL);
    pthread_create(&vcpu_thread, NULL, vcpu_main, NULL);

    static uint64_t seen[PAGES / 64], bm[PAGES / 64];
    uint64_t reported = 0;
    for (int period = 0; period < seconds * 5; period++) {
        usleep(200 * 1000);
        int64_t flushed = kds_flush(vm);        /* kick + reap */
        memset(bm, 0, sizeof(bm));
        int64_t n = kds_memslot_sync(vm, 1, bm, PAGES, 0);
        if (flushed < 0 || n < 0) fail("kds_flush/kds_memslot_sync");
        for (size_t i = 0; i < PAGES / 64; i++) seen[i] |= bm[i];
        reported += (uint64_t)n;
        printf("t=%.1fs: flush harvested %lld entries, sync reported %lld pages, "
               "%lu guest rounds, %lu ring-full exits\n", (period + 1) * 0.2,
               (long long)flushed, (long long)n, atomic_load(&rounds),
               atomic_load(&ring_full_exits));
    }
    atomic_store(&stop, 1);
    kick_all(NULL);
    pthread_join(vcpu_thread, NULL);
    memset(bm, 0, sizeof(bm));
    int64_t n = kds_memslot_sync(vm, 1, bm, PAGES, KDS_SYNC_FINAL); /* vCPU stopped */
    if (n < 0) fail("final kds_memslot_sync");
    reported += (uint64_t)n;
    uint64_t written = 0, missed = 0;
    for (uint64_t p = 0; p < PAGES; p++) {
        seen[p / 64] |= bm[p / 64];
        if (*(volatile uint32_t *)(mem + p * PAGE) != 0) {
            written++;
            missed += !(seen[p / 64] >> (p % 64) & 1);
        }
    }
    KdsStats s;
    KdsVcpuStats vs;
    kds_stats_get(vm, &s, sizeof(KdsStats));
    kds_vcpu_stats_get(vm, 0, &vs, sizeof(KdsVcpuStats));
    printf("tracked: %llu page reports; %llu pages ever written, %llu never reported; "
           "%llu ring entries (%llu from vCPU 0), %llu resets, %llu ring-full reaps, "
           "%llu overflows\n", (unsigned long long)reported, (unsigned long long)written,
           (unsigned long long)missed, (unsigned long long)s.entries_reaped,
           (unsigned long long)vs.entries_reaped, (unsigned long long)s.ring_resets,
           (unsigned long long)s.ring_full_reaps, (unsigned long long)s.ring_overflows);
    kds_vm_free(vm);
    return missed == 0 && written > 0 ? 0 : 1;
}
