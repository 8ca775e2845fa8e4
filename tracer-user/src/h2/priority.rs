//! PRIORITY (RFC 9113 §6.3), deprecated by RFC 9113 but still sent (nghttp2 does).
use super::{Error, Head, STREAM_ID_MASK, be_u32, fixed_payload};

/// A PRIORITY frame: the stream's place in the (deprecated) dependency tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Priority {
    pub stream_id: u32,
    /// The stream this one depends on (0: the root).
    pub dependency: u32,
    pub exclusive: bool,
    /// Weight 1..=256 (the wire carries weight − 1).
    pub weight: u16,
}

impl Priority {
    pub const LEN: usize = 5;

    pub(super) fn load(head: &Head, payload: &[u8]) -> Result<Priority, Error> {
        let &[d0, d1, d2, d3, weight] = fixed_payload::<{ Self::LEN }>(head, payload)?;
        let dep = be_u32([d0, d1, d2, d3]);
        Ok(Priority {
            stream_id: head.stream_id,
            dependency: dep & STREAM_ID_MASK,
            exclusive: dep & !STREAM_ID_MASK != 0,
            weight: u16::from(weight) + 1,
        })
    }
}
