//! `causeway-bench`: Causeway's lab on this machine.
//!
//! `demo` builds a two-site lab in network namespaces, joins the sites with
//! the real `causeway` daemon, shows traffic crossing, and tears it all
//! down. (The iperf-style benchmark will live here too.)

mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join two sites in a local lab and show traffic crossing (needs root).
    Demo {
        /// The causeway binary [default: next to this one].
        #[arg(long)]
        causeway: Option<PathBuf>,
        /// Seconds of TCP throughput measurement.
        #[arg(long, default_value_t = 3)]
        seconds: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo { causeway, seconds } => demo::run(causeway, seconds),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("causeway-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
