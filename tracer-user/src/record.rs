//! `--record FILE` and `whoclosed replay FILE`: the raw kernel records of a session, and
//! the same decode → connection table → classifier → exporter run on them offline.
//!
//! A recording is a small versioned header and then length-prefixed frames:
//!
//! ```text
//! "WHOCLREC" | u32 LE format version (1) | u32 LE header length | header (JSON)
//! then frames: u8 kind | u32 LE length | payload
//!   1 = one ring-buffer record, as the kernel wrote it
//!   2 = a tick: u64 LE CLOCK_MONOTONIC ns at which the table judged lingering sockets,
//!       then (when known) u64 LE the kernel's lost-event total read just before (ring-buffer
//!       drops, unreadable records and skipped program runs)
//!   3 = the pods of one verdict (JSON: {"id", "conn", "peer"}), as the agent resolved them
//!   4 = a recheck's walk over the live sockets starts: u64 LE CLOCK_MONOTONIC ns
//!   5 = that walk ended: u8 flags (1: no event was lost meanwhile; 2: the walk over the
//!       sockets holding packet state, every namespace, was read to its end), then u64 LE
//!       the inode of each network namespace walked to its end
//! ```
//!
//! The header holds the table's configuration (linger, limits, ephemeral range, packet
//! facts, kernel RST reason names) and the clock base (monotonic and wall time at start), so
//! replay judges the same sockets at the same points with the same settings and writes the
//! same `close` lines, `ts` included. Ticks are recorded because a verdict can depend on
//! which late facts arrived before its linger ended.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io::{self, BufRead, BufReader, BufWriter, Read, Write},
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::{
    conn::{Table, TableConfig},
    event,
    export::{Clock, Filter, monotonic_ns},
    k8s::{K8sEnds, PodIdentity},
    trace::{Format, Output},
};

const MAGIC: &[u8; 8] = b"WHOCLREC";
/// Version of the recording format (not of the kernel records inside it).
pub const FORMAT_VERSION: u32 = 1;
/// Largest frame accepted on reading (a kernel record is a few hundred bytes).
const MAX_FRAME: u32 = 1 << 20;

const FRAME_EVENT: u8 = 1;
const FRAME_TICK: u8 = 2;
const FRAME_K8S: u8 = 3;
const FRAME_RECHECK_START: u8 = 4;
const FRAME_RECHECK_END: u8 = 5;

/// The monotonic and wall-clock times a session's [`Clock`] maps from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockBase {
    pub mono0_ns: u64,
    pub real0: SystemTime,
}

impl ClockBase {
    pub fn now() -> Self {
        ClockBase {
            mono0_ns: monotonic_ns(),
            real0: SystemTime::now(),
        }
    }

    pub fn clock(&self) -> Clock {
        Clock::fixed(self.mono0_ns, self.real0)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    whoclosed: String,
    wire_version: u8,
    mono0_ns: u64,
    real0_unix_ns: u128,
    linger_ns: u64,
    max_conns: usize,
    ephemeral: (u16, u16),
    packet_facts: bool,
    rst_reason_names: BTreeMap<u32, String>,
    /// The session's output filters: replay prints what the session printed.
    filter: RecordedFilter,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RecordedFilter {
    ports: Vec<u16>,
    addrs: Vec<std::net::IpAddr>,
    netns: Vec<u32>,
    pid: Option<u32>,
    comm: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct K8sFrame {
    id: String,
    conn: Option<PodIdentity>,
    peer: Option<PodIdentity>,
}

/// Writes a recording.
pub struct Writer {
    out: BufWriter<File>,
}

impl Writer {
    pub fn create(
        path: &Path,
        clock: ClockBase,
        cfg: &TableConfig,
        filter: &Filter,
    ) -> io::Result<Self> {
        let header = Header {
            whoclosed: env!("CARGO_PKG_VERSION").to_string(),
            wire_version: tracer_common::WIRE_VERSION,
            mono0_ns: clock.mono0_ns,
            real0_unix_ns: clock
                .real0
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
            linger_ns: cfg.linger_ns,
            max_conns: cfg.max_conns,
            ephemeral: cfg.ephemeral,
            packet_facts: cfg.packet_facts,
            rst_reason_names: cfg
                .rst_reason_names
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
            filter: RecordedFilter {
                ports: filter.ports.clone(),
                addrs: filter.addrs.clone(),
                netns: filter.netns.clone(),
                pid: filter.pid,
                comm: filter.comm.clone(),
            },
        };
        let json = serde_json::to_vec(&header).map_err(io::Error::other)?;
        let mut out = BufWriter::new(File::create(path)?);
        out.write_all(MAGIC)?;
        out.write_all(&FORMAT_VERSION.to_le_bytes())?;
        out.write_all(&len32(json.len())?.to_le_bytes())?;
        out.write_all(&json)?;
        Ok(Writer { out })
    }

    fn frame(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        self.out.write_all(&[kind])?;
        self.out.write_all(&len32(payload.len())?.to_le_bytes())?;
        self.out.write_all(payload)
    }

    /// One ring-buffer record, exactly as read.
    pub fn event(&mut self, raw: &[u8]) -> io::Result<()> {
        self.frame(FRAME_EVENT, raw)
    }

    /// The table judged lingering sockets at `now_ns`, with the lost-event total it noted.
    pub fn tick(&mut self, now_ns: u64, events_lost: Option<u64>) -> io::Result<()> {
        let mut payload = [0u8; 16];
        payload[..8].copy_from_slice(&now_ns.to_le_bytes());
        match events_lost {
            Some(d) => {
                payload[8..].copy_from_slice(&d.to_le_bytes());
                self.frame(FRAME_TICK, &payload)
            }
            None => self.frame(FRAME_TICK, &payload[..8]),
        }
    }

    /// The pods resolved for one verdict (a replay cannot read the node's files).
    pub fn k8s(&mut self, id: &str, ends: &K8sEnds) -> io::Result<()> {
        let json = serde_json::to_vec(&K8sFrame {
            id: id.to_string(),
            conn: ends.conn.clone(),
            peer: ends.peer.clone(),
        })
        .map_err(io::Error::other)?;
        self.frame(FRAME_K8S, &json)
    }

    /// A recheck's walk starts at `now_ns` ([`Table::recheck_start`]).
    pub fn recheck_start(&mut self, now_ns: u64) -> io::Result<()> {
        self.frame(FRAME_RECHECK_START, &now_ns.to_le_bytes())
    }

    /// That walk ended ([`Table::recheck_end`]).
    pub fn recheck_end(&mut self, walked: &[u64], stored: bool, complete: bool) -> io::Result<()> {
        let mut payload = Vec::with_capacity(1 + 8 * walked.len());
        payload.push(u8::from(complete) | u8::from(stored) << 1);
        for ns in walked {
            payload.extend_from_slice(&ns.to_le_bytes());
        }
        self.frame(FRAME_RECHECK_END, &payload)
    }

    pub fn finish(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn len32(n: usize) -> io::Result<u32> {
    u32::try_from(n).map_err(|_| io::Error::other(format!("a {n}-byte frame is too large")))
}

/// A decoded frame.
#[derive(Debug)]
enum Frame {
    /// A kernel record, in [`Reader::event`] until the next call.
    Event,
    Tick(u64, Option<u64>),
    K8s(Box<K8sFrame>),
    RecheckStart(u64),
    /// The namespaces walked to their end, whether the socket storage walk was read to its
    /// end, and whether no event was lost meanwhile.
    RecheckEnd {
        walked: Vec<u64>,
        stored: bool,
        complete: bool,
    },
}

struct Reader<R: BufRead> {
    inp: R,
    offset: u64,
    /// The last frame's payload, reused: no allocation per record.
    buf: Vec<u8>,
}

impl<R: BufRead> Reader<R> {
    fn open(mut inp: R) -> anyhow::Result<(Self, Header)> {
        let mut magic = [0u8; 8];
        inp.read_exact(&mut magic)
            .context("reading the file header")?;
        if &magic != MAGIC {
            bail!(
                "not a whoclosed recording (made with `whoclosed agent --record FILE` or `whoclosed trace --record FILE`)"
            );
        }
        let mut word = [0u8; 4];
        inp.read_exact(&mut word)?;
        let version = u32::from_le_bytes(word);
        if version != FORMAT_VERSION {
            bail!(
                "recording format version {version}; this whoclosed reads version {FORMAT_VERSION}"
            );
        }
        inp.read_exact(&mut word)?;
        let len = u32::from_le_bytes(word);
        if len > MAX_FRAME {
            bail!("corrupt recording: a {len}-byte header");
        }
        let mut json = vec![0u8; len as usize];
        inp.read_exact(&mut json)?;
        let header: Header = serde_json::from_slice(&json).context("the recording's header")?;
        if header.wire_version != tracer_common::WIRE_VERSION {
            bail!(
                "recorded by whoclosed {} with kernel record format {}; this whoclosed reads format {}",
                header.whoclosed,
                header.wire_version,
                tracer_common::WIRE_VERSION
            );
        }
        Ok((
            Reader {
                inp,
                offset: 16 + u64::from(len),
                buf: Vec::new(),
            },
            header,
        ))
    }

    /// The payload of the last [`Frame::Event`].
    fn event(&self) -> &[u8] {
        &self.buf
    }

    /// The next frame; `None` at the end. A frame cut short (the agent was killed while
    /// writing) ends the recording with a warning.
    fn next(&mut self) -> anyhow::Result<Option<Frame>> {
        self.next_of(|_| true)
    }

    /// The next frame of a kind `want` accepts; the payloads of the others are passed over
    /// without being copied (replay's first pass wants only the pod frames of a file that
    /// is mostly kernel records).
    fn next_of(&mut self, want: impl Fn(u8) -> bool) -> anyhow::Result<Option<Frame>> {
        loop {
            let Some((kind, len)) = self.frame_head()? else {
                return Ok(None);
            };
            if want(kind) {
                return self.frame_body(kind, len);
            }
            let mut left = len as usize;
            while left > 0 {
                let avail = self.inp.fill_buf()?.len();
                if avail == 0 {
                    log::warn!("recording ends inside a frame at byte {}", self.offset);
                    return Ok(None);
                }
                let k = avail.min(left);
                self.inp.consume(k);
                left -= k;
            }
            self.offset += 5 + u64::from(len);
        }
    }

    /// The kind and payload length of the next frame; `None` at the end.
    fn frame_head(&mut self) -> anyhow::Result<Option<(u8, u32)>> {
        let mut head = [0u8; 5];
        match read_buffered(&mut self.inp, &mut head)? {
            0 => return Ok(None),
            5 => {}
            n => {
                log::warn!(
                    "recording ends inside a frame header at byte {}",
                    self.offset + n as u64
                );
                return Ok(None);
            }
        }
        let kind = head[0];
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        if len > MAX_FRAME {
            bail!(
                "corrupt recording: a {len}-byte frame at byte {}",
                self.offset
            );
        }
        Ok(Some((kind, len)))
    }

    /// The payload of the frame whose head [`Self::frame_head`] just read.
    fn frame_body(&mut self, kind: u8, len: u32) -> anyhow::Result<Option<Frame>> {
        self.buf.clear();
        self.buf.resize(len as usize, 0);
        if read_buffered(&mut self.inp, &mut self.buf)? != self.buf.len() {
            log::warn!("recording ends inside a frame at byte {}", self.offset);
            return Ok(None);
        }
        let at = self.offset;
        self.offset += 5 + u64::from(len);
        let payload = &self.buf;
        Ok(Some(match kind {
            FRAME_EVENT => Frame::Event,
            FRAME_TICK => {
                let word = |i: usize| {
                    payload
                        .get(i..i + 8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_le_bytes)
                };
                match (payload.len(), word(0), word(8)) {
                    (8, Some(now), _) => Frame::Tick(now, None),
                    (16, Some(now), Some(drops)) => Frame::Tick(now, Some(drops)),
                    _ => bail!("corrupt tick frame at byte {at}"),
                }
            }
            FRAME_K8S => Frame::K8s(Box::new(
                serde_json::from_slice(payload)
                    .with_context(|| format!("pod frame at byte {at}"))?,
            )),
            FRAME_RECHECK_START => match <[u8; 8]>::try_from(payload.as_slice()) {
                Ok(w) => Frame::RecheckStart(u64::from_le_bytes(w)),
                Err(_) => bail!("corrupt recheck frame at byte {at}"),
            },
            FRAME_RECHECK_END => {
                let (flags, list) = match payload.split_first() {
                    Some((&c, rest)) if c <= 3 && rest.len() % 8 == 0 => (c, rest),
                    _ => bail!("corrupt recheck frame at byte {at}"),
                };
                let walked = list
                    .chunks_exact(8)
                    .filter_map(|w| <[u8; 8]>::try_from(w).ok())
                    .map(u64::from_le_bytes)
                    .collect();
                Frame::RecheckEnd {
                    walked,
                    stored: flags & 2 != 0,
                    complete: flags & 1 != 0,
                }
            }
            k => bail!("corrupt recording: unknown frame kind {k} at byte {at}"),
        }))
    }
}

/// `buf.len()` bytes straight from the reader's buffer when it holds them (a frame rarely
/// straddles a refill), else read piece by piece; how many were read.
fn read_buffered(r: &mut impl BufRead, buf: &mut [u8]) -> io::Result<usize> {
    let have = r.fill_buf()?;
    if have.len() >= buf.len() {
        buf.copy_from_slice(&have[..buf.len()]);
        r.consume(buf.len());
        return Ok(buf.len());
    }
    read_full(r, buf)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// `whoclosed replay FILE`: the verdicts of a recording, as the live session wrote them.
/// Needs no privilege; writes `close` lines (or table rows) to `out`. `filter`, when given,
/// replaces the session's own filters (the recording holds every socket's records).
pub fn replay(
    path: &Path,
    format: Format,
    filter: Option<Filter>,
    out: impl Write,
) -> anyhow::Result<u64> {
    let open = || -> anyhow::Result<_> {
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Reader::open(BufReader::new(f)).with_context(|| path.display().to_string())
    };
    // First pass: the pods recorded for each verdict (written when the verdict was made,
    // so after the tick that made it).
    let (mut reader, header) = open()?;
    let mut pods: HashMap<String, K8sEnds> = HashMap::new();
    while let Some(frame) = reader.next_of(|k| k == FRAME_K8S)? {
        if let Frame::K8s(k) = frame {
            let k = *k;
            pods.insert(
                k.id,
                K8sEnds {
                    conn: k.conn,
                    peer: k.peer,
                },
            );
        }
    }
    let (mut reader, _) = open()?;
    let base = ClockBase {
        mono0_ns: header.mono0_ns,
        real0: UNIX_EPOCH
            + Duration::from_nanos(u64::try_from(header.real0_unix_ns).unwrap_or(u64::MAX)),
    };
    let mut table = Table::new(TableConfig {
        linger_ns: header.linger_ns,
        max_conns: header.max_conns,
        ephemeral: header.ephemeral,
        packet_facts: header.packet_facts,
        rst_reason_names: header.rst_reason_names.into_iter().collect(),
    });
    let recorded = header.filter;
    let filter = filter.unwrap_or(Filter {
        ports: recorded.ports,
        addrs: recorded.addrs,
        netns: recorded.netns,
        pid: recorded.pid,
        comm: recorded.comm,
    });
    let mut output = Output::new(out, format, filter, base);
    output.recorded_k8s = Some(pods);
    if format == Format::Table {
        writeln!(output.out, "{}", crate::export::TABLE_HEADER)?;
    }
    let mut decode_errors = 0u64;
    while let Some(frame) = reader.next()? {
        match frame {
            Frame::Event => match event::decode(reader.event()) {
                Ok(ev) => output.all(table.on_event(&ev))?,
                Err(e) => {
                    decode_errors += 1;
                    if decode_errors <= 10 {
                        log::warn!("dropping malformed kernel record: {e}");
                    }
                }
            },
            Frame::Tick(now, drops) => output.tick(&mut table, now, drops)?,
            Frame::K8s(_) => {}
            Frame::RecheckStart(now) => output.recheck_start(&mut table, now)?,
            Frame::RecheckEnd {
                walked,
                stored,
                complete,
            } => {
                output.recheck_end(&mut table, &walked, stored, complete)?;
            }
        }
    }
    output.all(table.take_all_closed())?;
    output.out.flush()?;
    Ok(output.printed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_frames_round_trip_and_truncation_ends_cleanly() {
        let dir = std::env::temp_dir().join(format!("whoclosed-rec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.rec");
        let cfg = TableConfig {
            linger_ns: 5,
            rst_reason_names: [(2, "NO_SOCKET".to_string())].into_iter().collect(),
            ..TableConfig::default()
        };
        let base = ClockBase {
            mono0_ns: 42,
            real0: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        };
        let mut w = Writer::create(&path, base, &cfg, &Filter::default()).unwrap();
        w.event(&[1, 2, 3]).unwrap();
        w.tick(99, None).unwrap();
        w.tick(100, Some(7)).unwrap();
        w.finish().unwrap();
        drop(w);
        let bytes = std::fs::read(&path).unwrap();
        let (mut r, h) = Reader::open(bytes.as_slice()).unwrap();
        assert_eq!(h.linger_ns, 5);
        assert_eq!(h.mono0_ns, 42);
        assert_eq!(
            h.rst_reason_names.get(&2).map(String::as_str),
            Some("NO_SOCKET")
        );
        assert!(matches!(r.next(), Ok(Some(Frame::Event))));
        assert_eq!(r.event(), [1, 2, 3]);
        assert!(matches!(r.next(), Ok(Some(Frame::Tick(99, None)))));
        assert!(matches!(r.next(), Ok(Some(Frame::Tick(100, Some(7))))));
        assert!(matches!(r.next(), Ok(None)));
        // Cut inside the last frame: ends without an error.
        let cut = &bytes[..bytes.len() - 3];
        let (mut r, _) = Reader::open(cut).unwrap();
        assert!(matches!(r.next(), Ok(Some(Frame::Event))));
        assert!(matches!(r.next(), Ok(Some(Frame::Tick(99, None)))));
        assert!(matches!(r.next(), Ok(None)));
        // Passing over frames of other kinds (replay's first pass): the tick after the
        // event is found, the rest of the file too; inside a cut frame it just ends.
        let (mut r, _) = Reader::open(bytes.as_slice()).unwrap();
        assert!(matches!(
            r.next_of(|k| k == FRAME_TICK),
            Ok(Some(Frame::Tick(99, None)))
        ));
        assert!(matches!(r.next_of(|k| k == FRAME_EVENT), Ok(None)));
        let (mut r, _) = Reader::open(cut).unwrap();
        assert!(matches!(r.next_of(|k| k == FRAME_K8S), Ok(None)));
        // A one-byte buffer: every frame straddles a refill.
        let (mut r, _) = Reader::open(BufReader::with_capacity(1, bytes.as_slice())).unwrap();
        assert!(matches!(r.next(), Ok(Some(Frame::Event))));
        assert_eq!(r.event(), [1, 2, 3]);
        assert!(matches!(r.next(), Ok(Some(Frame::Tick(99, None)))));
        assert!(matches!(r.next(), Ok(Some(Frame::Tick(100, Some(7))))));
        assert!(matches!(r.next(), Ok(None)));
        // Not a recording.
        assert!(Reader::open(&b"{\"v\":1}\n........"[..]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod recheck_frames {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A recording with `frames` after a valid header.
    fn recording(frames: &[Vec<u8>]) -> Vec<u8> {
        let dir = std::env::temp_dir().join(format!("whoclosed-rck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.rec");
        let base = ClockBase::now();
        let w = Writer::create(&path, base, &TableConfig::default(), &Filter::default());
        drop(w.unwrap());
        let mut bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        for f in frames {
            bytes.extend_from_slice(f);
        }
        bytes
    }

    #[test]
    fn recheck_frames_round_trip_and_bad_ones_are_errors() {
        let mut end = vec![1u8];
        end.extend_from_slice(&4026531993u64.to_le_bytes());
        end.extend_from_slice(&7u64.to_le_bytes());
        let bytes = recording(&[
            frame(FRAME_RECHECK_START, &5u64.to_le_bytes()),
            frame(FRAME_RECHECK_END, &end),
            frame(FRAME_RECHECK_END, &[0]),
            frame(FRAME_RECHECK_END, &[2]),
            frame(FRAME_RECHECK_END, &[3]),
        ]);
        let (mut r, _) = Reader::open(bytes.as_slice()).unwrap();
        assert!(matches!(r.next(), Ok(Some(Frame::RecheckStart(5)))));
        match r.next() {
            Ok(Some(Frame::RecheckEnd {
                walked,
                stored: false,
                complete: true,
            })) => assert_eq!(walked, [4026531993, 7]),
            other => panic!("{other:?}"),
        }
        for (want_stored, want_complete) in [(false, false), (true, false), (true, true)] {
            match r.next() {
                Ok(Some(Frame::RecheckEnd {
                    walked,
                    stored,
                    complete,
                })) => {
                    assert!(walked.is_empty());
                    assert_eq!((stored, complete), (want_stored, want_complete));
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(r.next(), Ok(None)));
        // Round trip through the writer.
        let dir = std::env::temp_dir().join(format!("whoclosed-rcw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.rec");
        let mut w = Writer::create(
            &path,
            ClockBase::now(),
            &TableConfig::default(),
            &Filter::default(),
        )
        .unwrap();
        w.recheck_end(&[9], true, false).unwrap();
        w.finish().unwrap();
        drop(w);
        let bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let (mut r, _) = Reader::open(bytes.as_slice()).unwrap();
        match r.next() {
            Ok(Some(Frame::RecheckEnd {
                walked,
                stored: true,
                complete: false,
            })) => assert_eq!(walked, [9]),
            other => panic!("{other:?}"),
        }
        for bad in [
            frame(FRAME_RECHECK_START, &[1, 2, 3]),
            frame(FRAME_RECHECK_END, &[]),
            frame(FRAME_RECHECK_END, &[4]),
            frame(FRAME_RECHECK_END, &[1, 0, 0, 0]),
        ] {
            let bytes = recording(&[bad]);
            let (mut r, _) = Reader::open(bytes.as_slice()).unwrap();
            let e = r.next().expect_err("a corrupt frame");
            assert!(e.to_string().contains("corrupt recheck frame"), "{e:#}");
        }
    }
}
