//! Conversations: chat templates as transformers renders them, assistant masks equal to
//! `return_assistant_tokens_mask`, refusals of masks that cannot be meant, isolated packing
//! with each example's loss and gradients as alone, and chat at inference.

mod common;

#[path = "../datasets/chat/synth.rs"]
#[allow(dead_code)]
mod synth;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor, Var};
use common::server::Server;
use common::{fixtures, init_tiny, kiln, python_with, repo_root, shared};
use kiln::data::chat::ChatPreset;
use kiln::data::pack::pack_isolated;
use kiln::data::Sequence;
use kiln::model::init::{init_parameter, Preset};
use kiln::recipe::Truncation;
use serde_json::{json, Value};

#[test]
fn bundled_chat_dataset_is_reproducible_from_its_seed() {
    let dir = tempfile::tempdir().unwrap();
    let config = synth::SynthConfig {
        seed: 0,
        train_rows: 2000,
        validation_rows: 200,
    };
    synth::write_dataset(dir.path(), &config).unwrap();
    for file in ["train.jsonl", "validation.jsonl"] {
        let shipped = std::fs::read(repo_root().join("datasets/chat").join(file)).unwrap();
        let fresh = std::fs::read(dir.path().join(file)).unwrap();
        assert!(
            shipped == fresh,
            "datasets/chat/{file} differs from `cargo run --example synth-chat -- --out datasets/chat --seed 0`"
        );
    }
}

/// A recipe over `data` (conversations) with `chat_template` and `loss_on`, the tokenizer at
/// `tokenizer`.
fn chat_recipe(
    out: &Path,
    tokenizer: &Path,
    data: &Path,
    chat_template: &str,
    loss_on: &str,
) -> PathBuf {
    let text = format!(
        "name: chat\n\
         model: {{init: {{preset: tiny}}}}\n\
         tokenizer: {tokenizer}\n\
         data:\n  \
           train: [{{source: {{path: {data}}}, template: chat}}]\n  \
           chat_template: {chat_template}\n  \
           loss_on: {loss_on}\n  \
           seq_len: 512\n  mode: pad\n\
         batch: {{global: 2, micro: 2}}\n\
         steps: 2\n\
         checkpoint: {{dir: {out}/checkpoints}}\n\
         tracking: {{log_dir: {out}/runs}}\n",
        tokenizer = tokenizer.display(),
        data = data.display(),
        chat_template = serde_json::to_string(chat_template).unwrap(),
        out = out.display(),
    );
    std::fs::create_dir_all(out).unwrap();
    let path = out.join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn preview_json(recipe: &Path) -> Vec<Value> {
    let (ok, stdout, stderr) = kiln(&[
        "data",
        "preview",
        recipe.to_str().unwrap(),
        "--json",
        "--n",
        "100",
    ]);
    assert!(ok, "{stderr}");
    stdout
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("origin");
            v
        })
        .collect()
}

#[test]
fn assistant_masks_equal_transformers_for_every_preset_and_a_hub_style_template() {
    let Some(python) = python_with("transformers") else {
        return;
    };
    let Some(tokenizer) = shared("tokenizers/gpt2") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = fixtures().join("chat/conversations.jsonl");
    let hub_style = fixtures().join("chat/zephyr_style.jinja");
    let mut cases: Vec<(String, PathBuf, Vec<&str>)> = ChatPreset::ALL
        .iter()
        .map(|preset| {
            let file = dir.path().join(format!("{}.jinja", preset.name()));
            std::fs::write(&file, preset.template()).unwrap();
            (
                preset.name().to_string(),
                file,
                preset.special_tokens().to_vec(),
            )
        })
        .collect();
    cases.push((
        hub_style.display().to_string(),
        hub_style.clone(),
        Vec::new(),
    ));
    for (chat_template, template_file, special) in &cases {
        for loss_on in ["assistant", "last-assistant"] {
            let out = dir.path().join(format!(
                "{}-{loss_on}",
                Path::new(chat_template)
                    .file_stem()
                    .unwrap()
                    .to_string_lossy()
            ));
            std::fs::create_dir_all(&out).unwrap();
            let recipe = chat_recipe(&out, &tokenizer, &data, chat_template, loss_on);
            let ours = preview_json(&recipe);
            let mut args = vec![
                repo_root()
                    .join("scripts/check_chat_masks.py")
                    .display()
                    .to_string(),
                tokenizer.display().to_string(),
                template_file.display().to_string(),
                data.display().to_string(),
            ];
            for token in special {
                args.extend(["--special".to_string(), token.to_string()]);
            }
            if loss_on == "last-assistant" {
                args.push("--last-assistant".into());
            }
            let output = Command::new(&python).args(&args).output().unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let theirs: Vec<Value> = String::from_utf8_lossy(&output.stdout)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(ours.len(), 5);
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert_eq!(
                    a["input_ids"], b["input_ids"],
                    "{chat_template} row {i}: token ids differ from apply_chat_template's"
                );
                assert_eq!(
                    a["labels"], b["labels"],
                    "{chat_template} ({loss_on}) row {i}: the assistant mask differs from transformers'"
                );
                let trained = a["labels"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|l| **l != -100)
                    .count();
                assert!(trained > 0, "{chat_template} row {i} trains nothing");
            }
        }
    }
}

#[test]
fn masks_that_cannot_be_meant_are_refused_naming_rows_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = PathBuf::from(common::bundled("tokenizer"));
    let data = fixtures().join("chat/conversations.jsonl");
    let stats = |template: &str, name: &str| {
        let out = dir.path().join(name);
        std::fs::create_dir_all(&out).unwrap();
        let recipe = chat_recipe(&out, &tokenizer, &data, template, "assistant");
        kiln(&["data", "stats", recipe.to_str().unwrap()])
    };
    // Generation blocks around nothing: no row trains a token.
    let (ok, _, stderr) = stats(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% if m.role == 'assistant' %}{% generation %}{% endgeneration %}{% endif %}{% endfor %}",
        "none",
    );
    assert!(!ok);
    assert!(
        stderr.contains("data.train: with loss_on: assistant no row trains any token — e.g. ")
            && stderr.contains("conversations.jsonl:line 1 (0 of "),
        "{stderr}"
    );
    // The whole conversation in one generation block per assistant turn's... everything.
    let (ok, _, stderr) = stats(
        "{% for m in messages %}{% generation %}{{ m.role }}: {{ m.content }}\n{% endgeneration %}{% endfor %}",
        "all",
    );
    assert!(!ok);
    assert!(
        stderr.contains("every row trains all of its tokens"),
        "{stderr}"
    );
    // The assistant's words, but not the token that ends the turn.
    let (ok, _, stderr) = stats(
        "{% for m in messages %}{% if m.role == 'assistant' %}A: {% generation %}{{ m.content }}{% endgeneration %}{{ eos_token }}\n{% else %}U: {{ m.content }}\n{% endif %}{% endfor %}",
        "no-stop",
    );
    assert!(!ok);
    assert!(
        stderr.contains("no trained token ends an assistant turn (<|endoftext|>), so the model would never learn to stop"),
        "{stderr}"
    );
    // The same with the eos inside the block is accepted, and stats count trained tokens.
    let (ok, stdout, stderr) = stats(
        "{% for m in messages %}{% if m.role == 'assistant' %}A: {% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}\n{% else %}U: {{ m.content }}\n{% endif %}{% endfor %}",
        "good",
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("trained per example: min "), "{stdout}");
}

#[test]
fn loss_on_and_templates_must_agree_and_bad_rows_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = PathBuf::from(common::bundled("tokenizer"));
    let data = fixtures().join("chat/conversations.jsonl");
    let recipe = chat_recipe(dir.path(), &tokenizer, &data, "chatml", "target");
    let (ok, _, stderr) = kiln(&["recipe", "check", recipe.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("data.loss_on: target splits a prompt from its target, but data.train[0] is conversations (template: chat); use assistant (every assistant turn), last-assistant or all"),
        "{stderr}"
    );
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}\n",
    )
    .unwrap();
    let recipe = chat_recipe(dir.path(), &tokenizer, &bad, "chatml", "assistant");
    let (ok, _, stderr) = kiln(&["data", "stats", recipe.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("bad.jsonl:line 2: messages[0].role is \"bot\"; expected one of system, user, assistant"),
        "{stderr}"
    );
    // A tokenizer without a template, and no data.chat_template.
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("  chat_template: \"chatml\"\n", "");
    std::fs::write(&recipe, text).unwrap();
    let (ok, _, stderr) = kiln(&["data", "stats", recipe.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains(
            "data.chat_template: the conversations need a chat template and the tokenizer"
        ),
        "{stderr}"
    );
}

#[test]
fn sharegpt_and_parquet_conversations_read_as_messages() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = PathBuf::from(common::bundled("tokenizer"));
    let sharegpt = fixtures().join("chat/sharegpt.jsonl");
    let recipe = chat_recipe(dir.path(), &tokenizer, &sharegpt, "chatml", "assistant");
    let (ok, stdout, stderr) = kiln(&["data", "preview", recipe.to_str().unwrap(), "--n", "1"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n⟦Hello!<|im_end|>⟧"),
        "{stdout}"
    );
    // The same conversations as parquet (list<struct<role, content>>), written by pyarrow.
    let Some(python) = python_with("pyarrow") else {
        return;
    };
    let parquet = dir.path().join("chat.parquet");
    let script = r#"
import json, sys, pyarrow as pa, pyarrow.parquet as pq
rows = [json.loads(l) for l in open(sys.argv[1])]
pq.write_table(pa.Table.from_pylist([{"messages": r["messages"]} for r in rows]), sys.argv[2])
"#;
    let jsonl = fixtures().join("chat/conversations.jsonl");
    let status = Command::new(&python)
        .args([
            "-c",
            script,
            jsonl.to_str().unwrap(),
            parquet.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let from_parquet = chat_recipe(
        &dir.path().join("p"),
        &tokenizer,
        &parquet,
        "chatml",
        "assistant",
    );
    let from_jsonl = chat_recipe(
        &dir.path().join("j"),
        &tokenizer,
        &jsonl,
        "chatml",
        "assistant",
    );
    assert_eq!(preview_json(&from_parquet), preview_json(&from_jsonl));
}

/// A tiny random model of `config` as autograd variables.
fn variables(config: &kiln::model::Config) -> Vec<(String, Var)> {
    kiln::model::parameter_shapes(config)
        .into_iter()
        .map(|(name, shape)| {
            let t = init_parameter(config, &name, &shape, 7).unwrap();
            (name, Var::from_tensor(&t).unwrap())
        })
        .collect()
}

fn loss_and_grads(
    config: &kiln::model::Config,
    vars: &[(String, Var)],
    rows: &[Sequence],
    keep: impl Fn(usize) -> bool,
) -> (f64, Vec<Tensor>) {
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let model =
        kiln::model::model_from_parameters(config, &tensors, DType::F32, &Device::Cpu).unwrap();
    let (batch, mut labels) = kiln::data::batch_of(rows, 0, &Device::Cpu).unwrap();
    for (i, label) in labels.iter_mut().enumerate() {
        if !keep(i) {
            *label = -100;
        }
    }
    let loss = model.loss_and_grads(&batch, &labels, 1.0).unwrap().unwrap();
    let grads = vars
        .iter()
        .map(|(name, v)| match loss.get(name, v.as_tensor()).unwrap() {
            Some(g) => g,
            None => v.zeros_like().unwrap(),
        })
        .collect();
    (loss.nll_sum, grads)
}

#[test]
fn isolated_packing_gives_every_example_its_loss_and_gradients_alone() {
    let mut gpt2 = Preset::Tiny.config();
    gpt2.set_vocab_size(96);
    let configs = [
        ("gptj (rotary)", {
            let mut c = Preset::Tiny.config();
            c.set_vocab_size(96);
            c
        }),
        (
            "gpt2 (learned positions)",
            kiln::model::Config::from_json(json!({
                "model_type": "gpt2", "vocab_size": 96, "n_positions": 64, "n_embd": 32,
                "n_layer": 2, "n_head": 4,
            }))
            .unwrap(),
        ),
    ];
    let lens = [9usize, 5, 12, 3];
    let examples: Vec<Sequence> = lens
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let ids = (0..n).map(|i| ((k * 31 + i * 7) % 90 + 1) as u32).collect();
            Sequence::all_trained(ids)
        })
        .collect();
    let (rows, _) =
        pack_isolated(examples.clone(), 32, Truncation::Error, |i| i.to_string()).unwrap();
    assert_eq!(rows.len(), 1, "the 29 tokens fit one row of 32");
    let row = &rows[0];
    for (family, config) in configs {
        let vars = variables(&config);
        let mut worst = (0f64, 0f32);
        for example in &examples {
            // Where the example landed in the row: a segment of its own, whole.
            let start = (0..row.len())
                .filter(|&i| i == 0 || row.segment[i] != row.segment[i - 1])
                .find(|&i| row.ids.get(i..i + example.len()) == Some(&example.ids[..]))
                .expect("each example is in the row, whole");
            assert!(row.segment[start..start + example.len()]
                .iter()
                .all(|&s| s == row.segment[start]));
            let end = start + example.len();
            let (alone_nll, alone) =
                loss_and_grads(&config, &vars, std::slice::from_ref(example), |_| true);
            let (packed_nll, packed) =
                loss_and_grads(&config, &vars, std::slice::from_ref(row), |i| {
                    (start..end).contains(&i)
                });
            let nll_diff = (alone_nll - packed_nll).abs() / alone_nll.abs().max(1e-12);
            let grad_diff = alone
                .iter()
                .zip(&packed)
                .map(|(a, b)| common::max_abs_diff(a, b))
                .fold(0f32, f32::max);
            worst = (worst.0.max(nll_diff), worst.1.max(grad_diff));
        }
        eprintln!(
            "{family}: packed vs alone: loss {:.2e} relative, gradients {:.2e} max",
            worst.0, worst.1
        );
        assert!(worst.0 <= 1e-5, "{family}: loss differs by {:e}", worst.0);
        assert!(
            worst.1 <= 1e-5,
            "{family}: gradients differ by {:e}",
            worst.1
        );
    }
}

/// A tokenizer directory: the real GPT-2 tokenizer with ChatML's tokens and template.
fn chatml_tokenizer(dir: &Path) -> Option<PathBuf> {
    let gpt2 = shared("tokenizers/gpt2")?;
    let mut tokenizer = kiln::tokenizer::TextTokenizer::from_dir(&gpt2).unwrap();
    tokenizer
        .add_special_tokens(ChatPreset::Chatml.special_tokens())
        .unwrap();
    tokenizer.set_chat_template(ChatPreset::Chatml.template());
    let out = dir.join("chatml-tokenizer");
    std::fs::create_dir_all(&out).unwrap();
    tokenizer.save_to(&out).unwrap();
    Some(out)
}

#[test]
fn generation_stops_at_the_end_of_turn_token_as_at_eos() {
    let dir = tempfile::tempdir().unwrap();
    let Some(tokenizer_dir) = chatml_tokenizer(dir.path()) else {
        return;
    };
    let model_dir = dir.path().join("model");
    init_tiny(&model_dir, 1, &tokenizer_dir);
    let model = kiln::model::load_model(&model_dir, DType::F32, &Device::Cpu).unwrap();
    let tokenizer = kiln::tokenizer::TextTokenizer::from_dir(&model_dir).unwrap();
    let prompt = tokenizer.encode("Once upon a time").unwrap();
    let free = kiln::generate::GenerationParams {
        max_new_tokens: 6,
        ..Default::default()
    };
    let free = kiln::generate::generate(
        &model,
        Some(&tokenizer),
        std::slice::from_ref(&prompt),
        &free,
        &mut |_, _| {},
    )
    .unwrap();
    let third = free[0].ids[2];
    let stopping = kiln::generate::GenerationParams {
        max_new_tokens: 6,
        stop_token_ids: vec![third],
        ..Default::default()
    };
    let stopped = kiln::generate::generate(
        &model,
        Some(&tokenizer),
        std::slice::from_ref(&prompt),
        &stopping,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(
        stopped[0].ids,
        free[0].ids[..3],
        "greedy up to the stop token, which is kept"
    );
    assert_eq!(stopped[0].finish_reason, kiln::generate::FinishReason::Eos);
    // min_new_tokens holds back the stop token as it holds back eos.
    let held = kiln::generate::GenerationParams {
        min_new_tokens: 6,
        ..stopping.clone()
    };
    let held = kiln::generate::generate(
        &model,
        Some(&tokenizer),
        std::slice::from_ref(&prompt),
        &held,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(held[0].ids.len(), 6, "{:?}", held[0].ids);
    assert!(!held[0].ids.contains(&third));
    // The template's end-of-turn token is found from the template itself.
    let template = kiln::data::chat::ChatTemplate::of(&tokenizer).unwrap();
    assert_eq!(
        template.end_of_turn(&tokenizer).unwrap(),
        tokenizer.token_id("<|im_end|>")
    );
}

#[test]
fn the_openai_client_chats_with_kiln_serve_streamed_and_not() {
    let Some(python) = python_with("openai") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(tokenizer_dir) = chatml_tokenizer(dir.path()) else {
        return;
    };
    let model = dir.path().join("model");
    init_tiny(&model, 1, &tokenizer_dir);
    let server = Server::start(&model, &["--name", "tiny"]);
    let script = r#"
import json, sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
out = {"object": plain.object, "role": plain.choices[0].message.role,
       "content": plain.choices[0].message.content, "finish_reason": plain.choices[0].finish_reason,
       "prompt_tokens": plain.usage.prompt_tokens, "completion_tokens": plain.usage.completion_tokens}
chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                             temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
out["stream"] = {"objects": sorted({c.object for c in chunks}),
                 "content": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                 "roles": [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role],
                 "finish": [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason],
                 "usage": [c.usage.completion_tokens for c in chunks if c.usage is not None]}
try:
    client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
except openai.BadRequestError as e:
    out["bad_role"] = [e.status_code, e.body["message"]]
print(json.dumps(out))
"#;
    let output = Command::new(&python)
        .args(["-c", script, &format!("http://{}/v1", server.addr)])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(out["object"], "chat.completion");
    assert_eq!(out["role"], "assistant");
    assert_eq!(out["stream"]["objects"], json!(["chat.completion.chunk"]));
    assert_eq!(
        out["stream"]["content"], out["content"],
        "the stream says what the plain answer said"
    );
    assert_eq!(
        out["stream"]["roles"],
        json!(["assistant"]),
        "the first chunk names the role, once"
    );
    assert_eq!(
        out["stream"]["finish"],
        json!([out["finish_reason"].clone()])
    );
    assert_eq!(
        out["stream"]["usage"],
        json!([out["completion_tokens"].clone()])
    );
    assert_eq!(
        out["bad_role"],
        json!([
            400,
            "messages[0].role: \"robot\" is not supported (expected system, user or assistant)"
        ])
    );
    // The prompt is the template's rendering with the assistant's prompt.
    let tokenizer = kiln::tokenizer::TextTokenizer::from_dir(&model).unwrap();
    let rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(
        out["prompt_tokens"],
        tokenizer.encode(rendered).unwrap().len()
    );
    // `kiln generate --chat` answers the same (greedy).
    let (ok, stdout, stderr) = kiln(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "--system",
        "Be brief.",
        "--prompt",
        "Hello there",
        "--max-new-tokens",
        "6",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout.trim_end_matches('\n'),
        out["content"].as_str().unwrap()
    );
}

#[test]
fn a_chat_checkpoint_with_added_tokens_loads_in_transformers_and_answers_the_same() {
    let Some(python) = python_with("transformers") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A model whose vocabulary has no room for ChatML's tokens: training resizes it.
    let base = dir.path().join("base");
    let (ok, _, stderr) = kiln(&[
        "init",
        "--preset",
        "tiny",
        "--out",
        base.to_str().unwrap(),
        "--seed",
        "3",
        "--tokenizer",
        &common::bundled("tokenizer"),
        "--vocab-size",
        "1024",
    ]);
    assert!(ok, "{stderr}");
    let recipe = dir.path().join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            "name: chat\n\
             model: {{from: {base}}}\n\
             data:\n  \
               train: [{{source: {{path: {data}}}, template: chat, limit: 64}}]\n  \
               chat_template: chatml\n  loss_on: assistant\n  seq_len: 256\n  mode: pack\n  packing: isolated\n\
             optimizer: {{lr: 3.0e-3}}\n\
             batch: {{global: 8, micro: 8}}\n\
             steps: 5\n\
             checkpoint: {{dir: {out}/checkpoints}}\n\
             tracking: {{log_dir: {out}/runs}}\n",
            base = base.display(),
            data = repo_root().join("datasets/chat/train.jsonl").display(),
            out = dir.path().display(),
        ),
    )
    .unwrap();
    // LoRA could neither train nor save the new rows: refused, saying so.
    let lora = dir.path().join("lora.yaml");
    let text = std::fs::read_to_string(&recipe).unwrap() + "lora: {r: 4, alpha: 8}\n";
    std::fs::write(&lora, text).unwrap();
    let (ok, _, stderr) = kiln(&["train", lora.to_str().unwrap(), "--quiet"]);
    assert!(!ok);
    assert!(
        stderr.contains(
            "the tokenizer needs 1026 embedding rows (data.chat_template added tokens) but"
        ) && stderr.contains("has 1024: a LoRA adapter keeps the embedding frozen"),
        "{stderr}"
    );
    let (ok, _, stderr) = kiln(&["train", recipe.to_str().unwrap(), "--quiet"]);
    assert!(ok, "{stderr}");
    let checkpoint = dir.path().join("checkpoints/chat/step-5");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["vocab_size"], 1026,
        "the embedding grew by ChatML's two tokens"
    );
    let (ok, ours, stderr) = kiln(&[
        "generate",
        "--model",
        checkpoint.to_str().unwrap(),
        "--chat",
        "--prompt",
        "What is the capital of Peru?",
        "--max-new-tokens",
        "12",
    ]);
    assert!(ok, "{stderr}");
    let script = r#"
import json, sys
from transformers import AutoTokenizer, AutoModelForCausalLM
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
messages = [{"role": "user", "content": "What is the capital of Peru?"}]
enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**enc, max_new_tokens=12, do_sample=False,
                     eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")])
new = out[0][enc["input_ids"].shape[1]:]
print(json.dumps({"text": tok.decode(new, skip_special_tokens=True),
                  "special": tok.convert_ids_to_tokens([1024, 1025]),
                  "prompt": enc["input_ids"][0].tolist()}))
"#;
    let output = Command::new(&python)
        .args(["-c", script, checkpoint.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let theirs: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(theirs["special"], json!(["<|im_start|>", "<|im_end|>"]));
    let tokenizer = kiln::tokenizer::TextTokenizer::from_dir(&checkpoint).unwrap();
    let template = kiln::data::chat::ChatTemplate::of(&tokenizer).unwrap();
    let messages = [kiln::data::chat::Message {
        role: "user".into(),
        content: "What is the capital of Peru?".into(),
    }];
    let prompt = tokenizer
        .encode(&template.render(&messages, true).unwrap())
        .unwrap();
    assert_eq!(
        theirs["prompt"],
        json!(prompt),
        "the same prompt tokens as apply_chat_template"
    );
    assert_eq!(
        ours.trim_end_matches('\n'),
        theirs["text"].as_str().unwrap()
    );
}
