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

/// The only globals a `torch.save`d state dict refers to: the tensor rebuild functions, the
/// storage classes and `OrderedDict`. Anything else (`os.system`, a model class) is refused.
fn allowed_global(module: &str, name: &str) -> bool {
    match module {
        "torch._utils" => matches!(
            name,
            "_rebuild_tensor_v2" | "_rebuild_parameter" | "_rebuild_parameter_with_state"
        ),
        "collections" => name == "OrderedDict",
        "torch" => PthDType::from_storage(name).is_some(),
        _ => false,
    }
}

/// Largest `data.pkl` read (a 6B state dict's is about 100 KB).
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Deepest nesting of containers a state dict pickle may have (a real one has about 5).
const MAX_DEPTH: u32 = 64;

/// Check a pickle before it is decoded: every opcode known, every length within the bytes that
/// are left, containers nested at most [`MAX_DEPTH`] deep, only [`allowed_global`]s. The check
/// runs the pickle machine on the nesting depth of each value instead of the values, so a
/// hostile file costs at most one pass over its bytes (no deep recursion, no huge allocation).
fn check_pickle(data: &[u8]) -> std::result::Result<(), String> {
    // each stack entry: (nesting depth, text of a pushed string, for STACK_GLOBAL)
    let mut stack: Vec<(u32, Option<String>)> = vec![];
    let mut marks: Vec<usize> = vec![];
    let mut memo: HashMap<u64, u32> = HashMap::new();
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: usize| -> std::result::Result<&[u8], String> {
        if n > data.len() - *pos {
            return Err(format!(
                "a length of {n} bytes at offset {} runs past the pickle",
                *pos
            ));
        }
        let out = &data[*pos..*pos + n];
        *pos += n;
        Ok(out)
    };
    let uint = |b: &[u8]| b.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64);
    let line = |pos: &mut usize| -> std::result::Result<String, String> {
        let rest = &data[*pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("an unterminated text argument")?;
        *pos += n + 1;
        Ok(String::from_utf8_lossy(&rest[..n]).into_owned())
    };
    // the key argument of GET/PUT (text), BINGET/BINPUT (1 byte), LONG_BINGET/LONG_BINPUT (4)
    let memo_key = |pos: &mut usize, op: u8| -> std::result::Result<u64, String> {
        match op {
            b'g' | b'p' => line(pos)?
                .trim()
                .parse::<u64>()
                .map_err(|_| "a bad memo key".to_string()),
            b'h' | b'q' => Ok(uint(take(pos, 1)?)),
            _ => Ok(uint(take(pos, 4)?)),
        }
    };
    fn pop(
        stack: &mut Vec<(u32, Option<String>)>,
    ) -> std::result::Result<(u32, Option<String>), String> {
        stack.pop().ok_or_else(|| "stack underflow".to_string())
    }
    fn to_mark(
        stack: &mut Vec<(u32, Option<String>)>,
        marks: &mut Vec<usize>,
    ) -> std::result::Result<u32, String> {
        let m = marks.pop().ok_or("no mark")?;
        if m > stack.len() {
            return Err("mark beyond the stack".into());
        }
        Ok(stack.drain(m..).map(|(d, _)| d).max().unwrap_or(0))
    }
    let nest = |d: u32| -> std::result::Result<u32, String> {
        if d + 1 > MAX_DEPTH {
            Err(format!("containers nested deeper than {MAX_DEPTH}"))
        } else {
            Ok(d + 1)
        }
    };
    // a container on top of the stack takes in items of depth `d`
    let grow =
        |stack: &mut Vec<(u32, Option<String>)>, d: u32| -> std::result::Result<(), String> {
            let top = stack.last_mut().ok_or("stack underflow")?;
            top.0 = top.0.max(nest(d)?);
            top.1 = None;
            Ok(())
        };
    loop {
        let op = *take(&mut pos, 1)?.first().expect("one byte");
        match op {
            b'.' => return Ok(()),            // STOP
            0x80 => drop(take(&mut pos, 1)?), // PROTO
            0x95 => drop(take(&mut pos, 8)?), // FRAME
            b'K' | b'M' | b'J' | b'G' => {
                let n = match op {
                    b'K' => 1,
                    b'M' => 2,
                    b'J' => 4,
                    _ => 8,
                };
                take(&mut pos, n)?;
                stack.push((0, None));
            }
            b'I' | b'L' | b'F' | b'S' => {
                line(&mut pos)?;
                stack.push((0, None));
            }
            b'V' => {
                let t = line(&mut pos)?;
                stack.push((0, Some(t)));
            }
            0x8a | 0x8b | b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 | 0x8c | b'X' | 0x8d => {
                // LONG1 LONG4 BINSTRING SHORT_BINSTRING BINBYTES SHORT_BINBYTES BINBYTES8
                // BYTEARRAY8 SHORT_BINUNICODE BINUNICODE BINUNICODE8: a length, then the bytes
                let width = match op {
                    0x8a | b'U' | b'C' | 0x8c => 1,
                    0x8b | b'T' | b'B' | b'X' => 4,
                    _ => 8,
                };
                let n = uint(take(&mut pos, width)?);
                let n = usize::try_from(n).map_err(|_| format!("a length of {n} bytes"))?;
                let bytes = take(&mut pos, n)?;
                let text = matches!(op, 0x8c | b'X' | 0x8d)
                    .then(|| String::from_utf8_lossy(bytes).into_owned());
                stack.push((0, text));
            }
            b'N' | 0x88 | 0x89 => stack.push((0, None)),
            b']' | b')' | b'}' | 0x8f => stack.push((1, None)),
            b'(' => marks.push(stack.len()),
            b't' | b'l' | b'd' | 0x91 => {
                let d = to_mark(&mut stack, &mut marks)?;
                stack.push((nest(d)?, None));
            }
            0x85 | 0x86 | 0x87 => {
                let n = (op - 0x84) as usize;
                let mut d = 0;
                for _ in 0..n {
                    d = d.max(pop(&mut stack)?.0);
                }
                stack.push((nest(d)?, None));
            }
            b'a' => {
                let (d, _) = pop(&mut stack)?;
                grow(&mut stack, d)?;
            }
            b's' => {
                let (v, _) = pop(&mut stack)?;
                let (k, _) = pop(&mut stack)?;
                grow(&mut stack, v.max(k))?;
            }
            b'e' | b'u' | 0x90 => {
                let d = to_mark(&mut stack, &mut marks)?;
                grow(&mut stack, d)?;
            }
            b'0' => drop(pop(&mut stack)?),
            b'1' => drop(to_mark(&mut stack, &mut marks)?),
            b'2' => {
                let top = stack.last().cloned().ok_or("stack underflow")?;
                stack.push(top);
            }
            b'g' | b'h' | b'j' => {
                let key = memo_key(&mut pos, op)?;
                let d = *memo.get(&key).ok_or("a memo key used before it was set")?;
                stack.push((d, None));
            }
            b'p' | b'q' | b'r' | 0x94 => {
                let key = match op {
                    0x94 => memo.len() as u64, // MEMOIZE: the next free key
                    _ => memo_key(&mut pos, op)?,
                };
                let d = stack.last().ok_or("stack underflow")?.0;
                memo.insert(key, d);
            }
            b'c' => {
                let module = line(&mut pos)?;
                let name = line(&mut pos)?;
                if !allowed_global(&module, &name) {
                    return Err(format!(
                        "it refers to {module}.{name}, which a state dict never needs"
                    ));
                }
                stack.push((0, None));
            }
            0x93 => {
                let (_, name) = pop(&mut stack)?;
                let (_, module) = pop(&mut stack)?;
                match (module, name) {
                    (Some(m), Some(n)) if allowed_global(&m, &n) => stack.push((0, None)),
                    (m, n) => {
                        return Err(format!(
                            "it refers to {}.{}, which a state dict never needs",
                            m.unwrap_or_default(),
                            n.unwrap_or_default()
                        ))
                    }
                }
            }
            b'R' | 0x81 => {
                let (a, _) = pop(&mut stack)?;
                let (c, _) = pop(&mut stack)?;
                stack.push((nest(a.max(c))?, None));
            }
            b'b' => {
                let (d, _) = pop(&mut stack)?;
                grow(&mut stack, d)?;
            }
            b'Q' => {
                let (d, _) = pop(&mut stack)?;
                stack.push((nest(d)?, None));
            }
            _ => {
                return Err(format!(
                    "opcode 0x{op:02x} at offset {} is not one a state dict uses",
                    pos - 1
                ))
            }
        }
    }
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
        let mut entry = zip.by_name(&pkl).map_err(|e| bad(path, e))?;
        // a state dict's pickle is a few hundred bytes per tensor
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(Error::checkpoint(
                path,
                format!(
                    "{pkl} is {} bytes, more than a state dict's pickle",
                    entry.size()
                ),
            ));
        }
        let mut bytes = vec![];
        entry
            .by_ref()
            .take(MAX_PICKLE_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(path, e))?;
        check_pickle(&bytes).map_err(|e| {
            Error::checkpoint(path, format!("{pkl} is not a PyTorch state dict: {e}"))
        })?;
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut std::io::Cursor::new(bytes))
            .map_err(|e| bad(path, format!("pickle: {e}")))?;
        stack
            .finalize()
            .map_err(|e| bad(path, format!("pickle: {e}")))?
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
