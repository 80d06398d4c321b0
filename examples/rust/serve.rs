//! A Rust service embedding glm2rs: the library's router (OpenAI API, api.py contract, web page)
//! mounted under `/llm` next to the service's own route, on the service's own tokio runtime.
//! `cargo run --release --features server --example serve -- MODEL_DIR [PORT]`
//! then e.g. `curl localhost:PORT/llm/v1/models` or open `http://localhost:PORT/llm/chat`.

use axum::routing::get;
use axum::Router;
use glm2rs::engine::{Engine, EngineConfig, Event};
use glm2rs::{LoadOptions, Model};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> glm2rs::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: serve MODEL_DIR [PORT]");
    let port: u16 = args
        .next()
        .map_or(8000, |p| p.parse().expect("PORT is a number"));
    let model = Model::from_dir(dir.as_ref(), &LoadOptions::default())?;

    // The engine batches every request of the service; it can also be used directly.
    let engine = Engine::new(model.clone(), EngineConfig::default())?;
    let ids = model
        .tokenizer()
        .encode("[Round 1]\n\n问：你好\n\n答：", true)?;
    let mut events = engine.submit(ids, &Default::default())?;
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Text(t) => print!("{t}"),
            Event::Done {
                completion_tokens, ..
            } => println!("\n[{completion_tokens} tokens]"),
            Event::Logprobs(_) => {}
            Event::Error(e) => eprintln!("error: {e}"),
        }
    }

    let app = Router::new()
        .route("/", get(|| async { "my service; the model is under /llm" }))
        .nest("/llm", glm2rs::server::router(engine, "chatglm2-6b", None));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| glm2rs::Error::InvalidArgument(e.to_string()))?;
    println!("listening on http://127.0.0.1:{port}/llm");
    axum::serve(listener, app)
        .await
        .map_err(|e| glm2rs::Error::Internal(e.to_string()))
}
