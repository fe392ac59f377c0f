//! The programs' aya-log records, moved into the agent's log as they come.
#![allow(unsafe_code)] // registering the log buffer's fd with the reactor

use tokio::io::{Interest, unix::AsyncFd};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::EbpfLogger;

/// Moves aya-log records from the programs into the agent's log.
pub async fn forward(logger: EbpfLogger, shutdown: CancellationToken) {
    // SAFETY: the logger owns its ring buffer's fd and keeps it open (and
    // unchanged) for as long as the AsyncFd holds it.
    let mut logger = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e.into_parts().1, "cannot read eBPF logs");
            return;
        }
    };
    loop {
        let mut guard = tokio::select! {
            guard = logger.readable_mut() => match guard {
                Ok(g) => g,
                Err(e) => {
                    warn!(error = %e, "eBPF log buffer unreadable; no more eBPF logs");
                    return;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
