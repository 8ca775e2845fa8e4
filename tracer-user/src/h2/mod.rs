//! HTTP/2 frame parsing (RFC 9113) for what the kernel side captures.
//!
//! The kernel does not hand over a byte stream. For each frame it sees it copies the raw
//! 9-octet header and, for control frames only (SETTINGS, PING, GOAWAY, RST_STREAM,
//! WINDOW_UPDATE), at most the first 64 octets of the payload. So the entry point takes a
//! decoded [`Head`] plus a payload that may be a *prefix* of the real one
//! (`payload.len() < head.length`), and DATA/HEADERS/PUSH_PROMISE/CONTINUATION are reported
//! from their headers alone.
//!
//! Everything here is pure: bytes in, values out, no I/O, and no panics on any input
//! (the `h2_frames` fuzz target in `fuzz/` checks that).
//!
//! Rules [`parse_frame`] applies, in this order:
//! 1. the stream identifier must be allowed for the type ([`Kind::stream_rule`]), else
//!    [`Error::BadStreamId`];
//! 2. the length must be legal for the type (PING 8, RST_STREAM 4, WINDOW_UPDATE 4,
//!    PRIORITY 5, GOAWAY ≥ 8, SETTINGS a multiple of 6 and 0 with ACK, room for the
//!    padding/priority/promised-stream fields the flags announce), else
//!    [`Error::BadLength`];
//! 3. the fields the frame is reported with must have been captured, else
//!    [`Error::Truncated`]. Variable-length tails (GOAWAY debug data, SETTINGS
//!    parameters) are taken from what was captured and flagged as truncated.
//!
//! Captured bytes beyond `head.length` belong to whatever follows the frame and are ignored.
//! Flags a type does not define are ignored, as the RFC requires of receivers.

mod continuation;
mod data;
mod go_away;
mod head;
mod headers;
mod ping;
mod priority;
mod push_promise;
mod reason;
mod rst_stream;
mod settings;
mod window_update;

#[cfg(test)]
mod tests;

pub use continuation::Continuation;
pub use data::Data;
pub use go_away::GoAway;
pub use head::{HEADER_LEN, Head, Kind, MAX_LENGTH, STREAM_ID_MASK, StreamRule};
pub use headers::Headers;
pub use ping::Ping;
pub use priority::Priority;
pub use push_promise::PushPromise;
pub use reason::Reason;
pub use rst_stream::RstStream;
pub use settings::{Settings, setting_name};
pub use window_update::WindowUpdate;

/// The sniffing rules the kernel walker runs, re-exported: the helpers below are thin
/// wrappers over them, so what the agent's tests and the fuzzer check is the kernel's code.
pub use tracer_common::h2sniff::{
    self as sniff, DEFAULT_MAX_FRAME_SIZE, RESYNC_MAX_FRAME_SIZE, TLS_MAX_RECORD,
};

/// The client connection preface (RFC 9113 §3.4), sent before the first frame.
pub const PREFACE: &[u8; 24] = &sniff::PREFACE;

/// Flag bits. Their meaning depends on the frame type (see [`Kind::defined_flags`]).
pub mod flags {
    /// DATA, HEADERS: last frame the sender will send on this stream.
    pub const END_STREAM: u8 = 0x1;
    /// SETTINGS, PING: this frame acknowledges the peer's.
    pub const ACK: u8 = 0x1;
    /// HEADERS, PUSH_PROMISE, CONTINUATION: the field block is complete.
    pub const END_HEADERS: u8 = 0x4;
    /// DATA, HEADERS, PUSH_PROMISE: a pad-length octet starts the payload.
    pub const PADDED: u8 = 0x8;
    /// HEADERS: exclusive bit, stream dependency and weight follow (5 octets).
    pub const PRIORITY: u8 = 0x20;
}

/// Why a captured frame could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("frame header needs {HEADER_LEN} bytes, got {0}")]
    ShortHeader(usize),
    #[error("{kind} frame with invalid payload length {length}")]
    BadLength { kind: Kind, length: u32 },
    #[error("{kind} frame on invalid stream {stream_id}")]
    BadStreamId { kind: Kind, stream_id: u32 },
    #[error("{kind} frame: {needed} payload bytes needed, only {captured} captured")]
    Truncated {
        kind: Kind,
        needed: usize,
        captured: usize,
    },
}

/// A decoded frame, with the facts a connection tracer needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Data(Data),
    Headers(Headers),
    Priority(Priority),
    RstStream(RstStream),
    Settings(Settings),
    PushPromise(PushPromise),
    Ping(Ping),
    GoAway(GoAway),
    WindowUpdate(WindowUpdate),
    Continuation(Continuation),
    Unknown(Unknown),
}

/// A frame of a type RFC 9113 does not define (extensions); kept so it can be counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unknown {
    pub kind: u8,
    pub stream_id: u32,
    pub length: u32,
}

impl Frame {
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Data(_) => Kind::Data,
            Frame::Headers(_) => Kind::Headers,
            Frame::Priority(_) => Kind::Priority,
            Frame::RstStream(_) => Kind::RstStream,
            Frame::Settings(_) => Kind::Settings,
            Frame::PushPromise(_) => Kind::PushPromise,
            Frame::Ping(_) => Kind::Ping,
            Frame::GoAway(_) => Kind::GoAway,
            Frame::WindowUpdate(_) => Kind::WindowUpdate,
            Frame::Continuation(_) => Kind::Continuation,
            Frame::Unknown(u) => Kind::Unknown(u.kind),
        }
    }

    /// The stream the frame travelled on (0 for connection-level frames).
    pub fn stream_id(&self) -> u32 {
        match self {
            Frame::Data(f) => f.stream_id,
            Frame::Headers(f) => f.stream_id,
            Frame::Priority(f) => f.stream_id,
            Frame::RstStream(f) => f.stream_id,
            Frame::PushPromise(f) => f.stream_id,
            Frame::WindowUpdate(f) => f.stream_id,
            Frame::Continuation(f) => f.stream_id,
            Frame::Unknown(f) => f.stream_id,
            Frame::Settings(_) | Frame::Ping(_) | Frame::GoAway(_) => 0,
        }
    }
}

/// Decodes one frame from its header and the captured prefix of its payload.
///
/// See the [module documentation](self) for the rules and their order.
pub fn parse_frame(head: &Head, payload: &[u8]) -> Result<Frame, Error> {
    if !head.kind.stream_rule().allows(head.stream_id) {
        return Err(Error::BadStreamId {
            kind: head.kind,
            stream_id: head.stream_id,
        });
    }
    let payload = payload
        .get(..usize::try_from(head.length).unwrap_or(usize::MAX))
        .unwrap_or(payload);
    Ok(match head.kind {
        Kind::Data => Frame::Data(Data::load(head)?),
        Kind::Headers => Frame::Headers(Headers::load(head)?),
        Kind::Priority => Frame::Priority(Priority::load(head, payload)?),
        Kind::RstStream => Frame::RstStream(RstStream::load(head, payload)?),
        Kind::Settings => Frame::Settings(Settings::load(head, payload)?),
        Kind::PushPromise => Frame::PushPromise(PushPromise::load(head, payload)?),
        Kind::Ping => Frame::Ping(Ping::load(head, payload)?),
        Kind::GoAway => Frame::GoAway(GoAway::load(head, payload)?),
        Kind::WindowUpdate => Frame::WindowUpdate(WindowUpdate::load(head, payload)?),
        Kind::Continuation => Frame::Continuation(Continuation::load(head)),
        Kind::Unknown(kind) => Frame::Unknown(Unknown {
            kind,
            stream_id: head.stream_id,
            length: head.length,
        }),
    })
}

/// A payload of exactly `N` octets (PING, RST_STREAM, WINDOW_UPDATE, PRIORITY): checks the
/// announced length, then that all of it was captured.
fn fixed_payload<'a, const N: usize>(head: &Head, payload: &'a [u8]) -> Result<&'a [u8; N], Error> {
    if usize::try_from(head.length) != Ok(N) {
        return Err(Error::BadLength {
            kind: head.kind,
            length: head.length,
        });
    }
    payload.first_chunk::<N>().ok_or(Error::Truncated {
        kind: head.kind,
        needed: N,
        captured: payload.len(),
    })
}

/// Fails with [`Error::BadLength`] when `head.length` is below `min`.
fn min_length(head: &Head, min: u32) -> Result<(), Error> {
    if head.length < min {
        return Err(Error::BadLength {
            kind: head.kind,
            length: head.length,
        });
    }
    Ok(())
}

fn be_u32(b: [u8; 4]) -> u32 {
    u32::from_be_bytes(b)
}

/// Counts the frames in `bytes` if they form a chain of plausible frames that ends exactly
/// at `bytes.len()`; `None` otherwise (including for an empty buffer).
///
/// The rule is the kernel's resynchronisation rule ([`sniff::chain_step`] over
/// [`sniff::plausible_header`]; the module documentation of `tracer_common::h2sniff` says
/// what is accepted and why), without the kernel's bound on the number of frames. Every
/// frame it accepts also decodes with [`parse_frame`] given its whole payload (the fuzz
/// target checks that).
pub fn plausible_chain(bytes: &[u8], max_frame_size: u32) -> Option<usize> {
    let total = u32::try_from(bytes.len()).ok()?;
    let mut off = 0u32;
    let mut frames = 0usize;
    loop {
        let head = bytes
            .get(usize::try_from(off).ok()?..)?
            .first_chunk::<HEADER_LEN>()?;
        frames += 1;
        match sniff::chain_step(head, &mut off, total, max_frame_size) {
            sniff::Chain::More => {}
            sniff::Chain::Complete => return Some(frames),
            sniff::Chain::Broken => return None,
        }
    }
}

/// Whether `bytes` starts with the whole client connection preface ([`sniff::is_preface`]).
/// A partial preface is not enough (see [`may_be_preface`] for that).
pub fn is_preface(bytes: &[u8]) -> bool {
    bytes.first_chunk::<24>().is_some_and(sniff::is_preface)
}

/// Whether `bytes` could still turn out to be the connection preface: it is non-empty and
/// agrees with [`PREFACE`] as far as it goes (a short capture of `"PRI * HT"` qualifies).
/// Agent-only: the kernel decides on whole segments and never needs a partial match.
pub fn may_be_preface(bytes: &[u8]) -> bool {
    let n = bytes.len().min(PREFACE.len());
    n > 0 && bytes.get(..n) == PREFACE.get(..n)
}

/// Whether `bytes` starts like a TLS record ([`sniff::is_tls_record_header`]: content type
/// 0x14–0x17, legacy version 0x03 0x00–0x04, length at most [`TLS_MAX_RECORD`]). Needs the
/// 5-octet record header.
pub fn looks_like_tls(bytes: &[u8]) -> bool {
    bytes
        .first_chunk::<5>()
        .is_some_and(sniff::is_tls_record_header)
}
