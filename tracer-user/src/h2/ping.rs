//! PING (RFC 9113 §6.7): liveness and round-trip probe, echoed back with ACK.
use super::{Error, Head, fixed_payload, flags};

/// A PING frame. The opaque octets pair a probe with its acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ping {
    pub ack: bool,
    pub opaque: [u8; 8],
}

impl Ping {
    pub const LEN: usize = 8;

    pub(super) fn load(head: &Head, payload: &[u8]) -> Result<Ping, Error> {
        let opaque = fixed_payload::<{ Self::LEN }>(head, payload)?;
        Ok(Ping {
            ack: head.has_flag(flags::ACK),
            opaque: *opaque,
        })
    }
}
