//! Log lines anyone on the network can cause (a refused handshake on the
//! tunnel or the tap port, a knock with garbage) are rate-limited per
//! reason: one per window, then a count of the ones held back, so a flood
//! of attempts never floods the log (or the node's disk) while an operator
//! still sees that it happens and how much.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Lets one log line per key through per window.
#[derive(Debug)]
pub struct Throttle {
    window: Duration,
    /// Key → when one was last let through, and how many were held back
    /// since. Keys are a closed set (reasons): bounded.
    seen: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl Throttle {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            seen: Mutex::default(),
        }
    }

    /// `Some(held back since the last one)` when a line for `key` may be
    /// logged now; `None` (and one more held back) when not.
    pub fn allow(&self, key: &'static str) -> Option<u64> {
        self.allow_at(key, Instant::now())
    }

    fn allow_at(&self, key: &'static str, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get_mut(key) {
            Some((last, held)) if now.duration_since(*last) < self.window => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                let was = *held;
                *last = now;
                *held = 0;
                Some(was)
            }
            None => {
                seen.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_window_then_the_count_held_back() {
        let t = Throttle::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(t.allow_at("not_tls", start), Some(0));
        for i in 1..=1000 {
            assert_eq!(
                t.allow_at("not_tls", start + Duration::from_millis(i)),
                None
            );
        }
        // Another reason has its own window.
        assert_eq!(t.allow_at("handshake", start), Some(0));
        assert_eq!(
            t.allow_at("not_tls", start + Duration::from_secs(10)),
            Some(1000)
        );
        assert_eq!(t.allow_at("not_tls", start + Duration::from_secs(11)), None);
    }
}
