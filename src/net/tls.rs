//! TLS client settings: server verification is always on; trust either the system store or
//! one CA file; optionally present a client certificate (mTLS).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use std::path::Path;
use std::sync::Arc;

pub struct TlsFiles<'a> {
    pub ca_file: Option<&'a Path>,
    pub cert_file: Option<&'a Path>,
    pub key_file: Option<&'a Path>,
}

pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(trusted_certs("broker.ca_file", files.ca_file)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots);
    let config = match (files.cert_file, files.key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certs("broker.cert_file", cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("broker.key_file: {}: no usable private key: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("broker.cert_file and broker.key_file: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The certificates in the PEM file `path`, the value of config key `key` (named in errors).
fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let fail = |why: String| format!("{key}: {}: {why}", path.display());
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| fail(e.to_string()))?;
    if certs.is_empty() {
        return Err(fail("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// The CA certificates to trust: every one in `ca_file`, the value of config key `ca_key`
/// (named in errors: a certificate that is not a usable CA is one), else the usable ones of
/// the system store (none is an error that says to set `ca_key`).
pub fn trusted_certs(ca_key: &str, ca_file: Option<&Path>) -> Result<Vec<CertificateDer<'static>>, String> {
    let usable = |cert: &CertificateDer<'static>| RootCertStore::empty().add(cert.clone());
    let Some(path) = ca_file else {
        let found = rustls_native_certs::load_native_certs();
        let certs: Vec<_> = found.certs.into_iter().filter(|cert| usable(cert).is_ok()).collect();
        if certs.is_empty() {
            let why = found.errors.first().map(|e| format!(": {e}")).unwrap_or_default();
            return Err(format!("no trusted CA certificates in the system store{why}; set {ca_key}"));
        }
        return Ok(certs);
    };
    let certs = read_certs(ca_key, path)?;
    for cert in &certs {
        usable(cert).map_err(|e| format!("{ca_key}: {}: {e}", path.display()))?;
    }
    Ok(certs)
}

/// The TLS error an I/O error wraps, if any (rustls reports through `io::Error`).
pub fn error_in(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// Whether the broker's certificate failed verification (unknown CA, wrong host name, expired...):
/// trying again does not help until the settings, the broker or the clock change.
pub fn is_certificate_rejection(err: &rustls::Error) -> bool {
    matches!(err, rustls::Error::InvalidCertificate(_))
}

/// Says in words why a TLS connection to the broker failed; rustls' own texts name the cause
/// but not the fix.
pub fn describe_error(err: &rustls::Error) -> String {
    describe_error_of(err, "broker", "broker.ca_file")
}

/// `describe_error` for a connection to `server` ("broker", "download server"), whose CA
/// certificates come from config key `ca_key`.
pub fn describe_error_of(err: &rustls::Error, server: &str, ca_key: &str) -> String {
    use rustls::CertificateError as C;
    match err {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            format!("TLS: server certificate is signed by an unknown CA (UnknownIssuer): check {ca_key}")
        }
        rustls::Error::InvalidCertificate(C::NotValidForName)
        | rustls::Error::InvalidCertificate(C::NotValidForNameContext { .. }) => {
            format!("TLS: server certificate is not valid for the {server}'s host name (NotValidForName)")
        }
        rustls::Error::InvalidCertificate(C::Expired)
        | rustls::Error::InvalidCertificate(C::ExpiredContext { .. }) => {
            "TLS: server certificate has expired (or the device clock is wrong)".into()
        }
        rustls::Error::AlertReceived(alert) => {
            let name = alert.as_str().map_or_else(|| format!("number {}", u8::from(*alert)), str::to_string);
            format!(
                "TLS: the {server} refused the handshake (alert {name}); does it require a client certificate?"
            )
        }
        other => format!("TLS: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::describe_error;
    use rustls::AlertDescription;

    #[test]
    fn a_refused_handshake_names_the_alert() {
        let refused = |alert| describe_error(&rustls::Error::AlertReceived(alert));
        assert_eq!(
            refused(AlertDescription::CertificateRequired),
            "TLS: the broker refused the handshake (alert CertificateRequired); does it require a client \
             certificate?"
        );
        assert!(refused(AlertDescription::Unknown(200)).contains("(alert number 200)"));
    }
}
