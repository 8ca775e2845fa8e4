//! Per-connection HTTP/2 state built from the frames the kernel reports: GOAWAYs, PING
//! cadence and answers, RST_STREAM counts, open streams and idle time.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use serde::Serialize;

use crate::{
    event::{Dir, ProtoNote},
    h2::{self, Frame, Head},
    timeline::GoAway,
};

const MAX_GOAWAYS: usize = 8;
const MAX_STREAMS: usize = 10_000;
const MAX_OUTSTANDING: usize = 16;
const MAX_PING_TIMES: usize = 64;
/// Distinct RST_STREAM codes counted per direction: the registered ones are 14, anything
/// past this many distinct codes is counted under [`OTHER_CODES`] (a peer choosing codes
/// must not grow the record).
const MAX_RST_CODES: usize = 24;
pub const OTHER_CODES: &str = "other";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum H2State {
    /// HTTP/2 frame boundaries are known.
    Synced,
    /// The payload looked like it could be HTTP/2 but boundaries are unknown (seen
    /// mid-stream, or a capture gap); nothing is parsed until they are found again.
    Unsynced,
    NotH2,
    Tls,
}

impl H2State {
    /// The JSON name (the serde form; the export tests check every variant).
    pub fn name(self) -> &'static str {
        match self {
            H2State::Synced => "synced",
            H2State::Unsynced => "unsynced",
            H2State::NotH2 => "not_h2",
            H2State::Tls => "tls",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PingSide {
    pub pings: u32,
    pub acks: u32,
    /// Times of this side's PINGs (bounded), for the cadence.
    times: VecDeque<u64>,
    /// Opaque data of this side's PINGs not yet acknowledged, with their time.
    outstanding: VecDeque<([u8; 8], u64)>,
    /// When one of this side's PINGs was last acknowledged.
    pub last_answered_ns: Option<u64>,
}

impl PingSide {
    /// Median interval between consecutive PINGs, in ns.
    pub fn median_interval_ns(&self) -> Option<u64> {
        let mut gaps: Vec<u64> = self
            .times
            .iter()
            .zip(self.times.iter().skip(1))
            .map(|(a, b)| b.saturating_sub(*a))
            .collect();
        if gaps.is_empty() {
            return None;
        }
        gaps.sort_unstable();
        Some(gaps[gaps.len() / 2])
    }

    pub fn min_interval_ns(&self) -> Option<u64> {
        self.times
            .iter()
            .zip(self.times.iter().skip(1))
            .map(|(a, b)| b.saturating_sub(*a))
            .min()
    }

    pub fn unanswered(&self) -> usize {
        self.outstanding.len()
    }

    /// Nothing to report: no PING either way, none outstanding, no interval.
    pub fn is_blank(&self) -> bool {
        self.pings == 0 && self.acks == 0 && self.outstanding.is_empty() && self.times.len() < 2
    }

    /// When the oldest unanswered PING went out.
    pub fn oldest_unanswered_ns(&self) -> Option<u64> {
        self.outstanding.front().map(|(_, t)| *t)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct H2Track {
    pub state: H2State,
    pub preface_seen: bool,
    /// The walker's first sync was found mid-stream, not at the stream's start: the socket
    /// was open before the agent, or its first payload completed the handshake at the
    /// listener (the packet hooks run with the listener then, before the socket exists).
    /// Frames before that point, the preface among them, were not seen.
    pub joined_midstream: bool,
    pub desyncs: u32,
    pub parse_errors: u32,
    pub frames: u64,
    pub goaways: Vec<GoAway>,
    /// PINGs this socket sent, and those it received.
    pub ping_sent: PingSide,
    pub ping_received: PingSide,
    pub rst_sent: BTreeMap<String, u32>,
    pub rst_received: BTreeMap<String, u32>,
    /// Open streams: bit 0 = this side ended its half, bit 1 = the peer ended its half.
    streams: HashMap<u32, u8>,
    pub streams_overflow: bool,
    pub max_open_streams: usize,
    /// Since when no stream has been open (None while some are).
    pub idle_since_ns: Option<u64>,
    pub last_frame_ns: Option<u64>,
    /// When the last frame from the peer arrived.
    pub last_received_ns: Option<u64>,
}

impl H2Track {
    /// A new tracker already in `state` (what an inline TLS or not-HTTP/2 state stands
    /// for, `Conn::h2_opaque`).
    pub fn in_state(at_ns: u64, state: H2State) -> Self {
        H2Track {
            state,
            ..H2Track::new(at_ns)
        }
    }

    pub fn new(at_ns: u64) -> Self {
        H2Track {
            state: H2State::Unsynced,
            preface_seen: false,
            joined_midstream: false,
            desyncs: 0,
            parse_errors: 0,
            frames: 0,
            goaways: Vec::new(),
            ping_sent: PingSide::default(),
            ping_received: PingSide::default(),
            rst_sent: BTreeMap::new(),
            rst_received: BTreeMap::new(),
            streams: HashMap::new(),
            streams_overflow: false,
            max_open_streams: 0,
            idle_since_ns: Some(at_ns),
            last_frame_ns: None,
            last_received_ns: None,
        }
    }

    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// Every reported counter zero and every list empty: what a socket whose payload was
    /// classified but never walked as HTTP/2 (TLS, other protocols) carries.
    pub fn is_blank(&self) -> bool {
        !self.preface_seen
            && !self.joined_midstream
            && self.frames == 0
            && self.parse_errors == 0
            && self.desyncs == 0
            && self.goaways.is_empty()
            && self.ping_sent.is_blank()
            && self.ping_received.is_blank()
            && self.rst_sent.is_empty()
            && self.rst_received.is_empty()
            && self.streams.is_empty()
            && self.max_open_streams == 0
    }

    pub fn on_proto(&mut self, note: ProtoNote) {
        match note {
            ProtoNote::H2Preface => {
                self.preface_seen = true;
                self.state = H2State::Synced;
            }
            ProtoNote::H2SettingsFirst | ProtoNote::Resynced => {
                if note == ProtoNote::Resynced && self.desyncs == 0 && !self.preface_seen {
                    // A resync that follows no desync: the first sync of a direction whose
                    // walk started mid-stream, whether or not the other direction's walk
                    // had frames by then (it may have started at its stream's start).
                    self.joined_midstream = true;
                }
                if !matches!(self.state, H2State::NotH2 | H2State::Tls) {
                    self.state = H2State::Synced;
                }
            }
            ProtoNote::Tls => self.state = H2State::Tls,
            ProtoNote::Other => self.state = H2State::NotH2,
            ProtoNote::Desync => {
                self.desyncs += 1;
                self.state = H2State::Unsynced;
            }
            ProtoNote::GaveUp => {}
        }
    }

    /// One frame header plus captured payload prefix. Returns the GOAWAY if it was one.
    pub fn on_frame(
        &mut self,
        at_ns: u64,
        dir: Dir,
        head: &[u8; 9],
        payload: &Bytes,
    ) -> Option<&GoAway> {
        let head = match Head::parse(head) {
            Ok(h) => h,
            Err(_) => {
                self.parse_errors += 1;
                return None;
            }
        };
        let frame = match h2::parse_frame(&head, payload) {
            Ok(f) => f,
            Err(_) => {
                self.parse_errors += 1;
                return None;
            }
        };
        self.frames += 1;
        self.last_frame_ns = Some(at_ns);
        let mine = dir == Dir::Egress;
        if !mine {
            self.last_received_ns = Some(at_ns);
        }
        match frame {
            Frame::Headers(h) => {
                self.open(at_ns, h.stream_id);
                if h.end_stream {
                    self.end_half(at_ns, h.stream_id, mine);
                }
            }
            Frame::Data(d) => {
                if d.end_stream {
                    self.end_half(at_ns, d.stream_id, mine);
                }
            }
            Frame::RstStream(r) => {
                let map = if mine {
                    &mut self.rst_sent
                } else {
                    &mut self.rst_received
                };
                let name = r.reason.to_string();
                let key = if map.contains_key(&name) || map.len() < MAX_RST_CODES {
                    name
                } else {
                    OTHER_CODES.to_string()
                };
                *map.entry(key).or_default() += 1;
                self.close_stream(at_ns, r.stream_id);
            }
            Frame::Ping(p) => {
                let (own, other) = if mine {
                    (&mut self.ping_sent, &mut self.ping_received)
                } else {
                    (&mut self.ping_received, &mut self.ping_sent)
                };
                if p.ack {
                    own.acks += 1;
                    // An ACK answers a PING of the other side.
                    if let Some(i) = other.outstanding.iter().position(|(o, _)| *o == p.opaque) {
                        other.outstanding.remove(i);
                        other.last_answered_ns = Some(at_ns);
                    }
                } else {
                    own.pings += 1;
                    own.times.push_back(at_ns);
                    if own.times.len() > MAX_PING_TIMES {
                        own.times.pop_front();
                    }
                    own.outstanding.push_back((p.opaque, at_ns));
                    if own.outstanding.len() > MAX_OUTSTANDING {
                        own.outstanding.pop_front();
                    }
                }
            }
            Frame::GoAway(g) => {
                if self.goaways.len() < MAX_GOAWAYS {
                    let idle_ns = if self.streams.is_empty() {
                        self.idle_since_ns.map(|t| at_ns.saturating_sub(t))
                    } else {
                        None
                    };
                    self.goaways.push(GoAway {
                        sent: mine,
                        at_ns,
                        code: g.reason,
                        last_stream_id: g.last_stream_id,
                        debug: g.debug_text(),
                        debug_truncated: g.debug_truncated,
                        idle_ns,
                    });
                    return self.goaways.last();
                }
            }
            Frame::Settings(_)
            | Frame::Priority(_)
            | Frame::PushPromise(_)
            | Frame::WindowUpdate(_)
            | Frame::Continuation(_)
            | Frame::Unknown(_) => {}
        }
        None
    }

    fn open(&mut self, at_ns: u64, id: u32) {
        if self.streams.contains_key(&id) {
            return;
        }
        if self.streams.len() >= MAX_STREAMS {
            self.streams_overflow = true;
            return;
        }
        self.streams.insert(id, 0);
        self.max_open_streams = self.max_open_streams.max(self.streams.len());
        self.idle_since_ns = None;
        let _ = at_ns;
    }

    fn end_half(&mut self, at_ns: u64, id: u32, mine: bool) {
        let Some(bits) = self.streams.get_mut(&id) else {
            return;
        };
        *bits |= if mine { 1 } else { 2 };
        if *bits == 3 {
            self.close_stream(at_ns, id);
        }
    }

    fn close_stream(&mut self, at_ns: u64, id: u32) {
        if self.streams.remove(&id).is_some() && self.streams.is_empty() {
            self.idle_since_ns = Some(at_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h2::Reason;

    fn frame(len: u32, kind: u8, flags: u8, stream: u32) -> [u8; 9] {
        let l = len.to_be_bytes();
        let s = stream.to_be_bytes();
        [l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]]
    }

    /// Only a resync that is a walker's first sync means it joined mid-stream.
    #[test]
    fn joined_midstream_only_when_the_first_sync_is_a_resync() {
        use ProtoNote::*;
        let cases: [(&str, &[ProtoNote], bool); 6] = [
            ("first sync a resync", &[Resynced, Resynced], true),
            (
                "preface, then a resync after a desync",
                &[H2Preface, Desync, Resynced],
                false,
            ),
            ("settings first", &[H2SettingsFirst], false),
            (
                "one direction from its start, the other joined mid-stream",
                &[H2SettingsFirst, Resynced],
                true,
            ),
            (
                "desync before any sync, then a resync",
                &[Desync, Resynced],
                false,
            ),
            ("not HTTP/2", &[Other], false),
        ];
        for (name, notes, want) in cases {
            let mut t = H2Track::new(0);
            for n in notes {
                t.on_proto(*n);
            }
            assert_eq!(t.joined_midstream, want, "{name}");
            assert_eq!(
                t.is_blank(),
                !want && !t.preface_seen && t.desyncs == 0,
                "{name}"
            );
        }
    }

    #[test]
    fn streams_idle_and_goaway_idle_time() {
        let mut t = H2Track::new(0);
        let none = Bytes::new();
        t.on_frame(10, Dir::Egress, &frame(20, 1, 0x4, 1), &none); // request HEADERS
        t.on_frame(11, Dir::Egress, &frame(5, 0, 0x1, 1), &none); // request DATA END_STREAM
        assert_eq!(t.open_streams(), 1);
        assert_eq!(t.idle_since_ns, None);
        t.on_frame(20, Dir::Ingress, &frame(10, 1, 0x5, 1), &none); // response HEADERS END_STREAM
        assert_eq!(t.open_streams(), 0);
        assert_eq!(t.idle_since_ns, Some(20));
        let mut p = vec![0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        p.extend_from_slice(b"max_idle");
        let g = t
            .on_frame(1_020, Dir::Ingress, &frame(16, 7, 0, 0), &Bytes::from(p))
            .cloned()
            .expect("goaway");
        assert_eq!(
            (g.code, g.last_stream_id, g.debug.as_str()),
            (Reason::NO_ERROR, 0x7fff_ffff, "max_idle")
        );
        assert_eq!(g.idle_ns, Some(1_000));
    }

    #[test]
    fn ping_cadence_and_unanswered() {
        let mut t = H2Track::new(0);
        for (i, at) in [0u64, 200, 400, 600].iter().enumerate() {
            t.on_frame(
                *at,
                Dir::Egress,
                &frame(8, 6, 0, 0),
                &Bytes::from(vec![i as u8; 8]),
            );
        }
        // The peer acknowledges the first two only.
        for i in 0..2u8 {
            t.on_frame(
                700,
                Dir::Ingress,
                &frame(8, 6, 1, 0),
                &Bytes::from(vec![i; 8]),
            );
        }
        assert_eq!(t.ping_sent.pings, 4);
        assert_eq!(t.ping_received.acks, 2);
        assert_eq!(t.ping_sent.unanswered(), 2);
        assert_eq!(t.ping_sent.oldest_unanswered_ns(), Some(400));
        assert_eq!(t.ping_sent.median_interval_ns(), Some(200));
    }

    #[test]
    fn rst_stream_counts_by_reason_and_closes_the_stream() {
        let mut t = H2Track::new(0);
        t.on_frame(1, Dir::Egress, &frame(20, 1, 0x4, 3), &Bytes::new());
        t.on_frame(
            2,
            Dir::Egress,
            &frame(4, 3, 0, 3),
            &Bytes::from(vec![0, 0, 0, 8]),
        );
        assert_eq!(t.rst_sent.get("CANCEL"), Some(&1));
        assert_eq!(t.open_streams(), 0);
        assert!(t.goaways.is_empty());
    }

    /// A peer resetting streams with ever new error codes cannot grow the record: past the
    /// bound they are counted together, and nothing is lost from the total.
    #[test]
    fn rst_stream_codes_are_bounded() {
        let mut t = H2Track::new(0);
        for code in 0..10_000u32 {
            t.on_frame(
                u64::from(code),
                Dir::Ingress,
                &frame(4, 3, 0, 2 * code + 1),
                &Bytes::from((code + 0x100).to_be_bytes().to_vec()),
            );
        }
        assert!(
            t.rst_received.len() <= MAX_RST_CODES + 1,
            "{}",
            t.rst_received.len()
        );
        assert_eq!(t.rst_received.values().sum::<u32>(), 10_000);
        assert!(t.rst_received.get(OTHER_CODES).is_some_and(|n| *n > 9_000));
    }

    #[test]
    fn malformed_frames_are_counted_not_trusted() {
        let mut t = H2Track::new(0);
        // A PING on stream 5 and a GOAWAY shorter than 8 bytes.
        t.on_frame(
            1,
            Dir::Ingress,
            &frame(8, 6, 0, 5),
            &Bytes::from(vec![0; 8]),
        );
        t.on_frame(
            1,
            Dir::Ingress,
            &frame(4, 7, 0, 0),
            &Bytes::from(vec![0; 4]),
        );
        assert_eq!(t.parse_errors, 2);
        assert!(t.goaways.is_empty());
        assert_eq!(t.frames, 0);
    }
}
