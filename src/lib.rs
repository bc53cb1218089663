//! kefu (客服): an AI customer-service agent for e-commerce.
//!
//! A gRPC service that classifies every customer message (sentiment and
//! intent, with BERT run by candle), routes it, answers it and remembers it.
//! Everything lives in this library; `src/main.rs` only parses the command
//! line and calls in, so tests run the real server in-process.
//!
//! Dependencies point inward: [`service`] (tonic) calls [`classify`] (candle)
//! and [`generate`] (mistral.rs); only `service` touches tonic and prost
//! types, only `classify` touches candle, only `generate` touches mistral.rs.

pub mod bench;
pub mod classify;
pub mod cli;
pub mod config;
pub mod device;
pub mod error;
pub mod generate;
pub mod pipeline;
pub mod redact;
pub mod route;
pub mod segment;
pub mod service;
pub mod store;
pub mod telemetry;

pub use error::Error;
