//! Load a model directory and stream an answer from Rust:
//! `cargo run --release --example generate -- MODEL_DIR [QUESTION]`

use glm2rs::{build_prompt, GenerationConfig, LoadOptions, Model};
use std::io::Write;
use std::time::Instant;

fn main() -> glm2rs::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: generate MODEL_DIR [QUESTION]");
    let question = args.next().unwrap_or_else(|| "你好".to_string());
    let model = Model::from_dir(dir.as_ref(), &LoadOptions::default())?;
    let cfg = GenerationConfig {
        max_new_tokens: Some(64),
        ..Default::default()
    };
    let mut gen = model.generator_for_prompt(&build_prompt(&question, &[]), &cfg)?;
    let start = Instant::now();
    while let Some(piece) = gen.next_text()? {
        print!("{piece}");
        std::io::stdout().flush().ok();
    }
    let n = gen.generated_ids().len();
    println!(
        "\n[{n} tokens, {:.1} tokens/s]",
        n as f64 / start.elapsed().as_secs_f64()
    );
    Ok(())
}
