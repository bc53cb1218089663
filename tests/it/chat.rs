//! ChatService end to end on the real server: kefu's default classifiers,
//! SmolLM2 writing replies, sled in a temporary directory. Each test checks
//! what the customer sees and what was stored.

use std::time::Duration;

use kefu::service::pb::chat_service_client::ChatServiceClient;
use kefu::service::pb::{
    stream_message_event::Event, Author, GenerationOptions, GetConversationRequest,
    GetConversationResponse, MessageMetadata, Route, SendMessageRequest, SendMessageResponse,
    WatchConversationRequest,
};
use kefu::store::Store;
use tonic::transport::Channel;
use tonic::Code;

use crate::harness::{real_args, real_args_no_generator, serving, Running};

pub fn message(user: &str, conversation: &str, text: &str) -> SendMessageRequest {
    SendMessageRequest {
        tenant_id: "shop-7".into(),
        user_id: user.into(),
        conversation_id: conversation.into(),
        text: text.into(),
        ..Default::default()
    }
}

pub async fn send(ch: &Channel, user: &str, conversation: &str, text: &str) -> SendMessageResponse {
    ChatServiceClient::new(ch.clone())
        .send_message(message(user, conversation, text))
        .await
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .into_inner()
}

pub async fn conversation(ch: &Channel, id: &str) -> GetConversationResponse {
    ChatServiceClient::new(ch.clone())
        .get_conversation(GetConversationRequest {
            conversation_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

pub fn route(r: &SendMessageResponse) -> (Route, String) {
    let d = r
        .decision
        .as_ref()
        .expect("every reply carries its decision");
    (d.route(), d.rule.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_is_answered_streamed_and_stored() {
    let server = serving(real_args()).await;
    let ch = &server.channel;
    let first = send(ch, "u1", "", "请问这件衣服有XL码吗").await;
    assert_eq!(route(&first), (Route::Answer, "default_answer".into()));
    assert!(!first.reply.trim().is_empty());
    assert!(!first.fallback);
    assert_eq!((first.customer_turn_id, first.reply_turn_id), (1, 2));
    let d = first.decision.as_ref().unwrap();
    let c = d.classification.as_ref().unwrap();
    assert_eq!(c.intent, "product_inquiry");
    assert_eq!(c.intent_scores.len(), 11);
    assert!(!d.explanation.is_empty() && !d.checks.is_empty());

    // Watch the conversation, then stream the next message into it.
    let mut watch = ChatServiceClient::new(ch.clone())
        .watch_conversation(WatchConversationRequest {
            conversation_id: first.conversation_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut stream = ChatServiceClient::new(ch.clone())
        .stream_message(message("u1", &first.conversation_id, "Where is my parcel?"))
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(ev) = stream.message().await.unwrap() {
        events.push(ev.event.expect("every event has content"));
    }
    let Some(Event::Start(start)) = events.first() else {
        panic!("the first event is the decision: {events:?}");
    };
    assert_eq!(start.conversation_id, first.conversation_id);
    assert_eq!(start.customer_turn_id, 3);
    assert!(start.decision.is_some());
    let Some(Event::End(end)) = events.last() else {
        panic!("the last event is the end: {events:?}");
    };
    let deltas: String = events
        .iter()
        .filter_map(|e| match e {
            Event::Delta(d) => Some(d.as_str()),
            _ => None,
        })
        .collect();
    assert!(events.len() > 3, "the reply streams in pieces");
    assert_eq!(deltas, end.reply, "the deltas are the stored reply");
    assert_eq!(end.reply_turn_id, 4);

    let stored = conversation(ch, &first.conversation_id).await;
    assert_eq!(stored.user_id, "u1");
    assert_eq!(stored.turns.len(), 4);
    assert_eq!(stored.turns[3].text, end.reply);
    assert_eq!(stored.turns[3].author(), Author::Bot);
    assert_eq!(stored.turns[2].author(), Author::Customer);
    assert_eq!(
        stored.turns[0].decision.as_ref().unwrap().rule,
        "default_answer"
    );
    assert!(!stored.held_by_agent);

    // The watcher saw the customer turn and the bot turn.
    for want in [3, 4] {
        let ev = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("the watcher hears about every turn")
            .unwrap()
            .unwrap();
        assert_eq!(ev.turn.unwrap().turn_id, want);
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asking_for_a_human_escalates_and_the_bot_then_stays_silent() {
    let server = serving(real_args()).await;
    let ch = &server.channel;
    let r = send(ch, "u2", "", "转人工").await;
    assert_eq!(route(&r), (Route::Escalate, "asks_for_human".into()));
    assert!(
        r.reply.contains("人工"),
        "the escalation notice: {}",
        r.reply
    );
    assert!(!r.fallback);
    let again = send(ch, "u2", &r.conversation_id, "在吗？怎么没人理我").await;
    assert_eq!(route(&again), (Route::Silent, "held_by_agent".into()));
    let why = &again.decision.as_ref().unwrap().explanation;
    assert!(why.contains("waits in the queue"), "no agent yet: {why}");
    assert!(again.reply.is_empty());
    assert_eq!(again.reply_turn_id, 0);
    let stored = conversation(ch, &r.conversation_id).await;
    assert!(stored.held_by_agent);
    assert_eq!(stored.turns.len(), 3, "customer, notice, customer");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_negative_turns_in_a_row_escalate() {
    let server = serving(real_args()).await;
    let ch = &server.channel;
    // Three impatient questions about an order, none a complaint (a
    // complaint escalates by its own rule before the streak is counted;
    // "快递太慢了" complains about the courier and is one).
    let texts = [
        "包裹怎么还没到啊，急死了",
        "物流一直不更新，烦死了",
        "物流信息三天没动了，到底什么时候能到",
    ];
    let mut conv = String::new();
    let mut routes = Vec::new();
    for t in texts {
        let r = send(ch, "u3", &conv, t).await;
        conv = r.conversation_id.clone();
        routes.push(route(&r));
    }
    assert_eq!(routes[0].0, Route::Answer, "{routes:?}");
    assert_eq!(routes[1].0, Route::Answer, "{routes:?}");
    assert_eq!(
        routes[2],
        (Route::Escalate, "negative_streak".into()),
        "{routes:?}"
    );
    let stored = conversation(ch, &conv).await;
    let d = stored.turns[4].decision.as_ref().unwrap();
    let streak = d
        .checks
        .iter()
        .find(|c| c.name == "consecutive_negative_turns")
        .unwrap();
    assert_eq!(
        (streak.value, streak.threshold, streak.fired),
        (3.0, 3.0, true)
    );
    server.stop().await.unwrap();
}

/// The real server without a generator, under a policy that finds every
/// message unclear (the default intent model is confident even on "嗯"), so
/// the clarify path runs on real outputs; two questions, then a person.
async fn serving_everything_unclear() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "min_intent_confidence = 0.99999\nmax_clarifications = 2\n",
    )
    .unwrap();
    let mut args = real_args_no_generator();
    args.policy = Some(policy);
    // The policy is read at start; the file can go after.
    serving(args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclear_messages_get_clarifying_questions_then_a_person() {
    let server = serving_everything_unclear().await;
    let ch = &server.channel;
    let a = send(ch, "u4", "", "嗯").await;
    assert_eq!(route(&a), (Route::Clarify, "low_confidence".into()));
    assert!(a.reply.contains("抱歉"), "{}", a.reply);
    let b = send(ch, "u4", &a.conversation_id, "那个").await;
    assert_eq!(route(&b), (Route::Clarify, "low_confidence".into()));
    let c = send(ch, "u4", &a.conversation_id, "嗯嗯").await;
    assert_eq!(route(&c), (Route::Escalate, "clarify_limit".into()));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_writing_traditional_chinese_are_answered_in_it() {
    // Every message unclear, so the fixed replies show the script.
    let server = serving_everything_unclear().await;
    let ch = &server.channel;
    let traditional = |text: &str| {
        assert_eq!(
            kefu::classify::Script::detect(text),
            Some(kefu::classify::Script::Traditional),
            "{text}"
        )
    };
    let a = send(ch, "u9", "", "請問我的貨到哪裡了").await;
    assert_eq!(route(&a), (Route::Clarify, "low_confidence".into()));
    traditional(&a.reply);
    // "好的" shows no script: the conversation's earlier message decides.
    let b = send(ch, "u9", &a.conversation_id, "好的").await;
    traditional(&b.reply);
    let c = send(ch, "u9", &a.conversation_id, "嗯").await;
    assert_eq!(route(&c), (Route::Escalate, "clarify_limit".into()));
    traditional(&c.reply);
    // A locale says it for a message that shows nothing.
    let mut hk = message("u10", "", "ok");
    hk.metadata = Some(MessageMetadata {
        locale: "zh-HK".into(),
        ..Default::default()
    });
    let d = ChatServiceClient::new(ch.clone())
        .send_message(hk)
        .await
        .unwrap()
        .into_inner();
    traditional(&d.reply);
    // Simplified stays Simplified.
    let e = send(ch, "u11", "", "我的货到哪里了").await;
    assert_eq!(
        kefu::classify::Script::detect(&e.reply),
        Some(kefu::classify::Script::Simplified),
        "{}",
        e.reply
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generator_past_its_deadline_gets_the_fallback_and_a_person() {
    let mut args = real_args();
    args.generator.reply_timeout_secs = 0.1;
    args.generator.max_new_tokens = 400;
    let server = serving(args).await;
    let ch = &server.channel;
    let r = send(ch, "u5", "", "请问这件衣服有XL码吗").await;
    assert!(r.fallback);
    assert_eq!(route(&r), (Route::Escalate, "generator_unavailable".into()));
    assert!(!r.reply.is_empty());
    let stored = conversation(ch, &r.conversation_id).await;
    assert_eq!(
        stored.turns[0].decision.as_ref().unwrap().rule,
        "generator_unavailable",
        "the stored decision says what really happened"
    );
    assert!(stored.held_by_agent);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_code_and_stores_nothing() {
    let mut args = real_args_no_generator();
    args.max_text_bytes = 100;
    let server = serving(args).await;
    let mut chat = ChatServiceClient::new(server.channel.clone());
    let long_id = "u".repeat(129);
    let cases: Vec<(SendMessageRequest, Code, &str)> = vec![
        (
            message("u6", "", "   "),
            Code::InvalidArgument,
            "text is empty",
        ),
        (
            message("u6", "", &"长".repeat(40)),
            Code::InvalidArgument,
            "120 bytes; the limit is 100",
        ),
        (
            message("", "", "在吗"),
            Code::InvalidArgument,
            "user_id is empty",
        ),
        (
            message(&long_id, "", "在吗"),
            Code::InvalidArgument,
            "the limit is 128",
        ),
        (
            SendMessageRequest {
                tenant_id: "shop 7".into(),
                ..message("u6", "", "在吗")
            },
            Code::InvalidArgument,
            "tenant_id must be printable",
        ),
        (
            message("u6", "c_does_not_exist", "在吗"),
            Code::NotFound,
            "c_does_not_exist",
        ),
        (
            SendMessageRequest {
                generation: Some(GenerationOptions {
                    top_p: Some(0.0),
                    ..Default::default()
                }),
                ..message("u6", "", "在吗")
            },
            Code::InvalidArgument,
            "top_p",
        ),
    ];
    for (req, code, text) in cases {
        let err = chat.send_message(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {}", err.message());
        assert!(
            err.message().contains(text),
            "{:?} lacks {text:?}",
            err.message()
        );
        let err = chat.stream_message(req).await.unwrap_err();
        assert_eq!(err.code(), code, "streamed: {}", err.message());
    }
    let (store, _data) = server.stop_and_open_store().await;
    for (tree, n) in store.tree_sizes() {
        assert_eq!(n, 0, "{tree} has records after rejected requests");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_data_never_reaches_the_store() {
    let server = serving(real_args_no_generator()).await;
    let phone = "13812345678";
    let email = "wang.fang@example.com";
    let id_number = "11010519491231002X";
    let text = format!("我的手机{phone}，邮箱{email}，身份证{id_number}，快递到哪了");
    let r = send(&server.channel, "u7", "", &text).await;
    let stored = conversation(&server.channel, &r.conversation_id).await;
    assert!(
        !stored.turns[0].text.contains(phone),
        "{}",
        stored.turns[0].text
    );
    let (store, _data) = server.stop_and_open_store().await;
    crate::harness::assert_nothing_contains(&store, &[phone, email, id_number]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_inflight_limit_callers_are_told_at_once() {
    let mut args = real_args();
    args.max_inflight = 1;
    args.stream_wait_ms = 100;
    args.generator.max_new_tokens = 120;
    let server = serving(args).await;
    let mut chat = ChatServiceClient::new(server.channel.clone());
    let mut long = chat
        .stream_message(SendMessageRequest {
            generation: Some(GenerationOptions {
                max_new_tokens: Some(120),
                ..Default::default()
            }),
            ..message(
                "u8",
                "",
                "Please recommend a gift for my father, with reasons",
            )
        })
        .await
        .unwrap()
        .into_inner();
    // The first message holds the only slot while its reply streams.
    let first = long.message().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(Event::Start(_))));
    let err = chat
        .send_message(message("u9", "", "在吗"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("--max-inflight"),
        "{}",
        err.message()
    );
    let err = chat
        .stream_message(message("u9", "", "在吗"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // Going away mid-stream frees the slot (generation stops).
    drop(long);
    let ok = tokio::time::timeout(Duration::from_secs(120), async {
        let short = SendMessageRequest {
            generation: Some(GenerationOptions {
                max_new_tokens: Some(4),
                ..Default::default()
            }),
            ..message("u9", "", "在吗")
        };
        loop {
            match chat.send_message(short.clone()).await {
                Ok(r) => return r.into_inner(),
                Err(e) if e.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .expect("the slot is freed once the caller leaves");
    assert!(ok.customer_turn_id > 0);
    server.stop().await.unwrap();
}

/// A free port on loopback (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_turn_survives_sigkill() {
    use crate::common::repo;
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kefu"))
        .arg("serve")
        .arg("--addr")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--sentiment-model")
        .arg(repo().join("models/sentiment"))
        .arg("--intent-model")
        .arg(repo().join("models/intent"))
        .arg("--prompts")
        .arg(repo().join("prompts"))
        .arg("--no-generator")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kefu starts");
    let url = format!("http://127.0.0.1:{port}");
    let channel = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Ok(ch) = Channel::from_shared(url.clone()).unwrap().connect().await {
                if crate::harness::status(&ch, "kefu.v1.ChatService").await
                    == tonic_health::pb::health_check_response::ServingStatus::Serving
                {
                    return ch;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("kefu serves within 60 s");

    // Eight customers write as fast as kefu acknowledges; every reply is
    // a promise that the turns are on disk.
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut clients = Vec::new();
    for c in 0..8 {
        let ch = channel.clone();
        let acked = acked_tx.clone();
        clients.push(tokio::spawn(async move {
            let mut chat = ChatServiceClient::new(ch);
            let mut conv = String::new();
            for i in 0.. {
                let text = format!("第{i}条：我的快递到哪了");
                match chat
                    .send_message(message(&format!("k{c}"), &conv, &text))
                    .await
                {
                    Ok(r) => {
                        let r = r.into_inner();
                        conv = r.conversation_id.clone();
                        if acked
                            .send((r.conversation_id, r.customer_turn_id, text))
                            .is_err()
                        {
                            return;
                        }
                    }
                    // Refused under load: try again; the kill ends it.
                    Err(e) if e.code() == Code::ResourceExhausted => {
                        tokio::time::sleep(Duration::from_millis(10)).await
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    drop(acked_tx);
    // Kill in the middle of the load, once a good number of turns is in.
    let mut acked = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while acked.len() < 64 {
        match tokio::time::timeout_at(deadline, acked_rx.recv()).await {
            Ok(Some(a)) => acked.push(a),
            _ => break,
        }
    }
    child.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
    child.wait().unwrap();
    for c in clients {
        let _ = c.await;
    }
    while let Ok(a) = acked_rx.try_recv() {
        acked.push(a);
    }
    assert!(acked.len() >= 8, "only {} turns acknowledged", acked.len());

    let store = Store::open(dir.path()).expect("the store reopens after SIGKILL");
    for (conv, turn, text) in &acked {
        let turns = store.turns(conv, None).unwrap();
        let stored = turns
            .iter()
            .find(|t| t.turn_id == *turn)
            .unwrap_or_else(|| panic!("acknowledged turn {conv}/{turn} lost"));
        assert_eq!(&stored.text, text);
    }
    eprintln!(
        "{} acknowledged turns, all present after SIGKILL",
        acked.len()
    );
}
