//! Starting and stopping the real server in-process on 127.0.0.1:0, with a
//! sled store in a temporary directory, and small client helpers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kefu::config::ServeArgs;
use kefu::service::{serve_on, ModelLoader, Models, ServeError};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::common::{fixture, repo};

pub struct Running {
    pub channel: Channel,
    /// Where it listens (127.0.0.1 and a free port).
    pub addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub handle: tokio::task::JoinHandle<Result<(), ServeError>>,
    /// The store's directory; kept until every server using it is gone.
    pub data: Arc<TempDir>,
}

impl Running {
    pub async fn stop(mut self) -> Result<(), ServeError> {
        let _ = self.stop.take().expect("stopped once").send(());
        tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .expect("server stops within 20 s")
            .expect("server task did not panic")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data.path().to_path_buf()
    }

    /// Stops the server and opens what it stored; the directory lives as
    /// long as the returned guard.
    pub async fn stop_and_open_store(self) -> (kefu::store::Store, Arc<TempDir>) {
        let data = self.data.clone();
        self.stop().await.unwrap();
        wait_for_store_release(data.path()).await;
        let store = kefu::store::Store::open(data.path()).unwrap();
        (store, data)
    }
}

/// Fails if any key or value in any tree contains one of `needles`.
pub fn assert_nothing_contains(store: &kefu::store::Store, needles: &[&str]) {
    for (tree, k, v) in store.dump() {
        for needle in needles {
            let hit = |b: &[u8]| String::from_utf8_lossy(b).contains(needle);
            assert!(!hit(&k) && !hit(&v), "{needle} found in {tree}");
        }
    }
}

/// The tiny fixture classifiers, no generator: fast, for API-shape tests.
pub fn tiny_args() -> ServeArgs {
    let mut a = ServeArgs::with_models(fixture("tiny-bert"), fixture("tiny-bert-intent"));
    a.generator.no_generator = true;
    a
}

pub fn smollm2() -> PathBuf {
    repo().join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// kefu's default classifiers and SmolLM2, greedy and short.
pub fn real_args() -> ServeArgs {
    let mut a = ServeArgs::with_models(
        repo().join("models/sentiment"),
        repo().join("models/intent"),
    );
    a.generator.generator_model = smollm2();
    a.generator.generator_cpu = true;
    a.generator.temperature = 0.0;
    a.generator.max_new_tokens = 24;
    a.generator.prefix_cache = 0;
    a.generator.reply_timeout_secs = 120.0;
    a.prompts = repo().join("prompts");
    a
}

/// The same real classifiers without a generator.
pub fn real_args_no_generator() -> ServeArgs {
    let mut a = real_args();
    a.generator.no_generator = true;
    a
}

/// Starts the server in a fresh data directory; the models load when
/// `gate` fires.
pub async fn start(args: ServeArgs, gate: oneshot::Receiver<()>) -> Running {
    start_in(args, gate, Arc::new(tempfile::tempdir().unwrap())).await
}

pub async fn start_in(
    mut args: ServeArgs,
    gate: oneshot::Receiver<()>,
    data: Arc<TempDir>,
) -> Running {
    args.data_dir = data.path().to_path_buf();
    if args.prompts.is_relative() {
        args.prompts = repo().join(&args.prompts);
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let load_args = args.clone();
    let loader: ModelLoader = Box::pin(async move {
        let _ = gate.await;
        Models::load(&load_args).await
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(serve_on(args, listener, loader, async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("server accepts connections before models load");
    Running {
        channel,
        addr,
        stop: Some(stop),
        handle,
        data,
    }
}

pub async fn status(channel: &Channel, service: &str) -> ServingStatus {
    let reply = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health answers");
    ServingStatus::try_from(reply.into_inner().status).unwrap()
}

async fn wait_serving(server: &Running) {
    tokio::time::timeout(Duration::from_secs(120), async {
        while status(&server.channel, "kefu.v1.ChatService").await != ServingStatus::Serving {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("SERVING within 120 s");
}

/// Starts the server and waits until it reports SERVING.
pub async fn serving(args: ServeArgs) -> Running {
    serving_in(args, Arc::new(tempfile::tempdir().unwrap())).await
}

pub async fn serving_in(args: ServeArgs, data: Arc<TempDir>) -> Running {
    let (open, gate) = oneshot::channel();
    open.send(()).unwrap();
    let server = start_in(args, gate, data).await;
    wait_serving(&server).await;
    server
}

pub fn with_key<T>(msg: T, key: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(k) = key {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    r
}

/// Waits until no one holds the store in `dir` (server tasks let go of it
/// shortly after the server stops), so another process can open it.
pub async fn wait_for_store_release(dir: &std::path::Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match kefu::store::Store::open(dir) {
            Ok(store) => {
                drop(store);
                return;
            }
            Err(e) if std::time::Instant::now() > deadline => panic!("store still held: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
