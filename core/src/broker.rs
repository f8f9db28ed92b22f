//! Broker addresses as users write them: `mqtt://host:port` (plain TCP) or
//! `mqtts://host:port` (TLS). The port defaults to 1883 and 8883.

use std::fmt;
use std::str::FromStr;

/// A parsed broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// Why a broker address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerUrlError {
    #[error("broker address {0:?} must start with mqtt:// or mqtts://")]
    Scheme(String),
    #[error("broker address {0:?} has no host")]
    NoHost(String),
    #[error("broker address {0:?} has an invalid port")]
    Port(String),
}

impl FromStr for BrokerUrl {
    type Err = BrokerUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(BrokerUrlError::Scheme(s.to_owned()));
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        let port_of = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| BrokerUrlError::Port(s.to_owned()))
        };
        // `[::1]:1883` (IPv6 needs brackets) or `host:1883` or `host`.
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| BrokerUrlError::NoHost(s.to_owned()))?;
            match after.strip_prefix(':') {
                Some(p) => (host, port_of(p)?),
                None if after.is_empty() => (host, default_port),
                None => return Err(BrokerUrlError::Port(s.to_owned())),
            }
        } else {
            match rest.split_once(':') {
                Some((host, p)) => (host, port_of(p)?),
                None => (rest, default_port),
            }
        };
        if host.is_empty() || host.contains('/') {
            return Err(BrokerUrlError::NoHost(s.to_owned()));
        }
        Ok(BrokerUrl {
            host: host.to_owned(),
            port,
            tls,
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let u: BrokerUrl = "mqtt://127.0.0.1:18830".parse().expect("valid");
        assert_eq!(
            (u.host.as_str(), u.port, u.tls),
            ("127.0.0.1", 18830, false)
        );
        let u: BrokerUrl = "mqtts://broker.example".parse().expect("valid");
        assert_eq!(
            (u.host.as_str(), u.port, u.tls),
            ("broker.example", 8883, true)
        );
        let u: BrokerUrl = "mqtt://[::1]:1884".parse().expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("::1", 1884));
        assert_eq!(u.to_string(), "mqtt://[::1]:1884");
    }

    #[test]
    fn refuses_other_forms() {
        assert!(matches!(
            "tcp://h:1".parse::<BrokerUrl>(),
            Err(BrokerUrlError::Scheme(_))
        ));
        assert!(matches!(
            "mqtt://h:port".parse::<BrokerUrl>(),
            Err(BrokerUrlError::Port(_))
        ));
        assert!(matches!(
            "mqtt://:1883".parse::<BrokerUrl>(),
            Err(BrokerUrlError::NoHost(_))
        ));
        assert!(matches!(
            "mqtt://h:99999".parse::<BrokerUrl>(),
            Err(BrokerUrlError::Port(_))
        ));
    }
}
