//! `compile-audit`: audit torch.compile runs from their TORCH_TRACE / TORCH_LOGS output.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use compile_audit::gate::Gate;

/// Audit torch.compile runs: graph breaks, recompiles, eager fallbacks, what was captured.
///
/// Produce the input by running your program with TORCH_TRACE=/some/dir (structured
/// logs, one file per rank) and optionally TORCH_LOGS="graph_breaks,recompiles" with
/// stderr saved to a file. Pass any mix of files and folders.
///
/// Examples:
///   compile-audit report /tmp/trace
///   compile-audit report /tmp/trace --format md > audit.md
///   compile-audit gate /tmp/trace --max-graph-breaks 0 --max-recompiles 30 --require-captured bitsandbytes
#[derive(Parser)]
#[command(name = "compile-audit", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// One screen for the terminal.
    Table,
    /// Everything, machine-readable.
    Json,
    /// Everything, for people (PR comments, reports).
    Md,
}

#[derive(Subcommand)]
enum Cmd {
    /// Report what happened in the run.
    Report {
        /// TORCH_TRACE files or folders, TORCH_LOGS text files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Exit non-zero (1) when the run breaks a rule; explain each violation.
    /// A frame that hit the recompile limit always fails.
    Gate {
        /// TORCH_TRACE files or folders, TORCH_LOGS text files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Most graph breaks allowed.
        #[arg(long)]
        max_graph_breaks: Option<usize>,
        /// Most recompilations allowed.
        #[arg(long)]
        max_recompiles: Option<usize>,
        /// Substring that must name an op, user function or module captured in a graph (repeatable).
        #[arg(long = "require-captured")]
        require_captured: Vec<String>,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().cmd {
        Cmd::Report { paths, format } => {
            let r = compile_audit::audit_paths(&paths)?;
            match format {
                Format::Table => print!("{}", compile_audit::render::table(&r)),
                Format::Md => print!("{}", compile_audit::render::markdown(&r)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&r).context("serializing the report")?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Gate { paths, max_graph_breaks, max_recompiles, require_captured } => {
            let r = compile_audit::audit_paths(&paths)?;
            let v = Gate { max_graph_breaks, max_recompiles, require_captured }.check(&r);
            print!("{}", compile_audit::render::table(&r));
            if v.is_empty() {
                println!("gate: pass");
                return Ok(ExitCode::SUCCESS);
            }
            for x in &v {
                println!("gate: FAIL {}: {}", x.check, x.explanation);
            }
            Ok(ExitCode::from(1))
        }
    }
}
