//! The HTTP transport for OCSP (RFC 6960 appendix A.1): plain http:// URLs
//! only, one timeout for the whole exchange, a response size limit, pooled
//! keep-alive connections and no redirects or proxies.

use super::OcspError;
use base64::Engine;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use reqwest::{Client, Method, StatusCode, Url};
use std::time::Duration;

/// Length limit for GET: RFC 5019 section 5 recommends GET when the encoded
/// request is less than 255 bytes long.
const GET_MAX_ENCODED_LEN: usize = 255;

/// How long an idle pooled connection to a responder is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

const OCSP_REQUEST: &str = "application/ocsp-request";
const OCSP_RESPONSE: &str = "application/ocsp-response";

/// The HTTP method that a request used, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HttpMethod {
    Get,
    Post,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Post => "POST",
        }
    }
}

pub(super) struct HttpClient {
    client: Client,
    timeout: Duration,
    max_response_bytes: usize,
    use_get: bool,
}

impl HttpClient {
    pub fn new(
        timeout: Duration,
        max_response_bytes: usize,
        use_get: bool,
    ) -> Result<HttpClient, OcspError> {
        let client = Client::builder()
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build()
            .map_err(|error| {
                OcspError::Internal(format!("failed to create the HTTP client: {error}"))
            })?;
        Ok(HttpClient {
            client,
            timeout,
            max_response_bytes,
            use_get,
        })
    }

    /// Sends `request` to the responder at `url` and returns the response
    /// body.
    pub async fn send(
        &self,
        url: &str,
        request: &[u8],
    ) -> Result<(Vec<u8>, HttpMethod), OcspError> {
        let base = validate_url(url)?;
        let (method, builder) = match self.get_url(&base, request)? {
            Some(get_url) => (HttpMethod::Get, self.client.request(Method::GET, get_url)),
            None => (
                HttpMethod::Post,
                self.client
                    .request(Method::POST, base)
                    .header(CONTENT_TYPE, HeaderValue::from_static(OCSP_REQUEST))
                    .body(request.to_vec()),
            ),
        };
        let exchange = async {
            let mut response = builder
                .send()
                .await
                .map_err(|error| self.transport(url, &error))?;
            if response.status() != StatusCode::OK {
                return Err(OcspError::HttpStatus {
                    url: url.to_owned(),
                    status: response.status().as_u16(),
                });
            }
            let content_type = response.headers().get(CONTENT_TYPE).cloned();
            if content_type.as_ref().and_then(|value| value.to_str().ok()) != Some(OCSP_RESPONSE) {
                tracing::debug!(
                    responder = url,
                    content_type = ?content_type,
                    "OCSP response has an unexpected content type; decoding it anyway"
                );
            }
            let too_large = || OcspError::ResponseTooLarge {
                url: url.to_owned(),
                limit: self.max_response_bytes,
            };
            let declared = response.content_length().unwrap_or(0);
            if usize::try_from(declared).map_or(true, |length| length > self.max_response_bytes) {
                return Err(too_large());
            }
            let mut body = Vec::with_capacity(usize::try_from(declared).unwrap_or(0));
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|error| self.transport(url, &error))?
            {
                if body.len() + chunk.len() > self.max_response_bytes {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(body)
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result.map(|body| (body, method)),
            Err(_) => Err(OcspError::Timeout {
                url: url.to_owned(),
                timeout: self.timeout,
            }),
        }
    }

    fn transport(&self, url: &str, error: &reqwest::Error) -> OcspError {
        if error.is_timeout() {
            return OcspError::Timeout {
                url: url.to_owned(),
                timeout: self.timeout,
            };
        }
        // reqwest's Display omits the cause, which contains the useful part
        // such as "Connection refused".
        let mut detail = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            detail.push_str(": ");
            detail.push_str(&cause.to_string());
            source = cause.source();
        }
        OcspError::Transport {
            url: url.to_owned(),
            detail,
        }
    }

    /// Returns the GET URL when GET is enabled and the encoded request is
    /// short enough, otherwise `None` for a POST.
    fn get_url(&self, base: &Url, request: &[u8]) -> Result<Option<Url>, OcspError> {
        if !self.use_get {
            return Ok(None);
        }
        let encoded = get_path_segment(request);
        if encoded.len() >= GET_MAX_ENCODED_LEN {
            return Ok(None);
        }
        let mut url = base.to_string();
        if !url.ends_with('/') {
            url.push('/');
        }
        url.push_str(&encoded);
        Url::parse(&url)
            .map(Some)
            .map_err(|error| OcspError::Encode {
                url: base.to_string(),
                detail: format!("the GET URL does not parse: {error}"),
            })
    }
}

/// Encodes the DER request as URL-encoded base64 (RFC 6960 appendix A.1).
fn get_path_segment(request: &[u8]) -> String {
    let base64 = base64::engine::general_purpose::STANDARD.encode(request);
    utf8_percent_encode(&base64, NON_ALPHANUMERIC).to_string()
}

/// Parses a responder URL and checks that it is an http:// URL with a host.
pub(super) fn validate_url(url: &str) -> Result<Url, OcspError> {
    let unsupported = |reason: &str| OcspError::UnsupportedUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let parsed = Url::parse(url).map_err(|error| unsupported(&error.to_string()))?;
    if parsed.scheme() != "http" {
        return Err(unsupported(
            "only http:// URLs are supported, as RFC 6960 responders use plain HTTP",
        ));
    }
    if parsed.host().is_none() {
        return Err(unsupported("the URL has no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(unsupported("the URL must not contain user information"));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_segment_escapes_base64_specials() {
        // 0xfb 0xff encodes to "+/8=" in standard base64.
        let segment = get_path_segment(&[0xfb, 0xff]);

        assert_eq!(segment, "%2B%2F8%3D");
    }

    #[test]
    fn get_url_appends_one_slash() {
        let client = HttpClient::new(Duration::from_secs(1), 1024, true).expect("client");
        let cases = [
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080/AQI%3D"),
            ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/AQI%3D"),
            ("http://127.0.0.1/ocsp", "http://127.0.0.1/ocsp/AQI%3D"),
            ("http://127.0.0.1/ocsp/", "http://127.0.0.1/ocsp/AQI%3D"),
        ];
        for (base, expected) in cases {
            let base = validate_url(base).expect("valid URL");

            let url = client.get_url(&base, &[1, 2]).expect("GET URL");

            assert_eq!(url.map(String::from).as_deref(), Some(expected), "{base}");
        }
    }

    #[test]
    fn long_request_uses_post() {
        let client = HttpClient::new(Duration::from_secs(1), 1024, true).expect("client");
        let base = validate_url("http://127.0.0.1/").expect("valid URL");

        let url = client.get_url(&base, &[0u8; 200]).expect("no error");

        assert!(url.is_none());
    }

    #[test]
    fn get_disabled_uses_post() {
        let client = HttpClient::new(Duration::from_secs(1), 1024, false).expect("client");
        let base = validate_url("http://127.0.0.1/").expect("valid URL");

        let url = client.get_url(&base, &[1, 2]).expect("no error");

        assert!(url.is_none());
    }

    #[test]
    fn non_http_urls_rejected() {
        for url in [
            "https://127.0.0.1/",
            "ldap://127.0.0.1/",
            "not a url",
            "http://user:secret@127.0.0.1/",
        ] {
            let error = validate_url(url).expect_err("URL was accepted");

            assert!(
                matches!(error, OcspError::UnsupportedUrl { .. }),
                "{url}: {error}"
            );
        }
    }
}
