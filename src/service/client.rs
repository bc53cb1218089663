//! Clients of kefu's own API: `kefu chat` (try the service from a terminal)
//! and `kefu bench chat` (messages/s and latency percentiles over gRPC).

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio::io::AsyncBufReadExt;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use super::pb;
use super::pb::chat_service_client::ChatServiceClient;

#[derive(Debug, Clone, clap::Args)]
pub struct ChatArgs {
    /// The kefu server.
    #[arg(long, env = "KEFU_URL", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// The customer you play.
    #[arg(long, default_value = "cli-user")]
    pub user: String,
    /// The platform (tenant) the messages come from.
    #[arg(long, default_value = "cli")]
    pub tenant: String,
    /// Continue this conversation instead of starting a new one.
    #[arg(long)]
    pub conversation: Option<String>,
    /// A `platform` or `admin` API key, when the server has keys.
    #[arg(long, env = "KEFU_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// For an https:// address: the CA certificate (PEM) that signed the
    /// server's certificate.
    #[arg(long, env = "KEFU_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
}

fn authorize<T>(req: &mut tonic::Request<T>, key: Option<&str>) -> anyhow::Result<()> {
    if let Some(key) = key {
        let value: MetadataValue<_> = format!("Bearer {key}")
            .parse()
            .context("the API key has characters a header cannot carry")?;
        req.metadata_mut().insert("authorization", value);
    }
    Ok(())
}

async fn connect(addr: &str, ca_cert: Option<&std::path::Path>) -> anyhow::Result<Channel> {
    let mut endpoint = Channel::from_shared(addr.to_string())
        .with_context(|| format!("{addr} is not a URL like http://127.0.0.1:50051"))?;
    if let Some(path) = ca_cert {
        super::install_crypto_provider();
        let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        endpoint = endpoint.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
        )?;
    }
    endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach kefu at {addr}; is `make run` running?"))
}

#[derive(Debug, Clone, clap::Args)]
pub struct HealthArgs {
    /// The server's URL (https:// with --ca-cert for TLS).
    #[arg(long, env = "KEFU_URL", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Keep asking for up to this many seconds (models take a while to
    /// load); 0 asks once.
    #[arg(long, default_value_t = 0.0)]
    pub wait: f64,
    /// A service name to ask about instead of the whole server, such as
    /// kefu.v1.ChatService.
    #[arg(long, default_value = "")]
    pub service: String,
    /// CA certificate (PEM) to trust for an https:// URL.
    #[arg(long, env = "KEFU_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
}

/// Polls the gRPC health service until SERVING or the end of `--wait`.
pub async fn health(args: HealthArgs) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let until = std::time::Instant::now() + std::time::Duration::from_secs_f64(args.wait.max(0.0));
    let mut last = String::from("unreachable");
    loop {
        if let Ok(channel) = connect(&args.addr, args.ca_cert.as_deref()).await {
            let asked = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: args.service.clone(),
                })
                .await;
            match asked {
                Ok(r) => {
                    let status = ServingStatus::try_from(r.into_inner().status)
                        .unwrap_or(ServingStatus::Unknown);
                    if status == ServingStatus::Serving {
                        println!("SERVING");
                        return Ok(());
                    }
                    last = status.as_str_name().to_string();
                }
                Err(e) => last = format!("{}: {}", e.code(), e.message()),
            }
        }
        if std::time::Instant::now() >= until {
            anyhow::bail!("kefu at {} is not serving ({last})", args.addr);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

fn route_name(route: i32) -> &'static str {
    match pb::Route::try_from(route).unwrap_or(pb::Route::Unspecified) {
        pb::Route::Answer => "answer",
        pb::Route::Clarify => "clarify",
        pb::Route::Escalate => "escalate",
        pb::Route::Silent => "silent",
        pb::Route::Unspecified => "?",
    }
}

/// One line under each reply: what kefu decided and why.
pub fn describe(d: &pb::Decision) -> String {
    let c = d.classification.clone().unwrap_or_default();
    format!(
        "[{} by {}: {} | intent {} {:.2}, sentiment {} {:.2}]",
        route_name(d.route),
        d.rule,
        d.explanation,
        c.intent,
        c.intent_confidence,
        c.sentiment,
        c.sentiment_confidence
    )
}

/// `kefu chat`: type messages, watch replies stream, see each decision.
pub async fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let mut client = ChatServiceClient::new(connect(&args.addr, args.ca_cert.as_deref()).await?);
    let mut conversation = args.conversation.clone().unwrap_or_default();
    eprintln!(
        "kefu chat: you are {} on {}. Type a message and press Enter; Ctrl-D quits.",
        args.user, args.tenant
    );
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut out = std::io::stdout();
    loop {
        write!(out, "> ")?;
        out.flush()?;
        let Some(line) = lines.next_line().await? else {
            break;
        };
        if line.trim().is_empty() {
            continue;
        }
        let mut req = tonic::Request::new(pb::SendMessageRequest {
            tenant_id: args.tenant.clone(),
            user_id: args.user.clone(),
            conversation_id: conversation.clone(),
            text: line,
            ..Default::default()
        });
        authorize(&mut req, args.api_key.as_deref())?;
        let mut stream = match client.stream_message(req).await {
            Ok(s) => s.into_inner(),
            Err(status) => {
                eprintln!("error: {}: {}", status.code(), status.message());
                continue;
            }
        };
        let mut decision = None;
        loop {
            match stream.message().await {
                Ok(Some(ev)) => match ev.event {
                    Some(pb::stream_message_event::Event::Start(s)) => {
                        conversation = s.conversation_id;
                        decision = s.decision;
                        write!(out, "kefu: ")?;
                    }
                    Some(pb::stream_message_event::Event::Delta(d)) => write!(out, "{d}")?,
                    Some(pb::stream_message_event::Event::End(e)) => {
                        if e.reply_turn_id == 0 {
                            write!(out, "(no reply from the bot: a person answers from here)")?;
                        }
                        writeln!(out)?;
                        if e.fallback {
                            eprintln!("(fallback reply: the generator was unavailable)");
                        }
                    }
                    None => {}
                },
                Ok(None) => break,
                Err(status) => {
                    eprintln!("\nerror: {}: {}", status.code(), status.message());
                    break;
                }
            }
            out.flush()?;
        }
        if let Some(d) = &decision {
            eprintln!("{}", describe(d));
        }
    }
    if !conversation.is_empty() {
        eprintln!("conversation {conversation}");
    }
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct ChatBenchArgs {
    /// The kefu server to measure (start it with `make run` or `kefu serve`).
    #[arg(long, env = "KEFU_URL", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Concurrent clients, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub clients: Vec<usize>,
    /// Messages per level for the classify-only route.
    #[arg(long, default_value_t = 256)]
    pub classify_messages: usize,
    /// Messages per level for the full route (classify, route, generate,
    /// store), at least one per client; generation dominates, so keep it
    /// small on a CPU.
    #[arg(long, default_value_t = 16)]
    pub full_messages: usize,
    /// Cap on generated tokens in the full route (a per-request override).
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: u32,
    /// A `platform` or `admin` API key, when the server has keys.
    #[arg(long, env = "KEFU_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LevelResult {
    pub route: String,
    pub clients: usize,
    pub messages: usize,
    pub errors: usize,
    pub messages_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

const BENCH_TEXTS: [&str; 8] = [
    "我的快递到哪了，怎么还没到啊？",
    "这件衣服有没有XL码的？",
    "退款什么时候能到账呢",
    "Where is my parcel? It has been a week.",
    "优惠券怎么用不了了",
    "有什么适合送给爸爸的礼物推荐吗",
    "Can I change the delivery address?",
    "发票抬头开错了能重开吗",
];

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn level(
    channel: &Channel,
    args: &ChatBenchArgs,
    full: bool,
    clients: usize,
    run_id: &str,
) -> anyhow::Result<LevelResult> {
    // At least one message per client, so every level really has that
    // many callers at once.
    let total = if full {
        args.full_messages
    } else {
        args.classify_messages
    }
    .max(clients);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = ChatServiceClient::new(channel.clone());
        let next = next.clone();
        let key = args.api_key.clone();
        let max_new_tokens = args.max_new_tokens;
        let user = format!("bench-{run_id}-{clients}-{c}");
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let text = BENCH_TEXTS[i % BENCH_TEXTS.len()].to_string();
                let t = Instant::now();
                let ok = if full {
                    let mut req = tonic::Request::new(pb::SendMessageRequest {
                        tenant_id: "bench".into(),
                        user_id: user.clone(),
                        text,
                        generation: Some(pb::GenerationOptions {
                            max_new_tokens: Some(max_new_tokens),
                            ..Default::default()
                        }),
                        ..Default::default()
                    });
                    authorize(&mut req, key.as_deref())?;
                    client.send_message(req).await.is_ok()
                } else {
                    let mut req = tonic::Request::new(pb::ClassifyRequest { texts: vec![text] });
                    authorize(&mut req, key.as_deref())?;
                    client.classify(req).await.is_ok()
                };
                if ok {
                    latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                } else {
                    errors += 1;
                }
            }
            Ok::<_, anyhow::Error>((latencies, errors))
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await??;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    Ok(LevelResult {
        route: if full { "full" } else { "classify" }.into(),
        clients,
        messages: latencies.len(),
        errors,
        messages_per_second: latencies.len() as f64 / elapsed,
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
    })
}

/// `kefu bench chat`: the classify-only route (Classify) and the full
/// route (SendMessage) at each client count, against a running server.
pub async fn bench(args: ChatBenchArgs) -> anyhow::Result<()> {
    let channel = connect(&args.addr, None).await?;
    let run_id = format!("{}", crate::store::now_ms());
    let mut results = Vec::new();
    for full in [false, true] {
        for &clients in &args.clients {
            let r = level(&channel, &args, full, clients.max(1), &run_id).await?;
            eprintln!(
                "{:>8} route, {:>3} clients: {:>8.1} msg/s, p50 {:>8.1} ms, p99 {:>8.1} ms ({} ok, {} errors)",
                r.route, r.clients, r.messages_per_second, r.p50_ms, r.p99_ms, r.messages, r.errors
            );
            results.push(r);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        println!("| route | clients | messages/s | p50 ms | p99 ms | errors |");
        println!("|---|---:|---:|---:|---:|---:|");
        for r in &results {
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {} |",
                r.route, r.clients, r.messages_per_second, r.p50_ms, r.p99_ms, r.errors
            );
        }
    }
    Ok(())
}
