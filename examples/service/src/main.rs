//! A minimal service built on the glm2rs crate: one route of its own, and glm2rs's OpenAI API,
//! official `api.py` contract and web page under `/llm`, all sharing one batching engine.
//!   cargo run --release -- MODEL_DIR [PORT]     then: curl localhost:PORT/llm/v1/models

use axum::{routing::get, Router};
use glm2rs::engine::{Engine, EngineConfig};
use glm2rs::{LoadOptions, Model};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: glm2rs-service-example MODEL_DIR [PORT]")?;
    let port: u16 = args.next().map_or(Ok(8000), |p| p.parse())?;
    let model = Model::from_dir(dir.as_ref(), &LoadOptions::default())?;
    let engine = Engine::new(model, EngineConfig::default())?;
    let app = Router::new()
        .route("/hello", get(|| async { "my service" }))
        .nest("/llm", glm2rs::server::router(engine, "chatglm2-6b", None));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("http://127.0.0.1:{port}/llm/v1/models");
    axum::serve(listener, app).await?;
    Ok(())
}
