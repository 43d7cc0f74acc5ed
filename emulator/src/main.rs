//! `azgate-imds-emulator [--listen 127.0.0.1:0]`: the emulator on a loopback port, for the
//! real-client tests and demos. Prints `listening on ADDR` once it serves (scripts read the
//! port from it) and stops on SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;

use azgate_emulator::Emulator;
use tracing_subscriber::EnvFilter;

const USAGE: &str = "usage: azgate-imds-emulator [--listen ADDR] (default 127.0.0.1:0)";

fn listen_address(mut args: impl Iterator<Item = String>) -> Result<SocketAddr, String> {
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 0));
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "--listen" => args.next().ok_or(USAGE)?,
            other => match other.strip_prefix("--listen=") {
                Some(value) => value.to_owned(),
                None => return Err(USAGE.to_owned()),
            },
        };
        listen = value
            .parse()
            .map_err(|error| format!("--listen {value:?}: {error}"))?;
    }
    Ok(listen)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("AZGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let listen = match listen_address(std::env::args().skip(1)) {
        Ok(listen) => listen,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    let emulator = match Emulator::start(listen).await {
        Ok(emulator) => emulator,
        Err(error) => {
            tracing::error!(%error, "cannot start the IMDS emulator");
            return ExitCode::FAILURE;
        }
    };
    println!("listening on {}", emulator.local_addr());
    tracing::info!(addr = %emulator.local_addr(), "IMDS emulator serving");
    azgate_msi::server::shutdown_signal().await;
    emulator.shutdown();
    ExitCode::SUCCESS
}
