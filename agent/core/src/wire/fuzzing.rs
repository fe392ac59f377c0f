//! What the `wire` fuzz target (`tests/fuzz`) feeds any bytes to: every
//! wire type as JSON (and what the CLI does with them: merging stat
//! reports, matching tap events), the tap filter's query string, a tap
//! stream's lines. Compiled for the fuzzer and the tests that replay its
//! findings.
use super::*;

pub fn wire(data: &[u8]) {
    if let Ok(r) = serde_json::from_slice::<StatReport>(data) {
        let mut merged = StatReport::merge(&[r.clone(), r]);
        merged.only_namespace("shop");
        for row in &merged.requests {
            let _ = row.golden.quantile_ms(0.99);
        }
    }
    if let Ok(e) = serde_json::from_slice::<TapEvent>(data) {
        let _ = TapFilter::default().matches(&e);
        if let Ok(text) = std::str::from_utf8(data)
            && let Ok(f) = TapFilter::parse(text)
        {
            let _ = f.matches(&e);
        }
    }
    let _ = serde_json::from_slice::<NodeReport>(data);
    let _ = serde_json::from_slice::<AgentList>(data);
    let _ = serde_json::from_slice::<StatList>(data);
    let _ = serde_json::from_slice::<CertifyRequest>(data);
    let _ = serde_json::from_slice::<CertifyResponse>(data);
    let _ = serde_json::from_slice::<Vec<ServiceView>>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(f) = TapFilter::parse(text) {
            // What the CLI sends is what the agent reads back.
            assert_eq!(TapFilter::parse(&f.query()).ok(), Some(f));
        }
        let _ = percent_decode(text);
    }
    let _ = TapLines::default().push(data);
}

#[cfg(test)]
mod tests {
    #[test]
    fn wire_inputs_seen_by_the_fuzzer_parse_without_panic() {
        for seed in [
            &b"namespace=a%2&path=%ff%fe&max_rps=1"[..],
            b"path=a+b%20c&authority=%",
            br#"{"node":"a","window_secs":10,"latency_bounds_ms":[],"requests":[{"key":{},"golden":{}}],"tcp":[]}"#,
            b"\n\n{\n",
            b"",
        ] {
            super::wire(seed);
        }
    }
}
