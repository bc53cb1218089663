//! Labelled examples in JSON Lines: one `{"text": "...", "label": "..."}` per
//! line. Other fields (such as `lang`) are ignored. A bad line is reported
//! with its line number and nothing is half-read.

use std::io::BufRead;
use std::path::Path;

use serde::Deserialize;

use super::Error;

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub text: String,
    /// Index into the label list the file was read against.
    pub label: usize,
}

#[derive(Deserialize)]
struct Line {
    text: String,
    label: String,
}

/// Reads every example of `path`, mapping labels onto `labels`.
pub fn read_jsonl(path: &Path, labels: &[&str]) -> Result<Vec<Example>, Error> {
    let file = std::fs::File::open(path).map_err(|e| Error::load(path, e))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let bad = |reason: String| Error::Data {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        let line = line.map_err(|e| bad(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line = serde_json::from_str(&line).map_err(|e| {
            bad(format!(
                "{e}; expected {{\"text\": \"...\", \"label\": \"...\"}}"
            ))
        })?;
        if parsed.text.trim().is_empty() {
            return Err(bad("text is empty".into()));
        }
        let label = labels
            .iter()
            .position(|l| *l == parsed.label)
            .ok_or_else(|| {
                bad(format!(
                    "label {:?} is not one of {}",
                    parsed.label,
                    labels.join(", ")
                ))
            })?;
        out.push(Example {
            text: parsed.text,
            label,
        });
    }
    if out.is_empty() {
        return Err(Error::load(path, "no examples in the file"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_line_is_reported_with_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(
            &path,
            "{\"text\": \"好评\", \"label\": \"positive\"}\n\n{\"text\": \"x\", \"label\": \"angry\"}\n",
        )
        .unwrap();
        let err = read_jsonl(&path, &["negative", "neutral", "positive"]).unwrap_err();
        assert!(err.to_string().contains("d.jsonl:3:"), "{err}");
        assert!(err.to_string().contains("angry"), "{err}");
    }

    #[test]
    fn reads_labels_as_indices() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(
            &path,
            "{\"text\": \"在吗\", \"label\": \"neutral\", \"lang\": \"zh\"}\n",
        )
        .unwrap();
        let ex = read_jsonl(&path, &["negative", "neutral", "positive"]).unwrap();
        assert_eq!(
            ex,
            vec![Example {
                text: "在吗".into(),
                label: 1
            }]
        );
    }
}
