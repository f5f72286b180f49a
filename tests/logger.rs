//! `kds_logger_set`: the library's `log` records reach the C callback
//! (process-wide, so this is its own test binary).

mod common;

use std::ffi::CStr;

use common::*;
use kvm_dirty_shim::capi::*;
use parking_lot::Mutex;

static RECORDS: Mutex<Vec<(i32, String)>> = Mutex::new(Vec::new());

extern "C" fn sink(level: i32, msg: *const libc::c_char, opaque: *mut libc::c_void) {
    assert_eq!(opaque as usize, 42);
    // SAFETY: the library passes a NUL-terminated string valid during the call.
    let m = unsafe { CStr::from_ptr(msg) }
        .to_string_lossy()
        .into_owned();
    RECORDS.lock().push((level, m));
}

#[test]
fn records_reach_the_callback_and_respect_the_level() {
    assert_eq!(
        c!(kds_logger_set(Some(sink), 42 as *mut libc::c_void, 4)),
        0
    );
    let vm = TestVm::new(Some(4096)); // info: ring enabled; debug: slots
    {
        let r = RECORDS.lock();
        assert!(
            r.iter()
                .any(|(l, m)| *l == 3 && m.contains("dirty ring enabled")),
            "{r:?}"
        );
        assert!(
            r.iter().any(|(l, m)| *l == 4 && m.contains("slot")),
            "{r:?}"
        );
        assert!(r.iter().all(|(l, _)| (1..=4).contains(l)));
    }
    // A refusal is logged at debug level with its message.
    assert!(c!(kds_dirty_ring_enable(vm.vm(), 4096)) < 0);
    assert!(
        RECORDS
            .lock()
            .iter()
            .any(|(_, m)| m.contains("already enabled"))
    );

    // Errors only: the debug records stop.
    assert_eq!(
        c!(kds_logger_set(Some(sink), 42 as *mut libc::c_void, 1)),
        0
    );
    RECORDS.lock().clear();
    assert!(c!(kds_dirty_ring_enable(vm.vm(), 4096)) < 0);
    let m = Mem::new(4096);
    vm.set_slot(5, 0x4000_0000, &m, 0);
    assert!(RECORDS.lock().is_empty(), "{:?}", RECORDS.lock());

    // NULL turns logging off.
    assert_eq!(c!(kds_logger_set(None, std::ptr::null_mut(), 5)), 0);
    let _vm2 = TestVm::new(Some(4096));
    assert!(RECORDS.lock().is_empty());
}
