//! Token buckets for the per-key and global rate limits.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Denied;

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// Takes over what `old` had left (up to this bucket's burst): a reload of the keys must
    /// not hand every key a fresh burst.
    pub(super) fn carry_from(&self, old: &Bucket) {
        let (tokens, at) = *old.state.lock().unwrap_or_else(|e| e.into_inner());
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (tokens.min(self.burst), at);
    }

    /// A full bucket.
    pub fn new(rate: f64, burst: Option<f64>) -> Bucket {
        let burst = burst.unwrap_or(rate).max(1.0);
        Bucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// A full bucket from config values: a rate above 0, and a burst of at least one request.
    pub fn checked(rate: f64, burst: Option<f64>) -> Result<Bucket, &'static str> {
        if rate.is_nan() || rate <= 0.0 || rate.is_infinite() {
            return Err("rate must be a number above 0");
        }
        if burst.is_some_and(|b| b.is_nan() || b < 1.0 || b.is_infinite()) {
            return Err("burst must be a number of at least 1");
        }
        Ok(Bucket::new(rate, burst))
    }

    /// Takes a token, or refuses with a 429 saying in whole seconds (at least 1) when the
    /// next one is there.
    pub fn admit(&self) -> Result<(), Denied> {
        self.take()
            .map_err(|wait| Denied::Limited(wait.as_secs_f64().ceil().max(1.0) as u64))
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&self) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let tokens =
            (state.0 + now.duration_since(state.1).as_secs_f64() * self.rate).min(self.burst);
        if tokens >= 1.0 {
            *state = (tokens - 1.0, now);
            Ok(())
        } else {
            *state = (tokens, now);
            // A rate so low the wait overflows a Duration: a day is as good as forever here.
            let wait = (1.0 - tokens) / self.rate;
            Err(Duration::try_from_secs_f64(wait).unwrap_or(crate::config::MAX_DURATION))
        }
    }
}
