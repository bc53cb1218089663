//! Labelled examples in JSON Lines: one `{"text": "...", "label": "..."}` per
//! line, optionally with a teacher's `"probabilities"` for soft targets
//! (`{"negative": 0.1, ...}`, or the list `kefu classify` prints). Other
//! fields (such as `lang`) are ignored. A bad line is reported with its line
//! number and nothing is half-read.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;

use serde::Deserialize;

use super::Error;

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub text: String,
    /// Index into the label list the file was read against.
    pub label: usize,
    /// A teacher's probability of each label, in the same order, when the
    /// line has them.
    pub soft: Option<Vec<f32>>,
}

#[derive(Deserialize)]
struct Line {
    text: String,
    label: String,
    #[serde(default)]
    probabilities: Option<Probabilities>,
}

/// A label's probability, as `kefu classify` prints it.
#[derive(Deserialize)]
struct LabelProbability {
    label: String,
    probability: f32,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Probabilities {
    Map(HashMap<String, f32>),
    List(Vec<LabelProbability>),
}

impl Probabilities {
    /// The distribution over `labels`; labels it leaves out get 0.
    fn over(self, labels: &[&str]) -> Result<Vec<f32>, String> {
        let pairs: Vec<(String, f32)> = match self {
            Self::Map(map) => map.into_iter().collect(),
            Self::List(list) => list.into_iter().map(|p| (p.label, p.probability)).collect(),
        };
        let mut out = vec![0f32; labels.len()];
        for (label, p) in pairs {
            let i = labels.iter().position(|l| *l == label).ok_or_else(|| {
                format!(
                    "probabilities: label {label:?} is not one of {}",
                    labels.join(", ")
                )
            })?;
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("probabilities: {label:?} is {p}, not in 0..1"));
            }
            out[i] = p;
        }
        let sum: f32 = out.iter().sum();
        if (sum - 1.0).abs() > 0.01 {
            return Err(format!("probabilities add up to {sum}, not 1"));
        }
        Ok(out.into_iter().map(|p| p / sum).collect())
    }
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
        let soft = parsed
            .probabilities
            .map(|p| p.over(labels))
            .transpose()
            .map_err(bad)?;
        out.push(Example {
            text: parsed.text,
            label,
            soft,
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

    /// `content` read as a sentiment file named `d.jsonl`.
    fn read_str(content: &str) -> Result<Vec<Example>, Error> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, content).unwrap();
        read_jsonl(&path, &["negative", "neutral", "positive"])
    }

    #[test]
    fn bad_line_is_reported_with_its_number() {
        let err = read_str(
            "{\"text\": \"好评\", \"label\": \"positive\"}\n\n{\"text\": \"x\", \"label\": \"angry\"}\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("d.jsonl:3:"), "{err}");
        assert!(err.to_string().contains("angry"), "{err}");
    }

    #[test]
    fn reads_labels_as_indices() {
        let ex =
            read_str("{\"text\": \"在吗\", \"label\": \"neutral\", \"lang\": \"zh\"}\n").unwrap();
        assert_eq!(
            ex,
            vec![Example {
                text: "在吗".into(),
                label: 1,
                soft: None,
            }]
        );
    }

    #[test]
    fn reads_a_teachers_probabilities_as_a_map_or_as_classify_prints_them() {
        let ex = read_str(concat!(
                "{\"text\": \"还行吧\", \"label\": \"positive\", \"probabilities\": {\"positive\": 0.6, \"neutral\": 0.4}}\n",
                "{\"text\": \"差评\", \"label\": \"negative\", \"probabilities\": [{\"label\": \"negative\", \"probability\": 0.9}, {\"label\": \"positive\", \"probability\": 0.1}]}\n",
        ))
        .unwrap();
        assert_eq!(ex[0].soft, Some(vec![0.0, 0.4, 0.6]));
        assert_eq!(ex[1].soft, Some(vec![0.9, 0.0, 0.1]));
    }

    #[test]
    fn probabilities_that_are_not_a_distribution_are_refused() {
        for (bad, why) in [
            ("{\"positive\": 0.6}", "add up to"),
            ("{\"angry\": 1.0}", "angry"),
            ("{\"positive\": 1.5, \"negative\": -0.5}", "not in 0..1"),
        ] {
            let err = read_str(&format!(
                "{{\"text\": \"好\", \"label\": \"positive\", \"probabilities\": {bad}}}\n"
            ))
            .unwrap_err();
            assert!(err.to_string().contains("d.jsonl:1:"), "{err}");
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
    }
}
