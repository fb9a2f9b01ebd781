//! Join throttling: a rate limit per source address and per token ID (governor), and a
//! lockout of a source after repeated failures. A locked-out or rate-limited attempt is refused
//! before anything is parsed, hashed or verified, so brute force costs the server nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::config::RateConfig;

/// Tracked sources beyond which stale failure records are pruned.
const PRUNE_AT: usize = 10_000;

/// Why an attempt was refused before it was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttled {
    /// The source failed too often and is locked out.
    LockedOut,
    /// The source exceeds its rate.
    SourceRate,
    /// The token ID exceeds its rate.
    TokenRate,
}

impl Throttled {
    /// Label for metrics and audit lines.
    pub fn label(self) -> &'static str {
        match self {
            Throttled::LockedOut => "locked_out",
            Throttled::SourceRate => "source_rate",
            Throttled::TokenRate => "token_rate",
        }
    }
}

struct Failures {
    count: u32,
    since: Instant,
    locked_until: Option<Instant>,
}

/// The limits of one registration listener.
pub struct JoinLimits {
    per_source: DefaultKeyedRateLimiter<IpAddr>,
    per_token: DefaultKeyedRateLimiter<String>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
    lockout_after: u32,
    lockout: Duration,
}

fn quota(per_minute: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(rate).allow_burst(burst)
}

impl JoinLimits {
    /// Limits from validated config.
    pub fn new(config: &RateConfig) -> JoinLimits {
        JoinLimits {
            per_source: RateLimiter::keyed(quota(config.per_source_per_minute, config.burst)),
            per_token: RateLimiter::keyed(quota(config.per_token_per_minute, config.burst)),
            failures: Mutex::new(HashMap::new()),
            lockout_after: config.lockout_after,
            lockout: config.lockout,
        }
    }

    /// Admit an attempt from `source` for a check, or refuse it unchecked.
    pub fn check_source(&self, source: IpAddr, now: Instant) -> Result<(), Throttled> {
        {
            let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(until) = failures.get(&source).and_then(|f| f.locked_until) {
                if now < until {
                    return Err(Throttled::LockedOut);
                }
            }
        }
        self.per_source
            .check_key(&source)
            .map_err(|_| Throttled::SourceRate)
    }

    /// How long `source` stays locked out, if it is.
    pub fn lockout_remaining(&self, source: IpAddr, now: Instant) -> Option<Duration> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures
            .get(&source)
            .and_then(|f| f.locked_until)
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// Admit an attempt at token `id`, or refuse it unchecked.
    pub fn check_token(&self, id: &str) -> Result<(), Throttled> {
        self.per_token
            .check_key(&id.to_owned())
            .map_err(|_| Throttled::TokenRate)
    }

    /// Count a failed attempt from `source`; returns true if it is now locked out.
    pub fn failed(&self, source: IpAddr, now: Instant) -> bool {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() >= PRUNE_AT {
            let lockout = self.lockout;
            failures.retain(|_, f| {
                now.duration_since(f.since) < lockout || f.locked_until.is_some_and(|u| u > now)
            });
            self.per_source.retain_recent();
            self.per_token.retain_recent();
        }
        let entry = failures.entry(source).or_insert(Failures {
            count: 0,
            since: now,
            locked_until: None,
        });
        // Failures count within one lockout-long window.
        let still_locked = entry.locked_until.is_some_and(|u| u > now);
        if now.duration_since(entry.since) >= self.lockout && !still_locked {
            *entry = Failures {
                count: 0,
                since: now,
                locked_until: None,
            };
        }
        entry.count += 1;
        if entry.count >= self.lockout_after {
            entry.locked_until = Some(now + self.lockout);
            return true;
        }
        false
    }

    /// A success clears the source's failures.
    pub fn succeeded(&self, source: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures
            .get(&source)
            .is_some_and(|f| f.locked_until.is_none())
        {
            failures.remove(&source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RateConfig {
        RateConfig {
            per_source_per_minute: 600,
            per_token_per_minute: 2,
            burst: 2,
            lockout_after: 3,
            lockout: Duration::from_secs(60),
        }
    }

    #[test]
    fn lockout_after_repeated_failures_then_expires() {
        let limits = JoinLimits::new(&config());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        assert!(!limits.failed(ip, t0));
        assert!(!limits.failed(ip, t0));
        assert!(limits.failed(ip, t0));
        assert_eq!(limits.check_source(ip, t0), Err(Throttled::LockedOut));
        assert_eq!(limits.check_source(other, t0), Ok(()));
        let later = t0 + Duration::from_secs(61);
        assert_eq!(limits.check_source(ip, later), Ok(()));
    }

    #[test]
    fn token_rate_is_per_token() {
        let limits = JoinLimits::new(&config());
        assert!(limits.check_token("aaaaaa").is_ok());
        assert!(limits.check_token("aaaaaa").is_ok());
        assert_eq!(limits.check_token("aaaaaa"), Err(Throttled::TokenRate));
        assert!(limits.check_token("bbbbbb").is_ok());
    }

    #[test]
    fn brute_force_from_many_sources_is_throttled_per_token() {
        // TESTPLAN 19: spreading guesses over many source addresses does not buy attempts on
        // one token: every source is fresh, yet only the token's burst gets through.
        let limits = JoinLimits::new(&config());
        let t0 = Instant::now();
        let mut checked = 0;
        for i in 0..50u8 {
            let source = IpAddr::from([198, 51, 100, i]);
            if limits.check_source(source, t0).is_ok() && limits.check_token("abcdef").is_ok() {
                checked += 1;
            }
        }
        assert_eq!(checked, 2);
    }
}
