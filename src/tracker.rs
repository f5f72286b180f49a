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
//! - Safe code cannot make the kernel reach freed memory, map what is not
//!   a vCPU's ring, or deadlock the tracker (see "Soundness" on
//!   [`DirtyTracker`]).
//! - Dropping the tracker (or [`DirtyTracker::release`]) ends tracking and
//!   hands the VM back running: dirty logging off on every slot, every ring
//!   drained and reset, the reaper gone.
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
use crate::pacer::Config as CheckedReaperConfig;
use crate::reaper::{OnStart, Reaper};
use crate::reentry::enter;
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
/// # Soundness
///
/// No safe method, called in any order with any argument, lets the kernel
/// reach memory Rust has freed, maps anything but a vCPU's dirty ring, or
/// deadlocks:
/// - Memory. A slot made from a vm-memory region
///   ([`update_memslot_region`](Self::update_memslot_region), feature
///   `vm-memory`) keeps the region (its `Arc`) for as long as the kernel
///   can reach it: until [`delete_memslot`](Self::delete_memslot) has
///   removed the slot from the kernel, or another update has pointed it at
///   other memory. A tracker dropped while such a slot exists leaves the
///   slot to the guest, which runs on; the kernel VM lives as long as any
///   fd of it (the VMM's `VmFd`, each `VcpuFd`), which the tracker cannot
///   see, so the region is then never unmapped (leaked, as
///   `std::mem::forget` would). Delete the slots first to get the memory
///   back. A slot made from a raw address is
///   [`update_memslot`](Self::update_memslot), `unsafe`: its memory is the
///   caller's to keep.
/// - vCPUs. [`create_vcpu`](Self::create_vcpu) creates the vCPU on this
///   VM, so its ring is this VM's. [`add_vcpu`](Self::add_vcpu) and
///   [`add_vcpu_fd`](Self::add_vcpu_fd) take a fd the caller created, and
///   nothing the kernel offers tells which VM a vCPU fd belongs to: they
///   are `unsafe`, and still refuse what they can tell (a fd that is not a
///   KVM vCPU, a vCPU registered already, a ring that is not there:
///   mapped and faulted in with `MADV_POPULATE_READ` before any read, so a
///   bad fd is an error, never a `SIGBUS`).
/// - Callbacks. A call into any tracker from inside a tracker call on the
///   same thread (a sync's closure, a vm-memory `Bitmap`, the `log`
///   backend) is [`ErrorKind::WouldDeadlock`], never a deadlock.
///
/// # Ending tracking
///
/// [`release`](Self::release), and `Drop` the same way, hands the VM back
/// running: the reaper stopped, dirty logging turned off on every slot,
/// every ring harvested and reset (so a vCPU never exits ring-full again),
/// the slots left as they are. A later tracker may adopt a VM that had no
/// ring; a VM whose ring is enabled is [`ErrorKind::InUse`] to
/// [`adopt`](Self::adopt) (the kernel enables a ring once per VM, where
/// it pushes next is not visible to a new tracker, and a ring VM has no
/// `KVM_GET_DIRTY_LOG`): to migrate it again, keep the tracker and turn
/// logging on again.
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
/// let (vcpu_fd, vcpu) = tracker.create_vcpu(0).unwrap();
///
/// // ... run the vCPU (see VcpuTracker::handle_exit); then, each round:
/// let mut dirty = vec![0u64; len / 4096 / 64];
/// let r = tracker.sync_memslot(slot, &mut dirty, SyncStage::Live).unwrap();
/// assert_eq!(r.pages, 0); // nothing ran, nothing is dirty
/// // The kernel maps `host` until the slot is deleted.
/// tracker.delete_memslot(slot).unwrap();
/// drop((vcpu, vcpu_fd, tracker));
/// // SAFETY: no slot maps the memory any more.
/// unsafe { libc::munmap(host, len) };
/// ```
pub struct DirtyTracker {
    vm: Arc<Vm>,
    /// The adaptive reaper thread while it runs (it holds the VM weakly).
    reaper: Mutex<Option<Reaper>>,
    /// `release` ended tracking: nothing left for `drop`.
    ended: bool,
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
    /// already (two trackers would each reset the other's rings), or when
    /// its dirty ring is enabled already (an earlier tracker's: see
    /// "Ending tracking").
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
            ended: false,
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
    /// Errors: [`ErrorKind::Unsupported`] where the kernel has no ring, or
    /// is riscv64 before Linux 7.2, whose ring misses writes to huge pages
    /// (stay in bitmap mode); [`ErrorKind::Ordering`] after a memslot or a
    /// vCPU; [`ErrorKind::InvalidArgument`] for a size the kernel does not
    /// take.
    pub fn enable_dirty_ring(&self, entries: u32) -> Result<()> {
        let _g = enter("enable_dirty_ring")?;
        self.vm.enable_dirty_ring(entries)
    }

    /// The board-init ordering hook: call it as soon as the board knows
    /// whether it has a device that writes guest memory without a running
    /// vCPU ([`BoardFlags::VGIC_ITS`]), before the first memslot. With a
    /// ring and the ITS it enables `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`.
    pub fn board_init(&self, board: BoardFlags) -> Result<()> {
        let _g = enter("board_init")?;
        self.vm.board_init(board.bits())
    }

    /// Whether bitmap mode uses `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (default:
    /// yes where the kernel offers it). Before the first memslot.
    pub fn set_manual_protect(&self, enable: bool) -> Result<()> {
        let _g = enter("set_manual_protect")?;
        self.vm.set_manual_protect(enable)
    }

    /// Creates or changes a memslot (`KVM_SET_USER_MEMORY_REGION`) on
    /// memory the caller keeps mapped, keeping the shim's bitmaps in step.
    /// With the `vm-memory` feature, the safe `update_memslot_region` does
    /// this for a region the tracker then keeps alive; a slot is deleted,
    /// safely, with [`delete_memslot`](Self::delete_memslot).
    ///
    /// Errors: [`ErrorKind::AlreadyExists`] when the guest-physical range
    /// overlaps another slot's (the kernel's `EEXIST`);
    /// [`ErrorKind::InvalidArgument`] for an unaligned range or unknown
    /// flags; [`ErrorKind::Ordering`] before [`board_init`](Self::board_init).
    ///
    /// # Safety
    ///
    /// `userspace_addr .. + memory_size` must be memory of this process
    /// that stays mapped while the kernel can reach it through the slot:
    /// until the slot is deleted or pointed at other memory, or the kernel
    /// VM is gone (every fd of it closed), as for
    /// `KVM_SET_USER_MEMORY_REGION`. Dropping the tracker does not delete
    /// the slot.
    ///
    /// ```compile_fail,E0133
    /// # use kvm_dirty_shim::{DirtyTracker, Memslot, SlotId};
    /// # let tracker = DirtyTracker::create(0).unwrap();
    /// // A raw address is the caller's promise: not callable from safe code.
    /// tracker.update_memslot(&Memslot::new(SlotId::new(0), 0, 0x7f00_0000_0000, 1 << 20));
    /// ```
    pub unsafe fn update_memslot(&self, m: &Memslot) -> Result<()> {
        let _g = enter("update_memslot")?;
        // SAFETY: the caller's contract is this function's. Whatever the
        // VM kept of the slot's memory (`update_memslot_region`) is let go
        // once the slot is gone or maps other memory.
        unsafe { self.vm.update_memslot(&m.region(), None) }
    }

    /// Deletes memslot `slot` from the kernel, harvesting its last dirty
    /// pages, then lets go of what kept its memory mapped (the region of
    /// `update_memslot_region`). Safe: a deleted slot maps nothing.
    /// [`ErrorKind::NotFound`] for a slot the tracker does not know.
    pub fn delete_memslot(&self, slot: SlotId) -> Result<()> {
        let _g = enter("delete_memslot")?;
        // SAFETY: a deletion (size 0) maps no memory into the guest.
        unsafe {
            self.vm
                .update_memslot(&Memslot::delete(slot).region(), None)
        }
    }

    /// Creates vCPU `index` on this VM (`KVM_CREATE_VCPU` with id `index`,
    /// through kvm-ioctls) and registers it: in ring modes maps its ring.
    /// Returns the vCPU's fd, which the VMM runs, and the handle its thread
    /// owns (dropping the handle unregisters the vCPU). The safe way to add
    /// a vCPU: being created here, it is this VM's.
    ///
    /// Errors: [`ErrorKind::AlreadyExists`] for an index registered
    /// already, or a vCPU id the kernel has already (`EEXIST`);
    /// [`ErrorKind::Kernel`] when `KVM_CREATE_VCPU` fails otherwise.
    pub fn create_vcpu(&self, index: u32) -> Result<(VcpuFd, VcpuTracker)> {
        let _g = enter("create_vcpu")?;
        let fd = self.vm.create_vcpu(index)?;
        Ok((fd, self.handle(index)))
    }

    /// Registers vCPU `index`, created by the caller with kvm-ioctls; in
    /// ring modes maps its ring (the mapping does not need the fd to stay
    /// open). Returns the handle the vCPU's thread owns; dropping it
    /// unregisters the vCPU.
    ///
    /// Errors: [`ErrorKind::AlreadyExists`] for an index registered
    /// already, or a vCPU (the same kernel vCPU id) registered under
    /// another index; [`ErrorKind::InvalidArgument`] for a fd that is not a
    /// KVM vCPU; [`ErrorKind::Kernel`] when its ring cannot be mapped and
    /// faulted in (not this VM's ring size, or a VM without a ring).
    ///
    /// # Safety
    ///
    /// `vcpu` is a vCPU of this tracker's VM (created on the VM's fd, or on
    /// a duplicate of it). The kernel offers no way to check it: another
    /// VM's vCPU whose ring has this VM's size would be mapped, and this
    /// tracker would mark and reset entries of a ring that is not its own.
    /// [`create_vcpu`](Self::create_vcpu) is the safe form.
    ///
    /// ```compile_fail,E0133
    /// # let kvm = kvm_ioctls::Kvm::new().unwrap();
    /// # let vm = kvm.create_vm().unwrap();
    /// # let tracker = kvm_dirty_shim::DirtyTracker::adopt(&vm).unwrap();
    /// let fd = vm.create_vcpu(0).unwrap();
    /// // Which VM `fd` belongs to is the caller's promise.
    /// let vcpu = tracker.add_vcpu(&fd, 0);
    /// ```
    pub unsafe fn add_vcpu(&self, vcpu: &VcpuFd, index: u32) -> Result<VcpuTracker> {
        // SAFETY: `vcpu` owns its fd and outlives this borrow; the
        // caller's contract is this function's.
        unsafe { self.add_vcpu_fd(BorrowedFd::borrow_raw(vcpu.as_raw_fd()), index) }
    }

    /// [`add_vcpu`](Self::add_vcpu) for a VMM not built on kvm-ioctls:
    /// the vCPU's fd from `KVM_CREATE_VCPU`, borrowed.
    ///
    /// # Safety
    ///
    /// As for [`add_vcpu`](Self::add_vcpu): `vcpu` is a vCPU of this
    /// tracker's VM.
    pub unsafe fn add_vcpu_fd(&self, vcpu: BorrowedFd<'_>, index: u32) -> Result<VcpuTracker> {
        let _g = enter("add_vcpu")?;
        self.vm.add_vcpu(vcpu.as_raw_fd(), index)?;
        Ok(self.handle(index))
    }

    fn handle(&self, index: u32) -> VcpuTracker {
        VcpuTracker {
            vm: Arc::clone(&self.vm),
            index,
            removed: false,
        }
    }

    /// The C ABI's `kds_vcpu_add`: registers without a handle.
    #[cfg(feature = "capi")]
    pub(crate) fn add_vcpu_index(&self, vcpu: BorrowedFd<'_>, index: u32) -> Result<()> {
        let _g = enter("add_vcpu")?;
        self.vm.add_vcpu(vcpu.as_raw_fd(), index)
    }

    /// The C ABI's `kds_vcpu_remove`.
    #[cfg(feature = "capi")]
    pub(crate) fn remove_vcpu(&self, index: u32) -> Result<()> {
        let _g = enter("remove_vcpu")?;
        self.vm.remove_vcpu(index)
    }

    /// The C ABI's `kds_vcpu_reap`.
    #[cfg(feature = "capi")]
    pub(crate) fn reap_vcpu(&self, index: u32) -> Result<u64> {
        let _g = enter("reap_vcpu")?;
        self.vm.reap_vcpu(index)
    }

    /// Harvests every ring and resets them; returns the entries harvested.
    /// In bitmap mode: 0. (A sync reaps by itself; this is for a VMM that
    /// reaps on its own schedule instead of [`enable_reaper`](Self::enable_reaper).)
    pub fn reap(&self) -> Result<u64> {
        let _g = enter("reap")?;
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
        let _g = enter("sync_memslot")?;
        let nbits = out.len() as u64 * 64;
        self.vm
            .sync_memslot(slot.raw(), out, nbits, stage == SyncStage::Final)
    }

    /// As [`sync_memslot`](Self::sync_memslot), handing each dirty page
    /// (its index in the slot) to `f` in ascending order instead of
    /// filling a bitmap: in ring modes without any buffer of the slot's
    /// size. To merge into a vm-memory `Bitmap`, see `sync_memslot_into`
    /// (feature `vm-memory`). `f` runs on this thread with the VM's reap
    /// lock held: a call into a tracker from `f` is
    /// [`ErrorKind::WouldDeadlock`].
    pub fn sync_memslot_each(
        &self,
        slot: SlotId,
        stage: SyncStage,
        f: impl FnMut(u64),
    ) -> Result<SyncReport> {
        let _g = enter("sync_memslot_each")?;
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
    /// VM's reap lock held: a call into a tracker from `f` is
    /// [`ErrorKind::WouldDeadlock`].
    pub fn sync_memslot_runs(
        &self,
        slot: SlotId,
        stage: SyncStage,
        f: impl FnMut(u64, &[u64]),
    ) -> Result<SyncReport> {
        let _g = enter("sync_memslot_runs")?;
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
        let _g = enter("clear_memslot")?;
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
        let _g = enter("sync_memslot")?;
        self.vm.sync_memslot(slot, out, nbits, final_stage)
    }

    /// Kicks every vCPU out of guest mode with `kick` (so that hardware
    /// buffers such as Intel PML reach the rings), then reaps.
    pub fn flush(&self, kick: impl FnOnce()) -> Result<u64> {
        // `kick` is the caller's code: it runs outside the tracker call,
        // and not from inside another one.
        drop(enter("flush")?);
        kick();
        let _g = enter("flush")?;
        self.vm.reap()
    }

    /// Starts the adaptive reaper thread, which reaps each ring by its fill
    /// level, and is woken when a memslot turns dirty logging on.
    /// [`ErrorKind::InUse`] when one runs, [`ErrorKind::Unsupported`] in
    /// bitmap mode, [`ErrorKind::InvalidArgument`] for a config out of
    /// range.
    pub fn enable_reaper(&self, cfg: &ReaperConfig) -> Result<()> {
        self.start_reaper(cfg, None)
    }

    /// As [`enable_reaper`](Self::enable_reaper), running `on_start` on
    /// the new thread before its first check: where a VMM installs the
    /// thread's seccomp filter (see [`crate::seccomp`]), names it or sets
    /// its CPU affinity. An `Err` from `on_start` ends the thread, and this
    /// call returns it ([`ErrorKind::Kernel`], its errno).
    pub fn enable_reaper_with(
        &self,
        cfg: &ReaperConfig,
        on_start: impl FnOnce() -> std::io::Result<()> + Send + 'static,
    ) -> Result<()> {
        self.start_reaper(cfg, Some(Box::new(on_start)))
    }

    fn start_reaper(&self, cfg: &ReaperConfig, on_start: Option<OnStart>) -> Result<()> {
        let _g = enter("enable_reaper")?;
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
        let reaper = Reaper::start(&self.vm, cfg, on_start)?;
        self.vm.set_reaper_wake(Some(Arc::clone(reaper.wake())));
        *r = Some(reaper);
        Ok(())
    }

    /// Stops the reaper thread and waits for it (at most one reap);
    /// nothing to do when none runs. [`ErrorKind::WouldDeadlock`] from the
    /// reaper thread itself (a logger calling it).
    pub fn disable_reaper(&self) -> Result<()> {
        let _g = enter("disable_reaper")?;
        self.stop_reaper();
        Ok(())
    }

    fn stop_reaper(&self) {
        let r = self.reaper.lock().take();
        self.vm.set_reaper_wake(None);
        if let Some(r) = r {
            r.stop();
        }
    }

    /// Ends tracking and hands the VM back running, as `Drop` does, but
    /// returns the first failure instead of logging it: stops the reaper,
    /// turns dirty logging off on every slot, harvests and resets every
    /// ring (a vCPU never exits ring-full again), and lets the tracker go.
    /// The slots stay in the kernel (see "Soundness" for the memory of a
    /// region slot); a [`VcpuTracker`] still held keeps working
    /// ([`VcpuTracker::handle_exit`] reaps). See "Ending tracking" for
    /// adopting the VM again.
    ///
    /// Errors: [`ErrorKind::WouldDeadlock`] from inside a tracker call
    /// (the tracker is then dropped without ending: see `Drop`); the
    /// failed ioctl's error otherwise (every step is still tried).
    pub fn release(mut self) -> Result<()> {
        let r = self.end();
        self.ended = true;
        r
    }

    fn end(&self) -> Result<()> {
        let _g = enter("release")?;
        self.stop_reaper();
        self.vm.end_tracking()
    }

    /// The VM's counters.
    pub fn stats(&self) -> Stats {
        self.vm.stats()
    }

    /// One vCPU's counters (the migration thread's view of
    /// [`VcpuTracker::stats`]); [`ErrorKind::NotFound`] for an unknown vCPU.
    pub fn vcpu_stats(&self, index: u32) -> Result<VcpuStats> {
        let _g = enter("vcpu_stats")?;
        self.vm.vcpu_stats(index)
    }
}

impl Drop for DirtyTracker {
    /// Ends tracking as [`DirtyTracker::release`] does, logging a failure.
    /// From inside another tracker call on this thread (a callback that
    /// dropped its last handle) it cannot take the locks: it stops nothing
    /// and logs an error; the reaper then ends by itself once the VM is
    /// gone.
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        if let Err(e) = self.end() {
            log::error!("dropping the dirty tracker: {e}");
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
/// ([`DirtyTracker::create_vcpu`], [`DirtyTracker::add_vcpu`]). Dropping it unregisters the vCPU,
/// harvesting what its ring still holds.
///
/// ```no_run
/// # use kvm_dirty_shim::{DirtyTracker, ExitAction};
/// # use kvm_ioctls::VcpuExit;
/// # fn run(tracker: &DirtyTracker) -> Result<(), Box<dyn std::error::Error>> {
/// let (mut vcpu, dirty) = tracker.create_vcpu(0)?;
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
        let _g = enter("handle_exit")?;
        match self.vm.reap_vcpu(self.index) {
            Ok(harvested) => Ok(ExitAction::Reenter { harvested }),
            Err(e) if e.kind() == ErrorKind::RingWedged => Ok(ExitAction::FailMigration(e)),
            Err(e) => Err(e),
        }
    }

    /// This vCPU's counters.
    pub fn stats(&self) -> Result<VcpuStats> {
        let _g = enter("VcpuTracker::stats")?;
        self.vm.vcpu_stats(self.index)
    }

    /// Unregisters the vCPU now, harvesting what its ring still holds
    /// (dropping the handle does the same, logging a failure).
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        let _g = enter("VcpuTracker::remove")?;
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
        // From inside a tracker call the vCPU stays registered (its ring
        // mapped) until the VM goes: removing it would take held locks.
        let r = enter("dropping a VcpuTracker").and_then(|_g| self.vm.remove_vcpu(self.index));
        if let Err(e) = r {
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
