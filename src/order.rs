//! The board-init ordering state machine of the ABI ("Lifecycle and
//! ordering"): pure state, no syscalls, so every order can be checked.
//!
//! The kernel does not reliably refuse the bad orders itself (kernels before
//! the fix dereference a NULL dirty bitmap when the ITS tables are saved, and
//! allocate bitmaps nobody reads), so the shim refuses them first.

use crate::error::{Error, Result};

const BOARD_VGIC_ITS: u32 = crate::types::BoardFlags::VGIC_ITS.bits();

/// Every board flag this version knows.
pub(crate) const BOARD_KNOWN: u32 = BOARD_VGIC_ITS;

/// What the board hook has decided so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Board {
    /// The board hook not called and no memslot yet.
    Open,
    /// The board hook called with these flags.
    Chosen(u32),
    /// A memslot came first: the board is "no non-vCPU dirty sources".
    Sealed,
}

/// Lifecycle facts the ordering rules depend on. Its fields change only
/// through its `record_*` methods, after the kernel accepted the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifecycle {
    /// A dirty ring is enabled.
    ring: bool,
    /// The board decision.
    board: Board,
    /// A memslot has been created (ever: the seal does not come undone).
    memslot_created: bool,
    /// A vCPU has been added (ever).
    vcpu_added: bool,
    /// `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP` is enabled.
    backup_bitmap: bool,
    /// The architecture needs the backup bitmap with every ring
    /// ([`crate::kvm::RING_NEEDS_SLOT_BITMAP`]).
    ring_always_with_bitmap: bool,
}

/// What the board hook must do once the rules allow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoardAction {
    /// Nothing to ask the kernel: record the flags (or they were recorded).
    Record,
    /// Enable `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`, then record.
    EnableBackupBitmap,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    /// A fresh VM.
    pub const fn new() -> Self {
        Lifecycle {
            ring: false,
            board: Board::Open,
            memslot_created: false,
            vcpu_added: false,
            backup_bitmap: false,
            ring_always_with_bitmap: false,
        }
    }

    /// A fresh VM on an architecture that does (`true`) or does not need the
    /// backup bitmap with every dirty ring.
    pub const fn for_arch(ring_always_with_bitmap: bool) -> Self {
        Lifecycle {
            ring_always_with_bitmap,
            ..Self::new()
        }
    }

    /// Has a memslot been created (ever)?
    pub fn has_memslot(&self) -> bool {
        self.memslot_created
    }

    /// Does this architecture need the backup bitmap with every ring?
    pub fn ring_always_with_bitmap(&self) -> bool {
        self.ring_always_with_bitmap
    }

    /// Records the dirty ring enabled.
    pub fn record_ring(&mut self) {
        self.ring = true;
    }

    /// Records `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP` enabled.
    pub fn record_backup_bitmap(&mut self) {
        self.backup_bitmap = true;
    }

    /// Records a vCPU added.
    pub fn record_vcpu(&mut self) {
        self.vcpu_added = true;
    }

    /// May the dirty ring be enabled now?
    pub fn check_ring_enable(&self) -> Result<()> {
        if self.ring {
            return Err(Error::busy("the dirty ring is already enabled on this VM"));
        }
        if self.memslot_created {
            return Err(Error::busy(
                "the dirty ring after a memslot (update_memslot): enable the ring at accelerator \
                 init, before the first memslot (a ring enabled later leaves the memslots' \
                 kernel bitmaps allocated and unused)",
            ));
        }
        if self.vcpu_added {
            return Err(Error::busy(
                "the dirty ring after a vCPU (add_vcpu): enable the ring before creating \
                 and adding any vCPU",
            ));
        }
        Ok(())
    }

    /// Does enabling the ring now also require the backup bitmap (the board
    /// already chose an ITS, or the architecture needs it with any ring)?
    pub fn ring_needs_backup_bitmap(&self) -> bool {
        self.ring_always_with_bitmap
            || matches!(self.board, Board::Chosen(f) if f & BOARD_VGIC_ITS != 0)
    }

    /// May the board hook run with `flags` now, and what must it do?
    pub fn check_board_init(&self, flags: u32) -> Result<BoardAction> {
        if flags & !BOARD_KNOWN != 0 {
            return Err(Error::inval(format!(
                "unknown board flags {:#x} (known: VGIC_ITS, 0x1)",
                flags & !BOARD_KNOWN
            )));
        }
        let its = flags & BOARD_VGIC_ITS != 0;
        match self.board {
            Board::Chosen(prev) if prev == flags => Ok(BoardAction::Record),
            Board::Chosen(prev) => Err(Error::busy(format!(
                "the board was already initialised with flags {prev:#x}; \
                 it cannot change to {flags:#x}"
            ))),
            Board::Sealed if its => unreachable_its(),
            Board::Sealed => Ok(BoardAction::Record),
            Board::Open if its && self.memslot_created => unreachable_its(),
            Board::Open if its && self.ring && !self.backup_bitmap => {
                Ok(BoardAction::EnableBackupBitmap)
            }
            Board::Open => Ok(BoardAction::Record),
        }
    }

    /// Records a successful board hook with `flags`.
    pub fn record_board(&mut self, flags: u32) {
        self.board = Board::Chosen(flags);
    }

    /// Records a created memslot; the first one seals an open board.
    pub fn record_memslot(&mut self) {
        self.memslot_created = true;
        if self.board == Board::Open {
            self.board = Board::Sealed;
        }
    }
}

fn unreachable_its() -> Result<BoardAction> {
    Err(Error::busy(
        "the vGIC ITS after a memslot (update_memslot): call the board hook as \
         soon as the board picks the ITS, before the first memslot; memslots created first \
         sealed the board as having no ITS (their dirty logging would have no backup bitmap \
         and saving the ITS tables would crash older kernels)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_then_its_then_memslot() {
        let mut l = Lifecycle::new();
        l.check_ring_enable().unwrap();
        l.ring = true;
        assert_eq!(
            l.check_board_init(BOARD_VGIC_ITS).unwrap(),
            BoardAction::EnableBackupBitmap
        );
        l.record_board(BOARD_VGIC_ITS);
        assert_eq!(
            l.check_board_init(BOARD_VGIC_ITS).unwrap(),
            BoardAction::Record
        );
        assert_eq!(l.check_board_init(0).unwrap_err().errno(), libc::EBUSY);
        l.record_memslot();
        assert_eq!(l.board, Board::Chosen(BOARD_VGIC_ITS));
    }

    #[test]
    fn memslot_first_seals_the_board() {
        let mut l = Lifecycle::new();
        l.ring = true;
        l.record_memslot();
        let e = l.check_board_init(BOARD_VGIC_ITS).unwrap_err();
        assert_eq!(e.errno(), libc::EBUSY);
        assert!(e.message().contains("before the first memslot"));
        assert_eq!(l.check_board_init(0).unwrap(), BoardAction::Record);
        assert_eq!(l.check_ring_enable().unwrap_err().errno(), libc::EBUSY);
    }

    #[test]
    fn its_chosen_before_ring_asks_for_backup_bitmap() {
        let mut l = Lifecycle::new();
        assert_eq!(
            l.check_board_init(BOARD_VGIC_ITS).unwrap(),
            BoardAction::Record
        );
        l.record_board(BOARD_VGIC_ITS);
        assert!(l.ring_needs_backup_bitmap());
        l.check_ring_enable().unwrap();
    }

    #[test]
    fn an_arch_that_needs_the_bitmap_gets_it_with_the_ring() {
        let mut l = Lifecycle::for_arch(true);
        assert!(l.ring_needs_backup_bitmap());
        l.ring = true;
        l.backup_bitmap = true;
        // The ITS then has its bitmap already: nothing more to enable.
        assert_eq!(
            l.check_board_init(BOARD_VGIC_ITS).unwrap(),
            BoardAction::Record
        );
        assert!(!Lifecycle::for_arch(false).ring_needs_backup_bitmap());
    }

    #[test]
    fn unknown_flags_are_einval() {
        let l = Lifecycle::new();
        assert_eq!(
            l.check_board_init(1 << 7).unwrap_err().errno(),
            libc::EINVAL
        );
    }

    #[test]
    fn vcpu_before_ring_is_refused() {
        let l = Lifecycle {
            vcpu_added: true,
            ..Lifecycle::new()
        };
        assert!(
            l.check_ring_enable()
                .unwrap_err()
                .message()
                .contains("add_vcpu")
        );
    }
}
