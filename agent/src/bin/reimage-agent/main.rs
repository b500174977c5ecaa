//! `reimage-agent`: the daemon and the lab commands (a thin layer over the
//! library; flags are documented where they are defined).

mod config_cmd;
mod demo_cmd;
mod display;
mod handoff_cmd;
mod image_cmd;
mod serve_cmd;
mod write_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "reimage-agent",
    version,
    about = "Reimage this host: stream, verify and write an OS image while keeping the local-storage partitions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole local cycle in a temporary sandbox, narrated.
    Demo,
    /// Run the daemon (the sandbox when there is no configuration).
    Serve(serve_cmd::ServeArgs),
    /// Write an image to a disk or file once (lab one-shot of the reimage pipeline).
    Write(write_cmd::WriteArgs),
    /// Pack, inspect and check images.
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
    /// Check a config file: print a summary if it is valid, the key and line
    /// of the first problem if not.
    CheckConfig(config_cmd::CheckConfigArgs),
    /// The privileged steps of an in-place reimage (run by the daemon
    /// through systemd-run).
    Handoff(handoff_cmd::HandoffArgs),
}

fn main() -> ExitCode {
    reimage_agent::disk::aligned::give_large_buffers_their_own_pages();
    // Installed as /run/initramfs/shutdown, systemd-shutdown runs this
    // binary as PID 1 with argv[0] "/shutdown".
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|name| name == "shutdown")
    {
        return reimage_agent::handoff::shutdown::main(&args);
    }
    let cli = Cli::parse();
    // journald under systemd (JOURNAL_STREAM), stderr otherwise.
    reimage_agent::service::init_logging("info");
    let result = match cli.command {
        Command::Demo => demo_cmd::run(),
        Command::Serve(args) => serve_cmd::run(args),
        Command::Write(args) => write_cmd::run(args),
        Command::Image(command) => image_cmd::run(command),
        Command::CheckConfig(args) => config_cmd::run(args),
        Command::Handoff(command) => handoff_cmd::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", display::error_line(&err));
            ExitCode::FAILURE
        }
    }
}
