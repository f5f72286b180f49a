/* Dirty tracking through the public header on the real /dev/kvm: ring mode,
 * ring-full exits, a reaper thread beside the running vCPU, bitmap mode with
 * and without manual protect. Every changed page must be reported. */
#include "kds_test.h"

#include <pthread.h>
#include <stdatomic.h>

#define RING 4096u

static void rounds(const char *name, uint32_t ring, int manual, uint64_t pages,
                   uint32_t stores, uint32_t n_rounds, int expect_full, int runs)
{
    struct tvm t;
    struct checker c;
    struct tvcpu v;
    tvm_init(&t, ring, manual);
    checker_init(&c, 1, pages, PAGE);
    c.runs = runs;
    tvm_set_slot(&t, 1, TEST_GPA, c.mem, pages * PAGE, KDS_MEM_LOG_DIRTY_PAGES);
    tvm_vcpu(&t, &v, 0);
    tvm_mailbox(&t, 0, TEST_GPA, pages, stores, 5);
    long full = 0;
    int wedged = 0;
    for (uint32_t it = 1; it <= n_rounds && !wedged; it++) {
        tvm_iteration(&t, 0, it);
        long r = tvcpu_round(&t, &v);
        wedged = r < 0;
        full += r > 0 ? r : 0;
        uint64_t lost = checker_check(&c, t.vm, 0);
        CHECK(lost == 0, "%s round %u: %llu pages lost", name, it, (unsigned long long)lost);
    }
    KdsStats s;
    CHECK(kds_stats_get(t.vm, &s, sizeof s) == (int)sizeof s, "kds_stats_get");
    CHECK(c.changed > (uint64_t)stores, "%s: the guest dirtied pages (%llu)", name,
          (unsigned long long)c.changed);
    if (ring) {
        CHECK(kds_vm_mode(t.vm) == KDS_MODE_RING, "mode");
        CHECK(s.entries_reaped > 0 && s.ring_resets > 0, "%s: entries reaped", name);
        if (expect_full) {
            CHECK(full > 0 && s.ring_full_reaps > 0, "%s: no ring-full exit", name);
        }
        if (wedged) {
            CHECK(s.ring_wedges > 0, "%s: wedge reported", name);
        }
    } else {
        CHECK(kds_vm_mode(t.vm) == KDS_MODE_BITMAP, "mode");
        CHECK(s.bitmap_syncs == n_rounds, "%s: one KVM_GET_DIRTY_LOG per sync", name);
        CHECK(c.reported == c.changed, "%s: reported %llu, changed %llu", name,
              (unsigned long long)c.reported, (unsigned long long)c.changed);
    }
    printf("%s: %llu pages changed, %llu reported, %llu lost, %ld ring-full exits, "
           "%llu overflows%s\n", name, (unsigned long long)c.changed,
           (unsigned long long)c.reported, (unsigned long long)c.lost, full,
           (unsigned long long)s.ring_overflows, wedged ? ", wedge reported" : "");
    tvcpu_free(&v);
    checker_free(&c);
    tvm_free(&t);
}

struct reaper {
    KdsVm *vm;
    atomic_int stop;
    int64_t harvested;
    int failed;
};

static void *reaper_main(void *arg)
{
    struct reaper *r = arg;
    while (!atomic_load(&r->stop)) {
        int64_t n = kds_reap(r->vm);
        if (n < 0) {
            r->failed = 1;
            break;
        }
        r->harvested += n;
    }
    return NULL;
}

static void reaper_thread(void)
{
    struct tvm t;
    struct checker c;
    struct tvcpu v;
    uint64_t pages = 4096;
    tvm_init(&t, RING, -1);
    checker_init(&c, 1, pages, PAGE);
    tvm_set_slot(&t, 1, TEST_GPA, c.mem, pages * PAGE, KDS_MEM_LOG_DIRTY_PAGES);
    tvm_vcpu(&t, &v, 0);
    tvm_mailbox(&t, 0, TEST_GPA, pages, 3000, 9);
    struct reaper r = { .vm = t.vm };
    pthread_t th;
    CHECK(pthread_create(&th, NULL, reaper_main, &r) == 0, "pthread_create");
    for (uint32_t it = 1; it <= 20; it++) {
        tvm_iteration(&t, 0, it);
        CHECK(tvcpu_round(&t, &v) >= 0, "wedged");
        uint64_t lost = checker_check(&c, t.vm, 0);
        CHECK(lost == 0, "reaper round %u: %llu lost", it, (unsigned long long)lost);
    }
    atomic_store(&r.stop, 1);
    pthread_join(th, NULL);
    CHECK(!r.failed, "kds_reap failed in the reaper thread");
    printf("reaper thread: %llu pages changed, %lld harvested by the reaper, %llu lost\n",
           (unsigned long long)c.changed, (long long)r.harvested, (unsigned long long)c.lost);
    tvcpu_free(&v);
    checker_free(&c);
    tvm_free(&t);
}

int main(void)
{
    rounds("ring", RING, -1, 1024, 500, 10, 0, 0);
    rounds("ring-full", RING, -1, 16384, 8000, 8, 1, 0);
    rounds("bitmap+manual-protect", 0, 1, 4096, 2000, 10, 0, 0);
    rounds("bitmap", 0, 0, 4096, 2000, 10, 0, 0);
    rounds("ring, synced by runs", RING, -1, 16384, 8000, 8, 1, 1);
    rounds("bitmap, synced by runs", 0, 0, 4096, 2000, 10, 0, 1);
    reaper_thread();
    printf("%s (%d failures)\n", kds_test_failures ? "FAILED" : "ok", kds_test_failures);
    return kds_test_failures ? 1 : 0;
}
