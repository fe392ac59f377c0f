//! The relays' buffers: taken while data moves, small first, large within
//! a node-wide budget, a few large ones kept for reuse.
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

/// A relay buffer's size at first: a connection moving little never
/// holds more.
pub const SMALL_BUFFER: usize = 16 * 1024;

/// Large buffers kept for reuse when given back (the rest are freed).
const KEPT_LARGE: usize = 64;

/// The relays' buffers. A direction takes one only while data moves — when
/// a read would wait, it is given back, so an idle connection holds none
/// — small first, large (`--buffer-size`) once a read filled a small one,
/// and only while the large ones in use stay within the memory budget
/// (else small). Large ones are kept for reuse, a few.
#[derive(Clone, Debug)]
pub struct Buffers(Arc<Pool>);

#[derive(Debug)]
struct Pool {
    large: usize,
    /// Bytes of large buffers allowed out at once.
    budget: u64,
    out: AtomicU64,
    kept: Mutex<Vec<Box<[u8]>>>,
}

impl Buffers {
    /// Large buffers of `large` bytes, at most `budget` bytes of them out.
    pub fn new(large: usize, budget: u64) -> Self {
        Self(Arc::new(Pool {
            large: large.max(SMALL_BUFFER),
            budget,
            out: AtomicU64::new(0),
            kept: Mutex::default(),
        }))
    }

    pub(super) fn take(&self, large: bool) -> Buf {
        let p = &self.0;
        let size = p.large as u64;
        if large && p.large > SMALL_BUFFER {
            let before = p.out.fetch_add(size, Ordering::Relaxed);
            if before + size <= p.budget {
                let kept = p.kept.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let buf = kept.unwrap_or_else(|| vec![0; p.large].into_boxed_slice());
                return Buf { buf, large: true };
            }
            p.out.fetch_sub(size, Ordering::Relaxed);
        }
        Buf {
            buf: vec![0; SMALL_BUFFER].into_boxed_slice(),
            large: false,
        }
    }

    pub(super) fn give(&self, buf: Buf) {
        if !buf.large {
            return;
        }
        let p = &self.0;
        p.out.fetch_sub(p.large as u64, Ordering::Relaxed);
        let mut kept = p.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < KEPT_LARGE {
            kept.push(buf.buf);
        }
    }

    /// Frees the large buffers kept for reuse (many connections closed:
    /// their memory goes back).
    pub fn trim(&self) {
        self.0
            .kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Whether a large buffer may be taken now.
    pub(super) fn has_room(&self) -> bool {
        let p = &self.0;
        p.out.load(Ordering::Relaxed) + p.large as u64 <= p.budget
    }

    /// Bytes of large buffers out now.
    pub fn large_out(&self) -> u64 {
        self.0.out.load(Ordering::Relaxed)
    }
}

pub(super) struct Buf {
    pub(super) buf: Box<[u8]>,
    pub(super) large: bool,
}
