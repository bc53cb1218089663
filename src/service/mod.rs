//! The gRPC server: kefu's services, `grpc.health.v1` and reflection on one
//! port. Health reports NOT_SERVING for a service until the models it needs
//! are loaded, then SERVING. The server stops gracefully when the shutdown
//! future passed in completes (SIGINT/SIGTERM in `kefu serve`, a oneshot in
//! tests).

pub mod auth;
pub mod chat;
pub mod status;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::server::NamedService;
use tonic_health::ServingStatus;

use crate::classify::{BertClassifier, Classifier};
use crate::config::ServeArgs;
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
}

impl Models {
    /// Loads the models `args` names, off the async runtime.
    pub async fn load(args: &ServeArgs) -> Result<Models, Error> {
        let (sentiment, intent) = (args.sentiment_model.clone(), args.intent_model.clone());
        let settings = args.classifier.settings();
        let classifier = tokio::task::spawn_blocking(move || {
            BertClassifier::load(&sentiment, &intent, &settings)
        })
        .await
        .map_err(|e| Error::Unavailable(format!("model loading panicked: {e}")))??;
        Ok(Models {
            classifier: Arc::new(classifier),
        })
    }
}

/// Limits every handler checks requests against.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_text_bytes: usize,
    pub max_classify_texts: usize,
}

/// What the handlers share.
pub struct State {
    models: OnceLock<Models>,
    pub limits: Limits,
}

impl State {
    /// The models, or UNAVAILABLE while they load.
    pub fn models(&self) -> Result<&Models, Error> {
        self.models.get().ok_or_else(|| {
            Error::Unavailable(
                "models are still loading; wait for grpc.health.v1 to report SERVING".into(),
            )
        })
    }
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
        "model directory {0} does not exist; run `make models` or point the flag at a checkpoint"
    )]
    MissingModel(PathBuf),
    #[error("{0}")]
    Keys(String),
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
        <AgentServiceServer<Unserved> as NamedService>::NAME,
        <MarketingServiceServer<Unserved> as NamedService>::NAME,
        <AdminServiceServer<Unserved> as NamedService>::NAME,
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
    let state = Arc::new(State {
        models: OnceLock::new(),
        limits: Limits {
            max_text_bytes: args.max_text_bytes,
            max_classify_texts: args.max_classify_texts,
        },
    });

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

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let grace = args.shutdown_grace();
    let server = tonic::transport::Server::builder()
        .trace_fn(|req| tracing::info_span!("rpc", method = %req.uri().path()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ChatServiceServer::with_interceptor(
            chat::ChatApi::new(state.clone()),
            guard(auth::CHAT),
        ))
        .add_service(AgentServiceServer::with_interceptor(
            Unserved,
            guard(auth::AGENT),
        ))
        .add_service(MarketingServiceServer::with_interceptor(
            Unserved,
            guard(auth::MARKETING),
        ))
        .add_service(AdminServiceServer::with_interceptor(
            Unserved,
            guard(auth::ADMIN),
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
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
                let _ = state.models.set(models);
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

/// Services whose handlers arrive with later work: every RPC answers
/// UNIMPLEMENTED (tonic's generated default) until then.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unserved;

impl pb::agent_service_server::AgentService for Unserved {}
impl pb::marketing_service_server::MarketingService for Unserved {}
impl pb::admin_service_server::AdminService for Unserved {}
