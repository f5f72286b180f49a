//! Routes the `log` crate's records to the VMM's C callback.

use std::ffi::CString;

use log::{Level, LevelFilter, Log, Metadata, Record};
use parking_lot::RwLock;

/// The C callback: `level` 1 error .. 5 trace, a NUL-terminated message
/// valid only during the call, and the VMM's pointer.
pub type LogFn = extern "C" fn(level: i32, msg: *const libc::c_char, opaque: *mut libc::c_void);

struct Sink {
    func: LogFn,
    opaque: usize,
}

static SINK: RwLock<Option<Sink>> = RwLock::new(None);

struct CLogger;

static LOGGER: CLogger = CLogger;

impl Log for CLogger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level() && SINK.read().is_some()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let text = format!("kvm-dirty-shim: {}", record.args()).replace('\0', " ");
        let Ok(msg) = CString::new(text) else { return };
        if let Some(s) = SINK.read().as_ref() {
            (s.func)(
                level_number(record.level()),
                msg.as_ptr(),
                s.opaque as *mut libc::c_void,
            );
        }
    }

    fn flush(&self) {}
}

/// 1 error .. 5 trace.
pub fn level_number(l: Level) -> i32 {
    l as i32
}

fn filter(max_level: i32) -> LevelFilter {
    match max_level {
        i32::MIN..=0 => LevelFilter::Off,
        1 => LevelFilter::Error,
        2 => LevelFilter::Warn,
        3 => LevelFilter::Info,
        4 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Installs (or with `None` removes) the process-wide callback. Returns
/// false when another `log` logger was installed first in this process (a
/// Rust program linking the rlib): its records then go there.
pub fn set(func: Option<LogFn>, opaque: usize, max_level: i32) -> bool {
    let installed = log::set_logger(&LOGGER).is_ok() || is_ours();
    *SINK.write() = func.map(|func| Sink { func, opaque });
    if installed {
        log::set_max_level(if func.is_some() {
            filter(max_level)
        } else {
            LevelFilter::Off
        });
    }
    installed
}

fn is_ours() -> bool {
    std::ptr::addr_eq(log::logger() as *const dyn Log, &LOGGER as *const CLogger)
}
