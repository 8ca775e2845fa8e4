//! CONTINUATION (RFC 9113 §6.10): more of a HEADERS or PUSH_PROMISE field block.
use super::{Head, flags};

/// A CONTINUATION frame as seen from its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Continuation {
    pub stream_id: u32,
    /// Last fragment of the field block.
    pub end_headers: bool,
    pub length: u32,
}

impl Continuation {
    pub(super) fn load(head: &Head) -> Continuation {
        Continuation {
            stream_id: head.stream_id,
            end_headers: head.has_flag(flags::END_HEADERS),
            length: head.length,
        }
    }
}
