//! The mistral.rs generator on the real SmolLM2-135M-Instruct GGUF (fetched
//! by `make models`): whole and streamed replies agree, stop strings,
//! deadlines, callers that go away, and the concurrency bound.
//!
//! One test loads the model once and checks everything in sequence: loading
//! takes seconds and mistral.rs runs its own engine thread per model.

use std::time::{Duration, Instant};

use kefu::device::{Policy, Want};
use kefu::generate::mistral::{MistralGenerator, Options};
use kefu::generate::{collect, Error, Event, Generator, Message, Request, Role, Sampling};

use crate::common::repo;

fn smollm2() -> std::path::PathBuf {
    repo().join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn request(text: &str, max_new_tokens: u32, stop: &[&str], within: Duration) -> Request {
    Request {
        messages: vec![
            Message::new(
                Role::System,
                "You are a helpful shop assistant. Answer briefly.",
            ),
            Message::new(Role::User, text),
        ],
        sampling: Sampling {
            temperature: 0.0,
            top_p: 1.0,
            max_new_tokens,
            stop: stop.iter().map(|s| s.to_string()).collect(),
        },
        deadline: Instant::now() + within,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_generates_streams_stops_and_cancels() {
    let path = smollm2();
    assert!(
        path.exists(),
        "{} is missing: run `make models`",
        path.display()
    );
    let generator = MistralGenerator::load(
        &path,
        &Options {
            device: Policy {
                want: Want::Cpu,
                ..Policy::default()
            },
            max_concurrent: 1,
            prefix_cache: 0,
        },
    )
    .await
    .expect("SmolLM2 loads");
    assert_eq!(generator.device(), "cpu");
    let minute = Duration::from_secs(120);

    // Whole reply under greedy decoding.
    let question = "Where is my parcel? I ordered shoes last week.";
    let (whole, usage) = generator
        .generate(request(question, 40, &[], minute))
        .await
        .unwrap();
    assert!(!whole.trim().is_empty());
    assert!(
        usage.completion_tokens > 0 && usage.completion_tokens <= 40,
        "{usage:?}"
    );
    assert!(usage.prompt_tokens > 10, "{usage:?}");

    // Streamed: the deltas join to the same reply, and there are several.
    let mut stream = generator
        .stream(request(question, 40, &[], minute))
        .await
        .unwrap();
    let mut deltas = Vec::new();
    let streamed_usage = loop {
        match stream.recv().await.expect("stream finishes with Done") {
            Ok(Event::Delta(d)) => deltas.push(d),
            Ok(Event::Done(u)) => break u,
            Err(e) => panic!("stream failed: {e}"),
        }
    };
    assert!(
        deltas.len() > 3,
        "expected token-by-token deltas, got {deltas:?}"
    );
    assert_eq!(
        deltas.concat(),
        whole,
        "stream and whole reply differ under greedy decoding"
    );
    assert_eq!(streamed_usage.completion_tokens, usage.completion_tokens);

    // A stop string taken from the middle of the reply cuts it there.
    let words: Vec<&str> = whole.split_whitespace().collect();
    assert!(
        words.len() >= 4,
        "reply too short to pick a stop string: {whole:?}"
    );
    let stop = words[words.len() / 2];
    let at = whole.find(stop).unwrap();
    let (cut, usage) = generator
        .generate(request(question, 40, &[stop], minute))
        .await
        .unwrap();
    assert_eq!(cut, whole[..at], "stop string {stop:?}");
    assert!(!cut.contains(stop));
    assert_eq!(usage.finish_reason, "stop_string");

    // A deadline that cannot be met ends the reply with DeadlineExceeded.
    let mut stream = generator
        .stream(request(question, 2000, &[], Duration::from_millis(300)))
        .await
        .unwrap();
    let err = collect(&mut stream).await.unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded), "{err}");

    // While one reply is in progress the bound (1) refuses another at once.
    let mut stream = generator
        .stream(request(question, 2000, &[], minute))
        .await
        .unwrap();
    assert!(matches!(stream.recv().await, Some(Ok(Event::Delta(_)))));
    let refused = generator.stream(request(question, 10, &[], minute)).await;
    assert!(
        matches!(refused, Err(Error::Overloaded(1))),
        "second reply was not refused"
    );

    // The caller goes away: generation stops and the slot frees long before
    // 2000 tokens could have been generated.
    drop(stream);
    let freed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match generator.stream(request(question, 1, &[], minute)).await {
                Ok(mut s) => return collect(&mut s).await.is_ok(),
                Err(Error::Overloaded(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .expect("a dropped stream frees its slot");
    assert!(freed);
}

#[tokio::test]
async fn a_missing_model_is_an_error_not_a_hub_lookup() {
    let err = MistralGenerator::load(&repo().join("models/no-such.gguf"), &Options::default())
        .await
        .err()
        .expect("missing file refused");
    assert!(err.to_string().contains("no-such.gguf"), "{err}");
}
