//! The gRPC server: kefu's services, `grpc.health.v1` and reflection on one
//! port. Health reports NOT_SERVING for a service until the models it needs
//! are loaded, then SERVING. The server stops gracefully when the shutdown
//! future passed in completes (SIGINT/SIGTERM in `kefu serve`, a oneshot in
//! tests).

pub mod admin;
pub mod agent;
pub mod auth;
pub mod chat;
pub mod client;
pub mod convert;
pub mod marketing;
pub mod status;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::server::NamedService;
use tonic_health::ServingStatus;

use crate::classify::{BertClassifier, BertSettings, Classifier};
use crate::config::ServeArgs;
use crate::generate::mistral::{self, MistralGenerator};
use crate::generate::prompt::{PromptSettings, Prompts};
use crate::generate::{Generator, Sampling};
use crate::pipeline::{self, Clock, Hub, Pipeline};
use crate::route::Policy;
use crate::segment;
use crate::store::{Durability, Store};
use crate::Error;

/// Generated protobuf and gRPC code for `kefu.v1`.
pub mod pb {
    tonic::include_proto!("kefu.v1");

    /// The descriptor set the reflection service serves.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kefu_descriptor");
}

use pb::admin_service_server::AdminServiceServer;
use pb::agent_service_server::AgentServiceServer;
use pb::chat_service_server::ChatServiceServer;
use pb::marketing_service_server::MarketingServiceServer;

/// The loaded models the services run on.
pub struct Models {
    pub classifier: Arc<dyn Classifier>,
    /// Where the classifiers run: `cuda:0` or `cpu`.
    pub classifier_device: String,
    /// None when kefu runs without a generator (`--no-generator`).
    pub generator: Option<Arc<dyn Generator>>,
}

impl Models {
    /// Loads the models `args` names: the classifiers on a blocking thread,
    /// the generator on the runtime (mistral.rs starts its own engine).
    pub async fn load(args: &ServeArgs) -> Result<Models, Error> {
        let (sentiment, intent) = (args.sentiment_model.clone(), args.intent_model.clone());
        let settings = BertSettings {
            device: args.devices.classifier(),
            ..args.classifier.settings()
        };
        let classifier = tokio::task::spawn_blocking(move || {
            BertClassifier::load(&sentiment, &intent, &settings)
        });
        let g = &args.generator;
        let generator = if g.no_generator {
            tracing::warn!("running without a generator: answers are fallback replies");
            None
        } else {
            let options = mistral::Options {
                device: args.devices.generator(g.generator_cpu),
                max_concurrent: g.generator_max_concurrent,
                prefix_cache: g.prefix_cache,
            };
            let generator = MistralGenerator::load(&g.generator_model, &options)
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))?;
            Some(Arc::new(generator) as Arc<dyn Generator>)
        };
        let classifier = classifier
            .await
            .map_err(|e| Error::Unavailable(format!("model loading panicked: {e}")))??;
        Ok(Models {
            classifier_device: classifier.device(),
            classifier: Arc::new(classifier),
            generator,
        })
    }
}

/// Limits every handler checks requests against.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_text_bytes: usize,
    pub max_classify_texts: usize,
}

/// What the handlers share. The pipeline exists once the models are loaded;
/// the store, the hub and the clock from the start.
pub struct State {
    pipeline: OnceLock<Pipeline>,
    pub limits: Limits,
    pub store: Store,
    pub hub: Arc<Hub>,
    pub clock: Clock,
    pub rules: segment::Rules,
    pub stream_wait: Duration,
    max_inflight: usize,
}

impl State {
    /// The message pipeline, or UNAVAILABLE while the models load.
    pub fn pipeline(&self) -> Result<&Pipeline, Error> {
        self.pipeline.get().ok_or_else(|| {
            Error::Unavailable(
                "models are still loading; wait for grpc.health.v1 to report SERVING".into(),
            )
        })
    }

    pub fn now_ms(&self) -> u64 {
        (self.clock)()
    }

    pub fn max_inflight(&self) -> usize {
        self.max_inflight
    }
}

/// What serve prepares before listening: a broken template, policy or
/// store stops kefu here, with the file and the reason.
struct Prepared {
    store: Store,
    prompts: Arc<Prompts>,
    policy: Policy,
}

fn prepare(args: &ServeArgs) -> Result<Prepared, ServeError> {
    let prompts = Prompts::load(
        &args.prompts,
        PromptSettings {
            shop_name: args.generator.shop_name.clone(),
            ..PromptSettings::default()
        },
    )
    .map_err(|e| ServeError::Config(e.to_string()))?;
    let policy = match &args.policy {
        Some(path) => {
            Policy::from_toml_file(path).map_err(|e| ServeError::Config(e.to_string()))?
        }
        None => Policy::default(),
    };
    std::fs::create_dir_all(&args.data_dir).map_err(|e| {
        ServeError::Config(format!("cannot create {}: {e}", args.data_dir.display()))
    })?;
    let durability = match args.group_commit_ms {
        0 => Durability::EveryTurn,
        ms => Durability::GroupCommit(Duration::from_millis(ms)),
    };
    let store = Store::open_with(&args.data_dir, durability).map_err(|e| {
        ServeError::Config(format!(
            "cannot open the store in {} (is another kefu using it?): {e}",
            args.data_dir.display()
        ))
    })?;
    Ok(Prepared {
        store,
        prompts: Arc::new(prompts),
        policy,
    })
}

/// A future that loads the models; tests pass their own to control timing.
pub type ModelLoader = BoxFuture<'static, Result<Models, Error>>;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("models failed to load: {0}")]
    Models(Error),
    #[error(
        "model {0} does not exist; run `make models` or point the flag at a checkpoint \
         (--no-generator runs without a generative model)"
    )]
    MissingModel(PathBuf),
    #[error("{0}")]
    Keys(String),
    #[error("{0}")]
    Config(String),
    #[error(
        "no API keys are configured, so kefu only listens on loopback, not {0}; \
         set --keys-file or KEFU_API_KEYS"
    )]
    OpenWithoutKeys(std::net::SocketAddr),
}

/// Binds `args.addr` and serves until `shutdown` completes.
pub async fn serve(
    args: ServeArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    for dir in [&args.sentiment_model, &args.intent_model] {
        if !dir.is_dir() {
            return Err(ServeError::MissingModel(dir.clone()));
        }
    }
    let g = &args.generator.generator_model;
    if !args.generator.no_generator && !g.exists() {
        return Err(ServeError::MissingModel(g.clone()));
    }
    let listener = TcpListener::bind(args.addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: args.addr,
            source,
        })?;
    let loader_args = args.clone();
    let loader: ModelLoader = Box::pin(async move { Models::load(&loader_args).await });
    serve_on(args, listener, loader, shutdown).await
}

/// Picks ring as rustls' process-wide crypto provider (kefu's dependency
/// tree enables two, so rustls will not guess). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The TLS identity `args` names, if any.
fn tls_config(args: &ServeArgs) -> Result<Option<tonic::transport::ServerTlsConfig>, ServeError> {
    let (cert, key) = match (&args.tls_cert, &args.tls_key) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => {
            install_crypto_provider();
            (c, k)
        }
        _ => {
            return Err(ServeError::Config(
                "TLS needs both --tls-cert and --tls-key".into(),
            ))
        }
    };
    let read = |p: &PathBuf| {
        std::fs::read(p)
            .map_err(|e| ServeError::Config(format!("cannot read {}: {e}", p.display())))
    };
    let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
    Ok(Some(
        tonic::transport::ServerTlsConfig::new().identity(identity),
    ))
}

/// The API keys `args` names.
pub fn load_keys(args: &ServeArgs) -> Result<auth::Keys, ServeError> {
    auth::Keys::load(
        args.keys_file.as_deref(),
        args.api_keys.as_ref().map(|s| s.0.as_str()),
    )
    .map_err(ServeError::Keys)
}

fn service_names() -> [&'static str; 4] {
    [
        <ChatServiceServer<chat::ChatApi> as NamedService>::NAME,
        <AgentServiceServer<agent::AgentApi> as NamedService>::NAME,
        <MarketingServiceServer<marketing::MarketingApi> as NamedService>::NAME,
        <AdminServiceServer<admin::AdminApi> as NamedService>::NAME,
    ]
}

/// Serves on an already-bound listener with models from `loader`. Health is
/// NOT_SERVING until the loader finishes; if it fails, the server shuts down
/// and the error is returned.
pub async fn serve_on(
    args: ServeArgs,
    listener: TcpListener,
    loader: ModelLoader,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().ok();
    // Connections kefu accepts itself skip tonic's socket settings: without
    // TCP_NODELAY, small replies wait for the peer's delayed ACK (~40 ms).
    let incoming = futures::StreamExt::map(TcpListenerStream::new(listener), |conn| {
        conn.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
    let keys = Arc::new(load_keys(&args)?);
    if let Some(addr) = addr.filter(|a| keys.is_empty() && !a.ip().is_loopback()) {
        return Err(ServeError::OpenWithoutKeys(addr));
    }
    if keys.is_empty() {
        tracing::warn!(
            "NO API KEYS CONFIGURED: every call is admitted; listening on loopback only"
        );
    } else {
        tracing::info!(keys = keys.len(), "API keys loaded");
    }
    let guard = |allowed: &'static [auth::Role]| {
        let keys = keys.clone();
        move |req: tonic::Request<()>| keys.check(&req, allowed).map(|_| req)
    };
    let prepared = prepare(&args)?;
    let offset = args.clock_offset_secs;
    let clock: Clock = if offset == 0 {
        pipeline::system_clock()
    } else {
        tracing::warn!(offset_secs = offset, "kefu's clock is shifted");
        Arc::new(move || (crate::store::now_ms() as i64 + offset * 1000).max(0) as u64)
    };
    let state = Arc::new(State {
        pipeline: OnceLock::new(),
        limits: Limits {
            max_text_bytes: args.max_text_bytes,
            max_classify_texts: args.max_classify_texts,
        },
        store: prepared.store.clone(),
        hub: Arc::new(Hub::default()),
        clock,
        rules: segment::Rules {
            dormant_days: args.dormant_days,
            new_days: args.new_days,
            ..segment::Rules::default()
        },
        stream_wait: Duration::from_millis(args.stream_wait_ms),
        max_inflight: args.max_inflight.max(1),
    });
    let g = &args.generator;
    let pipeline_settings = pipeline::Settings {
        max_text_bytes: args.max_text_bytes,
        history_tokens: g.history_tokens,
        sampling: Sampling {
            temperature: g.temperature.max(0.0),
            top_p: g.top_p.clamp(0.01, 1.0),
            max_new_tokens: g.max_new_tokens.max(1),
            stop: g.stop.clone(),
        },
        reply_timeout: g.reply_timeout(),
    };
    let max_inflight = args.max_inflight.max(1);

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    for name in service_names() {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls_config(&args)? {
        builder = builder.tls_config(tls)?;
        tracing::info!("TLS on");
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let grace = args.shutdown_grace();
    let server = builder
        .trace_fn(|req| tracing::info_span!("rpc", method = %req.uri().path()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ChatServiceServer::with_interceptor(
            chat::ChatApi::new(state.clone()),
            guard(auth::CHAT),
        ))
        .add_service(AgentServiceServer::with_interceptor(
            agent::AgentApi::new(state.clone()),
            guard(auth::AGENT),
        ))
        .add_service(MarketingServiceServer::with_interceptor(
            marketing::MarketingApi::new(state.clone()),
            guard(auth::MARKETING),
        ))
        .add_service(AdminServiceServer::with_interceptor(
            admin::AdminApi::new(state.clone()),
            guard(auth::ADMIN),
        ))
        .serve_with_incoming_shutdown(incoming, async move {
            // stop_rx fires only when model loading fails; its sender being
            // dropped after a successful load must not stop the server.
            let load_failed = async {
                if stop_rx.await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = shutdown => tracing::info!(
                    grace_seconds = grace.as_secs_f32(),
                    "shutdown requested; finishing in-flight calls"
                ),
                _ = load_failed => {}
            }
            let _ = signalled_tx.send(());
        });
    tracing::info!(addr = ?addr, "kefu listening; models loading");

    let load = async {
        let started = std::time::Instant::now();
        match loader.await {
            Ok(models) => {
                let classifier_device = models.classifier_device.clone();
                let device = models
                    .generator
                    .as_ref()
                    .map_or_else(|| "none".to_string(), |g| g.device());
                let _ = state.pipeline.set(Pipeline {
                    store: prepared.store.clone(),
                    classifier: models.classifier,
                    generator: models.generator,
                    prompts: prepared.prompts.clone(),
                    policy: prepared.policy.clone(),
                    settings: pipeline_settings.clone(),
                    hub: state.hub.clone(),
                    clock: state.clock.clone(),
                    permits: Arc::new(tokio::sync::Semaphore::new(max_inflight)),
                });
                tracing::info!(
                    classifier = %classifier_device,
                    generator = %device,
                    "model devices"
                );
                health.set_service_status("", ServingStatus::Serving).await;
                for name in service_names() {
                    health
                        .set_service_status(name, ServingStatus::Serving)
                        .await;
                }
                tracing::info!(
                    seconds = started.elapsed().as_secs_f32(),
                    "models loaded; SERVING"
                );
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "models failed to load; shutting down");
                let _ = stop_tx.send(());
                Err(ServeError::Models(e))
            }
        }
    };

    let run = async {
        tokio::pin!(server);
        tokio::select! {
            result = &mut server => { result?; Ok(()) }
            loaded = load => {
                let served = server.await;
                loaded?;
                served?;
                Ok(())
            }
        }
    };
    // Streams (health watches, conversation watches) never finish on their
    // own: after the grace period they are cut so the process can exit.
    let forced = async {
        if signalled_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = run => result,
        _ = forced => {
            tracing::warn!("grace period over; closing the calls still open");
            Ok(())
        }
    }
}

/// Streams a hub subscription to one client until the client leaves or the
/// channel closes: each event through `convert`; a watcher that falls behind
/// gets ABORTED, with `catch_up` saying how to recover.
pub(crate) async fn forward<E: Clone, T>(
    mut events: tokio::sync::broadcast::Receiver<E>,
    tx: tokio::sync::mpsc::Sender<Result<T, tonic::Status>>,
    convert: impl Fn(E) -> T,
    catch_up: &str,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let next = tokio::select! {
            next = events.recv() => next,
            _ = tx.closed() => return,
        };
        let item = match next {
            Ok(e) => Ok(convert(e)),
            Err(RecvError::Lagged(n)) => Err(tonic::Status::aborted(format!(
                "this watcher fell {n} events behind; {catch_up}"
            ))),
            Err(RecvError::Closed) => return,
        };
        let end = item.is_err();
        if tx.send(item).await.is_err() || end {
            return;
        }
    }
}
