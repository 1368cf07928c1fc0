//! wa-router: a self-hosted, webhook-first WhatsApp conversation router.
//! See README.md and the contract in SPEC.md.

pub mod api;
pub mod app;
pub mod archive;
pub mod body;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod console;
pub mod crypto;
pub mod domain;
pub mod error;
pub mod events;
pub mod ids;
pub mod inbound;
pub mod journal;
pub mod memory;
pub mod message;
pub mod ops;
pub mod outbound;
pub mod persist;
pub mod routing;
pub mod rules;
pub mod state;
pub mod telemetry;
pub mod webhook;
