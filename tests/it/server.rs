//! The real gRPC server in-process on 127.0.0.1:0: health follows model
//! loading, reflection lists kefu's services, Classify answers and checks its
//! input, and shutdown is clean.

use std::time::Duration;

use futures::StreamExt;
use kefu::config::ServeArgs;
use kefu::device::{OnGpuFailure, Want};
use kefu::service::pb::chat_service_client::ChatServiceClient;
use kefu::service::pb::ClassifyRequest;
use tokio::sync::oneshot;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::common::fixture;
use crate::harness::{serving, start, status, tiny_args, with_key};

fn args() -> ServeArgs {
    tiny_args()
}

#[tokio::test]
async fn health_is_not_serving_until_models_load_then_serving() {
    let (open, gate) = oneshot::channel();
    let server = start(args(), gate).await;
    for service in ["", "kefu.v1.ChatService", "kefu.v1.AgentService"] {
        assert_eq!(
            status(&server.channel, service).await,
            ServingStatus::NotServing,
            "{service}"
        );
    }
    // While loading, model-backed calls say so instead of hanging.
    let err = ChatServiceClient::new(server.channel.clone())
        .classify(ClassifyRequest {
            texts: vec!["在吗".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let (ok, said) = kefu_health(server.addr, 0).await;
    assert!(!ok && said.contains("NOT_SERVING"), "{said}");

    let mut watch = HealthClient::new(server.channel.clone())
        .watch(HealthCheckRequest {
            service: "kefu.v1.ChatService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    open.send(()).unwrap();
    let serving = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(Ok(msg)) = watch.next().await {
            if msg.status == ServingStatus::Serving as i32 {
                return true;
            }
        }
        false
    })
    .await
    .expect("SERVING within 60 s");
    assert!(serving);
    assert_eq!(status(&server.channel, "").await, ServingStatus::Serving);
    let (ok, said) = kefu_health(server.addr, 10).await;
    assert!(ok && said.contains("SERVING"), "{said}");
    let addr = server.addr;
    server.stop().await.expect("clean shutdown");
    let (ok, said) = kefu_health(addr, 0).await;
    assert!(!ok && said.contains("unreachable"), "{said}");
}

/// `kefu health` against `addr`: whether it exited 0, and what it printed.
async fn kefu_health(addr: std::net::SocketAddr, wait: u64) -> (bool, String) {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kefu"))
            .args(["health", "--addr", &format!("http://{addr}")])
            .args(["--wait", &wait.to_string()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[tokio::test]
async fn reflection_lists_kefus_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let (open, gate) = oneshot::channel();
    open.send(()).unwrap();
    let server = start(args(), gate).await;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(server.channel.clone())
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list, got {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "kefu.v1.ChatService",
        "kefu.v1.AgentService",
        "kefu.v1.MarketingService",
        "kefu.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn classify_returns_every_label_with_probabilities() {
    let server = serving(args()).await;
    let mut chat = ChatServiceClient::new(server.channel.clone());
    let reply = chat
        .classify(ClassifyRequest {
            texts: vec!["我的快递到哪了".into(), "Where is my parcel?".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.results.len(), 2);
    let zh = &reply.results[0];
    assert_eq!(zh.language, "zh");
    assert_eq!(reply.results[1].language, "en");
    assert_eq!(zh.sentiment_scores.len(), 3);
    assert_eq!(zh.intent_scores.len(), 11);
    let total: f32 = zh.intent_scores.iter().map(|s| s.probability).sum();
    assert!((total - 1.0).abs() < 1e-4);
    assert_eq!(zh.intent, zh.intent_scores[0].label);
    assert_eq!(zh.intent_confidence, zh.intent_scores[0].probability);
    server.stop().await.unwrap();
}

/// A message longer than the classifier's positions is read in windows, as
/// `--classify-windows` says; with 1 it is truncated.
#[tokio::test]
async fn classify_reads_a_long_message_in_the_configured_windows() {
    use kefu::classify::checkpoint::Checkpoint;
    use kefu::classify::worker::classify_texts;

    let text =
        "快递三天就到了，包装也很好。".repeat(8) + "可是用了一天就坏了，客服也不理人，太失望了";
    let local = Checkpoint::load(&fixture("tiny-bert"), 128, &candle_core::Device::Cpu).unwrap();
    let read = |windows: usize| {
        classify_texts(
            &local.model,
            &local.tokenizer,
            std::slice::from_ref(&text),
            windows,
            8,
            &candle_core::Device::Cpu,
        )
        .unwrap()
        .remove(0)
    };
    let (whole, first) = (read(8), read(1));
    assert!(
        whole.iter().zip(&first).any(|(a, b)| (a - b).abs() > 1e-4),
        "the windows change the answer: {whole:?} vs {first:?}"
    );
    for (windows, want) in [(8, whole), (1, first)] {
        let mut a = args();
        a.classifier.classify_windows = windows;
        let server = serving(a).await;
        let reply = ChatServiceClient::new(server.channel.clone())
            .classify(ClassifyRequest {
                texts: vec![text.clone()],
            })
            .await
            .unwrap()
            .into_inner();
        for score in &reply.results[0].sentiment_scores {
            let i = local.labels.iter().position(|l| *l == score.label).unwrap();
            assert!(
                (score.probability - want[i]).abs() < 1e-5,
                "windows {windows}: {} {} vs {}",
                score.label,
                score.probability,
                want[i]
            );
        }
        server.stop().await.unwrap();
    }
}

#[tokio::test]
async fn classify_rejects_bad_input_with_the_limit() {
    let mut a = args();
    a.max_text_bytes = 100;
    a.max_classify_texts = 3;
    let server = serving(a).await;
    let mut chat = ChatServiceClient::new(server.channel.clone());
    let cases = [
        (vec![], "texts is empty"),
        (vec!["ok".to_string(); 4], "the limit is 3"),
        (vec!["ok".into(), "   ".into()], "texts[1] is empty"),
        (vec!["长".repeat(40)], "120 bytes; the limit is 100"),
    ];
    for (texts, message) in cases {
        let err = chat.classify(ClassifyRequest { texts }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains(message),
            "{:?} lacks {message:?}",
            err.message()
        );
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn unknown_conversations_are_not_found() {
    let server = serving(args()).await;
    let err = ChatServiceClient::new(server.channel.clone())
        .get_conversation(kefu::service::pb::GetConversationRequest {
            conversation_id: "c_nothing_here".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("c_nothing_here"),
        "{}",
        err.message()
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_model_that_fails_to_load_stops_the_server_with_the_reason() {
    let mut a = tiny_args();
    a.intent_model = fixture("no-such-model");
    let err = load_failure(a).await;
    assert!(err.contains("no-such-model"), "{err}");
}

/// Starts a server whose models must fail to load and returns the error it
/// stops with. The models start loading only once the test is connected: a
/// load that fails at once (a refused GPU) would otherwise stop the server
/// before the connection is made.
async fn load_failure(args: ServeArgs) -> String {
    let (open, gate) = oneshot::channel();
    let server = start(args, gate).await;
    open.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), server.handle)
        .await
        .expect("server gives up")
        .unwrap();
    result.unwrap_err().to_string()
}

#[tokio::test]
async fn a_gpu_that_cannot_be_had_is_refused_or_replaced_as_configured() {
    if kefu::device::BUILT_WITH_CUDA {
        // A CUDA build may well find its GPU; this is about the CPU build.
        return;
    }
    // --device cuda --gpu-fallback refuse: the server stops and says why.
    let mut a = tiny_args();
    a.devices.device = Want::Cuda;
    a.devices.gpu_fallback = OnGpuFailure::Refuse;
    let err = load_failure(a).await;
    assert!(err.contains("built without the cuda feature"), "{err}");
    assert!(err.contains("--gpu-fallback refuse"), "{err}");

    // --gpu-fallback cpu: the same request serves, on the CPU.
    let mut a = tiny_args();
    a.devices.device = Want::Cuda;
    a.devices.gpu_fallback = OnGpuFailure::Cpu;
    let server = serving(a).await;
    let mut chat = ChatServiceClient::new(server.channel.clone());
    let reply = chat
        .classify(ClassifyRequest {
            texts: vec!["我的快递到哪了".into()],
        })
        .await
        .expect("classifies on the CPU");
    assert_eq!(reply.into_inner().results.len(), 1);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn every_role_against_every_service() {
    use kefu::service::pb::admin_service_client::AdminServiceClient;
    use kefu::service::pb::agent_service_client::AgentServiceClient;
    use kefu::service::pb::marketing_service_client::MarketingServiceClient;
    use kefu::service::pb::{DeleteUserDataRequest, ListEscalationsRequest, ListSegmentsRequest};

    let keys = [
        ("platform", "platform-key-0123456"),
        ("agent", "agent-key-0123456789"),
        ("marketing", "marketing-key-012345"),
        ("admin", "admin-key-0123456789"),
    ];
    let mut a = args();
    a.api_keys = Some(kefu::config::Secret(
        keys.iter()
            .map(|(r, k)| format!("{r}:{k}"))
            .collect::<Vec<_>>()
            .join(","),
    ));
    let server = serving(a).await;
    let ch = server.channel.clone();
    // (service, roles allowed)
    let table: [(&str, &[&str]); 4] = [
        ("chat", &["platform", "admin"]),
        ("agent", &["agent", "admin"]),
        ("marketing", &["marketing", "admin"]),
        ("admin", &["admin"]),
    ];
    for (service, allowed) in table {
        for (role, key) in keys
            .iter()
            .map(|(r, k)| (Some(*r), Some(*k)))
            .chain([(None, None)])
        {
            let code = match service {
                "chat" => ChatServiceClient::new(ch.clone())
                    .classify(with_key(
                        ClassifyRequest {
                            texts: vec!["在吗".into()],
                        },
                        key,
                    ))
                    .await
                    .map_or_else(|e| e.code(), |_| Code::Ok),
                "agent" => AgentServiceClient::new(ch.clone())
                    .list_escalations(with_key(ListEscalationsRequest::default(), key))
                    .await
                    .map_or_else(|e| e.code(), |_| Code::Ok),
                "marketing" => MarketingServiceClient::new(ch.clone())
                    .list_segments(with_key(ListSegmentsRequest::default(), key))
                    .await
                    .map_or_else(|e| e.code(), |_| Code::Ok),
                _ => AdminServiceClient::new(ch.clone())
                    .delete_user_data(with_key(DeleteUserDataRequest::default(), key))
                    .await
                    .map_or_else(|e| e.code(), |_| Code::Ok),
            };
            // Admitted calls succeed; DeleteUserData's empty request is
            // admitted and then refused for its content.
            let expected = match role {
                None => vec![Code::Unauthenticated],
                Some(r) if allowed.contains(&r) => vec![Code::Ok, Code::InvalidArgument],
                Some(_) => vec![Code::PermissionDenied],
            };
            assert!(expected.contains(&code), "{role:?} on {service}: {code:?}");
        }
    }
    // Health stays open to load balancers.
    assert_eq!(status(&ch, "").await, ServingStatus::Serving);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn without_keys_kefu_refuses_to_listen_beyond_loopback() {
    let mut a = args();
    a.addr = "0.0.0.0:0".parse().unwrap();
    let err = kefu::service::serve(a, async {}).await.unwrap_err();
    assert!(
        err.to_string().contains("only listens on loopback"),
        "{err}"
    );
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_certificate() {
    use kefu::service::{serve_on, Models};
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};

    let tls = fixture("tls");
    let mut a = args();
    a.tls_cert = Some(tls.join("server.crt"));
    a.tls_key = Some(tls.join("server.key"));
    let data = tempfile::tempdir().unwrap();
    a.data_dir = data.path().to_path_buf();
    a.prompts = crate::common::repo().join("prompts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let load = a.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(serve_on(
        a,
        listener,
        Box::pin(async move { Models::load(&load).await }),
        async {
            let _ = stopped.await;
        },
    ));
    kefu::service::install_crypto_provider();
    let ca = std::fs::read(tls.join("ca.crt")).unwrap();
    let channel = Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .expect("a TLS client connects");
    tokio::time::timeout(Duration::from_secs(60), async {
        while status(&channel, "kefu.v1.ChatService").await != ServingStatus::Serving {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let reply = ChatServiceClient::new(channel)
        .classify(ClassifyRequest {
            texts: vec!["在吗".into()],
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().results.len(), 1);
    // A plaintext client gets nowhere.
    let plain = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(plain) = plain {
        assert!(ChatServiceClient::new(plain)
            .classify(ClassifyRequest {
                texts: vec!["在吗".into()],
            })
            .await
            .is_err());
    }
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
}
