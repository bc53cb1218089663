//! Paths and helpers shared by the integration tests.

use std::path::PathBuf;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Tiny random BERTs written by transformers (`scripts/hf_compat.py fixtures`).
pub fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

#[derive(serde::Deserialize)]
pub struct Expected {
    pub max_len: usize,
    pub labels: Vec<String>,
    pub inputs: Vec<String>,
    pub input_ids: Vec<Vec<u32>>,
    pub logits: Vec<Vec<f32>>,
}

pub fn expected() -> Expected {
    let text =
        std::fs::read_to_string(fixture("tiny-bert-expected.json")).expect("fixture present");
    serde_json::from_str(&text).expect("fixture parses")
}
