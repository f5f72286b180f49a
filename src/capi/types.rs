//! The plain-data types of the C ABI. cbindgen copies these (and their doc
//! comments) into the header; the Rust API has typed equivalents
//! (`crate::types`) and these convert into them. The counters
//! (`KdsStats`, `KdsVcpuStats`) are the Rust API's `Stats` and
//! `VcpuStats`, renamed in the header.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::types::{Memslot, MemslotFlags, Mode, ReaperConfig, SlotId, Stats, VcpuStats};

/// The ABI version this header describes. It grows by one whenever the
/// ABI grows; a library serves callers built against any earlier version
/// (their functions and struct sizes are kept). At startup, check
/// kds_abi_version() >= KDS_ABI_VERSION: the library linked in is at
/// least as new as this header.
pub const KDS_ABI_VERSION: u32 = 3;
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
/// The most words one run of kds_memslot_sync_runs() holds (ABI 3): 2 MiB
/// of guest memory in 4 KiB pages.
pub const KDS_SYNC_RUN_WORDS_MAX: u64 = 512;
const _: () = assert!(KDS_SYNC_RUN_WORDS_MAX as usize == crate::SYNC_RUN_WORDS_MAX);

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
const _: () = assert!(KDS_STATS_SIZE_VER1 <= std::mem::size_of::<Stats>());
const _: () = assert!(KDS_VCPU_STATS_SIZE_VER1 <= std::mem::size_of::<VcpuStats>());
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

impl From<Mode> for KdsMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Bitmap => KdsMode::KDS_MODE_BITMAP,
            Mode::Ring => KdsMode::KDS_MODE_RING,
            Mode::RingWithBitmap => KdsMode::KDS_MODE_RING_WITH_BITMAP,
        }
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

/// Knobs of the adaptive reaper thread, passed to kds_reaper_enable() with
/// its size. A field left 0 takes its default. Fields are only ever
/// appended.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KdsReaperConfig {
    /// Reap as soon as some vCPU's ring holds at least this percentage of
    /// its entries (1..=90; default 25). The check reads entry flags
    /// (a binary search over each ring's published entries), no syscall.
    pub high_water_pct: u32,
    /// Shortest pause between two checks, in microseconds (default 200).
    pub min_interval_us: u32,
    /// Longest pause between two checks, in microseconds (default 50000):
    /// what a VM that logs dirty pages but dirties none costs. While no
    /// memslot logs dirty pages the thread sleeps; turning dirty logging on
    /// wakes it whatever this is.
    pub max_interval_us: u32,
}

impl KdsMemslot {
    /// The Rust API's memslot; `EINVAL` for flags this version does not know.
    pub(crate) fn to_memslot(self) -> Result<Memslot> {
        let flags = MemslotFlags::from_bits(self.flags).ok_or_else(|| {
            Error::inval(format!(
                "unknown flags {:#x} (known: KDS_MEM_LOG_DIRTY_PAGES, KDS_MEM_READONLY)",
                self.flags & !(KDS_MEM_LOG_DIRTY_PAGES | KDS_MEM_READONLY)
            ))
        })?;
        Ok(Memslot {
            slot: SlotId::from_raw(self.slot),
            flags,
            guest_phys_addr: self.guest_phys_addr,
            memory_size: self.memory_size,
            userspace_addr: self.userspace_addr,
        })
    }
}

impl KdsReaperConfig {
    /// The Rust API's config: a 0 field takes its default.
    pub(crate) fn to_config(self) -> ReaperConfig {
        let d = ReaperConfig::default();
        let us = |v: u32, d: Duration| {
            if v == 0 {
                d
            } else {
                Duration::from_micros(u64::from(v))
            }
        };
        d.with_high_water_pct(if self.high_water_pct == 0 {
            d.high_water_pct()
        } else {
            self.high_water_pct
        })
        .with_min_interval(us(self.min_interval_us, d.min_interval()))
        .with_max_interval(us(self.max_interval_us, d.max_interval()))
    }
}
