//! Logging set-up through `tracing`.

use tracing_subscriber::EnvFilter;

/// Installs a `tracing` subscriber that writes to stderr.
///
/// The filter comes from `RUST_LOG` and defaults to `info`. Set
/// `LOG_FORMAT=json` for one JSON object per line, which log collectors parse.
pub fn init_tracing(service: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|format| format == "json");

    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if json { builder.json().try_init() } else { builder.try_init() };
    if result.is_ok() {
        tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "logging initialised");
    }
}
