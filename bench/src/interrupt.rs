//! Ctrl-C (SIGINT) and SIGTERM: remembered, so that the lab and the demo
//! stop at the next check and tear everything down on the way out (every
//! namespace and process they made is owned by a guard that cleans up on
//! drop).

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::ensure;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs the handler for SIGINT and SIGTERM.
pub(crate) fn install() {
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Whether Ctrl-C was pressed (or SIGTERM received).
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails if Ctrl-C was pressed, so that everything built so far is dropped
/// (torn down) on the way out.
pub(crate) fn check() -> anyhow::Result<()> {
    ensure!(!interrupted(), "interrupted; tearing down");
    Ok(())
}
