//! GOAWAY (RFC 9113 §6.8): the sender stops accepting streams above `last_stream_id`,
//! and says why.
use bytes::Bytes;

use super::{Error, Head, Reason, STREAM_ID_MASK, be_u32};

/// A GOAWAY frame. The debug data is whatever of it was captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoAway {
    /// Highest peer-initiated stream the sender may have processed (31 bits).
    pub last_stream_id: u32,
    pub reason: Reason,
    /// Additional debug data (opaque; often ASCII), possibly cut short by the capture.
    pub debug: Bytes,
    /// The capture ended before the frame did: `debug` is only a prefix.
    pub debug_truncated: bool,
}

impl GoAway {
    /// Fixed part of the payload: last stream id and error code.
    pub const MIN_LEN: usize = 8;

    pub(super) fn load(head: &Head, payload: &[u8]) -> Result<GoAway, Error> {
        if (head.length as usize) < Self::MIN_LEN {
            return Err(Error::BadLength {
                kind: head.kind,
                length: head.length,
            });
        }
        let Some((&[s0, s1, s2, s3, c0, c1, c2, c3], debug)) =
            payload.split_first_chunk::<{ Self::MIN_LEN }>()
        else {
            return Err(Error::Truncated {
                kind: head.kind,
                needed: Self::MIN_LEN,
                captured: payload.len(),
            });
        };
        Ok(GoAway {
            last_stream_id: be_u32([s0, s1, s2, s3]) & STREAM_ID_MASK,
            reason: Reason(be_u32([c0, c1, c2, c3])),
            debug: Bytes::copy_from_slice(debug),
            debug_truncated: payload.len() < head.length as usize,
        })
    }

    /// The debug data as text for logs and JSON: invalid UTF-8 replaced, control
    /// characters turned into spaces, surrounding whitespace trimmed.
    pub fn debug_text(&self) -> String {
        String::from_utf8_lossy(&self.debug)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect::<String>()
            .trim()
            .to_owned()
    }
}
