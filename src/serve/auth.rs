//! `--api-key`: OpenAI-style `Authorization: Bearer KEY` on every endpoint but health and metrics.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::ErrorMessage;

/// Probes and scrapers (Kubernetes, Prometheus) reach these without a key.
pub const OPEN_PATHS: [&str; 3] = ["/v2/health/live", "/v2/health/ready", "/metrics"];

/// The key clients must present, kept as its SHA-256 digest: comparing digests in constant time
/// reveals neither the key's bytes nor its length through response timing.
pub struct ApiKey {
    digest: [u8; 32],
}

impl ApiKey {
    /// A key goes into an HTTP header, so it must be non-empty visible ASCII (no spaces).
    pub fn new(key: &str) -> Result<Self> {
        anyhow::ensure!(
            !key.is_empty(),
            "the key is empty (to serve without authentication, give no key at all)"
        );
        if let Some(bad) = key.chars().find(|c| !c.is_ascii_graphic()) {
            anyhow::bail!(
                "the key contains {bad:?}; a key sent as `Authorization: Bearer KEY` must be \
                 visible ASCII without spaces"
            );
        }
        Ok(Self {
            digest: Sha256::digest(key.as_bytes()).into(),
        })
    }

    fn accepts(&self, candidate: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        digest.ct_eq(&self.digest).into()
    }
}

/// Anyone who can reach a non-loopback address without a key can run the model.
pub fn warn_if_exposed(addr: SocketAddr, key: Option<&ApiKey>) {
    if key.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "serving on a non-loopback address without an API key: anyone who can reach it can \
             use the model (set --api-key or KILN_API_KEY)"
        );
    }
}

/// Middleware: 401 unless the request is to an open path or carries the key. With no key
/// configured every request passes.
pub async fn require_api_key(
    State(key): State<Option<Arc<ApiKey>>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(key) = key else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    if OPEN_PATHS.contains(&path) {
        return next.run(request).await;
    }
    let refusal = match request.headers().get(header::AUTHORIZATION) {
        None => Some("this server needs an API key: send the header `Authorization: Bearer KEY`"),
        Some(value) => match bearer_token(value) {
            None => Some("the Authorization header must be `Bearer KEY`"),
            Some(token) if key.accepts(token) => None,
            Some(_) => Some("the API key in the Authorization header is not valid"),
        },
    };
    match refusal {
        None => next.run(request).await,
        Some(message) => unauthorized(message, path == "/v1/completions"),
    }
}

/// The token of `Bearer TOKEN` (the scheme is case-insensitive, RFC 7235).
fn bearer_token(value: &HeaderValue) -> Option<&str> {
    let (scheme, token) = value.to_str().ok()?.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

fn unauthorized(message: &str, openai: bool) -> Response {
    let body = if openai {
        json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})
    } else {
        json!({"error": message})
    };
    let mut response = (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
        .extensions_mut()
        .insert(ErrorMessage(message.to_string()));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_must_be_visible_ascii() {
        assert!(ApiKey::new("").is_err());
        assert!(ApiKey::new("sk a").is_err());
        assert!(ApiKey::new("sk\n").is_err());
        assert!(ApiKey::new("clé").is_err());
        let key = ApiKey::new("sk-123").unwrap();
        assert!(key.accepts("sk-123"));
        assert!(!key.accepts("sk-12"));
        assert!(!key.accepts("sk-1234"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let token =
            |v: &'static str| bearer_token(&HeaderValue::from_static(v)).map(str::to_string);
        assert_eq!(token("Bearer k").as_deref(), Some("k"));
        assert_eq!(token("bearer  k").as_deref(), Some("k"));
        assert_eq!(token("Basic k"), None);
        assert_eq!(token("Bearer"), None);
    }
}
