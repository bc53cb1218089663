//! The BERT tokenizer, loaded the way transformers loads it: `tokenizer.json`
//! when the checkpoint has one, otherwise `vocab.txt` + `tokenizer_config.json`
//! (BertTokenizer: text cleaning, every CJK character its own token, lower-casing
//! and accent stripping as configured, then WordPiece).

use std::path::Path;

use serde::Deserialize;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use super::Error;

/// The `tokenizer_config.json` fields BertTokenizer reads.
#[derive(Debug, Clone, Deserialize)]
pub struct BertTokenizerConfig {
    #[serde(default = "yes")]
    pub do_lower_case: bool,
    #[serde(default = "yes")]
    pub tokenize_chinese_chars: bool,
    #[serde(default)]
    pub strip_accents: Option<bool>,
    #[serde(default = "unk")]
    pub unk_token: String,
    #[serde(default = "sep")]
    pub sep_token: String,
    #[serde(default = "cls")]
    pub cls_token: String,
    #[serde(default = "pad")]
    pub pad_token: String,
}

fn yes() -> bool {
    true
}
fn unk() -> String {
    "[UNK]".into()
}
fn sep() -> String {
    "[SEP]".into()
}
fn cls() -> String {
    "[CLS]".into()
}
fn pad() -> String {
    "[PAD]".into()
}

impl Default for BertTokenizerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

/// A tokenizer ready for classification: truncates to `max_len` tokens
/// (including `[CLS]` and `[SEP]`) and pads each batch to its longest row.
pub fn load(dir: &Path, max_len: usize) -> Result<Tokenizer, Error> {
    let json = dir.join("tokenizer.json");
    let mut tokenizer = if json.exists() {
        Tokenizer::from_file(&json).map_err(|e| Error::load(&json, e))?
    } else {
        let vocab = dir.join("vocab.txt");
        if !vocab.exists() {
            return Err(Error::load(
                dir,
                "no tokenizer.json or vocab.txt: save the tokenizer with the model",
            ));
        }
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            let text =
                std::fs::read_to_string(&config_path).map_err(|e| Error::load(&config_path, e))?;
            serde_json::from_str(&text).map_err(|e| Error::load(&config_path, e))?
        } else {
            BertTokenizerConfig::default()
        };
        from_vocab(&vocab, &config)?
    };
    configure(&mut tokenizer, max_len)?;
    Ok(tokenizer)
}

/// BertTokenizer from a WordPiece `vocab.txt`, as transformers builds it.
pub fn from_vocab(vocab: &Path, config: &BertTokenizerConfig) -> Result<Tokenizer, Error> {
    let path = vocab
        .to_str()
        .ok_or_else(|| Error::load(vocab, "path is not UTF-8"))?;
    let model = WordPiece::from_file(path)
        .unk_token(config.unk_token.clone())
        .build()
        .map_err(|e| Error::load(vocab, e))?;
    let mut tokenizer = Tokenizer::new(model);
    let id = |token: &str| {
        tokenizer.token_to_id(token).ok_or_else(|| {
            Error::load(
                vocab,
                format!("special token {token} is not in the vocabulary"),
            )
        })
    };
    let sep_id = id(&config.sep_token)?;
    let cls_id = id(&config.cls_token)?;
    id(&config.pad_token)?;
    tokenizer
        .with_normalizer(Some(BertNormalizer::new(
            true,
            config.tokenize_chinese_chars,
            config.strip_accents,
            config.do_lower_case,
        )))
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_post_processor(Some(BertProcessing::new(
            (config.sep_token.clone(), sep_id),
            (config.cls_token.clone(), cls_id),
        )))
        .with_decoder(Some(WordPieceDecoder::default()));
    let mut padding = PaddingParams {
        pad_token: config.pad_token.clone(),
        ..PaddingParams::default()
    };
    padding.pad_id = tokenizer.token_to_id(&config.pad_token).unwrap_or(0);
    tokenizer.with_padding(Some(padding));
    Ok(tokenizer)
}

fn configure(tokenizer: &mut Tokenizer, max_len: usize) -> Result<(), Error> {
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        }))
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let (pad_id, pad_token) = match tokenizer.get_padding() {
        Some(p) => (p.pad_id, p.pad_token.clone()),
        None => {
            let token = "[PAD]".to_string();
            (tokenizer.token_to_id(&token).unwrap_or(0), token)
        }
    };
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        direction: PaddingDirection::Right,
        pad_to_multiple_of: None,
        pad_id,
        pad_type_id: 0,
        pad_token,
    }));
    Ok(())
}

/// Token ids of one text, `[CLS]` and `[SEP]` included, truncated to the
/// tokenizer's maximum length and not padded.
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, Error> {
    let enc = tokenizer
        .encode_fast(text, true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(enc.get_ids().to_vec())
}

/// How many windows a long text is read in by default: a message of the
/// service's largest size (4,000 bytes) costs at most this many rows.
pub const DEFAULT_WINDOWS: usize = 8;

/// Token rows for one text. A text that fits the tokenizer's maximum length
/// is one row, exactly as [`encode`] gives it. A longer one is read in
/// windows of that length, as few as cover all of it and at most
/// `max_windows`, evenly spread from its first token to its last (they
/// overlap where they must), each framed by the special tokens a single text
/// gets. Classifiers average the windows' probabilities, so the verdict at
/// the end of a long review or complaint counts as much as its opening,
/// which truncation would keep alone. `max_windows` of 1 is plain truncation.
pub fn encode_windows(
    tokenizer: &Tokenizer,
    text: &str,
    max_windows: usize,
) -> Result<Vec<Vec<u32>>, Error> {
    let enc = tokenizer
        .encode_fast(text, true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let first = enc.get_ids();
    if enc.get_overflowing().is_empty() || max_windows <= 1 {
        return Ok(vec![first.to_vec()]);
    }
    // The truncated text comes back as consecutive pieces (stride 0), each
    // framed like `first`: its special tokens lead and trail it.
    let frame = |mask: &[u32]| {
        let lead = mask.iter().take_while(|&&m| m == 1).count();
        let trail = mask.iter().rev().take_while(|&&m| m == 1).count();
        (lead, trail.min(mask.len() - lead))
    };
    let (lead, trail) = frame(enc.get_special_tokens_mask());
    let width = first.len() - lead - trail;
    if width == 0 {
        return Ok(vec![first.to_vec()]);
    }
    let mut content = first[lead..first.len() - trail].to_vec();
    for piece in enc.get_overflowing() {
        let (l, t) = frame(piece.get_special_tokens_mask());
        let ids = piece.get_ids();
        content.extend_from_slice(&ids[l..ids.len() - t]);
    }
    Ok(window_starts(content.len(), width, max_windows)
        .into_iter()
        .map(|start| {
            let mut row = Vec::with_capacity(first.len());
            row.extend_from_slice(&first[..lead]);
            row.extend_from_slice(&content[start..start + width]);
            row.extend_from_slice(&first[first.len() - trail..]);
            row
        })
        .collect())
}

/// Where each window of `width` tokens starts in a text of `len` tokens: as
/// few windows as cover it, at most `max`, evenly spaced, the first at 0
/// and the last ending at `len`.
pub fn window_starts(len: usize, width: usize, max: usize) -> Vec<usize> {
    if len <= width || width == 0 || max <= 1 {
        return vec![0];
    }
    let k = len.div_ceil(width).min(max);
    let span = len - width;
    (0..k).map(|i| (i * span + (k - 1) / 2) / (k - 1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_a_long_text_evenly() {
        assert_eq!(window_starts(10, 10, 8), vec![0]);
        assert_eq!(window_starts(11, 10, 8), vec![0, 1]);
        assert_eq!(window_starts(20, 10, 8), vec![0, 10]);
        // 25 tokens need three windows of 10: 0..10, 8..18 (7.5 rounded
        // up), 15..25.
        assert_eq!(window_starts(25, 10, 8), vec![0, 8, 15]);
        // Capped: the windows spread out and leave gaps between them.
        assert_eq!(window_starts(100, 10, 3), vec![0, 45, 90]);
        assert_eq!(window_starts(100, 10, 1), vec![0]);
        for (len, width, max) in [(97, 94, 8), (500, 94, 8), (1333, 94, 8), (190, 62, 4)] {
            let starts = window_starts(len, width, max);
            assert_eq!(starts[0], 0);
            assert_eq!(starts.last().unwrap() + width, len);
            assert!(starts.windows(2).all(|w| w[0] < w[1]));
            assert!(starts.len() <= max);
            if starts.len() < max {
                // Uncapped: no token is left out.
                assert!(starts.windows(2).all(|w| w[1] <= w[0] + width));
            }
        }
    }
}
