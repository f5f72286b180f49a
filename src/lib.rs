//! kvm-dirty-shim: KVM dirty-page tracking for live migration, behind a C
//! ABI (`include/kvm_dirty_shim.h`, contract in `../shared/abi.md`).
//!
//! Modules, one job each:
//! - [`kvm`]: the kernel interface (VM fd, the ioctls kvm-ioctls lacks);
//! - [`order`]: the board-init ordering state machine;
//! - [`ring`]: one vCPU's mapped dirty ring and its harvest;
//! - [`bitmap`]: the shim's per-slot atomic bitmaps;
//! - [`reaper`]: the optional adaptive reaper thread;
//! - [`vm`]: the safe core tying them together;
//! - [`ffi`]: the thin C ABI layer; [`logger`]: `log` to the C callback.

pub mod bitmap;
pub mod error;
pub mod ffi;
pub mod kvm;
pub mod logger;
pub mod order;
pub mod reaper;
pub mod ring;
pub mod types;
pub mod vm;

pub use error::{Error, Result};
pub use ffi::*;
pub use types::*;
pub use vm::Vm;
