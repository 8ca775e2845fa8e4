use clap::Parser as _;
use tracer_user::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Trace(args) => runtime.block_on(tracer_user::trace::run(args.into_options()?)),
    }
}
