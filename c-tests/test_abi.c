/* The ABI's refusals and bad input, kds_vm_adopt's fd ownership, the logger
 * and the version, through the public header on the real /dev/kvm. */
#include "kds_test.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
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
    EXPECT(kds_vcpu_reap(vm, 7), EINVAL);
    EXPECT(kds_vcpu_remove(vm, 7), EINVAL);

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
    EXPECT(kds_kick_set(NULL, NULL, NULL), EINVAL);
    EXPECT(kds_flush(NULL), EINVAL);
    EXPECT(kds_stats_get(NULL, &s, sizeof(KdsStats)), EINVAL);
    EXPECT(kds_vcpu_stats_get(NULL, 0, &vs, sizeof(KdsVcpuStats)), EINVAL);
    EXPECT(kds_vm_create(0, NULL), EINVAL);
    EXPECT(kds_vm_adopt(-1, NULL), EINVAL);
    kds_vm_free(NULL);
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
    CHECK(kds_abi_version() == KDS_ABI_VERSION, "ABI version %u", kds_abi_version());
    ordering();
    nulls();
    adopt_keeps_fd();
    logging();
    printf("%s (%d failures)\n", kds_test_failures ? "FAILED" : "ok", kds_test_failures);
    return kds_test_failures ? 1 : 0;
}
