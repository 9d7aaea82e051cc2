//! The command line: `run` (the default), `check`, `simulate` and `queue`. Exit codes: 0 ok, 1 runtime failure,
//! 2 bad usage or bad config.

mod http;
mod queue;
mod simulate;
mod urls;

use crate::config;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "whatsapp-relay",
    version = crate::VERSION,
    about = "Verifying, durable relay between WhatsApp providers and Motion servers"
)]
pub struct Cli {
    /// The config file.
    #[arg(long, global = true, env = "WHATSAPP_RELAY_CONFIG", default_value = "/etc/whatsapp-relay/config.toml")]
    pub config: PathBuf,
    /// Log format on stderr (the level follows RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon in the foreground (the default).
    Run,
    /// Validate the config file and print a summary.
    Check {
        /// Print, for every account, the webhook URL to give its provider and the outbound base
        /// URL its Motion uses, instead of the summary.
        #[arg(long)]
        urls: bool,
    },
    /// Send a correctly signed sample inbound message for MOTION/ACCOUNT to the running relay.
    Simulate {
        /// The account, as motion/account.
        account: String,
        /// The message text.
        #[arg(long, default_value = "Hello from whatsapp-relay simulate")]
        text: String,
    },
    /// Inspect and manage the running daemon's queue (through its admin API).
    Queue {
        #[command(subcommand)]
        command: queue::QueueCommand,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command.unwrap_or(Command::Run) {
        Command::Check { urls: true } => match config::load(&cli.config) {
            Ok(c) => {
                print!("{}", urls::render(&c));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Check { urls: false } => match config::load(&cli.config) {
            Ok(mut c) => {
                if let Some(problem) = c.storage_problem() {
                    c.warnings.push(format!("{}: {problem}", c.path.display()));
                }
                print!("{}", c.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Simulate { account, text } => match config::load(&cli.config) {
            Ok(c) => simulate::run(&c, &account, &text),
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Queue { command } => match config::load(&cli.config) {
            Ok(c) => queue::run(&c, command),
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Run => {
            let config = match config::load(&cli.config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            for w in &config.warnings {
                tracing::warn!("{w}");
            }
            // Before the runtime starts threads: taking them unsets LISTEN_PID and LISTEN_FDS.
            let passed = match crate::server::Passed::from_env() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("whatsapp-relay: {e}");
                    return ExitCode::from(1);
                }
            };
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(crate::server::run(config, passed)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("whatsapp-relay: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
