//! Reading the agent's `/metrics` (Prometheus text format).
use std::collections::BTreeMap;

/// One scrape.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    pub text: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = match line.rsplit_once(' ') {
                Some(x) => x,
                None => continue,
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_owned(), labels, value));
        }
        Self {
            samples,
            text: text.to_owned(),
        }
    }

    /// The sample of `name` whose labels include all of `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels).next()
    }

    /// The sum of all samples of `name` whose labels include `labels` (0
    /// when there are none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        // Start from +0: an empty f64 sum is -0.
        self.matching(name, labels).fold(0.0, |a, b| a + b)
    }

    /// The labels of the first sample of `name` that includes `labels`.
    pub fn labels(&self, name: &str, labels: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
        self.samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, l, _)| l.clone())
    }

    /// The `q` quantile of histogram `name` over the series that include
    /// `labels` (summed per bucket), interpolated within its bucket as
    /// Prometheus's `histogram_quantile` does; `None` with no samples.
    pub fn quantile(&self, name: &str, labels: &[(&str, &str)], q: f64) -> Option<f64> {
        let bucket = format!("{name}_bucket");
        let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for (n, l, v) in &self.samples {
            if *n != bucket
                || !labels
                    .iter()
                    .all(|(k, val)| l.get(*k).map(String::as_str) == Some(*val))
            {
                continue;
            }
            let le = match l.get("le").map(String::as_str) {
                Some("+Inf") => f64::INFINITY,
                Some(x) => x.parse().ok()?,
                None => continue,
            };
            by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += v;
        }
        let mut buckets: Vec<(f64, f64)> = by_le.into_values().collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut prev = (0.0, 0.0);
        for (le, count) in buckets {
            if count >= rank {
                if le.is_infinite() {
                    return Some(prev.0);
                }
                let within = count - prev.1;
                let frac = if within > 0.0 {
                    (rank - prev.1) / within
                } else {
                    1.0
                };
                return Some(prev.0 + (le - prev.0) * frac);
            }
            prev = (le, count);
        }
        None
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = f64> + 'a {
        self.samples
            .iter()
            .filter(move |(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
    }
}

/// `a="x",b="y"` (values may contain escaped quotes).
fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_owned(), value);
        rest = &after[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_and_labels() {
        let m = Metrics::parse(
            "# HELP x y\nnodemesh_tcp_open_total{namespace=\"a\",pod=\"b\\\"q\",direction=\"outbound\"} 3\nnodemesh_meshed_pods 2\n",
        );
        assert_eq!(
            m.get("nodemesh_tcp_open_total", &[("pod", "b\"q")]),
            Some(3.0)
        );
        assert_eq!(m.get("nodemesh_meshed_pods", &[]), Some(2.0));
        assert_eq!(m.sum("nodemesh_tcp_open_total", &[("pod", "nope")]), 0.0);
    }
}
