//! The frame scheduler's state machine: frames in as h2 wrote them, frames out in the order
//! the session should send them. No I/O, no clock; [`super::ScheduledWriter`] drives it.
//!
//! Order out, first match wins:
//! 1. the client preface, as written;
//! 2. urgent frames: PING, connection WINDOW_UPDATE, and a stream's WINDOW_UPDATE once the
//!    stream exists on the wire (so a bidirectional bulk stream's receive window is not
//!    held back by its own send backlog);
//! 3. a barrier (SETTINGS, GOAWAY, any other stream-0 frame) once everything queued before
//!    it is out; nothing queued after it goes before it;
//! 4. streams, as fq_codel serves flows: a stream that had nothing queued joins the *new*
//!    list and is served before the *old* list, in order of arrival, until it used one
//!    quantum or emptied; then it joins the old list, served by deficit round robin. A
//!    stream in the old list does not become new again until it was seen empty at the old
//!    list's head, so a stream cannot stay "new" by sending in bursts, and a bulk stream
//!    gets a quantum every round of the old list.
//!
//! Within a stream frames keep their order. Unpadded DATA is cut into frames of at most one
//! quantum (END_STREAM only on the last piece); everything else goes out whole, a HEADERS
//! block with its CONTINUATION frames as one unit. A HEADERS that opens a stream (a stream
//! ID above every ID of its parity seen so far) waits for the HEADERS that opened earlier
//! streams, so stream IDs increase on the wire (RFC 9113 §5.1.1).

use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

use super::frames::{
    Cursor, Header, Lane, CONTINUATION, DATA, FLAG_END_HEADERS, FLAG_END_STREAM, FRAME_HEADER,
    HEADERS, PUSH_PROMISE,
};

/// Largest buffer reserved up front for one DATA frame's payload, in bytes: the frame's
/// length comes from the header, and a frame is received as h2 writes it, so anything
/// beyond this grows as the bytes arrive.
const MAX_PREALLOC: usize = 256 << 10;

/// Where the bytes of the frame being received go.
#[derive(Debug, Clone, Copy)]
enum Dest {
    Urgent,
    Barrier,
    Flow(u32),
}

#[derive(Debug)]
enum Body {
    /// Unpadded DATA, split at the quantum as it goes out.
    Data {
        payload: BytesMut,
        /// Payload bytes still to be received from h2.
        left: usize,
        end_stream: bool,
    },
    /// Whole frames that go out as one unit.
    Raw {
        bytes: BytesMut,
        complete: bool,
        /// A HEADERS that opens its stream.
        opens: bool,
    },
}

#[derive(Debug)]
struct Item {
    /// Barriers queued before this item (see [`FrameScheduler::current`]).
    epoch: u64,
    body: Body,
}

#[derive(Debug, Default)]
struct Flow {
    items: VecDeque<Item>,
    deficit: i64,
    /// Its opening HEADERS is still queued.
    unopened: bool,
}

/// The scheduler's tuning, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedConfig {
    /// Largest DATA frame cut from a queued one, and the deficit round robin quantum.
    pub quantum: usize,
    /// Bytes committed to the output at once (frames staged for one vectored write).
    pub stage: usize,
}

/// Frames in, frames out, reordered by the rules in the module documentation.
#[derive(Debug)]
pub struct FrameScheduler {
    config: SchedConfig,
    cursor: Cursor,
    dest: Dest,
    /// A HEADERS/PUSH_PROMISE block on this stream awaits its CONTINUATION frames.
    continuation: Option<u32>,
    /// Highest stream ID a HEADERS was seen for, by parity (index = ID & 1).
    highest: [u32; 2],
    urgent: VecDeque<Item>,
    barriers: VecDeque<Item>,
    flows: HashMap<u32, Flow>,
    new_flows: VecDeque<u32>,
    old_flows: VecDeque<u32>,
    /// Streams whose opening HEADERS is queued, in the order h2 wrote them.
    opens: VecDeque<u32>,
    /// Barriers already written; items of a later epoch wait for the barrier before them.
    current: u64,
    /// Items not yet fully written, per epoch from `current` on.
    pending: VecDeque<usize>,
    /// Bytes held in items (DATA counted as payload plus one header).
    held: usize,
    /// Staged output, written before anything else is chosen.
    out: VecDeque<Bytes>,
    out_len: usize,
}

impl FrameScheduler {
    /// A scheduler for a connection whose first `preface` bytes are not frames (the client
    /// preface, [`super::frames::CLIENT_PREFACE_LEN`], on the HTTP/2 client's side).
    pub fn new(config: SchedConfig, preface: usize) -> Self {
        FrameScheduler {
            config,
            cursor: Cursor::new(preface),
            dest: Dest::Urgent,
            continuation: None,
            highest: [0; 2],
            urgent: VecDeque::new(),
            barriers: VecDeque::new(),
            flows: HashMap::new(),
            new_flows: VecDeque::new(),
            old_flows: VecDeque::new(),
            opens: VecDeque::new(),
            current: 0,
            pending: VecDeque::new(),
            held: 0,
            out: VecDeque::new(),
            out_len: 0,
        }
    }

    /// Bytes accepted and not yet handed out by [`Self::consume`].
    pub fn queued(&self) -> usize {
        self.held + self.out_len
    }

    /// True when nothing is queued or staged.
    pub fn is_empty(&self) -> bool {
        self.queued() == 0
    }

    /// Accept bytes as h2 wrote them (any boundaries); they are copied.
    pub fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.cursor {
                Cursor::Preface(left) => {
                    let n = (*left).min(bytes.len());
                    *left -= n;
                    if *left == 0 {
                        self.cursor = Cursor::empty_header();
                    }
                    self.stage_bytes(Bytes::copy_from_slice(&bytes[..n]));
                    bytes = &bytes[n..];
                }
                Cursor::Header { buf, filled } => {
                    let n = (FRAME_HEADER - *filled).min(bytes.len());
                    buf[*filled..*filled + n].copy_from_slice(&bytes[..n]);
                    *filled += n;
                    bytes = &bytes[n..];
                    if *filled == FRAME_HEADER {
                        let raw = *buf;
                        self.start_frame(&raw);
                    }
                }
                Cursor::Payload { left } => {
                    let n = (*left).min(bytes.len());
                    *left -= n;
                    let done = *left == 0;
                    self.append(&bytes[..n]);
                    bytes = &bytes[n..];
                    if done {
                        self.finish_frame();
                    }
                }
            }
        }
    }

    /// Fill `dst` with the staged output, choosing more frames first if too little is
    /// staged; returns how many slices were filled (0: nothing can go out now).
    pub fn slices<'a>(&'a mut self, dst: &mut [IoSlice<'a>]) -> usize {
        while self.out_len < self.config.stage && self.stage_one() {}
        let mut n = 0;
        for (slot, chunk) in dst.iter_mut().zip(self.out.iter()) {
            *slot = IoSlice::new(chunk);
            n += 1;
        }
        n
    }

    /// `n` bytes of the staged output were written.
    pub fn consume(&mut self, mut n: usize) {
        self.out_len -= n.min(self.out_len);
        while n > 0 {
            let Some(front) = self.out.front_mut() else {
                return;
            };
            if front.len() > n {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.out.pop_front();
        }
    }

    /// The next frames to write, in order, as one buffer (for tests and non-vectored use).
    pub fn next_chunk(&mut self) -> Option<Bytes> {
        while self.out_len < self.config.stage && self.stage_one() {}
        if self.out.is_empty() {
            return None;
        }
        let mut buf = BytesMut::with_capacity(self.out_len);
        for chunk in self.out.drain(..) {
            buf.extend_from_slice(&chunk);
        }
        self.out_len = 0;
        Some(buf.freeze())
    }

    fn stage_bytes(&mut self, bytes: Bytes) {
        self.out_len += bytes.len();
        self.out.push_back(bytes);
    }

    fn epoch(&self) -> u64 {
        self.current + self.barriers.len() as u64
    }

    fn count_pending(&mut self, epoch: u64) {
        let index = (epoch - self.current) as usize;
        if self.pending.len() <= index {
            self.pending.resize(index + 1, 0);
        }
        self.pending[index] += 1;
    }

    fn done_pending(&mut self) {
        // Only items of the current epoch are ever written.
        if let Some(count) = self.pending.front_mut() {
            *count = count.saturating_sub(1);
        }
    }

    fn flow(&mut self, stream: u32) -> &mut Flow {
        let config = self.config;
        let new_flows = &mut self.new_flows;
        self.flows.entry(stream).or_insert_with(|| {
            new_flows.push_back(stream);
            Flow {
                deficit: config.quantum as i64,
                ..Flow::default()
            }
        })
    }

    fn start_frame(&mut self, raw: &[u8; FRAME_HEADER]) {
        let h = Header::parse(raw);
        let epoch = self.epoch();
        let raw_item = |opens| Item {
            epoch,
            body: Body::Raw {
                bytes: BytesMut::from(&raw[..]),
                complete: false,
                opens,
            },
        };
        // A stream is known once a HEADERS for it was seen: only then may its WINDOW_UPDATE
        // leave its queue, and only a HEADERS above every earlier one opens a stream.
        let parity = (h.stream & 1) as usize;
        let unseen = h.stream > self.highest[parity];
        if h.kind == HEADERS && unseen {
            self.highest[parity] = h.stream;
        }
        if h.kind == CONTINUATION && self.continuation == Some(h.stream) {
            if h.flags & FLAG_END_HEADERS != 0 {
                self.continuation = None;
            }
            // Into the HEADERS block it continues, which is still queued: it goes out only
            // once complete.
            self.dest = Dest::Flow(h.stream);
            self.append(raw);
        } else {
            self.held += FRAME_HEADER;
            match h.lane() {
                Lane::Urgent => self.push_urgent(raw_item(false)),
                Lane::Barrier => {
                    self.barriers.push_back(raw_item(false));
                    self.dest = Dest::Barrier;
                }
                Lane::StreamWindowUpdate => {
                    let known = !unseen && !self.flows.get(&h.stream).is_some_and(|f| f.unopened);
                    if known {
                        self.push_urgent(raw_item(false));
                    } else {
                        self.push_flow(h.stream, raw_item(false));
                    }
                }
                Lane::Data => {
                    let item = Item {
                        epoch,
                        body: Body::Data {
                            payload: BytesMut::with_capacity(h.len.min(MAX_PREALLOC)),
                            left: h.len,
                            end_stream: h.flags & FLAG_END_STREAM != 0,
                        },
                    };
                    self.push_flow(h.stream, item);
                }
                Lane::Stream => {
                    let opens = h.kind == HEADERS && unseen;
                    if matches!(h.kind, HEADERS | PUSH_PROMISE) && h.flags & FLAG_END_HEADERS == 0 {
                        self.continuation = Some(h.stream);
                    }
                    self.push_flow(h.stream, raw_item(opens));
                    if opens {
                        self.opens.push_back(h.stream);
                        self.flow(h.stream).unopened = true;
                    }
                }
            }
        }
        if h.len == 0 {
            self.finish_frame();
        } else {
            self.cursor = Cursor::Payload { left: h.len };
        }
    }

    fn push_urgent(&mut self, item: Item) {
        self.count_pending(item.epoch);
        self.urgent.push_back(item);
        self.dest = Dest::Urgent;
    }

    fn push_flow(&mut self, stream: u32, item: Item) {
        self.count_pending(item.epoch);
        self.flow(stream).items.push_back(item);
        self.dest = Dest::Flow(stream);
    }

    fn current_item(&mut self) -> Option<&mut Item> {
        match self.dest {
            Dest::Urgent => self.urgent.back_mut(),
            Dest::Barrier => self.barriers.back_mut(),
            Dest::Flow(s) => self.flows.get_mut(&s).and_then(|f| f.items.back_mut()),
        }
    }

    fn append(&mut self, bytes: &[u8]) {
        self.held += bytes.len();
        match self.current_item().map(|i| &mut i.body) {
            Some(Body::Data { payload, left, .. }) => {
                payload.extend_from_slice(bytes);
                *left -= bytes.len().min(*left);
            }
            Some(Body::Raw { bytes: raw, .. }) => raw.extend_from_slice(bytes),
            None => debug_assert!(false, "frame bytes without a frame"),
        }
    }

    fn finish_frame(&mut self) {
        self.cursor = Cursor::empty_header();
        let in_block = self.continuation.is_some();
        if let Some(Item {
            body: Body::Raw { complete, .. },
            ..
        }) = self.current_item()
        {
            *complete = !in_block;
        }
    }

    /// Stage the next piece; false when nothing may go out now.
    fn stage_one(&mut self) -> bool {
        let current = self.current;
        if let Some(item) = self.urgent.front() {
            if item.epoch == current && raw_complete(item) {
                let item = self.urgent.pop_front().expect("front exists");
                self.stage_raw(item);
                return true;
            }
        }
        if self.pending.front().copied().unwrap_or(0) == 0 {
            if let Some(item) = self.barriers.front() {
                if raw_complete(item) {
                    let item = self.barriers.pop_front().expect("front exists");
                    if let Body::Raw { bytes, .. } = item.body {
                        self.held -= bytes.len();
                        self.stage_bytes(bytes.freeze());
                    }
                    self.current += 1;
                    self.pending.pop_front();
                    return true;
                }
            }
        }
        match self.select_flow() {
            Some(stream) => {
                self.stage_from_flow(stream);
                true
            }
            None => false,
        }
    }

    fn eligible(&self, stream: u32, flow: &Flow) -> bool {
        let Some(item) = flow.items.front() else {
            return false;
        };
        if item.epoch != self.current {
            return false;
        }
        match &item.body {
            Body::Data { payload, left, .. } => !payload.is_empty() || *left == 0,
            Body::Raw {
                complete, opens, ..
            } => *complete && (!opens || self.opens.front() == Some(&stream)),
        }
    }

    /// The stream to serve next, by the new/old list rules. Every flow is visited a bounded
    /// number of times: each step serves, drops or moves a flow, or skips an ineligible one.
    fn select_flow(&mut self) -> Option<u32> {
        let quantum = self.config.quantum as i64;
        let mut i = 0;
        while i < self.new_flows.len() {
            let stream = self.new_flows[i];
            let flow = &self.flows[&stream];
            if flow.items.is_empty() || flow.deficit <= 0 {
                self.new_flows.remove(i);
                self.old_flows.push_back(stream);
                let flow = self.flows.get_mut(&stream).expect("listed flow exists");
                if flow.deficit <= 0 {
                    flow.deficit += quantum;
                }
                continue;
            }
            if self.eligible(stream, flow) {
                return Some(stream);
            }
            i += 1;
        }
        let rounds = 3 * self.old_flows.len() + 1;
        for _ in 0..rounds {
            let &stream = self.old_flows.front()?;
            let flow = &self.flows[&stream];
            if flow.items.is_empty() {
                self.old_flows.pop_front();
                self.flows.remove(&stream);
            } else if flow.deficit <= 0 {
                self.flows.get_mut(&stream).expect("listed").deficit += quantum;
                self.old_flows.rotate_left(1);
            } else if self.eligible(stream, flow) {
                return Some(stream);
            } else {
                self.old_flows.rotate_left(1);
            }
        }
        None
    }

    fn stage_from_flow(&mut self, stream: u32) {
        let quantum = self.config.quantum;
        let flow = self.flows.get_mut(&stream).expect("selected flow exists");
        let Some(item) = flow.items.front_mut() else {
            return;
        };
        match &mut item.body {
            Body::Data {
                payload,
                left,
                end_stream,
            } => {
                let n = payload.len().min(quantum);
                let last = n == payload.len() && *left == 0;
                let flags = if last && *end_stream {
                    FLAG_END_STREAM
                } else {
                    0
                };
                let header = Header {
                    len: n,
                    kind: DATA,
                    flags,
                    stream,
                };
                let piece = payload.split_to(n).freeze();
                flow.deficit -= (n + FRAME_HEADER) as i64;
                self.held -= n;
                if last {
                    flow.items.pop_front();
                    self.held -= FRAME_HEADER;
                    self.done_pending();
                }
                self.stage_bytes(Bytes::copy_from_slice(&header.encode()));
                if n > 0 {
                    self.stage_bytes(piece);
                }
            }
            Body::Raw { .. } => {
                let item = flow.items.pop_front().expect("front exists");
                if let Body::Raw { bytes, opens, .. } = &item.body {
                    flow.deficit -= bytes.len() as i64;
                    if *opens {
                        flow.unopened = false;
                        self.opens.pop_front();
                    }
                }
                self.stage_raw(item);
            }
        }
    }

    fn stage_raw(&mut self, item: Item) {
        if let Body::Raw { bytes, .. } = item.body {
            self.held -= bytes.len();
            self.done_pending();
            self.stage_bytes(bytes.freeze());
        }
    }
}

fn raw_complete(item: &Item) -> bool {
    matches!(item.body, Body::Raw { complete: true, .. })
}
