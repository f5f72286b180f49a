//! The kernel interface: the VM fd and the few KVM ioctls this library makes.
//!
//! Everything kvm-ioctls offers is used from it; what it lacks
//! (`KVM_RESET_DIRTY_RINGS`, `KVM_CLEAR_DIRTY_LOG`) is written here once, as
//! one small wrapper per ioctl, on the kernel's structs from kvm-bindings.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_enable_cap,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VmFd};

use crate::error::{Error, ErrorKind, Result};

/// `KVM_DIRTY_GFN_F_DIRTY`: the kernel published this ring entry.
pub(crate) const DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// `KVM_DIRTY_GFN_F_RESET`: userspace harvested this ring entry.
pub(crate) const DIRTY_GFN_F_RESET: u32 = 1 << 1;

/// Capabilities this library asks the kernel about (numbers from kvm-bindings).
pub mod cap {
    /// `KVM_CAP_DIRTY_LOG_RING` (192).
    pub(crate) const DIRTY_LOG_RING: u32 = kvm_bindings::KVM_CAP_DIRTY_LOG_RING;
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` (223).
    pub(crate) const DIRTY_LOG_RING_ACQ_REL: u32 = kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL;
    /// `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP` (225).
    pub(crate) const DIRTY_LOG_RING_WITH_BITMAP: u32 =
        kvm_bindings::KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP;
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (168).
    pub(crate) const MANUAL_DIRTY_LOG_PROTECT2: u32 =
        kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
}

/// Does a dirty-logged memslot need the kernel's dirty bitmap for its
/// writes to be logged at all, ring or not? True on arm64: its stage-2
/// fault handler (`user_mem_abort` in arch/arm64/kvm/mmu.c) treats a
/// memslot as logging only when `memslot_is_logging()`, which tests
/// `memslot->dirty_bitmap`. A ring-only memslot (no bitmap) is then mapped
/// with block mappings where the host memory is huge pages (QEMU's guest RAM
/// is `MADV_HUGEPAGE`), and one write fault makes a whole 2 MiB block
/// writable with only the faulting page pushed to the ring. Measured on
/// Debian's arm64 6.12.117 with QEMU: 16,355 of the guest's 16,384 written
/// pages lost in one migration, and the destination's guest dead. So on
/// arm64 the ring is always used with `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`
/// (stock QEMU enables it for every VM too), and a kernel with the ring but
/// without that capability stays in bitmap mode.
pub(crate) const RING_NEEDS_SLOT_BITMAP: bool = cfg!(target_arch = "aarch64");

/// Does the kernel log every write to a dirty-logged memslot that has no
/// dirty bitmap (a ring-only memslot), whatever backs it? `release` is the
/// kernel's release string (`uname -r`).
///
/// Not on riscv64 before Linux 7.2: from 6.17 (its dirty ring) to 7.1 the
/// stage-2 fault handler (`kvm_riscv_mmu_map()` in arch/riscv/kvm/mmu.c)
/// decides that a memslot logs by `memslot->dirty_bitmap`, which a ring-only
/// memslot lacks, so it maps hugetlbfs memory (and transparent huge pages
/// from 7.0) in 2 MiB blocks and only the first write to each block
/// reaches the ring: the loss arm64 shows without its backup bitmap, and
/// riscv64 has no backup bitmap. Linux 7.2 ("RISC-V: KVM: Fix lost write
/// protection on huge pages during dirty logging") tests the memslot's
/// `KVM_MEM_LOG_DIRTY_PAGES` instead, as x86 does. Every other
/// architecture: true (arm64 never has a ring-only memslot, see
/// [`RING_NEEDS_SLOT_BITMAP`]). A release that does not parse counts as
/// old.
pub(crate) fn ring_only_memslots_log_every_write(release: &str) -> bool {
    if !cfg!(target_arch = "riscv64") {
        return true;
    }
    release_at_least(release, (7, 2))
}

/// Is the kernel release `release` ("7.2.13+deb14-riscv64") at least
/// `major.minor`? False when it does not start with two numbers.
fn release_at_least(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let mut next = || parts.next().and_then(|p| p.parse::<u32>().ok());
    match (next(), next()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

/// The running kernel's release (`uname -r`), "" if uname fails.
pub(crate) fn kernel_release() -> String {
    // SAFETY: utsname is plain old data: all-zero bytes are a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname for the call's duration;
    // uname writes NUL-terminated strings into it.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c.to_ne_bytes()[0])
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `KVM_DIRTY_LOG_PAGE_OFFSET`: where a vCPU's ring starts in the vCPU fd,
/// in pages. 64 on every architecture with a dirty ring: x86, arm64, and
/// riscv64, whose uapi `asm/kvm.h` defines it in the change that enabled
/// its ring (Linux 6.17). kvm-bindings' riscv64 bindings were generated
/// from older headers and carry the generic fallback, 0, where the kernel
/// has no ring page to map.
pub(crate) const DIRTY_LOG_PAGE_OFFSET: u64 = 64;

const KVMIO: u64 = 0xAE;

const fn io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}

const fn iow(nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

/// `KVM_RESET_DIRTY_RINGS`: `_IO(KVMIO, 0xc7)`.
pub(crate) const KVM_RESET_DIRTY_RINGS: u64 = io(0xc7);
/// `KVM_CLEAR_DIRTY_LOG`: `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
pub(crate) const KVM_CLEAR_DIRTY_LOG: u64 = iowr(0xc0, std::mem::size_of::<kvm_clear_dirty_log>());
/// `KVM_SET_USER_MEMORY_REGION` (made through kvm-ioctls; for seccomp).
pub(crate) const KVM_SET_USER_MEMORY_REGION: u64 =
    iow(0x46, std::mem::size_of::<kvm_userspace_memory_region>());
/// `KVM_GET_DIRTY_LOG` (made through kvm-ioctls; for seccomp).
pub(crate) const KVM_GET_DIRTY_LOG: u64 =
    iow(0x42, std::mem::size_of::<kvm_bindings::kvm_dirty_log>());

/// The host page size (`sysconf(_SC_PAGESIZE)`): the unit of memslot
/// offsets, dirty bitmaps and ring entries. Never assumed to be 4096.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ps > 0 { ps as u64 } else { 4096 }
}

/// A KVM VM fd. Owned: for an adopted fd this is a duplicate, so the
/// caller's own fd stays open and usable after the shim lets go of it.
pub struct KvmVm {
    fd: VmFd,
}

/// The VM fds of every live `KvmVm` in this process, so that a VM is not
/// tracked twice (two trackers would each reset the other's rings).
static LIVE: parking_lot::Mutex<Vec<RawFd>> = parking_lot::Mutex::new(Vec::new());

/// `kcmp(KCMP_FILE)`: do fds `a` and `b` of this process refer to the same
/// open file? `None` where the kernel cannot say (no CONFIG_KCMP, a
/// seccomp filter).
fn same_file(a: RawFd, b: RawFd) -> Option<bool> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: getpid has no preconditions.
    let pid = libc::c_long::from(unsafe { libc::getpid() });
    // SAFETY: kcmp only compares two fds of this process by number; it
    // reads no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            libc::c_long::from(a),
            libc::c_long::from(b),
        )
    };
    (r >= 0).then_some(r == 0)
}

/// What `fd` refers to, as /proc/self/fd shows it (`anon_inode:kvm-vm` for
/// a KVM VM); `None` without /proc.
fn fd_target(fd: RawFd) -> Option<String> {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// `EINVAL` unless `fd` is a KVM VM fd: /proc/self/fd names it
/// `anon_inode:kvm-vm`; without /proc, it answers
/// `KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY)` (a VM fd, and /dev/kvm, do)
/// but not `KVM_GET_API_VERSION` (only /dev/kvm does).
fn check_vm_fd(fd: RawFd, shown: RawFd) -> Result<()> {
    let not_vm = |what: &str| {
        Err(Error::inval(format!(
            "fd {shown} is {what}, not a KVM VM fd: pass the fd KVM_CREATE_VM returned \
             (kvm_ioctls::VmFd), not /dev/kvm or a vCPU fd"
        )))
    };
    if let Some(t) = fd_target(fd) {
        return if t == "anon_inode:kvm-vm" {
            Ok(())
        } else {
            not_vm(&t)
        };
    }
    // SAFETY: KVM_GET_API_VERSION and KVM_CHECK_EXTENSION take an integer
    // argument and write no memory.
    let (api, user_mem) = unsafe {
        (
            libc::ioctl(fd, io(0x00) as _, 0),
            libc::ioctl(
                fd,
                io(0x03) as _,
                kvm_bindings::KVM_CAP_USER_MEMORY as libc::c_ulong,
            ),
        )
    };
    if api >= 0 {
        return not_vm("/dev/kvm (it answers KVM_GET_API_VERSION)");
    }
    if user_mem <= 0 {
        return not_vm("not KVM (KVM_CHECK_EXTENSION failed)");
    }
    Ok(())
}

/// `MADV_POPULATE_READ` (Linux 5.14): fault a range in now, and fail
/// with `EFAULT` where a read would raise `SIGBUS`. An older kernel
/// answers `EINVAL`: the check is then skipped (the fd is still checked to
/// be a vCPU through /proc).
const MADV_POPULATE_READ: libc::c_int = 22;

/// Faults `len` bytes at `p` in; `Err(errno)` where a page cannot be read
/// (`EFAULT`); `Ok(false)` on a kernel without `MADV_POPULATE_READ`.
fn populate(p: *mut libc::c_void, len: usize) -> std::result::Result<bool, i32> {
    // SAFETY: madvise on a mapping of ours; MADV_POPULATE_READ only faults
    // pages in and writes no memory.
    if unsafe { libc::madvise(p, len, MADV_POPULATE_READ) } == 0 {
        return Ok(true);
    }
    match std::io::Error::last_os_error().raw_os_error().unwrap_or(0) {
        libc::EINVAL => Ok(false),
        e => Err(e),
    }
}

/// Maps `len` bytes of vCPU `fd` at `offset` (its dirty ring), shared, and
/// faults them in before anyone reads them: a fd that is not a vCPU, a
/// vCPU of a VM without a ring or with a smaller one would otherwise map
/// fine and raise `SIGBUS` at the first read. Also checks that the page
/// past the ring is not part of it (a VM with a larger ring: a ring of a
/// size other than this VM's).
pub(crate) fn map_vcpu_ring(
    fd: RawFd,
    offset: u64,
    len: usize,
    page_size: u64,
) -> Result<std::ptr::NonNull<libc::c_void>> {
    let fail = |errno: i32, why: &str| {
        Error::sys(
            "mmap of the vCPU dirty ring (KVM_DIRTY_LOG_PAGE_OFFSET)",
            errno,
            &format!("{why}: pass a vCPU fd of this VM, created after enable_dirty_ring"),
        )
    };
    let map = |off: u64, n: usize| {
        // SAFETY: a fresh shared mapping of `fd`; nothing is read from it
        // before `populate` has checked every page.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                n,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                off as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        } else {
            Ok(p)
        }
    };
    let unmap = |p: *mut libc::c_void, n: usize| {
        // SAFETY: unmaps a mapping made by `map` above, never read.
        unsafe { libc::munmap(p, n) };
    };
    let p = map(offset, len).map_err(|e| fail(e, "the kernel refused the mapping"))?;
    if let Err(e) = populate(p, len) {
        unmap(p, len);
        return Err(fail(
            e,
            "the mapping cannot be read (not a vCPU, or its VM has no ring of this size)",
        ));
    }
    // The page right after the ring must not be part of it.
    let past = page_size as usize;
    if let Ok(q) = map(offset + len as u64, past) {
        let readable = populate(q, past) == Ok(true);
        unmap(q, past);
        if readable {
            unmap(p, len);
            return Err(Error::inval(format!(
                "the vCPU's dirty ring is larger than {} bytes: it is not a ring of this VM's \
                 size (another VM's vCPU?)",
                len
            )));
        }
    }
    Ok(std::ptr::NonNull::new(p).expect("mmap returned NULL"))
}

/// The KVM vCPU id of `fd` from /proc/self/fd (`anon_inode:kvm-vcpu:<id>`);
/// `Ok(None)` without /proc; `EINVAL` for a fd that is not a KVM vCPU.
pub(crate) fn vcpu_id_of(fd: RawFd) -> Result<Option<u32>> {
    let Some(t) = fd_target(fd) else {
        return Ok(None);
    };
    match t.strip_prefix("anon_inode:kvm-vcpu:").map(str::parse) {
        Some(Ok(id)) => Ok(Some(id)),
        _ => Err(Error::inval(format!(
            "fd {fd} is {t}, not a KVM vCPU fd: pass the fd KVM_CREATE_VCPU returned"
        ))),
    }
}

impl Drop for KvmVm {
    fn drop(&mut self) {
        // Before the fd closes (the fields drop after this), so that its
        // number is never in the list while another file has it.
        let fd = self.fd.as_raw_fd();
        LIVE.lock().retain(|&f| f != fd);
    }
}

impl KvmVm {
    /// Opens `/dev/kvm` and creates a VM of `machine_type` (`KVM_CREATE_VM`).
    pub fn create(machine_type: u64) -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| {
            Error::sys(
                "open(/dev/kvm)",
                e.errno(),
                "is KVM available and accessible?",
            )
        })?;
        let fd = kvm
            .create_vm_with_type(machine_type)
            .map_err(|e| Error::sys("KVM_CREATE_VM", e.errno(), "check the machine type"))?;
        LIVE.lock().push(fd.as_raw_fd());
        Ok(KvmVm { fd })
    }

    /// Wraps a duplicate of the caller's VM fd.
    pub fn adopt(vm_fd: RawFd) -> Result<Self> {
        if vm_fd < 0 {
            return Err(Error::inval(format!("bad VM fd {vm_fd}")));
        }
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) only reads its integer arguments; a
        // bad fd is reported as EBADF.
        let dup = unsafe { libc::fcntl(vm_fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            return Err(Error::sys(
                "fcntl(F_DUPFD_CLOEXEC) of the VM fd",
                errno,
                "pass an open KVM VM fd",
            ));
        }
        // SAFETY: `dup` is an open fd that we own and hand over.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        check_vm_fd(dup, vm_fd)?;
        let mut live = LIVE.lock();
        if let Some(&other) = live.iter().find(|&&f| same_file(f, dup) == Some(true)) {
            return Err(Error::with_kind(
                ErrorKind::InUse,
                libc::EBUSY,
                format!(
                    "fd {vm_fd} is a VM this process tracks already (its tracker uses fd {other}): \
                     adopt a VM once; two trackers would each reset the other's dirty rings"
                ),
            ));
        }
        let kvm =
            Kvm::new().map_err(|e| Error::sys("open(/dev/kvm)", e.errno(), "is KVM available?"))?;
        // SAFETY: `owned` is an open fd that we own and hand over to the VmFd.
        let fd = unsafe { kvm.create_vmfd_from_rawfd(owned.into_raw_fd()) }
            .map_err(|e| Error::sys("KVM_GET_VCPU_MMAP_SIZE", e.errno(), "is KVM available?"))?;
        live.push(fd.as_raw_fd());
        let vm = KvmVm { fd };
        Ok(vm)
    }

    /// The VM fd (ours: the duplicate for an adopted VM).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// `KVM_CREATE_VCPU` with `id` (kvm-ioctls, which maps its `kvm_run`).
    pub fn create_vcpu(&self, id: u64) -> std::result::Result<kvm_ioctls::VcpuFd, i32> {
        self.fd.create_vcpu(id).map_err(|e| e.errno())
    }

    /// Is a dirty ring enabled on this VM (by anyone)? `KVM_RESET_DIRTY_RINGS`
    /// answers `EINVAL` only on a VM without one; on a VM with one it
    /// resets what is marked RESET, which is what a reset owes anyway.
    pub fn has_ring(&self) -> bool {
        self.reset_dirty_rings().is_ok()
    }

    /// `KVM_CHECK_EXTENSION` on the VM fd: the capability's value (0: absent).
    pub fn check_cap(&self, cap: u32) -> i32 {
        self.fd.check_extension_raw(cap as libc::c_ulong)
    }

    /// `KVM_ENABLE_CAP` on the VM fd with `args[0] = arg0`.
    /// `Err(errno)` on failure.
    pub fn enable_cap(&self, cap: u32, arg0: u64) -> std::result::Result<(), i32> {
        let c = kvm_enable_cap {
            cap,
            args: [arg0, 0, 0, 0],
            ..Default::default()
        };
        self.fd.enable_cap(&c).map_err(|e| e.errno())
    }

    /// `KVM_SET_USER_MEMORY_REGION`.
    ///
    /// # Safety
    /// `region.userspace_addr .. + memory_size` must stay mapped for as long
    /// as the slot exists (the caller's promise, passed on from the C ABI).
    pub unsafe fn update_memslot(
        &self,
        region: &kvm_userspace_memory_region,
    ) -> std::result::Result<(), i32> {
        // SAFETY: forwarded to our caller (see the function's contract).
        unsafe { self.fd.set_user_memory_region(*region) }.map_err(|e| e.errno())
    }

    /// `KVM_GET_DIRTY_LOG` for a slot of `memory_size` bytes.
    pub fn get_dirty_log(&self, slot: u32, memory_size: u64) -> std::result::Result<Vec<u64>, i32> {
        self.fd
            .get_dirty_log(slot, memory_size as usize)
            .map_err(|e| e.errno())
    }

    /// `KVM_CLEAR_DIRTY_LOG` (manual protect): re-protects and clears exactly
    /// the pages set in `bitmap`, pages `0 .. npages` of `slot`.
    pub fn clear_dirty_log(&self, slot: u32, npages: u64, bitmap: &mut [u64]) -> Result<()> {
        if (bitmap.len() as u64) * 64 < npages || npages > u32::MAX as u64 {
            return Err(Error::inval(
                "KVM_CLEAR_DIRTY_LOG: bitmap shorter than the slot",
            ));
        }
        let arg = kvm_clear_dirty_log {
            slot,
            num_pages: npages as u32,
            first_page: 0,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.as_mut_ptr() as *mut libc::c_void,
            },
        };
        // SAFETY: `arg` is a valid kvm_clear_dirty_log whose bitmap holds at
        // least `num_pages` bits (checked above); the kernel only reads it.
        let r = unsafe { libc::ioctl(self.raw_fd(), KVM_CLEAR_DIRTY_LOG as libc::c_ulong, &arg) };
        if r < 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            return Err(Error::sys(
                "KVM_CLEAR_DIRTY_LOG",
                errno,
                "the slot's pages stay write-enabled; sync again",
            ));
        }
        Ok(())
    }

    /// `KVM_RESET_DIRTY_RINGS`: re-protects every ring entry marked RESET;
    /// returns the number of entries the kernel reset, and what else the
    /// call met (see [`Reset`]).
    ///
    /// Signals are blocked around the ioctl. Since Linux 6.17
    /// (`kvm_dirty_ring_reset()` in virt/kvm/dirty_ring.c, "KVM: Bail from
    /// the dirty ring reset flow if a signal is pending") the kernel stops
    /// the walk when a signal is pending, and returns the count so far,
    /// not -EINTR. Where it stops it has already marked the entries of the
    /// batch it was building (up to 64 pages of one slot) reset, but not
    /// re-protected their pages: a later write to them makes no ring
    /// entry, and userspace cannot see which pages those were. A blocked
    /// signal does not make `signal_pending()` true; it is delivered when
    /// the mask is restored, right after. SIGSTOP and the cgroup freezer
    /// cannot be blocked: a call they may have stopped is reported in
    /// [`Reset::switched_out`].
    pub fn reset_dirty_rings(&self) -> Result<Reset> {
        // The test-only feature leaves signals unblocked (tests/kvm-host).
        let block = !cfg!(feature = "test-unblocked-reset");
        let mut old = SigSet::empty();
        // SAFETY: sigfillset / pthread_sigmask on sigset_t values we own;
        // the old mask is restored below on every path.
        unsafe {
            let mut all = SigSet::empty();
            if block {
                libc::sigfillset(&mut all.0);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &all.0, &mut old.0);
        }
        let switches = voluntary_switches();
        // SAFETY: an argument-less ioctl on our VM fd.
        let r = unsafe { libc::ioctl(self.raw_fd(), KVM_RESET_DIRTY_RINGS as libc::c_ulong) };
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let switched_out = voluntary_switches() != switches;
        let mut pending = SigSet::empty();
        // SAFETY: sigpending fills a sigset_t we own; then the caller's
        // mask is restored (held signals are delivered now).
        let signal_held = unsafe {
            libc::sigpending(&mut pending.0);
            let held = (1..=libc::SIGRTMAX()).any(|s| {
                libc::sigismember(&pending.0, s) == 1 && libc::sigismember(&old.0, s) == 0
            });
            libc::pthread_sigmask(libc::SIG_SETMASK, &old.0, std::ptr::null_mut());
            held
        };
        if r < 0 {
            return Err(Error::sys(
                "KVM_RESET_DIRTY_RINGS",
                errno,
                "harvested pages stay pending and are retried on the next reap",
            ));
        }
        Ok(Reset {
            entries: r as u64,
            signal_held,
            switched_out,
        })
    }
}

/// What one `KVM_RESET_DIRTY_RINGS` call did.
#[derive(Debug, Clone, Copy)]
pub struct Reset {
    /// Entries the kernel reset (its return value).
    pub entries: u64,
    /// A signal arrived during the call and was held until it returned
    /// (unblocked, it would have stopped the reset on Linux 6.17+).
    pub signal_held: bool,
    /// The calling thread slept during the call: stopped (SIGSTOP, a
    /// debugger, the cgroup freezer; these cannot be blocked and may have
    /// stopped the reset partway, leaving up to 64 pages write-enabled
    /// without their entries), or waited for the kernel's memslot lock
    /// (`slots_lock`, held through every `KVM_SET_USER_MEMORY_REGION`;
    /// the VM's own updates hold its reap lock so that no reset waits for
    /// them here). The caller cannot tell which, and must assume the first.
    pub switched_out: bool,
}

/// A `sigset_t`, zero-initialised.
struct SigSet(libc::sigset_t);

impl SigSet {
    fn empty() -> SigSet {
        // SAFETY: sigset_t is plain data; all zeroes is a valid value,
        // and sigemptyset makes it the empty set.
        let mut s = SigSet(unsafe { std::mem::zeroed() });
        // SAFETY: a sigset_t we own.
        unsafe { libc::sigemptyset(&mut s.0) };
        s
    }
}

/// The calling thread's voluntary context switches so far (a stop, a
/// sleep on a lock); 0 if getrusage fails.
fn voluntary_switches() -> i64 {
    // SAFETY: rusage is plain data; getrusage fills the one we own.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_THREAD, &mut u) != 0 {
            return 0;
        }
        u.ru_nvcsw
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // linux/kvm.h: _IO(KVMIO, 0xc7) and _IOWR(KVMIO, 0xc0, 24-byte struct).
        assert_eq!(KVM_RESET_DIRTY_RINGS, 0xaec7);
        assert_eq!(KVM_CLEAR_DIRTY_LOG, 0xc018_aec0);
        // _IOW(KVMIO, 0x46, 32 bytes) and _IOW(KVMIO, 0x42, 16 bytes).
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
        assert_eq!(KVM_GET_DIRTY_LOG, 0x4010_ae42);
    }

    #[test]
    fn release_versions_compare_by_major_and_minor() {
        assert!(release_at_least("7.2.13+deb14-riscv64", (7, 2)));
        assert!(release_at_least("7.2", (7, 2)));
        assert!(release_at_least("7.10.1", (7, 2)));
        assert!(release_at_least("10.0.0", (7, 2)));
        assert!(!release_at_least("7.1.8", (7, 2)));
        assert!(!release_at_least("7.0.9-rc1", (7, 2)));
        assert!(!release_at_least("6.18.2", (7, 2)));
        assert!(!release_at_least("", (7, 2)));
        assert!(!release_at_least("linux", (7, 2)));
        assert!(!release_at_least("7", (7, 2)));
        assert!(!kernel_release().is_empty());
        // The rule is riscv64's only.
        assert_eq!(
            ring_only_memslots_log_every_write("7.1.8"),
            !cfg!(target_arch = "riscv64")
        );
        assert!(ring_only_memslots_log_every_write("7.2.13+deb14-riscv64"));
    }
}
