//! The public Rust API: [`DirtyTracker`], the dirty-page tracking of one
//! KVM VM, and [`VcpuTracker`], one vCPU's part of it, for the vCPU's
//! thread. The C ABI (`capi`, feature `capi`) is a thin skin over the same
//! core, so both enforce the same ordering rules and give the same
//! guarantees.
//!
//! What the types guarantee:
//! - A page reaches the caller only through a sync
//!   ([`DirtyTracker::sync_memslot`]), which publishes a harvested ring
//!   entry only after `KVM_RESET_DIRTY_RINGS` has re-protected its page. A
//!   write after the caller copied the page therefore faults again and is
//!   reported at the next sync. There is no way to see a harvested page
//!   earlier.
//! - The ordering rules (ring before memslots and vCPUs, the board hook
//!   before the first memslot) return [`ErrorKind::Ordering`] errors.
//! - Dropping the tracker stops its reaper thread; the VM's rings and fd
//!   are freed once the last [`VcpuTracker`] is gone too.
//!
//! Names: an operation has one name in every layer. The C function
//! `kds_<noun>_<verb>` is the method `<verb>_<noun>` here (`kds_memslot_update`
//! is [`DirtyTracker::update_memslot`], `kds_reaper_enable` is
//! [`DirtyTracker::enable_reaper`]), and the core's method has the same name.

use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};

use kvm_ioctls::{VcpuFd, VmFd};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, ErrorKind, Result};
use crate::reaper::{Config as CheckedReaperConfig, Reaper};
use crate::types::{
    BoardFlags, Memslot, Mode, ReaperConfig, SlotId, Stats, SyncReport, SyncStage, VcpuStats,
};
use crate::vm::Vm;

/// The dirty-page tracking of one KVM VM: its mode (ring or bitmap), its
/// memslots, its vCPUs' rings, the reaper, and the sync into the caller's
/// bitmaps.
///
/// The call order: create or adopt, then optionally
/// [`enable_dirty_ring`](Self::enable_dirty_ring), then
/// [`board_init`](Self::board_init), then memslots, then vCPUs. Every
/// method takes `&self` and is thread-safe: share the tracker with an
/// `Arc` with the migration thread; each vCPU thread owns its
/// [`VcpuTracker`].
///
/// ```
/// use kvm_dirty_shim::{
///     BoardFlags, DirtyTracker, ErrorKind, Memslot, MemslotFlags, SlotId, SyncStage,
/// };
/// use kvm_ioctls::Kvm;
///
/// let kvm = Kvm::new().expect("/dev/kvm");
/// let vm = kvm.create_vm().unwrap();
/// let tracker = DirtyTracker::adopt(&vm).unwrap();
/// // The ring where the kernel has one; bitmap mode otherwise.
/// if let Err(e) = tracker.enable_dirty_ring(4096) {
///     assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
/// }
/// // No device that writes guest memory without a vCPU.
/// tracker.board_init(BoardFlags::empty()).unwrap();
///
/// // 1 MiB of guest RAM at guest-physical 0, dirty-logged.
/// let len = 1 << 20;
/// // SAFETY: a fresh anonymous mapping, checked below.
/// let host = unsafe {
///     libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE,
///                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
/// };
/// assert_ne!(host, libc::MAP_FAILED);
/// let slot = SlotId::new(0);
/// let m = Memslot::new(slot, 0, host as u64, len as u64)
///     .with_flags(MemslotFlags::LOG_DIRTY_PAGES);
/// // SAFETY: the mapping outlives the slot (the tracker is dropped first).
/// unsafe { tracker.update_memslot(&m) }.unwrap();
/// let vcpu_fd = vm.create_vcpu(0).unwrap();
/// let vcpu = tracker.add_vcpu(&vcpu_fd, 0).unwrap();
///
/// // ... run the vCPU (see VcpuTracker::handle_exit); then, each round:
/// let mut dirty = vec![0u64; len / 4096 / 64];
/// let r = tracker.sync_memslot(slot, &mut dirty, SyncStage::Live).unwrap();
/// assert_eq!(r.pages, 0); // nothing ran, nothing is dirty
/// drop(vcpu);
/// drop(tracker);
/// // SAFETY: nothing refers to the mapping any more.
/// unsafe { libc::munmap(host, len) };
/// ```
pub struct DirtyTracker {
    vm: Arc<Vm>,
    /// The adaptive reaper thread while it runs (it holds the VM weakly).
    reaper: Mutex<Option<Reaper>>,
}

impl DirtyTracker {
    /// Creates a VM (`KVM_CREATE_VM` with `machine_type`, 0 on x86) and
    /// tracks it. [`vm_fd`](Self::vm_fd) is its fd.
    pub fn create(machine_type: u64) -> Result<Self> {
        Ok(Self::from_vm(Vm::create(machine_type)?))
    }

    /// Tracks a VM the caller created with kvm-ioctls. The tracker keeps
    /// its own duplicate of the fd, so `vm` may be dropped independently.
    ///
    /// Errors: [`ErrorKind::InUse`] when this process tracks that VM
    /// already (two trackers would each reset the other's rings).
    ///
    /// ```
    /// use kvm_dirty_shim::{DirtyTracker, ErrorKind};
    /// let kvm = kvm_ioctls::Kvm::new().unwrap();
    /// let vm = kvm.create_vm().unwrap();
    /// let t = DirtyTracker::adopt(&vm).unwrap();
    /// assert_eq!(DirtyTracker::adopt(&vm).unwrap_err().kind(), ErrorKind::InUse);
    /// ```
    pub fn adopt(vm: &VmFd) -> Result<Self> {
        // SAFETY: `vm` owns its fd and outlives this borrow.
        Self::adopt_fd(unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) })
    }

    /// [`adopt`](Self::adopt) for a VMM not built on kvm-ioctls: any
    /// borrowed fd (`x.as_fd()`).
    ///
    /// Errors: [`ErrorKind::InvalidArgument`] when `vm` is not a KVM VM
    /// fd (`/dev/kvm` itself, a vCPU, any other file);
    /// [`ErrorKind::InUse`] as for `adopt`.
    ///
    /// ```
    /// use std::os::fd::AsFd;
    /// use kvm_dirty_shim::{DirtyTracker, ErrorKind};
    /// let dev_kvm = std::fs::File::open("/dev/kvm").unwrap();
    /// let e = DirtyTracker::adopt_fd(dev_kvm.as_fd()).unwrap_err();
    /// assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    /// ```
    pub fn adopt_fd(vm: BorrowedFd<'_>) -> Result<Self> {
        Ok(Self::from_vm(Vm::adopt(vm.as_raw_fd())?))
    }

    fn from_vm(vm: Vm) -> Self {
        DirtyTracker {
            vm: Arc::new(vm),
            reaper: Mutex::new(None),
        }
    }

    /// The core (for the vm-memory module).
    #[cfg(feature = "vm-memory")]
    pub(crate) fn vm_core(&self) -> &Vm {
        &self.vm
    }

    /// The VM fd the tracker uses (for an adopted VM, its duplicate).
    pub fn vm_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd is owned by the tracker's VM, which lives as long
        // as `self`, and so as long as the returned borrow.
        unsafe { BorrowedFd::borrow_raw(self.vm.fd()) }
    }

    /// The tracking mode; fixed once the first memslot exists.
    pub fn mode(&self) -> Mode {
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
    /// any vCPU is created and any memslot exists
    /// (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`, else `KVM_CAP_DIRTY_LOG_RING`).
    ///
    /// Errors: [`ErrorKind::Unsupported`] where the kernel has no ring
    /// (stay in bitmap mode); [`ErrorKind::Ordering`] after a memslot or a
    /// vCPU; [`ErrorKind::InvalidArgument`] for a size the kernel does not
    /// take.
    pub fn enable_dirty_ring(&self, entries: u32) -> Result<()> {
        self.vm.enable_dirty_ring(entries)
    }

    /// The board-init ordering hook: call it as soon as the board knows
    /// whether it has a device that writes guest memory without a running
    /// vCPU ([`BoardFlags::VGIC_ITS`]), before the first memslot. With a
    /// ring and the ITS it enables `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`.
    pub fn board_init(&self, board: BoardFlags) -> Result<()> {
        self.vm.board_init(board.bits())
    }

    /// Whether bitmap mode uses `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (default:
    /// yes where the kernel offers it). Before the first memslot.
    pub fn set_manual_protect(&self, enable: bool) -> Result<()> {
        self.vm.set_manual_protect(enable)
    }

    /// Creates, changes or (with `memory_size` 0, [`Memslot::delete`])
    /// deletes a memslot (`KVM_SET_USER_MEMORY_REGION`), keeping the
    /// shim's bitmaps in step. With the `vm-memory` feature, the safe
    /// `update_memslot_region` does this for a region the tracker then
    /// keeps alive.
    ///
    /// # Safety
    ///
    /// `userspace_addr .. + memory_size` must be memory of this process
    /// that stays mapped while the slot exists (the kernel maps it into the
    /// guest), as for `KVM_SET_USER_MEMORY_REGION`.
    pub unsafe fn update_memslot(&self, m: &Memslot) -> Result<()> {
        // SAFETY: the caller's contract is this function's. Whatever the
        // VM kept of the slot's memory (`update_memslot_region`) is let go
        // once the slot is gone or maps other memory.
        unsafe { self.vm.update_memslot(&m.region(), None) }
    }

    /// Registers vCPU `index` (created with kvm-ioctls); in ring mode
    /// maps its ring (the mapping does not need the fd to stay open).
    /// Returns the handle the vCPU's thread owns; dropping it unregisters
    /// the vCPU. [`ErrorKind::AlreadyExists`] for an index registered
    /// already.
    pub fn add_vcpu(&self, vcpu: &VcpuFd, index: u32) -> Result<VcpuTracker> {
        // SAFETY: `vcpu` owns its fd and outlives this borrow.
        self.add_vcpu_fd(unsafe { BorrowedFd::borrow_raw(vcpu.as_raw_fd()) }, index)
    }

    /// [`add_vcpu`](Self::add_vcpu) for a VMM not built on kvm-ioctls:
    /// the vCPU's fd from `KVM_CREATE_VCPU`, borrowed.
    pub fn add_vcpu_fd(&self, vcpu: BorrowedFd<'_>, index: u32) -> Result<VcpuTracker> {
        self.vm.add_vcpu(vcpu.as_raw_fd(), index)?;
        Ok(VcpuTracker {
            vm: Arc::clone(&self.vm),
            index,
            removed: false,
        })
    }

    /// The C ABI's `kds_vcpu_add`: registers without a handle.
    #[cfg(feature = "capi")]
    pub(crate) fn add_vcpu_index(&self, vcpu: BorrowedFd<'_>, index: u32) -> Result<()> {
        self.vm.add_vcpu(vcpu.as_raw_fd(), index)
    }

    /// The C ABI's `kds_vcpu_remove`.
    #[cfg(feature = "capi")]
    pub(crate) fn remove_vcpu(&self, index: u32) -> Result<()> {
        self.vm.remove_vcpu(index)
    }

    /// The C ABI's `kds_vcpu_reap`.
    #[cfg(feature = "capi")]
    pub(crate) fn reap_vcpu(&self, index: u32) -> Result<u64> {
        self.vm.reap_vcpu(index)
    }

    /// Harvests every ring and resets them; returns the entries harvested.
    /// In bitmap mode: 0. (A sync reaps by itself; this is for a VMM that
    /// reaps on its own schedule instead of [`enable_reaper`](Self::enable_reaper).)
    pub fn reap(&self) -> Result<u64> {
        self.vm.reap()
    }

    /// ORs into `out` (bit `i % 64` of word `i / 64` is the slot's page
    /// `i`, the layout of `KVM_GET_DIRTY_LOG`) every page of `slot`
    /// dirtied since its previous sync. `out` must hold the slot's pages.
    /// The report says how many pages, and whether the whole slot was
    /// reported after a ring overrun.
    pub fn sync_memslot(
        &self,
        slot: SlotId,
        out: &mut [u64],
        stage: SyncStage,
    ) -> Result<SyncReport> {
        let nbits = out.len() as u64 * 64;
        self.vm
            .sync_memslot(slot.raw(), out, nbits, stage == SyncStage::Final)
    }

    /// As [`sync_memslot`](Self::sync_memslot), handing each dirty page
    /// (its index in the slot) to `f` in ascending order instead of
    /// filling a bitmap: in ring modes without any buffer of the slot's
    /// size. To merge into a vm-memory `Bitmap`, see `sync_memslot_into`
    /// (feature `vm-memory`).
    pub fn sync_memslot_each(
        &self,
        slot: SlotId,
        stage: SyncStage,
        f: impl FnMut(u64),
    ) -> Result<SyncReport> {
        self.vm
            .sync_memslot_each(slot.raw(), stage == SyncStage::Final, f)
    }

    /// As [`sync_memslot`](Self::sync_memslot), handing the dirty pages to
    /// `f` as runs of consecutive bitmap words: `f(first_page, words)`,
    /// where bit `j % 64` of `words[j / 64]` is the slot's page
    /// `first_page + j` (`first_page` a multiple of 64, at most
    /// [`SYNC_RUN_WORDS_MAX`](crate::SYNC_RUN_WORDS_MAX) words a run,
    /// ascending, no empty run). In ring modes the sync visits only
    /// the words that hold dirty pages, so it costs what was dirtied, not
    /// the slot's size: for a caller that marks its own dirty bitmap word
    /// by word (QEMU's `physical_memory_set_dirty_lebitmap`). `f` runs on
    /// this thread before the call returns, all runs but the last with the
    /// VM's reap lock held: it must not call into this tracker.
    pub fn sync_memslot_runs(
        &self,
        slot: SlotId,
        stage: SyncStage,
        f: impl FnMut(u64, &[u64]),
    ) -> Result<SyncReport> {
        self.vm
            .sync_memslot_runs(slot.raw(), stage == SyncStage::Final, f)
    }

    /// Tells the tracker that the caller is about to read (send) the
    /// pages in `pages` (indices in `slot`) that its syncs reported: those
    /// written again since their report are left out of the next sync,
    /// which would report them for a write the read already carries. What
    /// `KVM_CLEAR_DIRTY_LOG` does for a bitmap (QEMU clears each chunk of
    /// a RAMBlock before sending its first page). Only pages a sync
    /// reported since the last clear of their range are left out; a write
    /// after this call is reported as always. Returns how many were left
    /// out; 0 in bitmap mode (each sync clears what it reports), after a
    /// ring overrun until the next sync, and for a slot changed since its
    /// last sync.
    ///
    /// Call it only right before reading the pages: one reported and left
    /// out here but never read afterwards is lost to the caller.
    /// [`ErrorKind::InvalidArgument`] for a range past the slot's end.
    pub fn clear_memslot(&self, slot: SlotId, pages: Range<u64>) -> Result<u64> {
        let n = pages.end.saturating_sub(pages.start);
        self.vm.clear_memslot(slot.raw(), pages.start, n)
    }

    /// The C ABI's `kds_memslot_sync`: `nbits` valid bits in `out`.
    #[cfg(feature = "capi")]
    pub(crate) fn sync_memslot_bits(
        &self,
        slot: u32,
        out: &mut [u64],
        nbits: u64,
        final_stage: bool,
    ) -> Result<SyncReport> {
        self.vm.sync_memslot(slot, out, nbits, final_stage)
    }

    /// Kicks every vCPU out of guest mode with `kick` (so that hardware
    /// buffers such as Intel PML reach the rings), then reaps.
    pub fn flush(&self, kick: impl FnOnce()) -> Result<u64> {
        kick();
        self.vm.reap()
    }

    /// Starts the adaptive reaper thread, which reaps each ring by its fill
    /// level, and is woken when a memslot turns dirty logging on.
    /// [`ErrorKind::InUse`] when one runs, [`ErrorKind::Unsupported`] in
    /// bitmap mode, [`ErrorKind::InvalidArgument`] for a config out of
    /// range.
    pub fn enable_reaper(&self, cfg: &ReaperConfig) -> Result<()> {
        let cfg = CheckedReaperConfig::new(cfg)?;
        self.vm.check_reaper()?;
        let mut r = self.reaper.lock();
        if r.is_some() {
            return Err(Error::with_kind(
                ErrorKind::InUse,
                libc::EBUSY,
                "the reaper already runs; disable_reaper it first",
            ));
        }
        let reaper = Reaper::start(&self.vm, cfg)?;
        self.vm.set_reaper_wake(Some(Arc::clone(reaper.wake())));
        *r = Some(reaper);
        Ok(())
    }

    /// Stops the reaper thread and waits for it (at most one reap);
    /// nothing to do when none runs. `EDEADLK` from the reaper thread
    /// itself (a logger calling it).
    pub fn disable_reaper(&self) -> Result<()> {
        let mut g = self.reaper.lock();
        if g.as_ref()
            .is_some_and(|r| r.thread_id() == std::thread::current().id())
        {
            return Err(Error::new(
                libc::EDEADLK,
                "stopping the reaper from the reaper thread itself (a logger?): it would \
                 wait for itself; call it from another thread",
            ));
        }
        let r = g.take();
        drop(g);
        self.vm.set_reaper_wake(None);
        if let Some(r) = r {
            r.stop();
        }
        Ok(())
    }

    /// The VM's counters.
    pub fn stats(&self) -> Stats {
        self.vm.stats()
    }

    /// One vCPU's counters (the migration thread's view of
    /// [`VcpuTracker::stats`]); [`ErrorKind::NotFound`] for an unknown vCPU.
    pub fn vcpu_stats(&self, index: u32) -> Result<VcpuStats> {
        self.vm.vcpu_stats(index)
    }
}

impl Drop for DirtyTracker {
    /// Stops the reaper, so that the VM, its rings and its fd are freed
    /// with the tracker (or with the last [`VcpuTracker`]).
    fn drop(&mut self) {
        if let Err(e) = self.disable_reaper() {
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

/// What a vCPU thread does after [`VcpuTracker::handle_exit`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitAction {
    /// Not `KVM_EXIT_DIRTY_RING_FULL`: handle the exit as before.
    NotDirtyRingFull,
    /// The ring was reaped (`harvested` entries; 0 when the kernel had
    /// overrun it and the shim handed the ring back and reported every
    /// page dirty): re-enter the guest.
    Reenter {
        /// Entries harvested.
        harvested: u64,
    },
    /// The ring stayed wedged: the kernel overran it 1024 times in a row
    /// and its pages cannot be trusted. Fail the migration (a later one
    /// must resend all of RAM); the error says what happened.
    FailMigration(Error),
}

/// One vCPU's dirty tracking, owned by the vCPU's thread
/// ([`DirtyTracker::add_vcpu`]). Dropping it unregisters the vCPU,
/// harvesting what its ring still holds.
///
/// ```no_run
/// # use kvm_dirty_shim::{DirtyTracker, ExitAction};
/// # use kvm_ioctls::VcpuExit;
/// # fn run(tracker: &DirtyTracker, mut vcpu: kvm_ioctls::VcpuFd) -> Result<(), Box<dyn std::error::Error>> {
/// let dirty = tracker.add_vcpu(&vcpu, 0)?;
/// loop {
///     match vcpu.run()? {
///         VcpuExit::Hlt => break,
///         VcpuExit::Unsupported(reason) => match dirty.handle_exit(reason)? {
///             ExitAction::Reenter { .. } => continue,
///             ExitAction::FailMigration(e) => return Err(e.into()),
///             _ => panic!("unexpected exit {reason}"),
///         },
///         _ => { /* the VMM's own exits */ }
///     }
/// }
/// # Ok(()) }
/// ```
pub struct VcpuTracker {
    vm: Arc<Vm>,
    index: u32,
    /// `remove` ran: nothing left for `drop`.
    removed: bool,
}

impl VcpuTracker {
    /// The vCPU's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Takes the exit reason `KVM_RUN` returned (`kvm_run.exit_reason`;
    /// kvm-ioctls reports `KVM_EXIT_DIRTY_RING_FULL` as
    /// `VcpuExit::Unsupported(reason)`) and does what it needs: for a
    /// ring-full exit, reaps this vCPU's ring before the vCPU re-enters.
    /// Any other exit is [`ExitAction::NotDirtyRingFull`].
    pub fn handle_exit(&self, exit_reason: u32) -> Result<ExitAction> {
        if exit_reason != kvm_bindings::KVM_EXIT_DIRTY_RING_FULL {
            return Ok(ExitAction::NotDirtyRingFull);
        }
        match self.vm.reap_vcpu(self.index) {
            Ok(harvested) => Ok(ExitAction::Reenter { harvested }),
            Err(e) if e.kind() == ErrorKind::RingWedged => Ok(ExitAction::FailMigration(e)),
            Err(e) => Err(e),
        }
    }

    /// This vCPU's counters.
    pub fn stats(&self) -> Result<VcpuStats> {
        self.vm.vcpu_stats(self.index)
    }

    /// Unregisters the vCPU now, harvesting what its ring still holds
    /// (dropping the handle does the same, logging a failure).
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        self.vm.remove_vcpu(self.index)
    }
}

impl std::fmt::Debug for VcpuTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuTracker")
            .field("index", &self.index)
            .finish()
    }
}

impl Drop for VcpuTracker {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        if let Err(e) = self.vm.remove_vcpu(self.index) {
            log::error!("vCPU {}: {e}", self.index);
        }
    }
}

/// The dirty pages of a bitmap in `KVM_GET_DIRTY_LOG`'s layout (what
/// [`DirtyTracker::sync_memslot`] fills), as page indexes in ascending
/// order.
///
/// ```
/// let bm = [0b1010u64, 1];
/// let pages: Vec<u64> = kvm_dirty_shim::dirty_pages(&bm).collect();
/// assert_eq!(pages, [1, 3, 64]);
/// // Guest-physical addresses of a slot at 1 MiB, 4 KiB pages:
/// let gpas: Vec<u64> = kvm_dirty_shim::dirty_pages(&bm)
///     .map(|p| 0x10_0000 + p * 4096)
///     .collect();
/// assert_eq!(gpas[0], 0x10_1000);
/// ```
pub fn dirty_pages(bitmap: &[u64]) -> DirtyPages<'_> {
    DirtyPages {
        words: bitmap,
        index: 0,
        cur: bitmap.first().copied().unwrap_or(0),
    }
}

/// The iterator of [`dirty_pages`].
#[derive(Debug, Clone)]
pub struct DirtyPages<'a> {
    words: &'a [u64],
    index: usize,
    cur: u64,
}

impl Iterator for DirtyPages<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        while self.cur == 0 {
            self.index += 1;
            self.cur = *self.words.get(self.index)?;
        }
        let bit = self.cur.trailing_zeros();
        self.cur &= self.cur - 1;
        Some(self.index as u64 * 64 + u64::from(bit))
    }
}
