//! MarketingService on the real server over hand-built customer histories:
//! segment sizes, exports without message text, and `dormant` moving with
//! a controlled clock.

use std::sync::Arc;

use kefu::service::pb::marketing_service_client::MarketingServiceClient;
use kefu::service::pb::{ExportSegmentRequest, ListSegmentsRequest, ProfileSummary};
use kefu::store::{now_ms, NewTurn, Store, TurnSignals};
use prost::Message;
use tonic::transport::Channel;
use tonic::Code;

use crate::harness::{serving_in, tiny_args};

const DAY: u64 = 24 * 60 * 60 * 1000;

/// (user, intent, polarity, days ago) for each customer message.
const HISTORIES: &[(&str, &str, f32, u64)] = &[
    ("newbie", "greeting", 0.0, 1),
    ("fan", "recommendation", 0.8, 40),
    ("fan", "promotion", 0.9, 20),
    ("fan", "product_inquiry", 0.8, 3),
    ("grumpy", "complaint", -0.9, 30),
    ("grumpy", "return_refund", -0.8, 5),
    ("grumpy", "complaint", -0.9, 4),
    ("sleeper", "order_status", 0.2, 120),
    ("sleeper", "promotion", 0.3, 90),
];

const SECRET_TEXT: &str = "我的地址是幸福路88号";

async fn build_histories(dir: &std::path::Path) {
    let store = Store::open(dir).unwrap();
    let now = now_ms();
    let mut convs = std::collections::HashMap::new();
    for (user, intent, polarity, days) in HISTORIES {
        let conv = convs
            .entry(*user)
            .or_insert_with(|| Store::new_conversation("shop-7", user, now - days * DAY));
        let signals = TurnSignals {
            intent: intent.to_string(),
            sentiment: *polarity,
            negative: *polarity < -0.5,
            clarified: false,
            language: "zh".into(),
        };
        store
            .append_turn(
                conv,
                NewTurn::customer(SECRET_TEXT, None, &signals, now - days * DAY),
            )
            .await
            .unwrap();
    }
}

async fn sizes(ch: &Channel) -> std::collections::HashMap<String, u64> {
    let reply = MarketingServiceClient::new(ch.clone())
        .list_segments(ListSegmentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    for s in &reply.segments {
        assert!(!s.definition.is_empty(), "{} has no definition", s.name);
    }
    reply
        .segments
        .into_iter()
        .map(|s| (s.name, s.size))
        .collect()
}

async fn export(ch: &Channel, segment: &str) -> Vec<ProfileSummary> {
    let mut stream = MarketingServiceClient::new(ch.clone())
        .export_segment(ExportSegmentRequest {
            segment: segment.into(),
            tenant_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(p) = stream.message().await.unwrap() {
        out.push(p);
    }
    out
}

fn users(list: &[ProfileSummary]) -> Vec<&str> {
    list.iter().map(|p| p.user_id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_follow_the_customer_life_cycle_and_the_clock() {
    let data = Arc::new(tempfile::tempdir().unwrap());
    build_histories(data.path()).await;

    let server = serving_in(tiny_args(), data.clone()).await;
    let ch = &server.channel;
    let s = sizes(ch).await;
    assert_eq!(s["new"], 1, "{s:?}");
    assert_eq!(s["active"], 1, "{s:?}");
    assert_eq!(s["at_risk"], 1, "{s:?}");
    assert_eq!(s["dormant"], 1, "{s:?}");
    assert_eq!(s["promoter"], 1, "{s:?}");
    assert_eq!(s["detractor"], 1, "{s:?}");
    assert_eq!(s["interest:promotion"], 2, "{s:?}");
    assert_eq!(s["interest:recommendation"], 1, "{s:?}");

    assert_eq!(users(&export(ch, "new").await), vec!["newbie"]);
    assert_eq!(users(&export(ch, "at_risk").await), vec!["grumpy"]);
    let dormant = export(ch, "dormant").await;
    assert_eq!(users(&dormant), vec!["sleeper"]);
    assert_eq!(dormant[0].stage, "dormant");
    assert_eq!(dormant[0].suggested_action, "win-back coupon");
    let promoters = export(ch, "promoter").await;
    assert_eq!(users(&promoters), vec!["fan"]);
    assert_eq!(promoters[0].message_count, 3);
    assert_eq!(promoters[0].top_intents.len(), 3);
    assert!(promoters[0].last_seen.is_some());
    let mut interested = export(ch, "interest:promotion").await;
    interested.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    assert_eq!(users(&interested), vec!["fan", "sleeper"]);

    // Marketing never sees what customers wrote.
    for segment in [
        "new",
        "active",
        "at_risk",
        "dormant",
        "promoter",
        "detractor",
    ] {
        for p in export(ch, segment).await {
            let bytes = p.encode_to_vec();
            assert!(!String::from_utf8_lossy(&bytes).contains("幸福路"));
        }
    }
    let err = MarketingServiceClient::new(ch.clone())
        .export_segment(ExportSegmentRequest {
            segment: "vip".into(),
            tenant_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("dormant"), "{}", err.message());
    server.stop().await.unwrap();
    crate::harness::wait_for_store_release(data.path()).await;

    // Ninety days later everyone has gone quiet: the same profiles, read
    // against a later clock, are all dormant.
    let mut later = tiny_args();
    later.clock_offset_secs = 90 * 24 * 60 * 60;
    let server = serving_in(later, data.clone()).await;
    let s = sizes(&server.channel).await;
    assert_eq!(s["dormant"], 4, "{s:?}");
    assert_eq!(s["new"] + s["active"] + s["at_risk"], 0, "{s:?}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_profiles_stream_out() {
    use kefu::store::Durability;

    const N: usize = 100_000;
    let data = Arc::new(tempfile::tempdir().unwrap());
    {
        // Many writers sharing group commits build the profiles quickly.
        let store = Store::open_with(
            data.path(),
            Durability::GroupCommit(std::time::Duration::from_millis(20)),
        )
        .unwrap();
        let now = now_ms();
        let mut tasks = Vec::new();
        for w in 0..32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let signals = TurnSignals {
                    intent: "promotion".into(),
                    sentiment: 0.1,
                    negative: false,
                    clarified: false,
                    language: "zh".into(),
                };
                for u in (w..N).step_by(32) {
                    let mut conv = Store::new_conversation("shop-7", &format!("u{u:06}"), now);
                    store
                        .append_turn(
                            &mut conv,
                            NewTurn::customer(SECRET_TEXT, None, &signals, now),
                        )
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    crate::harness::wait_for_store_release(data.path()).await;
    let server = serving_in(tiny_args(), data.clone()).await;
    let mut stream = MarketingServiceClient::new(server.channel.clone())
        .export_segment(ExportSegmentRequest {
            segment: "interest:promotion".into(),
            tenant_id: "shop-7".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    let mut last = String::new();
    while let Some(p) = stream.message().await.unwrap() {
        assert!(p.user_id > last, "profiles stream in key order");
        last = p.user_id;
        n += 1;
    }
    assert_eq!(n, N);
    server.stop().await.unwrap();
}
