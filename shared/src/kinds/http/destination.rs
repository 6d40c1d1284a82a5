//! Where an `http` job may send its request. A job platform runs other
//! people's requests from inside its own network, so by default a request may
//! only go to public addresses: loopback, private, link-local (the cloud
//! metadata address 169.254.169.254 among them), unique-local, multicast,
//! unspecified, documentation and other special-purpose ranges are refused,
//! in their IPv4-mapped and NAT64 forms too. An operator admits more with
//! `jobs.http.allow`: CIDRs (`10.1.0.0/16`, `127.0.0.1/32`) or `host:port`.
//!
//! The check is made on the addresses the request will connect to, after DNS
//! resolution (a [`reqwest::dns::Resolve`] that drops refused addresses), so a
//! name that resolves to a private address, or that changes its answer
//! between a check and the connection (DNS rebinding), gets nowhere. An
//! address written in the URL itself is checked before anything is sent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// What `jobs.http.allow` admits beyond public addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allow {
    nets: Vec<IpNet>,
    /// `host:port` entries: a request addressed to exactly this host and port
    /// goes wherever the host resolves to.
    host_ports: Vec<(String, u16)>,
}

impl Allow {
    /// Parses entries of `jobs.http.allow`; the error names the bad entry.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut allow = Self::default();
        for entry in entries {
            let entry = entry.trim();
            if let Ok(net) = entry.parse::<IpNet>() {
                allow.nets.push(net.trunc());
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                allow.nets.push(IpNet::from(ip));
            } else if let Some((host, port)) = entry.rsplit_once(':')
                && !host.is_empty()
                && let Ok(port) = port.parse::<u16>()
            {
                allow.host_ports.push((host.trim_matches(['[', ']']).to_ascii_lowercase(), port));
            } else {
                return Err(format!("{entry:?} is neither a CIDR (10.0.0.0/8, ::1/128) nor host:port"));
            }
        }
        Ok(allow)
    }

    /// Whether requests to `host:port` skip the address check.
    pub fn admits_host(&self, host: &str, port: u16) -> bool {
        self.host_ports.iter().any(|(h, p)| *p == port && h.eq_ignore_ascii_case(host.trim_matches(['[', ']'])))
    }

    /// `None` when a connection to `ip` is allowed; else why not.
    pub fn refusal(&self, ip: IpAddr) -> Option<&'static str> {
        let ip = canonical(ip);
        if self.nets.iter().any(|net| net.contains(&ip)) {
            return None;
        }
        special(ip)
    }
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`, or the NAT64 prefix
/// `64:ff9b::/96`, which a gateway turns back into IPv4) is judged as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let [a, b, _, _, _, _, _, _] = v6.segments();
            if a == 0x64 && b == 0xff9b {
                let octets = v6.octets();
                return IpAddr::V4(Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15]));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

/// Why `ip` is not a public address, if it is not.
fn special(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match () {
        () if ip.is_loopback() => "a loopback address",
        () if ip.is_private() => "a private address",
        () if ip.is_link_local() => "a link-local address (cloud metadata among them)",
        () if ip.is_unspecified() || a == 0 => "an unspecified (\"this network\") address",
        () if ip.is_multicast() => "a multicast address",
        () if ip.is_broadcast() || a >= 240 => "a reserved address",
        () if a == 100 && (64..128).contains(&b) => "a shared (carrier-grade NAT) address",
        () if a == 192 && b == 0 && c == 0 => "an IETF protocol assignment",
        () if ip.is_documentation() => "a documentation address",
        () if a == 198 && (b == 18 || b == 19) => "a benchmarking address",
        () => return None,
    })
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    Some(match () {
        () if ip.is_loopback() => "a loopback address",
        () if ip.is_unspecified() => "an unspecified address",
        () if ip.is_unique_local() => "a unique-local (private) address",
        () if ip.is_unicast_link_local() => "a link-local address",
        () if ip.is_multicast() => "a multicast address",
        () if first == 0x2001 && ip.segments()[1] == 0x0db8 => "a documentation address",
        () if first == 0x0100 && ip.segments()[1..4] == [0, 0, 0] => "a discard-only address",
        // Anything else outside 2000::/3 (global unicast) is reserved.
        () if first & 0xe000 != 0x2000 => "a reserved address",
        () => return None,
    })
}

/// A request was not sent: its destination is refused. The job fails for
/// good (asking again will not change where the name points, or the policy).
#[derive(Debug, Clone, thiserror::Error)]
#[error("destination {host} refused: {why}; an operator can admit it with jobs.http.allow")]
pub struct Refused {
    pub host: String,
    pub why: String,
}

impl Refused {
    fn of(host: &str, addrs: &[SocketAddr], allow: &Allow) -> Self {
        let mut reasons: Vec<String> = addrs
            .iter()
            .filter_map(|addr| allow.refusal(addr.ip()).map(|why| format!("{} is {why}", addr.ip())))
            .collect();
        reasons.dedup();
        let why = if reasons.is_empty() { "it resolves to no address".to_owned() } else { reasons.join(", ") };
        Self { host: host.to_owned(), why }
    }
}

/// The DNS resolver of guarded requests: resolves with the system's resolver
/// and keeps only the addresses [`Allow`] admits.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    pub allow: Arc<Allow>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = self.allow.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let admitted: Vec<SocketAddr> =
                resolved.iter().copied().filter(|addr| allow.refusal(addr.ip()).is_none()).collect();
            if admitted.is_empty() {
                return Err(Box::new(Refused::of(&host, &resolved, &allow)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(admitted.into_iter()) as Addrs)
        })
    }
}

/// Checks an address written in a URL, which no resolver sees.
pub fn check_literal(ip: IpAddr, port: u16, allow: &Allow) -> Result<(), Refused> {
    match allow.refusal(ip) {
        None => Ok(()),
        Some(why) => Err(Refused { host: SocketAddr::new(ip, port).to_string(), why: format!("{ip} is {why}") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(allow: &Allow, ip: &str) -> bool {
        allow.refusal(ip.parse().expect("an address")).is_some()
    }

    #[test]
    fn only_public_addresses_are_allowed_by_default() {
        let allow = Allow::default();
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2001:db8::1",
            "100::1",
            "::127.0.0.1",
        ] {
            assert!(refused(&allow, ip), "{ip} is allowed");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"] {
            assert!(!refused(&allow, ip), "{ip} is refused");
        }
    }

    #[test]
    fn the_allowlist_admits_networks_and_host_ports() {
        let allow =
            Allow::parse(&["127.0.0.1/32".into(), "10.1.0.0/16".into(), "::1".into(), "hooks.internal:8443".into()])
                .expect("valid");
        assert!(!refused(&allow, "127.0.0.1") && refused(&allow, "127.0.0.2"));
        assert!(!refused(&allow, "10.1.200.3") && refused(&allow, "10.2.0.1"));
        assert!(!refused(&allow, "::1") && !refused(&allow, "::ffff:127.0.0.1"));
        assert!(allow.admits_host("HOOKS.internal", 8443) && !allow.admits_host("hooks.internal", 80));
        for bad in ["10.0.0.0/33", "localhost", "host:port", ":80"] {
            assert!(Allow::parse(&[bad.into()]).is_err(), "{bad} was accepted");
        }
    }
}
