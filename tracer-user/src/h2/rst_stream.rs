//! RST_STREAM (RFC 9113 §6.4): immediate termination of one stream.
use super::{Error, Head, Reason, be_u32, fixed_payload};

/// A RST_STREAM frame: which stream was reset, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RstStream {
    pub stream_id: u32,
    pub reason: Reason,
}

impl RstStream {
    pub const LEN: usize = 4;

    pub(super) fn load(head: &Head, payload: &[u8]) -> Result<RstStream, Error> {
        let code = fixed_payload::<{ Self::LEN }>(head, payload)?;
        Ok(RstStream {
            stream_id: head.stream_id,
            reason: Reason(be_u32(*code)),
        })
    }
}
