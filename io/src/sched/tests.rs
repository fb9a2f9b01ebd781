//! The scheduler's ordering rules, each pinned on the sans-io part, and the writer's bound.

use super::frames::*;
use super::queue::{FrameScheduler, SchedConfig};

/// A small quantum so a few bytes make a "bulk" stream; one piece staged at a time so the
/// order of every choice is visible.
const TEST: SchedConfig = SchedConfig {
    quantum: 100,
    stage: 1,
};

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Header {
        len: payload.len(),
        kind,
        flags,
        stream,
    }
    .encode()
    .to_vec();
    f.extend_from_slice(payload);
    f
}

fn data(stream: u32, len: usize, end: bool) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    frame(
        DATA,
        if end { FLAG_END_STREAM } else { 0 },
        stream,
        &payload,
    )
}

fn headers(stream: u32) -> Vec<u8> {
    frame(HEADERS, FLAG_END_HEADERS, stream, b"hdrs")
}

fn window_update(stream: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &[0, 0, 1, 0])
}

/// The next `n` frames out (fewer if nothing more may go).
fn take(s: &mut FrameScheduler, n: usize) -> Vec<(Header, Vec<u8>)> {
    let mut bytes = Vec::new();
    let mut frames = Vec::new();
    while frames.len() < n {
        let Some(chunk) = s.next_chunk() else { break };
        bytes.extend_from_slice(&chunk);
        frames = parse(&bytes);
    }
    frames
}

fn all(s: &mut FrameScheduler) -> Vec<(Header, Vec<u8>)> {
    take(s, usize::MAX)
}

fn parse(mut bytes: &[u8]) -> Vec<(Header, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= FRAME_HEADER {
        let h = Header::parse(bytes[..FRAME_HEADER].try_into().unwrap());
        out.push((h, bytes[FRAME_HEADER..FRAME_HEADER + h.len].to_vec()));
        bytes = &bytes[FRAME_HEADER + h.len..];
    }
    assert!(bytes.is_empty(), "output ends inside a frame");
    out
}

fn kinds(frames: &[(Header, Vec<u8>)]) -> Vec<(u8, u32)> {
    frames.iter().map(|(h, _)| (h.kind, h.stream)).collect()
}

/// Payload bytes of `stream`'s DATA, in output order.
fn stream_bytes(frames: &[(Header, Vec<u8>)], stream: u32) -> Vec<u8> {
    frames
        .iter()
        .filter(|(h, _)| h.kind == DATA && h.stream == stream)
        .flat_map(|(_, p)| p.clone())
        .collect()
}

#[test]
fn a_streams_frames_keep_their_order_and_its_bytes_arrive_whole() {
    let mut s = FrameScheduler::new(TEST, 0);
    let mut input = headers(1);
    input.extend(data(1, 250, false));
    input.extend(data(1, 30, false));
    input.extend(frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]));
    s.push(&input);
    let out = all(&mut s);
    assert_eq!(out[0].0.kind, HEADERS);
    assert_eq!(out.last().unwrap().0.kind, RST_STREAM);
    assert_eq!(stream_bytes(&out, 1), stream_bytes(&parse(&input), 1));
    assert!(s.is_empty());
}

#[test]
fn data_is_split_at_the_quantum_with_end_stream_only_on_the_last_piece() {
    let mut s = FrameScheduler::new(TEST, 0);
    s.push(&headers(1));
    s.push(&data(1, 250, true));
    let out = all(&mut s);
    let pieces: Vec<_> = out.iter().filter(|(h, _)| h.kind == DATA).collect();
    assert_eq!(
        pieces.iter().map(|(h, _)| h.len).collect::<Vec<_>>(),
        [100, 100, 50]
    );
    assert_eq!(
        pieces.iter().map(|(h, _)| h.flags).collect::<Vec<_>>(),
        [0, 0, FLAG_END_STREAM]
    );
}

#[test]
fn a_padded_data_frame_is_never_split() {
    let mut s = FrameScheduler::new(TEST, 0);
    s.push(&headers(1));
    let mut payload = vec![10u8];
    payload.extend([7u8; 300]);
    payload.extend([0u8; 10]);
    let padded = frame(DATA, FLAG_PADDED | FLAG_END_STREAM, 1, &payload);
    s.push(&padded);
    let out = all(&mut s);
    assert_eq!(out.len(), 2);
    assert_eq!(out[1].0.len, payload.len());
    assert_eq!(out[1].0.flags, FLAG_PADDED | FLAG_END_STREAM);
}

#[test]
fn headers_and_continuation_go_out_contiguous_even_when_written_in_pieces() {
    let mut s = FrameScheduler::new(TEST, 0);
    s.push(&headers(1));
    s.push(&data(1, 1000, false)); // bulk on stream 1
    let mut block = frame(HEADERS, 0, 3, b"part one");
    block.extend(frame(CONTINUATION, 0, 3, b"part two"));
    block.extend(frame(CONTINUATION, FLAG_END_HEADERS, 3, b"part three"));
    // The block arrives a few bytes at a time while stream 1's pieces go out.
    let mut out = Vec::new();
    for piece in block.chunks(5) {
        s.push(piece);
        out.extend(take(&mut s, 1));
    }
    out.extend(all(&mut s));
    let at = out.iter().position(|(h, _)| h.stream == 3).unwrap();
    assert_eq!(
        kinds(&out[at..at + 3]),
        [(HEADERS, 3), (CONTINUATION, 3), (CONTINUATION, 3)]
    );
}

#[test]
fn a_sparse_streams_frame_overtakes_a_bulk_streams_queued_bytes() {
    let mut s = FrameScheduler::new(TEST, 0);
    s.push(&headers(1));
    s.push(&data(1, 2000, false));
    // Stream 1 used its first quantum and is in the old list.
    assert_eq!(kinds(&take(&mut s, 2)), [(HEADERS, 1), (DATA, 1)]);
    s.push(&data(3, 20, false)); // stream 3, opened earlier, now sends a little
    let next = take(&mut s, 1);
    assert_eq!(kinds(&next), [(DATA, 3)]);
    assert_eq!(stream_bytes(&all(&mut s), 1).len(), 1900);
}

#[test]
fn bulk_keeps_progressing_while_sparse_streams_keep_arriving() {
    let mut s = FrameScheduler::new(TEST, 0);
    s.push(&headers(1));
    s.push(&data(1, 100_000, false));
    take(&mut s, 2);
    let mut bulk_pieces = 0;
    for i in 0..200u32 {
        // A new stream every round, each with one small frame.
        let stream = 3 + 2 * i;
        s.push(&headers(stream));
        s.push(&data(stream, 10, true));
        for (h, _) in take(&mut s, 3) {
            if h.stream == 1 {
                bulk_pieces += 1;
            }
        }
    }
    // Three frames a round, two of them the newcomer's: bulk gets the third.
    assert!(
        bulk_pieces >= 150,
        "bulk got {bulk_pieces} pieces in 200 rounds"
    );
}

#[test]
fn two_bulk_streams_share_by_quantum() {
    let mut s = FrameScheduler::new(TEST, 0);
    s.push(&headers(1));
    s.push(&headers(3));
    s.push(&data(1, 1000, false));
    s.push(&data(3, 1000, false));
    let out = all(&mut s);
    let data_streams: Vec<u32> = out
        .iter()
        .filter(|(h, _)| h.kind == DATA)
        .map(|(h, _)| h.stream)
        .collect();
    // Never more than one quantum of one stream in a row while both have bytes queued.
    for w in data_streams[..18].windows(2) {
        assert_ne!(w[0], w[1], "{data_streams:?}");
    }
}

#[test]
fn new_streams_open_in_the_order_h2_wrote_them() {
    let mut s = FrameScheduler::new(TEST, 0);
    // Stream 1 opens with a large body queued behind its HEADERS; stream 3 opens after it
    // with a small one. Stream 3's HEADERS may not reach the wire before stream 1's.
    s.push(&headers(1));
    s.push(&data(1, 5000, false));
    s.push(&headers(3));
    s.push(&data(3, 5, true));
    let out = all(&mut s);
    let opened: Vec<u32> = out
        .iter()
        .filter(|(h, _)| h.kind == HEADERS)
        .map(|(h, _)| h.stream)
        .collect();
    assert_eq!(opened, [1, 3]);
}

/// Stream 1 bulk, and stream 3's queue already known to the scheduler and in the old list
/// behind stream 1 (it carried a frame before its HEADERS), so its HEADERS, when it comes,
/// is not served first by the new list. The new list alone keeps opening order in every
/// other case; this is the one the opening rule is for.
fn stream_3_in_the_old_list_behind_bulk() -> FrameScheduler {
    let mut s = FrameScheduler::new(TEST, 0);
    s.push(&headers(1));
    s.push(&data(1, 5000, false));
    assert_eq!(kinds(&take(&mut s, 2)), [(HEADERS, 1), (DATA, 1)]);
    s.push(&frame(PRIORITY, 0, 3, &[0, 0, 0, 0, 16]));
    assert_eq!(kinds(&take(&mut s, 1)), [(PRIORITY, 3)]);
    assert_eq!(kinds(&take(&mut s, 1)), [(DATA, 1)]);
    s
}

#[test]
fn stream_ids_increase_on_the_wire_when_the_earlier_opener_waits_in_the_old_list() {
    let mut s = stream_3_in_the_old_list_behind_bulk();
    s.push(&headers(3));
    s.push(&headers(5));
    let out = all(&mut s);
    let opened: Vec<u32> = out
        .iter()
        .filter(|(h, _)| h.kind == HEADERS)
        .map(|(h, _)| h.stream)
        .collect();
    assert_eq!(opened, [3, 5]);
}

#[test]
fn a_window_update_overtakes_its_streams_data_once_the_stream_is_open_on_the_wire() {
    let mut s = FrameScheduler::new(TEST, 0);
    s.push(&headers(1));
    s.push(&data(1, 1000, false));
    take(&mut s, 2); // HEADERS out, one piece out
    s.push(&window_update(1));
    assert_eq!(kinds(&take(&mut s, 1)), [(WINDOW_UPDATE, 1)]);
}

#[test]
fn a_window_update_does_not_overtake_its_streams_queued_headers() {
    let mut s = stream_3_in_the_old_list_behind_bulk();
    // Stream 5's HEADERS waits for stream 3's, which waits its turn behind the bulk.
    s.push(&headers(3));
    s.push(&headers(5));
    s.push(&window_update(5));
    let out = all(&mut s);
    let h = out
        .iter()
        .position(|(h, _)| (h.kind, h.stream) == (HEADERS, 5));
    let w = out.iter().position(|(h, _)| h.kind == WINDOW_UPDATE);
    assert!(h < w, "WINDOW_UPDATE on an idle stream: {:?}", kinds(&out));
}

#[test]
fn connection_frames_go_first() {
    let mut s = FrameScheduler::new(TEST, 0);
    s.push(&headers(1));
    s.push(&data(1, 1000, false));
    take(&mut s, 2);
    s.push(&frame(PING, 0x1, 0, &[1; 8]));
    s.push(&window_update(0));
    assert_eq!(kinds(&take(&mut s, 2)), [(PING, 0), (WINDOW_UPDATE, 0)]);
}

#[test]
fn settings_and_goaway_overtake_nothing_and_are_overtaken_by_nothing() {
    for barrier in [SETTINGS, GOAWAY] {
        let mut s = FrameScheduler::new(TEST, 0);
        s.push(&headers(1));
        s.push(&data(1, 450, false));
        let payload: &[u8] = if barrier == SETTINGS {
            &[0, 4, 0, 1, 0, 0]
        } else {
            &[0, 0, 0, 1, 0, 0, 0, 0]
        };
        s.push(&frame(barrier, 0, 0, payload));
        // Queued after the barrier: a PING and a new stream's small frame.
        s.push(&frame(PING, 0, 0, &[2; 8]));
        s.push(&headers(3));
        let out = all(&mut s);
        let at = out.iter().position(|(h, _)| h.kind == barrier).unwrap();
        assert_eq!(stream_bytes(&out[..at], 1).len(), 450, "barrier {barrier}");
        assert_eq!(kinds(&out[at + 1..]), [(PING, 0), (HEADERS, 3)]);
    }
}

#[test]
fn the_client_preface_passes_first_and_untouched() {
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut s = FrameScheduler::new(TEST, CLIENT_PREFACE_LEN);
    let mut input = preface.to_vec();
    input.extend(frame(SETTINGS, 0, 0, &[]));
    s.push(&input);
    let mut out = Vec::new();
    while let Some(chunk) = s.next_chunk() {
        out.extend_from_slice(&chunk);
    }
    assert_eq!(out, input);
}

#[test]
fn write_boundaries_do_not_change_the_output() {
    let mut input = headers(1);
    input.extend(data(1, 777, false));
    input.extend(window_update(0));
    input.extend(headers(3));
    input.extend(data(3, 33, true));
    input.extend(data(1, 5, true));
    let mut whole = FrameScheduler::new(TEST, 0);
    whole.push(&input);
    let expected = all(&mut whole);
    for size in [1, 2, 7, 9, 10, 64] {
        let mut s = FrameScheduler::new(TEST, 0);
        for piece in input.chunks(size) {
            s.push(piece);
        }
        assert_eq!(all(&mut s), expected, "writes of {size} bytes");
    }
}

#[test]
fn queued_counts_every_byte_until_it_is_handed_out() {
    let mut s = FrameScheduler::new(TEST, 0);
    s.push(&headers(1));
    s.push(&data(1, 250, true));
    assert_eq!(s.queued(), 13 + 9 + 250);
    let mut out = 0;
    while let Some(chunk) = s.next_chunk() {
        out += chunk.len();
    }
    assert_eq!(s.queued(), 0);
    assert_eq!(out, 13 + 3 * 9 + 250);
}

mod writer {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::sched::ScheduledWriter;

    /// The writer takes h2's bytes only up to its limit while the transport is full, and
    /// takes more once the transport drains.
    #[tokio::test]
    async fn the_writer_holds_at_most_its_limit_and_resumes_when_the_transport_drains() {
        const LIMIT: usize = 4096;
        let (near, mut far) = tokio::io::duplex(1024);
        let mut w = ScheduledWriter::h2_server(near, TEST, LIMIT);
        let mut input = headers(1);
        input.extend(data(1, 20_000, true));
        // The transport takes 1 KiB and nobody reads: the write stops near the limit.
        let mut written = 0;
        loop {
            let r =
                tokio::time::timeout(Duration::from_millis(100), w.write(&input[written..])).await;
            match r {
                Ok(n) => written += n.unwrap(),
                Err(_) => break,
            }
            assert!(written < input.len(), "everything taken without a reader");
        }
        assert!(w.queued() <= LIMIT, "queued {} > {LIMIT}", w.queued());
        // A reader drains the transport; the rest goes through.
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            far.read_to_end(&mut out).await.map(|_| out)
        });
        tokio::time::timeout(Duration::from_secs(5), async {
            w.write_all(&input[written..]).await.unwrap();
            w.shutdown().await.unwrap();
        })
        .await
        .expect("writer resumed");
        let out = reader.await.unwrap().unwrap();
        assert_eq!(
            stream_bytes(&parse(&out), 1),
            stream_bytes(&parse(&input), 1)
        );
    }
}
