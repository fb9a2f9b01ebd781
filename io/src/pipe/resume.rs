//! Where a pipe stops to move to its lane's thread, and what it hands over to continue
//! there ([`Resume`]).

use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};

use super::{PipeEnd, StreamRecv, StreamSend};

/// Where one direction stopped without failing.
pub(super) enum Step<T> {
    /// It reached its end.
    Done(T),
    /// It moved to the lane and stopped there, for the pipe to be continued elsewhere.
    Switched,
}

/// A pipe stopped to move to its lane's thread: its socket, the lane stream's halves, and
/// how far each direction got.
pub struct Resume<S> {
    pub(super) socket: S,
    pub(super) send: StreamSend,
    pub(super) recv: StreamRecv,
    pub(super) up_done: bool,
    pub(super) down_end: Option<PipeEnd>,
    pub(super) socket_eof: bool,
    pub(super) up_bytes: u64,
    pub(super) down_bytes: u64,
    pub(super) moved: bool,
}

/// A pipe's state while it runs: what [`Resume`] holds, the socket split in its halves.
/// `run` takes it as its one argument and works on its fields in place: a future keeps
/// its arguments for its whole life, so unpacking them into locals would hold both
/// (memory per idle tunnel).
pub(super) struct Parts<S> {
    pub(super) reader: ReadHalf<S>,
    pub(super) writer: WriteHalf<S>,
    pub(super) send: StreamSend,
    pub(super) recv: StreamRecv,
    pub(super) up_done: bool,
    pub(super) down_end: Option<PipeEnd>,
    pub(super) socket_eof: bool,
    pub(super) up_bytes: u64,
    pub(super) down_bytes: u64,
    pub(super) moved: bool,
}

impl<S: AsyncRead + AsyncWrite> Resume<S> {
    pub(super) fn into_parts(self) -> Parts<S> {
        let (reader, writer) = tokio::io::split(self.socket);
        Parts {
            reader,
            writer,
            send: self.send,
            recv: self.recv,
            up_done: self.up_done,
            down_end: self.down_end,
            socket_eof: self.socket_eof,
            up_bytes: self.up_bytes,
            down_bytes: self.down_bytes,
            moved: self.moved,
        }
    }
}

impl<S> Resume<S> {
    pub(super) fn start(socket: S, send: StreamSend, recv: StreamRecv) -> Resume<S> {
        Resume {
            socket,
            send,
            recv,
            up_done: false,
            down_end: None,
            socket_eof: false,
            up_bytes: 0,
            down_bytes: 0,
            moved: false,
        }
    }

    /// The same pipe over `f(socket)` (the socket re-registered where it now runs).
    pub fn map_socket<T>(
        self,
        f: impl FnOnce(S) -> std::io::Result<T>,
    ) -> std::io::Result<Resume<T>> {
        Ok(Resume {
            socket: f(self.socket)?,
            send: self.send,
            recv: self.recv,
            up_done: self.up_done,
            down_end: self.down_end,
            socket_eof: self.socket_eof,
            up_bytes: self.up_bytes,
            down_bytes: self.down_bytes,
            moved: self.moved,
        })
    }
}
