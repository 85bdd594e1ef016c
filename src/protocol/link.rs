//! Certificate fingerprints and `voipc://` links: how a server is named to a client.
//!
//! `voipc://HOST:PORT/?fp=FINGERPRINT[&channel=NAME][&invite=TOKEN]` carries everything a
//! client needs to connect safely: where, which certificate to pin, and optionally
//! which channel to enter with which invite.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use super::DEFAULT_PORT;

/// The SHA-256 of a server's DER certificate; shown as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of_certificate(der: &[u8]) -> Self {
        Fingerprint(Sha256::digest(der).into())
    }

    /// The fingerprint of a user's serialized identity key (how `server.toml` names admins).
    pub fn of_identity_key(key: &[u8]) -> Self {
        Fingerprint(Sha256::digest(key).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("a fingerprint is 64 hex digits (colons allowed), not {0:?}")]
    Fingerprint(String),
    #[error("{0:?} is not HOST[:PORT] or a voipc:// link")]
    Address(String),
    #[error("unknown link parameter {0:?}")]
    Parameter(String),
    #[error("bad percent-encoding in {0:?}")]
    Encoding(String),
}

impl FromStr for Fingerprint {
    type Err = LinkError;

    fn from_str(s: &str) -> Result<Self, LinkError> {
        let digits: String = s.chars().filter(|c| *c != ':').collect();
        let mut out = [0u8; 32];
        hex::decode_to_slice(&digits, &mut out).map_err(|_| LinkError::Fingerprint(s.to_owned()))?;
        Ok(Fingerprint(out))
    }
}

/// A server address, perhaps with the pin, channel and invite from a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLink {
    pub host: String,
    pub port: u16,
    pub fingerprint: Option<Fingerprint>,
    pub channel: Option<String>,
    pub invite: Option<String>,
}

impl ServerLink {
    /// `host:port` as a client dials it (IPv6 hosts in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The link that pins `fingerprint`, without channel or invite.
    pub fn invite_base(&self, fingerprint: &Fingerprint) -> String {
        format!("voipc://{}/?fp={fingerprint}", self.authority())
    }
}

impl FromStr for ServerLink {
    type Err = LinkError;

    /// Accepts `HOST`, `HOST:PORT`, `[V6]:PORT` or a full `voipc://` link.
    fn from_str(s: &str) -> Result<Self, LinkError> {
        let bad = || LinkError::Address(s.to_owned());
        let (authority, query) = match s.strip_prefix("voipc://") {
            Some(rest) => {
                let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
                (authority.trim_end_matches('/'), query)
            }
            None => (s, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, rest) = v6.split_once(']').ok_or_else(bad)?;
            let port = match rest.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad())?,
                None if rest.is_empty() => DEFAULT_PORT,
                None => return Err(bad()),
            };
            host.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
            (host.to_owned(), port)
        } else {
            let (host, port) = match authority.split_once(':') {
                Some((host, port)) => (host, port.parse().map_err(|_| bad())?),
                None => (authority, DEFAULT_PORT),
            };
            // A DNS name (in ASCII, as IDNA writes one) or an IPv4 address: nothing that
            // could hide a control character or another URL part.
            let name_byte = |b: u8| b.is_ascii_alphanumeric() || b"-._".contains(&b);
            if host.is_empty() || host.len() > 253 || !host.bytes().all(name_byte) {
                return Err(bad());
            }
            (host.to_owned(), port)
        };
        let mut link = ServerLink { host, port, fingerprint: None, channel: None, invite: None };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value)?;
            match key {
                "fp" => link.fingerprint = Some(value.parse()?),
                "channel" => link.channel = Some(value),
                "invite" => link.invite = Some(value),
                other => return Err(LinkError::Parameter(other.to_owned())),
            }
        }
        Ok(link)
    }
}

/// Percent-encodes everything but unreserved URI characters.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn percent_decode(text: &str) -> Result<String, LinkError> {
    let bad = || LinkError::Encoding(text.to_owned());
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'%' {
            let hex = tail.get(..2).ok_or_else(bad)?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            bytes.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            rest = &tail[2..];
        } else {
            bytes.push(first);
            rest = tail;
        }
    }
    String::from_utf8(bytes).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let fp = Fingerprint::of_certificate(b"cert");
        let text = fp.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<Fingerprint>(), Ok(fp));
        let colons: Vec<String> = fp.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(colons.join(":").parse::<Fingerprint>(), Ok(fp));
        assert!(matches!("abc".parse::<Fingerprint>(), Err(LinkError::Fingerprint(_))));
    }

    #[test]
    fn addresses_and_links_parse() {
        let plain: ServerLink = "example.org".parse().unwrap();
        assert_eq!((plain.host.as_str(), plain.port, plain.fingerprint), ("example.org", DEFAULT_PORT, None));
        let v6: ServerLink = "[::1]:4000".parse().unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 4000));
        assert_eq!(v6.authority(), "[::1]:4000");

        let fp = Fingerprint([0xab; 32]);
        let text = format!("voipc://127.0.0.1:9000/?fp={fp}&channel=Late%20Night&invite=t0k");
        let link: ServerLink = text.parse().unwrap();
        assert_eq!(link.authority(), "127.0.0.1:9000");
        assert_eq!(link.fingerprint, Some(fp));
        assert_eq!(link.channel.as_deref(), Some("Late Night"));
        assert_eq!(link.invite.as_deref(), Some("t0k"));
        assert_eq!(link.invite_base(&fp), format!("voipc://127.0.0.1:9000/?fp={fp}"));
        assert_eq!(percent_encode("Late Night/ü"), "Late%20Night%2F%C3%BC");
        assert_eq!(percent_decode(&percent_encode("Late Night/ü")).unwrap(), "Late Night/ü");
    }

    #[test]
    fn bad_links_are_errors() {
        assert!(matches!("host:notaport".parse::<ServerLink>(), Err(LinkError::Address(_))));
        // Hosts are names or addresses, nothing else (the fuzzer found "\0?\x02" taken).
        for bad in ["\0?\u{2}", "exa mple.org", "a@b", "h\u{202e}x", "[not-v6]:1", "voipc://x/y/?fp=ab"] {
            assert!(matches!(bad.parse::<ServerLink>(), Err(LinkError::Address(_))), "{bad:?}");
        }
        assert!(matches!("voipc://h:1/?fp=zz".parse::<ServerLink>(), Err(LinkError::Fingerprint(_))));
        assert!(matches!("voipc://h:1/?what=1".parse::<ServerLink>(), Err(LinkError::Parameter(_))));
        assert!(matches!("voipc://h:1/?channel=%zz".parse::<ServerLink>(), Err(LinkError::Encoding(_))));
        assert!(matches!("voipc://h:1/?channel=%4".parse::<ServerLink>(), Err(LinkError::Encoding(_))));
        assert!(matches!("[::1".parse::<ServerLink>(), Err(LinkError::Address(_))));
        assert!(matches!("".parse::<ServerLink>(), Err(LinkError::Address(_))));
    }
}
