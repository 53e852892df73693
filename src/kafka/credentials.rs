//! Whether the brokers refuse a producer's credentials. librdkafka retries a failed TLS
//! handshake or SASL login for ever, and counts neither as fatal: without this, a node whose
//! certificate expired or whose password was rotated at the brokers would go on answering `202`
//! for records that can only expire, and stay ready.

use std::sync::atomic::{AtomicBool, Ordering};

use rdkafka::types::RDKafkaErrorCode;

/// A producer's view of its own credentials, from its error events and statistics.
#[derive(Debug)]
pub struct Credentials {
    /// A refusal came since the last statistics that found a broker up.
    failed: AtomicBool,
    /// The last statistics found brokers, and none of them up. (Without statistics nothing is
    /// known, and nothing is refused.)
    none_up: AtomicBool,
    /// What was last logged: refused or not.
    logged: AtomicBool,
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            failed: AtomicBool::new(false),
            none_up: AtomicBool::new(false),
            logged: AtomicBool::new(false),
        }
    }
}

impl Credentials {
    /// Notes a client error event.
    pub fn error(&self, code: Option<RDKafkaErrorCode>, reason: &str) {
        if refusal(code, reason) {
            self.failed.store(true, Ordering::Relaxed);
        }
    }

    /// Notes the statistics' broker states (librdkafka's names: `UP`, `DOWN`, `CONNECT`,
    /// `AUTH_HANDSHAKE`, ...).
    pub fn brokers<'a>(&self, states: impl Iterator<Item = &'a str>) {
        let (mut known, mut up) = (false, false);
        for state in states {
            known = true;
            // The states librdkafka counts as up.
            up |= matches!(state, "UP" | "UPDATE" | "REAUTH");
        }
        if up {
            self.failed.store(false, Ordering::Relaxed);
        }
        self.none_up.store(known && !up, Ordering::Relaxed);
    }

    /// Whether the brokers refuse the credentials: a refusal, and none up at the last
    /// statistics since. (librdkafka reports a broker's same error again only after 30 s: a
    /// refusal that comes back after a moment up shows again within that.) The first load is
    /// almost always false.
    pub fn refused(&self) -> bool {
        self.none_up.load(Ordering::Relaxed) && self.failed.load(Ordering::Relaxed)
    }

    /// Whether [`Credentials::refused`] changed since the last call: `Some(now)` once per
    /// change, for one log line each way.
    pub fn changed(&self) -> Option<bool> {
        let now = self.refused();
        (self.logged.swap(now, Ordering::Relaxed) != now).then_some(now)
    }
}

/// Whether an error event says the brokers refuse the credentials, as opposed to failing to
/// talk at all. librdkafka gives the same codes to both: `Authentication` to a SASL handshake
/// that timed out, `SSL` to a connection reset mid-handshake. Those must not take a node out of
/// service in an ordinary outage; only what a broker (or the certificate check) says does.
/// Under TLS 1.3 a broker refuses a client certificate after the client's side of the
/// handshake is done: its alert comes as a transport failure.
fn refusal(code: Option<RDKafkaErrorCode>, reason: &str) -> bool {
    const REFUSED: [&str; 12] = [
        // The broker's certificate, checked here.
        "certificate verify failed",
        "failed to verify broker certificate",
        "did not provide a certificate",
        // A TLS alert from the broker: a client certificate it does not take (bad, unknown
        // CA, expired, revoked, required, unsupported), or a handshake it refuses.
        "alert bad certificate",
        "alert certificate",
        "alert unknown ca",
        "alert access denied",
        "alert unsupported certificate",
        "alert handshake failure",
        // The broker's SASL answers.
        "authentication failed",
        "authentication error",
        "unsupported sasl mechanism",
    ];
    let alert_only = match code {
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL) => false,
        Some(RDKafkaErrorCode::BrokerTransportFailure) => true,
        _ => return false,
    };
    let reason = reason.to_ascii_lowercase();
    REFUSED
        .iter()
        .filter(|marker| !alert_only || marker.starts_with("alert"))
        .any(|marker| reason.contains(marker))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BAD_CA: &str = "ssl://127.0.0.1:9093/bootstrap: SSL handshake failed: \
        error:0A000086:SSL routines::certificate verify failed: broker certificate could not be \
        verified, verify that ssl.ca.location is correctly configured (after 3ms in state \
        SSL_HANDSHAKE)";

    #[test]
    fn refused_only_with_a_credentials_error_and_no_broker_up() {
        use RDKafkaErrorCode as E;
        let c = Credentials::default();
        // A cluster down alone is an outage, not a refusal.
        c.brokers(["DOWN", "CONNECT"].into_iter());
        assert!(!c.refused());
        c.error(Some(E::BrokerTransportFailure), "Connection refused");
        c.error(Some(E::AllBrokersDown), "3/3 brokers are down");
        // The same codes for a failure to talk: a timeout, a reset mid-handshake.
        c.error(
            Some(E::Authentication),
            "SASL SCRAM-SHA-256 mechanism handshake failed: Local: Timed out: broker's supported mechanisms: ",
        );
        c.error(
            Some(E::SSL),
            "SSL transport error: Connection reset by peer (after 2ms in state SSL_HANDSHAKE)",
        );
        assert!(!c.refused());
        assert_eq!(c.changed(), None);
        c.error(Some(E::SSL), BAD_CA);
        assert!(c.refused());
        assert_eq!((c.changed(), c.changed()), (Some(true), None));
        // One broker that refuses a handshake while another takes the producer: not refused.
        c.brokers(["UP", "AUTH_HANDSHAKE"].into_iter());
        assert!(!c.refused());
        assert_eq!(c.changed(), Some(false));
        // A broker up since the refusal: an outage now is only an outage, until a refusal
        // comes again.
        c.brokers(["DOWN", "DOWN"].into_iter());
        assert!(!c.refused());
        c.error(
            Some(E::Authentication),
            "SASL authentication error: Authentication failed: Invalid username or password",
        );
        assert!(c.refused());
        // The states librdkafka counts as up.
        for up in ["UPDATE", "REAUTH"] {
            c.brokers([up].into_iter());
            assert!(!c.refused(), "{up}");
        }
        // Without statistics nothing is known, and nothing refused.
        let fresh = Credentials::default();
        fresh.error(Some(E::SSL), BAD_CA);
        fresh.brokers(std::iter::empty());
        assert!(!fresh.refused());
    }

    #[test]
    fn the_brokers_own_refusals_are_told_from_failures_to_talk() {
        use RDKafkaErrorCode as E;
        for reason in [
            BAD_CA,
            "SSL handshake failed: ssl/record/rec_layer_s3.c:1586: error:0A000418:SSL routines::tlsv1 alert unknown ca",
            "SSL handshake failed: error:0A000415:SSL routines::sslv3 alert certificate expired",
            "SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-256",
            "SASL PLAIN mechanism handshake failed: Broker: Unsupported SASL mechanism: broker's supported mechanisms: SCRAM-SHA-512",
        ] {
            assert!(
                refusal(Some(E::SSL), reason) || refusal(Some(E::Authentication), reason),
                "{reason}"
            );
        }
        // TLS 1.3: the broker's refusal of the client certificate, after the handshake.
        assert!(refusal(
            Some(E::BrokerTransportFailure),
            "ssl://b:9093/1: error:0A000414:SSL routines::sslv3 alert certificate revoked: SSL \
             alert number 44 (after 0ms in state APIVERSION_QUERY)"
        ));
        assert!(!refusal(Some(E::BrokerTransportFailure), BAD_CA));
        assert!(!refusal(
            Some(E::BrokerTransportFailure),
            "Connection refused"
        ));
        assert!(!refusal(
            Some(E::SSL),
            "SSL handshake failed: error:0A00010B:SSL routines::wrong version number"
        ));
        assert!(!refusal(Some(E::SSL), "SSL transport error: Broken pipe"));
    }
}
