/*
 * x86 C test harness for kvm-dirty-shim: a real VM on /dev/kvm running the
 * tiny x86 guest of guest/guest.S (its bytes are loaded from guest/guest.bin,
 * the same file the Rust tests use). Only the public header is used to talk
 * to the shim; the no-loss check is in kds_check.h.
 */
#ifndef KDS_TEST_H
#define KDS_TEST_H

#include <linux/kvm.h>

#include "kds_check.h"

#ifndef KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
#define KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP 225 /* Debian 12's linux/kvm.h is 6.1 */
#endif
#ifndef KVM_EXIT_DIRTY_RING_FULL
#define KVM_EXIT_DIRTY_RING_FULL 31
#endif

#define PAGE 4096u
/* Slot 0: guest code in page 0, vCPU i's mailbox in page 1 + i, its stack
 * below page CODE_PAGES - i. */
#define MAX_VCPUS 16u
#define CODE_PAGES (2u * MAX_VCPUS + 2u)
#define TEST_GPA 0x100000u

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

/* ring_entries 0: bitmap mode. manual_protect < 0: leave the default. */
void tvm_init(struct tvm *t, uint32_t ring_entries, int manual_protect);
void tvm_free(struct tvm *t);
void tvm_set_slot(struct tvm *t, uint32_t slot, uint64_t gpa, void *mem, uint64_t size, uint32_t flags);
void tvm_vcpu(struct tvm *t, struct tvcpu *v, uint32_t id);
/* The same vCPU setup without kds_vcpu_add (a VMM's own vCPU, for the
 * plain-C comparison in bench_harvest.c). */
void tvm_vcpu_unregistered(struct tvm *t, struct tvcpu *v, uint32_t id);
void tvm_mailbox(struct tvm *t, uint32_t id, uint64_t gpa, uint64_t pages, uint32_t stores, uint32_t seed);
void tvm_iteration(struct tvm *t, uint32_t id, uint32_t it);
/* Runs one guest round; handles ring-full exits with kds_vcpu_reap.
 * Returns the ring-full exits, or -1 when kds_vcpu_reap reported a wedge. */
long tvcpu_round(struct tvm *t, struct tvcpu *v);
void tvcpu_free(struct tvcpu *v);

#endif
