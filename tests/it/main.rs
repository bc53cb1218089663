//! kefu's integration tests, in one binary so the dependency tree links once.
//! They run the real thing: candle on real checkpoints, the real gRPC server
//! on 127.0.0.1:0.

mod agents;
mod attention;
mod chat;
mod classifier;
mod common;
mod generator;
mod harness;
mod marketing;
mod quantized_kernels;
mod server;
mod training;
