//! whatsapp-relay: verifies WhatsApp providers' webhooks, delivers them to the Motion server
//! that owns the account, and relays Motion's sends back out.
//!
//! The path of one webhook, file by file: `server` accepts, `relay` dispatches, `routing` finds
//! the account, `inbound` checks size and runs the `provider`'s verification, `event` builds
//! what is stored, `queue` stores it (through `store`) and its scheduler hands it to the Motion
//! with `deliver`, through the pooled client of `upstream`. A send from a Motion goes the other
//! way through `outbound`, checked against the 24-hour customer service `window`.
//!
//! Layers, each using only those below it: `cli` > `server` > `admin` > `control` > `tls` >
//! `relay` > `inbound`, `meta_app`, `outbound` > `services` > `queue`, `window` > `event` >
//! `deliver`, `routing` > `store` > `config` > `provider` > the leaves (`request`, `secret`,
//! `http_util`, `upstream`, `metrics`, `clock`, `memory`).
#![forbid(unsafe_code)]

/// The release and the commit it was built from (see `build.rs`): `--version` and the start-up
/// log line, so an operator can tell which build is running.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("WHATSAPP_RELAY_COMMIT"), ")");

pub mod admin;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod deliver;
pub mod event;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod http_util;
pub mod inbound;
pub mod memory;
pub mod meta_app;
pub mod metrics;
pub mod outbound;
pub mod provider;
pub mod queue;
pub mod relay;
pub mod request;
pub mod routing;
pub mod secret;
pub mod server;
pub mod services;
pub mod store;
pub mod tls;
pub mod upstream;
pub mod window;
