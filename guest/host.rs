//! The host side of the test guest (`guest/guest.S`), shared by the tests
//! (through `tests/common`), the demo and the Rust VMM example: the guest's
//! bytes and start registers (`guest/boot.rs`), and anonymous guest memory.
//! Nothing here uses the shim.
#![allow(dead_code)]

use std::ptr;

#[path = "boot.rs"]
mod boot;
pub use boot::{GUEST, setup_regs};

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
