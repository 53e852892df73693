//! HTTPS on the listener (rustls, ring): certificate and key from PEM files, re-read on SIGHUP;
//! with a client CA, mutual TLS, where the client certificate's subject can stand for an API key.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// The TLS settings in force; replaced whole on reload.
pub struct Tls {
    files: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// Reads the files; errors name the file.
    pub fn load(files: &TlsConfig) -> Result<Tls, String> {
        let config = build(files)?;
        Ok(Tls {
            files: files.clone(),
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// An acceptor with the settings in force.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    /// Re-reads the files; on error the settings in force stay.
    pub fn reload(&self) -> Result<(), String> {
        let config = build(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        Ok(())
    }

    /// Re-reads the files on every SIGHUP, for as long as the settings are in use.
    pub fn spawn_watch(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut hangups = crate::shutdown::hangups();
            loop {
                hangups.next().await;
                let Some(tls) = weak.upgrade() else { return };
                match tls.reload() {
                    Ok(()) => tracing::info!("TLS certificate reloaded"),
                    Err(error) => {
                        tracing::error!(%error, "TLS certificate not reloaded; the previous one stays")
                    }
                }
            }
        });
    }
}

fn build(files: &TlsConfig) -> Result<ServerConfig, String> {
    let certs = read_certs(&files.cert).map_err(|e| format!("server.tls.cert {e}"))?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("server.tls.key {}: {e}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("server.tls: {e}"))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca).map_err(|e| format!("server.tls.client_ca {e}"))? {
                roots
                    .add(cert)
                    .map_err(|e| format!("server.tls.client_ca {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("server.tls.client_ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("server.tls: certificate and key do not fit: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

/// The subject of a verified client certificate, as x509-parser prints it: attributes in
/// certificate order joined by `", "`, e.g. `C=DE, O=Acme, CN=partner-a`.
pub fn client_subject(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.subject().to_string())
}
