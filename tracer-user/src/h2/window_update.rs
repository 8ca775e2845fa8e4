//! WINDOW_UPDATE (RFC 9113 §6.9): flow-control credit for a stream or the connection.
use super::{Error, Head, STREAM_ID_MASK, be_u32, fixed_payload};

/// A WINDOW_UPDATE frame. Stream 0 means the connection-level window.
///
/// An increment of 0 is a protocol error for the receiver, but it is a fact worth
/// reporting (it typically precedes the peer's GOAWAY), so it is decoded, not rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowUpdate {
    pub stream_id: u32,
    /// Credit in octets, 31 bits (reserved bit masked off).
    pub increment: u32,
}

impl WindowUpdate {
    pub const LEN: usize = 4;

    pub(super) fn load(head: &Head, payload: &[u8]) -> Result<WindowUpdate, Error> {
        let inc = fixed_payload::<{ Self::LEN }>(head, payload)?;
        Ok(WindowUpdate {
            stream_id: head.stream_id,
            increment: be_u32(*inc) & STREAM_ID_MASK,
        })
    }
}
