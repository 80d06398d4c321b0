//! Batched forwards and the continuous-batching engine give each sequence exactly what it gets
//! alone, while sharing the steps.

mod common;

use candle_core::DType;
use glm2rs::engine::{Engine, EngineConfig, Event};
use glm2rs::{Error, FinishReason, GenerationConfig, LoadOptions, Logits, Model};

fn model() -> Option<Model> {
    let fx = common::fixtures()?;
    let opts = LoadOptions {
        dtype: Some(DType::F32),
        ..Default::default()
    };
    Some(Model::from_dir(&fx.join("model"), &opts).unwrap())
}

fn greedy(n: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: Some(n),
        ..Default::default()
    }
}

#[test]
fn forward_many_equals_each_sequence_alone() {
    let Some(m) = model() else { return };
    let tok = m.tokenizer();
    let inner = m.model();
    let a = tok.encode("第一个句子，比较长一点的输入", true).unwrap();
    let b = tok.encode("hi", true).unwrap();
    let c = tok.encode("third one", true).unwrap();
    // c already has a past: its cache holds its first half
    let (c_past, c_new) = c.split_at(c.len() / 2);
    let mut ca = inner.new_cache();
    let mut cb = inner.new_cache();
    let mut cc = inner.new_cache();
    inner
        .forward_many(&[c_past], &mut [&mut cc], Logits::Last)
        .unwrap();
    let out = inner
        .forward_many(
            &[&a, &b, c_new],
            &mut [&mut ca, &mut cb, &mut cc],
            Logits::All,
        )
        .unwrap();
    for (seq, got) in [&a, &b, &c].iter().zip(&out) {
        let want = m.logits(seq).unwrap();
        let want = want
            .narrow(
                0,
                want.dim(0).unwrap() - got.dim(0).unwrap(),
                got.dim(0).unwrap(),
            )
            .unwrap();
        let d = common::max_abs_diff(got, &want);
        assert!(d < 1e-5, "batched logits differ by {d}");
    }
    assert_eq!(
        (ca.position(), cb.position(), cc.position()),
        (a.len(), b.len(), c.len())
    );
    // a decode step of all three together (Logits::Last) continues each correctly
    let next: Vec<u32> = vec![5, 6, 7];
    let out = inner
        .forward_many(
            &[&next[0..1], &next[1..2], &next[2..3]],
            &mut [&mut ca, &mut cb, &mut cc],
            Logits::Last,
        )
        .unwrap();
    for (i, seq) in [&a, &b, &c].iter().enumerate() {
        let mut full = seq.to_vec();
        full.push(next[i]);
        let want = m.logits(&full).unwrap();
        let want = want.narrow(0, full.len() - 1, 1).unwrap();
        let d = common::max_abs_diff(&out[i], &want);
        assert!(d < 1e-5, "decode step of sequence {i} differs by {d}");
    }
    // a bad sequence fails the call and leaves the caches as they were
    let err = inner.forward_many(
        &[&next[0..1], &[70000]],
        &mut [&mut ca, &mut cb],
        Logits::Last,
    );
    assert!(matches!(err, Err(Error::InvalidArgument(_))));
    assert_eq!(ca.position(), a.len() + 1);
}

#[test]
fn generate_batch_equals_one_at_a_time() {
    let Some(m) = model() else { return };
    let prompts: Vec<Vec<u32>> = [
        "你好",
        "a much longer prompt than the others, to mix lengths",
        "x",
    ]
    .iter()
    .map(|p| m.tokenizer().encode(p, true).unwrap())
    .collect();
    let cfg = greedy(17);
    let batch = m.generate_batch_ids(&prompts, &cfg).unwrap();
    for (p, got) in prompts.iter().zip(&batch) {
        assert_eq!(got, &m.generate_ids(p, &cfg).unwrap());
    }
    let texts: Vec<String> = ["你好", "hello"].iter().map(|s| s.to_string()).collect();
    let batch = m.generate_batch(&texts, &cfg).unwrap();
    for (p, got) in texts.iter().zip(&batch) {
        assert_eq!(got, &m.generate(p, &cfg).unwrap());
    }
}

#[test]
fn engine_serves_concurrent_requests_in_shared_steps() {
    let Some(m) = model() else { return };
    let engine = Engine::new(
        m.clone(),
        EngineConfig {
            max_batch: 8,
            max_queue: 16,
        },
    )
    .unwrap();
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| m.tokenizer().encode(&format!("request {i}"), true).unwrap())
        .collect();
    let cfg = greedy(30);
    let mut rxs: Vec<_> = prompts
        .iter()
        .map(|p| engine.submit(p.clone(), &cfg).unwrap())
        .collect();
    for (p, rx) in prompts.iter().zip(rxs.iter_mut()) {
        let mut text = String::new();
        let mut done = None;
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Text(t) => text.push_str(&t),
                Event::Done {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                    ..
                } => done = Some((reason, prompt_tokens, completion_tokens)),
                Event::Logprobs(_) => {}
                Event::Error(e) => panic!("{e}"),
            }
        }
        let want_ids = m.generate_ids(p, &cfg).unwrap();
        assert_eq!(text, m.tokenizer().decode(&want_ids).unwrap());
        assert_eq!(done, Some((FinishReason::Length, p.len(), 30)));
    }
    // six requests of 30 tokens shared their steps
    assert!(engine.steps() < 6 * 30 / 2, "{} steps", engine.steps());
    assert_eq!(engine.completed(), 6);
    // bad requests are refused before they run
    assert!(matches!(
        engine.submit(vec![], &cfg),
        Err(Error::InvalidArgument(_))
    ));
    let too_long = vec![5u32; m.config().seq_length + 1];
    assert!(matches!(
        engine.submit(too_long, &cfg),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn engine_queue_is_bounded_and_dropped_requests_free_their_place() {
    let Some(m) = model() else { return };
    let engine = Engine::new(
        m.clone(),
        EngineConfig {
            max_batch: 1,
            max_queue: 1,
        },
    )
    .unwrap();
    let ids = m.tokenizer().encode("long", true).unwrap();
    let long = greedy(3000);
    let mut first = engine.submit(ids.clone(), &long).unwrap();
    // wait until the first runs, then fill the queue
    assert!(matches!(first.blocking_recv(), Some(Event::Text(_))));
    let second = engine.submit(ids.clone(), &long).unwrap();
    let third = engine.submit(ids.clone(), &long);
    assert!(
        matches!(third, Err(Error::Overloaded(_))),
        "{:?}",
        third.err()
    );
    // dropping both frees the engine for new work
    drop(first);
    drop(second);
    let t0 = std::time::Instant::now();
    while engine.queued() + engine.running() > 0 {
        assert!(
            t0.elapsed().as_secs() < 30,
            "cancelled requests were not freed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut rx = engine.submit(ids, &greedy(3)).unwrap();
    let mut n = 0;
    while let Some(ev) = rx.blocking_recv() {
        if let Event::Done {
            completion_tokens, ..
        } = ev
        {
            n = completion_tokens;
        }
    }
    assert_eq!(n, 3);
}

/// A prompt fed in chunks (`Tuning::prefill_chunk`) reads its earlier chunks back from the paged
/// cache: the same logits at every position as in one pass, alone and in a batch beside an
/// unchunked sequence, and the same greedy tokens through a generator (whose steps feed a chunk
/// at a time, producing no token until the prompt is in).
#[test]
fn chunked_prefill_matches_one_pass() {
    let Some(m) = model() else { return };
    let tok = m.tokenizer();
    let long = tok
        .encode(&"长一点的输入，跨过好几个块。".repeat(12), true)
        .unwrap();
    let short = tok.encode("hi", true).unwrap();
    assert!(
        long.len() > 70,
        "the prompt spans several chunks and KV blocks"
    );
    let mut t = *m.model().tuning();
    t.prefill_chunk = 0;
    let whole = m.with_tuning(t);
    t.prefill_chunk = 7;
    let chunked = m.with_tuning(t);
    let want = whole.logits(&long).unwrap();
    let got = chunked.logits(&long).unwrap();
    assert_eq!(got.dims(), want.dims());
    let d = common::max_abs_diff(&got, &want);
    assert!(d < 1e-4, "chunked logits differ by {d}");
    // in a batch beside a short sequence: last rows as alone
    let inner = chunked.model();
    let (mut ca, mut cb) = (inner.new_cache(), inner.new_cache());
    let out = inner
        .forward_many(&[&long, &short], &mut [&mut ca, &mut cb], Logits::Last)
        .unwrap();
    assert_eq!((ca.len(), cb.len()), (long.len(), short.len()));
    let last = want.narrow(0, long.len() - 1, 1).unwrap();
    let d = common::max_abs_diff(&out[0], &last);
    assert!(d < 1e-4, "chunked last row differs by {d}");
    let alone = whole.logits(&short).unwrap();
    let d = common::max_abs_diff(&out[1], &alone.narrow(0, short.len() - 1, 1).unwrap());
    assert!(d < 1e-5, "the short sequence's row differs by {d}");
    // generation: same ids
    let a = whole.generate_ids(&long, &greedy(12)).unwrap();
    let b = chunked.generate_ids(&long, &greedy(12)).unwrap();
    assert_eq!(a, b);
}

#[test]
fn sequences_of_different_lora_adapters_batch_together() {
    // adapters kept beside the weights: one forward over sequences of adapter a, b, none and a
    // again (a's rows not contiguous) gives each what its adapter's view gives alone
    let Some(fx) = common::fixtures() else { return };
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/peft");
    let opts = LoadOptions {
        dtype: Some(DType::F32),
        adapters: vec![
            ("a".into(), data.join("adapter-a")),
            ("b".into(), data.join("adapter-b")),
        ],
        ..Default::default()
    };
    let m = Model::from_dir(&fx.join("model"), &opts).unwrap();
    let tok = m.tokenizer();
    let texts = ["第一个句子，比较长一点的输入", "hi", "third one", "第四"];
    let names = [Some("a"), Some("b"), None, Some("a")];
    let views: Vec<Model> = names.iter().map(|n| m.with_adapter(*n).unwrap()).collect();
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t, true).unwrap()).collect();
    let mut caches: Vec<_> = views.iter().map(|v| v.model().new_cache()).collect();
    let mut refs: Vec<&mut glm2rs::Cache> = caches.iter_mut().collect();
    let inputs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
    let out = m
        .model()
        .forward_many(&inputs, &mut refs, Logits::All)
        .unwrap();
    let mut differ = 0;
    for ((v, seq), got) in views.iter().zip(&ids).zip(&out) {
        let want = v.logits(seq).unwrap();
        let d = common::max_abs_diff(got, &want);
        assert!(d < 1e-5, "batched logits differ by {d}");
        differ += usize::from(common::max_abs_diff(got, &m.logits(seq).unwrap()) > 1e-3);
    }
    assert_eq!(
        differ, 3,
        "the adapters change the logits of their sequences only"
    );
    assert!(m.with_adapter(Some("c")).is_err());
}
