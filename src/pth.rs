//! PyTorch checkpoints (`torch.save` zip archives) read without executing pickled code: the
//! pickle is decoded by candle's reader, tensor records are interpreted here (every storage type
//! the official checkpoints use, int8 `CharStorage` of the quantized ones included), and tensor
//! bytes are sliced straight out of the memory-mapped archive (torch stores them uncompressed).

use crate::error::{Error, Result};
use candle_core::pickle::{Object, Stack};
use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

/// Element types found in PyTorch storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PthDType {
    F16,
    BF16,
    F32,
    F64,
    I8,
    U8,
    I64,
    I32,
    Bool,
}

impl PthDType {
    fn from_storage(class: &str) -> Option<Self> {
        Some(match class {
            "HalfStorage" => PthDType::F16,
            "BFloat16Storage" => PthDType::BF16,
            "FloatStorage" => PthDType::F32,
            "DoubleStorage" => PthDType::F64,
            "CharStorage" => PthDType::I8,
            "ByteStorage" => PthDType::U8,
            "LongStorage" => PthDType::I64,
            "IntStorage" => PthDType::I32,
            "BoolStorage" => PthDType::Bool,
            _ => return None,
        })
    }

    pub fn size(&self) -> usize {
        match self {
            PthDType::F16 | PthDType::BF16 => 2,
            PthDType::F32 | PthDType::I32 => 4,
            PthDType::F64 | PthDType::I64 => 8,
            PthDType::I8 | PthDType::U8 | PthDType::Bool => 1,
        }
    }
}

/// Where one tensor's bytes are.
#[derive(Debug, Clone)]
pub struct PthTensor {
    pub dtype: PthDType,
    pub shape: Vec<usize>,
    /// Byte range in the archive file.
    pub start: usize,
    pub len: usize,
}

fn bad(path: &Path, m: impl std::fmt::Display) -> Error {
    Error::checkpoint(path, format!("{m}; truncated or corrupt?"))
}

fn usizes(o: Object) -> Option<Vec<usize>> {
    match o {
        Object::Tuple(v) | Object::List(v) => v
            .into_iter()
            .map(|x| match x {
                Object::Int(i) if i >= 0 => Some(i as usize),
                Object::Long(i) if i >= 0 => Some(i as usize),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, ...)` -> (storage key, dtype, offset, shape, stride)
fn tensor_record(value: Object) -> Option<(String, PthDType, usize, Vec<usize>, Vec<usize>)> {
    let Object::Reduce { callable, args } = value else {
        return None;
    };
    let (callable, args) = match *callable {
        Object::Class {
            module_name,
            class_name,
        } if module_name == "torch._utils" && class_name == "_rebuild_parameter" => {
            // _rebuild_parameter(tensor, requires_grad, hooks)
            let Object::Tuple(mut a) = *args else {
                return None;
            };
            if a.is_empty() {
                return None;
            }
            let Object::Reduce { callable, args } = a.remove(0) else {
                return None;
            };
            (*callable, *args)
        }
        c => (c, *args),
    };
    match &callable {
        Object::Class {
            module_name,
            class_name,
        } if module_name == "torch._utils" && class_name == "_rebuild_tensor_v2" => {}
        _ => return None,
    }
    let Object::Tuple(mut a) = args else {
        return None;
    };
    if a.len() < 4 {
        return None;
    }
    let stride = usizes(a.remove(3))?;
    let shape = usizes(a.remove(2))?;
    let offset = match a.remove(1) {
        Object::Int(i) if i >= 0 => i as usize,
        Object::Long(i) if i >= 0 => i as usize,
        _ => return None,
    };
    // PersistentLoad(("storage", StorageClass, key, location, numel))
    let Object::PersistentLoad(p) = a.remove(0) else {
        return None;
    };
    let Object::Tuple(mut s) = *p else {
        return None;
    };
    if s.len() < 3 {
        return None;
    }
    let key = match s.remove(2) {
        Object::Unicode(k) => k,
        _ => return None,
    };
    let dtype = match s.remove(1) {
        Object::Class { class_name, .. } => PthDType::from_storage(&class_name)?,
        _ => return None,
    };
    Some((key, dtype, offset, shape, stride))
}

/// The tensors of a PyTorch checkpoint archive, by name.
pub fn read_index(path: &Path) -> Result<HashMap<String, PthTensor>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| bad(path, format!("not a zip archive ({e})")))?;
    let pkl = (0..zip.len())
        .filter_map(|i| {
            zip.name_for_index(i)
                .and_then(|n| n.ok())
                .map(|n| n.to_string())
        })
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| bad(path, "no data.pkl in the archive"))?;
    let dir = pkl.trim_end_matches("data.pkl").to_string();
    let obj = {
        let mut bytes = vec![];
        zip.by_name(&pkl)
            .map_err(|e| bad(path, e))?
            .read_to_end(&mut bytes)
            .map_err(|e| bad(path, e))?;
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut std::io::Cursor::new(bytes))
            .map_err(|e| bad(path, format!("pickle: {e}")))?;
        stack
            .finalize()
            .map_err(|e| bad(path, format!("pickle: {e}")))?
    };
    let obj = match obj {
        Object::Build { callable, args } => match *callable {
            Object::Reduce { callable, .. } if matches!(&*callable, Object::Class { class_name, .. } if class_name == "Module") => {
                *args
            }
            other => Object::Build {
                callable: Box::new(other),
                args,
            },
        },
        o => o,
    };
    let Object::Dict(items) = obj else {
        return Err(bad(path, "the pickle is not a state dict"));
    };
    let mut out = HashMap::new();
    for (k, v) in items {
        let Object::Unicode(name) = k else { continue };
        let Some((key, dtype, offset, shape, stride)) = tensor_record(v) else {
            continue;
        };
        // contiguous (row-major) tensors only, as torch.save writes parameters
        let mut expect = 1;
        for (d, s) in shape.iter().zip(&stride).rev() {
            if *d > 1 && *s != expect {
                return Err(Error::checkpoint(
                    path,
                    format!("tensor {name} is not contiguous (stride {stride:?})"),
                ));
            }
            expect *= d;
        }
        let numel: usize = shape.iter().product();
        let entry_name = format!("{dir}data/{key}");
        let entry = zip
            .by_name(&entry_name)
            .map_err(|e| bad(path, format!("tensor {name}: storage {entry_name}: {e}")))?;
        if entry.compression() != zip::CompressionMethod::Stored {
            return Err(Error::checkpoint(
                path,
                format!("tensor {name}: compressed storages are not supported"),
            ));
        }
        let data_start = entry
            .data_start()
            .ok_or_else(|| bad(path, format!("tensor {name}: no data offset")))?
            as usize;
        let start = data_start + offset * dtype.size();
        let len = numel * dtype.size();
        if offset * dtype.size() + len > entry.size() as usize {
            return Err(bad(path, format!("tensor {name} runs past its storage")));
        }
        out.insert(
            name,
            PthTensor {
                dtype,
                shape,
                start,
                len,
            },
        );
    }
    Ok(out)
}
