//! API keys and rate limits. Keys are configured by their SHA-256 digest, never in clear; a
//! presented key is hashed and compared against every configured digest in constant time, so
//! neither the position of the first differing byte nor which key matched shows in the timing.
//! Each key names the topics and modes it may use and may carry its own token bucket.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderName};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Mode;
use crate::routes::Allowlist;

mod bucket;
mod keys;

pub use bucket::Bucket;
pub(crate) use keys::elided;
pub use keys::{Keys, spawn_watch};

/// One API key as configured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Name, for logs and error messages.
    pub name: String,
    /// Hex SHA-256 of the key (`kafboy hash-key` prints one). Optional when the key is a client
    /// certificate subject only.
    #[serde(default)]
    pub sha256: Option<String>,
    /// With mTLS: a client certificate with this subject (e.g. `CN=partner-a`) is this key.
    #[serde(default)]
    pub client_cert_subject: Option<String>,
    /// Topics it may write: exact names and `prefix*`. Required; empty: none.
    pub topics: Vec<String>,
    /// Modes it may use. Empty: all.
    #[serde(default)]
    pub modes: Vec<Mode>,
    /// Its own limit in requests per second. Default: none.
    #[serde(default)]
    pub rate: Option<f64>,
    /// Requests it may send at once above the rate. Default: one second's worth.
    #[serde(default)]
    pub burst: Option<f64>,
}

/// A key ready to check requests against.
#[derive(Debug)]
pub struct Key {
    /// Its name.
    pub name: String,
    digest: Option<[u8; 32]>,
    subject: Option<String>,
    topics: Allowlist,
    modes: Vec<Mode>,
    bucket: Option<Bucket>,
}

/// Why a request was not let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// 401: no key, or not a key we know.
    Unauthenticated(&'static str),
    /// 403: a known key that may not do this.
    Forbidden(String),
    /// 429: over a rate limit; retry after this many seconds.
    Limited(u64),
}

/// The set of keys in force; replaced whole on reload.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<Arc<Key>>,
}

impl KeySet {
    /// Builds keys from config; errors name the entry. `mtls`: whether clients present
    /// certificates, without which a key by certificate subject could never match.
    pub fn new(configs: &[KeyConfig], mtls: bool) -> Result<KeySet, String> {
        let keys: Vec<Arc<Key>> = configs
            .iter()
            .enumerate()
            .map(|(i, k)| {
                Key::new(k, mtls)
                    .map(Arc::new)
                    .map_err(|e| format!("keys[{i}] ({}): {e}", k.name))
            })
            .collect::<Result<_, _>>()?;
        // Two keys with one identity: which one a request gets would be an accident of order.
        for (i, key) in keys.iter().enumerate() {
            let clash = keys[..i].iter().find(|k| {
                (key.digest.is_some() && k.digest == key.digest)
                    || (key.subject.is_some() && k.subject == key.subject)
            });
            if let Some(other) = clash {
                // By name: the two may come from `[[auth.keys]]` and the key file.
                return Err(format!(
                    "key {} has the same sha256 or client_cert_subject as key {}",
                    key.name, other.name
                ));
            }
        }
        Ok(KeySet { keys })
    }

    /// Carries each key's rate-limit state over from `old`, where the same key (by digest or
    /// certificate subject) was in force.
    pub fn carry_buckets(&self, old: &KeySet) {
        for key in &self.keys {
            let Some(bucket) = &key.bucket else { continue };
            let same = old.keys.iter().find(|k| {
                (key.digest.is_some() && k.digest == key.digest)
                    || (key.subject.is_some() && k.subject == key.subject)
            });
            if let Some(old_bucket) = same.and_then(|k| k.bucket.as_ref()) {
                bucket.carry_from(old_bucket);
            }
        }
    }

    /// The key whose digest matches `presented`. Every configured digest is compared, whatever
    /// matched earlier, each comparison in constant time.
    pub fn find(&self, presented: &[u8]) -> Option<Arc<Key>> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = None;
        for key in &self.keys {
            let Some(d) = &key.digest else { continue };
            if bool::from(d.ct_eq(&digest)) {
                found = Some(key);
            }
        }
        found.cloned()
    }

    /// The key a client certificate subject stands for.
    pub fn by_subject(&self, subject: &str) -> Option<Arc<Key>> {
        self.keys
            .iter()
            .find(|k| k.subject.as_deref() == Some(subject))
            .cloned()
    }
}

impl Key {
    fn new(c: &KeyConfig, mtls: bool) -> Result<Key, String> {
        let digest = match &c.sha256 {
            Some(hex) => Some(parse_hex32(hex).ok_or("sha256 must be 64 hex digits")?),
            None => None,
        };
        if digest.is_some_and(|d| d == <[u8; 32]>::from(Sha256::digest(b""))) {
            // What hashing an unset variable gives; an empty key is no key.
            return Err("sha256 is the digest of the empty string".into());
        }
        match c.client_cert_subject.as_deref() {
            None if digest.is_none() => return Err("needs sha256 or client_cert_subject".into()),
            Some("") => return Err("client_cert_subject is empty".into()),
            Some(_) if !mtls => {
                return Err("client_cert_subject needs server.tls.client_ca (mTLS)".into());
            }
            _ => {}
        }
        let bucket = match (c.rate, c.burst) {
            (Some(rate), burst) => Some(Bucket::checked(rate, burst).map_err(|e| e.to_string())?),
            (None, Some(_)) => return Err("burst needs a rate".into()),
            (None, None) => None,
        };
        Ok(Key {
            name: c.name.clone(),
            digest,
            subject: c.client_cert_subject.clone(),
            topics: Allowlist::new(&c.topics).map_err(|e| format!("topics{e}"))?,
            modes: c.modes.clone(),
            bucket,
        })
    }

    /// Whether this key may write `topic` in `mode`, and has a token left.
    pub fn permit(&self, topic: &str, mode: Mode) -> Result<(), Denied> {
        self.allows(topic, mode)?;
        self.bucket.as_ref().map_or(Ok(()), Bucket::admit)
    }

    /// Whether this key may write `topic` in `mode` (no token taken).
    pub fn allows(&self, topic: &str, mode: Mode) -> Result<(), Denied> {
        if !self.modes.is_empty() && !self.modes.contains(&mode) {
            return Err(Denied::Forbidden(format!(
                "key {} may not use mode {}",
                self.name,
                mode.as_str()
            )));
        }
        if self.topics.is_empty() || !self.topics.allows(topic) {
            return Err(Denied::Forbidden(format!(
                "key {} may not write topic {topic:?}",
                self.name
            )));
        }
        Ok(())
    }
}

/// The subject of the client certificate a TLS connection presented (mTLS); empty when it is
/// not text (it names no key: an empty `client_cert_subject` is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSubject(pub String);

/// The header an API key may come in.
const API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The key a request presents: `Authorization: Bearer <key>` or `X-Api-Key: <key>`.
/// An empty value is no key. Two lines of either header are refused: which one counts would
/// be a guess (a proxy that adds its own key after the client's would lose to the client's).
pub fn presented(headers: &HeaderMap) -> Result<Option<&[u8]>, &'static str> {
    let authorization = axum::http::header::AUTHORIZATION;
    if headers.get_all(&API_KEY).iter().nth(1).is_some()
        || headers.get_all(&authorization).iter().nth(1).is_some()
    {
        return Err("send one API key, in one X-Api-Key or Authorization header");
    }
    if let Some(v) = headers.get(&API_KEY).filter(|v| !v.is_empty()) {
        return Ok(Some(v.as_bytes()));
    }
    let Some(auth) = headers.get(authorization).map(|v| v.as_bytes()) else {
        return Ok(None);
    };
    let Some(space) = auth.iter().position(|b| *b == b' ') else {
        return Ok(None);
    };
    let (scheme, rest) = auth.split_at(space);
    let rest = rest.trim_ascii();
    Ok((scheme.eq_ignore_ascii_case(b"bearer") && !rest.is_empty()).then_some(rest))
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    // `from_str_radix` takes a leading `+`: "+f" would pass for a digit pair.
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random key and its SHA-256, for `kafboy hash-key`.
pub fn new_key() -> (String, String) {
    let raw: [u8; 32] = rand::random();
    let key = format!("kb_{}", hex(&raw));
    let digest = hex(&Sha256::digest(key.as_bytes()));
    (key, digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(name: &str, secret: &str, topics: &[&str]) -> KeyConfig {
        KeyConfig {
            name: name.into(),
            sha256: Some(hex(&Sha256::digest(secret.as_bytes()))),
            client_cert_subject: None,
            topics: topics.iter().map(|t| t.to_string()).collect(),
            modes: vec![],
            rate: None,
            burst: None,
        }
    }

    #[test]
    fn a_tiny_rate_waits_a_day_instead_of_panicking() {
        let bucket = Bucket::new(1e-20, Some(1.0));
        assert!(bucket.take().is_ok());
        assert_eq!(bucket.take(), Err(Duration::from_secs(86_400)));
    }

    #[test]
    fn keys_match_by_digest_only() {
        let set = KeySet::new(
            &[key("a", "secret-a", &["t"]), key("b", "secret-b", &["u*"])],
            false,
        )
        .unwrap();
        assert_eq!(set.find(b"secret-b").unwrap().name, "b");
        assert!(set.find(b"secret-c").is_none());
        assert!(set.find(b"").is_none());
        // Any single differing byte, first or last, fails the same way.
        for i in 0..8 {
            let mut k = b"secret-a".to_vec();
            k[i] ^= 1;
            assert!(set.find(&k).is_none());
        }
    }

    #[test]
    fn a_digest_is_64_hex_digits_and_nothing_else() {
        let mut c = key("d", "s", &["t"]);
        let good = c.sha256.clone().unwrap();
        assert!(KeySet::new(std::slice::from_ref(&c), false).is_ok());
        for bad in [
            format!("+{}", &good[1..]),
            format!("{}+f{}", &good[..2], &good[4..]),
        ] {
            c.sha256 = Some(bad.clone());
            let e = KeySet::new(std::slice::from_ref(&c), false).unwrap_err();
            assert!(e.contains("64 hex digits"), "{bad}: {e}");
        }
    }

    #[test]
    fn permissions_by_topic_and_mode() {
        let mut c = key("w", "s", &["clicks", "web.*"]);
        c.modes = vec![Mode::Async];
        let set = KeySet::new(&[c], false).unwrap();
        let k = set.find(b"s").unwrap();
        assert!(k.permit("clicks", Mode::Async).is_ok());
        assert!(k.permit("web.x", Mode::Async).is_ok());
        assert!(matches!(
            k.permit("other", Mode::Async),
            Err(Denied::Forbidden(_))
        ));
        assert!(matches!(
            k.permit("clicks", Mode::Sync),
            Err(Denied::Forbidden(_))
        ));
    }

    #[test]
    fn buckets_refuse_past_the_burst_and_say_when() {
        // One token per 100 s: no stall of the test refills the bucket between the takes.
        let b = Bucket::new(0.01, Some(3.0));
        assert!((0..3).all(|_| b.take().is_ok()));
        let wait = b.take().unwrap_err();
        assert!(
            wait <= Duration::from_secs(100) && wait > Duration::from_secs(90),
            "{wait:?}"
        );
    }

    #[test]
    fn presented_keys() {
        let mut h = HeaderMap::new();
        assert_eq!(presented(&h).unwrap(), None);
        h.insert("authorization", "Bearer  abc ".parse().unwrap());
        assert_eq!(presented(&h).unwrap(), Some(&b"abc"[..]));
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(presented(&h).unwrap(), None);
        h.insert("x-api-key", "xyz".parse().unwrap());
        assert_eq!(presented(&h).unwrap(), Some(&b"xyz"[..]));
        // An empty value is no key: the other header counts, or none does.
        h.insert("x-api-key", "".parse().unwrap());
        assert_eq!(presented(&h).unwrap(), None);
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(presented(&h).unwrap(), Some(&b"abc"[..]));
        h.insert("authorization", "Bearer  ".parse().unwrap());
        assert_eq!(presented(&h).unwrap(), None);
        // Two of either header: which one counts would be a guess.
        h.insert("x-api-key", "xyz".parse().unwrap());
        h.append("x-api-key", "abc".parse().unwrap());
        assert!(presented(&h).is_err());
        h.remove("x-api-key");
        h.append("authorization", "Bearer abc".parse().unwrap());
        assert!(presented(&h).is_err());
    }

    #[test]
    fn entries_that_could_never_work_as_meant_are_refused() {
        let refused = |c: KeyConfig, mtls: bool| KeySet::new(&[c], mtls).unwrap_err();
        assert!(refused(key("e", "", &["t"]), false).contains("digest of the empty string"));
        let mut c = key("r", "s", &["t"]);
        c.burst = Some(5.0);
        assert!(refused(c.clone(), false).contains("burst needs a rate"));
        for (rate, burst) in [
            (f64::NAN, None),
            (0.0, None),
            (f64::INFINITY, None),
            (1.0, Some(0.5)),
            (1.0, Some(f64::NAN)),
        ] {
            c.rate = Some(rate);
            c.burst = burst;
            assert!(
                refused(c.clone(), false).contains("keys[0] (r)"),
                "{rate} {burst:?}"
            );
        }
        let mut c = key("p", "s", &["t"]);
        c.sha256 = None;
        c.client_cert_subject = Some("CN=p".into());
        assert!(refused(c.clone(), false).contains("needs server.tls.client_ca"));
        assert!(KeySet::new(&[c.clone()], true).is_ok());
        c.client_cert_subject = Some(String::new());
        assert!(refused(c, true).contains("empty"));
    }

    #[test]
    fn two_keys_with_one_identity_are_refused() {
        let e = KeySet::new(&[key("a", "s", &["t"]), key("b", "s", &["u"])], false).unwrap_err();
        assert!(
            e.contains("key b has the same") && e.contains("as key a"),
            "{e}"
        );
        let by_cert = |name: &str| KeyConfig {
            sha256: None,
            client_cert_subject: Some("CN=x".into()),
            ..key(name, "", &["t"])
        };
        assert!(KeySet::new(&[by_cert("a"), by_cert("b")], true).is_err());
        assert!(KeySet::new(&[key("a", "s", &["t"]), key("b", "z", &["t"])], false).is_ok());
    }

    #[test]
    fn bad_entries_are_named() {
        let mut c = key("bad", "s", &["t"]);
        c.sha256 = Some("zz".into());
        assert!(
            KeySet::new(&[c], false)
                .unwrap_err()
                .contains("keys[0] (bad)")
        );
        let (k, d) = new_key();
        assert!(k.starts_with("kb_") && d.len() == 64);
        assert_eq!(hex(&Sha256::digest(k.as_bytes())), d);
    }
}
