//! One inference thread per model, fed by a bounded queue. Requests that
//! arrive together are batched by count and by padded tokens, as
//! text-embeddings-inference's queue does; a request whose caller has gone
//! away is dropped before it costs any compute.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use tokenizers::Tokenizer;
use tokio::sync::{mpsc, oneshot};

use super::bert::{batch_tensors, BertForSequenceClassification};
use super::checkpoint::Checkpoint;
use super::{Error, LabelMap, LabelScore};

/// How much one model batch may hold, and how many requests may wait.
#[derive(Debug, Clone)]
pub struct BatchLimits {
    /// Most messages in one forward pass.
    pub max_batch: usize,
    /// Most padded tokens (rows × longest row) in one forward pass.
    pub max_batch_tokens: usize,
    /// Most rows waiting (a message read in windows takes one per window);
    /// past it callers get `Error::Overloaded`.
    pub queue: usize,
    /// Most windows one long text is read in, their probabilities averaged
    /// (1: only its first tokens, truncated); see
    /// [`super::tokenizer::encode_windows`].
    pub windows: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_batch_tokens: 4096,
            queue: 1024,
            windows: super::tokenizer::DEFAULT_WINDOWS,
        }
    }
}

struct Job {
    ids: Vec<u32>,
    reply: oneshot::Sender<Result<Vec<f32>, Error>>,
}

/// A handle to a model's inference thread. Cheap to clone.
#[derive(Clone)]
pub struct ModelWorker {
    tx: mpsc::Sender<Job>,
    tokenizer: Arc<Tokenizer>,
    labels: LabelMap,
    queue: usize,
    windows: usize,
    device: &'static str,
}

impl ModelWorker {
    /// Starts the model's thread; `device` is where the checkpoint was
    /// loaded.
    pub fn spawn(
        checkpoint: Checkpoint,
        device: Device,
        labels: LabelMap,
        limits: BatchLimits,
    ) -> Self {
        let (tx, rx) = mpsc::channel(limits.queue.max(1));
        let tokenizer = Arc::new(checkpoint.tokenizer.clone());
        let pad_id = pad_id(&checkpoint.tokenizer);
        let queue = limits.queue;
        let windows = limits.windows.max(1);
        let label = super::device_label(&device);
        let name = format!(
            "kefu-classify-{}",
            checkpoint
                .dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("model")
        );
        std::thread::Builder::new()
            .name(name)
            .spawn(move || run(checkpoint.model, device, rx, limits, pad_id))
            .expect("spawning a thread only fails when the OS is out of resources");
        Self {
            tx,
            tokenizer,
            labels,
            queue,
            windows,
            device: label,
        }
    }

    /// Where the model runs: `cuda:0` or `cpu`.
    pub fn device(&self) -> &'static str {
        self.device
    }

    /// Probabilities for each text, in order; tokenization happens on the
    /// caller's task so the model thread only runs the model. A long text
    /// goes in as several windows, whose probabilities are averaged.
    pub async fn classify_all(&self, texts: &[String]) -> Result<Vec<Vec<LabelScore>>, Error> {
        let mut pending = Vec::with_capacity(texts.len());
        for text in texts {
            let rows = super::tokenizer::encode_windows(&self.tokenizer, text, self.windows)?;
            let mut replies = Vec::with_capacity(rows.len());
            for ids in rows {
                let (reply, rx) = oneshot::channel();
                self.tx.try_send(Job { ids, reply }).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => Error::Overloaded(self.queue),
                    mpsc::error::TrySendError::Closed(_) => Error::Unavailable,
                })?;
                replies.push(rx);
            }
            pending.push(replies);
        }
        let mut out = Vec::with_capacity(pending.len());
        for replies in pending {
            let mut windows = Vec::with_capacity(replies.len());
            for rx in replies {
                windows.push(rx.await.map_err(|_| Error::Unavailable)??);
            }
            out.push(self.labels.scores(&mean(&windows)));
        }
        Ok(out)
    }
}

/// The element-wise mean of a text's window probabilities.
pub fn mean(windows: &[Vec<f32>]) -> Vec<f32> {
    let Some((first, rest)) = windows.split_first() else {
        return Vec::new();
    };
    let mut sum = first.clone();
    for w in rest {
        for (s, p) in sum.iter_mut().zip(w) {
            *s += p;
        }
    }
    let n = windows.len() as f32;
    sum.iter_mut().for_each(|s| *s /= n);
    sum
}

/// The window rows of several texts (see
/// [`super::tokenizer::encode_windows`]), and which text each row reads;
/// every text has at least one row, in order.
pub struct WindowRows {
    pub rows: Vec<Vec<u32>>,
    pub owner: Vec<usize>,
}

impl WindowRows {
    pub fn new<S: AsRef<str>>(
        tokenizer: &Tokenizer,
        texts: &[S],
        max_windows: usize,
    ) -> Result<Self, Error> {
        let mut rows = Vec::with_capacity(texts.len());
        let mut owner = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            for row in super::tokenizer::encode_windows(tokenizer, text.as_ref(), max_windows)? {
                rows.push(row);
                owner.push(i);
            }
        }
        Ok(Self { rows, owner })
    }

    /// Each text's label probabilities, the mean of its windows'; rows of
    /// similar length batched together, `batch` per forward pass.
    pub fn probabilities(
        &self,
        model: &BertForSequenceClassification,
        pad_id: u32,
        batch: usize,
        device: &Device,
    ) -> Result<Vec<Vec<f32>>, Error> {
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        order.sort_by_key(|&i| self.rows[i].len());
        let texts = self.owner.last().map_or(0, |&last| last + 1);
        let mut windows: Vec<Vec<Vec<f32>>> = vec![Vec::new(); texts];
        for chunk in order.chunks(batch.max(1)) {
            let slices: Vec<&[u32]> = chunk.iter().map(|&i| self.rows[i].as_slice()).collect();
            for (&i, p) in chunk
                .iter()
                .zip(probabilities(model, &slices, pad_id, device)?)
            {
                windows[self.owner[i]].push(p);
            }
        }
        Ok(windows.iter().map(|w| mean(w)).collect())
    }
}

/// Label probabilities of every text on the calling thread, for the
/// command line: each text read in up to `max_windows` windows (averaged),
/// `batch` rows per forward pass.
pub fn classify_texts<S: AsRef<str>>(
    model: &BertForSequenceClassification,
    tokenizer: &Tokenizer,
    texts: &[S],
    max_windows: usize,
    batch: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>, Error> {
    WindowRows::new(tokenizer, texts, max_windows)?.probabilities(
        model,
        pad_id(tokenizer),
        batch,
        device,
    )
}

pub fn pad_id(tokenizer: &Tokenizer) -> u32 {
    tokenizer
        .get_padding()
        .map(|p| p.pad_id)
        .or_else(|| tokenizer.token_to_id("[PAD]"))
        .unwrap_or(0)
}

fn run(
    model: BertForSequenceClassification,
    device: Device,
    mut rx: mpsc::Receiver<Job>,
    limits: BatchLimits,
    pad_id: u32,
) {
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match rx.blocking_recv() {
                Some(job) => job,
                None => return,
            },
        };
        let mut longest = first.ids.len();
        let mut batch = vec![first];
        while batch.len() < limits.max_batch {
            let Ok(job) = rx.try_recv() else { break };
            if job.reply.is_closed() {
                continue;
            }
            let longer = longest.max(job.ids.len());
            if longer * (batch.len() + 1) > limits.max_batch_tokens {
                carried = Some(job);
                break;
            }
            longest = longer;
            batch.push(job);
        }
        batch.retain(|job| !job.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let rows: Vec<&[u32]> = batch.iter().map(|j| j.ids.as_slice()).collect();
        match probabilities(&model, &rows, pad_id, &device) {
            Ok(probs) => {
                for (job, p) in batch.into_iter().zip(probs) {
                    let _ = job.reply.send(Ok(p));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, rows = rows.len(), "classifier batch failed");
                for job in batch {
                    let _ = job.reply.send(Err(Error::Inference(e.to_string())));
                }
            }
        }
    }
}

/// Pads rows to the longest one and returns every row's label
/// probabilities.
pub fn probabilities(
    model: &BertForSequenceClassification,
    rows: &[&[u32]],
    pad_id: u32,
    device: &Device,
) -> Result<Vec<Vec<f32>>, Error> {
    let logits = logits(model, rows, pad_id, device)?;
    let probs = candle_nn::ops::softmax_last_dim(&logits)?;
    Ok(probs.to_vec2::<f32>()?)
}

/// Raw logits `[rows, labels]` for padded rows.
pub fn logits(
    model: &BertForSequenceClassification,
    rows: &[&[u32]],
    pad_id: u32,
    device: &Device,
) -> Result<Tensor, Error> {
    let (ids, masks) = pad(rows, pad_id);
    let (ids, masks) = batch_tensors(&ids, &masks, device)?;
    Ok(model.forward(&ids, &masks, false)?)
}

/// Right-pads rows with `pad_id`; the mask is 1 for tokens, 0 for padding.
pub fn pad(rows: &[&[u32]], pad_id: u32) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let longest = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    rows.iter()
        .map(|r| {
            let mut ids = r.to_vec();
            let mut mask = vec![1; r.len()];
            ids.resize(longest, pad_id);
            mask.resize(longest, 0);
            (ids, mask)
        })
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_right_pads_and_masks() {
        let (ids, masks) = pad(&[&[101, 5, 102], &[101, 102]], 0);
        assert_eq!(ids, vec![vec![101, 5, 102], vec![101, 102, 0]]);
        assert_eq!(masks, vec![vec![1, 1, 1], vec![1, 1, 0]]);
    }

    #[test]
    fn windows_are_averaged() {
        assert_eq!(mean(&[vec![0.2, 0.8]]), vec![0.2, 0.8]);
        let m = mean(&[vec![0.1, 0.9], vec![0.5, 0.5], vec![0.9, 0.1]]);
        assert!((m[0] - 0.5).abs() < 1e-6 && (m[1] - 0.5).abs() < 1e-6);
    }
}
