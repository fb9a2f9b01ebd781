//! HTTP/2 settings for a tunnel session. Both ends receive bulk data, so both builders get the
//! same windows; the defaults are the values that measured fastest here (docs/ARCHITECTURE.md).

use serde::Deserialize;

/// Flow-control and framing settings applied to both ends of an edge session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct H2Tuning {
    /// Per-stream receive window in bytes: bounds what one stalled stream can buffer.
    pub stream_window: u32,
    /// Per-connection receive window in bytes: bounds what one session can buffer in total.
    pub connection_window: u32,
    /// Largest DATA frame accepted, in bytes.
    pub max_frame_size: u32,
    /// Bytes one stream may queue for sending before it waits for the socket.
    pub max_send_buffer: usize,
    /// Streams the peer may have open at once on this session.
    pub max_concurrent_streams: u32,
}

/// 16 MiB per stream: large enough to keep one stream at line rate, small enough that three
/// stalled streams leave most of the connection window to the others.
pub const DEFAULT_STREAM_WINDOW: u32 = 16 << 20;
/// 64 MiB per session.
pub const DEFAULT_CONNECTION_WINDOW: u32 = 64 << 20;
/// 1 MiB frames: TLS records are 16 KiB anyway, larger frames measured slower.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 1 << 20;
/// 4 MiB send buffer per stream.
pub const DEFAULT_MAX_SEND_BUFFER: usize = 4 << 20;
/// Streams per session; a kubelet rarely sees more than a few hundred at once.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 10_000;
/// Largest header list accepted on a session, in bytes as HTTP/2 counts them (name, value
/// and 32 bytes per field), both roles. A CONNECT, its answer and the session-info exchange
/// carry a few hundred bytes (the longest values, `tether-client` and `tether-reason`, are
/// cut at 200 characters). h2's default of 16 MiB let one peer make the other buffer 16 MiB
/// per connection (measured: 40 connections grew the server from 11 MB to 656 MB).
pub const MAX_HEADER_LIST: u32 = 8 << 10;

impl Default for H2Tuning {
    fn default() -> Self {
        H2Tuning {
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_CONNECTION_WINDOW,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            max_send_buffer: DEFAULT_MAX_SEND_BUFFER,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
        }
    }
}

impl H2Tuning {
    /// Check the values against HTTP/2's own bounds; the error names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        const MAX_WINDOW: u32 = (1 << 31) - 1;
        if self.stream_window < 65_535 || self.stream_window > MAX_WINDOW {
            return Err(format!("stream_window must be 65535..={MAX_WINDOW}"));
        }
        if self.connection_window < self.stream_window || self.connection_window > MAX_WINDOW {
            return Err(format!(
                "connection_window must be stream_window..={MAX_WINDOW}"
            ));
        }
        if !(16_384..=16_777_215).contains(&self.max_frame_size) {
            return Err("max_frame_size must be 16384..=16777215".into());
        }
        if self.max_send_buffer == 0 {
            return Err("max_send_buffer must be > 0".into());
        }
        if self.max_concurrent_streams == 0 {
            return Err("max_concurrent_streams must be > 0".into());
        }
        Ok(())
    }

    /// A client builder (tunnel-server's side of an edge session) with these settings.
    pub fn client_builder(&self) -> h2::client::Builder {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_send_buffer_size(self.max_send_buffer)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_concurrent_reset_streams(1024)
            .max_header_list_size(MAX_HEADER_LIST)
            .enable_push(false);
        b
    }

    /// A server builder (the edge's side of an edge session) with these settings.
    pub fn server_builder(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_send_buffer_size(self.max_send_buffer)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_concurrent_reset_streams(1024)
            .max_pending_accept_reset_streams(1024)
            .max_header_list_size(MAX_HEADER_LIST);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        H2Tuning::default().validate().unwrap();
    }

    #[test]
    fn connection_window_below_stream_window_is_refused() {
        let t = H2Tuning {
            connection_window: 1 << 20,
            ..H2Tuning::default()
        };
        assert!(t.validate().unwrap_err().contains("connection_window"));
    }
}
