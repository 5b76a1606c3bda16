//! Reading and writing the weight files of a Hugging Face model directory.
//!
//! Reading memory-maps every shard and converts one tensor at a time, so loading needs little
//! more memory than the loaded model itself. Writing streams tensor by tensor into shards of a
//! bounded size, with HF's `model.safetensors.index.json` when there is more than one.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use safetensors::SafeTensors;

pub const SAFETENSORS_SINGLE: &str = "model.safetensors";
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
pub const PYTORCH_SINGLE: &str = "pytorch_model.bin";
pub const PYTORCH_INDEX: &str = "pytorch_model.bin.index.json";

/// Where one tensor lives.
#[derive(Debug, Clone, Copy)]
struct Location {
    file: usize,
}

enum WeightFile {
    Safetensors {
        path: PathBuf,
        mmap: memmap2::Mmap,
    },
    Pytorch {
        path: PathBuf,
        tensors: candle_core::pickle::PthTensors,
    },
}

impl WeightFile {
    fn path(&self) -> &Path {
        match self {
            WeightFile::Safetensors { path, .. } | WeightFile::Pytorch { path, .. } => path,
        }
    }
}

/// The prefixes of the base model inside HF's `*ForCausalLM` weight names.
const BASE_MODEL_PREFIXES: &[&str] = &["transformer.", "gpt_neox."];

/// Hub names whose tensors transformers 5 holds under another name in memory, so that a
/// `torch.save(model.state_dict())` made with it uses that one (`save_pretrained` converts back).
const IN_MEMORY_NAMES: &[(&str, &str)] = &[("embed_out.weight", "lm_head.weight")];

/// The weights of one model directory, memory-mapped, looked up by HF tensor name.
pub struct WeightStore {
    files: Vec<WeightFile>,
    index: HashMap<String, Location>,
    shapes: HashMap<String, Vec<usize>>,
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStore")
            .field(
                "files",
                &self.files.iter().map(|w| w.path()).collect::<Vec<_>>(),
            )
            .field("tensors", &self.index.len())
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl WeightStore {
    /// Opens the weights of `dir`: `model.safetensors`, a sharded safetensors index,
    /// `pytorch_model.bin` or a sharded PyTorch index, in HF's order of preference.
    pub fn open(dir: &Path) -> Result<Self> {
        let files = if dir.join(SAFETENSORS_SINGLE).is_file() {
            vec![dir.join(SAFETENSORS_SINGLE)]
        } else if dir.join(SAFETENSORS_INDEX).is_file() {
            shard_files(&dir.join(SAFETENSORS_INDEX))?
        } else if dir.join(PYTORCH_SINGLE).is_file() {
            vec![dir.join(PYTORCH_SINGLE)]
        } else if dir.join(PYTORCH_INDEX).is_file() {
            shard_files(&dir.join(PYTORCH_INDEX))?
        } else {
            bail!(
                "{}: no weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, \
                 {PYTORCH_SINGLE} or {PYTORCH_INDEX})",
                dir.display()
            );
        };
        let mut store = WeightStore {
            files: Vec::new(),
            index: HashMap::new(),
            shapes: HashMap::new(),
        };
        for path in files {
            store.add_file(path)?;
        }
        Ok(store)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<()> {
        let file_index = self.files.len();
        let is_pytorch = path.extension().is_some_and(|e| e == "bin" || e == "pt");
        let names_and_shapes: Vec<(String, Vec<usize>)>;
        let weight_file = if is_pytorch {
            let tensors = candle_core::pickle::PthTensors::new(&path, None).with_context(|| {
                format!("{}: not a readable PyTorch checkpoint", path.display())
            })?;
            names_and_shapes = tensors
                .tensor_infos()
                .iter()
                .map(|(name, info)| (name.clone(), info.layout.shape().dims().to_vec()))
                .collect();
            WeightFile::Pytorch { path, tensors }
        } else {
            let file =
                File::open(&path).with_context(|| format!("{}: cannot open", path.display()))?;
            // SAFETY: the mapping is read-only; a file changed underneath us while loading is
            // caught by safetensors' bounds checks or shows as wrong values, never as UB in safe
            // code that outlives this function's borrow rules.
            let mmap = unsafe { memmap2::Mmap::map(&file) }
                .with_context(|| format!("{}: cannot memory-map", path.display()))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not a valid safetensors file ({e}); is it truncated or still downloading?",
                    path.display()
                )
            })?;
            names_and_shapes = st
                .tensors()
                .into_iter()
                .map(|(name, view)| (name, view.shape().to_vec()))
                .collect();
            WeightFile::Safetensors { path, mmap }
        };
        for (name, shape) in names_and_shapes {
            self.index
                .insert(name.clone(), Location { file: file_index });
            self.shapes.insert(name, shape);
        }
        self.files.push(weight_file);
        Ok(())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.shapes.get(self.stored_name(name)).map(Vec::as_slice)
    }

    /// The name `name` is stored under: itself, or without the base model's prefix in a
    /// checkpoint of the base model alone (OpenAI's `gpt2` repository stores `h.0.attn...`, not
    /// `transformer.h.0.attn...`), which HF's `from_pretrained` accepts too.
    fn stored_name<'a>(&self, name: &'a str) -> &'a str {
        if self.index.contains_key(name) {
            return name;
        }
        let renamed = IN_MEMORY_NAMES
            .iter()
            .filter(|(hub, _)| *hub == name)
            .map(|(_, in_memory)| *in_memory);
        BASE_MODEL_PREFIXES
            .iter()
            .filter_map(|prefix| name.strip_prefix(prefix))
            .chain(renamed)
            .find(|other| self.index.contains_key(*other))
            .unwrap_or(name)
    }

    /// Loads one tensor in the given dtype, with an error naming the file and the tensor.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let name = self.stored_name(name);
        let location = self
            .index
            .get(name)
            .with_context(|| format!("tensor {name} is missing from {}", self.describe_files()))?;
        let file = &self.files[location.file];
        let tensor = match file {
            WeightFile::Safetensors { path, mmap } => {
                let st = SafeTensors::deserialize(mmap)
                    .with_context(|| format!("{}: invalid safetensors", path.display()))?;
                let view = st
                    .tensor(name)
                    .with_context(|| format!("{}: cannot read tensor {name}", path.display()))?;
                candle_core::safetensors::Load::load(&view, device)
                    .with_context(|| format!("{}: cannot decode tensor {name}", path.display()))?
            }
            WeightFile::Pytorch { path, tensors } => tensors
                .get(name)
                .with_context(|| format!("{}: cannot read tensor {name}", path.display()))?
                .with_context(|| format!("{}: tensor {name} is missing", path.display()))?,
        };
        ensure_float(&tensor, file.path(), name)?;
        tensor.to_dtype(dtype).with_context(|| {
            format!(
                "{}: cannot convert {name} to {dtype:?}",
                file.path().display()
            )
        })
    }

    fn describe_files(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|f| f.path().display().to_string())
            .collect();
        names.join(", ")
    }

    fn file_of(&self, name: &str) -> String {
        self.index
            .get(self.stored_name(name))
            .map(|l| self.files[l.file].path().display().to_string())
            .unwrap_or_else(|| self.describe_files())
    }
}

/// Refuses a stored tensor that is not F32, F16, BF16 or F64, naming `file` and the tensor:
/// integers converted to floats would load and run as garbage, and 8-bit or smaller floats come
/// with scales that a plain conversion would ignore.
pub fn ensure_float(tensor: &Tensor, file: &Path, name: &str) -> Result<()> {
    if matches!(
        tensor.dtype(),
        DType::F16 | DType::BF16 | DType::F32 | DType::F64
    ) {
        return Ok(());
    }
    bail!(
        "{}: tensor {name} is stored as {:?}, but weights must be floating point (F32, F16, \
         BF16 or F64)",
        file.display(),
        tensor.dtype()
    )
}

fn shard_files(index_path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index_path)
        .with_context(|| format!("{}: cannot read", index_path.display()))?;
    let index: ShardIndex = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid shard index", index_path.display()))?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    // The index is data: a name such as `../../x` or `/etc/x` would open a file outside the
    // model directory, so only plain relative paths below it are accepted (the Hub download
    // refuses the same names).
    if let Some((tensor, f)) = index.weight_map.iter().find(|(_, f)| {
        f.is_empty()
            || !Path::new(f)
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    }) {
        bail!(
            "{}: weight_map[{tensor}] is {f:?}, which is not a file inside {}: shard names must \
             be relative paths without `..`",
            index_path.display(),
            dir.display()
        );
    }
    let mut files: Vec<&String> = index.weight_map.values().collect();
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|f| {
            let path = dir.join(f);
            if !path.is_file() {
                bail!(
                    "{}: shard {f} is listed in the index but missing from {}",
                    index_path.display(),
                    dir.display()
                );
            }
            Ok(path)
        })
        .collect()
}

/// `VarBuilder` backend over a `WeightStore`: shape mismatches name the file and the tensor.
pub struct StoreBackend(pub std::sync::Arc<WeightStore>);

impl SimpleBackend for StoreBackend {
    fn get(
        &self,
        expected: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(found) = self.0.shape(name) {
            if found != expected.dims() {
                candle_core::bail!(
                    "{}: tensor {name} has shape {found:?}, but config.json implies {:?}",
                    self.0.file_of(name),
                    expected.dims()
                );
            }
        }
        self.0
            .load(name, dtype, dev)
            .map_err(|e| candle_core::Error::msg(format!("{e:#}")))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0
            .load(name, dtype, dev)
            .map_err(|e| candle_core::Error::msg(format!("{e:#}")))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.index.contains_key(self.0.stored_name(name))
    }
}

/// `VarBuilder` backend over named tensors held in memory (e.g. fp32 master weights), cast to
/// the requested dtype on the way out. The cast is part of the autograd graph, so gradients of
/// a low-precision forward flow back to the fp32 originals.
///
/// Frozen matrices stored in half precision (LoRA's base model) are handed out as they are when
/// the CPU asks for fp32: its layers widen one matrix at a time as they use it, where an upcast
/// here would hold the whole model in fp32 for the step.
pub struct TensorsBackend(pub HashMap<String, Tensor>);

impl SimpleBackend for TensorsBackend {
    fn get(
        &self,
        expected: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.dims() != expected.dims() {
            candle_core::bail!(
                "tensor {name} has shape {:?}, expected {:?}",
                tensor.dims(),
                expected.dims()
            );
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self
            .0
            .get(name)
            .ok_or_else(|| candle_core::Error::msg(format!("tensor {name} is missing")))?;
        let frozen_half_matrix = matches!(tensor.dtype(), DType::BF16 | DType::F16)
            && tensor.rank() == 2
            && !tensor.track_op();
        if frozen_half_matrix && dtype == DType::F32 && dev.is_cpu() {
            return tensor.to_device(dev);
        }
        tensor.to_device(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

/// Name, dtype and shape of a tensor to be written, known before its data exists.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

fn safetensors_dtype(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F64 => "F64",
        DType::I64 => "I64",
        DType::U32 => "U32",
        DType::U8 => "U8",
        other => bail!("cannot write {other:?} tensors to safetensors"),
    })
}

/// Writes one safetensors file whose header is known in advance, pulling each tensor's data from
/// `produce` only when its turn comes: a model of any size is written holding one tensor at a time.
pub fn write_safetensors_streaming(
    path: &Path,
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
    produce: impl FnMut(&TensorSpec) -> Result<Tensor>,
) -> Result<()> {
    let file = File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let write_err = || format!("{}: write failed", path.display());
    write_safetensors_to(&mut out, specs, metadata, produce).with_context(write_err)?;
    let file = out
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(write_err)?;
    file.sync_all().with_context(write_err)?;
    Ok(())
}

/// The bytes of a safetensors file, streamed into `out` (a file, or a hasher).
fn write_safetensors_to(
    out: &mut impl Write,
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
    mut produce: impl FnMut(&TensorSpec) -> Result<Tensor>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    let mut offset = 0usize;
    for spec in specs {
        let len = spec.byte_len();
        header.insert(
            spec.name.clone(),
            serde_json::json!({
                "dtype": safetensors_dtype(spec.dtype)?,
                "shape": spec.shape,
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut header_bytes = serde_json::to_vec(&header)?;
    // The format asks for the data to start 8-byte aligned; padding with spaces keeps it JSON.
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }
    out.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
    out.write_all(&header_bytes)?;
    for spec in specs {
        let tensor = produce(spec)?;
        if tensor.dims() != spec.shape.as_slice() || tensor.dtype() != spec.dtype {
            bail!(
                "internal error: tensor {} is {:?} {:?}, announced as {:?} {:?}",
                spec.name,
                tensor.dtype(),
                tensor.dims(),
                spec.dtype,
                spec.shape
            );
        }
        write_tensor_bytes(out, &tensor)?;
    }
    Ok(())
}

fn write_tensor_bytes(out: &mut impl Write, tensor: &Tensor) -> Result<()> {
    let tensor = tensor.to_device(&Device::Cpu)?.flatten_all()?;
    // Safetensors is little-endian, as is every platform candle runs on.
    macro_rules! write_as {
        ($t:ty) => {{
            let values = tensor.to_vec1::<$t>()?;
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    values.as_ptr() as *const u8,
                    std::mem::size_of_val(values.as_slice()),
                )
            };
            out.write_all(bytes)?;
        }};
    }
    match tensor.dtype() {
        DType::F32 => write_as!(f32),
        DType::F16 => write_as!(half::f16),
        DType::BF16 => write_as!(half::bf16),
        DType::F64 => write_as!(f64),
        DType::I64 => write_as!(i64),
        DType::U32 => write_as!(u32),
        DType::U8 => write_as!(u8),
        other => bail!("cannot write {other:?} tensors"),
    }
    Ok(())
}

/// Splits tensors into shards of at most `max_shard_bytes` (a tensor larger than that gets a
/// shard of its own), keeping the given order.
pub fn plan_shards(specs: &[TensorSpec], max_shard_bytes: usize) -> Vec<Vec<TensorSpec>> {
    let mut shards = Vec::new();
    let mut current: Vec<TensorSpec> = Vec::new();
    let mut current_bytes = 0usize;
    for spec in specs {
        let len = spec.byte_len();
        if !current.is_empty() && current_bytes + len > max_shard_bytes {
            shards.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(spec.clone());
        current_bytes += len;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// sha256 over the weight files [`write_weights`] would write, in file-name order: what
/// `weights_sha256` of the resulting directory gives, computed without writing anything.
pub fn weights_digest(
    specs: &[TensorSpec],
    max_shard_bytes: usize,
    mut produce: impl FnMut(&TensorSpec) -> Result<Tensor>,
) -> Result<String> {
    use sha2::{Digest, Sha256};
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut hasher = std::io::BufWriter::with_capacity(1 << 20, Sha256::new());
    // Shard names (`model-00001-of-0000n`) sort in shard order.
    for shard in plan_shards(specs, max_shard_bytes) {
        write_safetensors_to(&mut hasher, &shard, &metadata, &mut produce)?;
    }
    let hasher = hasher.into_inner().map_err(|e| e.into_error())?;
    Ok(hex::encode(hasher.finalize()))
}

/// Writes a model's weights into `dir` the way `save_pretrained` does: `model.safetensors`, or
/// `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`.
pub fn write_weights(
    dir: &Path,
    specs: &[TensorSpec],
    max_shard_bytes: usize,
    mut produce: impl FnMut(&TensorSpec) -> Result<Tensor>,
) -> Result<Vec<String>> {
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let shards = plan_shards(specs, max_shard_bytes);
    if shards.len() <= 1 {
        write_safetensors_streaming(&dir.join(SAFETENSORS_SINGLE), specs, &metadata, produce)?;
        return Ok(vec![SAFETENSORS_SINGLE.to_string()]);
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut file_names = Vec::with_capacity(n + 1);
    for (i, shard) in shards.iter().enumerate() {
        let file_name = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        write_safetensors_streaming(&dir.join(&file_name), shard, &metadata, &mut produce)?;
        for spec in shard {
            weight_map.insert(spec.name.clone(), file_name.clone());
        }
        file_names.push(file_name);
    }
    let total_size: usize = specs.iter().map(TensorSpec::byte_len).sum();
    let index = serde_json::json!({
        "metadata": { "total_size": total_size },
        "weight_map": weight_map,
    });
    let index_path = dir.join(SAFETENSORS_INDEX);
    std::fs::write(&index_path, serde_json::to_string_pretty(&index)? + "\n")
        .with_context(|| format!("{}: cannot write", index_path.display()))?;
    file_names.push(SAFETENSORS_INDEX.to_string());
    Ok(file_names)
}
