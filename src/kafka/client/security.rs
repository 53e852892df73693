//! The Kafka side's security properties: TLS and SASL from `[kafka.tls]` and `[kafka.sasl]`,
//! secrets read from the environment or files, never from the config file itself.

use rdkafka::ClientConfig;

use crate::config::KafkaConfig;

/// `security.protocol` and the TLS and SASL properties, secrets read from env or files.
pub(super) fn security(kafka: &KafkaConfig, c: &mut ClientConfig) -> Result<(), String> {
    let protocol = match (&kafka.tls, &kafka.sasl) {
        (None, None) => "plaintext",
        (Some(_), None) => "ssl",
        (None, Some(_)) => "sasl_plaintext",
        (Some(_), Some(_)) => "sasl_ssl",
    };
    c.set("security.protocol", protocol);
    if let Some(tls) = &kafka.tls {
        check_tls_files(tls)?;
        let path = |p: &std::path::PathBuf| p.display().to_string();
        if let Some(ca) = &tls.ca_file {
            c.set("ssl.ca.location", path(ca));
        }
        if let Some(cert) = &tls.cert_file {
            c.set("ssl.certificate.location", path(cert));
        }
        if let Some(key) = &tls.key_file {
            c.set("ssl.key.location", path(key));
        }
        if let Some(var) = &tls.key_password_env {
            let password = secret_from_env(var, "kafka.tls.key_password_env")?;
            if password.is_empty() {
                return Err(format!(
                    "kafka.tls.key_password_env: environment variable {var} is empty"
                ));
            }
            c.set("ssl.key.password", password);
        }
        let check = if tls.skip_hostname_check {
            "none"
        } else {
            "https"
        };
        c.set("ssl.endpoint.identification.algorithm", check);
    }
    if let Some(sasl) = &kafka.sasl {
        use crate::config::SaslMechanism as M;
        let mechanism = match sasl.mechanism {
            M::Plain => "PLAIN",
            M::ScramSha256 => "SCRAM-SHA-256",
            M::ScramSha512 => "SCRAM-SHA-512",
        };
        let password = match (&sasl.password_env, &sasl.password_file) {
            (Some(var), None) => secret_from_env(var, "kafka.sasl.password_env")?,
            (None, Some(file)) => std::fs::read_to_string(file)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|e| format!("kafka.sasl.password_file {}: {e}", file.display()))?,
            _ => {
                return Err("kafka.sasl: set exactly one of password_env and password_file".into());
            }
        };
        // Found out only as failed logins at the brokers otherwise.
        if password.is_empty() {
            return Err("kafka.sasl: the password is empty".into());
        }
        if matches!(sasl.mechanism, M::Plain) && kafka.tls.is_none() {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                tracing::warn!("kafka.sasl PLAIN without [kafka.tls]: the password goes to the brokers in clear");
            });
        }
        c.set("sasl.mechanisms", mechanism)
            .set("sasl.username", &sasl.username)
            .set("sasl.password", password);
    }
    Ok(())
}

/// The `[kafka.tls]` files, checked here so that a mistake is named by its setting and path:
/// librdkafka names only its own property, with OpenSSL's words (`system lib`, `PEM lib`). It
/// reads them only when a producer starts.
fn check_tls_files(tls: &crate::config::KafkaTlsConfig) -> Result<(), String> {
    // Without its key a certificate is not presented at all, and the brokers that require one
    // only close the connection: nothing would point at the missing setting.
    match (&tls.cert_file, &tls.key_file) {
        (Some(_), None) => return Err("kafka.tls.cert_file needs kafka.tls.key_file".into()),
        (None, Some(_)) => return Err("kafka.tls.key_file needs kafka.tls.cert_file".into()),
        _ => {}
    }
    if tls.key_password_env.is_some() && tls.key_file.is_none() {
        return Err("kafka.tls.key_password_env needs kafka.tls.key_file".into());
    }
    for (key, path) in [
        ("ca_file", &tls.ca_file),
        ("cert_file", &tls.cert_file),
        ("key_file", &tls.key_file),
    ] {
        let Some(path) = path else { continue };
        let pem =
            std::fs::read(path).map_err(|e| format!("kafka.tls.{key}: {}: {e}", path.display()))?;
        if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
            return Err(format!(
                "kafka.tls.{key}: {} holds no PEM block (-----BEGIN ...)",
                path.display()
            ));
        }
    }
    Ok(())
}

fn secret_from_env(var: &str, key: &str) -> Result<String, String> {
    std::env::var(var).map_err(|_| format!("{key}: environment variable {var} is not set"))
}
