//! The proxy's one accept loop (pods' outbound listeners, the tunnel
//! server) and its one drain: every connection task is tracked, so
//! shutdown can stop accepting, let open connections finish, then give up.
use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::warn;

/// Every task that serves a connection, for shutdown.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    tracker: TaskTracker,
}

impl Drain {
    /// Runs `task` as a tracked connection task.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    /// Waits for the tasks running now (new ones still count) up to
    /// `grace`; returns how many were still running then.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            return self.tracker.len();
        }
        0
    }

    /// Connection tasks running now.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }
}

/// How long to pause after a failed `accept` (out of file descriptors and
/// the like), rather than spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(20);
/// A failing accept is logged at most once per this long per listener.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// Accepts on `listener` until `stop`, handing each connection to `serve`.
/// With a `limit`, a permit is taken before each accept (connections
/// beyond it wait in the listen backlog) and handed over with the
/// connection.
pub async fn accept_loop<F>(
    listener: &TcpListener,
    limit: Option<&Arc<Semaphore>>,
    stop: &CancellationToken,
    what: &'static str,
    mut serve: F,
) where
    F: FnMut(TcpStream, SocketAddr, Option<OwnedSemaphorePermit>),
{
    let mut last_error: Option<Instant> = None;
    let mut errors = 0u64;
    loop {
        let permit = match limit {
            Some(limit) => tokio::select! {
                permit = limit.clone().acquire_owned() => match permit {
                    Ok(permit) => Some(permit),
                    Err(_) => return,
                },
                _ = stop.cancelled() => return,
            },
            None => None,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => serve(stream, peer, permit),
            Err(e) => {
                errors += 1;
                if last_error.is_none_or(|t| t.elapsed() >= ERROR_LOG_EVERY) {
                    warn!(listener = what, error = %e, failures = errors, "accept failed; pausing");
                    last_error = Some(Instant::now());
                    errors = 0;
                }
                tokio::time::sleep(ACCEPT_PAUSE).await;
            }
        }
    }
}
