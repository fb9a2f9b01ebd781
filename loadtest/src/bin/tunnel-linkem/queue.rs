//! The netfilter side: iptables rules that send one port's TCP and UDP packets on `lo` to an
//! NFQUEUE, and the loop that reads them, asks `Link` what to do, and gives the kernel its
//! verdicts. Packets wait in the kernel while they are held; only their metadata and first
//! bytes come up here.
//!
//! The loop polls: the `nfq` crate exposes no file descriptor to wait on, so it reads
//! without blocking until the queue is empty, releases what is due, and sleeps until the next
//! release or one `POLL_TICK`, whichever is sooner.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nfq::{Message, Queue, Verdict};
use serde_json::{json, Value};

use crate::link::{Direction, Fate, Link};

/// Longest sleep between two reads of the queue, in µs. A packet is read up to this late, so
/// its delay is up to this much longer than asked (1 % of a 20 ms delay); the loop then
/// wakes 4000 times a second when idle, which costs well under 1 % of a core.
const POLL_TICK: Duration = Duration::from_micros(250);

/// Bytes of each packet copied up: an IPv4 header without options (20) and the ports (4),
/// with room for options. The direction is all the loop reads; the payload stays in the
/// kernel, which keeps the copy per packet small.
const COPY_RANGE: u16 = 64;

/// Packets the kernel may queue beyond the hold, so that the link's own tail drop (counted)
/// happens before the kernel's (counted only in /proc): the packets read but not yet
/// judged, a few poll ticks' worth at 200 000 packets/s.
const KERNEL_MARGIN: u32 = 1024;

/// What to emulate and where.
pub struct Settings {
    pub port: u16,
    pub queue_num: u16,
    pub delay: Duration,
    pub loss: f64,
    pub seed: u64,
    pub max_held: usize,
}

/// The iptables rules this run added, deleted again when dropped.
struct Rules {
    specs: Vec<Vec<String>>,
}

impl Rules {
    /// One rule per protocol and direction in INPUT on `lo`: every packet crosses INPUT once,
    /// so it is queued once, and it does so after loopback's transmit has detached it from
    /// the sending socket. Held in OUTPUT instead, a packet would still count against its
    /// sender's buffer and TCP Small Queues (a few packets at a low pacing rate): the sender
    /// stalls until the delay ends, and a 40 ms round trip ran at 0.25 MB/s.
    fn add(port: u16, queue_num: u16) -> anyhow::Result<Rules> {
        let mut rules = Rules { specs: Vec::new() };
        for proto in ["tcp", "udp"] {
            for dir in ["--dport", "--sport"] {
                let spec: Vec<String> = [
                    "INPUT",
                    "-i",
                    "lo",
                    "-p",
                    proto,
                    dir,
                    &port.to_string(),
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    &queue_num.to_string(),
                ]
                .map(String::from)
                .to_vec();
                iptables("-A", &spec)?;
                rules.specs.push(spec);
            }
        }
        Ok(rules)
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        for spec in self.specs.drain(..) {
            if let Err(e) = iptables("-D", &spec) {
                eprintln!("tunnel-linkem: {e:#}");
            }
        }
    }
}

fn iptables(op: &str, spec: &[String]) -> anyhow::Result<()> {
    let out = Command::new("iptables")
        .arg(op)
        .args(spec)
        .output()
        .map_err(|e| {
            anyhow::anyhow!("cannot run iptables ({e}): install it (apt-get install iptables)")
        })?;
    anyhow::ensure!(
        out.status.success(),
        "iptables {op} {} failed: {}",
        spec.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The direction of an IPv4 TCP or UDP packet relative to `port`, from its first bytes.
fn direction(packet: &[u8], port: u16) -> Direction {
    let ihl = usize::from(packet.first().map_or(5, |b| b & 0x0f)) * 4;
    match packet.get(ihl + 2..ihl + 4) {
        Some(d) if u16::from_be_bytes([d[0], d[1]]) == port => Direction::ToPort,
        _ => Direction::FromPort,
    }
}

/// The kernel's own counters of queue `num` (/proc/net/netfilter/nfnetlink_queue): packets
/// it dropped because the queue was full, and because the netlink socket was.
fn kernel_drops(num: u16) -> Value {
    let text = std::fs::read_to_string("/proc/net/netfilter/nfnetlink_queue").unwrap_or_default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first().and_then(|n| n.parse::<u16>().ok()) == Some(num) && f.len() >= 7 {
            return json!({"queue_full": f[5].parse::<u64>().ok(), "socket_full": f[6].parse::<u64>().ok()});
        }
    }
    Value::Null
}

/// Run until `stop` is set; returns the counters. The rules exist only while this runs.
pub fn run(s: &Settings, stop: &AtomicBool) -> anyhow::Result<Value> {
    let mut queue = Queue::open()
        .map_err(|e| anyhow::anyhow!("cannot open a netfilter queue socket (root needed): {e}"))?;
    queue.bind(s.queue_num).map_err(|e| {
        anyhow::anyhow!(
            "cannot bind NFQUEUE {} (nfnetlink_queue in the kernel?): {e}",
            s.queue_num
        )
    })?;
    queue.set_copy_range(s.queue_num, COPY_RANGE)?;
    // Fail closed: if this program stops reading, the port's packets are dropped rather than
    // passing undelayed and making a run look like a link it was not.
    queue.set_fail_open(s.queue_num, false)?;
    let kernel_max = u32::try_from(s.max_held)
        .unwrap_or(u32::MAX)
        .saturating_add(KERNEL_MARGIN);
    queue.set_queue_max_len(s.queue_num, kernel_max)?;
    queue.set_nonblocking(true);
    let rcvbuf = crate::rcvbuf::grow(crate::rcvbuf::WANTED)?;

    let rules = Rules::add(s.port, s.queue_num)?;
    eprintln!(
        "tunnel-linkem: ready: port {} (tcp, udp, both ways) through queue {}: {:?} one way, {} % loss, seed {}",
        s.port,
        s.queue_num,
        s.delay,
        s.loss * 100.0,
        s.seed
    );

    let mut link: Link<Message> = Link::new(s.delay, s.loss, s.seed, s.max_held);
    let result = pump(&mut queue, &mut link, s.port, stop);
    // Rules first, so nothing new is queued, then let every held packet go: closing the
    // queue would drop them.
    drop(rules);
    let kernel = kernel_drops(s.queue_num);
    let mut flushed = 0u64;
    loop {
        match queue.recv() {
            Ok(msg) => link_release(&mut queue, msg)?,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e.into()),
        }
        flushed += 1;
    }
    for msg in link.drain().collect::<Vec<_>>() {
        link_release(&mut queue, msg)?;
        flushed += 1;
    }
    result?;
    let mut report = link.report();
    report["kernel_drops"] = kernel;
    report["flushed_at_exit"] = flushed.into();
    report["socket_rcvbuf"] = rcvbuf.into();
    Ok(report)
}

fn link_release(queue: &mut Queue, mut msg: Message) -> std::io::Result<()> {
    msg.set_verdict(Verdict::Accept);
    queue.verdict(msg)
}

fn pump(
    queue: &mut Queue,
    link: &mut Link<Message>,
    port: u16,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    while !stop.load(Ordering::Relaxed) {
        loop {
            let msg = match queue.recv() {
                Ok(msg) => msg,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(anyhow::anyhow!("reading the netfilter queue: {e}")),
            };
            let dir = direction(msg.get_payload(), port);
            match link.offer(Instant::now(), dir, msg) {
                Fate::Held => {}
                Fate::Lost(mut msg) | Fate::Overflow(mut msg) => {
                    msg.set_verdict(Verdict::Drop);
                    queue.verdict(msg)?;
                }
            }
        }
        let now = Instant::now();
        while let Some(msg) = link.pop_due(now) {
            link_release(queue, msg)?;
        }
        let nap = link.next_due().map_or(POLL_TICK, |at| {
            at.saturating_duration_since(now).min(POLL_TICK)
        });
        std::thread::sleep(nap);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direction_reads_the_destination_port_after_the_ip_header() {
        let mut p = vec![0x45u8; 20];
        p.extend_from_slice(&[0xb7, 0xf9, 0x1f, 0x90]); // 47097 -> 8080
        assert_eq!(direction(&p, 8080), Direction::ToPort);
        assert_eq!(direction(&p, 47097), Direction::FromPort);
        let mut with_options = vec![0x46u8; 24];
        with_options.extend_from_slice(&[0x1f, 0x90, 0xb7, 0xf9]);
        assert_eq!(direction(&with_options, 8080), Direction::FromPort);
        assert_eq!(direction(&with_options, 47097), Direction::ToPort);
    }
}
