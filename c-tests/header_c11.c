/* The header compiles as C11 with -Wall -Wextra -Werror -pedantic. */
#include "kvm_dirty_shim.h"

int main(void)
{
    KdsStats s = { 0 };
    KdsMemslot m = { 0 };
    (void)m;
    return (int)s.entries_reaped + (kds_abi_version() == KDS_ABI_VERSION ? 0 : 1);
}
