//! HTTPS on the listener (rustls, ring): certificate and key from PEM files, re-read on SIGHUP;
//! with a client CA, mutual TLS, where the client certificate's subject can stand for an API key.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

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
    /// The leaf certificate in force, to compare a reloaded one with.
    leaf: Mutex<CertificateDer<'static>>,
    /// SIGHUPs from the moment the files were read, for [`Tls::spawn_watch`]: one that comes
    /// while the node is still starting (a long spool recovery) is not missed. (None outside
    /// a runtime, as in `check-config`.)
    hangups: Mutex<Option<crate::shutdown::Hangups>>,
}

impl Tls {
    /// Reads the files; errors name the file.
    pub fn load(files: &TlsConfig) -> Result<Tls, String> {
        let hangups = tokio::runtime::Handle::try_current()
            .ok()
            .map(|_| crate::shutdown::hangups());
        let (config, leaf) = build(files)?;
        warn_if_not_valid_now(&files.cert, &leaf);
        Ok(Tls {
            files: files.clone(),
            current: RwLock::new(Arc::new(config)),
            leaf: Mutex::new(leaf),
            hangups: Mutex::new(hangups),
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

    /// Re-reads the files; on error the settings in force stay. So do they when the new
    /// certificate has expired and the one in force has not (a backup restored by mistake):
    /// every client would refuse the new one. One not valid yet is taken, with a warning:
    /// clients judge that by their own clocks, and no other SIGHUP may come.
    pub fn reload(&self) -> Result<(), String> {
        let (config, leaf) = build(&self.files)?;
        let mut current_leaf = self.leaf.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(true), Some(false)) = (expired(&leaf), expired(&current_leaf)) {
            return Err(format!(
                "server.tls.cert {}: expired, and the one in force has not",
                self.files.cert.display()
            ));
        }
        warn_if_not_valid_now(&self.files.cert, &leaf);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        *current_leaf = leaf;
        Ok(())
    }

    /// Re-reads the files on every SIGHUP, for as long as the settings are in use.
    pub fn spawn_watch(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let early = self
            .hangups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let mut hangups = early.unwrap_or_else(crate::shutdown::hangups);
        tokio::spawn(async move {
            loop {
                hangups.next().await;
                let Some(tls) = weak.upgrade() else { return };
                // Off the async workers: a file on a mount that hangs would hold one.
                match tokio::task::spawn_blocking(move || tls.reload()).await {
                    Ok(Ok(())) => tracing::info!("TLS certificate reloaded"),
                    Ok(Err(error)) => {
                        tracing::error!(%error, "TLS certificate not reloaded; the previous one stays")
                    }
                    Err(_) => return,
                }
            }
        });
    }
}

/// The settings from the files, and the leaf certificate.
fn build(files: &TlsConfig) -> Result<(ServerConfig, CertificateDer<'static>), String> {
    let certs = read_certs(&files.cert).map_err(|e| format!("server.tls.cert {e}"))?;
    // `read_certs` found at least one.
    let leaf = certs[0].clone();
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        // Its own PEM label, which the reader skips: it would say only "no items found".
        let encrypted =
            std::fs::read(&files.key).is_ok_and(|pem| pem.windows(9).any(|w| w == b"ENCRYPTED"));
        let e = match encrypted {
            true => "an encrypted key; decrypt it (openssl pkey -in KEY -out PLAIN)".to_string(),
            false => e.to_string(),
        };
        format!("server.tls.key {}: {e}", files.key.display())
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("server.tls: {e}"))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca).map_err(|e| format!("server.tls.client_ca {e}"))? {
                if let Some(why) = not_an_issuer(&cert) {
                    return Err(format!("server.tls.client_ca {}: {why}", ca.display()));
                }
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
    // A resumed session skips the client certificate's verification: a certificate that has
    // expired since, or that a new `client_ca` no longer admits, would go on working through
    // a session cached while it was good. With client certificates, every connection makes a
    // full handshake.
    if files.client_ca.is_some() {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok((config, leaf))
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

/// Says so when the leaf certificate is expired or not valid yet: every client would refuse
/// it. (Served all the same at a start, where nothing else could be, and at a reload when the
/// one in force is no better.)
fn warn_if_not_valid_now(path: &Path, leaf: &CertificateDer<'_>) {
    if let Some(why) = not_valid_now(leaf) {
        tracing::warn!(cert = %path.display(), "server.tls.cert {why}: clients will refuse it");
    }
}

/// Why `cert`, in `client_ca`, may not issue client certificates, if it may not: rustls takes
/// any certificate there as a trust anchor, so a client's own certificate pinned there (marked
/// not a CA) would let its holder sign a certificate with any other client's subject, and be
/// that client. (One x509-parser cannot read is left to rustls.)
fn not_an_issuer(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = parsed.subject().to_string();
    let why = |what: &str| format!("{subject} {what}; list the CA that issues client certificates");
    // Either extension unreadable is refused too: webpki does not read them in an anchor, and
    // x509-parser reports an unreadable basic constraints as none.
    use x509_parser::extensions::ParsedExtension;
    use x509_parser::oid_registry::{OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_KEY_USAGE};
    let unreadable = parsed.basic_constraints().is_err()
        || parsed.key_usage().is_err()
        || parsed.extensions().iter().any(|e| {
            (e.oid == OID_X509_EXT_BASIC_CONSTRAINTS || e.oid == OID_X509_EXT_KEY_USAGE)
                && matches!(e.parsed_extension(), ParsedExtension::ParseError { .. })
        });
    if unreadable {
        return Some(why(
            "has basic constraints or a key usage that cannot be read",
        ));
    }
    if let Ok(Some(basic)) = parsed.basic_constraints()
        && !basic.value.ca
    {
        return Some(why("is marked not a CA (CA:FALSE)"));
    }
    if let Ok(Some(usage)) = parsed.key_usage()
        && !usage.value.key_cert_sign()
    {
        return Some(why("may not sign certificates (no keyCertSign)"));
    }
    None
}

/// Whether `leaf`'s validity has ended; `None` when x509-parser cannot read it.
fn expired(leaf: &CertificateDer<'_>) -> Option<bool> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(parsed.validity().not_after < x509_parser::time::ASN1Time::now())
}

/// Why `leaf` is not valid now, if it is not (one x509-parser cannot read is left to rustls).
fn not_valid_now(leaf: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let validity = parsed.validity();
    (!validity.is_valid()).then(|| {
        format!(
            "is not valid now (not before {}, not after {})",
            validity.not_before, validity.not_after
        )
    })
}

/// The subject of a verified client certificate as text: attributes in certificate order
/// joined by `", "` (and `" + "` within a multi-valued one), e.g. `C=DE, O=Acme, CN=partner-a`,
/// as x509-parser prints plain names. Unlike its printing, values are escaped as RFC 4514 says
/// (`CN=a\, O=b` is one attribute), so no two subjects read the same; a subject with a value
/// that is not text has none (it cannot stand for a key).
pub fn client_subject(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::objects::{oid_registry, oid2abbrev};
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let mut out = String::new();
    for (i, rdn) in parsed.subject().iter_rdn().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        for (j, attr) in rdn.iter().enumerate() {
            if j > 0 {
                out.push_str(" + ");
            }
            match oid2abbrev(attr.attr_type(), oid_registry()) {
                Ok(name) => out.push_str(name),
                // As x509-parser prints it: `OID(1.2.3)`.
                Err(_) => out.push_str(&format!("{:?}", attr.attr_type())),
            }
            out.push('=');
            escape_dn_value(&attribute_text(attr)?, &mut out);
        }
    }
    Some(out)
}

/// An attribute's value as text: the string types x509-parser reads, BMPString (UTF-16), and
/// the older ASCII-only types (VisibleString, T61String) when their bytes are UTF-8.
fn attribute_text(attr: &x509_parser::x509::AttributeTypeAndValue<'_>) -> Option<String> {
    if let Ok(text) = attr.as_str() {
        return Some(text.to_string());
    }
    use x509_parser::asn1_rs::Tag;
    let value = attr.attr_value();
    let bytes: &[u8] = value.data;
    match value.tag() {
        Tag::BmpString => {
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()
        }
        Tag::VisibleString | Tag::T61String | Tag::GeneralString | Tag::GraphicString => {
            std::str::from_utf8(bytes).ok().map(str::to_string)
        }
        _ => None,
    }
}

/// RFC 4514's escaping of an attribute value.
fn escape_dn_value(value: &str, out: &mut String) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let edge = (i == 0 && (c == '#' || c == ' ')) || (i == last && c == ' ');
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' => {
                out.push('\\');
                out.push(c);
            }
            '\0' => out.push_str("\\00"),
            _ if edge => {
                out.push('\\');
                out.push(c);
            }
            _ => out.push(c),
        }
    }
}

#[cfg(test)]
mod subject_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

    fn subject_of(attributes: &[(DnType, &str)]) -> Option<String> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut name = DistinguishedName::new();
        for (kind, value) in attributes {
            name.push(kind.clone(), *value);
        }
        params.distinguished_name = name;
        let cert = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
        client_subject(cert.der())
    }

    #[test]
    fn subjects_print_plainly_and_never_alike() {
        let plain = subject_of(&[
            (DnType::CountryName, "DE"),
            (DnType::OrganizationName, "Acme"),
            (DnType::CommonName, "partner-a"),
        ]);
        assert_eq!(plain.as_deref(), Some("C=DE, O=Acme, CN=partner-a"));
        let two = subject_of(&[
            (DnType::CommonName, "partner-a"),
            (DnType::OrganizationName, "Acme"),
        ]);
        let one = subject_of(&[(DnType::CommonName, "partner-a, O=Acme")]);
        assert_eq!(two.as_deref(), Some("CN=partner-a, O=Acme"));
        assert_eq!(one.as_deref(), Some("CN=partner-a\\, O=Acme"));
        let edges = subject_of(&[(DnType::CommonName, " #a+b\\c;<d>\"e ")]);
        assert_eq!(
            edges.as_deref(),
            Some("CN=\\ #a\\+b\\\\c\\;\\<d\\>\\\"e\\ ")
        );
    }
}

#[cfg(test)]
mod reload_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rcgen::{CertificateParams, KeyPair, date_time_ymd};

    /// Writes a self-signed certificate for localhost (valid from `from` to `to`, years) and its
    /// key to the files of `files`.
    fn write(files: &TlsConfig, from: i32, to: i32) {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_before = date_time_ymd(from, 1, 1);
        params.not_after = date_time_ymd(to, 1, 1);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
    }

    #[test]
    fn a_reload_keeps_a_certificate_in_force_over_an_expired_one() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsConfig {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            client_ca: None,
        };
        write(&files, 2020, 4000);
        let tls = Tls::load(&files).unwrap();
        // Expired: refused while the one in force has not.
        write(&files, 2000, 2001);
        let error = tls.reload().unwrap_err();
        assert!(error.contains("expired"), "{error}");
        // Not valid yet by this clock: taken (clients have their own).
        write(&files, 3900, 4000);
        assert!(tls.reload().is_ok());
        write(&files, 2021, 4000);
        assert!(tls.reload().is_ok());
        // A key kafboy cannot read without a passphrase says so.
        let pem =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n";
        std::fs::write(&files.key, pem).unwrap();
        let error = tls.reload().unwrap_err();
        assert!(error.contains("an encrypted key"), "{error}");
    }
}

#[cfg(test)]
mod resumption_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use rustls::client::ClientConnection;
    use rustls::server::ServerConnection;
    use rustls::{ClientConfig, Connection, HandshakeKind};

    /// A CA's files (server certificate for localhost, its key, the CA as `client_ca` when
    /// `mtls`) and a client that trusts it and shows a certificate it issued.
    fn setup(dir: &Path, mtls: bool) -> (TlsConfig, Arc<ClientConfig>) {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issue = |san: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let params = CertificateParams::new(san).unwrap();
            (params.signed_by(&key, &ca, &ca_key).unwrap(), key)
        };
        let (server, server_key) = issue(vec!["localhost".into()]);
        let (client, client_key) = issue(vec![]);
        let files = TlsConfig {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            client_ca: mtls.then(|| dir.join("ca.pem")),
        };
        std::fs::write(&files.cert, server.pem()).unwrap();
        std::fs::write(&files.key, server_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let key = PrivateKeyDer::try_from(client_key.serialize_der()).unwrap();
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(vec![client.der().clone()], key)
                .unwrap();
        (files, Arc::new(config))
    }

    /// A handshake in memory, with the session tickets that follow it: how it went.
    fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> HandshakeKind {
        let name = "localhost".try_into().unwrap();
        let mut c = Connection::from(ClientConnection::new(client.clone(), name).unwrap());
        let mut s = Connection::from(ServerConnection::new(server.clone()).unwrap());
        while c.wants_write() || s.wants_write() {
            pass(&mut c, &mut s);
            pass(&mut s, &mut c);
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        s.handshake_kind().unwrap()
    }

    /// What `from` has to send, read by `to`.
    fn pass(from: &mut Connection, to: &mut Connection) {
        let mut bytes = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut bytes).unwrap();
        }
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).unwrap();
            to.process_new_packets().unwrap();
        }
    }

    #[test]
    fn with_client_certificates_no_session_is_resumed() {
        for (mtls, second) in [(false, HandshakeKind::Resumed), (true, HandshakeKind::Full)] {
            let dir = tempfile::tempdir().unwrap();
            let (files, client) = setup(dir.path(), mtls);
            let server = Arc::new(build(&files).unwrap().0);
            assert_eq!(handshake(&server, &client), HandshakeKind::Full);
            assert_eq!(handshake(&server, &client), second, "client_ca: {mtls}");
        }
    }

    #[test]
    fn a_certificate_that_may_not_issue_is_no_client_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = setup(dir.path(), true);
        // A client's own certificate, pinned: marked not a CA, or not to sign certificates.
        // A key usage that is no bit string: unreadable, so not known to allow signing.
        let unreadable =
            rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x04, 0x01, 0x00]);
        for (ca, usages, custom) in [
            (IsCa::ExplicitNoCa, vec![], vec![]),
            (
                IsCa::Ca(BasicConstraints::Unconstrained),
                vec![rcgen::KeyUsagePurpose::DigitalSignature],
                vec![],
            ),
            (
                IsCa::Ca(BasicConstraints::Unconstrained),
                vec![],
                vec![unreadable],
            ),
        ] {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = ca;
            params.key_usages = usages;
            params.custom_extensions = custom;
            params
                .distinguished_name
                .push(DnType::CommonName, "partner-b");
            let pinned = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
            let ca_pem = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
            let bundle = dir.path().join("bundle.pem");
            std::fs::write(&bundle, format!("{ca_pem}{}", pinned.pem())).unwrap();
            let files = TlsConfig {
                client_ca: Some(bundle),
                ..files.clone()
            };
            let error = build(&files).err().unwrap_or_default();
            assert!(error.contains("CN=partner-b"), "{error}");
        }
        // The CA itself is one.
        assert!(build(&files).is_ok());
    }
}
