//! The plain-data types of the C ABI, shared by the safe Rust layer.
//! cbindgen copies these (and their doc comments) into the header.

/// The ABI version this header describes. It grows by one whenever the
/// ABI grows; a library serves callers built against any earlier version
/// (their functions and struct sizes are kept). At startup, check
/// kds_abi_version() >= KDS_ABI_VERSION: the library linked in is at
/// least as new as this header.
pub const KDS_ABI_VERSION: u32 = 2;
/// Board flag for kds_board_init(): the board dirties guest memory without
/// a running vCPU (the arm64 vGIC ITS saving its tables).
pub const KDS_BOARD_VGIC_ITS: u32 = 1 << 0;
/// Memslot flag: log dirty pages of this slot (KVM_MEM_LOG_DIRTY_PAGES).
pub const KDS_MEM_LOG_DIRTY_PAGES: u32 = 1 << 0;
/// Memslot flag: read-only for the guest (KVM_MEM_READONLY).
pub const KDS_MEM_READONLY: u32 = 1 << 1;
/// kds_memslot_sync() flag: the last stage of migration, vCPUs stopped; in
/// KDS_MODE_RING_WITH_BITMAP also drains the kernel's backup bitmap.
pub const KDS_SYNC_FINAL: u32 = 1 << 0;

/// sizeof(KdsMemslot) in ABI 1: the smallest size kds_memslot_update()
/// accepts.
pub const KDS_MEMSLOT_SIZE_VER1: usize = 32;
/// sizeof(KdsReaperConfig) in ABI 1: the smallest size
/// kds_reaper_enable() accepts.
pub const KDS_REAPER_CONFIG_SIZE_VER1: usize = 12;
/// sizeof(KdsStats) in ABI 1 (its first 9 counters): what the ABI 1
/// function kds_stats() writes.
pub const KDS_STATS_SIZE_VER1: usize = 72;
/// sizeof(KdsVcpuStats) in ABI 1.
pub const KDS_VCPU_STATS_SIZE_VER1: usize = 16;

const _: () = assert!(KDS_MEM_LOG_DIRTY_PAGES == kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES);
const _: () = assert!(KDS_MEM_READONLY == kvm_bindings::KVM_MEM_READONLY);
// A struct only grows: its ABI 1 layout is a prefix of today's.
const _: () = assert!(KDS_MEMSLOT_SIZE_VER1 <= std::mem::size_of::<KdsMemslot>());
const _: () = assert!(KDS_REAPER_CONFIG_SIZE_VER1 <= std::mem::size_of::<KdsReaperConfig>());
const _: () = assert!(KDS_STATS_SIZE_VER1 <= std::mem::size_of::<KdsStats>());
const _: () = assert!(KDS_VCPU_STATS_SIZE_VER1 <= std::mem::size_of::<KdsVcpuStats>());

/// What kds_vm_mode() returns: how the VM's dirty pages are tracked.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdsMode {
    /// KVM_GET_DIRTY_LOG only (no dirty ring).
    KDS_MODE_BITMAP = 0,
    /// Per-vCPU dirty rings.
    KDS_MODE_RING = 1,
    /// Per-vCPU dirty rings plus the kernel's backup bitmap for memory
    /// dirtied without a vCPU (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP).
    KDS_MODE_RING_WITH_BITMAP = 2,
}

impl KdsMode {
    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            1 => KdsMode::KDS_MODE_RING,
            2 => KdsMode::KDS_MODE_RING_WITH_BITMAP,
            _ => KdsMode::KDS_MODE_BITMAP,
        }
    }

    /// Does this mode use per-vCPU rings?
    pub fn has_ring(self) -> bool {
        self != KdsMode::KDS_MODE_BITMAP
    }
}

/// A memslot, as KVM_SET_USER_MEMORY_REGION takes it; passed to
/// kds_memslot_update() with its size. Fields are only ever appended.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KdsMemslot {
    /// (address_space_id << 16) | slot_id, as KVM numbers slots.
    pub slot: u32,
    /// KDS_MEM_* flags (the values of KVM_MEM_*).
    pub flags: u32,
    /// Guest physical address; page aligned.
    pub guest_phys_addr: u64,
    /// Size in bytes; a multiple of the host page size; 0 deletes the slot.
    pub memory_size: u64,
    /// Host virtual address of the memory; page aligned. Must stay mapped
    /// while the slot exists.
    pub userspace_addr: u64,
}

/// Counters of one VM since its creation, read with kds_stats_get().
/// Fields are only ever appended; the first 9 are ABI 1's.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KdsStats {
    /// Ring entries harvested.
    pub entries_reaped: u64,
    /// KVM_RESET_DIRTY_RINGS calls.
    pub ring_resets: u64,
    /// kds_vcpu_reap() calls that found entries.
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
    /// ABI 2. kds_vcpu_reap() calls that found the ring wedged (ring-full
    /// exits with nothing to harvest twice in a row); every dirty-logged
    /// page was reported dirty. Most are undone (see ring_recoveries); only
    /// 1024 in a row return -EOVERFLOW.
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
    /// (kds_reaper_enable()).
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
    /// kernel's memslot lock). Each may have left pages write-enabled
    /// without ring entries, so the shim re-armed dirty logging and
    /// reported every dirty-logged page, as after an overflow.
    pub resets_switched_out: u64,
}

/// Counters of one vCPU, read with kds_vcpu_stats_get(): what a VMM's
/// dirty-rate and dirty-limit features read. Fields are only ever appended.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KdsVcpuStats {
    /// Entries harvested from this vCPU's ring.
    pub entries_reaped: u64,
    /// kds_vcpu_reap() calls for this vCPU that found entries.
    pub ring_full_reaps: u64,
}

/// Knobs of the adaptive reaper thread, passed to kds_reaper_enable() with
/// its size. A field left 0 takes its default. Fields are only ever
/// appended.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KdsReaperConfig {
    /// Reap as soon as some vCPU's ring holds at least this percentage of
    /// its entries (1..=90; default 25). The check reads one entry's flags
    /// per ring, no syscall.
    pub high_water_pct: u32,
    /// Shortest pause between two checks, in microseconds (default 200).
    pub min_interval_us: u32,
    /// Longest pause between two checks, in microseconds (default 50000):
    /// what an idle VM costs. Turning dirty logging on wakes the thread
    /// whatever this is.
    pub max_interval_us: u32,
}
