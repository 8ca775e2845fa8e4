//! whoclosed: who ended each TCP connection, with evidence.
//!
//! Kernel facts ([`event`]) feed a per-socket state machine ([`conn`]) whose finished
//! timelines go through a pure classifier ([`classify`]) and out through [`export`].
pub mod agent;
pub mod api;
mod bpfsys;
pub mod classify;
pub mod cli;
pub mod client;
pub mod conn;
pub mod event;
pub mod existing;
pub mod export;
pub mod h2;
pub mod history;
pub mod k8s;
pub mod kernel;
pub mod metrics;
pub mod privilege;
pub mod probes;
pub mod query;
pub mod record;
pub mod skipped;
pub mod timeline;
pub mod trace;
