//! The `causeway` command line.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use causeway::{config, daemon, keys, observe};
use clap::{Parser, Subcommand};

/// Causeway: encrypted cluster-to-cluster overlay network.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a new private key (base64, as `wg genkey`).
    Genkey,
    /// Read a private key on stdin and print its public key (as `wg pubkey`).
    Pubkey,
    /// Run the site daemon in the foreground until SIGINT or SIGTERM.
    Up {
        /// The site's TOML config (see docs/config.md).
        #[arg(long, short)]
        config: PathBuf,
        /// Serve /metrics, /healthz and /readyz here (overrides `metrics_listen`, also on every reload).
        #[arg(long, value_name = "ADDR:PORT")]
        metrics_listen: Option<std::net::SocketAddr>,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Run the node agent in the foreground until SIGINT or SIGTERM: keeps
    /// this node's routes to the peers' views towards the site's active
    /// gateway (one per node; see docs/deploy.md).
    Node {
        /// The node agent's TOML config (see docs/config.md).
        #[arg(long, short)]
        config: PathBuf,
        /// Instead of running: remove what a stopped or crashed node agent
        /// left (routes `proto 202`, its VXLAN device, its nftables table).
        #[arg(long)]
        down: bool,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Run a rendezvous server in the foreground: introduces sites to each
    /// other, answers STUN, relays WireGuard ciphertext between them.
    Rendezvous {
        /// The rendezvous' TOML config (see docs/rendezvous.md).
        #[arg(long, short)]
        config: PathBuf,
        /// Serve /metrics, /healthz and /readyz here (see docs/status.md); off when absent.
        #[arg(long, value_name = "ADDR:PORT")]
        metrics_listen: Option<std::net::SocketAddr>,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Remove what a stopped or crashed site left in this network namespace:
    /// its TUN interface and routes. The backstop routes (`blackhole`, `proto
    /// 201`, which keep peer traffic from leaving in clear while no daemon
    /// runs) stay unless --purge is given. Refused while a daemon runs.
    Down {
        /// Also remove every backstop route: peer traffic then follows the
        /// host's other routes (usually the default route) in clear.
        #[arg(long)]
        purge: bool,
        /// Take the interface name from this config's `[site] interface`.
        #[arg(long, short, conflicts_with = "interface")]
        config: Option<PathBuf>,
        /// The interface to remove [default: causeway0].
        #[arg(long, short)]
        interface: Option<String>,
    },
    /// Show the running daemon's peers and counters.
    Status {
        /// Print JSON (stable field names) instead of text.
        #[arg(long)]
        json: bool,
        /// Control socket of the daemon [default: /run/causeway/causeway0.sock]
        #[arg(long, conflicts_with = "interface")]
        socket: Option<PathBuf>,
        /// Interface of the daemon to ask (its socket is /run/causeway/<interface>.sock).
        #[arg(long, short)]
        interface: Option<String>,
    },
    /// Tell the running daemon something (see the subcommands).
    Ctl {
        #[command(subcommand)]
        command: CtlCommand,
        /// Control socket of the daemon [default: /run/causeway/causeway0.sock]
        #[arg(long, conflicts_with = "interface", global = true)]
        socket: Option<PathBuf>,
        /// Interface of the daemon (its socket is /run/causeway/<interface>.sock).
        #[arg(long, short, global = true)]
        interface: Option<String>,
    },
    /// Print a one-line invite token for another site's `causeway join`:
    /// this site's name, public key, pod CIDRs, endpoints and rendezvous.
    Invite {
        /// The site's TOML config (see docs/config.md).
        #[arg(long, short)]
        config: PathBuf,
        /// Where peers can reach this site's WireGuard port, before
        /// `advertise_endpoints`; may be repeated.
        #[arg(long, value_name = "HOST:PORT")]
        endpoint: Vec<String>,
    },
    /// Add the site of an invite token to the config as a peer (with its
    /// rendezvous), then print this site's token to send back.
    Join {
        /// The site's TOML config, changed in place (see docs/config.md).
        #[arg(long, short)]
        config: PathBuf,
        /// Name the new peer this instead of its site name from the token.
        #[arg(long)]
        name: Option<String>,
        /// For the token printed back: where peers can reach this site's
        /// WireGuard port, before `advertise_endpoints`; may be repeated.
        #[arg(long, value_name = "HOST:PORT")]
        endpoint: Vec<String>,
        /// The token printed by `causeway invite` at the other site.
        token: String,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Make this gateway replica the site's active one, or a standby (for
    /// keepalived's notify scripts; needs `[failover] election =
    /// "keepalived"`). Returns once the daemon has taken the request.
    Role {
        /// `active` or `standby`.
        role: causeway::core::Role,
    },
}

/// How the daemon logs (to stderr; journald picks it up under systemd).
#[derive(clap::Args)]
struct LogArgs {
    /// `text` for people, `json` (one object per line) for log pipelines.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Level or filter (`info`, `debug`, `causeway=debug,warn`); overrides RUST_LOG [default: info].
    #[arg(long)]
    log_level: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(args: &LogArgs) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match &args.log_level {
        Some(level) => {
            EnvFilter::try_new(level).with_context(|| format!("--log-level {level:?}"))?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    // Colours only for a person at a terminal: not in files, the journal
    // or a container log, and never when NO_COLOR is set (no-color.org).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Genkey => {
            println!("{}", keys::encode_private(&keys::generate()));
            Ok(ExitCode::SUCCESS)
        }
        Command::Pubkey => pubkey(),
        Command::Up {
            config,
            metrics_listen,
            log,
        } => up(config, metrics_listen, &log),
        Command::Node { config, down, log } => node(config, down, &log),
        Command::Rendezvous {
            config,
            metrics_listen,
            log,
        } => rendezvous(config, metrics_listen, &log),
        Command::Status {
            json,
            socket,
            interface,
        } => status(json, socket, interface),
        Command::Down {
            purge,
            config,
            interface,
        } => down(purge, config, interface),
        Command::Ctl {
            command: CtlCommand::Role { role },
            socket,
            interface,
        } => ctl_role(role, socket, interface),
        Command::Invite { config, endpoint } => invite(config, &endpoint),
        Command::Join {
            config,
            name,
            endpoint,
            token,
        } => join(config, name, &endpoint, &token),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("causeway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn pubkey() -> anyhow::Result<ExitCode> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("reading stdin")?;
    let key = keys::decode_private(&text)?;
    println!(
        "{}",
        keys::encode_public(&x25519_dalek::PublicKey::from(&key))
    );
    Ok(ExitCode::SUCCESS)
}

fn up(
    path: PathBuf,
    metrics_listen: Option<std::net::SocketAddr>,
    log: &LogArgs,
) -> anyhow::Result<ExitCode> {
    init_logging(log)?;
    let source = config::Source {
        path,
        metrics_listen,
    };
    let config = match source.load() {
        Ok(config) => config,
        Err(errors) => {
            eprintln!(
                "causeway: {} has problems, nothing was changed:\n{errors}",
                source.path.display()
            );
            return Ok(ExitCode::from(2));
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(daemon::run(config, Some(source), shutdown_signal()))?;
    Ok(ExitCode::SUCCESS)
}

fn node(path: PathBuf, down: bool, log: &LogArgs) -> anyhow::Result<ExitCode> {
    init_logging(log)?;
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let config = match causeway::node::parse(&text, &path.display().to_string()) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!(
                "causeway: {} has problems, nothing was changed:\n{errors}",
                path.display()
            );
            return Ok(ExitCode::from(2));
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if down {
        runtime.block_on(causeway::node::down(&config.vxlan_interface))?;
        println!("removed the node routes (proto 202), the VXLAN device and the nftables table");
    } else {
        runtime.block_on(causeway::node::run(config, shutdown_signal()))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn rendezvous(
    path: PathBuf,
    metrics_listen: Option<std::net::SocketAddr>,
    log: &LogArgs,
) -> anyhow::Result<ExitCode> {
    use causeway_nat::rendezvous::{RendezvousServer, ServerConfig};
    init_logging(log)?;
    let config = match ServerConfig::load(&path) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("causeway: {} has problems:\n{errors}", path.display());
            return Ok(ExitCode::from(2));
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // `run` logs the key and addresses it serves on.
        let server = RendezvousServer::bind(&config)?;
        // /readyz: 200 from here (sockets bound, serving) until shutdown starts.
        let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _metrics = match metrics_listen {
            Some(addr) => Some(
                causeway::observe::serve_rendezvous(addr, server.stats(), ready.clone()).await?,
            ),
            None => None,
        };
        ready.store(true, std::sync::atomic::Ordering::Release);
        causeway::notify::notify("READY=1");
        let shutdown = async {
            shutdown_signal().await;
            ready.store(false, std::sync::atomic::Ordering::Release);
        };
        server.run(shutdown).await?;
        causeway::notify::notify("STOPPING=1");
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn down(purge: bool, path: Option<PathBuf>, interface: Option<String>) -> anyhow::Result<ExitCode> {
    let interface = match (path, interface) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            match config::parse(&text, &path.display().to_string()) {
                Ok(config) => config.site.interface,
                Err(errors) => {
                    eprintln!("causeway: {} has problems:\n{errors}", path.display());
                    return Ok(ExitCode::from(2));
                }
            }
        }
        (None, Some(interface)) => interface,
        (None, None) => config::DEFAULT_INTERFACE.to_owned(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let down = runtime.block_on(daemon::down(&interface, purge))?;
    match &down.interface {
        Some(name) => println!(
            "removed interface {name} and {} route(s) through it",
            down.routes.len()
        ),
        None => println!("no interface {interface}"),
    }
    if purge {
        println!("removed {} backstop route(s)", down.backstops.len());
    } else {
        println!("backstop routes kept (peer traffic is dropped); --purge removes them");
    }
    Ok(ExitCode::SUCCESS)
}

fn status(
    json: bool,
    socket: Option<PathBuf>,
    interface: Option<String>,
) -> anyhow::Result<ExitCode> {
    let path = control_socket(socket, interface);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = runtime.block_on(observe::query(&path))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.render());
    }
    Ok(ExitCode::SUCCESS)
}

/// `--socket`, else the socket of `--interface`, else of causeway0.
fn control_socket(socket: Option<PathBuf>, interface: Option<String>) -> PathBuf {
    socket.unwrap_or_else(|| {
        config::default_control_socket(interface.as_deref().unwrap_or(config::DEFAULT_INTERFACE))
    })
}

fn ctl_role(
    role: causeway::core::Role,
    socket: Option<PathBuf>,
    interface: Option<String>,
) -> anyhow::Result<ExitCode> {
    let path = control_socket(socket, interface);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!("{}", runtime.block_on(observe::request_role(&path, role))?);
    Ok(ExitCode::SUCCESS)
}

fn invite(path: PathBuf, endpoints: &[String]) -> anyhow::Result<ExitCode> {
    use causeway::invite::InviteError;
    match causeway::invite::invite(&path, endpoints) {
        Ok(invite) => {
            if invite.endpoints.is_empty() && invite.rendezvous.is_empty() {
                eprintln!(
                    "causeway: note: this token has no endpoint and no rendezvous, so the peer cannot reach this site first: give --endpoint or add a [[rendezvous]]"
                );
            }
            println!("{}", invite.encode());
            Ok(ExitCode::SUCCESS)
        }
        Err(InviteError::Config(errors)) => {
            eprintln!("causeway: {} has problems:\n{errors}", path.display());
            Ok(ExitCode::from(2))
        }
        Err(e) => Err(e.into()),
    }
}

fn join(
    path: PathBuf,
    name: Option<String>,
    endpoints: &[String],
    token: &str,
) -> anyhow::Result<ExitCode> {
    use causeway::invite::JoinError;
    match causeway::invite::join(&path, token, name.as_deref(), endpoints) {
        Ok(joined) => {
            print!("{}", joined.report());
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ (JoinError::Config(_) | JoinError::Invalid { .. })) => {
            eprintln!("causeway: {e}");
            Ok(ExitCode::from(2))
        }
        Err(e) => Err(e.into()),
    }
}
