/*
 * kvm-dirty-shim on a real KVM host of another architecture, arm64 or
 * riscv64 (emulated by tests/kvm-host/run), through the public C header
 * only. Runs as /init: mounts devtmpfs, loads kvm.ko where the kernel has
 * KVM as a module (/kvm.ko in the initramfs), runs the checks the kernel
 * allows, prints "PASS name" / "FAIL name" lines and a last line
 * "N passed, M failed", then powers off.
 *
 * arm64, on a kernel with the dirty ring (6.12, 7.2): ACQ_REL picked, the
 * ITS hook before and after memslots, the ring after a memslot, the vGIC ITS
 * saving its tables into a dirty-logged slot with no vCPU running (only the
 * backup bitmap, at KDS_SYNC_FINAL, may report those pages, and exactly
 * those), a real arm64 vCPU dirtying pages with zero loss, ring-full exits
 * and transparent huge pages included, and the reset under signals
 * (interrupted_reset()). On a kernel without it (6.1): the ring is -ENOTSUP
 * and bitmap mode tracks the same guest with zero loss.
 *
 * riscv64 (7.2: the ring since 6.17, ACQ_REL only, no backup bitmap): the
 * same vCPU checks in bitmap mode and where the ring is allowed, guest
 * memory in hugetlbfs and transparent huge pages among them (riscv_rule()).
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
#if defined(__aarch64__)
/* On arm64 the ring always comes with the backup bitmap. */
#define RING_MODE KDS_MODE_RING_WITH_BITMAP
#define ARCH "arm64"
#elif defined(__riscv)
#define RING_MODE KDS_MODE_RING
#define ARCH "riscv64"
#else
#error "tests/kvm-host runs on arm64 and riscv64"
#endif
#define GITS_BASER0 0x100
#define GITS_BASER1 0x108

extern const uint8_t guest_start[], guest_end[];

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
    memcpy(a->code, guest_start, (size_t)(guest_end - guest_start));
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

static void set_slot_flags(struct avm *a, uint32_t slot, uint64_t gpa, void *mem, uint64_t size,
                           uint32_t flags)
{
    KdsMemslot m = { slot, flags, gpa, size, (uint64_t)(uintptr_t)mem };
    if (kds_memslot_update(a->vm, &m, sizeof(KdsMemslot)) != 0) {
        die("kds_memslot_update");
    }
}

static void set_slot(struct avm *a, uint32_t slot, uint64_t gpa, void *mem, uint64_t size)
{
    KdsMemslot m = { slot, KDS_MEM_LOG_DIRTY_PAGES, gpa, size, (uint64_t)(uintptr_t)mem };
    if (kds_memslot_update(a->vm, &m, sizeof(KdsMemslot)) != 0) {
        die("kds_memslot_set");
    }
}

struct avcpu {
    int fd;
    struct kvm_run *run;
};

#if defined(__aarch64__)
static int set_core_reg(int vcpu, uint64_t off, uint64_t v)
{
    struct kvm_one_reg r = {
        .id = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (off / sizeof(uint32_t)),
        .addr = (uint64_t)(uintptr_t)&v,
    };
    return ioctl(vcpu, KVM_SET_ONE_REG, &r);
}

/* PC at the guest code, X0 at the mailbox. */
static void vcpu_arch_init(struct avm *a, int fd)
{
    struct kvm_vcpu_init init;
    if (ioctl(a->fd, KVM_ARM_PREFERRED_TARGET, &init) < 0 || ioctl(fd, KVM_ARM_VCPU_INIT, &init) < 0) {
        die("KVM_ARM_VCPU_INIT");
    }
    if (set_core_reg(fd, offsetof(struct kvm_regs, regs.pc), RAM_BASE) < 0 ||
        set_core_reg(fd, offsetof(struct kvm_regs, regs.regs[0]), RAM_BASE + page) < 0) {
        die("KVM_SET_ONE_REG");
    }
}
#elif defined(__riscv)
static int set_core_reg(int vcpu, uint64_t index, uint64_t v)
{
    struct kvm_one_reg r = {
        .id = KVM_REG_RISCV | KVM_REG_SIZE_U64 | KVM_REG_RISCV_CORE | index,
        .addr = (uint64_t)(uintptr_t)&v,
    };
    return ioctl(vcpu, KVM_SET_ONE_REG, &r);
}

/* PC at the guest code, A0 at the mailbox (the vCPU starts in S-mode). */
static void vcpu_arch_init(struct avm *a, int fd)
{
    (void)a;
    if (set_core_reg(fd, KVM_REG_RISCV_CORE_REG(regs.pc), RAM_BASE) < 0 ||
        set_core_reg(fd, KVM_REG_RISCV_CORE_REG(regs.a0), RAM_BASE + page) < 0) {
        die("KVM_SET_ONE_REG");
    }
}
#endif

static void avcpu_init(struct avm *a, struct avcpu *v)
{
    v->fd = ioctl(a->fd, KVM_CREATE_VCPU, 0);
    if (v->fd < 0) {
        die("KVM_CREATE_VCPU");
    }
    vcpu_arch_init(a, v->fd);
    if (kds_vcpu_add(a->vm, v->fd, 0) != 0) {
        die("kds_vcpu_add");
    }
    int sz = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    v->run = mmap(NULL, (size_t)sz, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
    if (v->run == MAP_FAILED) {
        die("mmap kvm_run");
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

/*
 * Guest memory backed by huge pages, as QEMU's guest RAM is: transparent
 * huge pages (MADV_HUGEPAGE, as QEMU's anonymous RAM) or 2 MiB hugetlbfs
 * pages (-mem-path /dev/hugepages). arm64 logs a memslot's writes page by
 * page only when the memslot has a dirty bitmap (memslot_is_logging() in
 * arch/arm64/kvm/mmu.c); a ring-only slot there is mapped in 2 MiB blocks
 * and loses almost every write, which is why the shim always adds the
 * backup bitmap to the ring on arm64. riscv64 decides the same way
 * (kvm_riscv_mmu_map() in arch/riscv/kvm/mmu.c) and has no backup bitmap:
 * riscv_rule().
 */
enum backing { SMALL, THP, HUGETLB };
static const char *const backing_name[] = { "4 KiB pages", "THP", "hugetlbfs" };

struct huge_map {
    uint8_t *raw, *at; /* the mapping, and where the slot starts in it */
    size_t len;
};

static struct huge_map map_huge(size_t len, enum backing b)
{
    /* A block mapping needs the host address and the guest address
     * congruent modulo 2 MiB: start at TEST_GPA's offset in a 2 MiB block. */
    const size_t huge = 2 << 20;
    struct huge_map m = { .len = len + 2 * huge };
    if (b == HUGETLB) {
        m.raw = mmap(NULL, m.len, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | (21 << MAP_HUGE_SHIFT), -1, 0);
        if (m.raw == MAP_FAILED) {
            die("mmap(MAP_HUGETLB) (too few /proc/sys/vm/nr_hugepages?)");
        }
    } else {
        m.raw = map_anon(m.len);
    }
    m.at = (uint8_t *)(((uintptr_t)m.raw + huge - 1) & ~(uintptr_t)(huge - 1));
    m.at += TEST_GPA & (huge - 1);
    /* THP may be "always": 4 KiB pages must refuse it. */
    if (b != HUGETLB && madvise(m.at, len, b == THP ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) != 0) {
        printf("  (madvise: %s)\n", strerror(errno));
    }
    return m;
}

/* KVM's count of guest exits, all VMs (debugfs); -1 if unreadable. */
static long long kvm_exits(void)
{
    long long n = -1;
    FILE *f = fopen("/sys/kernel/debug/kvm/exits", "r");
    if (f) {
        if (fscanf(f, "%lld", &n) != 1) {
            n = -1;
        }
        fclose(f);
    }
    return n;
}

/*
 * Are huge pages mapped as blocks at stage 2 on this host at all? One round
 * of the guest on an unlogged slot: 4 KiB pages take a fault per page
 * touched, a block-mapped slot one per 2 MiB block. Without this, a ring on
 * huge pages losing nothing could mean only that the host never maps them
 * as blocks.
 */
static void huge_pages_mapped_as_blocks(void)
{
    int before = kds_test_failures;
    const uint64_t pages = 16384;
    long long exits[3] = { 0 };
    for (int b = SMALL; b <= HUGETLB; b++) {
        struct avm a;
        struct avcpu v;
        avm_init(&a, 0, 0);
        struct huge_map m = map_huge(pages * page, (enum backing)b);
        set_slot_flags(&a, 1, TEST_GPA, m.at, pages * page, 0);
        avcpu_init(&a, &v);
        mailbox(&a, pages, 8000, 1);
        long long e0 = kvm_exits();
        CHECK(round_run(&a, &v) >= 0, "a round");
        exits[b] = kvm_exits() - e0;
        avm_free(&a);
        munmap(m.raw, m.len);
    }
    printf("  guest exits for 8000 stores over 64 MiB, not logged: 4 KiB pages %lld, THP %lld, "
           "hugetlbfs %lld\n", exits[SMALL], exits[THP], exits[HUGETLB]);
    CHECK(exits[SMALL] > 1000, "4 KiB pages fault page by page");
    CHECK(exits[HUGETLB] * 10 < exits[SMALL], "hugetlbfs mapped in blocks");
    CHECK(exits[THP] * 10 < exits[SMALL], "THP mapped in blocks");
    result("huge-pages-mapped-as-blocks", before);
}

/* The guest dirties `pages` pages `rounds` times; loss must be 0. */
#define WANT_FULL 1 /* a ring-full exit must come */
#define REAPER 2    /* with the library's reaper thread */
#define LATE_LOG 4  /* logging starts after a round on the mapped memory */
static void track(const char *name, int ring, uint64_t pages, uint32_t stores, int rounds,
                  int flags, enum backing backing)
{
    int before = kds_test_failures;
    struct avm a;
    struct avcpu v;
    struct checker c;
    avm_init(&a, ring, 0);
    checker_init(&c, 1, pages, page);
    struct huge_map huge = { 0 };
    if (backing != SMALL) {
        munmap(c.mem, pages * page);
        huge = map_huge(pages * page, backing);
        c.mem = huge.at;
    }
    set_slot_flags(&a, 1, TEST_GPA, c.mem, pages * page,
                   flags & LATE_LOG ? 0 : KDS_MEM_LOG_DIRTY_PAGES);
    avcpu_init(&a, &v);
    int first = 1;
    if (flags & LATE_LOG) {
        /* A round before logging starts, as a guest runs before its
         * migration: its writes map the memory (in 2 MiB blocks where huge
         * pages back it). Then logging starts on those mappings. */
        mailbox(&a, pages, stores, 1);
        CHECK(round_run(&a, &v) >= 0, "the round before logging");
        set_slot(&a, 1, TEST_GPA, c.mem, pages * page);
        for (uint64_t p = 0; p < pages; p++) {
            c.shadow[p] = *(uint32_t *)(c.mem + p * page);
        }
        first = 2;
        rounds++;
    }
    if (flags & REAPER) {
        KdsReaperConfig cfg = { 0 };
        CHECK(kds_reaper_enable(a.vm, &cfg, sizeof(cfg)) == 0, "kds_reaper_enable: %s",
              kds_last_error());
    }
    long full = 0, r = 0;
    for (int it = first; it <= rounds && r >= 0; it++) {
        mailbox(&a, pages, stores, (uint32_t)it);
        r = round_run(&a, &v);
        full += r > 0 ? r : 0;
        uint64_t lost = checker_check(&c, a.vm, 0);
        CHECK(lost == 0, "%s round %d: %llu lost", name, it, (unsigned long long)lost);
    }
    KdsStats s;
    kds_stats_get(a.vm, &s, sizeof(KdsStats));
    CHECK(c.changed >= stores, "the guest dirtied pages (%llu)", (unsigned long long)c.changed);
    CHECK(kds_vm_mode(a.vm) == (ring ? RING_MODE : KDS_MODE_BITMAP), "mode %d",
          kds_vm_mode(a.vm));
    if (flags & WANT_FULL) {
        CHECK(full > 0 && s.ring_full_reaps > 0, "a ring-full exit reaped by kds_vcpu_reap");
    }
    if (flags & REAPER) {
        CHECK(s.reaper_reaps > 0, "the reaper thread reaped");
    }
    printf("  %s (%s): %llu pages changed, %llu reported, %llu lost, %ld ring-full exits, "
           "%llu overflows, %llu wedges\n", name, backing_name[backing], (unsigned long long)c.changed,
           (unsigned long long)c.reported, (unsigned long long)c.lost, full,
           (unsigned long long)s.ring_overflows, (unsigned long long)s.ring_wedges);
    if (huge.raw) {
        munmap(huge.raw, huge.len);
        c.mem = NULL;
    }
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

#if defined(__aarch64__)
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

#endif

/* A kernel whose ring the shim uses: arm64 with the backup bitmap, riscv64
 * from Linux 7.2 (map_huge). */
static void ring_kernel(void)
{
    int before = kds_test_failures;
    struct avm a;
    /* The shim picks ACQ_REL (the plain ring is 0 on arm64 and riscv64). */
    kds_logger_set(logger, NULL, 3);
    ring_info[0] = 0;
    a.fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
    CHECK(kds_vm_adopt(a.fd, &a.vm) == 0, "adopt");
    CHECK(kds_dirty_ring_enable(a.vm, RING) == 0, "ring: %s", kds_last_error());
    CHECK(strstr(ring_info, "KVM_CAP_DIRTY_LOG_RING_ACQ_REL") != NULL, "picked: %s", ring_info);
    CHECK(kds_vm_mode(a.vm) == RING_MODE, "mode %d", kds_vm_mode(a.vm));
    kds_logger_set(NULL, NULL, 0);
    int r = kds_board_init(a.vm, KDS_BOARD_VGIC_ITS);
#if defined(__aarch64__)
    /* The hook before any memslot: ring with bitmap. */
    CHECK(r == 0, "board hook with ITS: %s", kds_last_error());
    CHECK(kds_vm_mode(a.vm) == KDS_MODE_RING_WITH_BITMAP, "mode %d", kds_vm_mode(a.vm));
#else
    /* No backup bitmap: no ring for a board whose devices write guest
     * memory with no vCPU running. */
    CHECK(r == -ENOTSUP, "board hook with ITS: %d (%s)", r, kds_last_error());
#endif
    kds_vm_free(a.vm);
    close(a.fd);
    result("ring-acq-rel-and-its-hook", before);

    before = kds_test_failures;
#if defined(__aarch64__)
    avm_init(&a, 1, UINT32_MAX); /* ring, then a memslot, no hook */
    /* The kernel alone would answer -EINVAL; -EBUSY is the shim's refusal. */
    CHECK(kds_board_init(a.vm, KDS_BOARD_VGIC_ITS) == -EBUSY, "ITS after memslot: %s", kds_last_error());
    CHECK(kds_vm_mode(a.vm) == KDS_MODE_RING_WITH_BITMAP, "mode stays ring with bitmap");
    avm_free(&a);
#endif
    avm_init(&a, 0, UINT32_MAX);
    CHECK(kds_dirty_ring_enable(a.vm, RING) == -EBUSY, "ring after memslot: %s", kds_last_error());
    avm_free(&a);
    result("refusals-after-memslot", before);

#if defined(__aarch64__)
    its_save_tables();
#endif
    track("vcpu-ring", 1, 1024, 500, 4, 0, SMALL);
    track("vcpu-ring-full", 1, 16384, 8000, 3, WANT_FULL, SMALL);
    track("vcpu-ring-reaper", 1, 16384, 8000, 3, REAPER, SMALL);
    huge_pages_mapped_as_blocks();
    track("vcpu-ring-thp", 1, 16384, 8000, 3, 0, THP);
    track("vcpu-ring-hugetlb", 1, 16384, 8000, 3, 0, HUGETLB);
    track("vcpu-ring-thp-late-log", 1, 16384, 8000, 3, LATE_LOG, THP);
    track("vcpu-ring-hugetlb-late-log", 1, 16384, 8000, 3, LATE_LOG, HUGETLB);
    track("vcpu-bitmap", 0, 1024, 500, 4, 0, SMALL);
    track("vcpu-bitmap-thp", 0, 16384, 8000, 3, 0, THP);
    track("vcpu-bitmap-hugetlb", 0, 16384, 8000, 3, 0, HUGETLB);
    interrupted_reset("interrupted-reset", 12, 1);
    interrupted_reset_unblocked();
}

static void bitmap_kernel(void)
{
    int before = kds_test_failures;
    int fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
    KdsVm *vm;
    CHECK(kds_vm_adopt(fd, &vm) == 0, "adopt");
    /* No ring here, or a ring the shim refuses (map_huge): on arm64 one
     * without cap 225, on riscv64 one before Linux 7.2. Bitmap mode. */
    int r = kds_dirty_ring_enable(vm, RING);
    CHECK(r == -ENOTSUP, "no ring here: %d (%s)", r, kds_last_error());
    printf("  kds_dirty_ring_enable: %d (%s)\n", r, kds_last_error());
    CHECK(kds_board_init(vm, KDS_BOARD_VGIC_ITS) == 0, "ITS recorded in bitmap mode");
    CHECK(kds_vm_mode(vm) == KDS_MODE_BITMAP, "bitmap mode");
    kds_vm_free(vm);
    close(fd);
    result("no-ring-kernel-path", before);
    track("vcpu-bitmap", 0, 1024, 500, 4, 0, SMALL);
    track("vcpu-bitmap-thp", 0, 16384, 8000, 3, 0, THP);
    track("vcpu-bitmap-hugetlb", 0, 16384, 8000, 3, 0, HUGETLB);
}

/* Debian's riscv64 kernel builds KVM as a module: /kvm.ko, if packed. */
static void load_kvm_module(void)
{
    int fd = open("/kvm.ko", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return;
    }
    if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST) {
        printf("  (finit_module(/kvm.ko): %s)\n", strerror(errno));
    }
    close(fd);
}

static void reserve_huge_pages(int n)
{
    FILE *f = fopen("/proc/sys/vm/nr_hugepages", "w");
    if (f) {
        fprintf(f, "%d\n", n);
        fclose(f);
    }
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
    mkdir("/proc", 0755);
    mount("proc", "/proc", "proc", 0, NULL);
    mount("debugfs", "/sys/kernel/debug", "debugfs", 0, NULL);
    load_kvm_module();
    reserve_huge_pages(40); /* 80 MiB: the 64 MiB hugetlbfs slot and its slack */
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
    printf(ARCH " host: Linux %s, page size %llu, caps 192=%d 223=%d 225=%d, THP %s\n",
           u.release, (unsigned long long)page, c192, c223, c225, thp);
    /* arm64 uses the ring only with the backup bitmap, riscv64 only from
     * Linux 7.2 (map_huge). */
    int major = 0, minor = 0;
    sscanf(u.release, "%d.%d", &major, &minor);
    int ring_ok = strcmp(ARCH, "arm64") == 0 ? c225 > 0 : major * 100 + minor >= 702;
    if (c223 > 0 && ring_ok) {
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
