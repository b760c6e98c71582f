//! A small HTTP GET client for revocation data (CRLs, and OCSP over GET).
//!
//! URLs may come from a client certificate's cRLDistributionPoints, so the
//! client only speaks plain `http://`. RFC 5280 section 4.2.1.13 and RFC 6960
//! appendix A use HTTP, and the data is signed. TLS would add nothing but a
//! way to make the gateway reach arbitrary TLS servers. It follows no redirects,
//! ignores proxy environment variables, bounds every request by a total
//! timeout, and stops reading a body as soon as it exceeds the size cap.
//! Connections to a host are kept and reused between requests.

use std::time::Duration;

/// Per-request limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchLimits {
    /// Time for the whole request: connecting, sending and reading the body.
    pub timeout: Duration,
    /// Maximum body size in bytes.
    pub max_bytes: u64,
}

/// The reason a fetch failed. Every variant names the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("invalid URL {url:?}: {detail}")]
    InvalidUrl { url: String, detail: String },
    #[error(
        "URL {url:?} has the scheme {scheme:?}, but revocation data is only fetched over \
         plain http://"
    )]
    UnsupportedScheme { url: String, scheme: String },
    #[error("fetching {url} timed out after {}s", timeout.as_secs_f64())]
    Timeout { url: String, timeout: Duration },
    #[error("connecting to {url} failed: {detail}")]
    Connect { url: String, detail: String },
    #[error("fetching {url} failed: {detail}")]
    Request { url: String, detail: String },
    #[error("{url} returned HTTP status {status}, expected 200")]
    Status { url: String, status: u16 },
    #[error("the response from {url} is larger than the maximum of {max_bytes} bytes")]
    TooLarge { url: String, max_bytes: u64 },
}

/// Checks that `url` is an absolute `http://` URL with a host.
///
/// # Errors
///
/// Returns [`FetchError::InvalidUrl`] for a URL that does not parse or has no
/// host, and [`FetchError::UnsupportedScheme`] for any scheme but `http`
/// (`https`, `file`, `ldap` and so on).
pub fn check_url(url: &str) -> Result<reqwest::Url, FetchError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| FetchError::InvalidUrl {
        url: url.to_owned(),
        detail: e.to_string(),
    })?;
    if parsed.scheme() != "http" {
        return Err(FetchError::UnsupportedScheme {
            url: url.to_owned(),
            scheme: parsed.scheme().to_owned(),
        });
    }
    if parsed.host_str().map_or(true, str::is_empty) {
        return Err(FetchError::InvalidUrl {
            url: url.to_owned(),
            detail: "the URL has no host".to_owned(),
        });
    }
    Ok(parsed)
}

/// An HTTP GET client with a connection pool, shared by every fetch.
#[derive(Debug, Clone)]
pub struct HttpFetcher {
    client: reqwest::Client,
}

impl HttpFetcher {
    /// Builds the client. `connect_timeout` bounds each TCP connect, and the
    /// total timeout is per request (see [`FetchLimits`]).
    ///
    /// # Errors
    ///
    /// Returns a message when reqwest cannot build the client.
    pub fn new(connect_timeout: Duration) -> Result<HttpFetcher, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("ztgate/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| format!("failed to build the HTTP client: {e}"))?;
        Ok(HttpFetcher { client })
    }

    /// Fetches `url` with GET and returns the body of a 200 response.
    ///
    /// `accept` is sent as the Accept header, for example
    /// "application/pkix-crl".
    ///
    /// # Errors
    ///
    /// Returns a [`FetchError`] when the URL is not plain http, the request
    /// times out or fails, the status is not 200 (a redirect included), or the
    /// body exceeds `limits.max_bytes`. The size check runs on the
    /// Content-Length header and again on every received chunk, so an
    /// oversized body is never buffered whole.
    pub async fn get(
        &self,
        url: &str,
        accept: &str,
        limits: FetchLimits,
    ) -> Result<Vec<u8>, FetchError> {
        let parsed = check_url(url)?;
        // reqwest's own timeout covers the same span. The outer one also
        // bounds the loop below, so the deadline applies whatever reqwest does.
        match tokio::time::timeout(limits.timeout, self.get_body(parsed, url, accept, limits)).await
        {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout {
                url: url.to_owned(),
                timeout: limits.timeout,
            }),
        }
    }

    async fn get_body(
        &self,
        parsed: reqwest::Url,
        url: &str,
        accept: &str,
        limits: FetchLimits,
    ) -> Result<Vec<u8>, FetchError> {
        let too_large = || FetchError::TooLarge {
            url: url.to_owned(),
            max_bytes: limits.max_bytes,
        };
        let mut response = self
            .client
            .get(parsed)
            .header(reqwest::header::ACCEPT, accept)
            .timeout(limits.timeout)
            .send()
            .await
            .map_err(|e| request_error(url, limits.timeout, &e))?;

        let status = response.status();
        if status != reqwest::StatusCode::OK {
            return Err(FetchError::Status {
                url: url.to_owned(),
                status: status.as_u16(),
            });
        }
        let announced = response.content_length();
        if announced.is_some_and(|length| length > limits.max_bytes) {
            return Err(too_large());
        }

        let initial = announced.unwrap_or(0).min(limits.max_bytes);
        let mut body = Vec::with_capacity(usize::try_from(initial).unwrap_or(0));
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| request_error(url, limits.timeout, &e))?
        {
            let total = body.len() as u64 + chunk.len() as u64;
            if total > limits.max_bytes {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

fn request_error(url: &str, timeout: Duration, error: &reqwest::Error) -> FetchError {
    let detail = error_chain(error);
    if error.is_timeout() {
        FetchError::Timeout {
            url: url.to_owned(),
            timeout,
        }
    } else if error.is_connect() {
        FetchError::Connect {
            url: url.to_owned(),
            detail,
        }
    } else {
        FetchError::Request {
            url: url.to_owned(),
            detail,
        }
    }
}

/// Joins an error and its sources, because reqwest's top-level message
/// ("error sending request") leaves out the cause.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const LIMITS: FetchLimits = FetchLimits {
        timeout: Duration::from_secs(5),
        max_bytes: 1024,
    };

    fn fetcher() -> HttpFetcher {
        HttpFetcher::new(Duration::from_secs(2)).expect("client builds")
    }

    /// Reads one request head from `stream`.
    async fn read_head(stream: &mut TcpStream) -> Option<String> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        Some(String::from_utf8_lossy(&head).into_owned())
    }

    /// Serves `response` to every request on kept-alive connections and
    /// counts the accepted connections.
    async fn serve(response: Vec<u8>) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let response = response.clone();
                tokio::spawn(async move {
                    while read_head(&mut stream).await.is_some() {
                        if stream.write_all(&response).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (address, connections)
    }

    fn ok_response(body: &[u8]) -> Vec<u8> {
        let mut response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/pkix-crl\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        response.extend_from_slice(body);
        response
    }

    #[tokio::test]
    async fn get_returns_body_and_reuses_connection() {
        let (address, connections) = serve(ok_response(b"crl bytes")).await;
        let fetcher = fetcher();
        let url = format!("http://{address}/ca.crl");

        let first = fetcher.get(&url, "application/pkix-crl", LIMITS).await;
        let second = fetcher.get(&url, "application/pkix-crl", LIMITS).await;

        assert_eq!(first.as_deref(), Ok(&b"crl bytes"[..]));
        assert_eq!(second.as_deref(), Ok(&b"crl bytes"[..]));
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn unsupported_schemes_rejected() {
        let fetcher = fetcher();
        for url in [
            "https://127.0.0.1/ca.crl",
            "file:///etc/passwd",
            "ldap://127.0.0.1/cn=ca",
            "ftp://127.0.0.1/ca.crl",
        ] {
            let error = fetcher
                .get(url, "application/pkix-crl", LIMITS)
                .await
                .expect_err(url);

            assert!(
                matches!(error, FetchError::UnsupportedScheme { .. }),
                "{url}: {error}"
            );
            assert!(error.to_string().contains(url), "{error}");
        }
    }

    #[tokio::test]
    async fn invalid_urls_rejected() {
        let fetcher = fetcher();
        for url in ["not a url", "/relative/ca.crl", "http://"] {
            let error = fetcher
                .get(url, "application/pkix-crl", LIMITS)
                .await
                .expect_err(url);

            assert!(
                matches!(error, FetchError::InvalidUrl { .. }),
                "{url}: {error}"
            );
        }
    }

    #[tokio::test]
    async fn announced_oversize_body_rejected() {
        let (address, _) = serve(ok_response(&[0x30; 2048])).await;
        let url = format!("http://{address}/big.crl");

        let error = fetcher()
            .get(&url, "application/pkix-crl", LIMITS)
            .await
            .expect_err("oversized body accepted");

        assert_eq!(
            error,
            FetchError::TooLarge {
                url: url.clone(),
                max_bytes: 1024
            }
        );
        assert!(error.to_string().contains("1024 bytes"), "{error}");
    }

    /// A chunked body has no Content-Length, so the cap must hold while
    /// streaming. The server sends far more than the cap and then stalls; a
    /// client that buffered the whole body would time out instead.
    #[tokio::test]
    async fn streamed_oversize_body_rejected() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            read_head(&mut stream).await;
            let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
            if stream.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = [0x30u8; 512];
            for _ in 0..8 {
                let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
                frame.extend_from_slice(&chunk);
                frame.extend_from_slice(b"\r\n");
                if stream.write_all(&frame).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let url = format!("http://{address}/stream.crl");

        let started = std::time::Instant::now();
        let error = fetcher()
            .get(&url, "application/pkix-crl", LIMITS)
            .await
            .expect_err("oversized stream accepted");

        assert!(matches!(error, FetchError::TooLarge { .. }), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let url = format!("http://{address}/never.crl");
        let limits = FetchLimits {
            timeout: Duration::from_millis(300),
            max_bytes: 1024,
        };

        let started = std::time::Instant::now();
        let error = fetcher()
            .get(&url, "application/pkix-crl", limits)
            .await
            .expect_err("silent server produced a body");

        assert!(matches!(error, FetchError::Timeout { .. }), "{error}");
        assert!(error.to_string().contains(&url), "{error}");
        // The server never sends a response, so only the 300 ms limit ends the
        // request.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn redirect_not_followed() {
        let response =
            b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/elsewhere\r\nContent-Length: 0\r\n\r\n"
                .to_vec();
        let (address, _) = serve(response).await;
        let url = format!("http://{address}/moved.crl");

        let error = fetcher()
            .get(&url, "application/pkix-crl", LIMITS)
            .await
            .expect_err("redirect accepted");

        assert_eq!(error, FetchError::Status { url, status: 302 });
    }

    #[tokio::test]
    async fn refused_connection_reported() {
        // Bound but not listening: connections are refused, and the port
        // stays ours so no other test can start listening on it.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind");
        let address = socket.local_addr().expect("address");
        let url = format!("http://{address}/gone.crl");

        let error = fetcher()
            .get(&url, "application/pkix-crl", LIMITS)
            .await
            .expect_err("closed port answered");

        assert!(matches!(error, FetchError::Connect { .. }), "{error}");
    }
}
