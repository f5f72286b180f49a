/*
 * C test harness for kvm-dirty-shim: a real VM on /dev/kvm running the tiny
 * x86 guest of guest/guest.S (its bytes are loaded from guest/guest.bin, the
 * same file the Rust tests use), and the no-loss check. Only the public
 * header is used to talk to the shim.
 */
#ifndef KDS_TEST_H
#define KDS_TEST_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <linux/kvm.h>

#include "kvm_dirty_shim.h"

#ifndef KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
#define KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP 225 /* Debian 12's linux/kvm.h is 6.1 */
#endif
#ifndef KVM_EXIT_DIRTY_RING_FULL
#define KVM_EXIT_DIRTY_RING_FULL 31
#endif

#define PAGE 4096u
#define CODE_PAGES 8u
#define TEST_GPA 0x100000u

extern int kds_test_failures;

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);    \
            fprintf(stderr, __VA_ARGS__);                                      \
            fprintf(stderr, " (kds_last_error: %s)\n", kds_last_error());      \
            kds_test_failures++;                                               \
        }                                                                      \
    } while (0)

/* A VM created here with KVM_CREATE_VM and adopted by the shim. */
struct tvm {
    int kvm_fd, vm_fd;
    KdsVm *vm;
    uint8_t *code; /* slot 0: code, mailboxes, stacks */
};

struct tvcpu {
    int fd;
    uint32_t index;
    struct kvm_run *run;
    size_t run_size;
};

struct checker {
    uint32_t slot;
    uint64_t pages;
    uint8_t *mem;
    uint32_t *shadow;
    uint64_t *bitmap;
    uint64_t changed, reported, lost;
};

/* ring_entries 0: bitmap mode. manual_protect < 0: leave the default. */
void tvm_init(struct tvm *t, uint32_t ring_entries, int manual_protect);
void tvm_free(struct tvm *t);
void tvm_set_slot(struct tvm *t, uint32_t slot, uint64_t gpa, void *mem, uint64_t size, uint32_t flags);
void tvm_vcpu(struct tvm *t, struct tvcpu *v, uint32_t id);
void tvm_mailbox(struct tvm *t, uint32_t id, uint64_t gpa, uint64_t pages, uint32_t stores, uint32_t seed);
void tvm_iteration(struct tvm *t, uint32_t id, uint32_t it);
/* Runs one guest round; handles ring-full exits with kds_reap_vcpu.
 * Returns the ring-full exits, or -1 when kds_reap_vcpu reported a wedge. */
long tvcpu_round(struct tvm *t, struct tvcpu *v);
void tvcpu_free(struct tvcpu *v);

void *map_anon(size_t len);
void checker_init(struct checker *c, uint32_t slot, uint64_t pages);
void checker_free(struct checker *c);
/* Syncs the slot (its writers out of guest mode), compares with the shadow;
 * returns the pages lost in this check. */
uint64_t checker_check(struct checker *c, KdsVm *vm, uint32_t flags);

#endif
