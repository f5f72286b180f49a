// The header compiles as C++ (extern "C") with -Wall -Wextra -Werror -pedantic.
#include "kvm_dirty_shim.h"

int main()
{
    KdsStats s{};
    return static_cast<int>(s.entries_reaped) + (kds_abi_version() == KDS_ABI_VERSION ? 0 : 1);
}
