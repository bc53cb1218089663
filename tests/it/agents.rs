//! AgentService and AdminService on the real server: the escalation queue
//! from escalation to hand-back, double claims, queue order and paging,
//! corrections that `kefu train` accepts, and deleting a customer.

use std::process::Command;
use std::time::Duration;

use kefu::service::pb::admin_service_client::AdminServiceClient;
use kefu::service::pb::agent_service_client::AgentServiceClient;
use kefu::service::pb::chat_service_client::ChatServiceClient;
use kefu::service::pb::{
    escalation_event::Kind, Author, ClaimEscalationRequest, DeleteUserDataRequest,
    EscalationStatus, GetConversationRequest, GetCustomerContextRequest, LabelCorrection,
    ListEscalationsRequest, PostAgentReplyRequest, Priority, ResolveEscalationRequest, Route,
    WatchConversationRequest, WatchEscalationsRequest,
};
use tonic::Code;

use crate::chat::{route, send};
use crate::harness::{real_args, real_args_no_generator, serving};

fn claim(id: &str, agent: &str) -> ClaimEscalationRequest {
    ClaimEscalationRequest {
        escalation_id: id.into(),
        agent_id: agent.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalate_claim_reply_resolve_and_the_bot_answers_again() {
    let server = serving(real_args()).await;
    let ch = &server.channel;
    let mut agents = AgentServiceClient::new(ch.clone());
    let mut queue_events = agents
        .watch_escalations(WatchEscalationsRequest {})
        .await
        .unwrap()
        .into_inner();

    let asked = send(ch, "c1", "", "转人工").await;
    assert_eq!(route(&asked).0, Route::Escalate);
    let conv = asked.conversation_id.clone();
    let queue = agents
        .list_escalations(ListEscalationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(queue.escalations.len(), 1);
    let e = &queue.escalations[0];
    assert_eq!(e.status(), EscalationStatus::Waiting);
    assert_eq!(e.conversation_id, conv);
    assert_eq!(e.decision.as_ref().unwrap().rule, "asks_for_human");
    assert_eq!(e.recent_turns[0].text, "转人工");
    assert_eq!(e.sentiment_trend.len(), 1);
    let id = e.escalation_id.clone();

    let mut watch = ChatServiceClient::new(ch.clone())
        .watch_conversation(WatchConversationRequest {
            conversation_id: conv.clone(),
        })
        .await
        .unwrap()
        .into_inner();

    let claimed = agents.claim_escalation(claim(&id, "alice")).await.unwrap();
    assert_eq!(claimed.get_ref().status(), EscalationStatus::Claimed);
    assert_eq!(claimed.get_ref().agent_id, "alice");
    let err = agents
        .claim_escalation(claim(&id, "bob"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("alice"), "{}", err.message());

    let err = agents
        .post_agent_reply(PostAgentReplyRequest {
            conversation_id: conv.clone(),
            agent_id: "bob".into(),
            text: "我来处理".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let reply = agents
        .post_agent_reply(PostAgentReplyRequest {
            conversation_id: conv.clone(),
            agent_id: "alice".into(),
            text: "您好，我是客服小王，请问订单号是多少？".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .turn
        .unwrap();
    assert_eq!(reply.author(), Author::Agent);

    // The platform's watch stream delivers the human reply.
    let ev = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the agent's reply reaches the watcher")
        .unwrap()
        .unwrap();
    assert!(ev.held_by_agent);
    let turn = ev.turn.unwrap();
    assert_eq!(turn.author(), Author::Agent);
    assert_eq!(turn.agent_id, "alice");
    assert_eq!(turn.text, reply.text);

    // While the agent holds it, the bot is silent.
    let silent = send(ch, "c1", &conv, "订单号是4512876390123").await;
    assert_eq!(route(&silent).0, Route::Silent);
    assert_eq!(silent.reply_turn_id, 0);
    let why = &silent.decision.as_ref().unwrap().explanation;
    assert!(
        why.contains("a human agent holds"),
        "claimed by alice: {why}"
    );

    let err = agents
        .resolve_escalation(ResolveEscalationRequest {
            escalation_id: id.clone(),
            agent_id: "alice".into(),
            outcome: "explained the delivery".into(),
            corrections: vec![LabelCorrection {
                turn_id: 1,
                intent: "teleport".into(),
                ..Default::default()
            }],
            hand_back_to_bot: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let resolved = agents
        .resolve_escalation(ResolveEscalationRequest {
            escalation_id: id.clone(),
            agent_id: "alice".into(),
            outcome: "explained the delivery".into(),
            corrections: vec![
                LabelCorrection {
                    turn_id: 1,
                    sentiment: "neutral".into(),
                    ..Default::default()
                },
                LabelCorrection {
                    turn_id: silent.customer_turn_id,
                    intent: "order_status".into(),
                    sentiment: "neutral".into(),
                },
            ],
            hand_back_to_bot: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.status(), EscalationStatus::Resolved);
    assert_eq!(resolved.outcome, "explained the delivery");

    // Handed back: the bot answers again.
    let back = send(ch, "c1", &conv, "请问这件衣服有XL码吗").await;
    assert_eq!(route(&back).0, Route::Answer);
    assert!(!back.reply.is_empty());

    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        let ev = tokio::time::timeout(Duration::from_secs(10), queue_events.message())
            .await
            .expect("queue events arrive")
            .unwrap()
            .unwrap();
        assert_eq!(ev.escalation.as_ref().unwrap().escalation_id, id);
        kinds.push(ev.kind());
    }
    assert_eq!(kinds, vec![Kind::New, Kind::Claimed, Kind::Resolved]);

    let context = agents
        .get_customer_context(GetCustomerContextRequest {
            tenant_id: "shop-7".into(),
            user_id: "c1".into(),
            max_turns: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let profile = context.profile.unwrap();
    assert_eq!(profile.message_count, 3);
    assert_eq!(profile.escalation_count, 1);
    assert_eq!(context.conversation_ids, vec![conv.clone()]);
    assert_eq!(context.escalations.len(), 1);
    assert_eq!(context.recent_turns.len(), 6);
    assert!(context.recent_turns[0].decision.is_some());

    // The corrections become training data that `kefu train` accepts.
    // (Watchers hold the store open; they go first so the CLI can open it.)
    drop((watch, queue_events));
    let dir = server.data_dir();
    let data = server.data.clone();
    server.stop().await.unwrap();
    crate::harness::wait_for_store_release(&dir).await;
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("intent.jsonl");
    let exported = Command::new(env!("CARGO_BIN_EXE_kefu"))
        .args(["export-corrections", "--task", "intent", "--data-dir"])
        .arg(&dir)
        .arg("--out")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let lines = std::fs::read_to_string(&file).unwrap();
    assert_eq!(lines.lines().count(), 1, "{lines}");
    assert!(lines.contains("\"label\":\"order_status\""), "{lines}");
    let trained = Command::new(env!("CARGO_BIN_EXE_kefu"))
        .args(["train", "--task", "intent", "--config", "--data"])
        .arg(&file)
        .arg("--dev")
        .arg(&file)
        .arg("--out")
        .arg(out.path().join("model"))
        .args([
            "--hidden-size",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--intermediate-size",
            "64",
            "--min-token-count",
            "1",
            "--max-steps",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        trained.status.success(),
        "{}",
        String::from_utf8_lossy(&trained.stderr)
    );
    assert!(out.path().join("model/model.safetensors").exists());
    drop(data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_is_ordered_by_priority_then_waiting_time_and_paged() {
    let server = serving(real_args_no_generator()).await;
    let ch = &server.channel;
    let first = send(ch, "q1", "", "转人工").await;
    let angry = send(ch, "q2", "", "我要投诉你们，卖假货").await;
    assert_eq!(route(&angry), (Route::Escalate, "angry_complaint".into()));
    let third = send(ch, "q3", "", "我要找人工客服").await;
    let mut agents = AgentServiceClient::new(ch.clone());
    let page = agents
        .list_escalations(ListEscalationsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let convs: Vec<&str> = page
        .escalations
        .iter()
        .map(|e| e.conversation_id.as_str())
        .collect();
    assert_eq!(
        convs,
        vec![
            angry.conversation_id.as_str(),
            first.conversation_id.as_str()
        ]
    );
    assert_eq!(page.escalations[0].priority(), Priority::High);
    assert!(!page.next_page_token.is_empty());
    let rest = agents
        .list_escalations(ListEscalationsRequest {
            page_size: 2,
            page_token: page.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.escalations.len(), 1);
    assert_eq!(rest.escalations[0].conversation_id, third.conversation_id);
    assert!(rest.next_page_token.is_empty());
    let resolved = agents
        .list_escalations(ListEscalationsRequest {
            status: EscalationStatus::Resolved as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resolved.escalations.is_empty());
    let err = agents
        .list_escalations(ListEscalationsRequest {
            page_token: "not-hex".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_customer_leaves_nothing_of_them_in_any_tree() {
    let server = serving(real_args_no_generator()).await;
    let ch = &server.channel;
    let victim = "victim-4711";
    let a = send(ch, victim, "", "转人工").await;
    let b = send(ch, victim, "", "我的快递到哪了").await;
    let kept = send(ch, "bystander", "", "转人工").await;
    let mut agents = AgentServiceClient::new(ch.clone());
    let queue = agents
        .list_escalations(ListEscalationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mine = queue
        .escalations
        .iter()
        .find(|e| e.user_id == victim)
        .unwrap();
    agents
        .claim_escalation(claim(&mine.escalation_id, "alice"))
        .await
        .unwrap();
    agents
        .resolve_escalation(ResolveEscalationRequest {
            escalation_id: mine.escalation_id.clone(),
            agent_id: "alice".into(),
            outcome: "done".into(),
            hand_back_to_bot: false,
            corrections: vec![LabelCorrection {
                turn_id: 1,
                intent: "human_agent".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();

    let deleted = AdminServiceClient::new(ch.clone())
        .delete_user_data(DeleteUserDataRequest {
            tenant_id: "shop-7".into(),
            user_id: victim.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.conversations_deleted, 2);
    assert!(deleted.turns_deleted >= 3, "{deleted:?}");
    assert_eq!(deleted.escalations_deleted, 2, "{deleted:?}");
    assert!(deleted.profile_deleted);
    for id in [&a.conversation_id, &b.conversation_id] {
        let err = ChatServiceClient::new(ch.clone())
            .get_conversation(GetConversationRequest {
                conversation_id: id.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }
    let (store, _data) = server.stop_and_open_store().await;
    crate::harness::assert_nothing_contains(
        &store,
        &[
            victim,
            a.conversation_id.as_str(),
            b.conversation_id.as_str(),
        ],
    );
    assert_eq!(store.turns(&kept.conversation_id, None).unwrap().len(), 2);
    assert!(store.profile("shop-7", "bystander").unwrap().is_some());
}
