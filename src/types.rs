//! The Rust API's value types: the tracking mode, slot ids, flags, a
//! memslot, the reaper's knobs and the counters. The C ABI has its own
//! plain-integer shapes (`capi::types`) and converts at its boundary; the
//! two counter structs are shared (`#[repr(C)]`, renamed `KdsStats` and
//! `KdsVcpuStats` in the header by cbindgen.toml), so their field comments
//! name each operation by its Rust method, then its C function.

use std::fmt;
use std::time::Duration;

/// How a VM's dirty pages are tracked.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// `KVM_GET_DIRTY_LOG` only (no dirty ring).
    Bitmap,
    /// Per-vCPU dirty rings.
    Ring,
    /// Per-vCPU dirty rings plus the kernel's backup bitmap for memory
    /// dirtied without a vCPU (`KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`).
    RingWithBitmap,
}

impl Mode {
    /// Does this mode use per-vCPU rings?
    pub fn has_ring(self) -> bool {
        self != Mode::Bitmap
    }

    /// The mode's C name (`KDS_MODE_*`), which the log line naming the
    /// mode has always carried (tools parse it).
    pub(crate) fn c_name(self) -> &'static str {
        match self {
            Mode::Bitmap => "KDS_MODE_BITMAP",
            Mode::Ring => "KDS_MODE_RING",
            Mode::RingWithBitmap => "KDS_MODE_RING_WITH_BITMAP",
        }
    }

    pub(crate) fn to_u8(self) -> u8 {
        match self {
            Mode::Bitmap => 0,
            Mode::Ring => 1,
            Mode::RingWithBitmap => 2,
        }
    }

    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            1 => Mode::Ring,
            2 => Mode::RingWithBitmap,
            _ => Mode::Bitmap,
        }
    }
}

/// A memslot's id as KVM numbers it: an address space (x86 SMM uses 1)
/// and a slot id within it.
///
/// ```
/// use kvm_dirty_shim::SlotId;
/// assert_eq!(SlotId::new(3).raw(), 3);
/// assert_eq!(SlotId::in_address_space(1, 3).raw(), (1 << 16) | 3);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId(u32);

impl SlotId {
    /// Slot `id` of address space 0.
    pub const fn new(id: u16) -> Self {
        SlotId(id as u32)
    }

    /// Slot `id` of address space `as_id`.
    pub const fn in_address_space(as_id: u16, id: u16) -> Self {
        SlotId(((as_id as u32) << 16) | id as u32)
    }

    /// The slot id within its address space.
    pub const fn id(self) -> u16 {
        self.0 as u16
    }

    /// The address space.
    pub const fn address_space(self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// The `slot` field of `struct kvm_userspace_memory_region`:
    /// `(address_space << 16) | id`.
    pub const fn raw(self) -> u32 {
        self.0
    }

    /// From the `slot` field of `struct kvm_userspace_memory_region`.
    pub const fn from_raw(raw: u32) -> Self {
        SlotId(raw)
    }
}

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.address_space() {
            0 => write!(f, "{}", self.id()),
            a => write!(f, "{}:{}", a, self.id()),
        }
    }
}

impl From<u16> for SlotId {
    fn from(id: u16) -> Self {
        SlotId::new(id)
    }
}

bitflags::bitflags! {
    /// A memslot's flags (`KVM_MEM_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct MemslotFlags: u32 {
        /// Log the slot's dirty pages (`KVM_MEM_LOG_DIRTY_PAGES`).
        const LOG_DIRTY_PAGES = kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
        /// Read-only for the guest (`KVM_MEM_READONLY`).
        const READONLY = kvm_bindings::KVM_MEM_READONLY;
    }
}

bitflags::bitflags! {
    /// What the board has that dirties guest memory without a running
    /// vCPU, for [`DirtyTracker::board_init`](crate::DirtyTracker::board_init).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct BoardFlags: u32 {
        /// The arm64 in-kernel vGIC ITS, which writes its tables into
        /// guest memory when they are saved.
        const VGIC_ITS = 1 << 0;
    }
}

/// A memslot, as `KVM_SET_USER_MEMORY_REGION` takes it.
///
/// ```
/// use kvm_dirty_shim::{Memslot, MemslotFlags, SlotId};
/// let m = Memslot::new(SlotId::new(1), 0x10_0000, 0x7f00_0000_0000, 1 << 20)
///     .with_flags(MemslotFlags::LOG_DIRTY_PAGES);
/// assert!(m.flags.contains(MemslotFlags::LOG_DIRTY_PAGES));
/// assert_eq!(m.pages(4096), 256);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memslot {
    /// The slot.
    pub slot: SlotId,
    /// Its flags.
    pub flags: MemslotFlags,
    /// Guest physical address; page aligned.
    pub guest_phys_addr: u64,
    /// Size in bytes; a multiple of the host page size; 0 deletes the slot.
    pub memory_size: u64,
    /// Host virtual address of the memory; page aligned.
    pub userspace_addr: u64,
}

impl Memslot {
    /// `memory_size` bytes of host memory at `userspace_addr` seen by the
    /// guest at `guest_phys_addr`, no flags.
    pub const fn new(
        slot: SlotId,
        guest_phys_addr: u64,
        userspace_addr: u64,
        memory_size: u64,
    ) -> Self {
        Memslot {
            slot,
            flags: MemslotFlags::empty(),
            guest_phys_addr,
            memory_size,
            userspace_addr,
        }
    }

    /// The deletion of `slot` (size 0).
    pub const fn delete(slot: SlotId) -> Self {
        Memslot::new(slot, 0, 0, 0)
    }

    /// The same slot with `flags`.
    pub const fn with_flags(mut self, flags: MemslotFlags) -> Self {
        self.flags = flags;
        self
    }

    /// Pages of `page_size` bytes in the slot.
    pub const fn pages(&self, page_size: u64) -> u64 {
        self.memory_size / page_size
    }

    pub(crate) fn region(&self) -> kvm_bindings::kvm_userspace_memory_region {
        kvm_bindings::kvm_userspace_memory_region {
            slot: self.slot.raw(),
            flags: self.flags.bits(),
            guest_phys_addr: self.guest_phys_addr,
            memory_size: self.memory_size,
            userspace_addr: self.userspace_addr,
        }
    }
}

/// Which sync of a migration [`DirtyTracker::sync_memslot`](crate::DirtyTracker::sync_memslot) is.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncStage {
    /// A sync while the vCPUs run.
    Live,
    /// The last sync of a migration, with the vCPUs stopped: in
    /// [`Mode::RingWithBitmap`] it also drains the kernel's backup bitmap.
    Final,
}

/// The most bitmap words one run of
/// [`DirtyTracker::sync_memslot_runs`](crate::DirtyTracker::sync_memslot_runs)
/// holds: 2 MiB of guest memory in 4 KiB pages.
pub const SYNC_RUN_WORDS_MAX: usize = 512;

/// What a sync reported.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    /// Pages reported dirty.
    pub pages: u64,
    /// Every page of the slot was reported, whatever the guest wrote: the
    /// kernel overran a ring (or a reset was cut short) since the previous
    /// sync, so the shim re-armed dirty logging and reports the whole slot
    /// once. Expect a full resend of the slot this round.
    pub whole_slot: bool,
}

/// The adaptive reaper's knobs (`Default`: high water 25 %, checks every
/// 200 µs to 50 ms): `with_*` set one, the plain names read it.
///
/// ```
/// use std::time::Duration;
/// use kvm_dirty_shim::ReaperConfig;
/// let cfg = ReaperConfig::default()
///     .with_high_water_pct(50)
///     .with_max_interval(Duration::from_millis(10));
/// assert_eq!(cfg.high_water_pct(), 50);
/// assert_eq!(cfg.max_interval(), Duration::from_millis(10));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaperConfig {
    high_water_pct: u32,
    min_interval: Duration,
    max_interval: Duration,
}

impl Default for ReaperConfig {
    fn default() -> Self {
        ReaperConfig {
            high_water_pct: 25,
            min_interval: Duration::from_micros(200),
            max_interval: Duration::from_millis(50),
        }
    }
}

impl ReaperConfig {
    /// Reap as soon as some vCPU's ring holds at least this percentage of
    /// its entries (1..=90). The check reads each ring's fill from the
    /// entries' flags (a binary search), no syscall.
    pub fn with_high_water_pct(mut self, pct: u32) -> Self {
        self.high_water_pct = pct;
        self
    }

    /// The shortest pause between two checks.
    pub fn with_min_interval(mut self, d: Duration) -> Self {
        self.min_interval = d;
        self
    }

    /// The longest pause between two checks (at most 10 s): what a VM that
    /// logs dirty pages but dirties none costs. While no memslot logs dirty
    /// pages the thread sleeps; turning dirty logging on wakes it whatever
    /// this is.
    pub fn with_max_interval(mut self, d: Duration) -> Self {
        self.max_interval = d;
        self
    }

    /// The high-water mark, in percent.
    pub fn high_water_pct(&self) -> u32 {
        self.high_water_pct
    }

    /// The shortest pause.
    pub fn min_interval(&self) -> Duration {
        self.min_interval
    }

    /// The longest pause.
    pub fn max_interval(&self) -> Duration {
        self.max_interval
    }
}

/// Counters of one VM since its creation, read with `DirtyTracker::stats`
/// (C: kds_stats_get()).
/// Fields are only ever appended; the first 9 are ABI 1's.
#[repr(C)]
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Ring entries harvested.
    pub entries_reaped: u64,
    /// KVM_RESET_DIRTY_RINGS calls.
    pub ring_resets: u64,
    /// Ring-full exits reaped (`VcpuTracker::handle_exit`; C:
    /// kds_vcpu_reap()) that found entries.
    pub ring_full_reaps: u64,
    /// KVM_GET_DIRTY_LOG calls.
    pub bitmap_syncs: u64,
    /// Dirty pages found in kernel bitmaps (KVM_GET_DIRTY_LOG).
    pub pages_from_bitmap: u64,
    /// Ring entries naming an unknown or not dirty-logged slot, an address
    /// space or slot id out of range, or an offset past the slot's end:
    /// skipped and counted, never written anywhere.
    pub invalid_entries: u64,
    /// Nanoseconds spent reading rings and publishing what was read into
    /// the shim's bitmaps (everything but the reset).
    pub harvest_ns: u64,
    /// Nanoseconds spent inside KVM_RESET_DIRTY_RINGS.
    pub reset_ns: u64,
    /// Harvests that found a ring completely full (the kernel may have
    /// dropped entries): every page of every dirty-logged slot was then
    /// reported dirty.
    pub ring_overflows: u64,
    /// ABI 2. Ring-full exits reaped (`VcpuTracker::handle_exit`; C:
    /// kds_vcpu_reap()) that found the ring wedged (ring-full
    /// exits with nothing to harvest twice in a row); every dirty-logged
    /// page was reported dirty. Most are undone (see ring_recoveries); only
    /// 1024 in a row fail (`ExitAction::FailMigration`; C: -EOVERFLOW).
    pub ring_wedges: u64,
    /// ABI 2. Entries the kernel reset, as returned by
    /// KVM_RESET_DIRTY_RINGS. Lower than entries_reaped only when the
    /// kernel ignored entries.
    pub entries_reset: u64,
    /// ABI 2. Times the shim re-synchronised a ring the
    /// kernel had overrun (entries it counts but never published, handed
    /// back to it), so that the vCPU runs again instead of exiting
    /// ring-full for ever.
    pub ring_recoveries: u64,
    /// ABI 2. Reaps done by the adaptive reaper thread
    /// (`DirtyTracker::enable_reaper`; C: kds_reaper_enable()).
    pub reaper_reaps: u64,
    /// ABI 2. Entries marked RESET that a KVM_RESET_DIRTY_RINGS did not
    /// reach, summed over resets (a vCPU
    /// overran its ring before the reset, another reaper on this VM, or an
    /// entry the kernel ignored); the shim reads how far each reset got
    /// from each ring. Never fatal: the pages of such entries are reported
    /// at every sync until a reset reaches them, and the shim hands them
    /// back again at the next reap.
    pub reset_shortfall: u64,
    /// ABI 2, appended after 0.2.0. KVM_RESET_DIRTY_RINGS calls during which a
    /// signal arrived. The shim blocks signals around the call: since
    /// Linux 6.17 a pending signal stops the reset partway and leaves up
    /// to 64 pages write-enabled without their ring entries.
    pub reset_signals_held: u64,
    /// ABI 2, appended after 0.2.0. KVM_RESET_DIRTY_RINGS calls during which
    /// the calling thread was switched out (stopped by SIGSTOP, a debugger
    /// or the cgroup freezer, which cannot be blocked, or waiting for the
    /// kernel's memslot lock, held by a memslot ioctl made outside the
    /// shim: the shim's own updates hold off its resets until they are
    /// done). Each may have left pages write-enabled without ring entries,
    /// so the shim re-armed dirty logging and reported every dirty-logged
    /// page, as after an overflow.
    pub resets_switched_out: u64,
    /// ABI 3. Pages `DirtyTracker::clear_memslot` (C: kds_memslot_clear())
    /// took out of
    /// the next sync's report: pages reported before, which the caller
    /// was about to send, written again since.
    pub pages_cleared: u64,
}

/// Counters of one vCPU, read with `VcpuTracker::stats` (C:
/// kds_vcpu_stats_get()): what a VMM's
/// dirty-rate and dirty-limit features read. Fields are only ever appended.
#[repr(C)]
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuStats {
    /// Entries harvested from this vCPU's ring.
    pub entries_reaped: u64,
    /// Ring-full exits of this vCPU reaped (`VcpuTracker::handle_exit`; C:
    /// kds_vcpu_reap()) that found entries.
    pub ring_full_reaps: u64,
}
