//! DATA (RFC 9113 §6.1). Only the header is captured: the body is application data.
use super::{Error, Head, flags, min_length};

/// A DATA frame as seen from its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Data {
    pub stream_id: u32,
    pub end_stream: bool,
    /// Payload length, padding included (it all counts against flow control).
    pub length: u32,
}

impl Data {
    pub(super) fn load(head: &Head) -> Result<Data, Error> {
        // A padded frame carries at least its pad-length octet.
        min_length(head, u32::from(head.has_flag(flags::PADDED)))?;
        Ok(Data {
            stream_id: head.stream_id,
            end_stream: head.has_flag(flags::END_STREAM),
            length: head.length,
        })
    }
}
