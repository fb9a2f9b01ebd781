//! Reconnect backoff: exponential with full jitter between a floor and a cap, reset only
//! after a session stayed up long enough to count as stable, so a flapping server does not
//! get hammered at the floor rate. Time is an input; there is no clock in here.

use std::time::Duration;

use rand::Rng;

/// Backoff state of one reconnecting session.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff between `min` and `max` (`min` ≤ `max`, both > 0).
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The ceiling of the next wait: `min × 2^attempt`, capped at `max`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The next wait, drawn uniformly from `[min, ceiling]` ("full jitter" with a floor, so
    /// thousands of edges spread out instead of returning in lockstep).
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        if ceiling <= self.min {
            return self.min;
        }
        let span = (ceiling - self.min).as_nanos() as u64;
        self.min + Duration::from_nanos(rng.gen_range(0..=span))
    }

    /// Call when a session ended: after a stable session the next attempt starts over.
    pub fn session_ended(&mut self, lasted: Duration, stable_after: Duration) {
        if lasted >= stable_after {
            self.attempt = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    #[test]
    fn every_delay_is_within_floor_and_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut b = Backoff::new(MIN, MAX);
        for _ in 0..1000 {
            let d = b.next_delay(&mut rng);
            assert!(d >= MIN && d <= MAX, "{d:?}");
        }
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut b = Backoff::new(MIN, MAX);
        let mut ceilings = vec![];
        for _ in 0..8 {
            ceilings.push(b.ceiling());
            b.next_delay(&mut rng);
        }
        assert_eq!(ceilings[0], MIN);
        assert_eq!(ceilings[1], MIN * 2);
        assert_eq!(ceilings[3], MIN * 8);
        assert_eq!(*ceilings.last().unwrap(), MAX);
        // Overflow-safe after very many attempts.
        for _ in 0..100 {
            b.next_delay(&mut rng);
        }
        assert_eq!(b.ceiling(), MAX);
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut rng = StdRng::seed_from_u64(3);
        let delays: Vec<_> = (0..200)
            .map(|_| {
                let mut b = Backoff::new(MIN, MAX);
                for _ in 0..6 {
                    b.next_delay(&mut rng);
                }
                b.next_delay(&mut rng)
            })
            .collect();
        let lo = delays.iter().min().unwrap();
        let hi = delays.iter().max().unwrap();
        assert!(*hi - *lo > Duration::from_secs(2), "{lo:?}..{hi:?}");
    }

    #[test]
    fn reset_needs_a_stable_session() {
        let mut rng = StdRng::seed_from_u64(9);
        let mut b = Backoff::new(MIN, MAX);
        for _ in 0..5 {
            b.next_delay(&mut rng);
        }
        b.session_ended(Duration::from_millis(50), Duration::from_secs(10));
        assert!(
            b.ceiling() > MIN,
            "a flapping session must not reset the backoff"
        );
        b.session_ended(Duration::from_secs(11), Duration::from_secs(10));
        assert_eq!(b.ceiling(), MIN);
    }
}
