/* The ABI's refusals and bad input, kds_vm_adopt's fd ownership, the logger
 * and the version, through the public header on the real /dev/kvm. */
#include "kds_test.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define EXPECT(call, err)                                                     \
    do {                                                                      \
        int64_t r_ = (call);                                                  \
        CHECK(r_ == -(err), "%s returned %lld, want -%s", #call,              \
              (long long)r_, #err);                                           \
        CHECK(kds_last_error()[0] != '\0', "empty kds_last_error after %s", #call); \
    } while (0)

static int vm_fd_new(int *kvm)
{
    *kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    return ioctl(*kvm, KVM_CREATE_VM, 0);
}

/* A run callback for syncs that must find nothing. */
static void no_run(void *opaque, uint64_t first_page, const uint64_t *bits, uint64_t nwords)
{
    (void)opaque;
    (void)bits;
    CHECK(0, "a run of %llu words at page %llu from an empty sync", (unsigned long long)nwords,
          (unsigned long long)first_page);
}

static void ordering(void)
{
    int kvm, fd = vm_fd_new(&kvm);
    KdsVm *vm;
    CHECK(kds_vm_adopt(fd, &vm) == 0, "adopt");
    void *mem = map_anon(16 * PAGE);
    KdsMemslot m = { 1, KDS_MEM_LOG_DIRTY_PAGES, 0, 16 * PAGE, (uint64_t)(uintptr_t)mem };

    EXPECT(kds_dirty_ring_enable(vm, 1000), EINVAL);     /* not a power of two */
    EXPECT(kds_dirty_ring_enable(vm, 1u << 24), EINVAL); /* above the kernel's max */
    CHECK(kds_dirty_ring_enable(vm, 4096) == 0, "ring");
    EXPECT(kds_dirty_ring_enable(vm, 4096), EBUSY);      /* twice */
    /* x86 has no KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: the ITS path is -ENOTSUP. */
    if (ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) == 0) {
        EXPECT(kds_board_init(vm, KDS_BOARD_VGIC_ITS), ENOTSUP);
        CHECK(strstr(kds_last_error(), "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP") != NULL, "msg");
        CHECK(kds_vm_mode(vm) == KDS_MODE_RING, "mode stays ring");
    }
    CHECK(kds_memslot_update(vm, &m, sizeof(KdsMemslot)) == 0, "memslot");
    /* The memslot sealed the board as "no ITS"; the ring is too late now. */
    EXPECT(kds_board_init(vm, KDS_BOARD_VGIC_ITS), EBUSY);
    CHECK(strstr(kds_last_error(), "before the first memslot") != NULL, "msg names the order");
    CHECK(kds_board_init(vm, 0) == 0, "board 0 after seal");
    EXPECT(kds_board_init(vm, 1u << 7), EINVAL);

    /* vCPU after memslots is fine; ring after a vCPU is refused. */
    int vcpu = ioctl(fd, KVM_CREATE_VCPU, 0);
    CHECK(kds_vcpu_add(vm, vcpu, 0) == 0, "vcpu_add");
    EXPECT(kds_vcpu_add(vm, vcpu, 0), EEXIST);
    EXPECT(kds_vcpu_add(vm, -1, 1), EINVAL);
    EXPECT(kds_vcpu_reap(vm, 7), ENOENT);
    EXPECT(kds_vcpu_remove(vm, 7), ENOENT);

    /* Bad memslots and syncs. */
    KdsMemslot bad = m;
    bad.slot = 2;
    bad.guest_phys_addr = 0x100001;
    EXPECT(kds_memslot_update(vm, &bad, sizeof(KdsMemslot)), EINVAL);
    bad.guest_phys_addr = 0x100000;
    bad.memory_size = 100;
    EXPECT(kds_memslot_update(vm, &bad, sizeof(KdsMemslot)), EINVAL);
    bad.memory_size = 0;
    bad.slot = 9;
    EXPECT(kds_memslot_update(vm, &bad, sizeof(KdsMemslot)), ENOENT);
    uint64_t bm[1] = { 0 };
    EXPECT(kds_memslot_sync(vm, 1, bm, 15, 0), EINVAL);   /* 16 pages, 15 bits */
    EXPECT(kds_memslot_sync(vm, 1, NULL, 64, 0), EINVAL);
    EXPECT(kds_memslot_sync(vm, 5, bm, 64, 0), ENOENT);
    CHECK(kds_memslot_sync(vm, 1, bm, 16, 0) == 0, "sync");
    EXPECT(kds_memslot_sync_runs(vm, 1, 0, NULL, NULL), EINVAL);
    EXPECT(kds_memslot_sync_runs(vm, 5, 0, no_run, NULL), ENOENT);
    EXPECT(kds_memslot_sync_runs(vm, 1, 1u << 7, no_run, NULL), EINVAL);
    CHECK(kds_memslot_sync_runs(vm, 1, 0, no_run, NULL) == 0, "sync by runs");
    EXPECT(kds_flush(vm), EBUSY);                       /* no kick set */
    kds_vm_free(vm);
    close(vcpu);
    close(fd);
    close(kvm);

    /* Ring after a memslot. */
    fd = vm_fd_new(&kvm);
    CHECK(kds_vm_adopt(fd, &vm) == 0, "adopt");
    CHECK(kds_memslot_update(vm, &m, sizeof(KdsMemslot)) == 0, "memslot");
    EXPECT(kds_dirty_ring_enable(vm, 4096), EBUSY);
    EXPECT(kds_manual_protect_set(vm, 1), EBUSY);
    kds_vm_free(vm);
    close(fd);
    close(kvm);
}

static void nulls(void)
{
    KdsStats s;
    KdsVcpuStats vs;
    KdsMemslot m = { 0 };
    uint64_t bm[1];
    EXPECT(kds_vm_fd(NULL), EINVAL);
    EXPECT(kds_vm_mode(NULL), EINVAL);
    EXPECT(kds_dirty_ring_enable(NULL, 4096), EINVAL);
    EXPECT(kds_board_init(NULL, 0), EINVAL);
    EXPECT(kds_memslot_update(NULL, &m, sizeof(KdsMemslot)), EINVAL);
    EXPECT(kds_vcpu_add(NULL, 0, 0), EINVAL);
    EXPECT(kds_vcpu_remove(NULL, 0), EINVAL);
    EXPECT(kds_reap(NULL), EINVAL);
    EXPECT(kds_vcpu_reap(NULL, 0), EINVAL);
    EXPECT(kds_memslot_sync(NULL, 0, bm, 64, 0), EINVAL);
    EXPECT(kds_memslot_sync_runs(NULL, 0, 0, no_run, NULL), EINVAL);
    EXPECT(kds_kick_set(NULL, NULL, NULL), EINVAL);
    EXPECT(kds_flush(NULL), EINVAL);
    EXPECT(kds_stats_get(NULL, &s, sizeof(KdsStats)), EINVAL);
    EXPECT(kds_vcpu_stats_get(NULL, 0, &vs, sizeof(KdsVcpuStats)), EINVAL);
    EXPECT(kds_vm_create(0, NULL), EINVAL);
    EXPECT(kds_vm_adopt(-1, NULL), EINVAL);
    kds_vm_free(NULL);
}

#define CANARY 0x5a5a5a5a5a5a5a5aull

/* Structs passed with their size, as callers of an older, this and a newer
 * ABI pass them: the library reads and writes only what both sides know. */
static void sized_structs(void)
{
    struct tvm t;
    struct tvcpu v;
    tvm_init(&t, 4096, -1);
    tvm_vcpu(&t, &v, 0);
    uint64_t bm[1];

    /* Today's layout: every counter, and the library's size back. */
    KdsStats s;
    memset(&s, 0xff, sizeof s);
    CHECK(kds_stats_get(t.vm, &s, sizeof s) == (int)sizeof s, "kds_stats_get");
    CHECK(s.entries_reaped == 0 && s.reset_shortfall == 0, "every counter written");

    /* An older caller (ABI 1's 72 bytes): nothing past them is touched. */
    struct {
        KdsStats s;
        uint64_t canary;
    } old;
    memset(&old, 0xee, sizeof old);
    old.canary = CANARY;
    CHECK(kds_stats_get(t.vm, &old.s, KDS_STATS_SIZE_VER1) == (int)sizeof(KdsStats), "v1 size");
    CHECK(old.s.entries_reaped == 0 && old.s.ring_overflows == 0, "the ABI 1 counters");
    CHECK(old.s.ring_wedges == 0xeeeeeeeeeeeeeeeeull && old.canary == CANARY,
          "written past the caller's size");

    /* A newer caller: counters this library lacks read 0. */
    struct {
        KdsStats s;
        uint64_t newer[3];
    } big;
    memset(&big, 0xff, sizeof big);
    CHECK(kds_stats_get(t.vm, &big.s, sizeof big) == (int)sizeof(KdsStats), "newer size");
    CHECK(big.newer[0] == 0 && big.newer[1] == 0 && big.newer[2] == 0,
          "unknown counters not zeroed");
    EXPECT(kds_stats_get(t.vm, &big.s, 8192), EINVAL);

    struct {
        KdsVcpuStats s;
        uint64_t newer;
    } vbig;
    memset(&vbig, 0xff, sizeof vbig);
    CHECK(kds_vcpu_stats_get(t.vm, 0, &vbig.s, sizeof vbig) == (int)sizeof(KdsVcpuStats),
          "kds_vcpu_stats_get");
    CHECK(vbig.newer == 0, "unknown vCPU counter not zeroed");

    /* Input structs: a newer layout is fine while its new fields are 0;
     * a field this library does not know is -E2BIG; short is -EINVAL. */
    void *mem = map_anon(16 * PAGE);
    struct {
        KdsMemslot m;
        uint64_t newer;
    } ms = { { 7, KDS_MEM_LOG_DIRTY_PAGES, 1u << 30, 16 * PAGE, (uint64_t)(uintptr_t)mem }, 0 };
    ms.newer = 1;
    EXPECT(kds_memslot_update(t.vm, &ms.m, sizeof ms), E2BIG);
    CHECK(strstr(kds_last_error(), "newer field") != NULL, "E2BIG message");
    EXPECT(kds_memslot_update(t.vm, &ms.m, KDS_MEMSLOT_SIZE_VER1 - 8), EINVAL);
    EXPECT(kds_memslot_update(t.vm, &ms.m, 8192), EINVAL);
    ms.newer = 0;
    CHECK(kds_memslot_update(t.vm, &ms.m, sizeof ms) == 0, "newer layout, new field 0");
    CHECK(kds_memslot_sync(t.vm, 7, bm, 16, 0) >= 0, "the slot exists");
    ms.m.memory_size = 0;
    CHECK(kds_memslot_update(t.vm, &ms.m, KDS_MEMSLOT_SIZE_VER1) == 0, "v1 size");
    EXPECT(kds_memslot_sync(t.vm, 7, bm, 16, 0), ENOENT);

    struct {
        KdsReaperConfig c;
        uint32_t newer;
    } rc = { { 50, 0, 0 }, 3 };
    EXPECT(kds_reaper_enable(t.vm, &rc.c, sizeof rc), E2BIG);
    EXPECT(kds_reaper_enable(t.vm, &rc.c, 4), EINVAL);
    rc.newer = 0;
    CHECK(kds_reaper_enable(t.vm, &rc.c, sizeof rc) == 0, "reaper, newer layout");
    CHECK(kds_reaper_disable(t.vm) == 0, "reaper off");
    CHECK(kds_reaper_enable(t.vm, &rc.c, KDS_REAPER_CONFIG_SIZE_VER1) == 0, "reaper, v1 size");
    CHECK(kds_reaper_disable(t.vm) == 0, "reaper off");
    munmap(mem, 16 * PAGE);
    tvcpu_free(&v);
    tvm_free(&t);
}

static void adopt_keeps_fd(void)
{
    int kvm, fd = vm_fd_new(&kvm);
    KdsVm *vm;
    CHECK(kds_vm_adopt(fd, &vm) == 0, "adopt");
    CHECK(kds_vm_fd(vm) >= 0 && kds_vm_fd(vm) != fd, "the shim works on its own dup");
    kds_vm_free(vm);
    int vcpu = ioctl(fd, KVM_CREATE_VCPU, 0);
    CHECK(vcpu >= 0, "the caller's VM fd must stay usable after kds_vm_free");
    close(vcpu);
    close(fd);
    close(kvm);
    int null = open("/dev/null", O_RDONLY);
    EXPECT(kds_vm_adopt(null, &vm), EINVAL);
    close(null);
}

static int records, opaque_ok;

static void logger(int level, const char *msg, void *opaque)
{
    records += level >= 1 && level <= 5 && strstr(msg, "kvm-dirty-shim") != NULL;
    opaque_ok = opaque == &records;
}

static void logging(void)
{
    CHECK(kds_logger_set(logger, &records, 5) == 0, "kds_logger_set");
    struct tvm t;
    tvm_init(&t, 4096, -1);
    tvm_free(&t);
    CHECK(records > 0 && opaque_ok, "log records reached the callback (%d)", records);
    CHECK(kds_logger_set(NULL, NULL, 0) == 0, "logger off");
    int before = records;
    tvm_init(&t, 4096, -1);
    tvm_free(&t);
    CHECK(records == before, "no records after the logger was removed");
}

int main(void)
{
    CHECK(kds_abi_version() >= KDS_ABI_VERSION, "ABI version %u", kds_abi_version());
    ordering();
    nulls();
    sized_structs();
    adopt_keeps_fd();
    logging();
    printf("%s (%d failures)\n", kds_test_failures ? "FAILED" : "ok", kds_test_failures);
    return kds_test_failures ? 1 : 0;
}
