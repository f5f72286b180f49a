/* Built as QEMU's kvm-all.c is: with the library where the snippet found
 * cargo (CONFIG_KVM_DIRTY_SHIM), without it elsewhere. */
#include <stdio.h>
#include "config-host.h"
#ifdef CONFIG_KVM_DIRTY_SHIM
#include "kvm_dirty_shim.h"
#endif

int main(void)
{
#ifdef CONFIG_KVM_DIRTY_SHIM
    KdsVm *vm;
    if (kds_abi_version() < KDS_ABI_VERSION || kds_vm_create(0, &vm) != 0) {
        fprintf(stderr, "kds_vm_create: %s\n", kds_last_error());
        return 1;
    }
    int r = kds_dirty_ring_enable(vm, 4096);
    int mode = kds_vm_mode(vm);
    kds_vm_free(vm);
    printf("consumer: with kvm-dirty-shim: ring enable %d, mode %d\n", r, mode);
    return r == 0 && mode == KDS_MODE_RING ? 0 : 1;
#else
    printf("consumer: without kvm-dirty-shim\n");
    return 0;
#endif
}
