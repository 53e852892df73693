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
            c.set(
                "ssl.key.password",
                secret_from_env(var, "kafka.tls.key_password_env")?,
            );
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

fn secret_from_env(var: &str, key: &str) -> Result<String, String> {
    std::env::var(var).map_err(|_| format!("{key}: environment variable {var} is not set"))
}
