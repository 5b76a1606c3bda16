//! HTTP plumbing shared by downloads and uploads: one agent, retries, the Hub's error messages.

use std::fmt;
use std::time::Duration;

use ureq::http::Response;
use ureq::Body;

use super::{HubConfig, RetryPolicy};

/// A request to the Hub (or its storage) that failed; `message` is the Hub's own explanation when
/// it gave one (`X-Error-Message` header or the JSON `error` field).
#[derive(Debug, Clone)]
pub struct HubHttpError {
    pub method: String,
    pub url: String,
    /// None when no response arrived (connection refused or dropped, timeout).
    pub status: Option<u16>,
    pub message: String,
}

impl HubHttpError {
    /// Worth trying again: no response, a server error, or rate limiting.
    pub fn is_transient(&self) -> bool {
        match self.status {
            None => true,
            Some(s) => s == 429 || s >= 500,
        }
    }
}

impl fmt::Display for HubHttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(status) => write!(
                f,
                "{} {} failed with HTTP {status}: {}",
                self.method, self.url, self.message
            ),
            None => write!(f, "{} {} failed: {}", self.method, self.url, self.message),
        }
    }
}

impl std::error::Error for HubHttpError {}

pub(crate) fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        // Redirects are followed by hand: the first response carries the commit and ETag
        // headers, and the token must not travel to a storage host.
        .max_redirects(0)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(300)))
        .timeout_per_read(Some(Duration::from_secs(120)))
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .tls_config(crate::tls::config())
        .build()
        .into()
}

pub(crate) fn bearer(config: &HubConfig) -> Option<String> {
    config.token.as_ref().map(|t| format!("Bearer {t}"))
}

/// Turns a response into `Ok` (2xx, and 3xx which callers follow themselves) or a [`HubHttpError`]
/// carrying the server's message.
pub(crate) fn check(
    method: &str,
    url: &str,
    result: Result<Response<Body>, ureq::Error>,
) -> Result<Response<Body>, HubHttpError> {
    let error = |status, message| HubHttpError {
        method: method.to_string(),
        url: url.to_string(),
        status,
        message,
    };
    let mut response = match result {
        Ok(r) => r,
        Err(e) => return Err(error(None, e.to_string())),
    };
    let status = response.status().as_u16();
    if status < 400 {
        return Ok(response);
    }
    let header_message = response
        .headers()
        .get("x-error-message")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response
        .body_mut()
        .with_config()
        .limit(1 << 20)
        .read_to_string()
        .unwrap_or_default();
    let message = header_message
        .or_else(|| json_error_message(&body))
        .unwrap_or_else(|| {
            let trimmed = body.trim();
            if trimmed.is_empty() {
                response
                    .status()
                    .canonical_reason()
                    .unwrap_or("no message")
                    .to_string()
            } else {
                trimmed.chars().take(500).collect()
            }
        });
    Err(error(Some(status), message))
}

fn json_error_message(body: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    match value.get("error")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => Some(
            items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| i.to_string())
                })
                .collect::<Vec<_>>()
                .join("; "),
        ),
        other => Some(other.to_string()),
    }
}

/// Runs `attempt` until it succeeds, fails for good, or the policy's attempts are spent.
/// Only [`HubHttpError::is_transient`] failures are retried; `what` names the step in logs.
pub(crate) fn with_retries<T>(
    policy: &RetryPolicy,
    what: &str,
    mut attempt: impl FnMut() -> Result<T, HubHttpError>,
) -> Result<T, HubHttpError> {
    let mut failures = 0;
    loop {
        match attempt() {
            Ok(value) => return Ok(value),
            Err(e) if e.is_transient() && failures + 1 < policy.max_attempts.max(1) => {
                failures += 1;
                let wait = policy.backoff(failures);
                tracing::warn!(
                    "{what}: {e}; retrying in {wait:?} (attempt {})",
                    failures + 1
                );
                std::thread::sleep(wait);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads a JSON response body, reporting a malformed one as a (final) error of that request.
pub(crate) fn read_json(
    method: &str,
    url: &str,
    mut response: Response<Body>,
) -> Result<serde_json::Value, HubHttpError> {
    let text = response
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_string()
        .map_err(|e| HubHttpError {
            method: method.to_string(),
            url: url.to_string(),
            status: None,
            message: format!("reading the response failed: {e}"),
        })?;
    serde_json::from_str(&text).map_err(|e| HubHttpError {
        method: method.to_string(),
        url: url.to_string(),
        status: Some(response.status().as_u16()),
        message: format!(
            "expected a JSON response ({e}), got: {}",
            text.chars().take(200).collect::<String>()
        ),
    })
}

/// RFC 3986's unreserved characters stay as they are; everything else is percent-encoded.
const COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes one URL component (a revision such as `refs/pr/1` becomes one segment).
pub(crate) fn encode_component(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, COMPONENT).to_string()
}

/// Percent-encodes a file path, keeping its `/` separators.
pub(crate) fn encode_path(path: &str) -> String {
    path.split('/')
        .map(encode_component)
        .collect::<Vec<_>>()
        .join("/")
}

/// Resolves a `Location` header (absolute, host-relative or relative) against the request URL.
pub(crate) fn resolve_location(request_url: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_string();
    }
    let scheme_end = request_url.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = request_url[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(request_url.len());
    if location.starts_with('/') {
        format!("{}{}", &request_url[..host_end], location)
    } else {
        let dir_end = request_url
            .rfind('/')
            .filter(|&i| i >= host_end)
            .unwrap_or(host_end);
        format!("{}/{}", &request_url[..dir_end], location)
    }
}

/// `scheme://host:port` of a URL, to tell whether a redirect leaves the Hub.
pub(crate) fn origin(url: &str) -> &str {
    let scheme_end = url.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = url[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(url.len());
    &url[..host_end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding() {
        assert_eq!(encode_component("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_path("mnli/a b.parquet"), "mnli/a%20b.parquet");
    }

    #[test]
    fn locations() {
        let url = "http://h:1/a/resolve/main/x.bin";
        assert_eq!(resolve_location(url, "https://cdn/y"), "https://cdn/y");
        assert_eq!(resolve_location(url, "/api/z"), "http://h:1/api/z");
        assert_eq!(resolve_location(url, "w"), "http://h:1/a/resolve/main/w");
        assert_eq!(origin(url), "http://h:1");
    }

    #[test]
    fn json_messages() {
        assert_eq!(
            json_error_message(r#"{"error":"Repository not found"}"#).unwrap(),
            "Repository not found"
        );
        assert_eq!(
            json_error_message(r#"{"error":["a","b"]}"#).unwrap(),
            "a; b"
        );
        assert!(json_error_message("not json").is_none());
    }
}
