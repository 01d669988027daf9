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
///   compile-audit run --max-graph-breaks 0 -- python train.py --steps 20
///   compile-audit diff /tmp/trace_before /tmp/trace_after
///   compile-audit parity eager_losses.jsonl compiled_losses.jsonl --rtol 1e-3
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
    /// A static, self-contained HTML page.
    Html,
}

/// Gate thresholds shared by `gate` and `run`.
#[derive(clap::Args, Clone)]
struct GateArgs {
    /// Most graph breaks allowed.
    #[arg(long)]
    max_graph_breaks: Option<usize>,
    /// Most recompilations allowed.
    #[arg(long)]
    max_recompiles: Option<usize>,
    /// Substring that must name an op, user function or module captured in a graph (repeatable).
    #[arg(long = "require-captured")]
    require_captured: Vec<String>,
}

impl GateArgs {
    fn gate(self) -> Gate {
        Gate { max_graph_breaks: self.max_graph_breaks, max_recompiles: self.max_recompiles, require_captured: self.require_captured }
    }
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
        #[command(flatten)]
        rules: GateArgs,
    },
    /// Run a command with TORCH_TRACE pointed at a fresh folder, then report and gate.
    /// Exits with the command's status if it failed, else the gate's.
    Run {
        /// Where the trace goes (default: a new folder under the temp dir, printed).
        #[arg(long)]
        trace_dir: Option<PathBuf>,
        #[command(flatten)]
        rules: GateArgs,
        /// The command and its arguments (after `--`).
        #[arg(required = true, last = true)]
        cmd: Vec<String>,
    },
    /// What appeared, disappeared or changed between two runs (each a trace file or folder).
    Diff {
        /// Run A.
        a: PathBuf,
        /// Run B.
        b: PathBuf,
        /// Output format (table, md and html print the same Markdown).
        #[arg(long, value_enum, default_value = "md")]
        format: Format,
    },
    /// Compare per-step losses of an eager and a compiled run: JSONL lines {"step": N, "loss": X}.
    /// Exits 1 when a step differs by more than --rtol (relative) or a loss is not finite.
    Parity {
        /// Eager run's losses.
        eager: PathBuf,
        /// Compiled run's losses.
        compiled: PathBuf,
        /// Largest relative difference allowed per step.
        #[arg(long, default_value_t = 1e-3)]
        rtol: f64,
    },
}

fn gate_and_print(r: &compile_audit::Report, gate: &Gate) -> ExitCode {
    print!("{}", compile_audit::render::table(r));
    let v = gate.check(r);
    if v.is_empty() {
        println!("gate: pass");
        return ExitCode::SUCCESS;
    }
    for x in &v {
        println!("gate: FAIL {}: {}", x.check, x.explanation);
    }
    ExitCode::from(1)
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().cmd {
        Cmd::Report { paths, format } => {
            let r = compile_audit::audit_paths(&paths)?;
            match format {
                Format::Table => print!("{}", compile_audit::render::table(&r)),
                Format::Md => print!("{}", compile_audit::render::markdown(&r)),
                Format::Html => print!("{}", compile_audit::render::html(&r)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&r).context("serializing the report")?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Gate { paths, rules } => {
            let r = compile_audit::audit_paths(&paths)?;
            Ok(gate_and_print(&r, &rules.gate()))
        }
        Cmd::Run { trace_dir, rules, cmd } => {
            let dir = trace_dir.unwrap_or_else(|| {
                let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
                std::env::temp_dir().join(format!("compile-audit-{}-{nanos}", std::process::id()))
            });
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            eprintln!("compile-audit: TORCH_TRACE={}", dir.display());
            let status = std::process::Command::new(&cmd[0])
                .args(&cmd[1..])
                .env("TORCH_TRACE", &dir)
                .status()
                .with_context(|| format!("could not start `{}`", cmd[0]))?;
            let r = compile_audit::audit_paths(&[&dir])?;
            let code = gate_and_print(&r, &rules.gate());
            if !status.success() {
                println!("compile-audit: the command failed ({status}); its exit status wins");
                return Ok(ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8));
            }
            Ok(code)
        }
        Cmd::Diff { a, b, format } => {
            let (ra, rb) = (compile_audit::audit_paths(&[&a])?, compile_audit::audit_paths(&[&b])?);
            let d = compile_audit::diff::diff(&ra, &rb);
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&d)?),
                _ => print!("{}", compile_audit::diff::markdown(&d)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Parity { eager, compiled, rtol } => {
            let p = compile_audit::parity::compare(
                &compile_audit::parity::read_losses(&eager)?,
                &compile_audit::parity::read_losses(&compiled)?,
            );
            println!("{} steps compared, max relative difference {:.3e} (rtol {rtol:e})", p.steps.len(), p.max_rel);
            if !p.unmatched.is_empty() {
                println!("steps in only one file: {:?}", p.unmatched);
            }
            let bad = p.violations(rtol);
            for s in &bad {
                println!("parity: FAIL step {}: eager {} compiled {} (rel {:.3e})", s.step, s.eager, s.compiled, s.rel);
            }
            Ok(if bad.is_empty() && !p.steps.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}
