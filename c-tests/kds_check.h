/*
 * The architecture-neutral half of the C test harness: failure counting,
 * anonymous memory, and the no-loss check (a shadow of the first word of
 * every page; every page whose word changed must have been reported by
 * kds_memslot_sync). Used by the x86 tests here and the arm64 tests.
 */
#ifndef KDS_CHECK_H
#define KDS_CHECK_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "kvm_dirty_shim.h"

extern int kds_test_failures;

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);    \
            fprintf(stderr, __VA_ARGS__);                                      \
            fprintf(stderr, " (kds_last_error: %s)\n", kds_last_error());     \
            kds_test_failures++;                                               \
        }                                                                      \
    } while (0)

struct checker {
    uint32_t slot;
    uint64_t pages, page_size;
    uint8_t *mem;
    uint32_t *shadow;
    uint64_t *bitmap;
    uint64_t changed, reported, lost;
    int runs; /* sync with kds_memslot_sync_runs() instead */
};

/* Exits with status 2 after printing `what`, errno and kds_last_error(). */
void die(const char *what);
void *map_anon(size_t len);
void checker_init(struct checker *c, uint32_t slot, uint64_t pages, uint64_t page_size);
void checker_free(struct checker *c);
/* Syncs the slot (its writers out of guest mode), compares with the shadow;
 * returns the pages lost in this check. With c->runs, through
 * kds_memslot_sync_runs(), each run checked (aligned, in order, inside the
 * slot, only words with dirty pages). */
uint64_t checker_check(struct checker *c, KdsVm *vm, uint32_t flags);

#endif
