//! Whether the brokers refuse a producer's credentials. librdkafka retries a failed TLS
//! handshake or SASL login for ever, and counts neither as fatal: without this, a node whose
//! certificate expired or whose password was rotated at the brokers would go on answering `202`
//! for records that can only expire, and stay ready.

use std::sync::atomic::{AtomicBool, Ordering};

use rdkafka::types::RDKafkaErrorCode;

/// A producer's view of its own credentials, from its error events and statistics.
#[derive(Debug, Default)]
pub struct Credentials {
    /// A TLS or SASL failure came since the last statistics that found a broker up.
    failed: AtomicBool,
    /// The last statistics found brokers, and none of them up. (Without statistics nothing is
    /// known, and nothing is refused: a failed handshake alone may be one broker's restart.)
    none_up: AtomicBool,
}

impl Credentials {
    /// Notes a client error event's code.
    pub fn error(&self, code: Option<RDKafkaErrorCode>) {
        // `Authentication`: a SASL login refused, or its mechanism. `SSL`: a handshake that
        // failed, or a broker certificate that did not verify.
        if matches!(
            code,
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)
        ) {
            self.failed.store(true, Ordering::Relaxed);
        }
    }

    /// Notes the statistics' broker states (librdkafka's names: `UP`, `DOWN`, `CONNECT`,
    /// `AUTH_HANDSHAKE`, ...).
    pub fn brokers<'a>(&self, states: impl Iterator<Item = &'a str>) {
        let (mut known, mut up) = (false, false);
        for state in states {
            known = true;
            up |= state == "UP";
        }
        if up {
            self.failed.store(false, Ordering::Relaxed);
        }
        self.none_up.store(known && !up, Ordering::Relaxed);
    }

    /// Whether the brokers refuse the credentials: a TLS or SASL failure, and no broker up
    /// since. Two loads on every request; the first is almost always false.
    pub fn refused(&self) -> bool {
        self.failed.load(Ordering::Relaxed) && self.none_up.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_only_with_a_credentials_error_and_no_broker_up() {
        let c = Credentials::default();
        // A cluster down alone is an outage, not a refusal.
        c.brokers(["DOWN", "CONNECT"].into_iter());
        assert!(!c.refused());
        c.error(Some(RDKafkaErrorCode::BrokerTransportFailure));
        c.error(Some(RDKafkaErrorCode::AllBrokersDown));
        assert!(!c.refused());
        c.error(Some(RDKafkaErrorCode::Authentication));
        assert!(c.refused());
        // One broker that refuses a handshake while another takes the producer: not refused.
        c.brokers(["UP", "AUTH_HANDSHAKE"].into_iter());
        c.error(Some(RDKafkaErrorCode::SSL));
        assert!(!c.refused());
        // The failure outlives the statistics until a broker is up again.
        c.brokers(["DOWN", "DOWN"].into_iter());
        assert!(c.refused());
        c.brokers(["DOWN", "DOWN"].into_iter());
        assert!(c.refused());
        c.brokers(["UP", "DOWN"].into_iter());
        c.brokers(["DOWN", "DOWN"].into_iter());
        assert!(!c.refused(), "a broker up since clears it");
        // No statistics yet, or none at all: nothing is known, nothing refused.
        let fresh = Credentials::default();
        fresh.error(Some(RDKafkaErrorCode::SSL));
        assert!(!fresh.refused());
        fresh.brokers(std::iter::empty());
        assert!(!fresh.refused());
    }
}
