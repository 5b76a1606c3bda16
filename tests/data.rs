//! The data pipeline: sources, templates, tokenization with loss masks, packing, padding,
//! shuffling, and the bundled NLI dataset.

mod common;
// The generator is an example (`cargo run --example synth-nli`); its `main` and helpers the
// test does not call are unused here.
#[allow(dead_code)]
#[path = "../datasets/nli/synth.rs"]
mod synth;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{
    ArrayRef, BooleanArray, DictionaryArray, Float32Array, Float64Array, Int16Array, Int32Array,
    Int64Array, Int8Array, LargeStringArray, RecordBatch, StringArray, UInt16Array, UInt32Array,
    UInt64Array, UInt8Array,
};
use arrow_schema::{DataType, Field, Schema};
use kiln::data::pack::{one_per_row, pack};
use kiln::data::source::{hub_parquet_files, load_records, read_file, Format, Records};
use kiln::data::template::Caster;
use kiln::data::{tokenize_example, Rendered, Sequence, SequenceStream};
use kiln::recipe::{DatasetSpec, FewShotSpec, LossOn, SourceSpec, TemplateSpec, Truncation};
use kiln::tokenizer::TextTokenizer;
use serde_json::json;
use sha2::Digest;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn nli_tokenizer() -> TextTokenizer {
    TextTokenizer::from_dir(&repo().join("datasets/nli/tokenizer")).unwrap()
}

fn local(path: &Path) -> SourceSpec {
    SourceSpec {
        path: Some(path.to_path_buf()),
        format: None,
        hub: None,
        config: None,
        split: None,
        revision: None,
    }
}

fn dataset(template: TemplateSpec) -> DatasetSpec {
    DatasetSpec {
        source: local(Path::new("unused")),
        template,
        label_map: None,
        columns: BTreeMap::new(),
        limit: None,
        few_shot: None,
    }
}

fn preset(name: &str) -> TemplateSpec {
    TemplateSpec::Preset(name.into())
}

fn records(origin: &str, rows: Vec<serde_json::Value>) -> Records {
    let mut columns: Vec<String> = Vec::new();
    let rows: Vec<_> = rows
        .into_iter()
        .map(|r| r.as_object().unwrap().clone())
        .collect();
    for row in &rows {
        for k in row.keys() {
            if !columns.contains(k) {
                columns.push(k.clone());
            }
        }
    }
    Records {
        origin: origin.into(),
        columns,
        positions: (1..=rows.len()).collect(),
        rows,
        unit: "line",
        ..Default::default()
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

const GRAPHCORE_EXAMPLE: &str = "mnli hypothesis: Product and geography are what make cream skimming work. \
premise: Conceptually cream skimming has two basic dimensions - product and geography. target: neutral<|endoftext|>";

fn cream_skimming() -> Records {
    records(
        "x.jsonl",
        vec![json!({
            "premise": "Conceptually cream skimming has two basic dimensions - product and geography.",
            "hypothesis": "Product and geography are what make cream skimming work.",
            "label": 1
        })],
    )
}

#[test]
fn mnli_preset_renders_graphcores_format_byte_for_byte() {
    let rows = cream_skimming();
    let caster = Caster::new(&dataset(preset("mnli")), &rows).unwrap();
    let rendered = caster.render(0).unwrap();
    assert_eq!(rendered.text(), GRAPHCORE_EXAMPLE);
    assert_eq!(rendered.target, " neutral<|endoftext|>");
    assert_eq!(rendered.label.as_deref(), Some("neutral"));
    assert_eq!(rendered.origin, "x.jsonl:line 1");
}

#[test]
fn mnli_example_tokenizes_to_the_known_gpt2_ids() {
    let Some(dir) = common::shared("tokenizers/gpt2") else {
        return;
    };
    let tokenizer = TextTokenizer::from_dir(&dir).unwrap();
    let rows = cream_skimming();
    let rendered = Caster::new(&dataset(preset("mnli")), &rows)
        .unwrap()
        .render(0)
        .unwrap();
    for loss_on in [LossOn::All, LossOn::Target] {
        let seq = tokenize_example(&tokenizer, &rendered, loss_on).unwrap();
        assert_eq!(seq.ids.len(), 35);
        assert_eq!(
            seq.ids[..10],
            [10295, 4528, 14078, 25, 8721, 290, 27876, 389, 644, 787]
        );
        assert_eq!(seq.ids[32..], [25, 8500, 50256]);
    }
    let target = tokenize_example(&tokenizer, &rendered, LossOn::Target).unwrap();
    // " neutral" and <|endoftext|> are the target; the ":" before them is prompt.
    let trained: Vec<u32> = target
        .ids
        .iter()
        .zip(&target.loss_mask)
        .filter(|(_, &m)| m)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(trained, [8500, 50256]);
    assert_eq!(target.labels(35).iter().filter(|&&l| l != -100).count(), 2);
}

#[test]
fn loss_on_target_masks_prompt_tokens_and_keeps_full_text_ids() {
    let tokenizer = nli_tokenizer();
    let rows = records(
        "r",
        vec![
            json!({"premise": "Maria bought a red map.", "hypothesis": "Maria bought a map.", "label": 0}),
        ],
    );
    let rendered = Caster::new(&dataset(preset("mnli")), &rows)
        .unwrap()
        .render(0)
        .unwrap();
    let all = tokenize_example(&tokenizer, &rendered, LossOn::All).unwrap();
    let target = tokenize_example(&tokenizer, &rendered, LossOn::Target).unwrap();
    assert_eq!(all.ids, target.ids);
    assert_eq!(all.ids, tokenizer.encode(&rendered.text()).unwrap());
    assert!(all.loss_mask.iter().all(|&m| m));
    let first_target = target.loss_mask.iter().position(|&m| m).unwrap();
    assert!(target.loss_mask[first_target..].iter().all(|&m| m));
    let decoded = tokenizer
        .decode(&target.ids[first_target..], false)
        .unwrap();
    assert_eq!(decoded, " entailment<|endoftext|>");
}

#[test]
fn a_token_spanning_the_split_counts_as_target_and_ids_match_the_whole_text() {
    let Some(dir) = common::shared("tokenizers/gpt2") else {
        return;
    };
    let tokenizer = TextTokenizer::from_dir(&dir).unwrap();
    // "hel" + "lo world": tokenized apart, "hel"/"lo" differ from the single token "hello".
    let rows = records("r", vec![json!({"a": "hel", "b": "lo world"})]);
    let spec = dataset(TemplateSpec::Custom {
        prompt: "{a}".into(),
        target: "{b}".into(),
    });
    let rendered = Caster::new(&spec, &rows).unwrap().render(0).unwrap();
    let seq = tokenize_example(&tokenizer, &rendered, LossOn::Target).unwrap();
    let whole = tokenizer.encode("hello world").unwrap();
    let mut apart = tokenizer.encode("hel").unwrap();
    apart.extend(tokenizer.encode("lo world").unwrap());
    assert_ne!(
        whole, apart,
        "the example must be one where separate tokenization differs"
    );
    assert_eq!(seq.ids, whole);
    assert_eq!(seq.loss_mask, vec![true; whole.len()]);
}

#[test]
fn presets_render_as_documented() {
    let rows = records("s", vec![json!({"text": "Great soup.", "label": 1})]);
    let r = Caster::new(&dataset(preset("sentiment")), &rows)
        .unwrap()
        .render(0)
        .unwrap();
    assert_eq!(
        (r.prompt.as_str(), r.target.as_str()),
        ("Review: Great soup.\nSentiment:", " positive<|endoftext|>")
    );
    let rows = records(
        "p",
        vec![json!({"prompt": "Country: Peru\nCapital:", "completion": " Lima"})],
    );
    let r = Caster::new(&dataset(preset("prompt-completion")), &rows)
        .unwrap()
        .render(0)
        .unwrap();
    assert_eq!(
        (r.prompt.as_str(), r.target.as_str()),
        ("Country: Peru\nCapital:", " Lima<|endoftext|>")
    );
    let rows = records("t", vec![json!({"text": "Once upon a time."})]);
    let r = Caster::new(&dataset(preset("text")), &rows)
        .unwrap()
        .render(0)
        .unwrap();
    assert_eq!(
        (r.prompt.as_str(), r.target.as_str()),
        ("", "Once upon a time.<|endoftext|>")
    );
    // Custom templates: literal braces, column renames, a label map for string labels.
    let rows = records("c", vec![json!({"sentence": "ok", "label": "pos"})]);
    let mut spec = dataset(TemplateSpec::Custom {
        prompt: "{{x}} {text} =".into(),
        target: " {label}".into(),
    });
    spec.columns.insert("text".into(), "sentence".into());
    spec.label_map = Some([("pos".to_string(), "good".to_string())].into());
    let r = Caster::new(&spec, &rows).unwrap().render(0).unwrap();
    assert_eq!(r.text(), "{x} ok = good");
}

#[test]
fn template_errors_name_the_column_row_and_label() {
    let rows = records("data.jsonl", vec![json!({"premise": "a", "label": 0})]);
    let e = err_text(Caster::new(&dataset(preset("mnli")), &rows));
    assert!(
        e.contains("data.jsonl")
            && e.contains("\"hypothesis\"")
            && e.contains("columns: label, premise"),
        "{e}"
    );

    let rows = records(
        "data.jsonl",
        vec![
            json!({"premise": "a", "hypothesis": "b", "label": 0}),
            json!({"premise": "a", "hypothesis": "b", "label": 7}),
        ],
    );
    let caster = Caster::new(&dataset(preset("mnli")), &rows).unwrap();
    let e = err_text(caster.render(1));
    assert!(
        e.contains("data.jsonl:line 2")
            && e.contains("unknown label 7")
            && e.contains("0 → entailment"),
        "{e}"
    );

    let rows = records(
        "data.jsonl",
        vec![
            json!({"premise": "a", "label": 0}),
            json!({"premise": "a", "hypothesis": "b", "label": 0}),
        ],
    );
    let caster = Caster::new(&dataset(preset("mnli")), &rows).unwrap();
    let e = err_text(caster.render(0));
    assert!(
        e.contains("data.jsonl:line 1") && e.contains("no column \"hypothesis\""),
        "{e}"
    );

    for (bad, expected) in [
        (
            "{unclosed",
            "prompt: unclosed `{` at byte 0 in \"{unclosed\"",
        ),
        ("close}", "prompt: unmatched `}` at byte 5 in \"close}\""),
        (
            "{}",
            "prompt: `{}` at byte 0 in \"{}\" is not a placeholder (expected {column})",
        ),
    ] {
        let spec = dataset(TemplateSpec::Custom {
            prompt: bad.into(),
            target: String::new(),
        });
        let e = err_text(Caster::new(&spec, &rows));
        assert!(e.contains(expected), "{bad}: {e}");
    }
}

#[test]
fn string_labels_pass_through_and_classlabel_names_are_used() {
    let rows = records(
        "g",
        vec![json!({"premise": "a", "hypothesis": "b", "label": "contradiction"})],
    );
    let r = Caster::new(&dataset(preset("mnli")), &rows)
        .unwrap()
        .render(0)
        .unwrap();
    assert_eq!(r.label.as_deref(), Some("contradiction"));
    let mut rows = records("g", vec![json!({"q": "a", "label": 1})]);
    rows.class_labels
        .insert("label".into(), vec!["no".into(), "yes".into()]);
    let spec = dataset(TemplateSpec::Custom {
        prompt: "{q}".into(),
        target: " {label}".into(),
    });
    assert_eq!(
        Caster::new(&spec, &rows).unwrap().render(0).unwrap().target,
        " yes"
    );
}

#[test]
fn few_shot_prefix_is_deterministic_and_excludes_the_example() {
    let rows = records(
        "p",
        (0..20)
            .map(|i| json!({"prompt": format!("Q{i}:"), "completion": format!(" A{i}")}))
            .collect(),
    );
    let mut spec = dataset(preset("prompt-completion"));
    spec.few_shot = Some(FewShotSpec { k: 3, seed: 7 });
    let caster = Caster::new(&spec, &rows).unwrap();
    let first: Vec<Rendered> = (0..20).map(|i| caster.render(i).unwrap()).collect();
    let again: Vec<Rendered> = (0..20).map(|i| caster.render(i).unwrap()).collect();
    assert_eq!(first, again);
    for (i, r) in first.iter().enumerate() {
        let shots: Vec<&str> = r.prompt.split("\n\n").collect();
        assert_eq!(shots.len(), 4, "{:?}", r.prompt);
        assert_eq!(shots[3], format!("Q{i}:"));
        assert!(
            !shots[..3].contains(&format!("Q{i}: A{i}").as_str()),
            "row {i} is its own shot"
        );
        assert!(!r.prompt.contains("<|endoftext|>"));
    }
    spec.few_shot = Some(FewShotSpec { k: 3, seed: 8 });
    let other = Caster::new(&spec, &rows).unwrap();
    assert!((0..20).any(|i| other.render(i).unwrap() != first[i]));
    spec.few_shot = Some(FewShotSpec { k: 20, seed: 0 });
    assert!(err_text(Caster::new(&spec, &rows)).contains("few_shot.k = 20"));
}

fn seq(ids: std::ops::Range<u32>) -> Sequence {
    Sequence::all_trained(ids.collect())
}

#[test]
fn packing_groups_1000_examples_and_drops_each_groups_remainder() {
    // 2,500 examples of 3 tokens: groups of 3000, 3000 and 1500 tokens; blocks of 7.
    let examples: Vec<Sequence> = (0..2500u32).map(|i| seq(i * 3..i * 3 + 3)).collect();
    let (blocks, dropped) = pack(&examples, 7);
    assert_eq!(blocks.len(), 428 + 428 + 214);
    assert_eq!(dropped, 4 + 4 + 2);
    assert!(blocks.iter().all(|b| b.len() == 7));
    assert_eq!(blocks[0].ids, (0..7).collect::<Vec<_>>());
    // Group 2 starts at example 1000 (token 3000), not where group 1's blocks stopped (2996).
    assert_eq!(blocks[428].ids, (3000..3007).collect::<Vec<_>>());
    assert_eq!(blocks[856].ids[0], 6000);
    // A group shorter than one block yields nothing.
    let (blocks, dropped) = pack(&examples[..2], 7);
    assert_eq!((blocks.len(), dropped), (0, 6));
    // Loss masks travel with their tokens.
    let masked = vec![Sequence::new(vec![1, 2, 3], vec![false, true, true]); 4];
    let (blocks, _) = pack(&masked, 4);
    assert_eq!(blocks[0].loss_mask, [false, true, true, false]);
    assert_eq!(blocks[1].loss_mask, [true, true, false, true]);
    assert!(blocks.iter().all(|b| !b.is_prefix_lm()));
    // Prefix-LM examples keep their prompt split, and each is its own segment of its block.
    let prefix_lm = Sequence {
        segment: vec![0; 3],
        prefix: vec![true, false, false],
        ..masked[0].clone()
    };
    let (blocks, _) = pack(&vec![prefix_lm; 4], 4);
    assert_eq!(blocks[0].segment, [0, 0, 0, 1]);
    assert_eq!(blocks[0].prefix, [true, false, false, true]);
    assert_eq!(blocks[1].segment, [1, 1, 2, 2]);
    assert_eq!(blocks[1].prefix, [false, false, true, false]);
}

#[test]
fn pad_mode_truncation_is_counted_or_an_error_naming_the_example() {
    let examples = vec![seq(0..3), seq(0..10), seq(0..5), seq(0..6)];
    let (rows, truncated) = one_per_row(examples.clone(), 5, Truncation::Right, |i| {
        format!("row {i}")
    })
    .unwrap();
    assert_eq!(truncated, 2);
    assert_eq!(rows[1].ids, [0, 1, 2, 3, 4]);
    assert_eq!(rows[0].ids, [0, 1, 2]);
    let (rows, truncated) = one_per_row(examples.clone(), 5, Truncation::Left, |i| {
        format!("row {i}")
    })
    .unwrap();
    assert_eq!(truncated, 2);
    assert_eq!(rows[1].ids, [5, 6, 7, 8, 9]);
    assert_eq!(rows[3].ids, [1, 2, 3, 4, 5]);
    let e = err_text(one_per_row(examples, 5, Truncation::Error, |i| {
        format!("f.jsonl:line {}", i + 1)
    }));
    assert!(
        e.contains("f.jsonl:line 2") && e.contains("10 tokens") && e.contains("seq_len = 5"),
        "{e}"
    );
}

#[test]
fn shuffling_is_deterministic_per_seed_and_epoch_and_resumable() {
    let sequences: Vec<Sequence> = (0..50u32).map(|i| seq(i..i + 1)).collect();
    let order =
        |s: &mut SequenceStream, n| s.next_batch(n).iter().map(|q| q.ids[0]).collect::<Vec<_>>();
    let mut a = SequenceStream::new(sequences.clone(), 3, true);
    let mut b = SequenceStream::new(sequences.clone(), 3, true);
    let epoch0 = order(&mut a, 50);
    assert_eq!(epoch0, order(&mut b, 50));
    assert_ne!(epoch0, (0..50).collect::<Vec<_>>());
    let epoch1 = order(&mut a, 50);
    assert_ne!(epoch0, epoch1);
    let mut sorted = epoch1.clone();
    sorted.sort();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    let mut c = SequenceStream::new(sequences.clone(), 4, true);
    assert_ne!(order(&mut c, 50), epoch0);
    // Resume mid-epoch from the state alone.
    let mut d = SequenceStream::new(sequences.clone(), 3, true);
    let _ = order(&mut d, 70);
    let state = d.state();
    let mut e = SequenceStream::new(sequences, 3, true);
    e.restore(state);
    assert_eq!(order(&mut d, 45), order(&mut e, 45));
}

#[test]
fn jsonl_and_json_sources_report_lines_and_rows() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "a.jsonl",
        "{\"x\": 1}\n\n{\"x\": 2, \"y\": \"b\"}\n",
    );
    let r = load_records(&local(Path::new("a.jsonl")), dir.path(), None).unwrap();
    assert_eq!(
        (r.len(), r.columns.clone(), r.positions.clone()),
        (2, vec!["x".to_string(), "y".to_string()], vec![1, 3])
    );
    assert_eq!(r.locate(1), format!("{}:line 3", p.display()));
    let r = load_records(&local(Path::new("a.jsonl")), dir.path(), Some(1)).unwrap();
    assert_eq!(r.len(), 1);

    write(dir.path(), "bad.jsonl", "{\"x\": 1}\n{\"x\": 2,\n");
    let e = err_text(read_file(
        &dir.path().join("bad.jsonl"),
        Format::Jsonl,
        None,
    ));
    assert!(
        e.contains("bad.jsonl:line 2") && e.contains("malformed JSON"),
        "{e}"
    );
    write(dir.path(), "arr.jsonl", "[1, 2]\n");
    let e = err_text(read_file(
        &dir.path().join("arr.jsonl"),
        Format::Jsonl,
        None,
    ));
    assert!(
        e.contains("arr.jsonl:line 1") && e.contains("expected a JSON object"),
        "{e}"
    );
    write(dir.path(), "empty.jsonl", "\n");
    let e = err_text(read_file(
        &dir.path().join("empty.jsonl"),
        Format::Jsonl,
        None,
    ));
    assert!(e.contains("empty.jsonl: no rows"), "{e}");

    write(dir.path(), "a.json", "[{\"x\": 1}, {\"x\": 2}]");
    let r = load_records(&local(Path::new("a.json")), dir.path(), None).unwrap();
    assert_eq!(r.rows[1]["x"], json!(2));
    write(dir.path(), "b.json", "[{\"x\": 1}, 3]");
    let e = err_text(read_file(&dir.path().join("b.json"), Format::Json, None));
    assert!(
        e.contains("b.json:row 2: expected a JSON object, found a number"),
        "{e}"
    );
    write(dir.path(), "c.json", "[{\"x\": 1},\n {\"x\" 2}]");
    let e = err_text(read_file(&dir.path().join("c.json"), Format::Json, None));
    assert!(
        e.contains("c.json:2:") && e.contains(": malformed JSON: expected `:`"),
        "{e}"
    );
    let e = err_text(load_records(&local(Path::new("a.txt")), dir.path(), None));
    assert!(
        e.contains("a.txt from its extension; set `format:` to one of jsonl, json, csv, tsv"),
        "{e}"
    );
}

#[test]
fn csv_and_tsv_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = csv::Writer::from_path(dir.path().join("a.csv")).unwrap();
    w.write_record(["text", "label"]).unwrap();
    w.write_record(["Good, \"really\" good\nsoup", "1"])
        .unwrap();
    w.write_record(["bad", "0"]).unwrap();
    w.flush().unwrap();
    let r = load_records(&local(Path::new("a.csv")), dir.path(), None).unwrap();
    assert_eq!(r.columns, ["text", "label"]);
    assert_eq!(r.rows[0]["text"], json!("Good, \"really\" good\nsoup"));
    assert_eq!(r.positions, [2, 4]);
    let caster = Caster::new(&dataset(preset("sentiment")), &r).unwrap();
    assert_eq!(caster.render(1).unwrap().target, " negative<|endoftext|>");

    // TSV does not quote: a stray quote stays in the text.
    write(
        dir.path(),
        "a.tsv",
        "text\tlabel\n\"quoted start\t1\nplain\t0\n",
    );
    let r = load_records(&local(Path::new("a.tsv")), dir.path(), None).unwrap();
    assert_eq!(r.rows[0]["text"], json!("\"quoted start"));
    assert_eq!(r.len(), 2);

    write(dir.path(), "ragged.csv", "a,b\n1,2\n3\n");
    let e = err_text(read_file(&dir.path().join("ragged.csv"), Format::Csv, None));
    assert!(
        e.contains("ragged.csv:line 3") && e.contains("header names 2 columns"),
        "{e}"
    );
}

#[test]
fn glue_mnli_tsv_renames_columns_and_drops_unlabelled_rows() {
    let dir = tempfile::tempdir().unwrap();
    let header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n";
    let body = "0\t1\t1e\tfiction\tHe said \"no.\tHe refused.\tentailment\tentailment\n\
                1\t2\t2n\tslate\tA cat sat.\tA dog sat.\t-\t-\n\
                2\t3\t3c\ttravel\tIt's \"big\" here.\tIt is small.\tcontradiction\tcontradiction\n";
    write(dir.path(), "dev_matched.tsv", &(header.to_string() + body));
    let mut spec = local(Path::new("dev_matched.tsv"));
    spec.format = Some("glue-tsv".into());
    let r = load_records(&spec, dir.path(), None).unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r.dropped, 1);
    assert!(r.columns.contains(&"premise".to_string()) && r.columns.contains(&"label".to_string()));
    assert_eq!(r.rows[0]["premise"], json!("He said \"no."));
    assert_eq!(r.positions, [2, 4]);
    let caster = Caster::new(&dataset(preset("mnli")), &r).unwrap();
    assert_eq!(
        caster.render(1).unwrap().text(),
        "mnli hypothesis: It is small. premise: It's \"big\" here. target: contradiction<|endoftext|>"
    );
    write(
        dir.path(),
        "test.tsv",
        "index\tsentence1\tsentence2\n0\ta\tb\n",
    );
    let mut spec = local(Path::new("test.tsv"));
    spec.format = Some("glue-tsv".into());
    let e = err_text(load_records(&spec, dir.path(), None));
    assert!(
        e.contains("gold_label") && e.contains("index, sentence1, sentence2"),
        "{e}"
    );
}

fn typed_batch() -> RecordBatch {
    let dict: DictionaryArray<arrow_array::types::Int32Type> =
        vec!["fiction", "slate", "fiction"].into_iter().collect();
    let columns: Vec<(&str, ArrayRef)> = vec![
        (
            "premise",
            Arc::new(StringArray::from(vec![Some("p0"), Some("p1"), None])),
        ),
        (
            "hypothesis",
            Arc::new(LargeStringArray::from(vec!["h0", "h1", "h2"])),
        ),
        ("label", Arc::new(Int64Array::from(vec![0, 1, 2]))),
        ("genre", Arc::new(dict)),
        ("i8", Arc::new(Int8Array::from(vec![-1, 0, 1]))),
        ("i16", Arc::new(Int16Array::from(vec![-2, 0, 2]))),
        ("i32", Arc::new(Int32Array::from(vec![-3, 0, 3]))),
        ("u8", Arc::new(UInt8Array::from(vec![1, 2, 3]))),
        ("u16", Arc::new(UInt16Array::from(vec![1, 2, 3]))),
        ("u32", Arc::new(UInt32Array::from(vec![1, 2, 3]))),
        ("u64", Arc::new(UInt64Array::from(vec![1, 2, u64::MAX]))),
        ("f32", Arc::new(Float32Array::from(vec![0.5, 1.5, 2.5]))),
        ("f64", Arc::new(Float64Array::from(vec![0.25, 1.25, 2.25]))),
        (
            "flag",
            Arc::new(BooleanArray::from(vec![true, false, true])),
        ),
    ];
    let features = json!({"info": {"features": {"label": {"names": ["entailment", "neutral", "contradiction"], "_type": "ClassLabel"}}}});
    let fields: Vec<Field> = columns
        .iter()
        .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
        .collect();
    let schema = Schema::new(fields).with_metadata(HashMap::from([(
        "huggingface".to_string(),
        features.to_string(),
    )]));
    RecordBatch::try_new(
        Arc::new(schema),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .unwrap()
}

fn check_typed(r: &Records) {
    assert_eq!(r.len(), 3);
    assert_eq!(r.columns[..4], ["premise", "hypothesis", "label", "genre"]);
    let row = &r.rows[1];
    assert_eq!(row["premise"], json!("p1"));
    assert_eq!(row["hypothesis"], json!("h1"));
    assert_eq!(row["genre"], json!("slate"));
    assert_eq!(
        (row["i8"].clone(), row["i16"].clone(), row["i32"].clone()),
        (json!(0), json!(0), json!(0))
    );
    assert_eq!(r.rows[2]["u64"], json!(u64::MAX));
    assert_eq!(r.rows[0]["i8"], json!(-1));
    assert_eq!(
        (row["f32"].clone(), row["f64"].clone(), row["flag"].clone()),
        (json!(1.5), json!(1.25), json!(false))
    );
    assert_eq!(r.rows[2]["premise"], json!(null));
    assert_eq!(
        r.class_labels["label"],
        ["entailment", "neutral", "contradiction"]
    );
    assert_eq!(r.locate(2), format!("{}:row 3", r.origin));
    let spec = dataset(TemplateSpec::Custom {
        prompt: "{hypothesis}".into(),
        target: " {label}".into(),
    });
    assert_eq!(
        Caster::new(&spec, r).unwrap().render(2).unwrap().target,
        " contradiction"
    );
    let e = err_text(Caster::new(&dataset(preset("mnli")), r).unwrap().render(2));
    assert!(
        e.contains(":row 3") && e.contains("\"premise\" is null"),
        "{e}"
    );
}

#[test]
fn parquet_round_trip_with_every_supported_type() {
    let dir = tempfile::tempdir().unwrap();
    let batch = typed_batch();
    let path = dir.path().join("t.parquet");
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&path).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    check_typed(&load_records(&local(Path::new("t.parquet")), dir.path(), None).unwrap());
    let r = load_records(&local(Path::new("t.parquet")), dir.path(), Some(2)).unwrap();
    assert_eq!(r.len(), 2);

    write(dir.path(), "broken.parquet", "PAR1 this is not parquet");
    let e = err_text(read_file(
        &dir.path().join("broken.parquet"),
        Format::Parquet,
        None,
    ));
    assert!(
        e.contains("broken.parquet") && e.contains("unreadable Parquet"),
        "{e}"
    );
}

#[test]
fn arrow_ipc_file_and_stream_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let batch = typed_batch();
    let file = dir.path().join("t.arrow");
    let mut w = arrow_ipc::writer::FileWriter::try_new(
        std::fs::File::create(&file).unwrap(),
        &batch.schema(),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
    check_typed(&load_records(&local(Path::new("t.arrow")), dir.path(), None).unwrap());
    let stream = dir.path().join("s.arrow");
    let mut w = arrow_ipc::writer::StreamWriter::try_new(
        std::fs::File::create(&stream).unwrap(),
        &batch.schema(),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
    check_typed(&load_records(&local(Path::new("s.arrow")), dir.path(), None).unwrap());
    write(dir.path(), "junk.arrow", "junk");
    let e = err_text(read_file(
        &dir.path().join("junk.arrow"),
        Format::Arrow,
        None,
    ));
    assert!(
        e.contains("junk.arrow") && e.contains("not an Arrow IPC"),
        "{e}"
    );
    // Unsupported column types name the column.
    let schema = Arc::new(Schema::new(vec![Field::new(
        "when",
        DataType::Date32,
        false,
    )]));
    let dates: ArrayRef = Arc::new(arrow_array::Date32Array::from(vec![1]));
    let batch = RecordBatch::try_new(schema.clone(), vec![dates]).unwrap();
    let path = dir.path().join("d.arrow");
    let mut w =
        arrow_ipc::writer::FileWriter::try_new(std::fs::File::create(&path).unwrap(), &schema)
            .unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
    let e = err_text(read_file(&path, Format::Arrow, None));
    assert!(
        e.contains("column \"when\"") && e.contains("unsupported type"),
        "{e}"
    );
}

#[test]
fn hub_sources_read_the_hf_cache_layout_or_say_what_is_missing() {
    let cache = tempfile::tempdir().unwrap();
    // The only test that reads the HF_* variables. Offline, so a cache miss is reported instead
    // of downloaded (downloads are tested against a local Hub in tests/hub.rs).
    std::env::set_var("HF_HUB_CACHE", cache.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let spec = SourceSpec {
        path: None,
        format: None,
        hub: Some("nyu-mll/glue".into()),
        config: Some("mnli".into()),
        split: Some("validation_mismatched".into()),
        revision: None,
    };
    let e = err_text(hub_parquet_files(&spec));
    assert!(
        e.contains("nyu-mll/glue")
            && e.contains("config mnli")
            && e.contains("split validation_mismatched")
            && e.contains(&cache.path().display().to_string()),
        "{e}"
    );
    let snapshot = cache
        .path()
        .join("datasets--nyu-mll--glue/snapshots/abc123/mnli");
    std::fs::create_dir_all(&snapshot).unwrap();
    let batch = typed_batch();
    for shard in [
        "validation_mismatched-00001-of-00002.parquet",
        "validation_mismatched-00000-of-00002.parquet",
    ] {
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(snapshot.join(shard)).unwrap(),
            batch.schema(),
            None,
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }
    std::fs::write(
        snapshot.join("validation_matched-00000-of-00001.parquet"),
        "not read",
    )
    .unwrap();
    let files = hub_parquet_files(&spec).unwrap();
    assert_eq!(files.len(), 2);
    assert!(files[0].ends_with("validation_mismatched-00000-of-00002.parquet"));
    let r = load_records(&spec, Path::new("."), None).unwrap();
    assert_eq!(r.len(), 6);
    assert_eq!(r.origin, "hub:nyu-mll/glue/mnli/validation_mismatched");
    assert_eq!(
        load_records(&spec, Path::new("."), Some(4)).unwrap().len(),
        4
    );
    // A named revision resolves through refs/; one that is not cached is an error naming it.
    let refs = cache.path().join("datasets--nyu-mll--glue/refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(refs.join("main"), "abc123\n").unwrap();
    assert_eq!(hub_parquet_files(&spec).unwrap().len(), 2);
    let mut pinned = spec.clone();
    pinned.revision = Some("main".into());
    assert_eq!(hub_parquet_files(&pinned).unwrap().len(), 2);
    pinned.revision = Some("v2".into());
    let e = err_text(hub_parquet_files(&pinned));
    assert!(e.contains("at revision v2"), "{e}");
    std::env::remove_var("HF_HUB_CACHE");
    std::env::remove_var("HF_HUB_OFFLINE");
}

#[test]
fn shared_mnli_sample_packs_like_run_clm() {
    let (Some(tok), Some(data)) = (
        common::shared("tokenizers/gpt2"),
        common::shared("data/mnli/train.jsonl"),
    ) else {
        return;
    };
    let tokenizer = TextTokenizer::from_dir(&tok).unwrap();
    let records = read_file(&data, Format::Jsonl, None).unwrap();
    assert_eq!(records.len(), 19_999);
    let caster = Caster::new(&dataset(preset("mnli")), &records).unwrap();
    let rendered: Vec<Rendered> = (0..caster.len())
        .map(|i| caster.render(i).unwrap())
        .collect();
    let examples = kiln::data::tokenize_all(&tokenizer, &rendered, LossOn::All).unwrap();
    let tokens: usize = examples.iter().map(Sequence::len).sum();
    let (blocks, dropped) = pack(&examples, 1024);
    // What HF's run_clm makes of the same rows: scripts/make_fixtures.py (`mnli_blocks`) tokenized
    // them with transformers and packed them with group_texts (full MNLI, 392,702 rows: 17,762).
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("mnli/blocks.json")).unwrap(),
    )
    .unwrap();
    let count = |key: &str| reference[key].as_u64().unwrap() as usize;
    assert_eq!(count("rows"), records.len());
    assert_eq!(count("block_size"), 1024);
    assert_eq!(tokens, count("tokens"), "tokens of the 19,999 rows");
    assert_eq!(blocks.len(), count("blocks"), "blocks of 1024");
    assert_eq!(dropped, count("dropped"), "tokens dropped at group ends");
    let ids = |key: &str| -> Vec<u32> {
        reference[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_u64().unwrap() as u32)
            .collect()
    };
    assert_eq!(blocks[0].ids, ids("first_block"), "the first block");
    assert_eq!(
        blocks.last().unwrap().ids,
        ids("last_block"),
        "the last block"
    );
    // Every block, token for token: Python's `json.dumps(blocks)` hashed.
    let listed: Vec<String> = blocks
        .iter()
        .map(|block| {
            let ids: Vec<String> = block.ids.iter().map(u32::to_string).collect();
            format!("[{}]", ids.join(", "))
        })
        .collect();
    let digest = sha2::Sha256::digest(format!("[{}]", listed.join(", ")).as_bytes());
    assert_eq!(
        hex::encode(digest),
        reference["blocks_sha256"].as_str().unwrap(),
        "every block"
    );
    assert!(blocks.iter().all(|b| b.loss_mask.iter().all(|&m| m)));
}

#[test]
fn bundled_nli_dataset_is_reproducible_from_its_seed() {
    let dir = tempfile::tempdir().unwrap();
    let config = synth::SynthConfig {
        seed: 0,
        train_rows: 6000,
        validation_rows: 600,
        vocab_size: 1024,
    };
    synth::write_dataset(dir.path(), &config).unwrap();
    for file in [
        "train.jsonl",
        "validation.jsonl",
        "tokenizer/tokenizer.json",
    ] {
        let shipped = std::fs::read(repo().join("datasets/nli").join(file)).unwrap();
        let fresh = std::fs::read(dir.path().join(file)).unwrap();
        assert!(
            shipped == fresh,
            "datasets/nli/{file} differs from `cargo run --example synth-nli -- --out datasets/nli --seed 0`"
        );
    }
}

fn nli_rows(file: &str) -> Vec<synth::NliRow> {
    std::fs::read_to_string(repo().join("datasets/nli").join(file))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Bag of words: the hypothesis' words, and which of them the premise lacks.
fn features(row: &synth::NliRow) -> Vec<String> {
    let premise = words(&row.premise);
    let mut f: Vec<String> = Vec::new();
    for w in words(&row.hypothesis) {
        if !premise.contains(&w) {
            f.push(format!("new:{w}"));
        }
        f.push(w);
    }
    f
}

#[test]
fn bundled_nli_is_learnable_by_bag_of_words_but_not_by_length() {
    let train = nli_rows("train.jsonl");
    let validation = nli_rows("validation.jsonl");
    assert_eq!((train.len(), validation.len()), (6000, 600));
    for label in 0..3 {
        let n = train.iter().filter(|r| r.label == label).count();
        assert_eq!(n, 2000, "labels are balanced");
    }
    let genres: std::collections::BTreeSet<&str> = train.iter().map(|r| r.genre.as_str()).collect();
    assert_eq!(genres.len(), 5);
    // Multinomial naive Bayes with add-one smoothing.
    let mut counts = vec![HashMap::<String, f64>::new(); 3];
    let mut totals = [0f64; 3];
    for row in &train {
        for f in features(row) {
            *counts[row.label as usize].entry(f).or_default() += 1.0;
            totals[row.label as usize] += 1.0;
        }
    }
    let vocab = counts
        .iter()
        .flat_map(|c| c.keys())
        .collect::<std::collections::HashSet<_>>()
        .len() as f64;
    let predict = |row: &synth::NliRow| {
        (0..3)
            .map(|l| {
                let score: f64 = features(row)
                    .iter()
                    .map(|f| {
                        ((counts[l].get(f).copied().unwrap_or(0.0) + 1.0) / (totals[l] + vocab))
                            .ln()
                    })
                    .sum();
                (score, l)
            })
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .unwrap()
            .1
    };
    let correct = validation
        .iter()
        .filter(|r| predict(r) == r.label as usize)
        .count();
    let accuracy = correct as f64 / validation.len() as f64;
    assert!(accuracy > 0.70, "bag-of-words accuracy {accuracy}");
    // Hypothesis length alone: predict the majority label of each length (in words) seen in train.
    let mut by_length: HashMap<usize, [usize; 3]> = HashMap::new();
    for row in &train {
        by_length.entry(words(&row.hypothesis).len()).or_default()[row.label as usize] += 1;
    }
    let length_correct = validation
        .iter()
        .filter(|r| {
            let c = by_length
                .get(&words(&r.hypothesis).len())
                .copied()
                .unwrap_or([1, 0, 0]);
            (0..3).max_by_key(|&l| c[l]).unwrap() == r.label as usize
        })
        .count();
    let length_accuracy = length_correct as f64 / validation.len() as f64;
    eprintln!("bag-of-words {accuracy:.3}, hypothesis length only {length_accuracy:.3}");
    assert!(length_accuracy < 0.5, "length alone gets {length_accuracy}");
}

fn assert_fast_path_matches(tokenizer: &TextTokenizer, texts: &[String]) {
    let fast = kiln::data::fast_bpe::FastBpe::new(tokenizer).expect("a GPT-2-style tokenizer");
    for text in texts {
        let (ids, offsets) = fast.encode(text).unwrap();
        let (hf_ids, hf_offsets) = tokenizer.encode_with_offsets(text).unwrap();
        assert_eq!(ids, hf_ids, "{text:?}");
        // HF widens offsets of partial UTF-8 characters to whole characters; ends agree on ASCII.
        if text.is_ascii() {
            assert_eq!(offsets, hf_offsets, "{text:?}");
        }
    }
}

const EDGE_CASES: &[&str] = &[
    "",
    " ",
    "Hello world",
    "  two  spaces   three\tand\ttabs\n\nnewlines \n end  ",
    "don't we'll they've I'm she'd it's 'quoted' ''s",
    "numbers 123 4.5 1,000,000 ²³ ⅷ",
    "unicode: naïve café Ünïcödé 日本語 😀👍🏽 — “quotes” …",
    "a<|endoftext|>b <|endoftext|> <|endoftext|><|endoftext|>end",
    "<|endoftext|",
    "trailing space then eos <|endoftext|>",
    "mixed\r\nline\u{a0}nbsp\u{2003}em",
];

#[test]
fn fast_bpe_matches_the_tokenizers_crate() {
    let texts: Vec<String> = EDGE_CASES.iter().map(|s| s.to_string()).collect();
    assert_fast_path_matches(&nli_tokenizer(), &texts);
    let Some(dir) = common::shared("tokenizers/gpt2") else {
        return;
    };
    let gpt2 = TextTokenizer::from_dir(&dir).unwrap();
    assert_fast_path_matches(&gpt2, &texts);
    let Some(data) = common::shared("data/mnli/train.jsonl") else {
        return;
    };
    let records = read_file(&data, Format::Jsonl, Some(3000)).unwrap();
    let caster = Caster::new(&dataset(preset("mnli")), &records).unwrap();
    let rendered: Vec<String> = (0..caster.len())
        .map(|i| caster.render(i).unwrap().text())
        .collect();
    assert_fast_path_matches(&gpt2, &rendered);
}

#[test]
fn preview_and_stats_commands_show_what_the_model_sees() {
    let recipe = repo().join("recipes/quickstart.yaml");
    let recipe = recipe.to_str().unwrap();
    let (ok, out, err) = common::kiln(&["data", "preview", recipe, "--n", "2", "--split", "eval"]);
    assert!(ok, "{err}");
    let first = nli_rows("validation.jsonl").remove(0);
    let word = synth::LABEL_WORDS[first.label as usize];
    assert!(
        out.contains("eval example 1 · ") && out.contains("validation.jsonl:line 1"),
        "{out}"
    );
    assert!(
        out.contains(&format!("target: \" {word}<|endoftext|>\"")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "premise: {} target:⟦|⟧ {word}<|endoftext|>",
            first.premise
        )),
        "{out}"
    );
    assert!(out.contains("2 target;"), "{out}");
    assert_eq!(out.matches("── eval example").count(), 2);

    let (ok, out, err) = common::kiln(&[
        "data",
        "stats",
        recipe,
        "--json",
        "--set",
        "data.mode=pack",
        "--set",
        "data.seq_len=128",
    ]);
    assert!(ok, "{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats[0]["split"], "train");
    assert_eq!(stats[0]["examples"], 6000);
    let tokens = stats[0]["tokens"].as_u64().unwrap();
    let sequences = stats[0]["sequences"].as_u64().unwrap();
    let dropped = stats[0]["dropped_tokens"].as_u64().unwrap();
    assert_eq!(sequences * 128 + dropped, tokens);
    assert_eq!(stats[1]["split"], "eval");
    assert_eq!(stats[1]["examples"], 600);

    let (ok, out, err) = common::kiln(&[
        "data",
        "stats",
        recipe,
        "--set",
        "data.seq_len=20",
        "--set",
        "data.truncation=left",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("padded rows:")
            && out.contains("truncated)")
            && !out.contains("(0 truncated)"),
        "{out}"
    );
    let (ok, _, err) = common::kiln(&["data", "stats", recipe, "--set", "data.seq_len=20"]);
    assert!(
        !ok && err.contains("train.jsonl:line ") && err.contains("more than data.seq_len = 20"),
        "{err}"
    );
}

#[test]
fn prepare_gives_the_trainer_sequences_and_stats() {
    let path = repo().join("recipes/quickstart.yaml");
    let sets = ["data.eval=[]".to_string(), "eval.task=loss".to_string()];
    let recipe = kiln::recipe::load(&path, &sets).unwrap();
    let dir = kiln::recipe::recipe_dir(&path);
    let tokenizer = kiln::recipe::tokenizer_for(&recipe, &dir).unwrap().unwrap();
    let train = kiln::data::prepare(&recipe, &dir, &tokenizer, kiln::data::Split::Train).unwrap();
    assert_eq!(train.sequences.len(), 6000);
    assert_eq!(train.stats.examples, 6000);
    // loss_on: target — the label word and <|endoftext|> of each example.
    assert_eq!(train.stats.target_tokens, 12_000);
    assert!(train
        .sequences
        .iter()
        .all(|s| s.target_count() == 2 && s.len() <= 64));
    assert_eq!(train.sequences[0].ids.last(), Some(&tokenizer.eos_id()));
    let eval = kiln::data::prepare(&recipe, &dir, &tokenizer, kiln::data::Split::Eval).unwrap();
    assert!(eval.sequences.is_empty());
}

/// Parquet as other tools write it: pyarrow's zstd (Polars' and DuckDB's default codec) and lz4
/// (tests/fixtures/parquet, written from tests/fixtures/mnli/rows.jsonl; the labels as text).
#[test]
fn zstd_and_lz4_parquet_files_read_as_their_rows() {
    let fixtures = common::fixtures();
    let expected = read_file(&fixtures.join("mnli/rows.jsonl"), Format::Jsonl, None).unwrap();
    for codec in ["zstd", "lz4"] {
        let name = format!("rows-{codec}.parquet");
        let records =
            load_records(&local(Path::new(&name)), &fixtures.join("parquet"), None).unwrap();
        assert_eq!(records.len(), expected.len(), "{codec}");
        for (row, want) in records.rows.iter().zip(&expected.rows) {
            for column in ["premise", "hypothesis", "genre"] {
                assert_eq!(row[column], want[column], "{codec}: {column}");
            }
            let label = match &want["label"] {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            assert_eq!(row["label"], json!(label), "{codec}: label");
        }
    }
}
