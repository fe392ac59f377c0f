//! Reading flags: value parsers with messages that say what was expected,
//! and a collector so every command reports all of its problems at once.
use std::{net::Ipv4Addr, time::Duration};

/// Every problem found in a command's configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<String>);

/// Collects problems while a configuration is parsed.
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    /// Keeps `r`'s value, or notes `--flag value: why`.
    pub fn check<T>(&mut self, flag: &str, value: &str, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(why) => {
                self.0.push(format!("--{flag} {value:?}: {why}"));
                None
            }
        }
    }

    /// Notes a problem in the caller's own words.
    pub fn push(&mut self, problem: String) {
        self.0.push(problem);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(())` when nothing was noted.
    pub fn finish(self) -> Result<(), ConfigErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(self.0))
        }
    }
}

/// `500ms`, `5s`, `1m`, `24h`…
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("not a duration ({e}); try 500ms, 5s or 1m"))
}

/// A duration that is more than zero.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be more than zero".into()),
        d => Ok(d),
    }
}

/// A TCP port, 1-65535.
pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err("not a port (1-65535)".into()),
        Ok(p) => Ok(p),
    }
}

/// `true`/`false` (also on/off, yes/no, 1/0).
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Ok(true),
        "false" | "off" | "no" | "0" => Ok(false),
        _ => Err("not a boolean (true or false)".into()),
    }
}

/// A whole number from `min` to `max`.
pub fn parse_count(s: &str, min: usize, max: usize) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("not a number from {min} to {max}")),
    }
}

/// `a.b.c.d/len` (or a bare address, meaning /32), host bits cleared.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = s.trim().split_once('/').unwrap_or((s.trim(), "32"));
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| "not an IPv4 CIDR (like 10.96.0.0/12)".to_string())?;
    let len: u8 = match len.parse() {
        Ok(l) if l <= 32 => l,
        _ => return Err("prefix length must be 0-32".into()),
    };
    // Keep only the network bits so equal networks compare equal.
    Ok((Ipv4Addr::from(u32::from(addr) & mask4(len)), len))
}

/// The network mask of an IPv4 prefix of `len` bits (0-32).
fn mask4(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

/// The network mask of an IPv6 prefix of `len` bits (0-128).
fn mask6(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

/// A network of either family: `10.96.0.0/12`, `fd00:10:96::/112`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpCidr {
    pub addr: std::net::IpAddr,
    pub len: u8,
}

impl IpCidr {
    /// Whether `ip` is in this network (IPv4-mapped addresses as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => u32::from(ip) & mask4(self.len) == u32::from(net),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask6(self.len) == u128::from(net)
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for IpCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// `a.b.c.d/len` or `x:y::/len` (a bare address: the whole length), host
/// bits cleared.
pub fn parse_ip_cidr(s: &str) -> Result<IpCidr, String> {
    use std::net::IpAddr;
    let bad = || "not a CIDR (like 10.96.0.0/12 or fd00:10:96::/112)".to_string();
    let (addr, len) = match s.trim().split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s.trim(), None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = match len.map(str::parse::<u8>) {
        None => max,
        Some(Ok(l)) if l <= max => l,
        Some(_) => return Err(format!("prefix length must be 0-{max}")),
    };
    let addr = match addr {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask4(len))),
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & mask6(len))),
    };
    Ok(IpCidr { addr, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_of_both_families() {
        let v4 = parse_ip_cidr("10.96.7.1/12").unwrap();
        assert_eq!(v4.to_string(), "10.96.0.0/12");
        assert!(v4.contains("10.100.0.1".parse().unwrap()));
        assert!(v4.contains("::ffff:10.96.0.10".parse().unwrap()));
        assert!(!v4.contains("10.112.0.1".parse().unwrap()));
        let v6 = parse_ip_cidr("fd00:10:96::/112").unwrap();
        assert!(v6.contains("fd00:10:96::abcd".parse().unwrap()));
        assert!(!v6.contains("fd00:10:97::1".parse().unwrap()));
        assert!(!v6.contains("10.96.0.1".parse().unwrap()));
        let all = parse_ip_cidr("0.0.0.0/0").unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        assert_eq!(parse_ip_cidr("10.0.0.1").unwrap().len, 32);
        assert!(parse_ip_cidr("10.0.0.0/33").is_err());
        assert!(parse_ip_cidr("fd00::/129").is_err());
        assert!(parse_ip_cidr("nonsense").is_err());
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.96.1.2/12"),
            Ok((Ipv4Addr::new(10, 96, 0, 0), 12))
        );
        assert_eq!(parse_cidr("1.2.3.4"), Ok((Ipv4Addr::new(1, 2, 3, 4), 32)));
        assert_eq!(parse_cidr("0.0.0.0/0"), Ok((Ipv4Addr::UNSPECIFIED, 0)));
        assert!(parse_cidr("::1/128").is_err());
        assert!(parse_cidr("10.0.0.0/40").is_err());
    }

    #[test]
    fn problems_are_collected() {
        let mut p = Problems::default();
        assert_eq!(p.check("port", "0", parse_port("0")), None);
        assert_eq!(p.check("port", "80", parse_port("80")), Some(80));
        p.push("something else".into());
        let err = p.finish().unwrap_err();
        assert_eq!(err.0.len(), 2);
        assert!(err.to_string().contains("--port \"0\""), "{err}");
        assert!(parse_positive_duration("0s").is_err());
        assert_eq!(parse_bool("off"), Ok(false));
    }
}
