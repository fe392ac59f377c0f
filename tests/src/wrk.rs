//! Reading `wrk`'s output (the bench and the chaos table run it).

/// A latency as wrk prints it (`572.00us`, `1.61ms`, `1.77s`), in µs.
pub fn micros(text: &str) -> Option<f64> {
    let text = text.trim();
    let (num, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        _ => return None,
    })
}
