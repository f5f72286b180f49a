//! The host side of the test guest (`guest/guest.S`), shared by the tests
//! (through `tests/common`), the demo and the Rust VMM example: the guest's
//! bytes, anonymous guest memory, and the registers the guest starts with.
//! Nothing here uses the shim.
#![allow(dead_code)]

use std::ptr;

use kvm_ioctls::VcpuFd;

/// The guest code (see guest/guest.S).
pub const GUEST: &[u8] = include_bytes!("guest.bin");

/// Anonymous host memory, unmapped on drop.
pub struct Mem {
    pub ptr: *mut u8,
    pub len: usize,
}

// SAFETY: plain process memory; the tests synchronise access themselves
// (the guest writes it, the host reads it only while the vCPU is stopped).
unsafe impl Send for Mem {}
// SAFETY: as above.
unsafe impl Sync for Mem {}

impl Mem {
    pub fn new(len: usize) -> Mem {
        // SAFETY: a fresh private anonymous mapping.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap {len} bytes");
        Mem {
            ptr: p as *mut u8,
            len,
        }
    }

    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    pub fn read_u32(&self, off: u64) -> u32 {
        assert!(off as usize + 4 <= self.len);
        // SAFETY: in bounds (checked); the guest may write it concurrently
        // only in tests that read while the vCPU is stopped.
        unsafe { ptr::read_volatile(self.ptr.add(off as usize) as *const u32) }
    }

    pub fn write_u32(&self, off: u64, v: u32) {
        assert!(off as usize + 4 <= self.len);
        // SAFETY: in bounds (checked).
        unsafe { ptr::write_volatile(self.ptr.add(off as usize) as *mut u32, v) }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

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
