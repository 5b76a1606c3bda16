//! Reading examples from files and Hub datasets into one shape: named columns of JSON values.
//!
//! Every row remembers where it came from (line of a JSONL/CSV file, row of a table) so that a
//! bad value anywhere later in the pipeline can be reported as `file:line N`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, Schema};
use serde_json::{Map, Value};

pub use crate::recipe::Format;
use crate::recipe::SourceSpec;

pub type Row = Map<String, Value>;

/// The rows of one source.
#[derive(Debug, Clone, Default)]
pub struct Records {
    /// The file, or `hub:owner/name/config/split`, as used in messages.
    pub origin: String,
    /// Column names: in file order for tables; for JSON sources, the union of all rows' keys
    /// (each row's keys come sorted, as `serde_json` stores them).
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
    /// Where each row is in the source: its line (text formats) or row number (tables), 1-based.
    pub positions: Vec<usize>,
    /// "line" or "row": what `positions` count.
    pub unit: &'static str,
    /// Rows skipped while reading (GLUE's `-` gold labels), and why.
    pub dropped: usize,
    pub dropped_reason: Option<String>,
    /// Names of ClassLabel columns, from the Hub's parquet metadata (`0` → names[0]).
    pub class_labels: BTreeMap<String, Vec<String>>,
}

impl Records {
    fn new(origin: String, unit: &'static str) -> Self {
        Self {
            origin,
            unit,
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// `file:line 12` for row index `i`.
    pub fn locate(&self, i: usize) -> String {
        format!("{}:{} {}", self.origin, self.unit, self.positions[i])
    }

    fn push(&mut self, row: Row, position: usize) {
        for key in row.keys() {
            if !self.columns.iter().any(|c| c == key) {
                self.columns.push(key.clone());
            }
        }
        self.rows.push(row);
        self.positions.push(position);
    }

    fn full(&self, limit: Option<usize>) -> bool {
        limit.is_some_and(|l| self.rows.len() >= l)
    }
}

/// Reads a source: a local file (relative to `base_dir`, the recipe's directory) or a Hub dataset
/// from its parquet files. At most `limit` rows, the first ones. An empty result is an error.
pub fn load_records(spec: &SourceSpec, base_dir: &Path, limit: Option<usize>) -> Result<Records> {
    let records = match (&spec.path, &spec.hub) {
        (Some(path), None) => {
            let path = base_dir.join(path);
            let format = Format::for_source(spec, &path)?;
            read_file(&path, format, limit)?
        }
        (None, Some(repo)) => {
            let files = hub_parquet_files(spec)?;
            let mut records = Records::new(hub_origin(spec), "row");
            for file in &files {
                if records.full(limit) {
                    break;
                }
                read_parquet_into(file, &mut records, limit)?;
            }
            if records.is_empty() {
                bail!("{}: the split has no rows ({repo})", records.origin);
            }
            records
        }
        _ => bail!("a source needs exactly one of `path` and `hub`"),
    };
    Ok(records)
}

/// Reads one local file in the given format.
pub fn read_file(path: &Path, format: Format, limit: Option<usize>) -> Result<Records> {
    let origin = path.display().to_string();
    let records = match format {
        Format::Jsonl => read_jsonl(path, limit)?,
        Format::Json => read_json(path, limit)?,
        Format::Csv => read_delimited(path, b',', true, limit)?,
        Format::Tsv => read_delimited(path, b'\t', false, limit)?,
        Format::GlueTsv => read_glue_tsv(path, limit)?,
        Format::Parquet => {
            let mut records = Records::new(origin.clone(), "row");
            read_parquet_into(path, &mut records, limit)?;
            records
        }
        Format::Arrow => read_arrow(path, limit)?,
    };
    if records.is_empty() {
        match records.dropped {
            0 => bail!("{origin}: no rows (empty file or split)"),
            n => bail!(
                "{origin}: no rows left after dropping {n} ({})",
                records.dropped_reason.as_deref().unwrap_or("unusable")
            ),
        }
    }
    Ok(records)
}

fn open(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("{}: cannot open", path.display()))
}

fn read_jsonl(path: &Path, limit: Option<usize>) -> Result<Records> {
    let mut records = Records::new(path.display().to_string(), "line");
    let reader = BufReader::with_capacity(1 << 20, open(path)?);
    for (index, line) in reader.lines().enumerate() {
        if records.full(limit) {
            break;
        }
        let number = index + 1;
        let line =
            line.with_context(|| format!("{}:line {number}: cannot read", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(&line).map_err(|e| {
            anyhow!(
                "{}:line {number}: malformed JSON at column {}: {e}",
                path.display(),
                e.column()
            )
        })?;
        match value {
            Value::Object(row) => records.push(row, number),
            other => bail!(
                "{}:line {number}: expected a JSON object per line, found {}",
                path.display(),
                json_kind(&other)
            ),
        }
    }
    Ok(records)
}

fn read_json(path: &Path, limit: Option<usize>) -> Result<Records> {
    let mut records = Records::new(path.display().to_string(), "row");
    let value: Value = serde_json::from_reader(BufReader::new(open(path)?)).map_err(|e| {
        anyhow!(
            "{}:{}:{}: malformed JSON: {e}",
            path.display(),
            e.line(),
            e.column()
        )
    })?;
    let Value::Array(items) = value else {
        bail!(
            "{}: expected a JSON array of objects, found {}",
            path.display(),
            json_kind(&value)
        );
    };
    for (index, item) in items.into_iter().enumerate() {
        if records.full(limit) {
            break;
        }
        match item {
            Value::Object(row) => records.push(row, index + 1),
            other => bail!(
                "{}:row {}: expected a JSON object, found {}",
                path.display(),
                index + 1,
                json_kind(&other)
            ),
        }
    }
    Ok(records)
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// CSV quotes fields; TSV (GLUE's included) does not, and its text contains stray quotes that a
/// quoting reader would swallow across lines.
fn read_delimited(
    path: &Path,
    delimiter: u8,
    quoting: bool,
    limit: Option<usize>,
) -> Result<Records> {
    let mut records = Records::new(path.display().to_string(), "line");
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .quoting(quoting)
        .has_headers(true)
        .from_reader(BufReader::with_capacity(1 << 20, open(path)?));
    let header: Vec<String> = reader
        .headers()
        .with_context(|| format!("{}:line 1: cannot read the header row", path.display()))?
        .iter()
        .map(str::to_string)
        .collect();
    if header.iter().all(|h| h.is_empty()) {
        bail!(
            "{}: no header row (the first line must name the columns)",
            path.display()
        );
    }
    records.columns = header.clone();
    for result in reader.records() {
        if records.full(limit) {
            break;
        }
        let record = result.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            match e.kind() {
                csv::ErrorKind::UnequalLengths {
                    expected_len, len, ..
                } => anyhow!(
                    "{}:line {line}: {len} fields, but the header names {expected_len} columns",
                    path.display()
                ),
                _ => anyhow!("{}:line {line}: {e}", path.display()),
            }
        })?;
        let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
        let row: Row = header
            .iter()
            .zip(record.iter())
            .map(|(k, v)| (k.clone(), Value::String(v.to_string())))
            .collect();
        records.rows.push(row);
        records.positions.push(line);
    }
    Ok(records)
}

fn read_glue_tsv(path: &Path, limit: Option<usize>) -> Result<Records> {
    let records = read_delimited(path, b'\t', false, None)?;
    for required in ["sentence1", "sentence2", "gold_label"] {
        if !records.columns.iter().any(|c| c == required) {
            bail!(
                "{}: GLUE MNLI TSV needs a column {required:?}; the file has: {}",
                path.display(),
                records.columns.join(", ")
            );
        }
    }
    fn rename(c: &str) -> &str {
        match c {
            "sentence1" => "premise",
            "sentence2" => "hypothesis",
            "gold_label" => "label",
            other => other,
        }
    }
    // Renamed columns replace any same-named ones the file already had (GLUE has a `label1`..
    // `label5` but no `label`, `premise` or `hypothesis`).
    let mut columns: Vec<String> = Vec::new();
    for c in &records.columns {
        let name = rename(c).to_string();
        if !columns.contains(&name) {
            columns.push(name);
        }
    }
    let mut kept = Records::new(records.origin.clone(), "line");
    kept.columns = columns;
    for (row, position) in records.rows.into_iter().zip(records.positions) {
        if row["gold_label"].as_str() == Some("-") {
            kept.dropped += 1;
            continue;
        }
        if kept.full(limit) {
            break;
        }
        let row: Row = row
            .into_iter()
            .map(|(k, v)| (rename(&k).to_string(), v))
            .collect();
        kept.rows.push(row);
        kept.positions.push(position);
    }
    if kept.dropped > 0 {
        kept.dropped_reason = Some("gold_label '-': annotators did not agree".into());
    }
    Ok(kept)
}

fn read_parquet_into(path: &Path, records: &mut Records, limit: Option<usize>) -> Result<()> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let unreadable =
        |e: &dyn std::fmt::Display| anyhow!("{}: unreadable Parquet: {e}", path.display());
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(open(path)?).map_err(|e| unreadable(&e))?;
    let schema = builder.schema().clone();
    merge_class_labels(records, &schema);
    let reader = builder
        .with_batch_size(8192)
        .build()
        .map_err(|e| unreadable(&e))?;
    let mut first_row = 0usize;
    for batch in reader {
        if records.full(limit) {
            break;
        }
        let batch = batch.map_err(|e| {
            anyhow!(
                "{}: unreadable Parquet after row {first_row}: {e}",
                path.display()
            )
        })?;
        append_batch(path, &batch, records, &mut first_row, limit)?;
    }
    Ok(())
}

fn read_arrow(path: &Path, limit: Option<usize>) -> Result<Records> {
    use arrow_ipc::reader::{FileReader, StreamReader};
    let mut records = Records::new(path.display().to_string(), "row");
    let mut first_row = 0usize;
    let batches: Box<
        dyn Iterator<Item = std::result::Result<RecordBatch, arrow_schema::ArrowError>>,
    > = match FileReader::try_new_buffered(open(path)?, None) {
        Ok(reader) => {
            merge_class_labels(&mut records, &reader.schema());
            Box::new(reader)
        }
        Err(file_error) => {
            let reader = StreamReader::try_new_buffered(open(path)?, None).map_err(|e| {
                anyhow!(
                    "{}: not an Arrow IPC file ({file_error}) nor stream ({e})",
                    path.display()
                )
            })?;
            merge_class_labels(&mut records, &reader.schema());
            Box::new(reader)
        }
    };
    for batch in batches {
        if records.full(limit) {
            break;
        }
        let batch = batch.map_err(|e| {
            anyhow!(
                "{}: unreadable Arrow after row {first_row}: {e}",
                path.display()
            )
        })?;
        append_batch(path, &batch, &mut records, &mut first_row, limit)?;
    }
    Ok(records)
}

/// HF `datasets` writes its Features into the schema metadata under `huggingface`; ClassLabel
/// columns carry their label names there.
fn merge_class_labels(records: &mut Records, schema: &Arc<Schema>) {
    let Some(meta) = schema.metadata().get("huggingface") else {
        return;
    };
    let Ok(meta) = serde_json::from_str::<Value>(meta) else {
        return;
    };
    let Some(features) = meta.pointer("/info/features").and_then(Value::as_object) else {
        return;
    };
    for (column, feature) in features {
        let is_class_label = feature.get("_type").and_then(Value::as_str) == Some("ClassLabel");
        if let (true, Some(names)) = (
            is_class_label,
            feature.get("names").and_then(Value::as_array),
        ) {
            let names = names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect();
            records.class_labels.insert(column.clone(), names);
        }
    }
}

fn append_batch(
    path: &Path,
    batch: &RecordBatch,
    records: &mut Records,
    first_row: &mut usize,
    limit: Option<usize>,
) -> Result<()> {
    let schema = batch.schema();
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, array) in schema.fields().iter().zip(batch.columns()) {
        let values = array_values(array.as_ref())
            .map_err(|e| anyhow!("{}: column {:?}: {e}", path.display(), field.name()))?;
        columns.push((field.name().clone(), values));
        if !records.columns.contains(field.name()) {
            records.columns.push(field.name().clone());
        }
    }
    let take = match limit {
        Some(l) => batch.num_rows().min(l.saturating_sub(records.rows.len())),
        None => batch.num_rows(),
    };
    let mut iters: Vec<_> = columns
        .into_iter()
        .map(|(n, v)| (n, v.into_iter()))
        .collect();
    for i in 0..take {
        let row: Row = iters
            .iter_mut()
            .map(|(name, values)| (name.clone(), values.next().unwrap_or(Value::Null)))
            .collect();
        records.rows.push(row);
        records.positions.push(*first_row + i + 1);
    }
    *first_row += batch.num_rows();
    Ok(())
}

/// One Arrow column as JSON values (nulls as `null`).
fn array_values(array: &dyn Array) -> Result<Vec<Value>> {
    fn collect<T>(array: &dyn Array, n: usize, get: impl Fn(usize) -> T) -> Vec<Value>
    where
        T: Into<Value>,
    {
        (0..n)
            .map(|i| {
                if array.is_null(i) {
                    Value::Null
                } else {
                    get(i).into()
                }
            })
            .collect()
    }
    let n = array.len();
    Ok(match array.data_type() {
        DataType::Utf8 => {
            let a = array.as_string::<i32>();
            collect(array, n, |i| a.value(i).to_string())
        }
        DataType::LargeUtf8 => {
            let a = array.as_string::<i64>();
            collect(array, n, |i| a.value(i).to_string())
        }
        DataType::Utf8View => {
            let a = array.as_string_view();
            collect(array, n, |i| a.value(i).to_string())
        }
        DataType::Boolean => {
            let a = array.as_boolean();
            collect(array, n, |i| a.value(i))
        }
        DataType::Int8 => {
            let a = array.as_primitive::<Int8Type>();
            collect(array, n, |i| a.value(i))
        }
        DataType::Int16 => {
            let a = array.as_primitive::<Int16Type>();
            collect(array, n, |i| a.value(i))
        }
        DataType::Int32 => {
            let a = array.as_primitive::<Int32Type>();
            collect(array, n, |i| a.value(i))
        }
        DataType::Int64 => {
            let a = array.as_primitive::<Int64Type>();
            collect(array, n, |i| a.value(i))
        }
        DataType::UInt8 => {
            let a = array.as_primitive::<UInt8Type>();
            collect(array, n, |i| a.value(i))
        }
        DataType::UInt16 => {
            let a = array.as_primitive::<UInt16Type>();
            collect(array, n, |i| a.value(i))
        }
        DataType::UInt32 => {
            let a = array.as_primitive::<UInt32Type>();
            collect(array, n, |i| a.value(i))
        }
        DataType::UInt64 => {
            let a = array.as_primitive::<UInt64Type>();
            collect(array, n, |i| a.value(i))
        }
        DataType::Float32 => {
            let a = array.as_primitive::<Float32Type>();
            collect(array, n, |i| float(a.value(i) as f64))
        }
        DataType::Float64 => {
            let a = array.as_primitive::<Float64Type>();
            collect(array, n, |i| float(a.value(i)))
        }
        DataType::Dictionary(_, _) => {
            let dict = array.as_any_dictionary();
            let values = array_values(dict.values().as_ref())?;
            let keys = dict.normalized_keys();
            (0..n)
                .map(|i| {
                    if array.is_null(i) {
                        Value::Null
                    } else {
                        values.get(keys[i]).cloned().unwrap_or(Value::Null)
                    }
                })
                .collect()
        }
        // Conversations: `messages` is a list of {role, content} structs.
        DataType::List(_) => list_values::<i32>(array)?,
        DataType::LargeList(_) => list_values::<i64>(array)?,
        DataType::Struct(fields) => {
            let structs = array.as_struct();
            let columns = (structs.columns().iter())
                .map(|c| array_values(c.as_ref()))
                .collect::<Result<Vec<_>>>()?;
            (0..n)
                .map(|i| match array.is_null(i) {
                    true => Value::Null,
                    false => Value::Object(
                        (fields.iter().zip(&columns))
                            .map(|(f, c)| (f.name().clone(), c[i].clone()))
                            .collect(),
                    ),
                })
                .collect()
        }
        other => bail!(
            "unsupported type {other} (supported: strings, integers, floats, booleans, \
             dictionary-encoded strings, and lists and structs of them)"
        ),
    })
}

/// A list column's rows as JSON arrays of their values.
fn list_values<O: arrow_array::OffsetSizeTrait>(array: &dyn Array) -> Result<Vec<Value>> {
    let list = array.as_list::<O>();
    let values = array_values(list.values().as_ref())?;
    let offsets = list.value_offsets();
    Ok((0..array.len())
        .map(|i| match array.is_null(i) {
            true => Value::Null,
            false => {
                let (start, end) = (offsets[i].as_usize(), offsets[i + 1].as_usize());
                Value::Array(values[start..end].to_vec())
            }
        })
        .collect())
}

fn float(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// How messages and reports name a Hub source: `hub:owner/name/config/split`.
pub fn hub_origin(spec: &SourceSpec) -> String {
    format!(
        "hub:{}/{}/{}",
        spec.hub.as_deref().unwrap_or(""),
        spec.config.as_deref().unwrap_or("default"),
        spec.split.as_deref().unwrap_or("")
    )
}

/// The Hugging Face Hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hf_hub_cache() -> PathBuf {
    crate::hub::HubConfig::from_env().cache_dir
}

/// The parquet files of a Hub dataset split, from the local HF cache, in shard order. The Hub's
/// layout is `<config>/<split>-00000-of-0000N.parquet` (or `<config>/<split>/NNNN.parquet` on
/// the parquet-converted branch).
pub fn hub_parquet_files(spec: &SourceSpec) -> Result<Vec<PathBuf>> {
    let repo = spec.hub.as_deref().context("not a Hub source")?;
    let config = spec.config.as_deref().unwrap_or("default");
    let split = spec
        .split
        .as_deref()
        .context("a Hub source needs a split")?;
    let cache = hf_hub_cache();
    let repo_dir = cache.join(format!("datasets--{}", repo.replace('/', "--")));
    let offline = crate::hub::HubConfig::from_env().offline;
    // The requested revision; without one, the snapshot `main` points at, else any cached one.
    let revision = spec.revision.as_deref().or(Some("main"));
    let snapshots: Vec<PathBuf> = match resolve_revision(&repo_dir, revision) {
        Some(snapshot) => vec![snapshot],
        None if spec.revision.is_some() => Vec::new(),
        None => {
            let mut all: Vec<PathBuf> = std::fs::read_dir(repo_dir.join("snapshots"))
                .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            all.sort();
            all
        }
    };
    for snapshot in &snapshots {
        let mut files = Vec::new();
        let config_dir = snapshot.join(config);
        if let Ok(entries) = std::fs::read_dir(&config_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let sharded = name.starts_with(&format!("{split}-")) && name.ends_with(".parquet");
                if sharded {
                    files.push(entry.path());
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(config_dir.join(split)) {
            files.extend(
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "parquet")),
            );
        }
        if !files.is_empty() {
            files.sort();
            return Ok(files);
        }
    }
    if !offline {
        let hub = crate::hub::HubConfig::from_env();
        return crate::hub::resolve_parquet_split(
            &hub,
            repo,
            spec.revision.as_deref(),
            config,
            split,
        )
        .with_context(|| format!("Hub dataset {repo} (config {config}, split {split})"));
    }
    let at = spec
        .revision
        .as_deref()
        .map(|r| format!(" at revision {r}"))
        .unwrap_or_default();
    let why = if offline {
        "HF_HUB_OFFLINE is set and it is not in the cache"
    } else {
        "it is not in the local cache (download it first, or run with network access)"
    };
    bail!(
        "Hub dataset {repo} (config {config}, split {split}{at}): {why}; looked for \
         {}/snapshots/*/{config}/{split}-*.parquet",
        repo_dir.display()
    )
}

fn resolve_revision(repo_dir: &Path, revision: Option<&str>) -> Option<PathBuf> {
    let revision = revision?;
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let snapshot = repo_dir.join("snapshots").join(commit);
    snapshot.is_dir().then_some(snapshot)
}
