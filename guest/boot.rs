//! How the test guest (`guest/guest.S`) boots, with no `unsafe` (for the
//! tests written with `#![forbid(unsafe_code)]`): its bytes and the
//! registers it starts with. `guest/host.rs` adds anonymous memory.
#![allow(dead_code)]

use kvm_ioctls::VcpuFd;

/// The guest code (see guest/guest.S).
pub const GUEST: &[u8] = include_bytes!("guest.bin");

/// 32-bit protected mode, flat segments, no paging; ESI = mailbox.
pub fn setup_regs(fd: &VcpuFd, mailbox: u64, stack: u64) {
    let mut sregs = fd.get_sregs().expect("KVM_GET_SREGS");
    let mut seg = sregs.cs;
    seg.base = 0;
    seg.limit = 0xffff_ffff;
    seg.g = 1;
    seg.db = 1;
    seg.present = 1;
    seg.s = 1;
    seg.l = 0;
    seg.dpl = 0;
    seg.type_ = 0xb; // code: execute/read, accessed
    seg.selector = 0x8;
    sregs.cs = seg;
    seg.type_ = 0x3; // data: read/write, accessed
    seg.selector = 0x10;
    sregs.ds = seg;
    sregs.es = seg;
    sregs.ss = seg;
    sregs.fs = seg;
    sregs.gs = seg;
    sregs.cr0 |= 1; // PE
    fd.set_sregs(&sregs).expect("KVM_SET_SREGS");
    let mut regs = fd.get_regs().expect("KVM_GET_REGS");
    regs.rip = 0;
    regs.rflags = 2;
    regs.rsi = mailbox;
    regs.rsp = stack;
    fd.set_regs(&regs).expect("KVM_SET_REGS");
}
