#include "kds_check.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>

int kds_test_failures;

void die(const char *what)
{
    fprintf(stderr, "FATAL: %s: %s (kds_last_error: %s)\n", what, strerror(errno), kds_last_error());
    exit(2);
}

void *map_anon(size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        die("mmap");
    }
    return p;
}

void checker_init(struct checker *c, uint32_t slot, uint64_t pages, uint64_t page_size)
{
    memset(c, 0, sizeof(*c));
    c->slot = slot;
    c->pages = pages;
    c->page_size = page_size;
    c->mem = map_anon(pages * page_size);
    c->shadow = calloc(pages, sizeof(uint32_t));
    c->bitmap = calloc((pages + 63) / 64, sizeof(uint64_t));
    if (!c->shadow || !c->bitmap) {
        die("calloc");
    }
}

void checker_free(struct checker *c)
{
    if (c->mem) { /* NULL: the caller unmapped memory of its own */
        munmap(c->mem, c->pages * c->page_size);
    }
    free(c->shadow);
    free(c->bitmap);
}

struct runs {
    struct checker *c;
    uint64_t next;
};

static void add_run(void *opaque, uint64_t first_page, const uint64_t *bits, uint64_t nwords)
{
    struct runs *r = opaque;
    uint64_t words = (r->c->pages + 63) / 64;
    CHECK(first_page % 64 == 0 && first_page >= r->next, "run at page %llu after %llu",
          (unsigned long long)first_page, (unsigned long long)r->next);
    CHECK(nwords >= 1 && nwords <= KDS_SYNC_RUN_WORDS_MAX && first_page / 64 + nwords <= words,
          "run of %llu words at page %llu", (unsigned long long)nwords,
          (unsigned long long)first_page);
    for (uint64_t i = 0; i < nwords && first_page / 64 + i < words; i++) {
        CHECK(bits[i] != 0, "an empty word in a run");
        r->c->bitmap[first_page / 64 + i] |= bits[i];
    }
    r->next = first_page + nwords * 64;
}

uint64_t checker_check(struct checker *c, KdsVm *vm, uint32_t flags)
{
    memset(c->bitmap, 0, (c->pages + 63) / 64 * sizeof(uint64_t));
    int64_t n;
    if (c->runs) {
        struct runs r = { c, 0 };
        n = kds_memslot_sync_runs(vm, c->slot, flags, add_run, &r);
    } else {
        n = kds_memslot_sync(vm, c->slot, c->bitmap, c->pages, flags);
    }
    if (n < 0) {
        die(c->runs ? "kds_memslot_sync_runs" : "kds_memslot_sync");
    }
    uint64_t lost = 0;
    for (uint64_t p = 0; p < c->pages; p++) {
        uint32_t v = __atomic_load_n((uint32_t *)(c->mem + p * c->page_size), __ATOMIC_RELAXED);
        if (v != c->shadow[p]) {
            c->changed++;
            if (!(c->bitmap[p / 64] & (1ull << (p % 64)))) {
                lost++;
            }
            c->shadow[p] = v;
        }
    }
    c->reported += (uint64_t)n;
    c->lost += lost;
    return lost;
}
