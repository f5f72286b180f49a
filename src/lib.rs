//! kvm-dirty-shim: KVM dirty-page tracking for live migration (dirty
//! rings, the ring's backup bitmap, `KVM_GET_DIRTY_LOG`), for VMMs in Rust
//! and in C.
//!
//! - Rust VMMs use [`DirtyTracker`] (one VM's tracking: its memslots and
//!   vCPUs, reaping, syncing into the caller's bitmaps, the adaptive
//!   reaper, counters) and [`VcpuTracker`] (one vCPU's, for its thread).
//!   With the `vm-memory` feature, memslots come from vm-memory's regions
//!   and syncs merge into its `Bitmap`s. `examples/rust_vmm.rs` is a whole
//!   VMM on kvm-ioctls, vm-memory and this API.
//! - C VMMs use the `kds_*` functions of `include/kvm_dirty_shim.h` (the
//!   contract is `doc/abi.md`): the `capi` module, built with the `capi`
//!   feature into a static library, a thin skin over the same API.
//!
//! Inside, one job per module; each is listed once here, and ownership
//! flows one way (no module uses one that uses it back):
//! - `capi` (feature `capi`): the C ABI, argument checks and errno over the
//!   tracker.
//! - `tracker`: the public Rust API ([`DirtyTracker`], [`VcpuTracker`]).
//! - `vmm` (feature `vm-memory`): memslots from vm-memory regions.
//! - `reaper`: the adaptive reaper thread; `pacer`: when it checks next
//!   (its knobs, the rings' levels, the rate it paces by).
//! - `vm`: the core tying the rest together (ordering, memslots, vCPU
//!   rings, reaping, syncing; the reaper's wake flags).
//! - `ring`: one vCPU's mapped ring, its harvest, reset and overrun.
//! - `bitmap`: the per-slot atomic bitmaps; `counters`: the statistics.
//! - `order`: the board-init ordering state machine.
//! - `kvm`: the kernel interface (the VM fd, the ioctls kvm-ioctls lacks,
//!   what each architecture's kernel needs); `seccomp`: the syscalls the
//!   library makes, for a VMM's filter.
//! - `reentry`: the guard against calls from inside a callback.
//! - `types`: the public value types; `error`: [`Error`] and [`ErrorKind`].

mod bitmap;
mod counters;
mod error;
mod kvm;
mod order;
mod pacer;
mod reaper;
mod reentry;
mod ring;
pub mod seccomp;
mod tracker;
mod types;
mod vm;
#[cfg(feature = "vm-memory")]
mod vmm;

#[cfg(feature = "capi")]
pub mod capi;

pub use error::{Error, ErrorKind, Result};

/// The README's Rust snippet, compiled as a doctest.
#[cfg(all(doctest, feature = "vm-memory"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
pub use tracker::{DirtyPages, DirtyTracker, ExitAction, VcpuTracker, dirty_pages};
pub use types::{
    BoardFlags, Memslot, MemslotFlags, Mode, ReaperConfig, SYNC_RUN_WORDS_MAX, SlotId, Stats,
    SyncReport, SyncStage, VcpuStats,
};

/// For `examples/bench.rs` only: the cost of draining a full bitmap.
#[doc(hidden)]
pub mod bench {
    /// Drains a bitmap of `pages` pages, every bit set, into `out`
    /// (`pages / 64` words, zeroed by the caller); returns the pages and
    /// the time the drain alone took.
    pub fn drain_full(pages: u64, out: &mut [u64]) -> (u64, std::time::Duration) {
        let bm = crate::bitmap::AtomicBitmap::new(pages);
        bm.set_all();
        let t = std::time::Instant::now();
        let n = bm.drain_into(out, None);
        (n, t.elapsed())
    }
}
