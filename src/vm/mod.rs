//! The safe Rust core: one VM's dirty tracking (ordering, memslots, vCPU
//! rings, reaping, syncing). The C ABI layer (`capi`) is a thin wrapper.
//!
//! Locks, always taken in this order, never the other way round:
//! `life` -> `reap` -> (`vcpus` | `slots`).
//! - `life` serialises the lifecycle calls (ring enable, board hook,
//!   memslots, vCPU add/remove) and holds the ordering state machine.
//! - `reap` serialises harvesting and owns every ring's fetch index and the
//!   shim's per-slot bitmaps (their only writer and the only drainer hold
//!   it). It is held from the first ring read until `KVM_RESET_DIRTY_RINGS`
//!   has returned, and `sync_slot` drains only under it: a page's bit can
//!   never reach the VMM before the reset re-protected the page (see
//!   `reap_locked`), and `sync_slot` waits for a concurrent reap instead of
//!   missing its entries. It is the one lock held across a syscall; the
//!   kernel serialises that ioctl on its own `slots_lock` anyway.
//! - `vcpus` and `slots` are held only briefly, never across a syscall.

use std::any::Any;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use kvm_bindings::kvm_userspace_memory_region;
use parking_lot::{Mutex, RwLock};

use crate::bitmap::{AtomicBitmap, count_masked, word_mask};
use crate::counters::{Counters, stat};
use crate::error::{Error, ErrorKind, Result};
use crate::kvm::{KvmVm, RING_NEEDS_SLOT_BITMAP, cap, page_size};
use crate::order::{BoardAction, Lifecycle};
use crate::pacer::Level;
use crate::ring::{ENTRY_SIZE, Harvest, MAX_UNWEDGES, Reach, Ring, Wedge, split_reset};
use crate::types::{BoardFlags, MemslotFlags, Mode, Stats, SyncReport, VcpuStats};

/// A memslot as the kernel takes it (the Rust API's `Memslot` and the C
/// ABI's `KdsMemslot` both become one).
pub(crate) type Region = kvm_userspace_memory_region;

const MEM_LOG_DIRTY_PAGES: u32 = MemslotFlags::LOG_DIRTY_PAGES.bits();
const MEM_READONLY: u32 = MemslotFlags::READONLY.bits();

mod reap;
mod slots;
mod sync;
mod teardown;
mod vcpus;
mod wake;

pub(crate) use wake::{Wake, Woken};

/// The kernel's limit on ring sizes when it does not say (`KVM_DIRTY_RING_MAX_ENTRIES`).
pub(crate) const RING_MAX_ENTRIES_DEFAULT: u64 = 65536;

/// Slot ids and vCPU indexes are small integers: one multiply (Fibonacci
/// hashing) instead of SipHash, whose cost showed per reap on small rings.
/// A lookup stays O(1); the keys come from the VMM, not from the guest.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u32(u32::from(b) ^ (self.0 as u32).rotate_left(8));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A map keyed by slot id or vCPU index.
type IdMap<V> = HashMap<u32, Arc<V>, BuildHasherDefault<IdHasher>>;

/// A memslot the shim knows about.
struct Slot {
    region: Region,
    npages: u64,
    /// The shim's bitmap of harvested, published pages; `Some` while the
    /// slot has `KDS_MEM_LOG_DIRTY_PAGES`.
    dirty: Option<Arc<AtomicBitmap>>,
    /// Ring modes: the pages a sync reported since a `clear_memslot` of
    /// their range last used them up (what `KVM_CLEAR_DIRTY_LOG` would be
    /// given in bitmap mode). Empty again at every change of the slot.
    reported: Option<Arc<AtomicBitmap>>,
}

/// The dirty bits of a deleted dirty-logged slot, kept by the host
/// address of its memory until a slot that maps that memory again takes
/// them (see `Vm::retire`).
struct Retired {
    userspace_addr: u64,
    npages: u64,
    dirty: Arc<AtomicBitmap>,
}

/// A registered vCPU.
struct Vcpu {
    ring: Option<Ring>,
    /// Its KVM vCPU id, where /proc/self/fd told it: one kernel vCPU is
    /// registered once.
    kernel_id: Option<u32>,
    ring_full_reaps: AtomicU64,
}

/// What the next `KVM_RESET_DIRTY_RINGS` owes (guarded by `Vm::reap`).
#[derive(Default)]
struct ReapState {
    /// Entries marked RESET and not handed back yet (harvested, an overrun
    /// hole handed back, marked again where a reset stopped short, or left
    /// unreached by the last reset). While not 0 a reset is owed. (What
    /// each ring is owed, `Ring::after_reset` reads from the ring.)
    marked: u64,
    /// A ring was found full (or wedged): mark every logged page once the
    /// reset has returned.
    overflow: bool,
    /// The kernel may have lost a ring entry (an overrun): the page it
    /// named is not write-protected any more and would never make a new
    /// entry, so dirty logging is re-armed on every logged slot (see
    /// `rearm_logging`) before the next report of every page.
    rearm: bool,
    /// Entries harvested since the last reset (for its log line).
    harvested: u64,
    /// `reset`'s buffer: each ring's `Reach` and lag.
    reach: Vec<(Reach, u32)>,
}

/// Counts behind the log's powers of two (not in `Stats`).
#[derive(Default)]
struct LogCounts {
    short_resets: AtomicU64,
    rearms: AtomicU64,
    told_by_count: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// What keeps a slot's memory mapped (a vm-memory region, say).
pub(crate) type Keeper = Arc<dyn Any + Send + Sync>;

/// One VM's dirty tracking.
pub struct Vm {
    kvm: KvmVm,
    page_size: u64,
    mode: AtomicU8,
    ring_entries: AtomicU32,
    want_manual_protect: AtomicBool,
    manual_protect: AtomicBool,
    life: Mutex<Lifecycle>,
    reap: Mutex<ReapState>,
    vcpus: RwLock<IdMap<Vcpu>>,
    slots: RwLock<IdMap<Slot>>,
    /// Bits of deleted slots, for the next slot on the same memory
    /// (guarded by the lifecycle lock's holder: only `memslot_set` uses it).
    retired: Mutex<Vec<Retired>>,
    stats: Counters,
    log_counts: LogCounts,
    /// The reaper thread's wake flags while one runs (the tracker owns
    /// the thread).
    reaper_wake: Mutex<Option<Arc<Wake>>>,
    /// What keeps each slot's memory mapped, by slot, with the host address
    /// it keeps (`keep_memory`). The last field: dropped after the VM fd.
    kept: Mutex<HashMap<u32, (u64, Keeper)>>,
}

impl Vm {
    fn with_kvm(kvm: KvmVm) -> Self {
        Vm {
            kvm,
            page_size: page_size(),
            mode: AtomicU8::new(Mode::Bitmap.to_u8()),
            ring_entries: AtomicU32::new(0),
            want_manual_protect: AtomicBool::new(true),
            manual_protect: AtomicBool::new(false),
            life: Mutex::new(Lifecycle::for_arch(RING_NEEDS_SLOT_BITMAP)),
            reap: Mutex::new(ReapState::default()),
            vcpus: RwLock::new(IdMap::default()),
            slots: RwLock::new(IdMap::default()),
            retired: Mutex::new(Vec::new()),
            stats: Counters::default(),
            log_counts: LogCounts::default(),
            reaper_wake: Mutex::new(None),
            kept: Mutex::new(HashMap::new()),
        }
    }

    /// Creates a VM (`KVM_CREATE_VM`); the shim owns its fd.
    pub fn create(machine_type: u64) -> Result<Self> {
        Ok(Self::with_kvm(KvmVm::create(machine_type)?))
    }

    /// Wraps the caller's VM fd (duplicated: the caller keeps its own).
    /// Refuses a VM whose dirty ring is enabled already: the kernel
    /// enables a ring once per VM, a new tracker cannot know where the
    /// kernel pushes its next entry, and such a VM has no
    /// `KVM_GET_DIRTY_LOG` for bitmap mode either.
    pub fn adopt(vm_fd: i32) -> Result<Self> {
        let kvm = KvmVm::adopt(vm_fd)?;
        if kvm.has_ring() {
            return Err(Error::with_kind(
                ErrorKind::InUse,
                libc::EBUSY,
                format!(
                    "fd {vm_fd} is a VM whose dirty ring is enabled already (by an earlier \
                     tracker of this VM, or outside the shim): a new tracker cannot take over \
                     a ring (where the kernel pushes next is not visible), nor use bitmap mode \
                     on a ring VM; track a VM with the ring through one tracker for its life \
                     (to migrate it again, keep the tracker and turn logging on again)"
                ),
            ));
        }
        Ok(Self::with_kvm(kvm))
    }

    /// The VM fd the shim uses.
    pub fn fd(&self) -> i32 {
        self.kvm.raw_fd()
    }

    /// The tracking mode.
    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::Acquire))
    }

    fn set_mode(&self, m: Mode) {
        self.mode.store(m.to_u8(), Ordering::Release);
    }

    /// Host page size used for slots and bitmaps.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Ring entries per vCPU (0: no ring).
    pub fn ring_entries(&self) -> u32 {
        self.ring_entries.load(Ordering::Relaxed)
    }

    /// Enables the per-vCPU dirty ring with `entries` entries.
    pub fn enable_dirty_ring(&self, entries: u32) -> Result<()> {
        let mut life = self.life.lock();
        life.check_ring_enable()?;
        let (capnr, name) = if self.kvm.check_cap(cap::DIRTY_LOG_RING_ACQ_REL) > 0 {
            (
                cap::DIRTY_LOG_RING_ACQ_REL,
                "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
            )
        } else if self.kvm.check_cap(cap::DIRTY_LOG_RING) > 0 {
            (cap::DIRTY_LOG_RING, "KVM_CAP_DIRTY_LOG_RING")
        } else {
            return Err(Error::new(
                libc::ENOTSUP,
                "the kernel offers neither KVM_CAP_DIRTY_LOG_RING_ACQ_REL \
                 nor KVM_CAP_DIRTY_LOG_RING: stay in bitmap mode",
            ));
        };
        let release = crate::kvm::kernel_release();
        if !crate::kvm::ring_only_memslots_log_every_write(&release) {
            return Err(Error::new(
                libc::ENOTSUP,
                format!(
                    "the dirty ring is not safe on riscv64 Linux {release}: before Linux 7.2 \
                     its stage-2 fault handler maps a memslot without a dirty bitmap (which \
                     every memslot is with the ring; riscv64 has no \
                     KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) in 2 MiB blocks where huge pages \
                     back it, and logs only the first write to each block: stay in bitmap \
                     mode, or run Linux 7.2 or later"
                ),
            ));
        }
        let max_bytes = match self.kvm.check_cap(capnr) {
            v if v > 1 => v as u64,
            _ => RING_MAX_ENTRIES_DEFAULT * ENTRY_SIZE,
        };
        let min_bytes = self.page_size;
        let bytes = u64::from(entries) * ENTRY_SIZE;
        if !entries.is_power_of_two() || bytes < min_bytes || bytes > max_bytes {
            return Err(Error::inval(format!(
                "{entries} entries is not allowed: the size must be a \
                 power of two from {} to {} entries on this kernel",
                min_bytes / ENTRY_SIZE,
                max_bytes / ENTRY_SIZE
            )));
        }
        let backup = life.ring_needs_backup_bitmap();
        if backup && self.kvm.check_cap(cap::DIRTY_LOG_RING_WITH_BITMAP) <= 0 {
            return Err(Error::new(
                libc::ENOTSUP,
                if life.ring_always_with_bitmap() {
                    "the kernel lacks KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, \
                     and on this architecture a memslot without a dirty bitmap does not log \
                     writes reliably (arm64 maps it with huge pages): stay in bitmap mode"
                } else {
                    "the board has a vGIC ITS (board_init) but the \
                     kernel lacks KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: the ring would miss the \
                     ITS's writes; stay in bitmap mode"
                },
            ));
        }
        self.kvm.enable_cap(capnr, bytes).map_err(|e| {
            let what = format!("KVM_ENABLE_CAP({name}, {bytes} bytes)");
            // The size was checked above: the kernel's other refusal is a
            // vCPU created already (kvm_vm_ioctl_enable_dirty_log_ring; a
            // ring enabled before adoption was refused by `adopt`).
            if e == libc::EINVAL {
                Error::with_kind(
                    ErrorKind::Ordering,
                    libc::EBUSY,
                    format!(
                        "{what} failed: EINVAL: a vCPU exists on this VM already \
                         (KVM_CREATE_VCPU was called), and the kernel enables the ring only \
                         before the first vCPU is created: enable it at accelerator init (or \
                         the ring was enabled on this VM outside the shim)"
                    ),
                )
            } else {
                Error::sys(
                    &what,
                    e,
                    "the kernel refused this ring size; try another power of two, or stay in \
                     bitmap mode",
                )
            }
        })?;
        life.record_ring();
        self.ring_entries.store(entries, Ordering::Relaxed);
        self.set_mode(Mode::Ring);
        log::info!("dirty ring enabled: {entries} entries per vCPU via {name}");
        if backup {
            self.enable_backup_bitmap()?;
            life.record_backup_bitmap();
        }
        Ok(())
    }

    fn enable_backup_bitmap(&self) -> Result<()> {
        if self.kvm.check_cap(cap::DIRTY_LOG_RING_WITH_BITMAP) <= 0 {
            return Err(Error::new(
                libc::ENOTSUP,
                "the vGIC ITS (BoardFlags::VGIC_ITS): the kernel reports \
                 KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 0, so the ITS's writes could not be \
                 tracked with the dirty ring: do not use the ring with an ITS on this kernel \
                 (create the VM without enable_dirty_ring)",
            ));
        }
        self.kvm
            .enable_cap(cap::DIRTY_LOG_RING_WITH_BITMAP, 0)
            .map_err(|e| {
                Error::sys(
                    "KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)",
                    e,
                    "the kernel refused the backup bitmap; do not use the ring with an ITS",
                )
            })?;
        self.set_mode(Mode::RingWithBitmap);
        log::info!("backup bitmap enabled (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)");
        Ok(())
    }

    /// The board-init ordering hook.
    pub fn board_init(&self, flags: u32) -> Result<()> {
        let mut life = self.life.lock();
        match life.check_board_init(flags)? {
            BoardAction::Record => {}
            BoardAction::EnableBackupBitmap => {
                self.enable_backup_bitmap()?;
                life.record_backup_bitmap();
            }
        }
        life.record_board(flags);
        log::debug!(
            "board initialised (flags {flags:#x}, ITS: {})",
            flags & BoardFlags::VGIC_ITS.bits() != 0
        );
        Ok(())
    }

    /// Chooses whether bitmap modes use `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`
    /// (default: yes where offered). Before the first memslot.
    pub fn set_manual_protect(&self, enable: bool) -> Result<()> {
        let life = self.life.lock();
        if life.has_memslot() {
            return Err(Error::busy(
                "manual protect after a memslot: choose before the first memslot",
            ));
        }
        if enable && self.kvm.check_cap(cap::MANUAL_DIRTY_LOG_PROTECT2) <= 0 {
            return Err(Error::new(
                libc::ENOTSUP,
                "the kernel lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
            ));
        }
        self.want_manual_protect.store(enable, Ordering::Relaxed);
        Ok(())
    }

    /// Is manual protect in use?
    pub fn manual_protect(&self) -> bool {
        self.manual_protect.load(Ordering::Relaxed)
    }

    fn maybe_enable_manual_protect(&self) {
        if self.mode() == Mode::Ring
            || self.manual_protect()
            || !self.want_manual_protect.load(Ordering::Relaxed)
        {
            return;
        }
        let caps = self.kvm.check_cap(cap::MANUAL_DIRTY_LOG_PROTECT2);
        if caps <= 0 {
            return;
        }
        // Only MANUAL_PROTECT_ENABLE: not INITIALLY_SET, so the first
        // KVM_GET_DIRTY_LOG reports what was written, not every page.
        let arg = u64::from(kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
        match self.kvm.enable_cap(cap::MANUAL_DIRTY_LOG_PROTECT2, arg) {
            Ok(()) => {
                self.manual_protect.store(true, Ordering::Relaxed);
                log::debug!("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled");
            }
            Err(e) => log::warn!(
                "KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) failed ({e}); \
                 KVM_GET_DIRTY_LOG will re-protect by itself"
            ),
        }
    }

    /// After a successful update of `slot` to host address `addr`
    /// (lifecycle lock held): keeps `keeper` (the memory's owner) alive
    /// while the slot maps it, or, with `None`, lets go of what the slot
    /// kept unless it still maps the same memory (a flags change). A
    /// deleted slot passes address 0. Returns what was let go of, for the
    /// caller to drop once the lock is released.
    fn keep_memory(&self, slot: u32, addr: u64, keeper: Option<Keeper>) -> Option<Keeper> {
        let mut kept = self.kept.lock();
        let gone = match keeper {
            Some(k) => kept.insert(slot, (addr, k)),
            None if kept.get(&slot).is_some_and(|(a, _)| *a != addr) => kept.remove(&slot),
            None => None,
        };
        gone.map(|(_, k)| k)
    }

    fn slot(&self, slot: u32) -> Option<Arc<Slot>> {
        self.slots.read().get(&slot).cloned()
    }
}
