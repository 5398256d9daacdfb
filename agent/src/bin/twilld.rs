//! `twilld`: the twill node agent.

use clap::Parser;
use tracing_subscriber::EnvFilter;
use twill_agent::agent::{Options, run};

fn main() -> anyhow::Result<()> {
    let opts = Options::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if opts.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(opts))
}
