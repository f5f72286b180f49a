#include "kds_test.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void load_guest(uint8_t *dst)
{
    FILE *f = fopen(KDS_GUEST_BIN, "rb");
    if (!f) {
        die("open " KDS_GUEST_BIN);
    }
    size_t n = fread(dst, 1, PAGE, f);
    fclose(f);
    if (n == 0) {
        die("read guest.bin");
    }
}

void tvm_init(struct tvm *t, uint32_t ring_entries, int manual_protect)
{
    t->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (t->kvm_fd < 0) {
        die("open /dev/kvm");
    }
    t->vm_fd = ioctl(t->kvm_fd, KVM_CREATE_VM, 0);
    if (t->vm_fd < 0) {
        die("KVM_CREATE_VM");
    }
    if (kds_vm_adopt(t->vm_fd, &t->vm) != 0) {
        die("kds_vm_adopt");
    }
    if (ring_entries && kds_dirty_ring_enable(t->vm, ring_entries) != 0) {
        die("kds_dirty_ring_enable");
    }
    if (kds_board_init(t->vm, 0) != 0) {
        die("kds_board_init");
    }
    if (manual_protect >= 0 && kds_manual_protect_set(t->vm, manual_protect != 0) != 0) {
        die("kds_manual_protect_set");
    }
    t->code = map_anon(CODE_PAGES * PAGE);
    load_guest(t->code);
    tvm_set_slot(t, 0, 0, t->code, CODE_PAGES * PAGE, 0);
}

void tvm_free(struct tvm *t)
{
    kds_vm_free(t->vm);
    munmap(t->code, CODE_PAGES * PAGE);
    close(t->vm_fd);
    close(t->kvm_fd);
}

void tvm_set_slot(struct tvm *t, uint32_t slot, uint64_t gpa, void *mem, uint64_t size, uint32_t flags)
{
    KdsMemslot m = {
        .slot = slot,
        .flags = flags,
        .guest_phys_addr = gpa,
        .memory_size = size,
        .userspace_addr = (uint64_t)(uintptr_t)mem,
    };
    if (kds_memslot_update(t->vm, &m, sizeof(KdsMemslot)) != 0) {
        die("kds_memslot_update");
    }
}

static uint64_t mailbox_gpa(uint32_t id) { return PAGE * (1 + id); }

void tvm_vcpu(struct tvm *t, struct tvcpu *v, uint32_t id)
{
    tvm_vcpu_unregistered(t, v, id);
    if (kds_vcpu_add(t->vm, v->fd, id) != 0) {
        die("kds_vcpu_add");
    }
}

void tvm_vcpu_unregistered(struct tvm *t, struct tvcpu *v, uint32_t id)
{
    if (id >= MAX_VCPUS) {
        fprintf(stderr, "FATAL: vCPU id %u: the harness has room for %u\n", id, MAX_VCPUS);
        exit(2);
    }
    v->index = id;
    v->fd = ioctl(t->vm_fd, KVM_CREATE_VCPU, id);
    if (v->fd < 0) {
        die("KVM_CREATE_VCPU");
    }
    int sz = ioctl(t->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    v->run_size = (size_t)sz;
    v->run = mmap(NULL, v->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
    if (v->run == MAP_FAILED) {
        die("mmap kvm_run");
    }
    struct kvm_sregs sregs;
    if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0) {
        die("KVM_GET_SREGS");
    }
    struct kvm_segment seg = {
        .base = 0, .limit = 0xffffffff, .g = 1, .db = 1, .present = 1,
        .s = 1, .type = 0xb, .selector = 0x8,
    };
    sregs.cs = seg;
    seg.type = 0x3;
    seg.selector = 0x10;
    sregs.ds = sregs.es = sregs.ss = sregs.fs = sregs.gs = seg;
    sregs.cr0 |= 1;
    if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0) {
        die("KVM_SET_SREGS");
    }
    struct kvm_regs regs = {
        .rip = 0, .rflags = 2, .rsi = mailbox_gpa(id), .rsp = PAGE * (CODE_PAGES - id),
    };
    if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0) {
        die("KVM_SET_REGS");
    }
}

static void put32(struct tvm *t, uint64_t off, uint32_t v)
{
    __atomic_store_n((uint32_t *)(t->code + off), v, __ATOMIC_RELAXED);
}

void tvm_mailbox(struct tvm *t, uint32_t id, uint64_t gpa, uint64_t pages, uint32_t stores, uint32_t seed)
{
    uint64_t mb = mailbox_gpa(id);
    put32(t, mb + 4, stores);
    put32(t, mb + 8, seed);
    put32(t, mb + 12, (uint32_t)(pages - 1));
    put32(t, mb + 16, (uint32_t)gpa);
    put32(t, mb + 20, 12);
}

void tvm_iteration(struct tvm *t, uint32_t id, uint32_t it)
{
    put32(t, mailbox_gpa(id), it);
}

long tvcpu_round(struct tvm *t, struct tvcpu *v)
{
    long full = 0;
    time_t deadline = time(NULL) + 60;
    for (int i = 0; i < 1000000; i++) {
        if (time(NULL) > deadline) {
            fprintf(stderr, "FATAL: guest round over 60 s\n");
            exit(2);
        }
        if (ioctl(v->fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR) {
                continue;
            }
            die("KVM_RUN");
        }
        switch (v->run->exit_reason) {
        case KVM_EXIT_IO:
            if (v->run->io.port == 0x10) {
                return full;
            }
            break;
        case KVM_EXIT_DIRTY_RING_FULL: {
            full++;
            int64_t n = kds_vcpu_reap(t->vm, v->index);
            if (n == -EOVERFLOW) {
                return -1;
            }
            if (n < 0) {
                die("kds_vcpu_reap");
            }
            continue;
        }
        default:
            break;
        }
        fprintf(stderr, "FATAL: unexpected exit %u\n", v->run->exit_reason);
        exit(2);
    }
    fprintf(stderr, "FATAL: guest round did not end\n");
    exit(2);
}

void tvcpu_free(struct tvcpu *v)
{
    munmap(v->run, v->run_size);
    close(v->fd);
}

