//! The command line: `run` (the default), `check` (and `check --urls`), `simulate`, `queue`,
//! `store check` and `store backup`.
//! Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad config.
//!
//! `run` and `check` need every secret of the config; the operator commands load it with
//! [`config::load_for_operator`] and ask only for the secrets they use (the admin token, one
//! account's signing secret), so they work from a shell on a server whose secrets are systemd
//! credentials.

mod http;
mod queue;
mod simulate;
mod store;
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
        /// Trust this CA (PEM) for the https listener, besides the public roots.
        #[arg(long)]
        cacert: Option<PathBuf>,
        /// Accept any certificate of the https listener (a self-signed test certificate).
        #[arg(long, conflicts_with = "cacert")]
        insecure: bool,
    },
    /// Inspect and manage the running daemon's queue (through its admin API).
    Queue {
        #[command(subcommand)]
        command: queue::QueueCommand,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The embedded store: verify it offline (check), or a consistent copy while the relay runs (backup).
    Store {
        #[command(subcommand)]
        command: store::StoreCommand,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// How an operator command authenticates to the admin API.
#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    /// Read the admin token from this file instead of the config's `[admin] token` (e.g. the
    /// root-only file the service's LoadCredential= reads).
    #[arg(long, global = true, env = "WHATSAPP_RELAY_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
}

/// The running relay's admin API, as an operator command reaches it.
pub struct Admin {
    target: http::Target,
    token: String,
}

impl Admin {
    /// From the config's `[admin]` listen address and its token, or `--admin-token-file`: the
    /// only things the admin commands need, so no other secret has to be readable.
    fn new(config: &config::Config, args: &AdminArgs) -> Result<Admin, String> {
        let listen = config.admin.listen.ok_or("the config has no [admin] listen address to reach the relay")?;
        let token = match &args.admin_token_file {
            Some(path) => {
                let t = config::secret::read_file(path).map_err(|e| format!("the admin token: {e}"))?;
                t.trim_end_matches(['\r', '\n']).to_string()
            }
            None => {
                let token =
                    config.admin.token.as_ref().ok_or("the config has no [admin] token; the admin API needs one")?;
                if let Some(why) = config.unresolved.why(token.expose()) {
                    return Err(format!(
                        "cannot read the admin token: {why}\n(give it with --admin-token-file PATH, e.g. the file the \
                         service's LoadCredential= reads, or run this as root on the relay's machine while it runs)"
                    ));
                }
                token.expose().to_string()
            }
        };
        if token.is_empty() {
            return Err("the admin token is empty".into());
        }
        Ok(Admin { target: http::Target::plain(listen), token })
    }

    fn auth(&self) -> [(String, String); 1] {
        [("authorization".to_string(), format!("Bearer {}", self.token))]
    }
}

/// Loads the config for an operator command (secrets it does not use may be unreadable);
/// a bad file is exit 2.
fn operator_config(path: &std::path::Path) -> Result<config::Config, ExitCode> {
    config::load_for_operator(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command.unwrap_or(Command::Run) {
        Command::Check { urls: true } => match operator_config(&cli.config) {
            Ok(c) => {
                print!("{}", urls::render(&c));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Check { urls: false } => match config::load_for_check(&cli.config) {
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
        Command::Simulate { account, text, cacert, insecure } => match operator_config(&cli.config) {
            Ok(c) => simulate::run(&c, &account, &text, &simulate::TlsTrust { cacert, insecure }),
            Err(code) => code,
        },
        Command::Queue { command, admin } => {
            let config = match operator_config(&cli.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match Admin::new(&config, &admin) {
                Ok(admin) => queue::run(&admin, command),
                Err(e) => {
                    eprintln!("whatsapp-relay queue: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Store { command, admin } => match operator_config(&cli.config) {
            Ok(c) => {
                let admin = Admin::new(&c, &admin);
                store::run(&c, admin, command)
            }
            Err(code) => code,
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
