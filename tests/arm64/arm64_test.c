/*
 * kvm-dirty-shim on a real arm64 KVM host (emulated by tests/arm64/run),
 * through the public C header only. Runs as /init: mounts devtmpfs, runs the
 * checks the kernel allows, prints "PASS name" / "FAIL name" lines and a
 * last line "N passed, M failed", then powers off.
 *
 * On a kernel with the dirty ring (6.12, 7.2): ACQ_REL picked, the ITS hook
 * before and after memslots, the ring after a memslot, the vGIC ITS saving its
 * tables into a dirty-logged slot with no vCPU running (only the backup
 * bitmap, at KDS_SYNC_FINAL, may report those pages, and exactly those), a
 * real arm64 vCPU dirtying pages with zero loss, ring-full exits included,
 * and the reset under signals (interrupted_reset()). On a kernel without it
 * (6.1): the ring is -ENOTSUP and bitmap mode tracks the same guest with zero
 * loss.
 */
#include "kds_check.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
#define KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP 225 /* Debian 12's headers are 6.1 */
#endif
#ifndef KVM_EXIT_DIRTY_RING_FULL
#define KVM_EXIT_DIRTY_RING_FULL 31
#endif
#define RAM_BASE 0x40000000ull
#define TEST_GPA (RAM_BASE + 0x100000ull)
#define CODE_PAGES 4
#define RING 4096u
#define GITS_BASER0 0x100
#define GITS_BASER1 0x108

extern const uint8_t guest_arm64_start[], guest_arm64_end[];

static int kvm_fd, passed, failed;
static uint64_t page;

static void result(const char *name, int failures_before)
{
    if (kds_test_failures == failures_before) {
        printf("PASS %s\n", name);
        passed++;
    } else {
        printf("FAIL %s\n", name);
        failed++;
    }
    fflush(stdout);
}

/* log records, to see which ring capability the shim picked */
static char ring_info[512]; /* the info line that names the ring's capability */
static void logger(int level, const char *msg, void *opaque)
{
    (void)opaque;
    if (level <= 3 && strstr(msg, "dirty ring enabled")) {
        snprintf(ring_info, sizeof(ring_info), "%s", msg);
    }
}

struct avm {
    int fd;
    KdsVm *vm;
    uint8_t *code;
};

static void avm_init(struct avm *a, int ring, uint32_t board)
{
    a->fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
    if (a->fd < 0) {
        die("KVM_CREATE_VM");
    }
    if (kds_vm_adopt(a->fd, &a->vm) != 0) {
        die("kds_vm_adopt");
    }
    if (ring && kds_dirty_ring_enable(a->vm, RING) != 0) {
        die("kds_dirty_ring_enable");
    }
    if (board != UINT32_MAX && kds_board_init(a->vm, board) != 0) {
        die("kds_board_init");
    }
    a->code = map_anon(CODE_PAGES * page);
    memcpy(a->code, guest_arm64_start, (size_t)(guest_arm64_end - guest_arm64_start));
    KdsMemslot m = { 0, 0, RAM_BASE, CODE_PAGES * page, (uint64_t)(uintptr_t)a->code };
    if (kds_memslot_update(a->vm, &m, sizeof(KdsMemslot)) != 0) {
        die("kds_memslot_set code");
    }
}

static void avm_free(struct avm *a)
{
    kds_vm_free(a->vm);
    munmap(a->code, CODE_PAGES * page);
    close(a->fd);
}

static void set_slot(struct avm *a, uint32_t slot, uint64_t gpa, void *mem, uint64_t size)
{
    KdsMemslot m = { slot, KDS_MEM_LOG_DIRTY_PAGES, gpa, size, (uint64_t)(uintptr_t)mem };
    if (kds_memslot_update(a->vm, &m, sizeof(KdsMemslot)) != 0) {
        die("kds_memslot_set");
    }
}

static int set_core_reg(int vcpu, uint64_t off, uint64_t v)
{
    struct kvm_one_reg r = {
        .id = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (off / sizeof(uint32_t)),
        .addr = (uint64_t)(uintptr_t)&v,
    };
    return ioctl(vcpu, KVM_SET_ONE_REG, &r);
}

struct avcpu {
    int fd;
    struct kvm_run *run;
};

static void avcpu_init(struct avm *a, struct avcpu *v)
{
    v->fd = ioctl(a->fd, KVM_CREATE_VCPU, 0);
    struct kvm_vcpu_init init;
    if (v->fd < 0 || ioctl(a->fd, KVM_ARM_PREFERRED_TARGET, &init) < 0 ||
        ioctl(v->fd, KVM_ARM_VCPU_INIT, &init) < 0) {
        die("vCPU create/init");
    }
    if (kds_vcpu_add(a->vm, v->fd, 0) != 0) {
        die("kds_vcpu_add");
    }
    int sz = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    v->run = mmap(NULL, (size_t)sz, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
    if (v->run == MAP_FAILED) {
        die("mmap kvm_run");
    }
    if (set_core_reg(v->fd, offsetof(struct kvm_regs, regs.pc), RAM_BASE) < 0 ||
        set_core_reg(v->fd, offsetof(struct kvm_regs, regs.regs[0]), RAM_BASE + page) < 0) {
        die("KVM_SET_ONE_REG");
    }
}

static void mailbox(struct avm *a, uint64_t pages, uint32_t stores, uint32_t it)
{
    uint32_t shift = (uint32_t)__builtin_ctzll(page);
    uint32_t mb[6] = { it, stores, 1, (uint32_t)(pages - 1), (uint32_t)TEST_GPA, shift };
    if (it > 1) {
        mb[2] = ((uint32_t *)(a->code + page))[2]; /* the guest keeps its LCG state */
    }
    memcpy(a->code + page, mb, sizeof(mb));
}

/* One guest round; returns ring-full exits, -1 on a reported wedge. */
static long round_run(struct avm *a, struct avcpu *v)
{
    long full = 0;
    time_t end = time(NULL) + 120;
    while (time(NULL) < end) {
        if (ioctl(v->fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR) {
                continue;
            }
            die("KVM_RUN");
        }
        if (v->run->exit_reason == KVM_EXIT_MMIO) {
            return full;
        }
        if (v->run->exit_reason != KVM_EXIT_DIRTY_RING_FULL) {
            fprintf(stderr, "unexpected exit %u\n", v->run->exit_reason);
            die("KVM_RUN exit");
        }
        full++;
        int64_t n = kds_vcpu_reap(a->vm, 0);
        if (n == -EOVERFLOW) {
            return -1;
        }
        if (n < 0) {
            die("kds_vcpu_reap");
        }
    }
    die("guest round over 120 s");
    return -1;
}

/* The guest dirties `pages` pages `rounds` times; loss must be 0. */
/*
 * Guest memory backed by transparent huge pages, as QEMU's guest RAM is
 * (MADV_HUGEPAGE, 2 MiB aligned). arm64 logs a memslot's writes page by page
 * only when the memslot has a dirty bitmap (memslot_is_logging() in
 * arch/arm64/kvm/mmu.c); a ring-only slot here is mapped in 2 MiB blocks and
 * loses almost every write, which is why the shim always adds the backup
 * bitmap to the ring on arm64.
 */
static void *map_thp(size_t len)
{
    /* A block mapping needs the host address and the guest address
     * congruent modulo 2 MiB: start at TEST_GPA's offset in a 2 MiB block. */
    const size_t huge = 2 << 20;
    uint8_t *p = map_anon(len + 2 * huge);
    uint8_t *a = (uint8_t *)(((uintptr_t)p + huge - 1) & ~(uintptr_t)(huge - 1));
    a += TEST_GPA & (huge - 1);
    if (madvise(a, len, MADV_HUGEPAGE) != 0) {
        printf("  (madvise(MADV_HUGEPAGE): %s)\n", strerror(errno));
    }
    /* The head and tail slack stay mapped until the process exits. */
    return a;
}

static void track(const char *name, int ring, uint64_t pages, uint32_t stores, int rounds,
                  int want_full, int thp)
{
    int before = kds_test_failures;
    struct avm a;
    struct avcpu v;
    struct checker c;
    avm_init(&a, ring, 0);
    checker_init(&c, 1, pages, page);
    if (thp) {
        munmap(c.mem, pages * page);
        c.mem = map_thp(pages * page);
    }
    set_slot(&a, 1, TEST_GPA, c.mem, pages * page);
    avcpu_init(&a, &v);
    long full = 0, r = 0;
    for (int it = 1; it <= rounds && r >= 0; it++) {
        mailbox(&a, pages, stores, (uint32_t)it);
        r = round_run(&a, &v);
        full += r > 0 ? r : 0;
        uint64_t lost = checker_check(&c, a.vm, 0);
        CHECK(lost == 0, "%s round %d: %llu lost", name, it, (unsigned long long)lost);
    }
    KdsStats s;
    kds_stats_get(a.vm, &s, sizeof(KdsStats));
    CHECK(c.changed >= stores, "the guest dirtied pages (%llu)", (unsigned long long)c.changed);
    /* On arm64 the ring always comes with the backup bitmap. */
    CHECK(kds_vm_mode(a.vm) == (ring ? KDS_MODE_RING_WITH_BITMAP : KDS_MODE_BITMAP), "mode %d",
          kds_vm_mode(a.vm));
    if (want_full) {
        CHECK(full > 0 && s.ring_full_reaps > 0, "a ring-full exit reaped by kds_vcpu_reap");
    }
    printf("  %s: %llu pages changed, %llu reported, %llu lost, %ld ring-full exits, "
           "%llu overflows, %llu wedges\n", name, (unsigned long long)c.changed,
           (unsigned long long)c.reported, (unsigned long long)c.lost, full,
           (unsigned long long)s.ring_overflows, (unsigned long long)s.ring_wedges);
    checker_free(&c);
    avm_free(&a);
    result(name, before);
}

/*
 * KVM_RESET_DIRTY_RINGS under signals. Since Linux 6.17 the reset stops
 * when a signal is pending and returns the count so far; the batch it was
 * building (up to 64 pages) is marked reset but left write-enabled, so a
 * later write to those pages makes no ring entry. The library blocks
 * signals around the ioctl. Here a thread reaps (kds_reap) in a loop while
 * another sends it SIGUSR2 (a handler that does nothing, no SA_RESTART, as
 * a VMM's kick signal) as fast as it can, and the vCPU dirties pages round
 * after round; every round's changed pages must have been reported. Guest
 * stores fault at stage 2 here as on hardware, so a cut reset shows as
 * lost pages. Built against the test-only library without the blocking
 * (/init-unblocked), the same run shows what the blocking prevents.
 */
struct irq_ctx {
    struct avm *a;
    volatile int stop;
    volatile pid_t reaper;
    volatile uint64_t reaps, entries, signals;
    volatile int64_t err;
};

static void on_signal(int sig)
{
    (void)sig;
}

static void *reap_loop(void *p)
{
    struct irq_ctx *x = p;
    x->reaper = (pid_t)syscall(SYS_gettid);
    while (!x->stop) {
        /* A pause between reaps, so that each reset walks hundreds of
         * entries (a signal cut one short only while it walks). */
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        t.tv_nsec += 2000000;
        if (t.tv_nsec >= 1000000000) {
            t.tv_sec++;
            t.tv_nsec -= 1000000000;
        }
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR && !x->stop) {
        }
        int64_t n = kds_reap(x->a->vm);
        if (n < 0) {
            x->err = n;
            break;
        }
        x->reaps++;
        x->entries += (uint64_t)n;
    }
    return NULL;
}

static void *signal_loop(void *p)
{
    struct irq_ctx *x = p;
    while (!x->reaper && !x->stop) {
        sched_yield();
    }
    while (!x->stop) {
        syscall(SYS_tgkill, getpid(), x->reaper, SIGUSR2);
        x->signals++;
    }
    return NULL;
}

/* Returns the pages lost; with `assert_zero`, a PASS/FAIL line too. */
static uint64_t interrupted_reset(const char *name, int rounds, int assert_zero)
{
    int before = kds_test_failures;
    const uint64_t pages = 4096;
    const uint32_t stores = 3000;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR2, &sa, NULL) != 0) {
        die("sigaction");
    }
    struct avm a;
    struct avcpu v;
    struct checker c;
    avm_init(&a, 1, 0);
    checker_init(&c, 1, pages, page);
    set_slot(&a, 1, TEST_GPA, c.mem, pages * page);
    avcpu_init(&a, &v);
    struct irq_ctx x = { .a = &a };
    pthread_t reaper, sender;
    if (pthread_create(&reaper, NULL, reap_loop, &x) != 0 ||
        pthread_create(&sender, NULL, signal_loop, &x) != 0) {
        die("pthread_create");
    }
    uint64_t lost = 0;
    long full = 0, r = 0;
    int it;
    for (it = 1; it <= rounds && r >= 0; it++) {
        mailbox(&a, pages, stores, (uint32_t)it);
        r = round_run(&a, &v);
        full += r > 0 ? r : 0;
        lost += checker_check(&c, a.vm, 0);
    }
    x.stop = 1;
    pthread_join(sender, NULL);
    pthread_join(reaper, NULL);
    KdsStats s;
    kds_stats_get(a.vm, &s, sizeof(KdsStats));
    printf("  %s: %d rounds, %llu pages changed, %llu lost; %llu reaps of %llu entries, "
           "%llu signals, %ld ring-full exits, %llu entries a reset did not reach\n", name, it - 1,
           (unsigned long long)c.changed, (unsigned long long)lost,
           (unsigned long long)x.reaps, (unsigned long long)x.entries,
           (unsigned long long)x.signals, full, (unsigned long long)s.reset_shortfall);
    if (assert_zero) {
        CHECK(x.err == 0, "kds_reap: %lld", (long long)x.err);
        CHECK(r >= 0, "a ring reported wedged");
        CHECK(x.signals > 0 && x.reaps > 0, "signals reached a reaping thread");
        CHECK(lost == 0, "%llu pages lost", (unsigned long long)lost);
    }
    checker_free(&c);
    avm_free(&a);
    if (assert_zero) {
        result(name, before);
    }
    return lost;
}

/*
 * The same run with the test-only library (signals not blocked around the
 * reset), in a child process: what the library's blocking prevents. Not a
 * pass or fail: a cut reset is a race the run may or may not hit.
 */
static void interrupted_reset_unblocked(void)
{
    pid_t pid = fork();
    if (pid == 0) {
        execl("/init-unblocked", "/init-unblocked", "interrupted-reset", (char *)NULL);
        _exit(127);
    }
    int st = 0;
    if (pid < 0 || waitpid(pid, &st, 0) < 0) {
        printf("  (no unblocked run: %s)\n", strerror(errno));
        return;
    }
    if (!WIFEXITED(st) || WEXITSTATUS(st) > 1) {
        printf("  (the unblocked run ended with status %d)\n", st);
    }
}

static int dev_attr(int fd, int get, uint32_t group, uint64_t attr, void *addr)
{
    struct kvm_device_attr d = { .group = group, .attr = attr, .addr = (uint64_t)(uintptr_t)addr };
    return ioctl(fd, get ? KVM_GET_DEVICE_ATTR : KVM_SET_DEVICE_ATTR, &d) < 0 ? -errno : 0;
}

/* Points GITS_BASERn at `gpa` (one page, valid), keeping type and entry size. */
static int its_table(int its, uint64_t reg, uint64_t gpa)
{
    uint64_t v = 0;
    if (dev_attr(its, 1, KVM_DEV_ARM_VGIC_GRP_ITS_REGS, reg, &v) < 0) {
        return -1;
    }
    v = (1ull << 63) | (v & (0x7ull << 56)) | (v & (0x1full << 48)) | (gpa & 0xfffffffff000ull);
    return dev_attr(its, 0, KVM_DEV_ARM_VGIC_GRP_ITS_REGS, reg, &v);
}

/* The seed scenario: the ITS writes guest memory with no vCPU running. */
static void its_save_tables(void)
{
    int before = kds_test_failures;
    uint64_t pages = (16ull << 20) / page;
    struct avm a;
    struct avcpu v;
    struct checker c;
    avm_init(&a, 1, KDS_BOARD_VGIC_ITS);
    CHECK(kds_vm_mode(a.vm) == KDS_MODE_RING_WITH_BITMAP, "mode %d", kds_vm_mode(a.vm));
    checker_init(&c, 1, pages, page);
    set_slot(&a, 1, TEST_GPA, c.mem, pages * page);
    avcpu_init(&a, &v);

    struct kvm_create_device gic = { .type = KVM_DEV_TYPE_ARM_VGIC_V3 };
    struct kvm_create_device its = { .type = KVM_DEV_TYPE_ARM_VGIC_ITS };
    uint64_t dist = 0x08000000, redist = 0x080A0000, itsb = 0x08080000;
    CHECK(ioctl(a.fd, KVM_CREATE_DEVICE, &gic) == 0, "vGICv3");
    CHECK(dev_attr(gic.fd, 0, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V3_ADDR_TYPE_DIST, &dist) == 0, "dist");
    CHECK(dev_attr(gic.fd, 0, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V3_ADDR_TYPE_REDIST, &redist) == 0, "redist");
    CHECK(ioctl(a.fd, KVM_CREATE_DEVICE, &its) == 0, "ITS");
    CHECK(dev_attr(its.fd, 0, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_ITS_ADDR_TYPE, &itsb) == 0, "its addr");
    CHECK(dev_attr(gic.fd, 0, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_CTRL_INIT, NULL) == 0, "vgic init");
    CHECK(dev_attr(its.fd, 0, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_CTRL_INIT, NULL) == 0, "its init");
    /* Device table and collection table in the dirty-logged slot (64 KiB
     * apart, so they are on different pages with any page size). */
    uint64_t dt = 0x200000, ct = 0x210000;
    CHECK(its_table(its.fd, GITS_BASER0, TEST_GPA + dt) == 0, "GITS_BASER0");
    CHECK(its_table(its.fd, GITS_BASER1, TEST_GPA + ct) == 0, "GITS_BASER1");
    memset(c.mem, 0xAA, pages * page);
    for (uint64_t p = 0; p < pages; p++) {
        c.shadow[p] = *(uint32_t *)(c.mem + p * page);
    }
    CHECK(dev_attr(its.fd, 0, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_ITS_SAVE_TABLES, NULL) == 0,
          "KVM_DEV_ARM_ITS_SAVE_TABLES");

    /* What the ITS wrote, from the table memory itself. */
    uint64_t written = 0;
    for (uint64_t p = 0; p < pages; p++) {
        for (uint64_t off = 0; off < page; off += 4) {
            if (*(uint32_t *)(c.mem + p * page + off) != 0xAAAAAAAAu) {
                written++;
                c.shadow[p] = ~0u; /* force "changed" for the checker */
                break;
            }
        }
    }
    CHECK(written > 0, "the ITS wrote guest memory");
    CHECK(kds_reap(a.vm) == 0, "no ring entry for the ITS's writes");
    memset(c.bitmap, 0, (pages + 63) / 64 * 8);
    int64_t n = kds_memslot_sync(a.vm, 1, c.bitmap, pages, 0);
    CHECK(n == 0, "a sync without KDS_SYNC_FINAL leaves the backup bitmap alone (%lld)", (long long)n);
    /* Final sync: exactly the pages the ITS wrote. */
    memset(c.bitmap, 0, (pages + 63) / 64 * 8);
    n = kds_memslot_sync(a.vm, 1, c.bitmap, pages, KDS_SYNC_FINAL);
    uint64_t lost = 0, extra = 0;
    for (uint64_t p = 0; p < pages; p++) {
        int dirty = (c.bitmap[p / 64] >> (p % 64)) & 1;
        lost += c.shadow[p] == ~0u && !dirty;
        extra += c.shadow[p] != ~0u && dirty;
    }
    CHECK(n == (int64_t)written && lost == 0 && extra == 0,
          "final sync reported %lld pages, the ITS wrote %llu (lost %llu, extra %llu)",
          (long long)n, (unsigned long long)written, (unsigned long long)lost,
          (unsigned long long)extra);
    printf("  ITS: wrote %llu pages with no vCPU running; kds_memslot_sync(FINAL) reported %lld, "
           "lost %llu\n", (unsigned long long)written, (long long)n, (unsigned long long)lost);
    close(its.fd);
    close(gic.fd);
    checker_free(&c);
    avm_free(&a);
    result("its-save-tables-backup-bitmap", before);
}

static void ring_kernel(void)
{
    int before = kds_test_failures;
    struct avm a;
    /* The shim picks ACQ_REL (the plain ring is 0 on arm64). */
    kds_logger_set(logger, NULL, 3);
    ring_info[0] = 0;
    a.fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
    CHECK(kds_vm_adopt(a.fd, &a.vm) == 0, "adopt");
    CHECK(kds_dirty_ring_enable(a.vm, RING) == 0, "ring");
    CHECK(strstr(ring_info, "KVM_CAP_DIRTY_LOG_RING_ACQ_REL") != NULL, "picked: %s", ring_info);
    /* On arm64 the ring always comes with the backup bitmap. */
    CHECK(kds_vm_mode(a.vm) == KDS_MODE_RING_WITH_BITMAP, "mode %d", kds_vm_mode(a.vm));
    kds_logger_set(NULL, NULL, 0);
    /* The hook before any memslot: ring with bitmap. */
    CHECK(kds_board_init(a.vm, KDS_BOARD_VGIC_ITS) == 0, "board hook with ITS");
    CHECK(kds_vm_mode(a.vm) == KDS_MODE_RING_WITH_BITMAP, "mode %d", kds_vm_mode(a.vm));
    kds_vm_free(a.vm);
    close(a.fd);
    result("ring-acq-rel-and-its-hook", before);

    before = kds_test_failures;
    avm_init(&a, 1, UINT32_MAX); /* ring, then a memslot, no hook */
    /* The kernel alone would answer -EINVAL; -EBUSY is the shim's refusal. */
    CHECK(kds_board_init(a.vm, KDS_BOARD_VGIC_ITS) == -EBUSY, "ITS after memslot: %s", kds_last_error());
    CHECK(kds_vm_mode(a.vm) == KDS_MODE_RING_WITH_BITMAP, "mode stays ring with bitmap");
    avm_free(&a);
    avm_init(&a, 0, UINT32_MAX);
    CHECK(kds_dirty_ring_enable(a.vm, RING) == -EBUSY, "ring after memslot: %s", kds_last_error());
    avm_free(&a);
    result("refusals-after-memslot", before);

    its_save_tables();
    track("vcpu-ring", 1, 1024, 500, 4, 0, 0);
    track("vcpu-ring-full", 1, 16384, 8000, 3, 1, 0);
    track("vcpu-ring-thp", 1, 16384, 8000, 3, 0, 1);
    track("vcpu-bitmap", 0, 1024, 500, 4, 0, 0);
    track("vcpu-bitmap-thp", 0, 16384, 8000, 3, 0, 1);
    interrupted_reset("interrupted-reset", 12, 1);
    interrupted_reset_unblocked();
}

static void bitmap_kernel(void)
{
    int before = kds_test_failures;
    int fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
    KdsVm *vm;
    CHECK(kds_vm_adopt(fd, &vm) == 0, "adopt");
    /* No ring here, or a ring without cap 225, which arm64 cannot use
     * (see map_thp): bitmap mode either way. */
    int r = kds_dirty_ring_enable(vm, RING);
    CHECK(r == -ENOTSUP, "no ring here: %d (%s)", r, kds_last_error());
    CHECK(kds_board_init(vm, KDS_BOARD_VGIC_ITS) == 0, "ITS recorded in bitmap mode");
    CHECK(kds_vm_mode(vm) == KDS_MODE_BITMAP, "bitmap mode");
    kds_vm_free(vm);
    close(fd);
    result("no-ring-kernel-path", before);
    track("vcpu-bitmap", 0, 1024, 500, 4, 0, 0);
    track("vcpu-bitmap-thp", 0, 16384, 8000, 3, 0, 1);
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "interrupted-reset") == 0) {
        /* /init-unblocked, run by /init: /dev and /dev/kvm are there. */
        page = (uint64_t)sysconf(_SC_PAGESIZE);
        kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
        if (kvm_fd < 0) {
            die("open /dev/kvm");
        }
        uint64_t lost = interrupted_reset("interrupted-reset, signals not blocked (test-only "
                                          "library)", 12, 0);
        fflush(stdout);
        return lost ? 1 : 0;
    }
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    mkdir("/sys", 0755);
    mount("sysfs", "/sys", "sysfs", 0, NULL);
    struct utsname u;
    uname(&u);
    page = (uint64_t)sysconf(_SC_PAGESIZE);
    kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm_fd < 0) {
        die("open /dev/kvm");
    }
    int vm = ioctl(kvm_fd, KVM_CREATE_VM, 0);
    int c192 = ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING);
    int c223 = ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
    int c225 = ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP);
    close(vm);
    char thp[128] = "?";
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (f) {
        if (!fgets(thp, sizeof(thp), f)) {
            strcpy(thp, "?");
        }
        thp[strcspn(thp, "\n")] = 0;
        fclose(f);
    }
    printf("arm64 host: Linux %s, page size %llu, caps 192=%d 223=%d 225=%d, THP %s\n",
           u.release, (unsigned long long)page, c192, c223, c225, thp);
    if (c223 > 0 && c225 > 0) {
        ring_kernel();
    } else {
        bitmap_kernel();
    }
    printf("%d passed, %d failed\n", passed, failed);
    fflush(stdout);
    sync();
    reboot(RB_POWER_OFF);
    return 0;
}
