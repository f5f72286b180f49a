/*
 * Harvest cost per ring entry: kvm-dirty-shim (kds_reap) against a plain C
 * loop written the way VMMs usually write it, from the kernel's
 * documentation (Documentation/virt/kvm/api.rst, "KVM_CAP_DIRTY_LOG_RING"):
 * walk the ring from the fetch index while flags say DIRTY (acquire), look
 * the slot up in an array by id, set the page's bit in that slot's bitmap,
 * mark the entry RESET (release); then one KVM_RESET_DIRTY_RINGS.
 *
 * Same run, same VM, same slot, same guest code and store pattern: N vCPUs
 * registered with the shim and N vCPUs the plain loop owns (it maps their
 * rings itself). Each round the guest fills every ring to about a third
 * (no ring-full exit), then each side harvests its own rings. Figures,
 * never assertions; each line says what it measured.
 *
 *   meson setup build-bench c-tests && ninja -C build-bench bench_harvest &&
 *   ./build-bench/bench_harvest [ring-entries [vcpus]]
 *
 * Instructions per entry (stable, unlike time): build with
 * -Dc_args=-DKDS_BENCH_NOINLINE (so that plain_harvest keeps its symbol),
 * run it under
 *   valgrind --tool=callgrind ./build-bench/bench_harvest 4096 1
 * and divide the inclusive Ir of Vm::harvest_one and of plain_harvest by
 * the entries each side printed. (Timed runs inline it, as a VMM would.)
 */
#include "kds_test.h"

#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#ifndef KVM_DIRTY_LOG_PAGE_OFFSET
#define KVM_DIRTY_LOG_PAGE_OFFSET 64
#endif

#define SLOT 1u

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- the plain C loop: what a VMM writes ---- */

struct plain_slot {
    uint64_t *bitmap;
    uint64_t npages;
};

struct plain_ring {
    struct kvm_dirty_gfn *gfns;
    uint32_t size, fetch;
};

#ifdef KDS_BENCH_NOINLINE
#define BENCH_NOINLINE __attribute__((noinline))
#else
#define BENCH_NOINLINE
#endif

/* One ring: returns the entries harvested. */
BENCH_NOINLINE static uint32_t plain_harvest(struct plain_ring *r, struct plain_slot *slots, uint32_t nslots)
{
    uint32_t n = 0;
    for (;;) {
        struct kvm_dirty_gfn *e = &r->gfns[r->fetch & (r->size - 1)];
        if (!(__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & KVM_DIRTY_GFN_F_DIRTY)) {
            break;
        }
        uint32_t id = e->slot & 0xffff; /* address space in the high half */
        if ((e->slot >> 16) == 0 && id < nslots && slots[id].bitmap && e->offset < slots[id].npages) {
            slots[id].bitmap[e->offset / 64] |= 1ull << (e->offset % 64);
        }
        __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
        r->fetch++;
        n++;
    }
    return n;
}

/* ---- the benchmark ---- */

struct side {
    uint64_t entries, harvest_ns, reset_ns;
};

static void bench(uint32_t ring, uint32_t nvcpus, int ncpus)
{
    struct tvm t;
    tvm_init(&t, ring, -1);
    /* Each vCPU stores ring/2 times over its own `ring` pages (about 39% of
     * them distinct): no ring-full exit. The plain vCPUs reuse the shim
     * vCPUs' regions (both sides run one after the other). */
    uint64_t region = ring, pages = region * nvcpus;
    uint8_t *mem = map_anon(pages * PAGE);
    tvm_set_slot(&t, SLOT, TEST_GPA, mem, pages * PAGE, KDS_MEM_LOG_DIRTY_PAGES);
    struct tvcpu shim[8], plain[8];
    struct plain_ring pr[8];
    struct plain_slot slots[2] = { { 0 }, { calloc(pages / 64 + 1, 8), pages } };
    for (uint32_t i = 0; i < nvcpus; i++) {
        tvm_vcpu(&t, &shim[i], i);
        tvm_vcpu_unregistered(&t, &plain[i], 8 + i);
        void *g = mmap(NULL, (size_t)ring * sizeof(struct kvm_dirty_gfn), PROT_READ | PROT_WRITE,
                       MAP_SHARED, plain[i].fd, KVM_DIRTY_LOG_PAGE_OFFSET * PAGE);
        if (g == MAP_FAILED) {
            die("mmap dirty ring");
        }
        pr[i] = (struct plain_ring){ g, ring, 0 };
        uint64_t gpa = TEST_GPA + (uint64_t)i * region * PAGE;
        tvm_mailbox(&t, i, gpa, region, ring / 2, 7 + i);
        tvm_mailbox(&t, 8 + i, gpa, region, ring / 2, 7 + i);
    }
    uint32_t rounds = (uint32_t)(4000000u / (ring * nvcpus));
    rounds = rounds < 8 ? 8 : rounds > 200 ? 200 : rounds;
    struct side s = { 0 }, p = { 0 };
    long full = 0;
    for (uint32_t it = 1; it <= rounds; it++) {
        /* Shim side. */
        for (uint32_t i = 0; i < nvcpus; i++) {
            tvm_iteration(&t, i, it);
            full += tvcpu_round(&t, &shim[i]);
        }
        KdsStats a, b;
        kds_stats_get(t.vm, &a, sizeof(KdsStats));
        int64_t n = kds_reap(t.vm);
        kds_stats_get(t.vm, &b, sizeof(KdsStats));
        if (n < 0) {
            die("kds_reap");
        }
        s.entries += (uint64_t)n;
        s.harvest_ns += b.harvest_ns - a.harvest_ns;
        s.reset_ns += b.reset_ns - a.reset_ns;
        /* Plain side, same stores on the same pages. */
        for (uint32_t i = 0; i < nvcpus; i++) {
            tvm_iteration(&t, 8 + i, it);
            full += tvcpu_round(&t, &plain[i]);
        }
        uint64_t t0 = now_ns(), m = 0;
        for (uint32_t i = 0; i < nvcpus; i++) {
            m += plain_harvest(&pr[i], slots, 2);
        }
        uint64_t t1 = now_ns();
        if (m && ioctl(t.vm_fd, KVM_RESET_DIRTY_RINGS, 0) < 0) {
            die("KVM_RESET_DIRTY_RINGS");
        }
        uint64_t t2 = now_ns();
        p.entries += m;
        p.harvest_ns += t1 - t0;
        p.reset_ns += t2 - t1;
    }
    double sh = (double)s.harvest_ns / (double)s.entries;
    double ph = (double)p.harvest_ns / (double)p.entries;
    printf("harvest %5u-entry rings x %u vCPU%s%s: %8llu + %8llu entries in %u rounds; "
           "shim %6.2f ns/entry, plain C loop %6.2f ns/entry, ratio shim/C %.2f; "
           "KVM_RESET_DIRTY_RINGS %6.1f (shim) / %6.1f (C) ns/entry%s\n",
           ring, nvcpus, nvcpus > 1 ? "s" : "", (int)nvcpus > ncpus ? " (more vCPUs than CPUs)" : "",
           (unsigned long long)s.entries, (unsigned long long)p.entries, rounds, sh, ph, sh / ph,
           (double)s.reset_ns / (double)s.entries, (double)p.reset_ns / (double)p.entries,
           full ? " [ring-full exits: figures include them]" : "");
    fflush(stdout);
    for (uint32_t i = 0; i < nvcpus; i++) {
        munmap(pr[i].gfns, (size_t)ring * sizeof(struct kvm_dirty_gfn));
        tvcpu_free(&plain[i]);
    }
    tvm_free(&t);
    for (uint32_t i = 0; i < nvcpus; i++) {
        tvcpu_free(&shim[i]);
    }
    free(slots[1].bitmap);
    munmap(mem, pages * PAGE);
}

int main(int argc, char **argv)
{
    struct utsname u;
    uname(&u);
    int ncpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
    printf("bench_harvest on Linux %s %s, %d CPUs; vCPUs fill their rings one after another, "
           "then each side harvests\n", u.release, u.machine, ncpus);
    uint32_t rings[] = { 1024, 4096, 16384, 65536 };
    uint32_t vcpus[] = { 1, 2, 8 };
    for (size_t i = 0; i < sizeof rings / sizeof rings[0]; i++) {
        if (argc > 1 && (uint32_t)atoi(argv[1]) != rings[i]) {
            continue;
        }
        for (size_t j = 0; j < sizeof vcpus / sizeof vcpus[0]; j++) {
            if (argc > 2 && (uint32_t)atoi(argv[2]) != vcpus[j]) {
                continue;
            }
            bench(rings[i], vcpus[j], ncpus);
        }
    }
    return 0;
}
