//! `chime-nts-ke`: the NTS-KE server on its own, as a front end that hands
//! out cookies for NTP servers elsewhere (with `--ntp-server`/`--ntp-port`).
//! The cookies must open on those servers: share their key file (read
//! again every minute, written by chimed) or their fleet secret.
//!
//! SIGHUP reloads the certificate; SIGINT/SIGTERM stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use chime_nts_ke::{KeyRing, NtsKeConfig, NtsKeServer, read_secret_file};
use chime_proto::nts::KeyRingConfig;
use clap::Parser;
use tracing::{error, info, warn};

/// chime's NTS-KE server (RFC 8915), standalone.
#[derive(Debug, Parser)]
#[command(name = "chime-nts-ke", version)]
struct Args {
    /// PEM certificate chain.
    #[arg(long, value_name = "FILE")]
    tls_cert: PathBuf,
    /// PEM private key (mode 0600).
    #[arg(long, value_name = "FILE")]
    tls_key: PathBuf,
    /// Address to listen on; repeat for several.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:4460")]
    listen: Vec<SocketAddr>,
    /// chimed's persisted master keys (read again every minute).
    #[arg(long, value_name = "FILE", conflicts_with = "fleet_secret", required_unless_present = "fleet_secret")]
    key_file: Option<PathBuf>,
    /// Fleet shared-secret file (keys derived per epoch).
    #[arg(long, value_name = "FILE")]
    fleet_secret: Option<PathBuf>,
    /// Rotation interval of the fleet, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 86_400)]
    rotation_interval: u64,
    /// Previous fleet keys kept.
    #[arg(long, value_name = "N", default_value_t = 7)]
    keep_keys: usize,
    /// NTP server to send clients to (Server Negotiation record).
    #[arg(long, value_name = "HOST")]
    ntp_server: Option<String>,
    /// NTP port to send clients to (Port Negotiation record).
    #[arg(long, value_name = "PORT")]
    ntp_port: Option<u16>,
}

enum Keys {
    File(PathBuf),
    Fleet(Vec<u8>, KeyRingConfig),
}

impl Keys {
    fn load(&self) -> Result<KeyRing, String> {
        match self {
            Self::File(path) => {
                let bytes = read_secret_file(path).map_err(|e| e.to_string())?;
                KeyRing::decode(&bytes).map_err(|e| format!("{}: {e}", path.display()))
            }
            Self::Fleet(secret, cfg) => KeyRing::for_fleet(secret, unix_now(), *cfg).map_err(|e| e.to_string()),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let keys = match (&args.key_file, &args.fleet_secret) {
        (_, Some(secret)) => Keys::Fleet(
            read_secret_file(secret).map_err(|e| e.to_string())?,
            KeyRingConfig { interval_secs: args.rotation_interval, keep: args.keep_keys },
        ),
        (Some(file), None) => Keys::File(file.clone()),
        (None, None) => return Err("--key-file or --fleet-secret is required".to_owned()),
    };
    let ring = Arc::new(ArcSwap::from_pointee(keys.load()?));
    let cfg = NtsKeConfig {
        listen: args.listen,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        ntp_server: args.ntp_server,
        ntp_port: args.ntp_port,
        ..NtsKeConfig::default()
    };
    let server = NtsKeServer::start(cfg, Arc::clone(&ring)).map_err(|e| e.to_string())?;
    info!(listen = ?server.local_addrs(), "chime-nts-ke serving");

    let term = Arc::new(AtomicBool::new(false));
    let hup = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&term)).map_err(|e| e.to_string())?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hup)).map_err(|e| e.to_string())?;
    let mut next_keys = Instant::now() + Duration::from_secs(60);
    while !term.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if hup.swap(false, Ordering::Relaxed) {
            match server.reload_certificates() {
                Ok(()) => info!("TLS certificate reloaded"),
                Err(e) => warn!("TLS certificate not reloaded, keeping the old one: {e}"),
            }
        }
        if Instant::now() >= next_keys {
            next_keys = Instant::now() + Duration::from_secs(60);
            match keys.load() {
                Ok(r) => ring.store(Arc::new(r)),
                Err(e) => warn!("keeping the current keys: {e}"),
            }
        }
    }
    let _ = server.shutdown();
    Ok(())
}
