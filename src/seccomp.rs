//! The system calls this library makes, thread by thread, for a VMM that
//! runs every thread under a seccomp allow-list of its own (Firecracker,
//! cloud-hypervisor): the lists to add to each thread's filter, and the
//! KVM `ioctl` requests to allow on the VM fd. `examples/rust_vmm.rs`
//! builds its filters from them with rust-vmm's `seccompiler`, and tracks
//! exactly under them.
//!
//! Setup (adopt or create, `enable_dirty_ring`, `board_init`,
//! `set_manual_protect`, `update_memslot`, `create_vcpu` / `add_vcpu`)
//! normally runs before any filter; it makes, besides [`TRACKING`]:
//! `openat` (`/dev/kvm`), `fcntl` (`F_DUPFD_CLOEXEC` of the VM fd),
//! `readlink` / `readlinkat` (`/proc/self/fd`), `kcmp` and `getpid` (is
//! that VM tracked already?), `close`, `mprotect`, and the ioctls
//! `KVM_CHECK_EXTENSION`, `KVM_ENABLE_CAP`, `KVM_CREATE_VCPU`,
//! `KVM_GET_VCPU_MMAP_SIZE`, `KVM_SET_USER_MEMORY_REGION` and
//! `KVM_RESET_DIRTY_RINGS`.
//!
//! What the lists hold and why:
//! - `ioctl`: the KVM requests of [`TRACKING_IOCTLS`].
//! - `rt_sigprocmask`, `rt_sigpending`, `getrusage`: around every
//!   `KVM_RESET_DIRTY_RINGS` (signals are blocked through it, and a stop
//!   during it is detected; see doc/abi.md).
//! - `futex`, `sched_yield`: the locks (parking_lot) and the reaper's wait.
//! - `mmap`, `munmap`, `madvise`, `mremap`, `brk`: the allocator (bitmaps
//!   are allocated when logging starts, and after a ring overrun).
//! - `getrandom`: the first hash map a thread makes (std's `RandomState`).
//! - `clock_gettime`: timing, where the vDSO falls back to the system call.
//!
//! The `log` backend the VMM installs makes its own calls on every thread
//! the library logs from (the reaper's included): add those too.

use libc::c_long;

/// `KVM_RESET_DIRTY_RINGS`: `_IO(KVMIO, 0xc7)`.
pub const KVM_RESET_DIRTY_RINGS: u64 = crate::kvm::KVM_RESET_DIRTY_RINGS;
/// `KVM_SET_USER_MEMORY_REGION`: `_IOW(KVMIO, 0x46, struct
/// kvm_userspace_memory_region)`.
pub const KVM_SET_USER_MEMORY_REGION: u64 = crate::kvm::KVM_SET_USER_MEMORY_REGION;
/// `KVM_GET_DIRTY_LOG`: `_IOW(KVMIO, 0x42, struct kvm_dirty_log)`.
pub const KVM_GET_DIRTY_LOG: u64 = crate::kvm::KVM_GET_DIRTY_LOG;
/// `KVM_CLEAR_DIRTY_LOG`: `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
pub const KVM_CLEAR_DIRTY_LOG: u64 = crate::kvm::KVM_CLEAR_DIRTY_LOG;

/// The `ioctl` requests, all on the VM fd, of every call made while
/// tracking (syncs, clears, reaps, `handle_exit`, logging toggles, slot
/// deletes, ending tracking) and of the reaper thread: resets, the bitmap
/// syncs, and the memslot updates that re-arm dirty logging after a ring
/// overrun.
pub const TRACKING_IOCTLS: &[u64] = &[
    KVM_RESET_DIRTY_RINGS,
    KVM_SET_USER_MEMORY_REGION,
    KVM_GET_DIRTY_LOG,
    KVM_CLEAR_DIRTY_LOG,
];

/// The system calls a caller's thread makes inside any call made while
/// tracking: `sync_memslot*`, `clear_memslot`, `reap`, `flush` (besides
/// the caller's kick), `VcpuTracker::handle_exit`, `update_memslot*` and
/// `delete_memslot`, `disable_reaper`, `release` and `Drop`.
pub const TRACKING: &[c_long] = &[
    libc::SYS_ioctl,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigpending,
    libc::SYS_getrusage,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
];

/// What `enable_reaper` / `enable_reaper_with` add to [`TRACKING`] on the
/// calling thread, and what the new thread makes before its `on_start`
/// runs, under the filter it inherits from the caller: creating and
/// starting a thread (std and the C library).
pub const REAPER_START: &[c_long] = &[
    libc::SYS_clone3,
    libc::SYS_clone,
    libc::SYS_mprotect,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sigaltstack,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_exit,
];

/// What the reaper thread makes beside [`TRACKING`] (its reaps, and the
/// re-arm of dirty logging after an overrun), after its `on_start` and
/// to its end: the thread's exit.
pub const REAPER_THREAD: &[c_long] = &[libc::SYS_exit, libc::SYS_sigaltstack];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_list_repeats_a_call_of_tracking() {
        for s in REAPER_THREAD.iter().chain(REAPER_START) {
            assert!(!TRACKING.contains(s), "{s}");
        }
    }
}
