//! Dirty ring mode on the real kernel: a real guest dirties pages, the shim
//! must report every page whose content changed (loss 0).

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use kvm_dirty_shim::capi::*;
use kvm_ioctls::VcpuExit;

const RING: u32 = 4096;

/// Runs `rounds` rounds of `stores` stores on vCPU 0 over a `pages`-page
/// dirty-logged slot; checks after every round. Returns the checker and
/// the ring-full exits seen.
fn ring_rounds(vm: &TestVm, pages: u64, stores: u32, rounds: u32) -> (Checker, u64, bool) {
    let (mut c, mut v) = vm.guest(pages, stores, 7);
    let mut full = 0;
    for it in 1..=rounds {
        vm.set_iteration(0, it);
        let r = v.run_round(vm.h);
        full += r.ring_full_exits;
        let (changed, reported, lost) = c.check(vm.h, 0);
        assert_eq!(
            lost, 0,
            "round {it}: {lost} of {changed} changed pages lost ({reported} reported)"
        );
        if r.wedged {
            return (c, full, true);
        }
    }
    (c, full, false)
}

#[test]
fn ring_mode_loses_nothing() {
    let vm = TestVm::new(Some(RING));
    assert_eq!(c!(kds_vm_mode(vm.vm())), KdsMode::KDS_MODE_RING as i32);
    let (c, _, wedged) = ring_rounds(&vm, 1024, 500, 20);
    assert!(!wedged);
    assert_eq!(c.lost, 0);
    // Exactly the pages written were reported (no overflow here).
    assert_eq!(c.reported, c.changed);
    assert!(
        c.changed > 5000,
        "the guest really dirtied pages: {}",
        c.changed
    );
    let s = vm.stats();
    assert!(s.entries_reaped >= c.changed, "{s:?}");
    assert!(
        s.ring_resets > 0 && s.reset_ns > 0 && s.harvest_ns > 0,
        "{s:?}"
    );
    assert_eq!(s.invalid_entries, 0);
    let vs = vcpu_stats(vm.h, 0);
    assert_eq!(vs.entries_reaped, s.entries_reaped);
}

#[test]
fn sync_by_runs_loses_nothing_in_ring_and_bitmap_modes() {
    for ring in [Some(RING), None] {
        let vm = TestVm::new(ring);
        // 8192 pages (128 words), 3000 stores a round: runs of several words.
        let (mut c, mut v) = vm.guest(8192, 3000, 11);
        for it in 1..=6 {
            vm.set_iteration(0, it);
            v.run_round(vm.h);
            let (changed, reported, lost) = c.check_runs(vm.h, 0);
            assert_eq!(
                lost, 0,
                "{ring:?} round {it}: {lost} of {changed} lost ({reported} reported)"
            );
            assert!(changed > 0, "the guest dirtied pages");
        }
        // Nothing dirtied since: an empty sync calls nothing back.
        let (_, reported, _) = c.check_runs(vm.h, 0);
        assert_eq!(reported, 0, "{ring:?}");
        let bad = c!(kds_memslot_sync_runs(
            vm.vm(),
            c.slot,
            0,
            None,
            std::ptr::null_mut()
        ));
        assert_eq!(bad, -(libc::EINVAL as i64));
    }
}

#[test]
fn ring_full_exits_are_reaped_without_loss() {
    let vm = TestVm::new(Some(RING));
    let (c, full, wedged) = ring_rounds(&vm, 16384, 8000, 10);
    assert_eq!(c.lost, 0);
    assert!(
        full > 0,
        "the vCPU never exited with KVM_EXIT_DIRTY_RING_FULL"
    );
    let s = vm.stats();
    let vs = vcpu_stats(vm.h, 0);
    assert!(
        s.ring_full_reaps > 0 && vs.ring_full_reaps == s.ring_full_reaps,
        "{s:?} {vs:?}"
    );
    // This kernel may overrun the ring: then the shim reported it (and
    // every page), and a wedge ended the run instead of a hang.
    eprintln!(
        "ring-full: {full} exits, {} overflows, {} wedges, wedged={wedged}, {} changed pages checked",
        s.ring_overflows, s.ring_wedges, c.changed
    );
    if wedged {
        assert!(s.ring_wedges > 0 && s.ring_overflows + s.ring_wedges > 0);
    }
}

#[test]
fn reaper_thread_beside_the_running_vcpu() {
    let vm = TestVm::new(Some(RING));
    let pages = 4096;
    let (mut c, mut v) = vm.guest(pages, 3000, 11);
    let ((), by_reaper) = with_reaper(vm.h, Duration::ZERO, || {
        for it in 1..=30 {
            vm.set_iteration(0, it);
            let r = v.run_round(vm.h);
            assert!(!r.wedged);
            let (changed, _, lost) = c.check(vm.h, 0);
            assert_eq!(lost, 0, "round {it}: lost {lost} of {changed}");
        }
    });
    assert!(c.changed > 30_000);
    eprintln!("reaper thread harvested {by_reaper} entries");
}

#[test]
fn two_vcpus_on_two_threads() {
    let vm = TestVm::new(Some(RING));
    let pages = 2048;
    let mut threads = Vec::new();
    for id in 0..2u32 {
        threads.push(vm.guest_on(id, pages, 1500, 100 + id));
    }
    std::thread::scope(|sc| {
        let handles: Vec<_> = threads
            .into_iter()
            .map(|(mut c, mut v)| {
                let vm = &vm;
                sc.spawn(move || {
                    for it in 1..=25 {
                        vm.set_iteration(v.index, it);
                        assert!(!v.run_round(vm.h).wedged);
                        let (_, _, lost) = c.check(vm.h, 0);
                        assert_eq!(lost, 0, "vCPU {} round {it}", v.index);
                    }
                    c.changed
                })
            })
            .collect();
        for h in handles {
            assert!(h.join().unwrap() > 10_000);
        }
    });
}

#[test]
fn corrupted_ring_entries_are_skipped_and_counted() {
    let vm = TestVm::new(Some(RING));
    let pages = 64;
    let mut c = Checker::new(1, pages);
    vm.set_slot(1, TEST_GPA, &c.mem, KDS_MEM_LOG_DIRTY_PAGES);
    let v = vm.vcpu(0);
    let ring = map_ring(&v.fd, RING);
    let at = vcpu_stats(vm.h, 0).entries_reaped as u32;
    let bogus = [
        (7, 0),             // unknown slot
        (1, pages),         // one past the slot's end
        (1, u64::MAX),      // huge offset
        ((5 << 16) | 1, 3), // address space 5
        (0xffff_ffff, 1),   // everything out of range
        (CODE_SLOT, 1),     // a slot without dirty logging
    ];
    for (i, (slot, off)) in bogus.iter().enumerate() {
        write_ring_entry(&ring, RING, at + i as u32, *slot, *off);
    }
    write_ring_entry(&ring, RING, at + bogus.len() as u32, 1, 5); // one valid entry
    let n = c!(kds_reap(vm.vm()));
    assert_eq!(n, bogus.len() as i64 + 1, "{}", last_error());
    assert_eq!(vm.stats().invalid_entries, bogus.len() as u64);
    let r = c!(kds_memslot_sync(
        vm.vm(),
        1,
        c.bitmap.as_mut_ptr(),
        pages,
        0
    ));
    assert_eq!(r, 1, "only the valid entry is reported");
    assert_eq!(c.bitmap[0], 1 << 5);
    // Nothing else was touched: the guest memory is still all zero.
    assert_eq!(c.compare(0).0, 0);
}

#[test]
fn slot_deleted_with_entries_pending() {
    let vm = TestVm::new(Some(RING));
    let pages = 1024;
    let (mut c, mut v) = vm.guest(pages, 500, 3);
    vm.set_iteration(0, 1);
    v.run_round(vm.h);
    assert_eq!(c.check(vm.h, 0).2, 0);
    vm.set_iteration(0, 2);
    v.run_round(vm.h);
    // Delete the slot while its entries sit in the ring, unharvested (a
    // VMM that synced, then the vCPUs wrote on before the delete).
    let del = KdsMemslot {
        slot: 1,
        ..Default::default()
    };
    assert_eq!(
        c!(kds_memslot_update(vm.vm(), &del, size_of::<KdsMemslot>())),
        0,
        "{}",
        last_error()
    );
    // The delete harvested them for the slot (none is left to name an
    // unknown slot, or a new slot that reuses the id).
    assert_eq!(c!(kds_reap(vm.vm())), 0);
    assert_eq!(vm.stats().invalid_entries, 0);
    // The memory comes back as another slot id at another address (a PCI
    // BAR moved): the pages written before the delete are reported there.
    let gpa = TEST_GPA + 0x100_0000;
    vm.set_slot(4, gpa, &c.mem, KDS_MEM_LOG_DIRTY_PAGES);
    c.slot = 4;
    let (changed, reported, lost) = c.check(vm.h, 0);
    assert!(changed > 300, "{changed}");
    assert_eq!(
        lost, 0,
        "{lost} of {changed} written before the delete not reported"
    );
    assert!(reported <= changed + 1);
    // And tracking goes on there: the guest writes at the new address.
    vm.mailbox(0, gpa, pages, 500, 3);
    vm.set_iteration(0, 3);
    v.run_round(vm.h);
    let (changed, _, lost) = c.check(vm.h, 0);
    assert!(changed > 300);
    assert_eq!(lost, 0);
    // A slot on other memory that reuses id 1 starts clean.
    let mut c2 = Checker::new(1, pages);
    vm.set_slot(1, TEST_GPA, &c2.mem, KDS_MEM_LOG_DIRTY_PAGES);
    assert_eq!(
        c2.check(vm.h, 0).1,
        0,
        "nothing carried to unrelated memory"
    );
}

#[test]
fn vcpu_added_after_logging_started() {
    let vm = TestVm::new(Some(RING));
    let pages = 1024;
    let (mut c0, mut v0) = vm.guest_on(0, pages, 500, 3);
    vm.set_iteration(0, 1);
    v0.run_round(vm.h);
    assert_eq!(c0.check(vm.h, 0).2, 0);
    // Logging is on and vCPU 0 has dirtied pages: now vCPU 1 comes (a
    // hotplugged CPU), writes its own slot and vCPU 0's, on two threads.
    let (mut c1, mut v1) = vm.guest_on(1, pages, 500, 4);
    for it in 2..=6 {
        vm.set_iteration(0, it);
        vm.set_iteration(1, it);
        std::thread::scope(|sc| {
            sc.spawn(|| v0.run_round(vm.h));
            sc.spawn(|| v1.run_round(vm.h));
        });
        let (ch0, _, lost0) = c0.check(vm.h, 0);
        let (ch1, _, lost1) = c1.check(vm.h, 0);
        assert!(ch0 > 300 && ch1 > 300, "{ch0} {ch1}");
        assert_eq!((lost0, lost1), (0, 0), "round {it}");
    }
    assert!(
        vcpu_stats(vm.h, 1).entries_reaped > 0,
        "vCPU 1's ring was reaped"
    );
}

#[test]
fn vcpu_remove_harvests_what_is_left() {
    let vm = TestVm::new(Some(RING));
    let pages = 1024;
    let (mut c, mut v) = vm.guest(pages, 400, 5);
    vm.set_iteration(0, 1);
    v.run_round(vm.h);
    assert_eq!(c!(kds_vcpu_remove(vm.vm(), 0)), 0, "{}", last_error());
    assert!(vm.stats().entries_reaped > 0);
    let (changed, _, lost) = c.check(vm.h, 0);
    assert!(changed > 300);
    assert_eq!(lost, 0);
    assert_eq!(c!(kds_vcpu_remove(vm.vm(), 0)), -libc::ENOENT);
    assert_eq!(c!(kds_vcpu_reap(vm.vm(), 0)), -i64::from(libc::ENOENT));
}

#[test]
fn logging_toggled_and_slot_moved() {
    let vm = TestVm::new(Some(RING));
    let pages = 512;
    let mut c = Checker::new(1, pages);
    vm.set_slot(1, TEST_GPA, &c.mem, 0);
    let mut v = vm.vcpu(0);
    vm.mailbox(0, TEST_GPA, pages, 300, 9);
    vm.set_iteration(0, 1);
    v.run_round(vm.h);
    // Not logged: sync refuses.
    assert_eq!(
        c!(kds_memslot_sync(
            vm.vm(),
            1,
            c.bitmap.as_mut_ptr(),
            pages,
            0
        )),
        -i64::from(libc::ENOENT)
    );
    assert!(last_error().contains("KDS_MEM_LOG_DIRTY_PAGES"));
    c.compare(0); // the shadow catches up with what was written unlogged
    vm.set_slot(1, TEST_GPA, &c.mem, KDS_MEM_LOG_DIRTY_PAGES);
    for it in 2..=4 {
        vm.set_iteration(0, it);
        v.run_round(vm.h);
        assert_eq!(c.check(vm.h, 0).2, 0);
    }
    // Move the slot (same memory, new guest address): bits are kept, the
    // guest then writes at the new address.
    let new_gpa = TEST_GPA + 0x100_0000;
    vm.set_slot(1, new_gpa, &c.mem, KDS_MEM_LOG_DIRTY_PAGES);
    vm.mailbox(0, new_gpa, pages, 300, 9);
    vm.set_iteration(0, 5);
    v.run_round(vm.h);
    let (changed, _, lost) = c.check(vm.h, 0);
    assert!(changed > 100);
    assert_eq!(lost, 0);
    // Resize (delete + create in the kernel): still tracked.
    let mut c2 = Checker::new(1, pages * 2);
    vm.set_slot(1, new_gpa, &c2.mem, KDS_MEM_LOG_DIRTY_PAGES);
    vm.mailbox(0, new_gpa, pages * 2, 600, 9);
    vm.set_iteration(0, 6);
    v.run_round(vm.h);
    let (changed, _, lost) = c2.check(vm.h, 0);
    assert!(changed > 300);
    assert_eq!(lost, 0);
}

#[test]
fn flush_calls_the_kick_then_reaps() {
    use std::sync::atomic::AtomicU32;
    static KICKS: AtomicU32 = AtomicU32::new(0);
    extern "C" fn kick(opaque: *mut libc::c_void) {
        assert_eq!(opaque as usize, 0x1234);
        KICKS.fetch_add(1, Ordering::Relaxed);
    }
    let vm = TestVm::new(Some(RING));
    assert_eq!(c!(kds_flush(vm.vm())), -i64::from(libc::EBUSY));
    assert!(last_error().contains("kds_kick_set"));
    let pages = 256;
    let (_c, mut v) = vm.guest(pages, 100, 1);
    vm.set_iteration(0, 1);
    v.run_round(vm.h);
    assert_eq!(
        c!(kds_kick_set(
            vm.vm(),
            Some(kick),
            0x1234 as *mut libc::c_void
        )),
        0
    );
    let n = c!(kds_flush(vm.vm()));
    assert!(n > 0, "{n}");
    assert_eq!(KICKS.load(Ordering::Relaxed), 1);
}

#[test]
fn create_owns_its_fd() {
    let mut h = std::ptr::null_mut();
    assert_eq!(c!(kds_vm_create(0, &mut h)), 0, "{}", last_error());
    let fd = c!(kds_vm_fd(h));
    assert!(fd >= 0);
    assert_eq!(c!(kds_dirty_ring_enable(h, RING)), 0, "{}", last_error());
    // A second descriptor of the shim's open file, to tell it apart from
    // whatever other test thread gets the number after kds_vm_free.
    // SAFETY: dup of an open fd; `probe` is closed below.
    let probe = unsafe { libc::dup(fd) };
    assert!(probe >= 0);
    c!(kds_vm_free(h));
    let pid = std::process::id() as libc::c_long;
    // SAFETY: kcmp(KCMP_FILE) only compares two fds of this process.
    let same = unsafe {
        libc::syscall(libc::SYS_kcmp, pid, pid, 0 /* KCMP_FILE */, fd, probe)
    };
    // SAFETY: closes the fd this test dup'ed.
    unsafe { libc::close(probe) };
    // 0 would mean the shim's fd still refers to the VM: it was not closed
    // (-1 EBADF: closed; 1 or more: closed, and the number reused since).
    assert_ne!(same, 0, "kds_vm_free left the VM fd {fd} open");
}

#[test]
fn reap_vcpu_on_ring_full_races_a_reaper_thread() {
    // Two harvesters on one ring: the vCPU thread (kds_vcpu_reap on every
    // ring-full exit) and a reaper thread (kds_reap in a loop). Nothing may
    // be lost and nothing harvested twice: the kernel resets exactly what
    // was harvested (plus any overrun hole it left, see README).
    let vm = TestVm::new(Some(RING));
    let pages = 16384;
    let (mut c, mut v) = vm.guest(pages, 8000, 17);
    // Driven, not paced: nothing reaps while the vCPU runs, so every round
    // (8000 stores on 16384 pages, ~6,600 distinct pages) fills the
    // 4096-entry ring; on each ring-full exit a second thread's kds_reap
    // and this thread's kds_vcpu_reap start together, released by one
    // barrier.
    let mut full = 0;
    for it in 1..=15 {
        vm.set_iteration(0, it);
        for exits in 0.. {
            assert!(exits < 100_000, "round {it} did not end");
            match v.fd.run().expect("KVM_RUN") {
                VcpuExit::IoOut(0x10, _) => break,
                VcpuExit::Unsupported(EXIT_DIRTY_RING_FULL) => {
                    full += 1;
                    let go = std::sync::Barrier::new(2);
                    let h = vm.h;
                    let (by_reaper, by_vcpu) = std::thread::scope(|sc| {
                        let reaper = sc.spawn(|| {
                            go.wait();
                            c!(kds_reap(h.get()))
                        });
                        go.wait();
                        let n = c!(kds_vcpu_reap(h.get(), 0));
                        (reaper.join().unwrap(), n)
                    });
                    assert!(by_reaper >= 0, "kds_reap: {by_reaper}: {}", last_error());
                    assert!(by_vcpu >= 0, "kds_vcpu_reap: {by_vcpu}: {}", last_error());
                }
                other => panic!("unexpected exit {other:?}"),
            }
        }
        let (changed, _, lost) = c.check(vm.h, 0);
        assert_eq!(lost, 0, "round {it}: lost {lost} of {changed}");
    }
    let s = vm.stats();
    assert_eq!(s.entries_reaped, vcpu_stats(vm.h, 0).entries_reaped);
    assert!(
        s.entries_reset >= s.entries_reaped,
        "harvested twice? {s:?}"
    );
    if s.ring_overflows == 0 {
        assert_eq!(s.entries_reset, s.entries_reaped, "{s:?}");
    }
    assert!(
        full > 0 && s.ring_full_reaps > 0,
        "no ring-full exit: {s:?}"
    );
    eprintln!("two harvesters: {full} ring-full exits, {s:?}");
}

#[test]
fn reaping_only_on_ring_full_exits_resumes_and_loses_nothing() {
    // The harshest VMM loop: the ring is reaped only on ring-full exits and
    // synced only every 4 guest rounds. This kernel then overruns the ring
    // (measured: holes of entries it counts but never publishes, which used
    // to wedge the vCPU on endless ring-full exits). The shim must
    // re-synchronise every time: the guest runs all 60 rounds, nothing is
    // lost, and the kernel reset exactly what the guest pushed.
    let vm = TestVm::new(Some(RING));
    let pages = 16384;
    let (mut c, mut v) = vm.guest(pages, 6000, 1);
    for it in 1..=60 {
        vm.set_iteration(0, it);
        let r = v.run_round(vm.h);
        assert!(!r.wedged, "round {it}: -EOVERFLOW: {}", last_error());
        if it % 4 == 0 {
            let (changed, _, lost) = c.check(vm.h, 0);
            assert_eq!(lost, 0, "round {it}: lost {lost} of {changed}");
        }
    }
    let s = vm.stats();
    // Every entry the kernel reset was harvested or a hole handed back:
    // nothing double counted, nothing left behind.
    assert!(s.entries_reset >= s.entries_reaped, "{s:?}");
    assert!(s.ring_overflows == 0 || s.ring_recoveries > 0, "{s:?}");
    eprintln!("ring-full-only reaping: {s:?}");
}

#[test]
fn logging_toggled_under_a_running_vcpu_and_a_reaper_skips_nothing() {
    // Logging goes off and on again and again on the slot a vCPU writes,
    // while a reaper thread reaps: every entry the kernel pushes names a
    // slot the shim tracks at that moment (the bitmap is in place before
    // logging starts; the last entries are harvested when it stops).
    let vm = TestVm::new(Some(RING));
    let pages = 4096;
    let (c, mut v) = vm.guest(pages, 4000, 21);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (vm, c, stop) = (&vm, &c, &stop);
    let (_, reaped) = with_reaper(vm.h, Duration::from_micros(50), || {
        std::thread::scope(|sc| {
            let vcpu = sc.spawn(move || {
                let mut it = 0;
                while !stop.load(Ordering::Relaxed) || it < 20 {
                    it += 1;
                    vm.set_iteration(0, it);
                    assert!(!v.run_round(vm.h).wedged);
                }
                it
            });
            for i in 0..400 {
                let flags = if i % 2 == 0 {
                    0
                } else {
                    KDS_MEM_LOG_DIRTY_PAGES
                };
                vm.set_slot(1, TEST_GPA, &c.mem, flags);
                std::thread::sleep(Duration::from_micros(200));
            }
            stop.store(true, Ordering::Relaxed);
            assert!(vcpu.join().unwrap() >= 20);
        })
    });
    let s = vm.stats();
    assert!(reaped > 0 && s.entries_reaped > 0, "{s:?}");
    assert_eq!(s.invalid_entries, 0, "entries skipped: {s:?}");
}

#[test]
fn a_ring_emptied_by_another_thread_before_the_exit_is_reaped_is_no_wedge() {
    // QEMU's pattern: on KVM_EXIT_DIRTY_RING_FULL the reaper thread may
    // have reaped the ring (kds_reap) between the exit and the vCPU
    // thread's kds_vcpu_reap, which then finds nothing. That is no wedge:
    // the kernel's count is back to 0 and the vCPU runs. Every round must
    // complete, nothing lost, no wedge counted.
    let vm = TestVm::new(Some(RING));
    let (mut c, mut v) = vm.guest(16384, 6000, 3);
    let h = vm.h;
    let mut full = 0;
    for it in 1..=30 {
        vm.set_iteration(0, it);
        let r = v.run_round_with(|index| {
            assert!(c!(kds_reap(h.0)) >= 0, "kds_reap: {}", last_error());
            c!(kds_vcpu_reap(h.0, index))
        });
        full += r.ring_full_exits;
        assert!(!r.wedged, "round {it}: -EOVERFLOW: {}", last_error());
        let (changed, _, lost) = c.check(h, 0);
        assert_eq!(lost, 0, "round {it}: lost {lost} of {changed}");
    }
    let s = vm.stats();
    assert!(full > 0, "no ring-full exit: {s:?}");
    assert_eq!(s.ring_wedges, 0, "{s:?}");
    eprintln!("reaped by another thread before each ring-full reap: {full} exits, {s:?}");
}
