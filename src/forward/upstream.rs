//! One application's upstream address, resolved with hickory-resolver and
//! re-resolved when the answer's TTL runs out.

use hickory_resolver::TokioAsyncResolver;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Why an upstream could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot resolve {host}: {message}")]
    Resolve { host: String, message: String },
    #[error("connect to {addr} timed out after {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct Resolved {
    addrs: Vec<SocketAddr>,
    valid_until: Instant,
}

/// An upstream `host:port`.
#[derive(Debug)]
pub struct Upstream {
    host: String,
    port: u16,
    literal: Option<IpAddr>,
    connect_timeout: Duration,
    cache: Mutex<Option<Resolved>>,
}

fn resolver() -> Result<&'static TokioAsyncResolver, String> {
    static RESOLVER: OnceLock<Result<TokioAsyncResolver, String>> = OnceLock::new();
    RESOLVER
        .get_or_init(|| {
            // Only the system configuration is used: a resolver with built-in
            // public name servers would send queries the operator never chose.
            TokioAsyncResolver::tokio_from_system_conf()
                .map_err(|e| format!("cannot read the system resolver configuration: {e}"))
        })
        .as_ref()
        .map_err(|e| e.clone())
}

impl Upstream {
    /// Parses `host:port`, `IPv4:port` or `[IPv6]:port`.
    pub fn parse(value: &str, connect_timeout: Duration) -> Result<Upstream, String> {
        let hint =
            "write host:port, such as \"10.0.0.5:8080\", \"wiki.internal:80\" or \"[fd00::5]:22\"";
        if let Ok(addr) = value.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(format!("{value:?} has port 0; {hint}"));
            }
            return Ok(Upstream {
                host: addr.ip().to_string(),
                port: addr.port(),
                literal: Some(addr.ip()),
                connect_timeout,
                cache: Mutex::new(None),
            });
        }
        let (host, port) = value
            .rsplit_once(':')
            .ok_or_else(|| format!("{value:?} has no port; {hint}"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{value:?} has an invalid port; {hint}"))?;
        if port == 0 {
            return Err(format!("{value:?} has port 0; {hint}"));
        }
        let valid_host = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid_host {
            return Err(format!("{value:?} has an invalid host name; {hint}"));
        }
        Ok(Upstream {
            host: host.to_ascii_lowercase(),
            port,
            literal: None,
            connect_timeout,
            cache: Mutex::new(None),
        })
    }

    /// `host:port` as configured.
    pub fn display(&self) -> String {
        match self.literal {
            Some(IpAddr::V6(ip)) => format!("[{ip}]:{}", self.port),
            _ => format!("{}:{}", self.host, self.port),
        }
    }

    async fn addresses(&self) -> Result<Vec<SocketAddr>, UpstreamError> {
        if let Some(ip) = self.literal {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(resolved) = cache.as_ref() {
                if resolved.valid_until > Instant::now() {
                    return Ok(resolved.addrs.clone());
                }
            }
        }
        let resolve_error = |message: String| UpstreamError::Resolve {
            host: self.host.clone(),
            message,
        };
        let lookup = resolver()
            .map_err(resolve_error)?
            .lookup_ip(self.host.as_str())
            .await
            .map_err(|e| resolve_error(e.to_string()))?;
        let addrs: Vec<SocketAddr> = lookup
            .iter()
            .map(|ip| SocketAddr::new(ip, self.port))
            .collect();
        if addrs.is_empty() {
            return Err(resolve_error("no addresses".into()));
        }
        let valid_until = lookup.valid_until();
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = Some(Resolved {
            addrs: addrs.clone(),
            valid_until,
        });
        tracing::debug!(host = %self.host, ?addrs, ttl = ?valid_until.saturating_duration_since(Instant::now()), "upstream resolved");
        Ok(addrs)
    }

    /// Connects to the first address that answers, each attempt bounded by
    /// the connect timeout.
    pub async fn connect(&self) -> Result<TcpStream, UpstreamError> {
        let addrs = self.addresses().await?;
        let mut last = None;
        for addr in addrs {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Ok(Err(source)) => {
                    last = Some(UpstreamError::Connect {
                        addr: addr.to_string(),
                        source,
                    })
                }
                Err(_) => {
                    last = Some(UpstreamError::Timeout {
                        addr: addr.to_string(),
                        after: self.connect_timeout,
                    })
                }
            }
        }
        Err(last.unwrap_or_else(|| UpstreamError::Resolve {
            host: self.host.clone(),
            message: "no addresses".into(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_literals_and_names() {
        let t = Duration::from_secs(1);
        assert_eq!(
            Upstream::parse("127.0.0.1:80", t).map(|u| u.display()),
            Ok("127.0.0.1:80".into())
        );
        assert_eq!(
            Upstream::parse("[::1]:22", t).map(|u| u.display()),
            Ok("[::1]:22".into())
        );
        assert_eq!(
            Upstream::parse("Wiki.Internal:8080", t).map(|u| u.display()),
            Ok("wiki.internal:8080".into())
        );
    }

    #[test]
    fn parse_rejects_bad_values() {
        let t = Duration::from_secs(1);
        for bad in [
            "wiki",
            "wiki:",
            "wiki:0",
            "wiki:99999",
            ":80",
            "bad host:80",
            "a..b:80",
        ] {
            assert!(Upstream::parse(bad, t).is_err(), "{bad:?} must be rejected");
        }
    }
}
