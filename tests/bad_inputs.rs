//! Bad files are errors, never aborts or garbage: tables of corrupted model directories,
//! tokenizers, LoRA adapters, datasets and training checkpoints. Each case starts from a good
//! copy made with the CLI, corrupts one thing, runs the command that reads it, and expects a
//! non-zero exit without a panic or a signal, an error naming the file and the field, tensor or
//! row at fault, and every file under the directory byte for byte as it was.
//!
//! Each case's error is printed (`cargo test --test bad_inputs -- --nocapture`) so that the
//! README can quote them.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

/// One corruption of a fixture directory and what reading it must say.
struct Case {
    name: &'static str,
    corrupt: fn(&Path),
    /// Run in the corrupted copy; outputs go to `..` (outside the compared tree).
    args: &'static [&'static str],
    /// Every one must appear in stderr: the file's path as given, then the field, tensor or row.
    expected: &'static [&'static str],
}

const SCORE: &[&str] = &[
    "score",
    "--model",
    "model",
    "--input",
    "input.jsonl",
    "--output",
    "../scores.jsonl",
];
const SCORE_SHARDED: &[&str] = &[
    "score",
    "--model",
    "sharded",
    "--input",
    "input.jsonl",
    "--output",
    "../scores.jsonl",
];
const GENERATE: &[&str] = &[
    "generate",
    "--model",
    "model",
    "--prompt",
    "The premise",
    "--max-new-tokens",
    "3",
    "--min-new-tokens",
    "1",
];
const MERGE: &[&str] = &[
    "merge",
    "--base",
    "model",
    "--adapter",
    "adapter",
    "--out",
    "../merged",
];
const GENERATE_WITH_ADAPTER: &[&str] = &[
    "generate",
    "--model",
    "model",
    "--adapter",
    "adapter",
    "--prompt",
    "The premise",
    "--max-new-tokens",
    "2",
];
const STATS: &[&str] = &["data", "stats", "recipe.yaml"];
const STATS_PARQUET: &[&str] = &["data", "stats", "recipe-parquet.yaml"];
const RESUME: &[&str] = &["train", "recipe.yaml", "--resume", "latest", "--quiet"];
const RESUME_DIR: &[&str] = &[
    "train",
    "recipe.yaml",
    "--resume",
    "checkpoints/run/step-2",
    "--quiet",
];

#[test]
fn corrupted_model_directories_and_tokenizers_are_named_errors() {
    let scratch = tempfile::tempdir().unwrap();
    let fixture = experiment(scratch.path());
    init_model(&fixture.join("sharded"), &["--max-shard-bytes", "1000000"]);
    assert!(
        fixture
            .join("sharded/model.safetensors.index.json")
            .is_file(),
        "the fixture is sharded"
    );
    let cases = [
        Case {
            name: "truncated safetensors",
            corrupt: |dir| truncate_half(&dir.join("model/model.safetensors")),
            args: SCORE,
            expected: &["model/model.safetensors: not a valid safetensors file"],
        },
        Case {
            name: "header lies about a tensor's offsets",
            corrupt: |dir| {
                edit_header(&dir.join("model/model.safetensors"), |header| {
                    let offsets = &mut header["lm_head.bias"]["data_offsets"];
                    offsets[1] = (offsets[1].as_u64().unwrap() + 4096).into();
                })
            },
            args: GENERATE,
            expected: &["model/model.safetensors", "not a valid safetensors file"],
        },
        Case {
            name: "integer weights where the config says float",
            corrupt: |dir| {
                edit_header(&dir.join("model/model.safetensors"), |header| {
                    header["transformer.h.0.attn.q_proj.weight"]["dtype"] = "I32".into();
                })
            },
            args: GENERATE,
            expected: &[
                "model/model.safetensors",
                "tensor transformer.h.0.attn.q_proj.weight is stored as I32",
            ],
        },
        Case {
            name: "missing tensor",
            corrupt: |dir| {
                edit_tensors(&dir.join("model/model.safetensors"), |tensors| {
                    tensors.remove("transformer.h.1.mlp.fc_out.bias");
                })
            },
            args: SCORE,
            expected: &[
                "model/model.safetensors",
                "tensor transformer.h.1.mlp.fc_out.bias is missing",
            ],
        },
        Case {
            name: "tensor of the wrong shape",
            corrupt: |dir| {
                edit_tensors(&dir.join("model/model.safetensors"), |tensors| {
                    let wrong = Tensor::zeros(1000, DType::F32, &Device::Cpu).unwrap();
                    tensors.insert("lm_head.bias".into(), wrong);
                })
            },
            args: SCORE,
            expected: &[
                "model/model.safetensors",
                "tensor lm_head.bias has shape [1000], but config.json implies [1024]",
            ],
        },
        Case {
            name: "eos_token_id outside the vocabulary (score)",
            corrupt: |dir| set_json(&dir.join("model/config.json"), "eos_token_id", 60000),
            args: SCORE,
            expected: &[
                "model/config.json",
                "eos_token_id 60000 is outside the vocabulary (vocab_size 1024)",
            ],
        },
        Case {
            name: "eos_token_id outside the vocabulary (generate, min_new_tokens 1)",
            corrupt: |dir| set_json(&dir.join("model/config.json"), "eos_token_id", 60000),
            args: GENERATE,
            expected: &[
                "model/config.json",
                "eos_token_id 60000 is outside the vocabulary (vocab_size 1024)",
            ],
        },
        Case {
            name: "pad_token_id outside the vocabulary",
            corrupt: |dir| set_json(&dir.join("model/config.json"), "pad_token_id", 4096),
            args: GENERATE,
            expected: &[
                "model/config.json",
                "pad_token_id 4096 is outside the vocabulary (vocab_size 1024)",
            ],
        },
        Case {
            name: "n_positions beyond any machine's memory",
            corrupt: |dir| {
                set_json(
                    &dir.join("model/config.json"),
                    "n_positions",
                    1_000_000_000_000_000u64,
                )
            },
            args: GENERATE,
            expected: &[
                "model/config.json",
                "n_positions 1000000000000000 needs a 96.00 PB rotary table",
            ],
        },
        Case {
            name: "n_layer beyond any machine's memory",
            corrupt: |dir| {
                set_json(
                    &dir.join("model/config.json"),
                    "n_layer",
                    1_000_000_000_000_000u64,
                )
            },
            args: SCORE,
            expected: &[
                "model/config.json",
                "n_layer 1000000000000000 alone implies",
            ],
        },
        Case {
            name: "config field of the wrong type",
            corrupt: |dir| set_json(&dir.join("model/config.json"), "n_head", "four"),
            args: SCORE,
            expected: &["model/config.json", "n_head: invalid type: string \"four\""],
        },
        Case {
            name: "config field missing",
            corrupt: |dir| {
                edit_json(&dir.join("model/config.json"), |config| {
                    config.as_object_mut().unwrap().remove("n_embd");
                })
            },
            args: GENERATE,
            expected: &["model/config.json", "missing field `n_embd`"],
        },
        Case {
            name: "config.json is not JSON",
            corrupt: |dir| truncate_half(&dir.join("model/config.json")),
            args: SCORE,
            expected: &["model/config.json", "not valid JSON"],
        },
        Case {
            name: "shard index names a file outside the directory",
            corrupt: |dir| move_first_shard_outside(&dir.join("sharded")),
            args: SCORE_SHARDED,
            expected: &[
                "sharded/model.safetensors.index.json",
                "\"../outside/model-00001-of-",
                "not a file inside sharded",
            ],
        },
        Case {
            name: "shard listed in the index is missing",
            corrupt: |dir| {
                let shard = shard_names(&dir.join("sharded")).pop().unwrap();
                std::fs::remove_file(dir.join("sharded").join(shard)).unwrap();
            },
            args: SCORE_SHARDED,
            expected: &[
                "sharded/model.safetensors.index.json",
                "is listed in the index but missing",
            ],
        },
        Case {
            name: "tokenizer.json is not JSON",
            corrupt: |dir| truncate_half(&dir.join("model/tokenizer.json")),
            args: GENERATE,
            expected: &["model/tokenizer.json", "not a valid tokenizer"],
        },
        Case {
            name: "tokenizer.json merges a token it does not have",
            corrupt: |dir| {
                edit_json(&dir.join("model/tokenizer.json"), |tokenizer| {
                    let merges = tokenizer["model"]["merges"].as_array_mut().unwrap();
                    merges.push(serde_json::json!(["notatoken", "alsonot"]));
                })
            },
            args: SCORE,
            expected: &[
                "model/tokenizer.json",
                "not a valid tokenizer",
                "out of vocabulary",
            ],
        },
        Case {
            name: "tokenizer with more ids than the model has rows",
            corrupt: |dir| {
                edit_json(&dir.join("model/tokenizer.json"), |tokenizer| {
                    let added = tokenizer["added_tokens"].as_array_mut().unwrap();
                    added.push(serde_json::json!({
                        "id": 1024, "content": "<|extra|>", "single_word": false,
                        "lstrip": false, "rstrip": false, "normalized": false, "special": true
                    }));
                })
            },
            args: GENERATE,
            expected: &[
                "tokenizer model produces ids up to 1024",
                "1024 embedding rows",
            ],
        },
    ];
    check_cases(&fixture, &[SCORE, GENERATE, SCORE_SHARDED], &cases);
}

#[test]
fn corrupted_adapters_are_named_errors() {
    let scratch = tempfile::tempdir().unwrap();
    let fixture = experiment(scratch.path());
    append(
        &fixture.join("recipe.yaml"),
        "lora: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}\n",
    );
    train(&fixture);
    std::fs::rename(
        fixture.join("checkpoints/run/step-2"),
        fixture.join("adapter"),
    )
    .unwrap();
    let cases = [
        Case {
            name: "adapter rank that does not fit its tensors",
            corrupt: |dir| set_json(&dir.join("adapter/adapter_config.json"), "r", 8),
            args: MERGE,
            expected: &[
                "adapter adapter does not fit base model model",
                "base_model.model.transformer.h.0.attn.q_proj.lora_A.weight has shape [4, 128], \
                 but r = 8",
            ],
        },
        Case {
            name: "adapter tensor of the wrong shape",
            corrupt: |dir| {
                edit_tensors(&dir.join("adapter/adapter_model.safetensors"), |tensors| {
                    let wrong = Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap();
                    let name = "base_model.model.transformer.h.1.attn.v_proj.lora_A.weight";
                    tensors.insert(name.into(), wrong);
                })
            },
            args: GENERATE_WITH_ADAPTER,
            expected: &[
                "applying adapter adapter to model",
                "base_model.model.transformer.h.1.attn.v_proj.lora_A.weight has shape [4, 64]",
            ],
        },
        Case {
            name: "integer adapter weights",
            corrupt: |dir| {
                edit_header(&dir.join("adapter/adapter_model.safetensors"), |header| {
                    let name = "base_model.model.transformer.h.0.attn.q_proj.lora_A.weight";
                    header[name]["dtype"] = "I32".into();
                })
            },
            args: MERGE,
            expected: &[
                "adapter/adapter_model.safetensors",
                "tensor base_model.model.transformer.h.0.attn.q_proj.lora_A.weight is stored \
                 as I32",
            ],
        },
        Case {
            name: "adapter tensor for a layer the model does not have",
            corrupt: |dir| {
                edit_tensors(&dir.join("adapter/adapter_model.safetensors"), |tensors| {
                    let from = "base_model.model.transformer.h.1.attn.q_proj.lora_A.weight";
                    let tensor = tensors.remove(from).unwrap();
                    let to = "base_model.model.transformer.h.7.attn.q_proj.lora_A.weight";
                    tensors.insert(to.into(), tensor);
                })
            },
            args: MERGE,
            expected: &["has no layer transformer.h.7.attn.q_proj"],
        },
        Case {
            name: "adapter A matrix without its B",
            corrupt: |dir| {
                edit_tensors(&dir.join("adapter/adapter_model.safetensors"), |tensors| {
                    tensors.remove("base_model.model.transformer.h.0.attn.v_proj.lora_B.weight");
                })
            },
            args: MERGE,
            expected: &["transformer.h.0.attn.v_proj.lora_A.weight but no lora_B.weight"],
        },
        Case {
            name: "adapter_config.json is not JSON",
            corrupt: |dir| truncate_half(&dir.join("adapter/adapter_config.json")),
            args: GENERATE_WITH_ADAPTER,
            expected: &["adapter/adapter_config.json", "not a PEFT LoRA config"],
        },
        Case {
            name: "truncated adapter weights",
            corrupt: |dir| truncate_half(&dir.join("adapter/adapter_model.safetensors")),
            args: MERGE,
            expected: &[
                "adapter/adapter_model.safetensors",
                "cannot read the adapter's weights",
            ],
        },
    ];
    check_cases(&fixture, &[MERGE, GENERATE_WITH_ADAPTER], &cases);
}

#[test]
fn corrupted_datasets_are_named_errors() {
    let scratch = tempfile::tempdir().unwrap();
    let fixture = experiment(scratch.path());
    let rows = jsonl_rows(&fixture.join("data/train.jsonl"));
    write_nli_parquet(&fixture.join("data/train.parquet"), &rows);
    let parquet_recipe = std::fs::read_to_string(fixture.join("recipe.yaml"))
        .unwrap()
        .replace("data/train.jsonl", "data/train.parquet");
    std::fs::write(fixture.join("recipe-parquet.yaml"), parquet_recipe).unwrap();
    let cases = [
        Case {
            name: "jsonl row without a field the template reads",
            corrupt: |dir| {
                edit_jsonl_row(&dir.join("data/train.jsonl"), 2, |row| {
                    row.as_object_mut().unwrap().remove("hypothesis");
                })
            },
            args: STATS,
            expected: &[
                "data/train.jsonl:line 3",
                "no column \"hypothesis\" in this row",
            ],
        },
        Case {
            name: "jsonl label of the wrong type",
            corrupt: |dir| {
                edit_jsonl_row(&dir.join("data/train.jsonl"), 2, |row| {
                    row["label"] = "yes".into()
                })
            },
            args: STATS,
            expected: &[
                "data/train.jsonl:line 3",
                "unknown label \"yes\" in column \"label\"",
            ],
        },
        Case {
            name: "jsonl label outside the label map",
            corrupt: |dir| {
                edit_jsonl_row(&dir.join("data/train.jsonl"), 4, |row| {
                    row["label"] = 7.into()
                })
            },
            args: STATS,
            expected: &["data/train.jsonl:line 5", "unknown label 7"],
        },
        Case {
            name: "jsonl row that is not JSON",
            corrupt: |dir| {
                let path = dir.join("data/train.jsonl");
                let text = std::fs::read_to_string(&path).unwrap();
                let mut lines: Vec<&str> = text.lines().collect();
                lines[3] = &lines[3][..40];
                std::fs::write(&path, lines.join("\n") + "\n").unwrap();
            },
            args: STATS,
            expected: &["data/train.jsonl:line 4", "malformed JSON"],
        },
        Case {
            name: "missing data file",
            corrupt: |dir| std::fs::remove_file(dir.join("data/validation.jsonl")).unwrap(),
            args: STATS,
            expected: &["data/validation.jsonl: cannot open"],
        },
        Case {
            name: "truncated parquet",
            corrupt: |dir| truncate_half(&dir.join("data/train.parquet")),
            args: STATS_PARQUET,
            expected: &["data/train.parquet", "unreadable Parquet"],
        },
        Case {
            name: "parquet row with a null field",
            corrupt: |dir| {
                let path = dir.join("data/train.parquet");
                let mut rows = jsonl_rows(&dir.join("data/train.jsonl"));
                rows[2]["premise"] = serde_json::Value::Null;
                write_nli_parquet(&path, &rows);
            },
            args: STATS_PARQUET,
            expected: &["data/train.parquet:row 3", "\"premise\" is null"],
        },
    ];
    check_cases(&fixture, &[STATS, STATS_PARQUET], &cases);
}

#[test]
fn corrupted_checkpoints_are_named_errors() {
    let scratch = tempfile::tempdir().unwrap();
    let fixture = experiment(scratch.path());
    train(&fixture);
    let state = "checkpoints/run/step-2/trainer_state.json";
    assert!(fixture.join(state).is_file(), "the run checkpointed step 2");
    let cases = [
        Case {
            name: "trainer_state.json is not JSON",
            corrupt: |dir| truncate_half(&dir.join("checkpoints/run/step-2/trainer_state.json")),
            args: RESUME,
            expected: &[
                "checkpoints/run: no complete checkpoint to resume from",
                "checkpoints/run/step-2/trainer_state.json: not a valid trainer state",
            ],
        },
        Case {
            name: "trainer_state.json field of the wrong type",
            corrupt: |dir| {
                set_json(
                    &dir.join("checkpoints/run/step-2/trainer_state.json"),
                    "optimizer_steps",
                    "two",
                )
            },
            args: RESUME_DIR,
            expected: &[
                "checkpoints/run/step-2/trainer_state.json: not a valid trainer state",
                "invalid type: string \"two\"",
            ],
        },
        Case {
            name: "trainer_state.json tampered step",
            corrupt: |dir| {
                set_json(
                    &dir.join("checkpoints/run/step-2/trainer_state.json"),
                    "step",
                    7,
                )
            },
            args: RESUME,
            expected: &[
                "checkpoints/run/step-2/trainer_state.json: step is 7, but the checkpoint \
                 directory is step-2",
            ],
        },
        Case {
            name: "weights changed after the checkpoint was written",
            corrupt: |dir| flip_last_byte(&dir.join("checkpoints/run/step-2/model.safetensors")),
            args: RESUME,
            expected: &[
                "checkpoints/run/step-2/model.safetensors: sha256 does not match \
                 trainer_state.json",
            ],
        },
        Case {
            name: "optimizer state changed after the checkpoint was written",
            corrupt: |dir| {
                flip_last_byte(&dir.join("checkpoints/run/step-2/optimizer.safetensors"))
            },
            args: RESUME_DIR,
            expected: &[
                "checkpoints/run/step-2/optimizer.safetensors: sha256 does not match \
                 trainer_state.json",
            ],
        },
        Case {
            name: "truncated checkpoint weights",
            corrupt: |dir| truncate_half(&dir.join("checkpoints/run/step-2/model.safetensors")),
            args: RESUME,
            expected: &[
                "checkpoints/run/step-2/model.safetensors: size is",
                "bytes, trainer_state.json says",
            ],
        },
        Case {
            name: "checkpoint file missing",
            corrupt: |dir| {
                std::fs::remove_file(dir.join("checkpoints/run/step-2/optimizer.safetensors"))
                    .unwrap()
            },
            args: RESUME,
            expected: &["checkpoints/run/step-2/optimizer.safetensors: file is missing"],
        },
        Case {
            name: "trainer_state.json digest tampered",
            corrupt: |dir| {
                edit_json(
                    &dir.join("checkpoints/run/step-2/trainer_state.json"),
                    |state| state["files"]["config.json"]["sha256"] = "0".repeat(64).into(),
                )
            },
            args: RESUME,
            expected: &["checkpoints/run/step-2/config.json: sha256 does not match"],
        },
    ];
    check_cases(&fixture, &[RESUME], &cases);
}

/// Runs every case on its own copy of `fixture`, after checking that each of `controls` succeeds
/// on an untouched copy (so that the errors come from the corruption, not from the copy).
fn check_cases(fixture: &Path, controls: &[&[&str]], cases: &[Case]) {
    let scratch = fixture.parent().unwrap().join("cases");
    for (i, args) in controls.iter().enumerate() {
        let dir = scratch.join(format!("control-{i}/exp"));
        copy_tree(fixture, &dir);
        let (status, stderr) = run_kiln(&dir, args);
        assert!(status.success(), "kiln {args:?} on a good copy: {stderr}");
    }
    let mut problems = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let dir = scratch.join(format!("case-{i}/exp"));
        copy_tree(fixture, &dir);
        (case.corrupt)(&dir);
        let before = tree_digest(&dir);
        let (status, stderr) = run_kiln(&dir, case.args);
        let message = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or("(no error line)");
        eprintln!("{}: kiln {} → {message}", case.name, case.args.join(" "));
        let mut wrong = Vec::new();
        if status.success() {
            wrong.push("it succeeded".to_string());
        }
        if status.code().is_none() {
            wrong.push(format!("it was killed by a signal ({status})"));
        }
        if status.code() == Some(101) || stderr.contains("panicked at") {
            wrong.push("it panicked".to_string());
        }
        for expected in case.expected {
            if !stderr.contains(expected) {
                wrong.push(format!("stderr lacks {expected:?}"));
            }
        }
        let after = tree_digest(&dir);
        if after != before {
            wrong.push(format!(
                "files changed: {:?}",
                changed_files(&before, &after)
            ));
        }
        if !wrong.is_empty() {
            problems.push(format!(
                "{}: {}\n  stderr: {}",
                case.name,
                wrong.join("; "),
                stderr.trim()
            ));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// `kiln args` in `dir`: its exit status and stderr.
fn run_kiln(dir: &Path, args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command.args(args).current_dir(dir);
    if args[0] == "train" {
        command.args(["--threads", "2"]);
    }
    let output = command.output().unwrap();
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `root/fixture`: a tiny GPT-J with the bundled tokenizer (`model`), a slice of the bundled
/// NLI data (`data`), a recipe over both with relative paths (`recipe.yaml`, two steps and one
/// checkpoint at the end) and texts to score (`input.jsonl`).
fn experiment(root: &Path) -> PathBuf {
    let dir = root.join("fixture");
    init_model(&dir.join("model"), &[]);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    for (file, rows) in [("train.jsonl", 48), ("validation.jsonl", 8)] {
        let text = std::fs::read_to_string(common::bundled(file)).unwrap();
        let head: Vec<&str> = text.lines().take(rows).collect();
        std::fs::write(dir.join("data").join(file), head.join("\n") + "\n").unwrap();
    }
    std::fs::write(
        dir.join("recipe.yaml"),
        "name: run\n\
         seed: 3\n\
         model: {from: model}\n\
         data:\n  \
           train: [{source: {path: data/train.jsonl}, template: mnli}]\n  \
           eval: [{source: {path: data/validation.jsonl}, template: mnli}]\n  \
           seq_len: 64\n  mode: pad\n  loss_on: target\n\
         optimizer: {lr: 2.0e-3}\n\
         batch: {global: 4, micro: 4}\n\
         steps: 2\n\
         checkpoint: {every: 2, dir: checkpoints}\n\
         tracking: {log_dir: runs}\n",
    )
    .unwrap();
    // Two lengths, so that scoring pads one row (with the eos id).
    std::fs::write(
        dir.join("input.jsonl"),
        "{\"text\": \"The premise is short.\"}\n{\"text\": \"A longer text, whose tokens \
         outnumber the first one's by a few.\"}\n",
    )
    .unwrap();
    dir
}

fn init_model(out: &Path, extra: &[&str]) {
    let tokenizer = common::bundled("tokenizer");
    let mut args = vec![
        "init",
        "--preset",
        "tiny",
        "--vocab-size",
        "1024",
        "--seed",
        "5",
        "--tokenizer",
        &tokenizer,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    let (ok, _, stderr) = common::kiln(&args);
    assert!(ok, "{stderr}");
}

fn train(dir: &Path) {
    let (status, stderr) = run_kiln(dir, &["train", "recipe.yaml", "--quiet"]);
    assert!(status.success(), "{stderr}");
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// sha256 of every file under `dir`, by path relative to it (directories listed too, so that a
/// new empty one counts as a change).
fn tree_digest(dir: &Path) -> BTreeMap<String, String> {
    let mut digests = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).unwrap() {
            let path = entry.unwrap().path();
            let relative = path.strip_prefix(dir).unwrap().display().to_string();
            if path.is_dir() {
                digests.insert(relative + "/", String::new());
                pending.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                digests.insert(relative, hex::encode(Sha256::digest(&bytes)));
            }
        }
    }
    digests
}

fn changed_files(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut paths: Vec<String> = before.keys().chain(after.keys()).cloned().collect();
    paths.sort();
    paths.dedup();
    paths.retain(|p| before.get(p) != after.get(p));
    paths
}

fn truncate_half(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
}

/// Same size, different content: only the digest can tell.
fn flip_last_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    *bytes.last_mut().unwrap() ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

fn set_json(path: &Path, key: &str, value: impl Into<serde_json::Value>) {
    edit_json(path, |json| json[key] = value.into());
}

fn append(path: &Path, text: &str) {
    let mut content = std::fs::read_to_string(path).unwrap();
    content.push_str(text);
    std::fs::write(path, content).unwrap();
}

/// Rewrites a safetensors header (the tensors' data stays as it was): what a file whose header
/// lies looks like.
fn edit_header(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    edit(&mut header);
    let mut header_bytes = serde_json::to_vec(&header).unwrap();
    while !header_bytes.len().is_multiple_of(8) {
        header_bytes.push(b' ');
    }
    let mut out = (header_bytes.len() as u64).to_le_bytes().to_vec();
    out.extend(header_bytes);
    out.extend(&bytes[8 + header_len..]);
    std::fs::write(path, out).unwrap();
}

/// Rewrites a safetensors file with its tensors edited: a consistent file holding the wrong
/// tensors.
fn edit_tensors(path: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut tensors = common::load_tensors(path);
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, path).unwrap();
}

/// The shard files an index names, sorted.
fn shard_names(dir: &Path) -> Vec<String> {
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let mut names: Vec<String> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Moves the first shard next to the model directory and points the index at it there: a good
/// file, so only the confinement of shard names can refuse it.
fn move_first_shard_outside(model: &Path) {
    let first = shard_names(model).remove(0);
    let outside = model.parent().unwrap().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::rename(model.join(&first), outside.join(&first)).unwrap();
    edit_json(&model.join("model.safetensors.index.json"), |index| {
        for file in index["weight_map"].as_object_mut().unwrap().values_mut() {
            if file.as_str() == Some(first.as_str()) {
                *file = format!("../outside/{first}").into();
            }
        }
    });
}

fn jsonl_rows(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn edit_jsonl_row(path: &Path, index: usize, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut rows = jsonl_rows(path);
    edit(&mut rows[index]);
    let lines: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// The NLI rows as Parquet: premise and hypothesis strings (nullable), the label an integer.
fn write_nli_parquet(path: &Path, rows: &[serde_json::Value]) {
    use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    let text = |key: &str| -> ArrayRef {
        Arc::new(StringArray::from(
            rows.iter().map(|r| r[key].as_str()).collect::<Vec<_>>(),
        ))
    };
    let labels: ArrayRef = Arc::new(Int64Array::from(
        rows.iter()
            .map(|r| r["label"].as_i64().unwrap())
            .collect::<Vec<_>>(),
    ));
    let batch = RecordBatch::try_from_iter([
        ("premise", text("premise")),
        ("hypothesis", text("hypothesis")),
        ("label", labels),
    ])
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

/// A kiln built without `cuda` asked for a GPU says so, for training and for inference, rather
/// than a driver or loader error; `cuda:x` is a named syntax error. (A CUDA build on a machine
/// without a driver is checked by scripts/gpu-bundle.sh with its driver stub.)
#[cfg(not(feature = "cuda"))]
#[test]
fn a_gpu_device_without_the_cuda_feature_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("model");
    init_model(&model, &[]);
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart.yaml");
    let recipe = recipe.to_str().unwrap();
    let log_dir = format!("tracking.log_dir={}", root.path().join("runs").display());
    let checkpoints = format!("checkpoint.dir={}", root.path().join("ckpt").display());
    let train = [
        "train",
        recipe,
        "--set",
        "device=cuda",
        "--set",
        &log_dir,
        "--set",
        &checkpoints,
    ];
    let model = model.to_str().unwrap();
    let generate = [
        "generate", "--model", model, "--prompt", "a", "--device", "cuda:1",
    ];
    for args in [&train[..], &generate[..]] {
        let (status, stderr) = run_kiln(root.path(), args);
        assert!(!status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains("is not available: this kiln binary was built without CUDA support"),
            "{args:?}: {stderr}"
        );
    }
    let (status, stderr) = run_kiln(
        root.path(),
        &[
            "generate", "--model", model, "--prompt", "a", "--device", "cuda:x",
        ],
    );
    assert!(!status.success());
    assert!(
        stderr.contains("device \"cuda:x\": expected cuda:N"),
        "{stderr}"
    );
}
