//! HTTP/2 error codes (RFC 9113 §7), as carried by RST_STREAM and GOAWAY.
use std::fmt;

/// A 32-bit HTTP/2 error code. Any value can appear on the wire; codes outside the
/// registry are kept and shown in hex (§7: unknown codes MUST NOT trigger special behaviour).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reason(pub u32);

impl Reason {
    /// Graceful shutdown, or no error at all.
    pub const NO_ERROR: Reason = Reason(0x0);
    /// The peer broke the protocol without a more specific code.
    pub const PROTOCOL_ERROR: Reason = Reason(0x1);
    /// The endpoint failed unexpectedly.
    pub const INTERNAL_ERROR: Reason = Reason(0x2);
    /// The peer ignored flow control.
    pub const FLOW_CONTROL_ERROR: Reason = Reason(0x3);
    /// A SETTINGS frame went unacknowledged for too long.
    pub const SETTINGS_TIMEOUT: Reason = Reason(0x4);
    /// A frame arrived on a half-closed stream.
    pub const STREAM_CLOSED: Reason = Reason(0x5);
    /// A frame had an invalid size.
    pub const FRAME_SIZE_ERROR: Reason = Reason(0x6);
    /// The stream was refused before any application processing.
    pub const REFUSED_STREAM: Reason = Reason(0x7);
    /// The stream is no longer needed.
    pub const CANCEL: Reason = Reason(0x8);
    /// The field-section compression context could not be maintained.
    pub const COMPRESSION_ERROR: Reason = Reason(0x9);
    /// The connection made for a CONNECT request was reset or closed.
    pub const CONNECT_ERROR: Reason = Reason(0xa);
    /// The peer is generating too much load.
    pub const ENHANCE_YOUR_CALM: Reason = Reason(0xb);
    /// The transport does not meet the minimum security requirements.
    pub const INADEQUATE_SECURITY: Reason = Reason(0xc);
    /// The request must be retried over HTTP/1.1.
    pub const HTTP_1_1_REQUIRED: Reason = Reason(0xd);

    /// The registered name, `None` for codes outside RFC 9113's list.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Reason::NO_ERROR => "NO_ERROR",
            Reason::PROTOCOL_ERROR => "PROTOCOL_ERROR",
            Reason::INTERNAL_ERROR => "INTERNAL_ERROR",
            Reason::FLOW_CONTROL_ERROR => "FLOW_CONTROL_ERROR",
            Reason::SETTINGS_TIMEOUT => "SETTINGS_TIMEOUT",
            Reason::STREAM_CLOSED => "STREAM_CLOSED",
            Reason::FRAME_SIZE_ERROR => "FRAME_SIZE_ERROR",
            Reason::REFUSED_STREAM => "REFUSED_STREAM",
            Reason::CANCEL => "CANCEL",
            Reason::COMPRESSION_ERROR => "COMPRESSION_ERROR",
            Reason::CONNECT_ERROR => "CONNECT_ERROR",
            Reason::ENHANCE_YOUR_CALM => "ENHANCE_YOUR_CALM",
            Reason::INADEQUATE_SECURITY => "INADEQUATE_SECURITY",
            Reason::HTTP_1_1_REQUIRED => "HTTP_1_1_REQUIRED",
            _ => return None,
        })
    }
}

impl From<u32> for Reason {
    fn from(code: u32) -> Reason {
        Reason(code)
    }
}

impl From<Reason> for u32 {
    fn from(reason: Reason) -> u32 {
        reason.0
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "{:#x}", self.0),
        }
    }
}

impl fmt::Debug for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reason({self})")
    }
}

/// Serialised as its name, or `"0x…"` for unregistered codes (same text as `Display`).
impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.name() {
            Some(name) => serializer.serialize_str(name),
            None => serializer.collect_str(self),
        }
    }
}
