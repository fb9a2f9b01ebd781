//! Session liveness: HTTP/2 PINGs on an interval, and a verdict once the peer stayed silent
//! for `interval × misses`. Both ends run it, so each side finds a half-open link on its own.

use std::time::Duration;

use h2::{Ping, PingPong};
use tokio::time::Instant;

/// PING every `interval`; resolves with a reason once no answer came for `interval × misses`
/// since the last sign of life (h2 allows one PING in flight, so a miss is measured as time
/// without a PONG rather than as a count of unanswered PINGs).
pub async fn keepalive(mut ping_pong: PingPong, interval: Duration, misses: u32) -> String {
    let allowed = interval * misses;
    let mut alive_at = Instant::now();
    loop {
        match tokio::time::timeout_at(alive_at + allowed, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => alive_at = Instant::now(),
            Ok(Err(e)) => return format!("PING failed: {e}"),
            Err(_) => return format!("no PING answer for {allowed:?} (half-open link?)"),
        }
        tokio::time::sleep_until(alive_at + interval).await;
    }
}
