/* Links through the meson snippet and calls into the library. */
#include <stdio.h>
#include "kvm_dirty_shim.h"

int main(void)
{
    KdsVm *vm;
    if (kds_abi_version() != KDS_ABI_VERSION || kds_vm_create(0, &vm) != 0) {
        fprintf(stderr, "kds_vm_create: %s\n", kds_last_error());
        return 1;
    }
    int r = kds_dirty_ring_enable(vm, 4096);
    int mode = kds_vm_mode(vm);
    kds_vm_free(vm);
    printf("consumer: ring enable %d, mode %d\n", r, mode);
    return r == 0 && mode == KDS_MODE_RING ? 0 : 1;
}
