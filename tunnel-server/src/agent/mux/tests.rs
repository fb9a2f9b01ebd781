//! The mux without sockets: packets in, events and queued packets out.

use super::*;
use futures_util::StreamExt;

/// The write timeout of these muxes: short, so a stall is reset quickly in real time.
const WRITE_TIMEOUT: Duration = Duration::from_millis(300);

fn mux(limit: usize) -> (Arc<Mux>, Queues) {
    Mux::new(limit, WRITE_TIMEOUT, Counter::default())
}

fn data(connect_id: i64, bytes: &'static [u8]) -> Packet {
    Packet::Data {
        connect_id,
        data: Bytes::from_static(bytes),
        error: None,
    }
}

/// Take the next event, which must be DATA, and report it taken.
fn take(conn: &mut Opened) -> Bytes {
    match conn.events.try_recv() {
        Ok(Event::Data(d)) => {
            conn.backlog.took(d.len());
            d
        }
        other => panic!("expected DATA, got {other:?}"),
    }
}

fn next_control(queues: &mut Queues) -> Option<Packet> {
    queues.control.try_recv().ok()
}

fn open(mux: &Mux, connect_id: i64) -> Opened {
    let (random, mut rx) = mux.begin_dial().unwrap();
    mux.dispatch(Packet::DialResponse(DialResponse {
        random,
        result: Ok(connect_id),
    }));
    rx.try_recv().unwrap().unwrap()
}

#[test]
fn data_goes_to_its_connection_in_order() {
    let (mux, _queues) = mux(1 << 20);
    let mut a = open(&mux, 1);
    let mut b = open(&mux, 2);
    for (id, text) in [(1, "a1"), (2, "b1"), (1, "a2")] {
        mux.dispatch(Packet::Data {
            connect_id: id,
            data: Bytes::from(text),
            error: None,
        });
    }
    let text = |e: Event| match e {
        Event::Data(d) => String::from_utf8(d.to_vec()).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(text(a.events.try_recv().unwrap()), "a1");
    assert_eq!(text(a.events.try_recv().unwrap()), "a2");
    assert_eq!(text(b.events.try_recv().unwrap()), "b1");
    assert_eq!(a.backlog.buffered(), 4);
}

#[tokio::test]
async fn a_full_backlog_holds_data_until_the_frontend_takes_some() {
    let (mux, mut queues) = mux(10);
    let mut slow = open(&mux, 1);
    let mut other = open(&mux, 2);
    assert_eq!(mux.dispatch(data(1, b"123456")), Dispatch::Continue);
    // The second packet would pass the 10-byte bound: the reader holds it.
    let Dispatch::Full(held) = mux.dispatch(data(1, b"abcdef")) else {
        panic!("a full backlog must hold the packet")
    };
    let deliver = tokio::spawn({
        let mux = mux.clone();
        async move { mux.deliver(held).await }
    });
    tokio::time::sleep(WRITE_TIMEOUT / 3).await;
    assert!(!deliver.is_finished(), "delivered into a full backlog");
    assert_eq!(take(&mut slow), "123456");
    tokio::time::timeout(WRITE_TIMEOUT, deliver)
        .await
        .expect("a take makes room")
        .unwrap();
    assert_eq!(take(&mut slow), "abcdef");
    // Nothing was dropped or reset, and the other connection was never involved.
    assert_eq!(mux.stalled_resets.get(), 0);
    assert_eq!(next_control(&mut queues), None);
    assert!(other.events.try_recv().is_err());
    assert_eq!(mux.open_connections(), 2);
}

#[tokio::test]
async fn a_stalled_connection_is_reset_alone_and_progress_restarts_its_clock() {
    let (mux, mut queues) = mux(10);
    let mut slow = open(&mux, 1);
    let mut other = open(&mux, 2);
    mux.dispatch(data(1, b"1234"));
    mux.dispatch(data(1, b"5678"));
    let Dispatch::Full(held) = mux.dispatch(data(1, b"abcd")) else {
        panic!("a full backlog must hold the packet")
    };
    let started = tokio::time::Instant::now();
    let deliver = tokio::spawn({
        let mux = mux.clone();
        async move { mux.deliver(held).await }
    });
    // Progress without room (1 byte taken; 7 + 4 is still over 10) before the deadline.
    tokio::time::sleep(WRITE_TIMEOUT * 2 / 3).await;
    slow.backlog.took(1);
    tokio::time::sleep(WRITE_TIMEOUT * 2 / 3).await;
    assert!(
        !deliver.is_finished(),
        "reset although the frontend made progress"
    );
    tokio::time::timeout(WRITE_TIMEOUT * 3, deliver)
        .await
        .expect("a stalled connection is reset")
        .unwrap();
    assert!(started.elapsed() >= WRITE_TIMEOUT * 2 / 3 + WRITE_TIMEOUT);
    assert_eq!(mux.stalled_resets.get(), 1);
    // The connection keeps what it had, then learns of the reset; the agent gets CLOSE_REQ.
    assert!(matches!(slow.events.try_recv(), Ok(Event::Data(_))));
    assert!(matches!(slow.events.try_recv(), Ok(Event::Data(_))));
    assert!(matches!(slow.events.try_recv(), Ok(Event::Reset(_))));
    assert_eq!(
        next_control(&mut queues),
        Some(Packet::CloseRequest { connect_id: 1 })
    );
    // Later DATA for it is dropped; the other connection carries on.
    assert_eq!(mux.dispatch(data(1, b"late")), Dispatch::Continue);
    mux.dispatch(data(2, b"fine"));
    assert_eq!(take(&mut other), "fine");
    assert_eq!(mux.open_connections(), 1);
}

#[tokio::test]
async fn a_connection_that_ends_while_waited_on_releases_the_reader() {
    let (mux, _queues) = mux(10);
    let slow = open(&mux, 1);
    mux.dispatch(data(1, b"123456"));
    let Dispatch::Full(held) = mux.dispatch(data(1, b"abcdef")) else {
        panic!("a full backlog must hold the packet")
    };
    let deliver = tokio::spawn({
        let mux = mux.clone();
        async move { mux.deliver(held).await }
    });
    tokio::time::sleep(WRITE_TIMEOUT / 3).await;
    // The connection's task ends (its frontend reset), well before the write timeout.
    drop(slow);
    tokio::time::timeout(WRITE_TIMEOUT / 3, deliver)
        .await
        .expect("the reader is released at once")
        .unwrap();
    assert_eq!(mux.stalled_resets.get(), 1);
    assert_eq!(mux.dispatch(data(1, b"late")), Dispatch::Continue);
    assert_eq!(mux.open_connections(), 0);
}

#[test]
fn a_reader_that_keeps_up_is_never_held() {
    let (mux, _queues) = mux(10);
    let mut conn = open(&mux, 1);
    for _ in 0..100 {
        assert_eq!(mux.dispatch(data(1, b"12345678")), Dispatch::Continue);
        take(&mut conn);
    }
}

#[test]
fn late_dial_answer_closes_what_it_opened() {
    let (mux, mut queues) = mux(1 << 20);
    let (random, rx) = mux.begin_dial().unwrap();
    mux.cancel_dial(random, rx);
    assert_eq!(
        next_control(&mut queues),
        Some(Packet::CloseDial { random })
    );
    mux.dispatch(Packet::DialResponse(DialResponse {
        random,
        result: Ok(7),
    }));
    assert_eq!(
        next_control(&mut queues),
        Some(Packet::CloseRequest { connect_id: 7 })
    );
    assert_eq!(mux.open_connections(), 0);
}

#[test]
fn agent_close_request_is_answered_and_ends_the_connection() {
    let (mux, mut queues) = mux(1 << 20);
    let mut conn = open(&mux, 3);
    mux.dispatch(Packet::CloseRequest { connect_id: 3 });
    assert!(matches!(conn.events.try_recv(), Ok(Event::Closed(None))));
    assert_eq!(
        next_control(&mut queues),
        Some(Packet::CloseResponse {
            connect_id: 3,
            error: None
        })
    );
}

#[test]
fn shutdown_fails_pending_dials_and_resets_connections() {
    let (mux, _queues) = mux(1 << 20);
    let mut conn = open(&mux, 1);
    let (_, mut pending) = mux.begin_dial().unwrap();
    mux.shutdown("agent gone");
    assert!(matches!(pending.try_recv(), Ok(Err(e)) if e == "agent gone"));
    assert!(matches!(conn.events.try_recv(), Ok(Event::Reset(_))));
    assert!(mux.begin_dial().is_err());
}

#[tokio::test]
async fn control_packets_overtake_ordered_ones_and_end_stops_the_stream() {
    let (mux, queues) = mux(1 << 20);
    let (end, end_rx) = oneshot::channel();
    let mut stream = outbound(queues, end_rx);
    mux.send_ordered(Packet::CloseRequest { connect_id: 1 })
        .await
        .unwrap();
    mux.control(Packet::Drain);
    assert_eq!(stream.next().await.unwrap().unwrap(), Packet::Drain);
    assert_eq!(
        stream.next().await.unwrap().unwrap(),
        Packet::CloseRequest { connect_id: 1 }
    );
    end.send(Some(Status::unavailable("bye"))).unwrap();
    assert_eq!(
        stream.next().await.unwrap().unwrap_err().code(),
        tonic::Code::Unavailable
    );
    assert!(stream.next().await.is_none());
}

#[tokio::test]
async fn a_clean_end_sends_the_queued_packets_first() {
    let (mux, queues) = mux(1 << 20);
    let (end, end_rx) = oneshot::channel();
    let mut stream = outbound(queues, end_rx);
    // An idle agent told DRAIN and ended at once, as a drain does.
    mux.control(Packet::Drain);
    end.send(None).unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap(), Packet::Drain);
    assert!(stream.next().await.is_none());
}
