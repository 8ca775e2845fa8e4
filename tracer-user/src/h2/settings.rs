//! SETTINGS (RFC 9113 §6.5): connection parameters, acknowledged with an empty ACK.
use super::{Error, Head, flags};

/// A SETTINGS frame, with the parameters found in the captured payload, in wire order
/// (a repeated identifier is legal; the last occurrence wins, see [`Settings::get`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub ack: bool,
    /// `(identifier, value)`; identifiers are named by the associated constants and
    /// [`setting_name`]. Unknown identifiers are kept (receivers must ignore them).
    pub params: Vec<(u16, u32)>,
    /// The capture stopped before the end of the frame: more parameters may exist.
    pub truncated: bool,
}

impl Settings {
    /// Octets per parameter.
    pub const PARAM_LEN: usize = 6;

    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
    /// RFC 8441 (WebSockets over HTTP/2).
    pub const ENABLE_CONNECT_PROTOCOL: u16 = 0x8;
    /// RFC 9218 (extensible priorities).
    pub const NO_RFC7540_PRIORITIES: u16 = 0x9;

    pub(super) fn load(head: &Head, payload: &[u8]) -> Result<Settings, Error> {
        let ack = head.has_flag(flags::ACK);
        if (ack && head.length != 0) || !head.length.is_multiple_of(Self::PARAM_LEN as u32) {
            return Err(Error::BadLength {
                kind: head.kind,
                length: head.length,
            });
        }
        let params = payload
            .chunks_exact(Self::PARAM_LEN)
            .filter_map(|c| match *c {
                [i0, i1, v0, v1, v2, v3] => Some((
                    u16::from_be_bytes([i0, i1]),
                    u32::from_be_bytes([v0, v1, v2, v3]),
                )),
                _ => None,
            })
            .collect();
        Ok(Settings {
            ack,
            params,
            truncated: payload.len() < head.length as usize,
        })
    }

    /// The value the frame sets for `id` (the last occurrence), if captured.
    pub fn get(&self, id: u16) -> Option<u32> {
        self.params
            .iter()
            .rev()
            .find_map(|&(i, v)| (i == id).then_some(v))
    }
}

/// The registered name of a setting identifier (`SETTINGS_` prefix dropped).
pub fn setting_name(id: u16) -> Option<&'static str> {
    Some(match id {
        Settings::HEADER_TABLE_SIZE => "HEADER_TABLE_SIZE",
        Settings::ENABLE_PUSH => "ENABLE_PUSH",
        Settings::MAX_CONCURRENT_STREAMS => "MAX_CONCURRENT_STREAMS",
        Settings::INITIAL_WINDOW_SIZE => "INITIAL_WINDOW_SIZE",
        Settings::MAX_FRAME_SIZE => "MAX_FRAME_SIZE",
        Settings::MAX_HEADER_LIST_SIZE => "MAX_HEADER_LIST_SIZE",
        Settings::ENABLE_CONNECT_PROTOCOL => "ENABLE_CONNECT_PROTOCOL",
        Settings::NO_RFC7540_PRIORITIES => "NO_RFC7540_PRIORITIES",
        _ => return None,
    })
}
