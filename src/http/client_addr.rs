//! Who the client is behind reverse proxies. Only a peer in `http.trusted_proxies` may name the
//! client, in the header the proxies are configured to set (`http.proxy_header`:
//! `X-Forwarded-For` by default, or RFC 7239 `Forwarded`). The header is walked from the right,
//! the end the proxies append to: trusted proxies are stepped over, and the first address that
//! is not one is the client. Ports, brackets and quotes are stripped (`192.0.2.7:4711`,
//! `[2001:db8::1]:4711`, `"[2001:db8::1]"`). An entry that names no address (`unknown`, an
//! obfuscated `_hidden`, garbage) stops the walk: what lies left of it was written by whoever
//! sent the request, and is not believed.
//!
//! When no client address can be found that way (no header, an unusable entry, nothing but
//! proxies), the nearest proxy's own address stands in, so that the per-IP limits still bind,
//! but it is marked as a stand-in: it never satisfies an allow-list (the login check's, the
//! relay's, `abuse.trusted_ips`).

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

pub use crate::config::ProxyHeader;

/// The client's address as far as it can be known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr {
    /// The address the limits count by.
    pub ip: IpAddr,
    /// `ip` is a proxy's own address standing in for a client it did not name: never
    /// allow-listed.
    pub stand_in: bool,
}

/// One hop as a header writes it, or `None` when it names no address.
pub fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim().trim_matches('"').trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        // [v6] or [v6]:port
        let (inside, after) = rest.split_once(']')?;
        let port_ok = after.is_empty()
            || after
                .strip_prefix(':')
                .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        return port_ok.then(|| inside.parse::<IpAddr>().ok()).flatten();
    }
    // v4:port (a bare v6 address has several colons and parsed above).
    let (host, port) = hop.rsplit_once(':')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// Splits `value` at `separator` outside double quotes.
fn split_unquoted(value: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(&value[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    parts
}

/// The hops the request names, nearest last, as written (every header line, in order). For
/// `Forwarded`, each element's `for` parameter; an element without one counts as a hop that
/// names no address.
pub fn hops(headers: &HeaderMap, which: ProxyHeader) -> Vec<String> {
    let name = match which {
        ProxyHeader::XForwardedFor => "x-forwarded-for",
        ProxyHeader::Forwarded => "forwarded",
    };
    let mut out = Vec::new();
    for value in headers.get_all(name) {
        // A value that is not text names nothing we can believe.
        let Ok(value) = value.to_str() else {
            out.push(String::new());
            continue;
        };
        for element in split_unquoted(value, ',') {
            if element.trim().is_empty() {
                continue;
            }
            match which {
                ProxyHeader::XForwardedFor => out.push(element.trim().to_owned()),
                ProxyHeader::Forwarded => {
                    let hop = split_unquoted(element, ';')
                        .into_iter()
                        .find_map(|pair| {
                            let (k, v) = pair.split_once('=')?;
                            k.trim()
                                .eq_ignore_ascii_case("for")
                                .then(|| v.trim().to_owned())
                        })
                        .unwrap_or_default();
                    out.push(hop);
                }
            }
        }
    }
    out
}

/// The client of a request from `peer` that names `hops` (nearest last), believing only
/// `trusted` proxies; see the module documentation.
pub fn client(peer: IpAddr, hops: &[String], trusted: &[IpNet]) -> ClientAddr {
    let canonical = crate::registrar::abuse::canonical;
    let peer = canonical(peer);
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return ClientAddr {
            ip: peer,
            stand_in: false,
        };
    }
    let mut nearest_proxy = peer;
    for hop in hops.iter().rev() {
        let Some(ip) = parse_hop(hop).map(canonical) else {
            break;
        };
        if !is_trusted(&ip) {
            return ClientAddr {
                ip,
                stand_in: false,
            };
        }
        nearest_proxy = ip;
    }
    ClientAddr {
        ip: nearest_proxy,
        stand_in: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(name: &'static str, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(name, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn hops_lose_their_ports_brackets_and_quotes() {
        for (hop, want) in [
            ("192.0.2.7", Some("192.0.2.7")),
            (" 192.0.2.7:4711 ", Some("192.0.2.7")),
            ("2001:db8::1", Some("2001:db8::1")),
            ("[2001:db8::1]", Some("2001:db8::1")),
            ("[2001:db8::1]:4711", Some("2001:db8::1")),
            ("\"[2001:db8::1]:4711\"", Some("2001:db8::1")),
            ("\"192.0.2.7\"", Some("192.0.2.7")),
            ("unknown", None),
            ("_hidden", None),
            ("192.0.2.7:", None),
            ("192.0.2.7:port", None),
            ("[2001:db8::1]x", None),
            ("[2001:db8::1", None),
            ("example.org", None),
            ("", None),
        ] {
            assert_eq!(parse_hop(hop), want.map(ip), "{hop:?}");
        }
    }

    #[test]
    fn forwarded_elements_give_their_for_parameter() {
        let h = headers(
            "forwarded",
            &[
                "for=192.0.2.60;proto=http;by=203.0.113.43",
                "For=\"[2001:db8:cafe::17]:4711\", by=198.51.100.1, for=unknown",
            ],
        );
        assert_eq!(
            hops(&h, ProxyHeader::Forwarded),
            ["192.0.2.60", "\"[2001:db8:cafe::17]:4711\"", "", "unknown"]
        );
        let x = headers("x-forwarded-for", &["192.0.2.1, 198.51.100.2", "10.0.0.1"]);
        assert_eq!(
            hops(&x, ProxyHeader::XForwardedFor),
            ["192.0.2.1", "198.51.100.2", "10.0.0.1"]
        );
        // The other header is not read.
        assert!(hops(&x, ProxyHeader::Forwarded).is_empty());
    }

    #[test]
    fn the_walk_stops_at_the_first_address_that_is_no_proxy() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let from = |peer: &str, hops: &[&str]| {
            let hops: Vec<String> = hops.iter().map(|s| s.to_string()).collect();
            client(ip(peer), &hops, &trusted)
        };
        let real = |s: &str| ClientAddr {
            ip: ip(s),
            stand_in: false,
        };
        let stand_in = |s: &str| ClientAddr {
            ip: ip(s),
            stand_in: true,
        };
        // Not through a trusted proxy: the header is the client's own words.
        assert_eq!(from("192.0.2.9", &["127.0.0.1"]), real("192.0.2.9"));
        // Through proxies: the first untrusted address from the right; a client's own entries
        // further left are ignored.
        assert_eq!(
            from("10.0.0.1", &["127.0.0.1", "192.0.2.7:4711", "10.0.0.2"]),
            real("192.0.2.7")
        );
        assert_eq!(from("10.0.0.1", &["[2001:db8::1]:80"]), real("2001:db8::1"));
        // An unusable entry stops the walk: nothing left of it is believed.
        assert_eq!(
            from("10.0.0.1", &["192.0.2.7", "unknown"]),
            stand_in("10.0.0.1")
        );
        assert_eq!(
            from("10.0.0.1", &["192.0.2.7", "garbage", "10.0.0.2"]),
            stand_in("10.0.0.2")
        );
        // No header, or nothing but proxies: a stand-in, never allow-listed.
        assert_eq!(from("10.0.0.1", &[]), stand_in("10.0.0.1"));
        assert_eq!(from("10.0.0.1", &["10.0.0.3"]), stand_in("10.0.0.3"));
        // IPv4-mapped addresses count as IPv4.
        assert_eq!(from("::ffff:10.0.0.1", &["192.0.2.7"]), real("192.0.2.7"));
        assert_eq!(from("10.0.0.1", &["::ffff:192.0.2.7"]), real("192.0.2.7"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any header text: hops are read or refused, and the client is the peer, a hop, or a
        /// stand-in proxy.
        #[test]
        fn any_header_names_the_peer_a_hop_or_a_stand_in(
            values in proptest::collection::vec("[ -~]{0,40}", 0..4),
            forwarded in any::<bool>(),
        ) {
            let which = if forwarded { ProxyHeader::Forwarded } else { ProxyHeader::XForwardedFor };
            let name = if forwarded { "forwarded" } else { "x-forwarded-for" };
            let mut h = HeaderMap::new();
            for v in &values {
                if let Ok(v) = HeaderValue::from_str(v) {
                    h.append(name, v);
                }
            }
            let hops = hops(&h, which);
            let trusted: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
            let c = client("127.0.0.1".parse().unwrap(), &hops, &trusted);
            let named = hops.iter().filter_map(|h| parse_hop(h)).any(|ip| crate::registrar::abuse::canonical(ip) == c.ip);
            prop_assert!(c.stand_in || named, "{c:?} from {hops:?}");
            if !c.stand_in {
                prop_assert!(!trusted.iter().any(|n| n.contains(&c.ip)));
            }
        }

        /// Any hop text parses or is refused, never panics.
        #[test]
        fn any_hop_parses_or_is_refused(hop in any::<String>()) {
            let _ = parse_hop(&hop);
        }
    }
}
