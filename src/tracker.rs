//! The public Rust API: [`DirtyTracker`], the dirty-page tracking of one
//! KVM VM, for Rust VMMs. The C ABI (`kds_*`) is a thin skin over the same
//! core, so both enforce the same ordering rules and give the same
//! guarantees.
//!
//! What the types guarantee:
//! - A page reaches the caller only through [`DirtyTracker::sync_slot`],
//!   which publishes a harvested ring entry only after
//!   `KVM_RESET_DIRTY_RINGS` has re-protected its page. A write after the
//!   caller copied the page therefore faults again and is reported at the
//!   next sync. There is no way to see a harvested page earlier.
//! - The ordering rules (ring before memslots and vCPUs, the board hook
//!   before the first memslot) return [`Error`]s with `EBUSY`, as through
//!   C.
//! - Dropping the tracker stops its reaper thread, unmaps the rings and
//!   closes its VM fd (its duplicate, for an adopted VM).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use crate::error::Result;
use crate::types::{
    KDS_SYNC_FINAL as SYNC_FINAL, KdsMemslot, KdsMode, KdsReaperConfig, KdsStats, KdsVcpuStats,
};
use crate::vm::Vm;

/// The dirty-page tracking of one KVM VM: its mode (ring or bitmap), its
/// memslots, its vCPUs' rings, the reaper, and the sync into the caller's
/// bitmaps.
///
/// The call order is the C ABI's: create or adopt, then optionally
/// [`enable_dirty_ring`](Self::enable_dirty_ring), then
/// [`board_init`](Self::board_init), then memslots, then vCPUs. Every
/// method takes `&self` and is thread-safe; share the tracker with an
/// `Arc` between the vCPU threads and the migration thread.
///
/// ```
/// use kvm_dirty_shim::{DirtyTracker, KdsMemslot, KDS_MEM_LOG_DIRTY_PAGES};
/// use kvm_ioctls::Kvm;
///
/// let kvm = Kvm::new().expect("/dev/kvm");
/// let vm = kvm.create_vm().unwrap();
/// let tracker = DirtyTracker::adopt(&vm).unwrap();
/// // The ring where the kernel has one; bitmap mode otherwise.
/// if let Err(e) = tracker.enable_dirty_ring(4096) {
///     assert_eq!(e.errno(), libc::ENOTSUP, "{e}");
/// }
/// tracker.board_init(0).unwrap(); // no device that writes without a vCPU
///
/// // 1 MiB of guest RAM at guest-physical 0, dirty-logged.
/// let len = 1 << 20;
/// // SAFETY: a fresh anonymous mapping, checked below.
/// let host = unsafe {
///     libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE,
///                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
/// };
/// assert_ne!(host, libc::MAP_FAILED);
/// let slot = KdsMemslot {
///     slot: 0,
///     flags: KDS_MEM_LOG_DIRTY_PAGES,
///     guest_phys_addr: 0,
///     memory_size: len as u64,
///     userspace_addr: host as u64,
/// };
/// // SAFETY: the mapping outlives the slot (the tracker is dropped first).
/// unsafe { tracker.set_memslot(&slot) }.unwrap();
/// let vcpu = vm.create_vcpu(0).unwrap();
/// tracker.add_vcpu(&vcpu, 0).unwrap();
///
/// // ... run the vCPU; then, each migration round:
/// let mut dirty = vec![0u64; len / 4096 / 64];
/// let pages = tracker.sync_slot(0, &mut dirty, false).unwrap();
/// assert_eq!(pages, 0); // nothing ran, nothing is dirty
/// drop(tracker);
/// // SAFETY: nothing refers to the mapping any more.
/// unsafe { libc::munmap(host, len) };
/// ```
pub struct DirtyTracker {
    vm: Arc<Vm>,
}

impl DirtyTracker {
    /// Creates a VM (`KVM_CREATE_VM` with `machine_type`, 0 on x86) and
    /// tracks it. [`vm_fd`](Self::vm_fd) is its fd.
    pub fn create(machine_type: u64) -> Result<Self> {
        Ok(Self::from_vm(Vm::create(machine_type)?))
    }

    /// Tracks a VM the caller created: the tracker keeps its own duplicate
    /// of the fd, so `vm` may be closed independently. `EINVAL` if it is not
    /// a KVM VM fd.
    pub fn adopt(vm: &impl AsRawFd) -> Result<Self> {
        Ok(Self::from_vm(Vm::adopt(vm.as_raw_fd())?))
    }

    pub(crate) fn from_vm(vm: Vm) -> Self {
        DirtyTracker { vm: Arc::new(vm) }
    }

    /// The VM fd the tracker uses (for an adopted VM, its duplicate).
    pub fn vm_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd is owned by the tracker's VM, which lives as long
        // as `self`, and so as long as the returned borrow.
        unsafe { BorrowedFd::borrow_raw(self.vm.fd()) }
    }

    /// The tracking mode; fixed once the first memslot exists.
    pub fn mode(&self) -> KdsMode {
        self.vm.mode()
    }

    /// The host page size: the unit of slots, bitmaps and ring offsets.
    pub fn page_size(&self) -> u64 {
        self.vm.page_size()
    }

    /// Entries per vCPU ring (0 in bitmap mode).
    pub fn ring_entries(&self) -> u32 {
        self.vm.ring_entries()
    }

    /// Enables the per-vCPU dirty ring (`entries`, a power of two), before
    /// any memslot and vCPU. `ENOTSUP` where the kernel has none: stay in
    /// bitmap mode. See `kds_dirty_ring_enable` for the details.
    pub fn enable_dirty_ring(&self, entries: u32) -> Result<()> {
        self.vm.dirty_ring_enable(entries)
    }

    /// The board-init ordering hook: `flags` is
    /// [`KDS_BOARD_VGIC_ITS`](crate::KDS_BOARD_VGIC_ITS) when the board uses
    /// an in-kernel vGIC ITS, else 0. Before the first memslot.
    pub fn board_init(&self, flags: u32) -> Result<()> {
        self.vm.board_init(flags)
    }

    /// Whether bitmap mode uses `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (default:
    /// yes where the kernel offers it). Before the first memslot.
    pub fn set_manual_protect(&self, enable: bool) -> Result<()> {
        self.vm.set_manual_protect(enable)
    }

    /// Creates, changes or (with `memory_size` 0) deletes a memslot.
    ///
    /// # Safety
    ///
    /// `userspace_addr .. + memory_size` must be memory of this process
    /// that stays mapped while the slot exists (the kernel maps it into the
    /// guest), as for `KVM_SET_USER_MEMORY_REGION`.
    pub unsafe fn set_memslot(&self, m: &KdsMemslot) -> Result<()> {
        // SAFETY: the caller's contract is this function's.
        unsafe { self.vm.memslot_set(m) }
    }

    /// Registers vCPU `index` (its fd from `KVM_CREATE_VCPU`); in ring mode
    /// maps its ring. The mapping does not need the fd to stay open.
    pub fn add_vcpu(&self, vcpu: &impl AsRawFd, index: u32) -> Result<()> {
        self.vm.vcpu_add(vcpu.as_raw_fd(), index)
    }

    /// Unregisters vCPU `index`, harvesting what its ring still holds.
    pub fn remove_vcpu(&self, index: u32) -> Result<()> {
        self.vm.vcpu_remove(index)
    }

    /// Harvests every ring and resets them; returns the entries harvested.
    /// In bitmap mode: 0.
    pub fn reap(&self) -> Result<u64> {
        self.vm.reap()
    }

    /// The reap for a vCPU that exited with `KVM_EXIT_DIRTY_RING_FULL`:
    /// call it from that vCPU's thread before the next `KVM_RUN`.
    pub fn reap_vcpu(&self, index: u32) -> Result<u64> {
        self.vm.reap_vcpu(index)
    }

    /// ORs into `out` (bit `i % 64` of word `i / 64` is the slot's page `i`)
    /// every page of `slot` dirtied since its previous sync; returns how
    /// many. `final_stage`: the last sync of a migration, with the vCPUs
    /// stopped; it also drains the kernel's backup bitmap
    /// (`KDS_MODE_RING_WITH_BITMAP`). `out` must hold the slot's pages.
    pub fn sync_slot(&self, slot: u32, out: &mut [u64], final_stage: bool) -> Result<u64> {
        let nbits = out.len() as u64 * 64;
        let flags = if final_stage { SYNC_FINAL } else { 0 };
        self.vm.sync_slot(slot, out, nbits, flags)
    }

    /// [`sync_slot`](Self::sync_slot) with the C ABI's arguments: `nbits`
    /// valid bits in `out`, `KDS_SYNC_*` flags (unknown ones: `EINVAL`).
    pub(crate) fn sync_slot_bits(
        &self,
        slot: u32,
        out: &mut [u64],
        nbits: u64,
        flags: u32,
    ) -> Result<u64> {
        self.vm.sync_slot(slot, out, nbits, flags)
    }

    /// Kicks every vCPU out of guest mode with `kick` (so that hardware
    /// buffers such as Intel PML reach the rings), then reaps.
    pub fn flush(&self, kick: impl FnOnce()) -> Result<u64> {
        kick();
        self.vm.reap()
    }

    /// Starts the adaptive reaper thread, which reaps each ring by its fill
    /// level, and is woken when `set_memslot` turns dirty logging on.
    /// `EBUSY` when one runs, `ENOTSUP` in bitmap mode.
    pub fn start_reaper(&self, cfg: &KdsReaperConfig) -> Result<()> {
        self.vm.reaper_start(cfg)
    }

    /// Stops the reaper thread and waits for it (at most one reap).
    pub fn stop_reaper(&self) -> Result<()> {
        self.vm.reaper_stop()
    }

    /// The VM's counters.
    pub fn stats(&self) -> KdsStats {
        self.vm.stats()
    }

    /// One vCPU's counters; `ENOENT` for an unknown vCPU.
    pub fn vcpu_stats(&self, index: u32) -> Result<KdsVcpuStats> {
        self.vm.vcpu_stats(index)
    }
}

impl Drop for DirtyTracker {
    /// Stops the reaper (which holds the core), so that the core, its rings
    /// and its VM fd are freed with the tracker.
    fn drop(&mut self) {
        if let Err(e) = self.vm.reaper_stop() {
            log::error!("{e}");
        }
    }
}

impl std::fmt::Debug for DirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTracker")
            .field("vm_fd", &self.vm.fd())
            .field("mode", &self.mode())
            .finish()
    }
}
