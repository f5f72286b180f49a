/* A caller built against ABI 1: this file includes the header of ABI 1
 * (c-tests/abi1/kvm_dirty_shim.h, the header of commit 6226f4b, unchanged)
 * and links today's library. It must keep working, and the library must
 * never write past the structs ABI 1 callers allocate:
 * - kds_stats() writes the 9 counters of ABI 1's contract (72 bytes), so a
 *   caller that declared KdsStats as the contract wrote it (9 fields) keeps
 *   its stack (the bug this guards against: 40 bytes overwritten);
 * - kds_memslot_set() and kds_reaper_start() read only ABI 1's layouts;
 * - every ABI 1 name still links and answers as before. */
#include "kvm_dirty_shim.h" /* ABI 1's, from c-tests/abi1 */

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

static int failures;
#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (!(cond)) {                                                        \
            failures++;                                                       \
            fprintf(stderr, "%s:%d: FAILED: ", __FILE__, __LINE__);           \
            fprintf(stderr, __VA_ARGS__);                                     \
            fprintf(stderr, " (%s)\n", kds_last_error());                     \
        }                                                                     \
    } while (0)

#define CANARY 0x5a5a5a5a5a5a5a5aull

/* KdsStats as ABI 1's contract declares it: 9 counters. */
struct contract_stats {
    uint64_t entries_reaped, ring_resets, ring_full_reaps, bitmap_syncs,
        pages_from_bitmap, invalid_entries, harvest_ns, reset_ns, ring_overflows;
};

int main(void)
{
    enum { PAGES = 16, PAGE = 4096 };
    CHECK(kds_abi_version() >= KDS_ABI_VERSION, "library ABI %u older than 1",
          kds_abi_version());

    KdsVm *vm = NULL;
    CHECK(kds_vm_create(0, &vm) == 0, "kds_vm_create");
    if (!vm) {
        return 1;
    }
    void *mem = mmap(NULL, PAGES * PAGE, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(mem != MAP_FAILED, "mmap");

    /* ABI 1's memslot call and layout (bitmap mode: no ring enabled). */
    struct {
        KdsMemslot m;
        uint64_t after; /* not part of the call: must not be read as a field */
    } slot = { { 1, KDS_MEM_LOG_DIRTY_PAGES, 0, PAGES * PAGE,
                 (uint64_t)(uintptr_t)mem }, CANARY };
    CHECK(kds_memslot_set(vm, &slot.m) == 0, "kds_memslot_set");
    uint64_t bm[1] = { 0 };
    CHECK(kds_sync_slot(vm, 1, bm, 64, 0) >= 0, "kds_sync_slot");
    CHECK(kds_sync_slot(vm, 9, bm, 64, 0) == -ENOENT, "unknown slot");

    /* The contract's 9-field KdsStats, with a canary right after it. */
    struct {
        struct contract_stats s;
        uint64_t canary[5];
    } c;
    memset(&c.s, 0xff, sizeof c.s);
    for (int i = 0; i < 5; i++) {
        c.canary[i] = CANARY;
    }
    CHECK(kds_stats(vm, (KdsStats *)(void *)&c.s) == 0, "kds_stats");
    for (int i = 0; i < 5; i++) {
        CHECK(c.canary[i] == CANARY, "kds_stats wrote past the 9 counters of ABI 1 "
              "(word %d after them is %#llx)", i, (unsigned long long)c.canary[i]);
    }
    CHECK(c.s.bitmap_syncs == 1, "bitmap_syncs %llu, want 1",
          (unsigned long long)c.s.bitmap_syncs);
    CHECK(c.s.entries_reaped == 0 && c.s.ring_overflows == 0,
          "counters of a bitmap-mode VM");

    /* ABI 1's header declared 14 counters: the 9 first are written, the
     * rest is left as the caller had it. */
    KdsStats h;
    memset(&h, 0xee, sizeof h);
    CHECK(kds_stats(vm, &h) == 0, "kds_stats");
    CHECK(h.bitmap_syncs == 1 && h.ring_overflows == 0, "the 9 ABI 1 counters");
    CHECK(h.reset_shortfall == 0xeeeeeeeeeeeeeeeeull, "written past ABI 1's 72 bytes");

    KdsVcpuStats vs;
    /* ABI 1 said -EINVAL for an unknown vCPU (ABI 2's names: -ENOENT). */
    CHECK(kds_vcpu_stats(vm, 0, &vs) == -EINVAL, "unknown vCPU: -EINVAL");
    CHECK(kds_reaper_start(vm, NULL) == -ENOTSUP, "reaper without ring");

    /* A ring VM: the reaper with ABI 1's config layout. */
    KdsVm *rvm = NULL;
    CHECK(kds_vm_create(0, &rvm) == 0, "kds_vm_create");
    CHECK(kds_dirty_ring_enable(rvm, 4096) == 0, "ring");
    struct {
        KdsReaperConfig cfg;
        uint32_t after;
    } rc = { { 50, 0, 0 }, 0xffffffffu };
    CHECK(kds_reaper_start(rvm, &rc.cfg) == 0, "kds_reaper_start");
    CHECK(kds_reaper_stop(rvm) == 0, "kds_reaper_stop");
    CHECK(kds_set_kick(rvm, NULL, NULL) == 0, "kds_set_kick");
    CHECK(kds_flush(rvm) == -EBUSY, "kds_flush without a kick");
    CHECK(kds_reap_vcpu(rvm, 3) == -EINVAL, "kds_reap_vcpu unknown: -EINVAL");
    int mp = kds_set_manual_protect(rvm, true);
    CHECK(mp == 0 || mp == -ENOTSUP, "kds_set_manual_protect");
    CHECK(kds_set_logger(NULL, NULL, 0) == 0, "kds_set_logger");
    kds_vm_free(rvm);

    kds_vm_free(vm);
    munmap(mem, PAGES * PAGE);
    printf("%s (%d failures)\n", failures ? "FAILED" : "ok", failures);
    return failures ? 1 : 0;
}
