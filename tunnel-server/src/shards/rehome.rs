//! Moving a socket to another runtime: tokio registers a socket with the reactor of the
//! runtime it was made on, and its readiness is reported on that runtime's thread. A socket
//! moved to a shard is taken out of its reactor (`into_std`) and registered with the shard's
//! (`from_std`), so its wake-ups stay on the shard. Must run on the destination runtime.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// A socket that can be re-registered with the runtime it now runs on.
pub trait Rehome: Sized + Send + 'static {
    /// Register with the calling task's runtime. Call it on the destination runtime.
    fn rehome(self) -> io::Result<Self>;
}

impl Rehome for UnixStream {
    fn rehome(self) -> io::Result<Self> {
        UnixStream::from_std(self.into_std()?)
    }
}

impl Rehome for TcpStream {
    fn rehome(self) -> io::Result<Self> {
        TcpStream::from_std(self.into_std()?)
    }
}

/// A TCP stream that can be re-registered while something owns it, such as a TLS stream
/// (tokio-rustls's server stream cannot be taken apart and put back together).
#[derive(Debug)]
pub struct MovableTcp(Option<TcpStream>);

impl MovableTcp {
    /// Wrap `tcp`.
    pub fn new(tcp: TcpStream) -> MovableTcp {
        MovableTcp(Some(tcp))
    }

    /// Re-register with the calling task's runtime. On error the stream is gone, and reads
    /// and writes fail with `NotConnected`.
    pub fn rehome_in_place(&mut self) -> io::Result<()> {
        let tcp = self.0.take().ok_or_else(gone)?;
        self.0 = Some(tcp.rehome()?);
        Ok(())
    }

    fn inner(&mut self) -> io::Result<&mut TcpStream> {
        self.0.as_mut().ok_or_else(gone)
    }
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "socket lost moving to its shard",
    )
}

impl Rehome for Box<tokio_rustls::server::TlsStream<MovableTcp>> {
    fn rehome(mut self) -> io::Result<Self> {
        self.get_mut().0.rehome_in_place()?;
        Ok(self)
    }
}

impl AsyncRead for MovableTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().inner() {
            Ok(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for MovableTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().inner() {
            Ok(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().inner() {
            Ok(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().inner() {
            Ok(tcp) => Pin::new(tcp).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().inner() {
            Ok(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}
