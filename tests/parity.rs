//! Golden parity against what the official implementation computed on tiny-glm2.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, ids, max_abs_diff, read_json};
use glm2rs::{build_prompt, GenerationConfig, LoadOptions, Model, SamplingConfig};
use std::path::Path;

fn load(dir: &Path) -> Model {
    let opts = LoadOptions {
        dtype: Some(DType::F32),
        ..Default::default()
    };
    Model::from_dir(dir, &opts).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn check_forward(model: &Model, fx: &Path) {
    let npz: std::collections::HashMap<String, Tensor> =
        Tensor::read_npz(fx.join("golden/forward.npz"))
            .unwrap()
            .into_iter()
            .collect();
    for i in 0..3 {
        let ids: Vec<u32> = npz[&format!("ids_{i}")]
            .to_dtype(DType::I64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect();
        let want = npz[&format!("logits_{i}")].to_dtype(DType::F32).unwrap();
        let got = model.logits(&ids).unwrap();
        let got = if want.dim(0).unwrap() == 1 {
            got.narrow(0, ids.len() - 1, 1).unwrap()
        } else {
            got
        };
        assert_eq!(got.dims(), want.dims(), "case {i}");
        let d = max_abs_diff(&got, &want);
        assert!(
            d < 1e-4,
            "{}: logits case {i} differ by {d}",
            model.dir().display()
        );
    }
}

fn check_greedy_chat(model: &Model, fx: &Path) {
    let golden = read_json(fx.join("golden/generate.json"));
    for turn in golden["chat"].as_array().unwrap() {
        let history: Vec<(String, String)> = turn["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p[0].as_str().unwrap().to_string(),
                    p[1].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let prompt = build_prompt(turn["query"].as_str().unwrap(), &history);
        let input = model.tokenizer().encode(&prompt, true).unwrap();
        let cfg = GenerationConfig {
            max_new_tokens: Some(turn["max_new_tokens"].as_u64().unwrap() as usize),
            sampling: SamplingConfig::default(),
            ..Default::default()
        };
        let out = model.generate_ids(&input, &cfg).unwrap();
        assert_eq!(
            out,
            ids(&turn["output_ids"]),
            "greedy ids for {:?}",
            turn["query"]
        );
        let text = model.tokenizer().decode(&out).unwrap();
        assert_eq!(text.trim(), turn["response"].as_str().unwrap().trim());
    }
}

#[test]
fn sharded_bin_matches_official_logits_and_greedy_ids() {
    let Some(fx) = fixtures() else { return };
    let model = load(&fx.join("model"));
    check_forward(&model, &fx);
    check_greedy_chat(&model, &fx);
}

#[test]
fn safetensors_matches_official_logits_and_greedy_ids() {
    let Some(fx) = fixtures() else { return };
    let model = load(&fx.join("model-safetensors"));
    check_forward(&model, &fx);
    check_greedy_chat(&model, &fx);
}

#[test]
fn ptuning_prefixes_match_official_logits_and_greedy_ids() {
    // Both official PrefixEncoder layouts (with and without prefix_projection) on top of model/.
    let Some(fx) = fixtures() else { return };
    for (dir, golden, logits) in [
        ("ptuning-checkpoint", "ptuning.json", "ptuning_logits.npy"),
        (
            "ptuning-checkpoint-projection",
            "ptuning_projection.json",
            "ptuning_projection_logits.npy",
        ),
    ] {
        let opts = LoadOptions {
            dtype: Some(DType::F32),
            prefix_checkpoint: Some(fx.join(dir)),
            ..Default::default()
        };
        let model =
            Model::from_dir(&fx.join("model"), &opts).unwrap_or_else(|e| panic!("{dir}: {e}"));
        let g = read_json(fx.join("golden").join(golden));
        assert_eq!(
            model.model().prefix_len() as u64,
            g["pre_seq_len"].as_u64().unwrap()
        );
        let prompt = ids(&g["prompt_ids"]);
        let want = Tensor::read_npy(fx.join("golden").join(logits))
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap();
        let got = model
            .logits(&prompt)
            .unwrap()
            .get(prompt.len() - 1)
            .unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-4, "{dir}: last logits differ by {d}");
        let want_ids = ids(&g["greedy_output_ids"]);
        let cfg = GenerationConfig {
            max_new_tokens: Some(want_ids.len()),
            sampling: SamplingConfig::default(),
            ..Default::default()
        };
        assert_eq!(
            model.generate_ids(&prompt, &cfg).unwrap(),
            want_ids,
            "{dir}"
        );
    }
}

#[test]
fn tokenizer_matches_official_on_every_case() {
    let Some(fx) = fixtures() else { return };
    let tok = glm2rs::Tokenizer::from_spm_file(&fx.join("model/tokenizer.model"), false).unwrap();
    let cases = read_json(fx.join("golden/tokenizer.json"));
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 327);
    let mut failures = vec![];
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let with = tok.encode(text, true).unwrap();
        let without = tok.encode(text, false).unwrap();
        let decoded = tok.decode(&without).unwrap();
        if with != ids(&c["input_ids"])
            || without != ids(&c["ids_no_special"])
            || decoded != c["decoded"].as_str().unwrap()
        {
            failures.push(format!(
                "{text:?}: got {without:?} / {decoded:?}, want {:?} / {:?}",
                c["ids_no_special"], c["decoded"]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 327 cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn prompts_match_official_build_prompt() {
    let Some(fx) = fixtures() else { return };
    let tok = glm2rs::Tokenizer::from_spm_file(&fx.join("model/tokenizer.model"), false).unwrap();
    for p in read_json(fx.join("golden/prompts.json"))
        .as_array()
        .unwrap()
    {
        let history: Vec<(String, String)> = p["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h[0].as_str().unwrap().to_string(),
                    h[1].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let prompt = build_prompt(p["query"].as_str().unwrap(), &history);
        assert_eq!(prompt, p["prompt"].as_str().unwrap());
        assert_eq!(tok.encode(&prompt, true).unwrap(), ids(&p["input_ids"]));
    }
}

#[test]
fn cached_decoding_equals_full_recompute() {
    // Logits of each step with the KV cache equal a fresh forward over the whole sequence (whose
    // last layer computes every row).
    let Some(fx) = fixtures() else { return };
    let model = load(&fx.join("model-safetensors"));
    let ids = model
        .tokenizer()
        .encode(&build_prompt("你好", &[]), true)
        .unwrap();
    let m = model.model();
    let mut cache = m.new_cache();
    let dev = Device::Cpu;
    let split = 5;
    let first = Tensor::new(&ids[..split], &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    // the prompt's last row alone (the last layer attends only the last query) as in every row
    let got = m
        .forward(&first, &mut cache, glm2rs::Logits::Last)
        .unwrap()
        .flatten_all()
        .unwrap();
    let want = model.logits(&ids[..split]).unwrap().get(split - 1).unwrap();
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-5, "the prompt's last logits: {d}");
    for n in split..ids.len() {
        let step = Tensor::new(&ids[n..n + 1], &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let got = m
            .forward(&step, &mut cache, glm2rs::Logits::Last)
            .unwrap()
            .flatten_all()
            .unwrap();
        let want = model.logits(&ids[..n + 1]).unwrap().get(n).unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-5, "step {n}: {d}");
    }
}

#[test]
fn text_stream_holds_back_split_characters_and_joins_exactly() {
    let Some(fx) = fixtures() else { return };
    let tok = glm2rs::Tokenizer::from_spm_file(&fx.join("model/tokenizer.model"), false).unwrap();
    let ids = tok.encode("你好👋!", false).unwrap();
    let mut ts = glm2rs::TextStream::new();
    let pieces: Vec<String> = ids.iter().map(|&id| ts.push(&tok, id).unwrap()).collect();
    let rest = ts.finish(&tok).unwrap();
    assert_eq!(pieces.concat() + &rest, "你好👋!");
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
    // a complete character followed by a stray continuation byte keeps the character
    let mut ids2 = tok.encode("你", false).unwrap();
    ids2.push(3 + 0xA0);
    assert_eq!(tok.decode(&ids2).unwrap(), "你\u{FFFD}");
}
