//! The in-process generator: mistral.rs on a local GGUF file or Hugging Face
//! model directory, on the GPU when kefu is built with `--features cuda` and
//! one is present, otherwise on the CPU.
//!
//! Replies always go through mistral.rs' streaming API: dropping its stream is
//! what stops a sequence (a dropped non-streaming request keeps generating),
//! so a caller that goes away or a missed deadline frees the model at once.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use mistralrs::{
    GgufModelBuilder, Model, RequestBuilder, Response, SamplingParams, StopTokens, TextMessageRole,
    TextModelBuilder, TokenSource,
};
use tokio::sync::{mpsc, Semaphore};

use crate::device::{self, Placement, Policy};

use super::{Error, Event, Generator, ReplyStream, Request, Role, StopFilter, Usage};

/// How to load and run the model.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where to run, and what to do when the GPU cannot be used.
    pub device: Policy,
    /// Replies generated at once (batched by mistral.rs); past it callers
    /// get `Overloaded`. 0 chooses by device: see [`concurrency`].
    pub max_concurrent: usize,
    /// Conversations whose KV cache mistral.rs keeps for reuse; 0 disables
    /// prefix caching.
    pub prefix_cache: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            device: Policy::default(),
            max_concurrent: 0,
            prefix_cache: 16,
        }
    }
}

pub struct MistralGenerator {
    model: Arc<Model>,
    permits: Arc<Semaphore>,
    max_concurrent: usize,
    device: String,
    path: PathBuf,
}

/// Replies generated at once when the operator left it to kefu (0): one on
/// the CPU, where mistral.rs' batched decode is slower in total than one
/// reply at a time (2 cores: 4.5 vs 13.4 tokens/s for Qwen2.5-0.5B with 4 at
/// once, BENCHMARKS.md), and 32 on a GPU, mistral.rs' own default.
pub fn concurrency(requested: usize, gpu: bool) -> usize {
    match (requested, gpu) {
        (0, true) => 32,
        (0, false) => 1,
        (n, _) => n,
    }
}

/// Where the model will run, and why; `Err` is the refusal.
pub fn choose_device(policy: Policy) -> Result<Placement<()>, String> {
    device::decide(
        policy,
        device::BUILT_WITH_CUDA,
        || match mistralrs::best_device(false) {
            Ok(d) if d.is_cuda() => Ok(()),
            Ok(_) => Err("mistral.rs found no CUDA device".into()),
            Err(e) => Err(device::first_line(&e.to_string())),
        },
    )
}

impl MistralGenerator {
    /// Loads a `.gguf` file, or a directory with `config.json`,
    /// `tokenizer.json` and safetensors. Never contacts a model hub: a path
    /// that does not exist is an error here, not a hub lookup.
    pub async fn load(path: &Path, options: &Options) -> Result<Self, Error> {
        let fail = |reason: String| Error::Load {
            path: path.display().to_string(),
            reason,
        };
        if !path.exists() {
            return Err(fail(
                "no such file or directory; run `make models` or pass --generator-model".into(),
            ));
        }
        let placement = choose_device(options.device).map_err(fail)?;
        let gpu = placement.gpu.is_some();
        let prefix = (options.prefix_cache > 0).then_some(options.prefix_cache);
        let started = std::time::Instant::now();
        let mut max_seqs = concurrency(options.max_concurrent, gpu);
        let (model, why) = match build(path, max_seqs, prefix, gpu).await {
            Ok(model) => (model, placement.reason),
            Err(e) if gpu => {
                let fallback: Placement<()> =
                    device::after_gpu_failure(options.device, &e).map_err(fail)?;
                tracing::warn!(reason = %fallback.reason, "generator not on the GPU");
                max_seqs = concurrency(options.max_concurrent, false);
                (
                    build(path, max_seqs, prefix, false).await.map_err(fail)?,
                    fallback.reason,
                )
            }
            Err(e) => return Err(fail(e)),
        };
        let device = match model.config() {
            Ok(c) if c.device.is_cuda() => "cuda:0".to_string(),
            Ok(_) => "cpu".to_string(),
            Err(_) => "unknown".to_string(),
        };
        tracing::info!(
            model = %path.display(),
            device = %device,
            reason = %why,
            max_concurrent = max_seqs,
            seconds = started.elapsed().as_secs_f32(),
            "generator loaded"
        );
        Ok(Self {
            model: Arc::new(model),
            permits: Arc::new(Semaphore::new(max_seqs)),
            max_concurrent: max_seqs,
            device,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A GGUF model on the CPU with `f32` activations. mistral.rs' `GgufModelBuilder`
/// always asks for its automatic dtype, which on a CPU is `f16`: every layer
/// then converts its queries, keys and values to half precision and back, and
/// attention reads an `f16` KV cache one scalar conversion at a time. The
/// quantised weights are the same either way; the activations and the KV cache
/// become `f32` (twice the bytes: ~46 KB per token of context for SmolLM2-135M,
/// ~25 KB for Qwen2.5-0.5B). This is what `GgufModelBuilder::build` does, with
/// the dtype chosen; BENCHMARKS.md has the difference.
async fn gguf_on_cpu(
    dir: &Path,
    file: &str,
    max_seqs: usize,
    prefix: Option<usize>,
) -> anyhow::Result<Model> {
    use mistralrs::core::{
        AddModelConfig, AutoDeviceMapParams, DefaultSchedulerMethod, DeviceMapSetting,
        EngineConfig, GGUFLoaderBuilder, GGUFSpecificConfig, ModelDType, SchedulerConfig,
    };
    let loader = GGUFLoaderBuilder::new(
        None,
        None,
        dir.display().to_string(),
        vec![file.to_string()],
        GGUFSpecificConfig { topology: None },
        false,
        None,
    )
    .build();
    let pipeline = loader.load_model_from_hf(
        None,
        TokenSource::None,
        &ModelDType::F32,
        &mistralrs::Device::Cpu,
        true,
        DeviceMapSetting::Auto(AutoDeviceMapParams::default_text()),
        None,
        None,
    )?;
    let scheduler = SchedulerConfig::DefaultScheduler {
        method: DefaultSchedulerMethod::Fixed(max_seqs.try_into()?),
    };
    let engine_config = EngineConfig {
        no_prefix_cache: prefix.is_none(),
        prefix_cache_n: prefix.unwrap_or(16),
        ..EngineConfig::default()
    };
    let config = AddModelConfig {
        engine_config,
        mcp_client_config: None,
        loader_config: None,
    };
    Ok(
        mistralrs::model_builder_trait::build_model_from_pipeline(pipeline, scheduler, config)
            .await,
    )
}

/// Builds the mistral.rs model from a `.gguf` file or a model directory;
/// the error is mistral.rs' own, in words. Loading runs on its own task so
/// that a panic inside mistral.rs (its CUDA build, for one, panics when
/// `nvidia-smi` is missing) becomes an error kefu can report or fall back
/// from, not a crash.
async fn build(
    path: &Path,
    max_seqs: usize,
    prefix: Option<usize>,
    gpu: bool,
) -> Result<Model, String> {
    let path = path.to_path_buf();
    let task = tokio::spawn(async move {
        let built = if path.is_file() {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let file = path
                .file_name()
                .and_then(|f| f.to_str())
                .ok_or_else(|| "the file name is not UTF-8".to_string())?;
            if gpu {
                GgufModelBuilder::new(dir.display().to_string(), vec![file.to_string()])
                    .with_token_source(TokenSource::None)
                    .with_max_num_seqs(max_seqs)
                    .with_prefix_cache_n(prefix)
                    .build()
                    .await
            } else {
                gguf_on_cpu(dir, file, max_seqs, prefix).await
            }
        } else {
            let mut b = TextModelBuilder::new(path.display().to_string())
                .with_token_source(TokenSource::None)
                .with_max_num_seqs(max_seqs)
                .with_prefix_cache_n(prefix);
            if !gpu {
                b = b.with_force_cpu();
            }
            b.build().await
        };
        built.map_err(|e| format!("{e:#}"))
    });
    match task.await {
        Ok(built) => built,
        Err(e) if e.is_panic() => {
            let payload = e.into_panic();
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Err(format!("mistral.rs panicked while loading: {message}"))
        }
        Err(e) => Err(format!("loading was cancelled: {e}")),
    }
}

fn request_builder(req: &Request) -> RequestBuilder {
    let mut b = RequestBuilder::new();
    for m in &req.messages {
        let role = match m.role {
            Role::System => TextMessageRole::System,
            Role::User => TextMessageRole::User,
            Role::Assistant => TextMessageRole::Assistant,
        };
        b = b.add_message(role, &m.content);
    }
    let s = &req.sampling;
    let greedy = s.temperature <= 0.0;
    b.set_sampling(SamplingParams {
        temperature: Some(if greedy { 0.0 } else { s.temperature as f64 }),
        // RequestBuilder starts from top_k = 1 (greedy); sampling must clear it.
        top_k: if greedy { Some(1) } else { None },
        top_p: (!greedy && s.top_p < 1.0).then_some(s.top_p as f64),
        max_len: Some(s.max_new_tokens.max(1) as usize),
        // Stop strings are also cut here, in kefu, because mistral.rs' stream
        // lets the start of a multi-token stop string through.
        stop_toks: (!s.stop.is_empty()).then(|| StopTokens::Seqs(s.stop.clone())),
        ..SamplingParams::deterministic()
    })
    .with_truncate_sequence(true)
}

#[async_trait]
impl Generator for MistralGenerator {
    async fn stream(&self, request: Request) -> Result<ReplyStream, Error> {
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::Overloaded(self.max_concurrent))?;
        let (tx, rx) = mpsc::channel(64);
        let model = self.model.clone();
        tokio::spawn(async move {
            // The slot is released before the final event is sent, so a
            // caller that has its whole reply can start the next one at once.
            let mut permit = Some(permit);
            let deadline = tokio::time::Instant::from_std(request.deadline);
            let mut filter = StopFilter::new(&request.sampling.stop);
            let builder = request_builder(&request);
            let started =
                tokio::time::timeout_at(deadline, model.stream_chat_request(builder)).await;
            let mut stream = match started {
                Err(_) => {
                    drop(permit.take());
                    let _ = tx.send(Err(Error::DeadlineExceeded)).await;
                    return;
                }
                Ok(Err(e)) => {
                    drop(permit.take());
                    let _ = tx.send(Err(Error::Failed(e.to_string()))).await;
                    return;
                }
                Ok(Ok(s)) => s,
            };
            let mut usage = Usage::default();
            loop {
                let next = match tokio::time::timeout_at(deadline, stream.next()).await {
                    Err(_) => {
                        // Dropping the stream (on return) cancels the sequence.
                        drop(permit.take());
                        let _ = tx.send(Err(Error::DeadlineExceeded)).await;
                        return;
                    }
                    Ok(next) => next,
                };
                let Some(response) = next else { break };
                match response {
                    Response::Chunk(chunk) => {
                        if let Some(u) = &chunk.usage {
                            usage.prompt_tokens = u.prompt_tokens;
                            usage.completion_tokens = u.completion_tokens;
                            usage.prompt_tokens_per_second = u.avg_prompt_tok_per_sec as f64;
                            usage.completion_tokens_per_second = u.avg_compl_tok_per_sec as f64;
                        }
                        let Some(choice) = chunk.choices.first() else {
                            continue;
                        };
                        if let Some(delta) = &choice.delta.content {
                            let out = filter.push(delta);
                            if !out.is_empty() && tx.send(Ok(Event::Delta(out))).await.is_err() {
                                return; // the caller went away: stop generating
                            }
                        }
                        if filter.stopped() {
                            usage.finish_reason = "stop_string".into();
                            break;
                        }
                        if let Some(reason) = &choice.finish_reason {
                            usage.finish_reason = reason.clone();
                            break;
                        }
                    }
                    Response::ModelError(message, _) => {
                        drop(permit.take());
                        let _ = tx.send(Err(Error::Failed(message))).await;
                        return;
                    }
                    Response::ValidationError(e) | Response::InternalError(e) => {
                        drop(permit.take());
                        let _ = tx.send(Err(Error::Failed(e.to_string()))).await;
                        return;
                    }
                    _ => {}
                }
            }
            let rest = filter.finish();
            if !rest.is_empty() && tx.send(Ok(Event::Delta(rest))).await.is_err() {
                return;
            }
            if usage.finish_reason.is_empty() {
                usage.finish_reason = "stop".into();
            }
            drop(permit.take());
            let _ = tx.send(Ok(Event::Done(usage))).await;
        });
        Ok(rx)
    }

    fn device(&self) -> String {
        self.device.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::concurrency;

    #[test]
    fn concurrency_left_to_kefu_is_one_on_the_cpu_and_32_on_a_gpu() {
        assert_eq!(concurrency(0, false), 1);
        assert_eq!(concurrency(0, true), 32);
        assert_eq!(concurrency(4, false), 4);
        assert_eq!(concurrency(4, true), 4);
    }
}
