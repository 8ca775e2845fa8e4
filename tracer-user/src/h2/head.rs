//! The fixed 9-octet header that starts every HTTP/2 frame (RFC 9113 §4.1).
//!
//! ```text
//! +-----------------------------------------------+
//! |                 Length (24)                   |
//! +---------------+---------------+---------------+
//! |   Type (8)    |   Flags (8)   |
//! +-+-------------+---------------+-------------------------------+
//! |R|                 Stream Identifier (31)                      |
//! +-+-------------------------------------------------------------+
//! ```
use std::fmt;

use super::Error;

/// Size of a frame header on the wire.
pub const HEADER_LEN: usize = 9;

/// Largest value the 24-bit length field can carry (also the largest legal
/// `SETTINGS_MAX_FRAME_SIZE`).
pub const MAX_LENGTH: u32 = (1 << 24) - 1;

/// Mask of the 31 bits of a stream identifier; the top bit is reserved.
pub const STREAM_ID_MASK: u32 = 0x7fff_ffff;

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Head {
    /// Payload length in octets (24 bits), not counting these 9 header octets.
    pub length: u32,
    pub kind: Kind,
    pub flags: u8,
    /// Stream identifier with the reserved bit masked off.
    pub stream_id: u32,
}

impl Head {
    /// Decodes the first [`HEADER_LEN`] bytes of `buf`; anything after them is ignored.
    ///
    /// Only fails when `buf` is too short: every type, flag and length is representable
    /// (an unknown type becomes [`Kind::Unknown`], the reserved bit is dropped). Whether the
    /// header makes sense for its type is [`parse_frame`](super::parse_frame)'s business.
    pub fn parse(buf: &[u8]) -> Result<Head, Error> {
        let Some(&[l0, l1, l2, kind, flags, s0, s1, s2, s3]) = buf.first_chunk::<HEADER_LEN>()
        else {
            return Err(Error::ShortHeader(buf.len()));
        };
        Ok(Head {
            length: u32::from_be_bytes([0, l0, l1, l2]),
            kind: Kind::from_u8(kind),
            flags,
            stream_id: u32::from_be_bytes([s0, s1, s2, s3]) & STREAM_ID_MASK,
        })
    }

    /// Whether every bit of `flag` is set.
    pub fn has_flag(&self, flag: u8) -> bool {
        self.flags & flag == flag
    }

    /// Encodes the header back to wire form (reserved bit clear).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let [_, l0, l1, l2] = (self.length & MAX_LENGTH).to_be_bytes();
        let [s0, s1, s2, s3] = (self.stream_id & STREAM_ID_MASK).to_be_bytes();
        [l0, l1, l2, self.kind.to_u8(), self.flags, s0, s1, s2, s3]
    }
}

/// Frame type (RFC 9113 §6). Types this parser does not know are kept, not rejected
/// (§4.1: implementations MUST ignore frames of unknown types).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Data,
    Headers,
    Priority,
    RstStream,
    Settings,
    PushPromise,
    Ping,
    GoAway,
    WindowUpdate,
    Continuation,
    Unknown(u8),
}

/// Which stream identifiers a frame type may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamRule {
    /// Connection-level only: stream 0.
    Zero,
    /// Stream-level only: never stream 0.
    NonZero,
    /// Either (WINDOW_UPDATE, unknown types).
    Any,
}

impl StreamRule {
    pub fn allows(self, stream_id: u32) -> bool {
        match self {
            StreamRule::Zero => stream_id == 0,
            StreamRule::NonZero => stream_id != 0,
            StreamRule::Any => true,
        }
    }
}

impl Kind {
    pub fn from_u8(v: u8) -> Kind {
        match v {
            0 => Kind::Data,
            1 => Kind::Headers,
            2 => Kind::Priority,
            3 => Kind::RstStream,
            4 => Kind::Settings,
            5 => Kind::PushPromise,
            6 => Kind::Ping,
            7 => Kind::GoAway,
            8 => Kind::WindowUpdate,
            9 => Kind::Continuation,
            other => Kind::Unknown(other),
        }
    }

    pub fn to_u8(self) -> u8 {
        match self {
            Kind::Data => 0,
            Kind::Headers => 1,
            Kind::Priority => 2,
            Kind::RstStream => 3,
            Kind::Settings => 4,
            Kind::PushPromise => 5,
            Kind::Ping => 6,
            Kind::GoAway => 7,
            Kind::WindowUpdate => 8,
            Kind::Continuation => 9,
            Kind::Unknown(v) => v,
        }
    }

    /// Upper-case RFC name, `None` for unknown types.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Kind::Data => "DATA",
            Kind::Headers => "HEADERS",
            Kind::Priority => "PRIORITY",
            Kind::RstStream => "RST_STREAM",
            Kind::Settings => "SETTINGS",
            Kind::PushPromise => "PUSH_PROMISE",
            Kind::Ping => "PING",
            Kind::GoAway => "GOAWAY",
            Kind::WindowUpdate => "WINDOW_UPDATE",
            Kind::Continuation => "CONTINUATION",
            Kind::Unknown(_) => return None,
        })
    }

    pub fn is_known(self) -> bool {
        !matches!(self, Kind::Unknown(_))
    }

    /// The stream identifiers RFC 9113 allows for this type.
    pub fn stream_rule(self) -> StreamRule {
        match self {
            Kind::Settings | Kind::Ping | Kind::GoAway => StreamRule::Zero,
            Kind::Data
            | Kind::Headers
            | Kind::Priority
            | Kind::RstStream
            | Kind::PushPromise
            | Kind::Continuation => StreamRule::NonZero,
            Kind::WindowUpdate | Kind::Unknown(_) => StreamRule::Any,
        }
    }

    /// The flag bits RFC 9113 defines for this type (others must be ignored by receivers,
    /// and senders leave them clear, which [`plausible_chain`](super::plausible_chain) uses).
    pub fn defined_flags(self) -> u8 {
        use super::flags::*;
        match self {
            Kind::Data => END_STREAM | PADDED,
            Kind::Headers => END_STREAM | END_HEADERS | PADDED | PRIORITY,
            Kind::PushPromise => END_HEADERS | PADDED,
            Kind::Continuation => END_HEADERS,
            Kind::Settings | Kind::Ping => ACK,
            Kind::Priority | Kind::RstStream | Kind::GoAway | Kind::WindowUpdate => 0,
            Kind::Unknown(_) => 0xff,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "UNKNOWN({:#04x})", self.to_u8()),
        }
    }
}
