//! Reading the official checkpoint files unchanged: sharded or single PyTorch
//! pickles (through candle's pickle reader, which never executes pickled code)
//! and sharded or single safetensors (memory-mapped).
//!
//! Tensors are read one at a time; a safetensors range is released from the
//! page cache right after its copy, so loading never holds two copies of the weights.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::Metadata;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

mod lora;
pub use lora::LoraAdapter;

/// The checkpoint file layouts glm2rs reads, in order of preference.
pub const WEIGHT_FILES: [&str; 4] = [
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
];

enum Shard {
    Safetensors {
        path: PathBuf,
        mmap: Mmap,
        data_start: usize,
        meta: Metadata,
    },
    Pickle {
        path: PathBuf,
        mmap: Mmap,
        index: HashMap<String, crate::pth::PthTensor>,
    },
    Gguf {
        path: PathBuf,
        mmap: Mmap,
        content: candle_core::quantized::gguf_file::Content,
    },
}

/// Map a read-only file.
fn map_file(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is only read; a concurrent truncation by another process is the usual
    // caveat of memory-mapped model files.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// Let the kernel drop a copied range of a map from our resident set.
fn release(mmap: &Mmap, start: usize, len: usize) {
    // SAFETY: the map is read-only and never written; the pages are re-read from the file if
    // touched again.
    unsafe {
        let _ = mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len);
    }
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        if !path.is_file() {
            return Err(Error::checkpoint(path, "file not found"));
        }
        let mmap = map_file(path)?;
        if is_safetensors {
            let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
                Error::checkpoint(
                    path,
                    format!("not a complete safetensors file ({e:?}); truncated or corrupt?"),
                )
            })?;
            Ok(Shard::Safetensors {
                path: path.to_path_buf(),
                mmap,
                data_start: 8 + n,
                meta,
            })
        } else {
            let index = crate::pth::read_index(path)?;
            if let Some((name, t)) = index.iter().find(|(_, t)| t.start + t.len > mmap.len()) {
                return Err(Error::checkpoint(
                    path,
                    format!(
                        "tensor {name} lies past the end of the file ({} bytes at {}); truncated?",
                        t.len, t.start
                    ),
                ));
            }
            Ok(Shard::Pickle {
                path: path.to_path_buf(),
                mmap,
                index,
            })
        }
    }

    fn path(&self) -> &Path {
        match self {
            Shard::Safetensors { path, .. }
            | Shard::Pickle { path, .. }
            | Shard::Gguf { path, .. } => path,
        }
    }

    fn names(&self) -> Vec<String> {
        match self {
            Shard::Safetensors { meta, .. } => meta.tensors().into_keys().collect(),
            Shard::Pickle { index, .. } => index.keys().cloned().collect(),
            Shard::Gguf { content, .. } => content.tensor_infos.keys().cloned().collect(),
        }
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self {
            Shard::Safetensors { meta, .. } => meta.info(name).map(|i| i.shape.clone()),
            Shard::Pickle { index, .. } => index.get(name).map(|i| i.shape.clone()),
            Shard::Gguf { content, .. } => content
                .tensor_infos
                .get(name)
                .map(|i| i.shape.dims().to_vec()),
        }
    }

    /// Read one tensor onto the CPU in its stored dtype (8-bit integers as raw U8 bytes).
    fn read(&self, name: &str) -> Result<(Tensor, bool)> {
        let missing =
            || Error::checkpoint(self.path(), format!("tensor {name} not found in this file"));
        let (path, mmap, start, len, dtype, shape, signed) = match self {
            Shard::Safetensors {
                path,
                mmap,
                data_start,
                meta,
            } => {
                let info = meta.info(name).ok_or_else(missing)?;
                let (dtype, signed) = match info.dtype {
                    safetensors::Dtype::F16 => (DType::F16, false),
                    safetensors::Dtype::BF16 => (DType::BF16, false),
                    safetensors::Dtype::F32 => (DType::F32, false),
                    safetensors::Dtype::F64 => (DType::F64, false),
                    safetensors::Dtype::U8 => (DType::U8, false),
                    safetensors::Dtype::I8 => (DType::U8, true),
                    safetensors::Dtype::I64 => (DType::I64, false),
                    other => {
                        return Err(Error::checkpoint(
                            path,
                            format!("tensor {name}: unsupported dtype {other:?}"),
                        ))
                    }
                };
                let (a, b) = info.data_offsets;
                (
                    path,
                    mmap,
                    data_start + a,
                    b - a,
                    dtype,
                    info.shape.clone(),
                    signed,
                )
            }
            Shard::Pickle { path, mmap, index } => {
                use crate::pth::PthDType as P;
                let t = index.get(name).ok_or_else(missing)?;
                let (dtype, signed) = match t.dtype {
                    P::F16 => (DType::F16, false),
                    P::BF16 => (DType::BF16, false),
                    P::F32 => (DType::F32, false),
                    P::F64 => (DType::F64, false),
                    P::U8 | P::Bool => (DType::U8, false),
                    P::I8 => (DType::U8, true),
                    P::I64 => (DType::I64, false),
                    P::I32 => (DType::I32, false),
                };
                (path, mmap, t.start, t.len, dtype, t.shape.clone(), signed)
            }
            Shard::Gguf { .. } => {
                let q = self.qtensor(name)?;
                return Ok((q.dequantize(&Device::Cpu)?, false));
            }
        };
        let bytes = mmap.get(start..start + len).ok_or_else(|| {
            Error::checkpoint(
                path,
                format!("tensor {name} lies past the end of the file; truncated?"),
            )
        })?;
        let t = Tensor::from_raw_buffer(bytes, dtype, &shape, &Device::Cpu)?;
        release(mmap, start, len);
        Ok((t, signed))
    }
}

impl Shard {
    fn qtensor(&self, name: &str) -> Result<candle_core::quantized::QTensor> {
        let Shard::Gguf {
            path,
            mmap,
            content,
        } = self
        else {
            return Err(Error::checkpoint(
                self.path(),
                format!("tensor {name}: not a GGUF file"),
            ));
        };
        let mut cursor = std::io::Cursor::new(&mmap[..]);
        content
            .tensor(&mut cursor, name, &Device::Cpu)
            .map_err(|e| {
                Error::checkpoint(path, format!("tensor {name}: {e}; truncated or corrupt?"))
            })
    }
}

/// An opened checkpoint: every shard, and which shard holds which tensor.
pub struct Checkpoint {
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
    /// GGUF written by save_quantized with the official per-row layouts.
    official_bits: Option<crate::quantize::Bits>,
    /// A LoRA adapter merged into the weights as they are read ([`Checkpoint::with_adapter`]).
    lora: Option<LoraAdapter>,
}

impl Checkpoint {
    /// Open the weights of a model directory (see [`WEIGHT_FILES`]).
    pub fn open_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        for name in WEIGHT_FILES {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            return if name.ends_with(".index.json") {
                Self::open_index(&path)
            } else {
                Self::open_files(&[path])
            };
        }
        Err(Error::checkpoint(
            dir,
            format!(
                "no weights found: expected one of {}",
                WEIGHT_FILES.join(", ")
            ),
        ))
    }

    /// Open a `*.index.json` with its `weight_map`; every shard it names must exist.
    pub fn open_index(index_path: &Path) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
        let idx: Index = serde_json::from_str(&text)
            .map_err(|e| Error::checkpoint(index_path, format!("malformed index: {e}")))?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shard_of_file: BTreeMap<&str, usize> = BTreeMap::new();
        let mut shards = vec![];
        let mut index = HashMap::new();
        for (tensor, file) in &idx.weight_map {
            let next = shards.len();
            let i = match shard_of_file.get(file.as_str()) {
                Some(&i) => i,
                None => {
                    // a shard is a file of the model directory: a name with `..`, a root or a
                    // drive would reach outside it (symbolic links inside it, as the Hugging
                    // Face cache makes, are followed as usual)
                    let rel = Path::new(file);
                    if file.is_empty()
                        || !rel
                            .components()
                            .all(|c| matches!(c, std::path::Component::Normal(_)))
                    {
                        return Err(Error::checkpoint(
                            index_path,
                            format!(
                                "the shard of {tensor} is {file:?}: shards must be files of the model directory"
                            ),
                        ));
                    }
                    let path = dir.join(rel);
                    if !path.is_file() {
                        return Err(Error::checkpoint(
                            &path,
                            format!(
                                "shard listed in {} is missing (it holds {tensor})",
                                index_path.display()
                            ),
                        ));
                    }
                    shards.push(Shard::open(&path)?);
                    shard_of_file.insert(file, next);
                    next
                }
            };
            index.insert(tensor.clone(), i);
        }
        Ok(Self {
            shards,
            index,
            official_bits: None,
            lora: None,
        })
    }

    /// Open a list of weight files (each `.safetensors` or PyTorch pickle).
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut shards = vec![];
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let shard = Shard::open(p)?;
            for name in shard.names() {
                index.insert(name, i);
            }
            shards.push(shard);
        }
        Ok(Self {
            shards,
            index,
            official_bits: None,
            lora: None,
        })
    }

    /// Open a GGUF file written by `save_quantized`; returns its metadata too.
    /// `rename` gives a tensor's checkpoint name from its name in the file (another program's
    /// naming, e.g. llama.cpp's); `None` keeps the file's name.
    pub fn open_gguf(
        path: &Path,
        rename: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(
        Self,
        HashMap<String, candle_core::quantized::gguf_file::Value>,
    )> {
        let mmap = map_file(path)?;
        let content =
            candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&mmap[..]))
                .map_err(|e| {
                    Error::checkpoint(
                        path,
                        format!("not a readable GGUF file ({e}); truncated or corrupt?"),
                    )
                })?;
        let mut content = content;
        let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
        for n in names {
            if let Some(c) = rename(&n) {
                if let Some(info) = content.tensor_infos.remove(&n) {
                    content.tensor_infos.insert(c, info);
                }
            }
        }
        let metadata = content.metadata.clone();
        let index = content
            .tensor_infos
            .keys()
            .map(|k| (k.clone(), 0))
            .collect();
        let shard = Shard::Gguf {
            path: path.to_path_buf(),
            mmap,
            content,
        };
        let official_bits = match metadata
            .get("glm2rs.quantization")
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
        {
            Some("int8") => Some(crate::quantize::Bits::Eight),
            Some("int4") => Some(crate::quantize::Bits::Four),
            _ => None,
        };
        Ok((
            Self {
                shards: vec![shard],
                index,
                official_bits,
                lora: None,
            },
            metadata,
        ))
    }

    /// For a GGUF with the official per-row layouts: their bit width.
    pub fn gguf_official_bits(&self) -> Option<crate::quantize::Bits> {
        self.official_bits
    }

    /// A quantized (block type) tensor of a GGUF checkpoint; `None` for dense tensors and
    /// other formats.
    pub fn gguf_quantized(
        &self,
        name: &str,
        shape: &[usize],
    ) -> Result<Option<candle_core::quantized::QTensor>> {
        use candle_core::quantized::GgmlDType as G;
        let shard = self.shard(name)?;
        let Shard::Gguf { content, path, .. } = shard else {
            return Ok(None);
        };
        let info = &content.tensor_infos[name];
        if matches!(info.ggml_dtype, G::F32 | G::F16 | G::BF16) {
            return Ok(None);
        }
        self.refuse_quantized_target(name)?;
        if info.shape.dims() != shape {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor {name} has shape {:?}, the config implies {shape:?}",
                    info.shape.dims()
                ),
            ));
        }
        shard.qtensor(name).map(Some)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    fn shard(&self, name: &str) -> Result<&Shard> {
        match self.index.get(name) {
            Some(&i) => Ok(&self.shards[i]),
            None => Err(Error::checkpoint(
                self.shards
                    .first()
                    .map(|s| s.path())
                    .unwrap_or(Path::new("?")),
                format!("tensor {name} is in no file of this checkpoint"),
            )),
        }
    }

    /// The stored shape of a tensor, if the checkpoint has it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let shard = self.shard(name).ok()?;
        shard.shape(name)
    }

    fn read_checked(&self, name: &str, shape: &[usize]) -> Result<(Tensor, bool, &Path)> {
        let shard = self.shard(name)?;
        if let Some(stored) = shard.shape(name) {
            if stored != shape {
                return Err(Error::checkpoint(
                    shard.path(),
                    format!("tensor {name} has shape {stored:?}, the config implies {shape:?}"),
                ));
            }
        }
        let (t, signed) = shard.read(name)?;
        Ok((t, signed, shard.path()))
    }

    /// This checkpoint with a LoRA adapter merged into the weights it targets as they are read
    /// ([`Checkpoint::get`]); after loading, [`Checkpoint::check_adapter_merged`].
    pub fn with_adapter(mut self, lora: LoraAdapter) -> Self {
        self.lora = Some(lora);
        self
    }

    /// Fails when an adapter given with [`Checkpoint::with_adapter`] changes tensors that
    /// loading never read (it was made for another model).
    pub fn check_adapter_merged(&self) -> Result<()> {
        self.lora.as_ref().map_or(Ok(()), |l| l.check_all_merged())
    }

    /// A tensor the adapter targets cannot be read in a quantized layout (int8/int4, GGUF
    /// blocks): the update merges into float weights.
    fn refuse_quantized_target(&self, name: &str) -> Result<()> {
        if self.lora.as_ref().is_some_and(|l| l.targets(name)) {
            return Err(Error::invalid(format!(
                "the LoRA adapter changes {name}, which this checkpoint stores quantized: merge \
                 adapters into the float checkpoint (quantize= then quantizes the merged weights)"
            )));
        }
        Ok(())
    }

    /// Read a float tensor, check its shape, and convert it to `dtype` on `device` (with the
    /// adapter's update merged in, in float32, when it targets this tensor).
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (t, signed, path) = self.read_checked(name, shape)?;
        if signed || !t.dtype().is_float() {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor {name} is {:?}, a float tensor was expected",
                    t.dtype()
                ),
            ));
        }
        let t = match &self.lora {
            Some(l) => l.merge(name, &t)?.unwrap_or(t),
            None => t,
        };
        // Convert on the CPU (one tensor at a time), then move.
        let t = t.to_dtype(dtype)?;
        Ok(t.to_device(device)?)
    }

    /// Read an int8 tensor (the official quantized weights) as its raw bytes (U8), on the CPU.
    pub fn get_int8(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.refuse_quantized_target(name)?;
        let (t, signed, path) = self.read_checked(name, shape)?;
        if !signed {
            return Err(Error::checkpoint(
                path,
                format!("tensor {name} is {:?}, int8 was expected", t.dtype()),
            ));
        }
        Ok(t)
    }
}
