//! HEADERS (RFC 9113 §6.2). Only the header is captured: the field block is HPACK state
//! this tracer never decodes.
use super::{Error, Head, flags, min_length};

/// A HEADERS frame as seen from its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headers {
    pub stream_id: u32,
    pub end_stream: bool,
    /// No CONTINUATION follows.
    pub end_headers: bool,
    pub length: u32,
}

impl Headers {
    pub(super) fn load(head: &Head) -> Result<Headers, Error> {
        // Room for the pad-length octet and the 5-octet priority block the flags announce.
        let pad = u32::from(head.has_flag(flags::PADDED));
        let priority = if head.has_flag(flags::PRIORITY) { 5 } else { 0 };
        min_length(head, pad + priority)?;
        Ok(Headers {
            stream_id: head.stream_id,
            end_stream: head.has_flag(flags::END_STREAM),
            end_headers: head.has_flag(flags::END_HEADERS),
            length: head.length,
        })
    }
}
