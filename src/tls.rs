//! The certificates HTTPS clients (the Hub, MLflow) trust: Mozilla's roots, and as well those of
//! the system's store (`/etc/ssl/certs`, or `SSL_CERT_FILE` / `SSL_CERT_DIR` when set), so that
//! a server behind a company's private CA works as it does for curl and Python.

use std::sync::OnceLock;

use ureq::tls::{Certificate, RootCerts, TlsConfig};

/// The TLS settings every agent uses.
pub(crate) fn config() -> TlsConfig {
    TlsConfig::builder().root_certs(roots().clone()).build()
}

fn roots() -> &'static RootCerts {
    static ROOTS: OnceLock<RootCerts> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mozilla = webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .map(|der| Certificate::from_der(der.as_ref()).to_owned());
        // A store that cannot be read (a minimal container) leaves Mozilla's roots; unreadable
        // files in it are skipped, as curl skips them.
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::debug!("system certificate store: {error}");
        }
        let system = native
            .certs
            .into_iter()
            .map(|der| Certificate::from_der(der.as_ref()).to_owned());
        RootCerts::new_with_certs(&mozilla.chain(system).collect::<Vec<_>>())
    })
}
