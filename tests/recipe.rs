//! Recipes: parsing with locations, `--set` overrides, validation, derived values, and every
//! shipped recipe passing `kiln recipe check`.

mod common;
mod hub_server;

use std::path::{Path, PathBuf};

use kiln::recipe::{self, BatchMode, Warmup};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const BASE: &str = "\
name: t
model:
  init: {preset: tiny}
tokenizer: tok
data:
  train:
    - source: {path: train.jsonl}
      template: mnli
  seq_len: 32
batch:
  global: 8
  micro: 2
  replicas: 2
steps: 100
";

fn parse(text: &str, sets: &[&str]) -> anyhow::Result<recipe::Recipe> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    recipe::parse(text, Path::new("r.yaml"), &sets)
}

fn error(text: &str, sets: &[&str]) -> String {
    format!("{:#}", parse(text, sets).unwrap_err())
}

#[test]
fn defaults_fill_everything_not_written() {
    let r = parse(BASE, &[]).unwrap();
    assert_eq!(r.data.mode, BatchMode::Pack);
    assert_eq!(r.optimizer.lr, 1e-4);
    assert_eq!(r.optimizer.betas, [0.9, 0.999]);
    assert_eq!(r.optimizer.grad_clip, Some(1.0));
    assert_eq!(r.device, "cpu");
    assert!(r.data.shuffle);
    assert_eq!(r.accumulation_steps(), 2);
    assert_eq!(r.tokens_per_step(), 8 * 32);
}

#[test]
fn yaml_errors_give_file_line_column_and_what_was_expected() {
    let e = error(&BASE.replace("  micro: 2", "  micro: 2\n  mikro: 3"), &[]);
    assert!(e.starts_with("r.yaml:13:3: batch: unknown field `mikro`, expected one of `global`, `micro`, `replicas`"), "{e}");
    let e = error(&BASE.replace("seq_len: 32", "seq_len: many"), &[]);
    assert!(
        e.starts_with("r.yaml:9:12: data.seq_len: invalid type: string \"many\", expected usize"),
        "{e}"
    );
    let e = error("name: t\nmodel: [\n", &[]);
    assert!(
        e.starts_with("r.yaml:3:1: did not find expected node content"),
        "{e}"
    );
    let e = error(
        &BASE.replace("steps: 100\n", "").replace("name: t\n", ""),
        &[],
    );
    assert!(e.contains("missing field `name`"), "{e}");
    let e = error(
        &BASE.replace("template: mnli", "template: {prompt: x, tagret: y}"),
        &[],
    );
    assert!(
        e.starts_with("r.yaml:8:")
            && e.contains("unknown field `tagret`, expected `prompt` or `target`"),
        "{e}"
    );
    let e = error("", &[]);
    assert!(e.contains("r.yaml: the recipe is empty"), "{e}");
}

#[test]
fn overrides_set_values_create_sections_and_name_bad_paths() {
    let r = parse(
        BASE,
        &[
            "optimizer.lr=3e-5",
            "optimizer.betas=[0.8, 0.9]",
            "data.train.0.limit=10",
            "schedule.warmup=0.1",
        ],
    )
    .unwrap();
    assert_eq!(r.optimizer.lr, 3e-5);
    assert_eq!(r.optimizer.betas, [0.8, 0.9]);
    assert_eq!(r.data.train[0].limit, Some(10));
    assert_eq!(r.schedule.warmup, Warmup::Fraction(0.1));
    let r = parse(BASE, &["steps=null", "epochs=2"]).unwrap();
    assert_eq!((r.steps, r.epochs), (None, Some(2.0)));

    let e = error(BASE, &["optimizer.lrr=1"]);
    assert!(
        e.contains("--set optimizer.lrr=1: unknown field `lrr`, expected one of `lr`"),
        "{e}"
    );
    let e = error(BASE, &["data.seq_len=abc"]);
    assert!(
        e.contains("--set data.seq_len=abc: invalid type: string \"abc\", expected usize"),
        "{e}"
    );
    let e = error(BASE, &["data.train.3.limit=1"]);
    assert!(
        e.contains("--set data.train.3.limit=1") && e.contains("`data.train` has 1 entries"),
        "{e}"
    );
    let e = error(BASE, &["name.first=x"]);
    assert!(
        e.contains("--set name.first=x") && e.contains("`name` is the string \"t\""),
        "{e}"
    );
    let e = error(BASE, &["optimizer.lr"]);
    assert!(
        e.contains("--set optimizer.lr: expected key.path=value"),
        "{e}"
    );
    let e = error(BASE, &["optimizer..lr=1"]);
    assert!(
        e.contains("--set optimizer..lr=1: `optimizer..lr` is not a key path"),
        "{e}"
    );
    // A mistake in the file is still reported at its line, whatever the overrides.
    let e = error(
        &BASE.replace("seq_len: 32", "seq_len: x"),
        &["optimizer.lr=1e-5"],
    );
    assert!(
        e.starts_with("r.yaml:9:12: data.seq_len: invalid type: string \"x\", expected usize"),
        "{e}"
    );
    // An override that fixes the file does not hide another override's mistake.
    let e = error(
        &BASE.replace("name: t\n", ""),
        &["name=x", "data.seq_len=abc"],
    );
    assert!(
        e.starts_with("--set data.seq_len=abc: invalid type: string \"abc\", expected usize"),
        "{e}"
    );
    // Overrides are validated like the file.
    let e = error(BASE, &["batch.micro=3"]);
    assert!(
        e.contains("batch.global: 8 is not divisible by batch.micro × batch.replicas = 3 × 2 = 6"),
        "{e}"
    );
}

#[test]
fn validation_explains_each_rule() {
    let cases: &[(&[&str], &str)] = &[
        (&["model.from=gpt2"], "model: set exactly one of `from`"),
        (&["model.init=null"], "model: set exactly one of `from`"),
        (
            &["epochs=1"],
            "steps / epochs: set exactly one of them, not both",
        ),
        (&["steps=null"], "steps / epochs: set exactly one of them"),
        (&["steps=0"], "steps: must be at least 1"),
        (
            &["steps=null", "epochs=-1"],
            "epochs: must be a positive number",
        ),
        (
            &["batch.global=10"],
            "batch.global: 10 is not divisible by batch.micro × batch.replicas = 2 × 2 = 4",
        ),
        (
            &["optimizer.lr=0"],
            "optimizer.lr: must be a positive number",
        ),
        (
            &["optimizer.betas=[0.9, 1.0]"],
            "optimizer.betas[1]: must be in [0, 1), found 1",
        ),
        (
            &["optimizer.eps=0"],
            "optimizer.eps: must be a positive number",
        ),
        (
            &["optimizer.weight_decay=-0.1"],
            "optimizer.weight_decay: must be zero or positive",
        ),
        (
            &["optimizer.grad_clip=0"],
            "optimizer.grad_clip: must be positive",
        ),
        (
            &["schedule.warmup=1.0"],
            "schedule.warmup: a fraction of all steps must be in [0, 1), found 1",
        ),
        (
            &["schedule.warmup=100"],
            "100 warmup steps leave no training steps",
        ),
        (
            &["schedule.min_lr=1"],
            "schedule.min_lr: must be in [0, optimizer.lr",
        ),
        (&["data.seq_len=0"], "data.seq_len: must be at least 1"),
        (&["data.train=[]"], "data.train: needs at least one dataset"),
        (
            &["data.train.0.template=mnlii"],
            "data.train[0].template: unknown preset \"mnlii\"",
        ),
        (
            &["data.train.0.template={prompt: \"{a\"}"],
            "data.train[0].template: prompt: unclosed `{`",
        ),
        (
            &["data.train.0.source.hub=nyu-mll/glue"],
            "data.train[0].source: set exactly one of `path` and `hub`",
        ),
        (
            &["data.train.0.source.split=train"],
            "source.split: only applies to Hub datasets",
        ),
        (
            &["data.train.0.source.path=a.xlsx"],
            "data.train[0].source.format: cannot tell the format",
        ),
        (
            &["data.train.0.source.format=xml"],
            "data.train[0].source.format: unknown format \"xml\"",
        ),
        (
            &["data.train.0.limit=0"],
            "data.train[0].limit: must be at least 1",
        ),
        (&["device=gpu"], "device: expected cpu, cuda or cuda:N"),
        (
            &["eval.early_stopping={metric: accuracy, patience: 0}"],
            "eval.early_stopping.patience: must be at least 1",
        ),
        (
            &["eval.early_stopping={metric: accuracy, patience: 2}"],
            "eval.early_stopping: needs eval.every > 0",
        ),
        (
            &[
                "checkpoint.keep_best=accuracy",
                "eval.every=10",
                "checkpoint.every=15",
            ],
            "checkpoint.keep_best: needs checkpoint.every (15) to be a positive multiple of \
             eval.every (10)",
        ),
        (&["eval.task=mnli"], "eval.task: mnli needs an eval dataset"),
        (&["name=a/b"], "name: \"a/b\" is used as a directory name"),
    ];
    for (sets, expected) in cases {
        let e = error(BASE, sets);
        assert!(
            e.starts_with("r.yaml: ") && e.contains(expected),
            "{sets:?}: {e}"
        );
    }
    // All problems at once.
    let e = error(BASE, &["optimizer.lr=0", "data.seq_len=0"]);
    assert!(
        e.contains("2 problems")
            && e.contains("optimizer.lr: must be a positive number")
            && e.contains("data.seq_len: must be at least 1"),
        "{e}"
    );
}

#[test]
fn derived_steps_come_from_epochs_and_warmup_fractions_round_up() {
    let r = parse(BASE, &["schedule.warmup=0.006", "steps=300"]).unwrap();
    assert_eq!(r.total_steps(17_762), 300);
    assert_eq!(r.warmup_steps(300), 2);
    let r = parse(BASE, &["steps=null", "epochs=1.5"]).unwrap();
    // ceil(1.5 × 101 / 8)
    assert_eq!(r.total_steps(101), 19);
}

fn write_fixture_recipe(dir: &Path, recipe: &str) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut rows = String::new();
    for i in 0..40 {
        rows.push_str(&format!(
            "{{\"premise\": \"Maria bought a red map number {i}.\", \"hypothesis\": \"Maria bought a map.\", \"label\": {}}}\n",
            i % 3
        ));
    }
    std::fs::write(data.join("train.jsonl"), rows).unwrap();
    let recipes = dir.join("recipes");
    std::fs::create_dir_all(&recipes).unwrap();
    let path = recipes.join("r.yaml");
    std::fs::write(&path, recipe).unwrap();
    path
}

fn tokenizer_path() -> String {
    repo().join("datasets/nli/tokenizer").display().to_string()
}

#[test]
fn check_reads_data_relative_to_the_recipe_and_counts_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = BASE
        .replace(
            "tokenizer: tok",
            &format!("tokenizer: {}", tokenizer_path()),
        )
        .replace("path: train.jsonl", "path: ../data/train.jsonl")
        .replace("steps: 100", "epochs: 2")
        .replace("seq_len: 32", "seq_len: 32\n  mode: pad");
    let path = write_fixture_recipe(dir.path(), &recipe);
    let resolved = kiln::data::check(&path, &[]).unwrap();
    assert_eq!(resolved.derived.sequences_per_epoch, Some(40));
    assert_eq!(resolved.derived.total_steps, Some(10));
    assert_eq!(resolved.derived.accumulation_steps, 2);
    assert_eq!(resolved.derived.tokens_per_step, 256);
    assert!(resolved.derived.notes.is_empty());

    // The binary prints the whole recipe with derived values, from any working directory.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "recipe",
            "check",
            &path.display().to_string(),
            "--set",
            "optimizer.lr=0.001",
        ])
        .current_dir("/")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml: serde_norway::Value = serde_norway::from_str(&stdout).unwrap();
    assert_eq!(yaml["optimizer"]["lr"].as_f64(), Some(0.001));
    assert_eq!(yaml["optimizer"]["eps"].as_f64(), Some(1e-8));
    assert_eq!(yaml["derived"]["total_steps"].as_u64(), Some(10));
    assert_eq!(yaml["derived"]["warmup_steps"].as_u64(), Some(0));

    // A placeholder with no column is caught here, before any training.
    let bad = recipe.replace(
        "template: mnli",
        "template: {prompt: \"{premise} {question}\", target: \" {label}\"}",
    );
    std::fs::write(&path, bad).unwrap();
    let (ok, _, stderr) = common::kiln(&["recipe", "check", &path.display().to_string()]);
    assert!(!ok);
    assert!(
        stderr.contains("r.yaml: data.train[0].template")
            && stderr.contains("column \"question\"")
            && stderr.contains("columns: hypothesis, label, premise"),
        "{stderr}"
    );
    // A missing data file names it.
    std::fs::remove_file(dir.path().join("data/train.jsonl")).unwrap();
    let (ok, _, stderr) = common::kiln(&["recipe", "check", &path.display().to_string()]);
    assert!(
        !ok && stderr.contains("train.jsonl: cannot open"),
        "{stderr}"
    );
}

/// The GLUE MNLI splits as the Hub's parquet conversion lays them out (`mnli/{split}-00000-of-00001.parquet`,
/// columns premise, hypothesis, label, idx), from the rows of a ../shared JSONL file.
fn glue_parquet(rows: &Path) -> Vec<u8> {
    use arrow_array::{ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray};
    let records: Vec<serde_json::Value> = std::fs::read_to_string(rows)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let text = |key: &str| -> ArrayRef {
        std::sync::Arc::new(StringArray::from_iter_values(
            records.iter().map(|r| r[key].as_str().unwrap().to_string()),
        ))
    };
    let batch = RecordBatch::try_from_iter([
        ("premise", text("premise")),
        ("hypothesis", text("hypothesis")),
        (
            "label",
            std::sync::Arc::new(Int64Array::from_iter_values(
                records.iter().map(|r| r["label"].as_i64().unwrap()),
            )) as ArrayRef,
        ),
        (
            "idx",
            std::sync::Arc::new(Int32Array::from_iter_values(0..records.len() as i32)) as ArrayRef,
        ),
    ])
    .unwrap();
    let mut bytes = Vec::new();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    bytes
}

/// A local Hub stand-in (tests/hub_server) holding what the shipped recipes name: `nyu-mll/glue`
/// (MNLI from ../shared: its 19,999 training pairs as `train`, validation_matched as
/// `validation_mismatched`), and the configs of `EleutherAI/gpt-j-6b` (on `main` and on its
/// `float16` branch, as the recipes ask), `openai-community/gpt2` and `EleutherAI/pythia-160m` as the Hub has them,
/// each with the real GPT-2 BPE (GPT-J's own; a stand-in for Pythia's) and no weights, which
/// `kiln recipe check` never fetches.
fn hub_with_the_recipes_repos() -> Option<hub_server::HubServer> {
    let (train, validation, tokenizer) = (
        common::shared("data/mnli/train.jsonl")?,
        common::shared("data/mnli/validation_matched.jsonl")?,
        common::shared("tokenizers/gpt2")?,
    );
    let server = hub_server::HubServer::start(hub_server::ServerOptions::default());
    let (train, validation) = (glue_parquet(&train), glue_parquet(&validation));
    server.seed(
        "datasets/nyu-mll/glue",
        false,
        &[
            ("mnli/train-00000-of-00001.parquet", &train, true),
            (
                "mnli/validation_mismatched-00000-of-00001.parquet",
                &validation,
                true,
            ),
        ],
    );
    let tokenizer_files: Vec<(String, Vec<u8>)> = [
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
    ]
    .iter()
    .map(|name| {
        (
            name.to_string(),
            std::fs::read(tokenizer.join(name)).unwrap(),
        )
    })
    .collect();
    let gptj = serde_json::json!({"model_type": "gptj", "architectures": ["GPTJForCausalLM"],
        "n_embd": 4096, "n_layer": 28, "n_head": 16, "n_positions": 2048, "rotary_dim": 64,
        "vocab_size": 50400, "n_inner": null, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256,
        "tie_word_embeddings": false, "torch_dtype": "float16"});
    let gpt2 = serde_json::json!({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "n_ctx": 1024,
        "vocab_size": 50257, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "bos_token_id": 50256, "eos_token_id": 50256});
    let pythia = serde_json::json!({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"],
        "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "max_position_embeddings": 2048, "rotary_pct": 0.25,
        "rotary_emb_base": 10000, "vocab_size": 50304, "hidden_act": "gelu",
        "layer_norm_eps": 1e-5, "use_parallel_residual": true, "tie_word_embeddings": false,
        "bos_token_id": 0, "eos_token_id": 0});
    for (repo, branch, config) in [
        ("models/EleutherAI/gpt-j-6b", "main", gptj.clone()),
        ("models/EleutherAI/gpt-j-6b", "float16", gptj),
        ("models/openai-community/gpt2", "main", gpt2),
        ("models/EleutherAI/pythia-160m", "main", pythia),
    ] {
        let config = config.to_string().into_bytes();
        let mut files: Vec<(&str, &[u8], bool)> = vec![("config.json", &config, false)];
        files.extend(
            tokenizer_files
                .iter()
                .map(|(n, b)| (n.as_str(), b.as_slice(), false)),
        );
        server.seed_branch(repo, false, branch, &files);
    }
    Some(server)
}

/// Every shipped recipe passes `kiln recipe check` in full: the recipes that name Hub models and
/// datasets against the local Hub stand-in, so that their data is read, tokenized and counted and
/// their memory estimated, as a user with the network would see it; nothing is left as a note.
#[test]
fn every_shipped_recipe_passes_check() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(repo().join("recipes")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            names.push(path);
        }
    }
    names.sort();
    assert!(names.len() >= 6, "{names:?}");
    let Some(server) = hub_with_the_recipes_repos() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    // A recipe that starts from another's checkpoint (recipes/dpo.yaml from
    // preference-sft.yaml's) is checked against a model of the same shape in its place, as a
    // clean checkout has not trained the first yet.
    let earlier = home.path().join("earlier-checkpoint");
    common::init_tiny(&earlier, 0, &repo().join("datasets/nli/tokenizer"));
    let mut sequences = std::collections::BTreeMap::new();
    for path in names {
        let text = std::fs::read_to_string(&path).unwrap();
        let mut args = vec![
            "recipe".to_string(),
            "check".into(),
            path.display().to_string(),
        ];
        if text.contains("from: ../checkpoints/") {
            args.extend(["--set".into(), format!("model.from={}", earlier.display())]);
        }
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&args)
            .env("HF_ENDPOINT", &server.url)
            .env("HF_HOME", home.path())
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_TOKEN")
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        assert!(output.status.success(), "{}: {stderr}", path.display());
        let resolved: serde_json::Value = serde_norway::from_str(&stdout).unwrap();
        let derived = &resolved["derived"];
        assert_eq!(
            derived["notes"],
            serde_json::Value::Null,
            "{}: checks left undone: {}",
            path.display(),
            derived["notes"]
        );
        let count = derived["sequences_per_epoch"]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: {derived}", path.display()));
        assert!(count > 0, "{}", path.display());
        assert!(
            derived["memory_estimate"]["total"].as_u64().unwrap() > 0,
            "{}: {derived}",
            path.display()
        );
        sequences.insert(
            path.file_stem().unwrap().to_string_lossy().into_owned(),
            count,
        );
    }
    // Graphcore's format packed into 1,024-token rows: what HF's run_clm makes of the same rows
    // (tests/fixtures/mnli/blocks.json, from scripts/make_fixtures.py).
    let blocks: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("mnli/blocks.json")).unwrap(),
    )
    .unwrap();
    for recipe in ["gptj-6b-mnli", "gptj-6b-mnli-lora"] {
        assert_eq!(
            Some(&blocks["blocks"].as_u64().unwrap()),
            sequences.get(recipe),
            "{recipe}"
        );
    }
}

#[test]
fn gptj_mnli_recipe_mirrors_graphcore() {
    let r = recipe::load(&repo().join("recipes/gptj-6b-mnli.yaml"), &[]).unwrap();
    assert_eq!(r.model.from.as_deref(), Some("EleutherAI/gpt-j-6b"));
    assert_eq!(r.model.revision.as_deref(), Some("float16"));
    assert_eq!(
        (
            r.optimizer.lr,
            r.optimizer.betas,
            r.optimizer.eps,
            r.optimizer.weight_decay
        ),
        (5e-6, [0.9, 0.999], 1e-6, 0.0)
    );
    assert_eq!(r.schedule.warmup, Warmup::Fraction(0.006));
    assert_eq!(r.schedule.warmup_from, 1e-7);
    assert_eq!(
        (r.batch.global, r.steps, r.data.seq_len, r.data.mode),
        (128, Some(300), 1024, BatchMode::Pack)
    );
    assert_eq!(
        r.data.eval[0].source.split.as_deref(),
        Some("validation_mismatched")
    );
}
