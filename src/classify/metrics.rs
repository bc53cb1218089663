//! Accuracy, macro-F1, per-label precision and recall, and the confusion
//! matrix: what `kefu eval` prints and what training selects checkpoints by.

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LabelMetrics {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Gold examples of this label.
    pub support: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metrics {
    pub n: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_label: Vec<LabelMetrics>,
    /// `confusion[gold][predicted]`, in label order.
    pub confusion: Vec<Vec<usize>>,
    pub labels: Vec<String>,
}

impl Metrics {
    /// `gold` and `predicted` are label indices into `labels`. Labels with no
    /// gold examples and no predictions are left out of macro-F1, as
    /// scikit-learn does for labels absent from both.
    pub fn compute(labels: &[String], gold: &[usize], predicted: &[usize]) -> Self {
        assert_eq!(gold.len(), predicted.len(), "one prediction per example");
        let k = labels.len();
        let mut confusion = vec![vec![0usize; k]; k];
        for (&g, &p) in gold.iter().zip(predicted) {
            confusion[g][p] += 1;
        }
        let n = gold.len();
        let correct: usize = (0..k).map(|i| confusion[i][i]).sum();
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let mut per_label = Vec::with_capacity(k);
        let mut f1_sum = 0.0;
        let mut present = 0;
        for (i, label) in labels.iter().enumerate() {
            let tp = confusion[i][i];
            let support: usize = confusion[i].iter().sum();
            let predicted_i: usize = (0..k).map(|g| confusion[g][i]).sum();
            let precision = ratio(tp, predicted_i);
            let recall = ratio(tp, support);
            let f1 = if precision + recall == 0.0 {
                0.0
            } else {
                2.0 * precision * recall / (precision + recall)
            };
            if support > 0 || predicted_i > 0 {
                f1_sum += f1;
                present += 1;
            }
            per_label.push(LabelMetrics {
                label: label.clone(),
                precision,
                recall,
                f1,
                support,
            });
        }
        Metrics {
            n,
            accuracy: ratio(correct, n),
            macro_f1: if present == 0 {
                0.0
            } else {
                f1_sum / present as f64
            },
            per_label,
            confusion,
            labels: labels.to_vec(),
        }
    }

    /// A table for people: summary, per-label figures, confusion matrix.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "n = {}   accuracy = {:.4}   macro-F1 = {:.4}\n",
            self.n, self.accuracy, self.macro_f1
        );
        let width = self
            .labels
            .iter()
            .map(|l| l.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let _ = writeln!(s, "{:width$}  precision  recall     f1  support", "label");
        for m in &self.per_label {
            let _ = writeln!(
                s,
                "{:width$}  {:9.4}  {:6.4} {:6.4}  {:7}",
                m.label, m.precision, m.recall, m.f1, m.support
            );
        }
        let _ = writeln!(
            s,
            "\nconfusion (rows: gold, columns: predicted, in label order above)"
        );
        for (label, row) in self.labels.iter().zip(&self.confusion) {
            let cells: Vec<String> = row.iter().map(|c| format!("{c:5}")).collect();
            let _ = writeln!(s, "{label:width$} {}", cells.join(""));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_example() {
        // gold:      a a a b b c
        // predicted: a a b b c c
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let m = Metrics::compute(&labels, &[0, 0, 0, 1, 1, 2], &[0, 0, 1, 1, 2, 2]);
        assert_eq!(m.n, 6);
        assert!((m.accuracy - 4.0 / 6.0).abs() < 1e-12);
        // a: P=2/2 R=2/3 F1=0.8; b: P=1/2 R=1/2 F1=0.5; c: P=1/2 R=1 F1=2/3.
        let f1s: Vec<f64> = m.per_label.iter().map(|l| l.f1).collect();
        assert!((f1s[0] - 0.8).abs() < 1e-12);
        assert!((f1s[1] - 0.5).abs() < 1e-12);
        assert!((f1s[2] - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.macro_f1 - (0.8 + 0.5 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        assert_eq!(
            m.confusion,
            vec![vec![2, 1, 0], vec![0, 1, 1], vec![0, 0, 1]]
        );
        assert_eq!(m.per_label[0].support, 3);
    }

    #[test]
    fn absent_labels_do_not_drag_macro_f1() {
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let m = Metrics::compute(&labels, &[0, 1], &[0, 1]);
        assert_eq!(m.macro_f1, 1.0);
    }
}
