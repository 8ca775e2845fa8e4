//! PUSH_PROMISE (RFC 9113 §6.6): the server reserves a stream for a response it will push.
use super::{Error, Head, STREAM_ID_MASK, be_u32, flags, min_length};

/// A PUSH_PROMISE frame as seen from its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PushPromise {
    /// The stream of the request the push is associated with.
    pub stream_id: u32,
    pub end_headers: bool,
    pub length: u32,
    /// The reserved stream, when the payload's first octets were captured (they normally
    /// are not: the kernel copies control-frame payloads only).
    pub promised_stream_id: Option<u32>,
}

impl PushPromise {
    pub(super) fn load(head: &Head, payload: &[u8]) -> Result<PushPromise, Error> {
        let padded = head.has_flag(flags::PADDED);
        let offset = usize::from(padded);
        min_length(head, 4 + u32::from(padded))?;
        let promised_stream_id = payload
            .get(offset..)
            .and_then(|p| p.first_chunk::<4>())
            .map(|b| be_u32(*b) & STREAM_ID_MASK);
        Ok(PushPromise {
            stream_id: head.stream_id,
            end_headers: head.has_flag(flags::END_HEADERS),
            length: head.length,
            promised_stream_id,
        })
    }
}
