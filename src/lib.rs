//! whatsapp-relay: verifies WhatsApp providers' webhooks, delivers them to the Motion server
//! that owns the account, and relays Motion's sends back out.
//!
//! The path of one webhook, file by file: `server` accepts, `relay` dispatches, `routing` finds
//! the account, `inbound` checks size and runs `provider` verification, `deliver` hands it to
//! the Motion through the pooled client of `upstream`. A send from a Motion goes the other way
//! through `outbound`, checked against the 24-hour customer service `window`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod clock;
pub mod config;
pub mod deliver;
pub mod http_util;
pub mod inbound;
pub mod meta_app;
pub mod metrics;
pub mod outbound;
pub mod provider;
pub mod queue;
pub mod relay;
pub mod routing;
pub mod server;
pub mod store;
pub mod tls;
pub mod upstream;
pub mod window;
