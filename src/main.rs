//! The `abupdate` command: parses the command line and hands it to [`abupdate::cli`], which
//! runs it and maps its error to the exit code documented in README.md.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    abupdate::cli::main(abupdate::cli::Cli::parse())
}
