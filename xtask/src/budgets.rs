//! `cargo xtask bench-budgets`: every benchmark behind issue #10's budgets in one run, then
//! one table of budget, measurement and whether the measurement shows the budget met.
//! Like the benchmarks it runs, it asserts nothing about the figures; a benchmark that
//! fails to run is an error. `--write-doc` keeps the table, with the command, machine,
//! date and commit, at the top of docs/performance.md.

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{bench, bench::Interval, bench_scale};

#[derive(clap::Args)]
pub struct BudgetArgs {
    /// Seconds per phase of the churn benchmark.
    #[arg(long, default_value_t = 2)]
    churn_secs: u64,
    /// Rounds of the churn benchmark (bare, both tracers, bare again): six or more give
    /// each churn figure a 95 % interval.
    #[arg(long, default_value_t = 12)]
    churn_rounds: usize,
    /// Detached/attached pairs in each HTTP/2 run.
    #[arg(long, default_value_t = 24)]
    h2_rounds: u32,
    /// Connections the memory benchmark holds open (two tracked sockets each).
    #[arg(long, default_value_t = 50_000)]
    conns: usize,
    /// Skip the two HTTP/2 runs that only give context (the empty-program floor of the
    /// cgroup_skb hook, and the tracer without its HTTP/2 walker).
    #[arg(long)]
    no_context: bool,
    /// Write the table, with the command, machine, date and commit, into
    /// docs/performance.md between its `bench-budgets` markers.
    #[arg(long)]
    write_doc: bool,
}

/// Whether a measurement shows a budget (or goal) met.
#[derive(Clone, Debug, PartialEq)]
pub enum Met {
    Yes,
    No,
    /// The measurement cannot tell (its interval spans the line, the baseline moved).
    NotShown(String),
    /// The benchmark did not run or could not measure it.
    NotMeasured(String),
}

impl Met {
    fn cell(&self) -> String {
        match self {
            Met::Yes => "yes".into(),
            Met::No => "**no**".into(),
            Met::NotShown(why) => format!("not shown ({why})"),
            Met::NotMeasured(why) => format!("not measured ({why})"),
        }
    }
}

/// `value ≤ limit`, for a single measurement.
fn at_most(value: f64, limit: f64) -> Met {
    if !value.is_finite() {
        Met::NotMeasured("no figure".into())
    } else if value <= limit {
        Met::Yes
    } else {
        Met::No
    }
}

/// `value ≥ limit`, for a single measurement.
fn at_least(value: f64, limit: f64) -> Met {
    at_most(-value, -limit)
}

/// A median against `line`, judged by its 95 % interval: shown met only when the whole
/// interval is at or above the line, shown missed only when the whole interval is below.
fn interval_at_least(i: &Interval, line: f64) -> Met {
    if !(i.lo.is_finite() && i.hi.is_finite()) {
        Met::NotShown(format!("{} runs: too few for an interval", i.n))
    } else if i.lo >= line {
        Met::Yes
    } else if i.hi < line {
        Met::No
    } else {
        Met::NotShown("the interval spans the line".into())
    }
}

/// As [`interval_at_least`], for "at most".
fn interval_at_most(i: &Interval, line: f64) -> Met {
    interval_at_least(
        &Interval {
            median: -i.median,
            lo: -i.hi,
            hi: -i.lo,
            n: i.n,
        },
        -line,
    )
}

/// "No drops below `line` kernel records per second with default settings": a run at or
/// above the line without drops shows it; drops below it break it; drops above it, or a
/// load too light to reach it, say nothing.
fn no_drops_below(rate: f64, drops: u64, line: f64) -> Met {
    match (rate >= line, drops) {
        (true, 0) => Met::Yes,
        (false, 0) => Met::NotShown(format!("load of {rate:.0}/s is under the line")),
        (false, _) => Met::No,
        (true, _) => Met::NotShown("drops above the line are allowed".into()),
    }
}

/// `median (lo–hi)` with `digits` decimals.
fn iv(i: &Interval, digits: usize) -> String {
    if i.lo.is_finite() && i.hi.is_finite() {
        format!("{:.d$} ({:.d$}–{:.d$})", i.median, i.lo, i.hi, d = digits)
    } else {
        format!("{:.d$}", i.median, d = digits)
    }
}

struct Row {
    budget: &'static str,
    measured: String,
    met: Met,
    goal: Option<(&'static str, Met)>,
}

fn failed(budget: &'static str, e: &anyhow::Error) -> Row {
    Row {
        budget,
        measured: "-".into(),
        met: Met::NotMeasured(format!("{e:#}")),
        goal: None,
    }
}

const KERNEL: &str = "kernel: BPF time per connection ≤ tcplife's";
const AGENT: &str = "agent: CPU per ended connection ≤ tcplife's";
const CHURN: &str = "throughput: churn ratio ≥ tcplife's";

fn churn_rows(c: &Result<bench::ChurnSummary>) -> Vec<Row> {
    let c = match c {
        Ok(c) => c,
        Err(e) => return [KERNEL, AGENT, CHURN].map(|b| failed(b, e)).into(),
    };
    let w = &c.whoclosed;
    let (Some(t), Some(rel)) = (&c.tcplife, &c.vs_tcplife) else {
        return [KERNEL, AGENT, CHURN]
            .map(|budget| Row {
                budget,
                measured: format!(
                    "whoclosed: {} ns, {} µs, ratio {}",
                    iv(&w.bpf_ns_per_conn, 0),
                    iv(&w.us_per_conn, 1),
                    iv(&w.ratio, 3)
                ),
                met: Met::NotMeasured("tcplife not installed".into()),
                goal: None,
            })
            .into();
    };
    // "whoclosed vs tcplife, and their ratio round by round".
    let vs = |w: &Interval, t: &Interval, rel: &Interval, digits: usize, unit: &str| {
        format!(
            "{} vs {}{unit}; whoclosed/tcplife {}, {} rounds",
            iv(w, digits),
            iv(t, digits),
            iv(rel, 3),
            c.rounds
        )
    };
    vec![
        Row {
            budget: KERNEL,
            measured: vs(
                &w.bpf_ns_per_conn,
                &t.bpf_ns_per_conn,
                &rel.bpf_ns,
                0,
                " ns",
            ),
            met: interval_at_most(&rel.bpf_ns, 1.0),
            goal: Some(("half", interval_at_most(&rel.bpf_ns, 0.5))),
        },
        Row {
            budget: AGENT,
            measured: vs(&w.us_per_conn, &t.us_per_conn, &rel.us, 1, " µs"),
            met: interval_at_most(&rel.us, 1.0),
            goal: Some((
                "5 µs (5 % of a core at 10k/s)",
                interval_at_most(&w.us_per_conn, 5.0),
            )),
        },
        Row {
            budget: CHURN,
            measured: vs(&w.ratio, &t.ratio, &rel.rate, 3, " of bare"),
            met: interval_at_least(&rel.rate, 1.0),
            goal: Some(("≥ 0.97", interval_at_least(&w.ratio, 0.97))),
        },
    ]
}

fn h2_cell(h: &bench::H2Summary) -> String {
    let bpf = h
        .bpf_share
        .map(|s| format!("BPF {:.1} %, ", s * 100.0))
        .unwrap_or_default();
    format!(
        "{}, {} pairs; {bpf}agent {:.2} % of the workload's CPU",
        iv(&h.ratio, 3),
        h.ratio.n,
        h.agent_share * 100.0
    )
}

fn h2_row(budget: &'static str, h: &Result<bench::H2Summary>, with_goal: bool) -> Row {
    match h {
        Ok(h) => Row {
            budget,
            measured: h2_cell(h),
            met: interval_at_least(&h.ratio, 0.98),
            goal: with_goal.then(|| ("0.99", interval_at_least(&h.ratio, 0.99))),
        },
        Err(e) => failed(budget, e),
    }
}

fn pipeline_rows(p: &Result<bench_scale::PipelineSummary>) -> Vec<Row> {
    match p {
        Ok(p) => {
            let rate = p.events as f64 / p.secs.max(1e-9);
            vec![
                Row {
                    budget: "pipeline: ≥ 1M events/s on one core (recorded file)",
                    measured: format!("{:.0} events per CPU second", p.events_per_cpu_s),
                    met: at_least(p.events_per_cpu_s, 1e6),
                    goal: None,
                },
                Row {
                    budget: "no drops below 50k kernel events/s, default settings",
                    measured: format!("{} drops at {rate:.0} records/s", p.drops),
                    met: no_drops_below(rate, p.drops, 50_000.0),
                    goal: None,
                },
            ]
        }
        Err(e) => vec![
            failed("pipeline: ≥ 1M events/s on one core (recorded file)", e),
            failed("no drops below 50k kernel events/s, default settings", e),
        ],
    }
}

fn live_row(l: &Result<bench_scale::LiveSummary>) -> Row {
    const BUDGET: &str = "scale: RSS ≤ 64 MiB with 100k live tracked sockets";
    match l {
        Ok(l) => {
            let mib = l.rss_kib as f64 / 1024.0;
            let idle = l
                .idle_cpu
                .map(|c| format!(", {:.2} % of a core idle", c * 100.0))
                .unwrap_or_default();
            Row {
                budget: BUDGET,
                measured: format!(
                    "{mib:.1} MiB with {} sockets{idle}, {} drops",
                    l.sockets, l.ringbuf_drops
                ),
                met: if l.sockets < 100_000 {
                    Met::NotShown(format!("only {} sockets held", l.sockets))
                } else {
                    at_most(mib, 64.0)
                },
                goal: None,
            }
        }
        Err(e) => failed(BUDGET, e),
    }
}

fn render(rows: &[Row]) -> String {
    let mut s = String::from("| budget | measured | met | goal |\n|---|---|---|---|\n");
    for r in rows {
        let goal = r
            .goal
            .as_ref()
            .map(|(g, m)| format!("{g}: {}", m.cell()))
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(
            s,
            "| {} | {} | {} | {goal} |",
            r.budget,
            r.measured,
            r.met.cell()
        );
    }
    s
}

fn first_line(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then_some(())?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Date, commit, machine and kernel, for the record.
fn provenance(root: &Path, mode: Option<&str>) -> String {
    let date = first_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .unwrap_or_else(|| "unknown date".into());
    let commit =
        first_line(
            Command::new("git")
                .arg("-C")
                .arg(root)
                .args(["rev-parse", "--short", "HEAD"]),
        )
        .unwrap_or_else(|| "unknown commit".into());
    let dirty = first_line(
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["status", "--porcelain"]),
    )
    .is_some_and(|s| !s.is_empty());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kib| kib / (1024.0 * 1024.0))
        .unwrap_or(f64::NAN);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let argv: Vec<String> = std::env::args().skip(1).collect();
    format!(
        "`cargo xtask {}`, {date}, commit {commit}{}; {cores} × {model}, {mem_gib:.0} GiB, \
         Linux {kernel}, probe mode {}.",
        argv.join(" "),
        if dirty {
            " with uncommitted changes"
        } else {
            ""
        },
        mode.unwrap_or("unknown")
    )
}

const BEGIN: &str = "<!-- bench-budgets:begin -->";
const END: &str = "<!-- bench-budgets:end -->";

/// `doc` with the text between its markers replaced by `block`.
fn replace_block(doc: &str, block: &str) -> Result<String> {
    let b = doc
        .find(BEGIN)
        .with_context(|| format!("no {BEGIN} marker"))?;
    let e = doc.find(END).with_context(|| format!("no {END} marker"))?;
    if e < b {
        bail!("{END} comes before {BEGIN}");
    }
    Ok(format!("{}{BEGIN}\n{block}{}", &doc[..b], &doc[e..]))
}

/// Parses `argv` as a benchmark's arguments: its defaults, with the given flags on top.
fn parse<A: clap::Args>(argv: &[String]) -> Result<A> {
    let cmd = A::augment_args(clap::Command::new("bench").no_binary_name(true));
    let m = cmd.try_get_matches_from(argv)?;
    Ok(A::from_arg_matches(&m)?)
}

pub fn run(root: &Path, args: &BudgetArgs) -> Result<()> {
    let churn_args: bench::ChurnArgs = parse(&[
        "--secs".into(),
        args.churn_secs.to_string(),
        "--rounds".into(),
        args.churn_rounds.to_string(),
    ])?;
    let h2_args = |extra: &[&str]| -> Result<bench::H2Args> {
        let mut v = vec!["--rounds".to_owned(), args.h2_rounds.to_string()];
        v.extend(extra.iter().map(|s| s.to_string()));
        parse(&v)
    };
    let section = |what: &str| println!("\n=== bench-budgets: {what} ===");

    section("connection churn (bench-churn)");
    let churn = bench::churn(root, &churn_args);
    section("bulk HTTP/2 (bench-h2)");
    let h2 = bench::h2(root, &h2_args(&[])?);
    let (floor, bare_hooks) = if args.no_context {
        (None, None)
    } else {
        section("bulk HTTP/2, two empty programs in the tracer's place (bench-h2 --floor)");
        let floor = bench::h2(root, &h2_args(&["--floor"])?);
        section("bulk HTTP/2, the tracer without its HTTP/2 walker (--no-h2-frames)");
        let bare = bench::h2(root, &h2_args(&["--tracer-arg=--no-h2-frames"])?);
        (Some(floor), Some(bare))
    };
    section("recorded-file pipeline and drops (bench-pipeline)");
    let pipeline = bench_scale::pipeline(root, &parse(&[])?);
    section("live connections and memory (bench-live)");
    let live = bench_scale::live(root, &parse(&["--conns".into(), args.conns.to_string()])?);

    let mut rows = churn_rows(&churn);
    rows.push(h2_row("throughput: bulk HTTP/2 ratio ≥ 0.98", &h2, true));
    if let Some(f) = &floor {
        rows.push(h2_row(
            "context: bulk HTTP/2 with two empty programs (the hook's floor)",
            f,
            false,
        ));
    }
    if let Some(b) = &bare_hooks {
        rows.push(h2_row(
            "context: bulk HTTP/2 with `--no-h2-frames`",
            b,
            false,
        ));
    }
    rows.push(live_row(&live));
    rows.extend(pipeline_rows(&pipeline));
    let mode = live.as_ref().ok().and_then(|l| l.mode.as_deref());
    let block = format!("{}\n\n{}", provenance(root, mode), render(&rows));
    section("budgets of issue #10");
    print!("{block}");
    println!(
        "(\"met\": shown only when the whole 95 % interval of the median lies on the budget's side \
         of the line; RSS, pipeline and drops are single measurements)"
    );
    if args.write_doc {
        let path = root.join("docs/performance.md");
        let doc = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let new =
            replace_block(&doc, &block).with_context(|| format!("updating {}", path.display()))?;
        std::fs::write(&path, new).with_context(|| format!("writing {}", path.display()))?;
        println!("written to {}", path.display());
    }
    let errors: Vec<String> = [
        churn.as_ref().err(),
        h2.as_ref().err(),
        floor.as_ref().and_then(|r| r.as_ref().err()),
        bare_hooks.as_ref().and_then(|r| r.as_ref().err()),
        pipeline.as_ref().err(),
        live.as_ref().err(),
    ]
    .into_iter()
    .flatten()
    .map(|e| format!("{e:#}"))
    .collect();
    if !errors.is_empty() {
        bail!(
            "{} benchmark(s) failed: {}",
            errors.len(),
            errors.join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(median: f64, lo: f64, hi: f64) -> Interval {
        Interval {
            median,
            lo,
            hi,
            n: 24,
        }
    }

    #[test]
    fn an_interval_is_judged_only_when_it_lies_on_one_side() {
        let spans = Met::NotShown("the interval spans the line".into());
        let cases = [
            (iv(0.99, 0.981, 1.02), Met::Yes, Met::No),
            (iv(0.985, 0.98, 0.99), Met::Yes, spans.clone()),
            (iv(0.95, 0.90, 0.979), Met::No, Met::Yes),
            (iv(0.97, 0.95, 1.01), spans.clone(), spans.clone()),
        ];
        for (i, least, most) in cases {
            assert_eq!(interval_at_least(&i, 0.98), least, "{i:?} at least");
            assert_eq!(interval_at_most(&i, 0.98), most, "{i:?} at most");
        }
        let few = Interval::of(vec![1.0, 0.9, 1.1]);
        assert_eq!(few.median, 1.0);
        assert!(matches!(interval_at_least(&few, 0.98), Met::NotShown(_)));
        assert!(matches!(interval_at_most(&few, 2.0), Met::NotShown(_)));
    }

    #[test]
    fn drops_count_only_below_the_line() {
        assert_eq!(no_drops_below(214_000.0, 0, 50_000.0), Met::Yes);
        assert_eq!(no_drops_below(20_000.0, 3, 50_000.0), Met::No);
        assert!(matches!(
            no_drops_below(20_000.0, 0, 50_000.0),
            Met::NotShown(_)
        ));
        assert!(matches!(
            no_drops_below(90_000.0, 7, 50_000.0),
            Met::NotShown(_)
        ));
    }

    #[test]
    fn limits_and_missing_figures() {
        assert_eq!(at_most(0.45, 1.0), Met::Yes);
        assert_eq!(at_most(1.2, 1.0), Met::No);
        assert_eq!(at_least(0.99, 0.97), Met::Yes);
        assert_eq!(at_least(0.96, 0.97), Met::No);
        assert!(matches!(at_most(f64::NAN, 1.0), Met::NotMeasured(_)));
    }

    fn cost(ratio: Interval, us: Interval, bpf: Interval) -> bench::TracerCost {
        bench::TracerCost {
            ratio,
            us_per_conn: us,
            bpf_ns_per_conn: bpf,
        }
    }

    fn churn(rate_rel: Interval, us: Interval) -> bench::ChurnSummary {
        bench::ChurnSummary {
            rounds: 8,
            whoclosed: cost(iv(0.99, 0.98, 1.0), us, iv(9e3, 8e3, 1e4)),
            tcplife: Some(cost(
                iv(0.96, 0.95, 0.97),
                iv(30.0, 28.0, 31.0),
                iv(2e4, 1.9e4, 2.1e4),
            )),
            vs_tcplife: Some(bench::Relative {
                bpf_ns: iv(0.45, 0.42, 0.48),
                us: iv(0.5, 0.45, 0.55),
                rate: rate_rel,
            }),
        }
    }

    #[test]
    fn churn_budgets_and_goals_by_their_intervals() {
        let rows = churn_rows(&Ok(churn(iv(1.03, 1.01, 1.05), iv(15.0, 14.0, 16.0))));
        assert_eq!(rows[0].met, Met::Yes); // 0.42–0.48× the BPF time
        assert_eq!(rows[0].goal.as_ref().map(|g| &g.1), Some(&Met::Yes));
        assert_eq!(rows[1].met, Met::Yes); // half tcplife's µs
        assert_eq!(rows[1].goal.as_ref().map(|g| &g.1), Some(&Met::No)); // not 5 µs
        assert_eq!(rows[2].met, Met::Yes);
        assert_eq!(rows[2].goal.as_ref().map(|g| &g.1), Some(&Met::Yes));
        let tied = churn_rows(&Ok(churn(iv(1.0, 0.97, 1.02), iv(4.0, 3.0, 6.0))));
        assert!(matches!(tied[2].met, Met::NotShown(_)));
        assert!(matches!(
            tied[1].goal.as_ref().map(|g| &g.1),
            Some(Met::NotShown(_))
        ));
        let behind = churn_rows(&Ok(churn(iv(0.95, 0.93, 0.97), iv(15.0, 14.0, 16.0))));
        assert_eq!(behind[2].met, Met::No);
        let mut none = churn(iv(1.0, 0.97, 1.02), iv(15.0, 14.0, 16.0));
        none.tcplife = None;
        none.vs_tcplife = None;
        assert!(
            churn_rows(&Ok(none))
                .iter()
                .all(|r| matches!(r.met, Met::NotMeasured(_)))
        );
    }

    #[test]
    fn live_memory_needs_the_full_count() {
        let l = |sockets, rss_kib| {
            Ok(bench_scale::LiveSummary {
                sockets,
                rss_kib,
                idle_cpu: Some(0.002),
                ringbuf_drops: 0,
                mode: None,
            })
        };
        assert_eq!(live_row(&l(100_000, 60_000)).met, Met::Yes);
        assert_eq!(live_row(&l(100_000, 70_000)).met, Met::No);
        assert!(matches!(live_row(&l(20_000, 10_000)).met, Met::NotShown(_)));
    }

    #[test]
    fn the_doc_block_is_replaced_between_its_markers_only() {
        let doc = format!("# T\n\nintro\n{BEGIN}\nold\n{END}\n\nrest\n");
        let new = replace_block(&doc, "new table\n").unwrap();
        assert_eq!(
            new,
            format!("# T\n\nintro\n{BEGIN}\nnew table\n{END}\n\nrest\n")
        );
        assert!(replace_block("no markers", "x").is_err());
        assert!(replace_block(&format!("{END}\n{BEGIN}\n"), "x").is_err());
    }

    #[test]
    fn benchmark_arguments_start_from_their_defaults() {
        let a: bench_scale::LiveArgs = parse(&["--conns".into(), "10".into()]).unwrap();
        assert_eq!(a.conns(), 10);
        assert!(parse::<bench_scale::LiveArgs>(&["--bogus".into()]).is_err());
    }
}
