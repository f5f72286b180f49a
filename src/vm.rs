//! The safe Rust core: one VM's dirty tracking (ordering, memslots, vCPU
//! rings, reaping, syncing). The C ABI layer (`ffi`) is a thin wrapper.
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

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use kvm_bindings::kvm_userspace_memory_region;
use parking_lot::{Mutex, RwLock};

use crate::bitmap::{AtomicBitmap, count_masked, or_masked};
use crate::error::{Error, Result};
use crate::kvm::{KvmVm, RING_NEEDS_SLOT_BITMAP, cap, page_size};
use crate::order::{BoardAction, Lifecycle};
use crate::reaper::{Config as ReaperConfig, Reaper};
use crate::ring::{ENTRY_SIZE, Harvest, Ring};
use crate::types::{
    KDS_BOARD_VGIC_ITS, KDS_MEM_LOG_DIRTY_PAGES as MEM_LOG_DIRTY_PAGES,
    KDS_MEM_READONLY as MEM_READONLY, KDS_SYNC_FINAL as SYNC_FINAL, KdsMemslot, KdsMode,
    KdsReaperConfig, KdsStats, KdsVcpuStats,
};

/// Wedges in a row (ring-full exits with nothing harvested or handed back)
/// after which `reap_vcpu` gives up with `EOVERFLOW`: each either hands
/// back most of a lap or lets the reset it owes free the ring, but a VMM
/// must never spin.
const MAX_UNWEDGES: u32 = 1024;

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
    region: KdsMemslot,
    npages: u64,
    /// The shim's bitmap of harvested, published pages; `Some` while the
    /// slot has `KDS_MEM_LOG_DIRTY_PAGES`.
    dirty: Option<Arc<AtomicBitmap>>,
}

/// A registered vCPU.
struct Vcpu {
    ring: Option<Ring>,
    ring_full_reaps: AtomicU64,
    /// Ring-wedge detection (see `reap_vcpu`): the ring's harvested total
    /// at the previous `reap_vcpu`, and whether that call found nothing.
    last_full_total: AtomicU64,
    last_full_empty: AtomicBool,
    /// Wedges undone in a row (reset by a harvest that finds entries).
    unwedges: AtomicU32,
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
}

#[derive(Default)]
struct Stats {
    entries_reaped: AtomicU64,
    ring_resets: AtomicU64,
    ring_full_reaps: AtomicU64,
    bitmap_syncs: AtomicU64,
    pages_from_bitmap: AtomicU64,
    invalid_entries: AtomicU64,
    harvest_ns: AtomicU64,
    reset_ns: AtomicU64,
    ring_overflows: AtomicU64,
    ring_wedges: AtomicU64,
    entries_reset: AtomicU64,
    ring_recoveries: AtomicU64,
    reaper_reaps: AtomicU64,
    reset_shortfall: AtomicU64,
    /// Not in `KdsStats`: for logging at powers of two only.
    short_resets: AtomicU64,
    rearms: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

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
    stats: Stats,
    reaper: Mutex<Option<Reaper>>,
}

impl Vm {
    fn with_kvm(kvm: KvmVm) -> Self {
        Vm {
            kvm,
            page_size: page_size(),
            mode: AtomicU8::new(KdsMode::KDS_MODE_BITMAP as u8),
            ring_entries: AtomicU32::new(0),
            want_manual_protect: AtomicBool::new(true),
            manual_protect: AtomicBool::new(false),
            life: Mutex::new(Lifecycle::for_arch(RING_NEEDS_SLOT_BITMAP)),
            reap: Mutex::new(ReapState::default()),
            vcpus: RwLock::new(IdMap::default()),
            slots: RwLock::new(IdMap::default()),
            stats: Stats::default(),
            reaper: Mutex::new(None),
        }
    }

    /// Creates a VM (`KVM_CREATE_VM`); the shim owns its fd.
    pub fn create(machine_type: u64) -> Result<Self> {
        Ok(Self::with_kvm(KvmVm::create(machine_type)?))
    }

    /// Wraps the caller's VM fd (duplicated: the caller keeps its own).
    pub fn adopt(vm_fd: i32) -> Result<Self> {
        Ok(Self::with_kvm(KvmVm::adopt(vm_fd)?))
    }

    /// The VM fd the shim uses.
    pub fn fd(&self) -> i32 {
        self.kvm.raw_fd()
    }

    /// The tracking mode.
    pub fn mode(&self) -> KdsMode {
        KdsMode::from_u8(self.mode.load(Ordering::Acquire))
    }

    fn set_mode(&self, m: KdsMode) {
        self.mode.store(m as u8, Ordering::Release);
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
    pub fn dirty_ring_enable(&self, entries: u32) -> Result<()> {
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
                if life.ring_always_with_bitmap {
                    "the kernel lacks KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, \
                     and on this architecture a memslot without a dirty bitmap does not log \
                     writes reliably (arm64 maps it with huge pages): stay in bitmap mode"
                } else {
                    "the board has a vGIC ITS (kds_board_init) but the \
                     kernel lacks KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: the ring would miss the \
                     ITS's writes; stay in bitmap mode"
                },
            ));
        }
        self.kvm.enable_cap(capnr, bytes).map_err(|e| {
            Error::sys(
                &format!("KVM_ENABLE_CAP({name}, {bytes} bytes)"),
                &e,
                "the kernel refused this ring size; try another power of two, or stay in bitmap mode",
            )
        })?;
        life.ring = true;
        self.ring_entries.store(entries, Ordering::Relaxed);
        self.set_mode(KdsMode::KDS_MODE_RING);
        log::info!("dirty ring enabled: {entries} entries per vCPU via {name}");
        if backup {
            self.enable_backup_bitmap()?;
            life.backup_bitmap = true;
        }
        Ok(())
    }

    fn enable_backup_bitmap(&self) -> Result<()> {
        if self.kvm.check_cap(cap::DIRTY_LOG_RING_WITH_BITMAP) <= 0 {
            return Err(Error::new(
                libc::ENOTSUP,
                "the vGIC ITS (KDS_BOARD_VGIC_ITS): the kernel reports \
                 KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 0, so the ITS's writes could not be \
                 tracked with the dirty ring: do not use the ring with an ITS on this kernel \
                 (create the VM without kds_dirty_ring_enable)",
            ));
        }
        self.kvm
            .enable_cap(cap::DIRTY_LOG_RING_WITH_BITMAP, 0)
            .map_err(|e| {
                Error::sys(
                    "KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)",
                    &e,
                    "the kernel refused the backup bitmap; do not use the ring with an ITS",
                )
            })?;
        self.set_mode(KdsMode::KDS_MODE_RING_WITH_BITMAP);
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
                life.backup_bitmap = true;
            }
        }
        life.board_initialised(flags);
        log::debug!(
            "board initialised (flags {flags:#x}, ITS: {})",
            flags & KDS_BOARD_VGIC_ITS != 0
        );
        Ok(())
    }

    /// Chooses whether bitmap modes use `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`
    /// (default: yes where offered). Before the first memslot.
    pub fn set_manual_protect(&self, enable: bool) -> Result<()> {
        let life = self.life.lock();
        if life.memslot_created {
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
        if self.mode() == KdsMode::KDS_MODE_RING
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

    fn slot(&self, slot: u32) -> Option<Arc<Slot>> {
        self.slots.read().get(&slot).cloned()
    }

    fn region(m: &KdsMemslot) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: m.slot,
            flags: m.flags,
            guest_phys_addr: m.guest_phys_addr,
            memory_size: m.memory_size,
            userspace_addr: m.userspace_addr,
        }
    }

    fn kernel_set(&self, m: &KdsMemslot, what: &str) -> Result<()> {
        // SAFETY: the C caller promises (ABI) that the host range of the
        // slot stays mapped while the slot exists; a deletion passes size 0.
        unsafe { self.kvm.set_memslot(&Self::region(m)) }.map_err(|e| {
            Error::sys(
                &format!("KVM_SET_USER_MEMORY_REGION ({what} slot {:#x})", m.slot),
                &e,
                "check the slot id, the address ranges (no overlap) and the slot limit",
            )
        })
    }

    /// `KVM_SET_USER_MEMORY_REGION`: create, move, resize, change flags or
    /// delete (size 0) a memslot, keeping the shim's bitmaps in step.
    ///
    /// # Safety
    /// `m.userspace_addr .. + m.memory_size` must be memory of this process
    /// that stays mapped while the slot exists.
    pub unsafe fn memslot_set(&self, m: &KdsMemslot) -> Result<()> {
        let known = MEM_LOG_DIRTY_PAGES | MEM_READONLY;
        if m.flags & !known != 0 {
            return Err(Error::inval(format!(
                "unknown flags {:#x} (known: KDS_MEM_LOG_DIRTY_PAGES, \
                 KDS_MEM_READONLY)",
                m.flags & !known
            )));
        }
        let ps = self.page_size;
        if !(m.memory_size.is_multiple_of(ps)
            && m.guest_phys_addr.is_multiple_of(ps)
            && m.userspace_addr.is_multiple_of(ps))
        {
            return Err(Error::inval(format!(
                "slot {:#x}: guest_phys_addr {:#x}, userspace_addr {:#x} and \
                 memory_size {:#x} must be multiples of the page size {ps}",
                m.slot, m.guest_phys_addr, m.userspace_addr, m.memory_size
            )));
        }
        let mut life = self.life.lock();
        let old = self.slot(m.slot);
        if m.memory_size == 0 {
            let Some(old) = old else {
                return Err(Error::new(
                    libc::ENOENT,
                    format!("delete of unknown slot {:#x}", m.slot),
                ));
            };
            self.kernel_set(m, "delete")?;
            self.slots.write().remove(&m.slot);
            log::debug!("slot {:#x} deleted ({} pages)", m.slot, old.npages);
            return Ok(());
        }
        if old.is_none() && !life.memslot_created {
            self.maybe_enable_manual_protect();
            log::info!("first memslot: the mode is now fixed at {:?}", self.mode());
        }
        // The kernel moves a slot or changes its LOG flag in place; any
        // other change (size, host address, READONLY) is delete + create.
        let recreate = old.as_ref().is_some_and(|o| {
            o.region.memory_size != m.memory_size
                || o.region.userspace_addr != m.userspace_addr
                || (o.region.flags ^ m.flags) & MEM_READONLY != 0
        });
        // Allocate before touching the kernel: out of memory (RLIMIT_AS, say)
        // must leave the VM as it was, not abort the VMM.
        let npages = m.memory_size / ps;
        let keep_bits = !recreate && old.as_ref().is_some_and(|o| o.dirty.is_some());
        let fresh = if m.flags & MEM_LOG_DIRTY_PAGES != 0 && !keep_bits {
            Some(Arc::new(AtomicBitmap::try_new(npages).ok_or_else(
                || {
                    Error::new(
                        libc::ENOMEM,
                        format!(
                            "slot {:#x}: cannot allocate the shim's dirty bitmap \
                         of {npages} pages ({} bytes): out of memory; nothing was changed",
                            m.slot,
                            npages.div_ceil(64) * 8
                        ),
                    )
                },
            )?))
        } else {
            None
        };
        self.slots.write().try_reserve(1).map_err(|_| {
            Error::new(
                libc::ENOMEM,
                "out of memory for the slot table; nothing was changed",
            )
        })?;
        if let Some(o) = old.as_ref().filter(|_| recreate) {
            let del = KdsMemslot {
                memory_size: 0,
                ..o.region
            };
            self.kernel_set(&del, "delete for resize of")?;
        }
        if let Err(e) = self.kernel_set(m, if old.is_some() { "update" } else { "create" }) {
            if recreate {
                // The old slot is gone from the kernel: forget it too.
                self.slots.write().remove(&m.slot);
            }
            return Err(e);
        }
        // Under the reap lock: no publish into the old bitmap can slip in
        // between copying its bits and replacing it.
        let _reap = self.reap.lock();
        let old_dirty = old.as_ref().and_then(|o| o.dirty.clone());
        let dirty = if m.flags & MEM_LOG_DIRTY_PAGES == 0 {
            None
        } else {
            match (old_dirty, fresh) {
                // Same pages (a move or an unrelated flag change): keep the bits.
                (Some(b), _) if keep_bits => Some(b),
                // Resized: carry the bits of the pages that remain.
                (Some(b), Some(n)) => {
                    n.or_from(&b);
                    Some(n)
                }
                (_, n) => n,
            }
        };
        self.slots.write().insert(
            m.slot,
            Arc::new(Slot {
                region: *m,
                npages,
                dirty,
            }),
        );
        life.memslot_created();
        log::debug!(
            "slot {:#x}: gpa {:#x}, {} pages, flags {:#x}",
            m.slot,
            m.guest_phys_addr,
            npages,
            m.flags
        );
        Ok(())
    }

    /// Registers a vCPU fd; in ring modes maps its ring.
    pub fn vcpu_add(&self, vcpu_fd: i32, index: u32) -> Result<()> {
        if vcpu_fd < 0 {
            return Err(Error::inval(format!("bad vCPU fd {vcpu_fd}")));
        }
        let mut life = self.life.lock();
        if self.vcpus.read().contains_key(&index) {
            return Err(Error::new(
                libc::EEXIST,
                format!("vCPU index {index} is already registered"),
            ));
        }
        let entries = self.ring_entries();
        let ring = if self.mode().has_ring() {
            Some(Ring::map(vcpu_fd, entries, self.page_size)?)
        } else {
            None
        };
        let v = Arc::new(Vcpu {
            ring,
            ring_full_reaps: AtomicU64::new(0),
            last_full_total: AtomicU64::new(0),
            last_full_empty: AtomicBool::new(false),
            unwedges: AtomicU32::new(0),
        });
        self.vcpus.write().insert(index, v);
        life.vcpu_added = true;
        log::debug!("vCPU {index} added (fd {vcpu_fd})");
        Ok(())
    }

    /// Unregisters a vCPU: harvests what is left in its ring, unmaps it.
    pub fn vcpu_remove(&self, index: u32) -> Result<()> {
        let _life = self.life.lock();
        let mut st = self.reap.lock();
        let Some(v) = self.vcpus.write().remove(&index) else {
            return Err(unknown_vcpu(index));
        };
        if let Some(r) = &v.ring {
            let h = self.harvest_one(&mut st, &self.slots.read(), r, false);
            self.reset(&mut st, &self.vcpus.read(), Some(r))?;
            self.reap_locked(&mut st, h.entries)?;
        }
        log::debug!("vCPU {index} removed");
        Ok(())
    }

    fn vcpu(&self, index: u32) -> Result<Arc<Vcpu>> {
        self.vcpus
            .read()
            .get(&index)
            .cloned()
            .ok_or_else(|| unknown_vcpu(index))
    }

    /// Harvests one ring straight into the shim's per-slot bitmaps (reap
    /// lock held; `reap_locked` must follow). Bounds-checks every entry: an
    /// unknown slot or an offset past its end is counted, never written.
    fn harvest_one(
        &self,
        st: &mut ReapState,
        slots: &IdMap<Slot>,
        ring: &Ring,
        ring_full: bool,
    ) -> Harvest {
        let mut invalid = 0u64;
        // Consecutive entries mostly name the same slot: one lookup per run.
        let mut cache: Option<(u32, &AtomicBitmap)> = None;
        let h = ring.harvest(ring_full, |slot, offset| {
            let bm = match cache {
                Some((s, b)) if s == slot => Some(b),
                _ => {
                    let b = slots.get(&slot).and_then(|s| s.dirty.as_deref());
                    cache = b.map(|b| (slot, b));
                    b
                }
            };
            if !bm.is_some_and(|b| b.set_locked(offset)) {
                invalid += 1;
            }
        });
        st.marked += h.entries + h.skipped + h.repaired;
        st.harvested += h.entries;
        if invalid > 0 {
            bump(&self.stats.invalid_entries, invalid);
            log::warn!(
                "{invalid} ring entries named an unknown slot or an offset past its end: skipped"
            );
        }
        if h.skipped > 0 {
            let n = self.stats.ring_recoveries.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                log::warn!(
                    "dirty ring: skipped a hole of {} entries the kernel left after overrunning \
                     the ring; the ring works again (recovery {n} on this VM; logged at powers \
                     of two, see kds_stats)",
                    h.skipped
                );
            }
        }
        if h.full {
            st.overflow = true;
            st.rearm = true;
            let n = self.stats.ring_overflows.fetch_add(1, Ordering::Relaxed) + 1;
            // A vCPU that keeps overrunning its ring does so at every reap:
            // the log says so at powers of two, kds_stats every time.
            if n.is_power_of_two() {
                log::error!(
                    "dirty ring found completely full ({} entries): the kernel may have dropped \
                     entries; reporting every dirty-logged page dirty. Reap more often \
                     (overflow {n} on this VM; logged at powers of two, see kds_stats).",
                    ring.entries()
                );
            }
        }
        h
    }

    /// Second half of every reap (reap lock held): `KVM_RESET_DIRTY_RINGS`.
    ///
    /// Why the harvested bits may be drained only after the reset returns:
    /// until then the harvested pages are still writable in the guest
    /// without a new ring entry. If `sync_slot` handed them to the VMM,
    /// which copies the page, a guest write landing after the copy but
    /// before the reset would never be logged, and the destination would
    /// keep the stale copy: a silently corrupt migration. After the reset,
    /// any later write faults and makes a new entry. The bits are set under
    /// the reap lock, which is held until here, and `sync_slot` drains only
    /// under it after a successful reset (`marked` back to 0), so that holds even
    /// when a reset fails: the next reap or sync retries it first.
    fn reap_locked(&self, st: &mut ReapState, harvested: u64) -> Result<u64> {
        bump(&self.stats.entries_reaped, harvested);
        self.reset(st, &self.vcpus.read(), None)?;
        if st.overflow {
            // Re-protect first, then report everything: a write before the
            // re-arm is in the report, one after it makes a ring entry.
            if st.rearm && self.rearm_logging()? {
                st.rearm = false;
            }
            // Until logging is re-armed, every reap reports every page.
            st.overflow = st.rearm;
            for s in self.slots.read().values() {
                if let Some(b) = &s.dirty {
                    b.set_all();
                }
            }
        }
        Ok(harvested)
    }

    /// `KVM_RESET_DIRTY_RINGS` for what is marked (reap lock held), then
    /// reads from each ring how far it got (`Ring::after_reset`; the one
    /// VM-wide count it returns is only counted). `extra`: a ring harvested
    /// but no longer in the vCPU map.
    ///
    /// A marked entry the reset did not reach names a page that is still
    /// writable without a new entry: its bit is set again here, after
    /// every reset until one reaches it, so every sync reports the page
    /// (the guest may have written it after the previous report). An entry
    /// an overrun wrote over is a page lost from the ring: every page is
    /// reported and logging re-armed (`reap_locked`).
    fn reset(&self, st: &mut ReapState, vcpus: &IdMap<Vcpu>, extra: Option<&Ring>) -> Result<()> {
        if st.marked == 0 {
            return Ok(());
        }
        let t = Instant::now();
        let r = self.kvm.reset_dirty_rings();
        bump(&self.stats.reset_ns, t.elapsed().as_nanos() as u64);
        bump(&self.stats.ring_resets, 1);
        let reset = r?;
        bump(&self.stats.entries_reset, reset);
        let slots = self.slots.read();
        let (mut reached, mut unreached) = (0u64, 0u64);
        let rings = vcpus.values().filter_map(|v| v.ring.as_ref()).chain(extra);
        for ring in rings.filter(|r| r.lag() > 0) {
            let s = ring.after_reset(|slot, offset| {
                if let Some(b) = slots.get(&slot).and_then(|s| s.dirty.as_deref()) {
                    b.set_locked(offset);
                }
            });
            reached += u64::from(s.reached);
            unreached += u64::from(s.unreached);
            if s.overwritten {
                st.overflow = true;
                st.rearm = true;
            }
        }
        drop(slots);
        st.marked = unreached;
        if unreached > 0 {
            bump(&self.stats.reset_shortfall, unreached);
            let n = self.stats.short_resets.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                log::warn!(
                    "KVM_RESET_DIRTY_RINGS left {unreached} marked ring entries unreached (a \
                     vCPU overran its ring before the reset, or something else touched it): \
                     their pages are reported at every sync until a reset reaches them (short \
                     reset {n} on this VM; logged at powers of two, see kds_stats)"
                );
            }
        }
        if reached != reset {
            log::debug!(
                "KVM_RESET_DIRTY_RINGS counted {reset} entries; the rings show {reached} handed back"
            );
        }
        log::debug!(
            "reaped {} ring entries; KVM_RESET_DIRTY_RINGS reset {reset} in {} us",
            std::mem::take(&mut st.harvested),
            t.elapsed().as_micros()
        );
        Ok(())
    }

    /// Re-arms dirty logging on every logged slot (reap lock held): turns
    /// `KVM_MEM_LOG_DIRTY_PAGES` off and on again, so the kernel
    /// write-protects every page anew and the next write to any page makes
    /// a ring entry, including the pages whose entries an overrun lost.
    /// Needs the lifecycle lock (no `memslot_set` in flight): `false` when
    /// another thread holds it, and the caller retries at its next reap.
    fn rearm_logging(&self) -> Result<bool> {
        let Some(_life) = self.life.try_lock() else {
            return Ok(false);
        };
        let slots: Vec<KdsMemslot> = self
            .slots
            .read()
            .values()
            .filter(|s| s.dirty.is_some())
            .map(|s| s.region)
            .collect();
        for m in &slots {
            let off = KdsMemslot {
                flags: m.flags & !MEM_LOG_DIRTY_PAGES,
                ..*m
            };
            self.kernel_set(&off, "re-arm logging: log off,")?;
            self.kernel_set(m, "re-arm logging: log on,")?;
        }
        let n = self.stats.rearms.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            log::warn!(
                "dirty logging re-armed on {} slots after a kernel ring overrun (re-arm {n} on \
                 this VM; logged at powers of two)",
                slots.len()
            );
        }
        Ok(true)
    }

    /// Harvests every vCPU ring, resets once, publishes. Entries harvested.
    pub fn reap(&self) -> Result<u64> {
        if !self.mode().has_ring() {
            return Ok(0);
        }
        self.reap_all(&mut self.reap.lock())
    }

    /// `reap` with the reap lock held.
    fn reap_all(&self, st: &mut ReapState) -> Result<u64> {
        let t = Instant::now();
        let mut n = 0;
        let slots = self.slots.read();
        let vcpus = self.vcpus.read();
        for v in vcpus.values() {
            if let Some(r) = &v.ring {
                n += self.harvest_one(st, &slots, r, false).entries;
            }
        }
        drop(vcpus);
        drop(slots);
        bump(&self.stats.harvest_ns, t.elapsed().as_nanos() as u64);
        self.reap_locked(st, n)
    }

    /// Harvests one vCPU's ring (for `KVM_EXIT_DIRTY_RING_FULL`).
    ///
    /// A wedge (this call and the previous one found nothing, and no thread
    /// harvested this ring in between) marks every logged page dirty and is
    /// undone where the kernel's overrun explains it (`Ring::unwedge`, at
    /// most `MAX_UNWEDGES` times in a row); otherwise `EOVERFLOW`.
    pub fn reap_vcpu(&self, index: u32) -> Result<u64> {
        let v = self.vcpu(index)?;
        let Some(ring) = &v.ring else {
            return Ok(0);
        };
        let mut st = self.reap.lock();
        let t = Instant::now();
        let h = self.harvest_one(&mut st, &self.slots.read(), ring, true);
        bump(&self.stats.harvest_ns, t.elapsed().as_nanos() as u64);
        let total = ring.harvested();
        let prev_total = v.last_full_total.swap(total, Ordering::Relaxed);
        // Nothing harvested and nothing handed back again: the kernel got
        // nothing from this call that would let the vCPU run.
        let empty = h.entries == 0 && h.skipped == 0 && h.repaired == 0;
        let prev_empty = v.last_full_empty.swap(empty, Ordering::Relaxed);
        let wedged = empty && prev_empty && prev_total == total;
        if h.entries > 0 {
            bump(&v.ring_full_reaps, 1);
            bump(&self.stats.ring_full_reaps, 1);
            v.unwedges.store(0, Ordering::Relaxed);
        }
        let (mut undone, mut give_up) = (0, false);
        if wedged {
            st.overflow = true;
            st.rearm = true;
            bump(&self.stats.ring_wedges, 1);
            // Undone where the ring shows how (`Ring::unwedge`); otherwise
            // the reset this call owes may free the ring, so the vCPU gets
            // to try again, at most `MAX_UNWEDGES` times in a row.
            undone = ring.unwedge();
            if undone > 0 {
                st.marked += u64::from(undone);
                bump(&self.stats.ring_recoveries, 1);
            }
            give_up = v.unwedges.fetch_add(1, Ordering::Relaxed) >= MAX_UNWEDGES;
        }
        let n = self.reap_locked(&mut st, h.entries)?;
        if give_up {
            let msg = format!(
                "vCPU {index}'s dirty ring stays wedged: it exited with \
                 KVM_EXIT_DIRTY_RING_FULL {MAX_UNWEDGES} times in a row with nothing to harvest \
                 or hand back (the kernel overran the ring and dropped entries). Every \
                 dirty-logged page was reported dirty; this VM's ring can no longer be trusted: \
                 fail the migration and fall back to a full resend"
            );
            log::error!("{msg}");
            return Err(Error::new(libc::EOVERFLOW, msg));
        }
        if wedged && undone > 0 {
            log::warn!(
                "vCPU {index}'s dirty ring was wedged by a kernel overrun: handed {undone} \
                 never-published entries back to the kernel; every dirty-logged page was \
                 reported dirty"
            );
        }
        Ok(n)
    }

    /// ORs into `out` (`nbits` valid bits) every page of `slot` dirtied
    /// since its previous sync. Returns the number of pages reported.
    pub fn sync_slot(&self, slot: u32, out: &mut [u64], nbits: u64, flags: u32) -> Result<u64> {
        let nbits = nbits.min(out.len() as u64 * 64);
        if flags & !SYNC_FINAL != 0 {
            return Err(Error::inval(format!(
                "unknown flags {:#x} (known: KDS_SYNC_FINAL)",
                flags & !SYNC_FINAL
            )));
        }
        let s = self.logged_slot(slot, nbits)?;
        let mode = self.mode();
        if !mode.has_ring() {
            let n = or_masked(out, &self.kernel_bitmap(&s)?, s.npages);
            log::debug!("sync slot {slot:#x}: {n} pages reported (KVM_GET_DIRTY_LOG)");
            return Ok(n);
        }
        // The backup bitmap (ring-with-bitmap, final stage) is the kernel's
        // own: read it before taking the reap lock.
        let backup = if mode == KdsMode::KDS_MODE_RING_WITH_BITMAP && flags & SYNC_FINAL != 0 {
            let bm = self.kernel_bitmap(&s)?;
            self.log_backup_pages(&s, &bm);
            Some(bm)
        } else {
            None
        };
        // Reap and drain under one hold of the reap lock: every entry
        // harvested before this call (by any thread) is published before we
        // drain, and the bitmaps have a single writer at a time.
        let mut st = self.reap.lock();
        self.reap_all(&mut st)?;
        // Look the slot up again: the reap published into the current one.
        let s = self.logged_slot(slot, nbits)?;
        let dirty = s.dirty.as_ref().expect("logged slot has a bitmap");
        let n = dirty.drain_into(out, backup.as_deref());
        log::debug!(
            "sync slot {slot:#x}: {n} pages reported (final: {})",
            flags & SYNC_FINAL != 0
        );
        Ok(n)
    }

    /// Names (at debug level) the guest-physical pages that the backup
    /// bitmap held at the final sync: writes made with no vCPU running,
    /// such as the vGIC ITS saving its tables.
    fn log_backup_pages(&self, s: &Slot, bm: &[u64]) {
        if !log::log_enabled!(log::Level::Debug) {
            return;
        }
        let n = count_masked(bm, s.npages);
        if n == 0 {
            return;
        }
        let gpas: Vec<String> = (0..s.npages)
            .filter(|&p| bm[(p / 64) as usize] & (1 << (p % 64)) != 0)
            .take(16)
            .map(|p| format!("{:#x}", s.region.guest_phys_addr + p * self.page_size))
            .collect();
        log::debug!(
            "final sync slot {:#x}: the backup bitmap held {n} pages: {}{}",
            s.region.slot,
            gpas.join(" "),
            if n > 16 { " ..." } else { "" }
        );
    }

    fn logged_slot(&self, slot: u32, nbits: u64) -> Result<Arc<Slot>> {
        let s = self.slot(slot).ok_or_else(|| {
            Error::new(
                libc::ENOENT,
                format!("unknown slot {slot:#x} (no such memslot)"),
            )
        })?;
        if s.dirty.is_none() {
            return Err(Error::new(
                libc::ENOENT,
                format!(
                    "slot {slot:#x} does not have KDS_MEM_LOG_DIRTY_PAGES: turn \
                     dirty logging on with kds_memslot_set first"
                ),
            ));
        }
        if nbits < s.npages {
            return Err(Error::inval(format!(
                "bitmap too small for slot {slot:#x}: it has {} pages, the \
                 bitmap {nbits} bits",
                s.npages,
            )));
        }
        Ok(s)
    }

    /// `KVM_GET_DIRTY_LOG` (then `KVM_CLEAR_DIRTY_LOG` of exactly what it
    /// reported, under manual protect) for one slot.
    fn kernel_bitmap(&self, s: &Slot) -> Result<Vec<u64>> {
        let slot = s.region.slot;
        let mut bm = self
            .kvm
            .get_dirty_log(slot, s.region.memory_size)
            .map_err(|e| {
                Error::sys(
                    &format!("KVM_GET_DIRTY_LOG (slot {slot:#x})"),
                    &e,
                    "is dirty logging on for this slot?",
                )
            })?;
        bump(&self.stats.bitmap_syncs, 1);
        if self.manual_protect() && bm.iter().any(|&w| w != 0) {
            self.kvm.clear_dirty_log(slot, s.npages, &mut bm)?;
        }
        bump(&self.stats.pages_from_bitmap, count_masked(&bm, s.npages));
        Ok(bm)
    }

    /// Starts the adaptive reaper thread (see `reaper`). `EBUSY` when one
    /// runs, `ENOTSUP` without a dirty ring.
    pub fn reaper_start(self: &Arc<Self>, cfg: &KdsReaperConfig) -> Result<()> {
        let cfg = ReaperConfig::new(cfg)?;
        if !self.mode().has_ring() {
            return Err(Error::new(
                libc::ENOTSUP,
                "this VM has no dirty ring (bitmap mode): there is nothing to \
                 reap; enable the ring with kds_dirty_ring_enable first",
            ));
        }
        let mut r = self.reaper.lock();
        if r.is_some() {
            return Err(Error::busy(
                "the reaper already runs; kds_reaper_stop it first",
            ));
        }
        *r = Some(Reaper::start(Arc::clone(self), cfg)?);
        Ok(())
    }

    /// Stops the adaptive reaper thread and waits for it; nothing to do
    /// when none runs. `EDEADLK` from the reaper thread itself (a logger
    /// callback calling it).
    pub fn reaper_stop(&self) -> Result<()> {
        let mut g = self.reaper.lock();
        if g.as_ref()
            .is_some_and(|r| r.thread_id() == std::thread::current().id())
        {
            return Err(Error::new(
                libc::EDEADLK,
                "stopping the reaper from the reaper thread itself (a logger callback?): it would \
                 wait for itself; call it from another thread",
            ));
        }
        let r = g.take();
        drop(g);
        if let Some(r) = r {
            r.stop();
        }
        Ok(())
    }

    /// For each vCPU ring: (vCPU index, entries the kernel pushed so far,
    /// entries waiting to be harvested, ring size). No syscall, no
    /// reap lock: a snapshot for the reaper's decisions.
    pub(crate) fn ring_levels(&self, mut f: impl FnMut(u32, u64, u32, u32)) {
        for (&i, v) in self.vcpus.read().iter() {
            if let Some(r) = &v.ring {
                let fill = r.fill();
                f(i, r.harvested() + u64::from(fill), fill, r.entries());
            }
        }
    }

    /// `reap`, counted as the reaper thread's.
    pub(crate) fn reap_by_reaper(&self) -> Result<u64> {
        bump(&self.stats.reaper_reaps, 1);
        self.reap()
    }

    /// Counters since creation.
    pub fn stats(&self) -> KdsStats {
        let s = &self.stats;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        KdsStats {
            entries_reaped: g(&s.entries_reaped),
            ring_resets: g(&s.ring_resets),
            ring_full_reaps: g(&s.ring_full_reaps),
            bitmap_syncs: g(&s.bitmap_syncs),
            pages_from_bitmap: g(&s.pages_from_bitmap),
            invalid_entries: g(&s.invalid_entries),
            harvest_ns: g(&s.harvest_ns),
            reset_ns: g(&s.reset_ns),
            ring_overflows: g(&s.ring_overflows),
            ring_wedges: g(&s.ring_wedges),
            entries_reset: g(&s.entries_reset),
            ring_recoveries: g(&s.ring_recoveries),
            reaper_reaps: g(&s.reaper_reaps),
            reset_shortfall: g(&s.reset_shortfall),
        }
    }

    /// Counters of one vCPU.
    pub fn vcpu_stats(&self, index: u32) -> Result<KdsVcpuStats> {
        let v = self.vcpu(index)?;
        Ok(KdsVcpuStats {
            entries_reaped: v.ring.as_ref().map_or(0, |r| r.harvested()),
            ring_full_reaps: v.ring_full_reaps.load(Ordering::Relaxed),
        })
    }
}

fn unknown_vcpu(index: u32) -> Error {
    Error::inval(format!(
        "unknown vCPU index {index}: register it with kds_vcpu_add first"
    ))
}
