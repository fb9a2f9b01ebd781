//! The link's rules, without sockets or a clock: which packet is lost (a seeded draw per
//! direction), how long the others are held (a fixed one-way delay), and what happens when
//! the hold is full (tail drop, counted apart from the loss). The netfilter loop in
//! `queue.rs` feeds it packets and the time; the unit tests below drive it with numbers.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Which way a packet goes relative to the emulated port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Destination port is the emulated port (edge → server for the session).
    ToPort,
    /// Source port is the emulated port (server → edge).
    FromPort,
}

/// What the link does with a packet it is offered.
#[derive(Debug, PartialEq, Eq)]
pub enum Fate<P> {
    /// Held; `pop_due` hands it back when its delay has passed.
    Held,
    /// Lost by the seeded draw: the caller drops it now.
    Lost(P),
    /// The hold is full: the caller drops it now (a router's tail drop).
    Overflow(P),
}

/// Counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirStats {
    /// Packets offered.
    pub seen: u64,
    /// Packets lost by the draw.
    pub lost: u64,
    /// Packets dropped because the hold was full.
    pub overflow: u64,
}

/// SplitMix64: a fixed, documented generator, so a seed gives the same loss pattern with
/// every build (a library generator may change its algorithm between versions).
#[derive(Clone, Copy, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) from the top 53 bits.
    fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A one-way delay line with seeded loss and a bounded hold.
pub struct Link<P> {
    delay: Duration,
    loss: f64,
    /// One generator per direction, so the pattern of one direction depends only on its own
    /// packet count and not on how the other direction's packets interleave with it.
    draws: [SplitMix64; 2],
    held: VecDeque<(Instant, P)>,
    max_held: usize,
    peak_held: usize,
    stats: [DirStats; 2],
}

impl<P> Link<P> {
    /// `loss` is a fraction in [0, 1]; `max_held` bounds the packets held at once.
    pub fn new(delay: Duration, loss: f64, seed: u64, max_held: usize) -> Self {
        Link {
            delay,
            loss,
            draws: [SplitMix64(seed), SplitMix64(seed ^ 0x5555_5555_5555_5555)],
            held: VecDeque::new(),
            max_held,
            peak_held: 0,
            stats: [DirStats::default(); 2],
        }
    }

    /// Offer a packet that arrived at `now`. The draw is made for every packet, lost or not,
    /// so an overflow does not shift the loss pattern.
    pub fn offer(&mut self, now: Instant, dir: Direction, packet: P) -> Fate<P> {
        let i = dir as usize;
        self.stats[i].seen += 1;
        if self.draws[i].next_unit() < self.loss {
            self.stats[i].lost += 1;
            return Fate::Lost(packet);
        }
        if self.held.len() >= self.max_held {
            self.stats[i].overflow += 1;
            return Fate::Overflow(packet);
        }
        // The delay is fixed, so release times grow with arrival order: a FIFO keeps the
        // packets in order and the earliest release at its front.
        self.held.push_back((now + self.delay, packet));
        self.peak_held = self.peak_held.max(self.held.len());
        Fate::Held
    }

    /// The next held packet whose delay has passed at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<P> {
        match self.held.front() {
            Some((at, _)) if *at <= now => self.held.pop_front().map(|(_, p)| p),
            _ => None,
        }
    }

    /// When the earliest held packet is due, if any is held.
    pub fn next_due(&self) -> Option<Instant> {
        self.held.front().map(|(at, _)| *at)
    }

    /// Every held packet, in order, whatever its delay (at shutdown).
    pub fn drain(&mut self) -> impl Iterator<Item = P> + '_ {
        self.held.drain(..).map(|(_, p)| p)
    }

    /// Counters of one direction.
    #[cfg(test)]
    pub fn stats(&self, dir: Direction) -> DirStats {
        self.stats[dir as usize]
    }

    /// The counters as JSON, for the report printed at exit.
    pub fn report(&self) -> Value {
        let dir = |d: DirStats| json!({"seen": d.seen, "lost": d.lost, "overflow": d.overflow});
        json!({
            "to_port": dir(self.stats[0]),
            "from_port": dir(self.stats[1]),
            "peak_held": self.peak_held,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn packets_come_out_in_order_after_the_delay() {
        let t0 = Instant::now();
        let mut link = Link::new(20 * MS, 0.0, 1, 100);
        for i in 0..5u32 {
            assert_eq!(link.offer(t0 + i * MS, Direction::ToPort, i), Fate::Held);
        }
        assert_eq!(link.pop_due(t0 + 19 * MS), None);
        assert_eq!(link.next_due(), Some(t0 + 20 * MS));
        let out: Vec<u32> = std::iter::from_fn(|| link.pop_due(t0 + 22 * MS)).collect();
        assert_eq!(out, [0, 1, 2]);
        assert_eq!(link.drain().collect::<Vec<_>>(), [3, 4]);
    }

    #[test]
    fn a_seed_gives_the_same_losses_near_the_fraction() {
        let t0 = Instant::now();
        let lost = |seed| {
            let mut link = Link::new(MS, 0.03, seed, usize::MAX);
            (0..100_000u32)
                .filter(|&i| matches!(link.offer(t0, Direction::FromPort, i), Fate::Lost(_)))
                .collect::<Vec<_>>()
        };
        let a = lost(7);
        assert_eq!(a, lost(7));
        assert_ne!(a, lost(8));
        // 3000 expected, standard deviation 54: 5 sigma either side.
        assert!((2730..=3270).contains(&a.len()), "{}", a.len());
    }

    #[test]
    fn directions_draw_apart() {
        let t0 = Instant::now();
        let mut alone = Link::new(MS, 0.5, 3, usize::MAX);
        let mut mixed = Link::new(MS, 0.5, 3, usize::MAX);
        let mut a = Vec::new();
        let mut b = Vec::new();
        for i in 0..200u32 {
            a.push(matches!(
                alone.offer(t0, Direction::ToPort, i),
                Fate::Lost(_)
            ));
            mixed.offer(t0, Direction::FromPort, i);
            b.push(matches!(
                mixed.offer(t0, Direction::ToPort, i),
                Fate::Lost(_)
            ));
        }
        assert_eq!(a, b);
    }

    #[test]
    fn a_full_hold_tail_drops_and_counts_it() {
        let t0 = Instant::now();
        let mut link = Link::new(MS, 0.0, 1, 2);
        assert_eq!(link.offer(t0, Direction::ToPort, 1), Fate::Held);
        assert_eq!(link.offer(t0, Direction::ToPort, 2), Fate::Held);
        assert_eq!(link.offer(t0, Direction::ToPort, 3), Fate::Overflow(3));
        assert_eq!(link.stats(Direction::ToPort).overflow, 1);
        assert_eq!(link.pop_due(t0 + MS), Some(1));
        assert_eq!(link.offer(t0 + MS, Direction::ToPort, 4), Fate::Held);
    }
}
