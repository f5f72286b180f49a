//! A model check of the lifecycle ordering: every sequence of lifecycle
//! calls up to a small depth, run through the C ABI on a real VM, each
//! answer (and the mode after it) compared with an oracle written from the
//! rules of doc/abi.md ("Call order"), independently of
//! `src/order.rs`.

mod common;

use std::os::fd::AsRawFd;
use std::ptr;

use common::*;
use kvm_dirty_shim::capi::*;
use kvm_ioctls::{Kvm, VcpuFd};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Call {
    Ring,
    Board0,
    BoardIts,
    SlotAdd,
    SlotDel,
    Vcpu,
}

const CALLS: [Call; 6] = [
    Call::Ring,
    Call::Board0,
    Call::BoardIts,
    Call::SlotAdd,
    Call::SlotDel,
    Call::Vcpu,
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Board {
    Open,
    Chosen(u32),
    Sealed,
}

/// The rules of doc/abi.md, nothing else.
#[derive(Clone, Debug)]
struct Oracle {
    /// The kernel offers KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP.
    backup_cap: bool,
    ring: bool,
    board: Board,
    slots: u32,
    slot_ever: bool,
    vcpus: u32,
    mode: i32,
}

impl Oracle {
    /// The expected return of `c` (0 or a negative errno), updating the state.
    fn step(&mut self, c: Call) -> i64 {
        let its = KDS_BOARD_VGIC_ITS;
        let r = match c {
            Call::Ring => {
                if self.ring || self.slot_ever || self.vcpus > 0 {
                    -libc::EBUSY
                } else if self.board == Board::Chosen(its) && !self.backup_cap {
                    -libc::ENOTSUP
                } else {
                    self.ring = true;
                    self.mode = if self.board == Board::Chosen(its) {
                        2
                    } else {
                        1
                    };
                    0
                }
            }
            Call::Board0 | Call::BoardIts => {
                let f = if c == Call::BoardIts { its } else { 0 };
                match self.board {
                    Board::Chosen(p) if p == f => 0,
                    Board::Chosen(_) => -libc::EBUSY,
                    Board::Sealed if f == its => -libc::EBUSY,
                    _ if f == its && self.ring && !self.backup_cap => -libc::ENOTSUP,
                    _ => {
                        if f == its && self.ring {
                            self.mode = 2;
                        }
                        self.board = Board::Chosen(f);
                        0
                    }
                }
            }
            Call::SlotAdd => {
                self.slots += 1;
                self.slot_ever = true;
                if self.board == Board::Open {
                    self.board = Board::Sealed;
                }
                0
            }
            Call::SlotDel => {
                if self.slots == 0 {
                    -libc::ENOENT
                } else {
                    self.slots -= 1;
                    0
                }
            }
            Call::Vcpu => {
                self.vcpus += 1;
                0
            }
        };
        i64::from(r)
    }
}

/// A VM the sequence runs on.
struct Run {
    kvm_vm: kvm_ioctls::VmFd,
    h: *mut KdsVm,
    mem: Vec<Mem>,
    vcpus: Vec<VcpuFd>,
}

impl Run {
    fn new() -> Run {
        let kvm_vm = Kvm::new().unwrap().create_vm().unwrap();
        let mut h = ptr::null_mut();
        assert_eq!(c!(kds_vm_adopt(kvm_vm.as_raw_fd(), &mut h)), 0);
        Run {
            kvm_vm,
            h,
            mem: Vec::new(),
            vcpus: Vec::new(),
        }
    }

    fn call(&mut self, c: Call) -> i64 {
        match c {
            Call::Ring => i64::from(c!(kds_dirty_ring_enable(self.h, 1024))),
            Call::Board0 => i64::from(c!(kds_board_init(self.h, 0))),
            Call::BoardIts => i64::from(c!(kds_board_init(self.h, KDS_BOARD_VGIC_ITS))),
            Call::SlotAdd => {
                let m = Mem::new(PAGE as usize * 4);
                let n = self.mem.len() as u64;
                let s = KdsMemslot {
                    slot: 10 + n as u32,
                    flags: KDS_MEM_LOG_DIRTY_PAGES,
                    guest_phys_addr: 0x1000_0000 + n * 0x10_0000,
                    memory_size: m.len as u64,
                    userspace_addr: m.addr(),
                };
                let r = c!(kds_memslot_update(self.h, &s, size_of::<KdsMemslot>()));
                if r == 0 {
                    self.mem.push(m);
                }
                i64::from(r)
            }
            Call::SlotDel => {
                let Some(last) = self.mem.len().checked_sub(1) else {
                    let s = KdsMemslot {
                        slot: 99,
                        ..KdsMemslot::default()
                    };
                    return i64::from(c!(kds_memslot_update(self.h, &s, size_of::<KdsMemslot>())));
                };
                let s = KdsMemslot {
                    slot: 10 + last as u32,
                    ..KdsMemslot::default()
                };
                let r = c!(kds_memslot_update(self.h, &s, size_of::<KdsMemslot>()));
                if r == 0 {
                    self.mem.pop();
                }
                i64::from(r)
            }
            Call::Vcpu => {
                let id = self.vcpus.len() as u32;
                let fd = self.kvm_vm.create_vcpu(u64::from(id)).unwrap();
                let r = c!(kds_vcpu_add(self.h, fd.as_raw_fd(), id));
                self.vcpus.push(fd);
                i64::from(r)
            }
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        c!(kds_vm_free(self.h));
    }
}

/// Runs every sequence of `depth` calls (prefixes are checked on the way);
/// returns how many sequences ran.
fn explore(depth: usize, backup_cap: bool) -> u64 {
    let mut count = 0;
    let mut seq = vec![0usize; depth];
    loop {
        let mut run = Run::new();
        let mut o = Oracle {
            backup_cap,
            ring: false,
            board: Board::Open,
            slots: 0,
            slot_ever: false,
            vcpus: 0,
            mode: KdsMode::KDS_MODE_BITMAP as i32,
        };
        for (i, &k) in seq.iter().enumerate() {
            let c = CALLS[k];
            let want = o.step(c);
            let got = run.call(c);
            let calls: Vec<_> = seq[..=i].iter().map(|&k| CALLS[k]).collect();
            assert_eq!(got, want, "{calls:?}: {}", last_error());
            if got < 0 {
                assert!(!last_error().is_empty(), "{calls:?}: no message");
            }
            assert_eq!(c!(kds_vm_mode(run.h)), o.mode, "mode after {calls:?}");
        }
        count += 1;
        // Next sequence (odometer).
        let mut i = depth;
        loop {
            if i == 0 {
                return count;
            }
            i -= 1;
            seq[i] += 1;
            if seq[i] < CALLS.len() {
                break;
            }
            seq[i] = 0;
        }
    }
}

#[test]
fn every_lifecycle_order_up_to_depth_5_follows_abi_md() {
    let kvm = Kvm::new().unwrap();
    let backup_cap = kvm
        .create_vm()
        .unwrap()
        .check_extension_raw(u64::from(kvm_bindings::KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP))
        > 0;
    let n = explore(5, backup_cap);
    assert_eq!(n, 6u64.pow(5));
    eprintln!(
        "model check: {n} sequences of 5 lifecycle calls (and their prefixes) matched doc/abi.md \
         (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: {backup_cap})"
    );
}
