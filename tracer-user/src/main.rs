use std::process::ExitCode;

use clap::Parser as _;
use tracer_user::{
    cli::{Cli, Command},
    query,
};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("whoclosed: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Closes(a) => return runtime.block_on(query::closes(a)),
        Command::Conns(a) => return runtime.block_on(query::conns(a)),
        Command::Explain(a) => return runtime.block_on(query::explain(a)),
        Command::Stats(a) => return runtime.block_on(query::stats(a)),
        Command::Trace(args) => args
            .into_options()
            .and_then(|o| runtime.block_on(tracer_user::trace::run(o))),
        Command::Agent(args) => args
            .into_options()
            .and_then(|o| runtime.block_on(tracer_user::agent::run(o))),
        Command::Replay(a) => tracer_user::record::replay(
            &a.file,
            a.output,
            (!a.ports.is_empty() || !a.addrs.is_empty()).then(|| tracer_user::export::Filter {
                ports: a.ports,
                addrs: a.addrs,
                ..Default::default()
            }),
            // Stdout alone is line-buffered: two write calls per verdict line, which took
            // half of replay's CPU time when its output went into a pipe.
            std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock()),
        )
        .map(|_| ()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
