//! `kv_cache_memory`: how much memory a model's KV pool may take, as a user says it.

use crate::error::{Error, Result};

/// How much memory a model's KV pool may take, as set by a user (`kv_cache_memory`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KvMemory {
    /// This share (0 < f <= 1) of the memory free once the weights are loaded (on the GPU, or
    /// the RAM available on the CPU).
    Fraction(f64),
    /// This many bytes.
    Bytes(u64),
}

impl Default for KvMemory {
    fn default() -> Self {
        Self::Fraction(0.9)
    }
}

impl KvMemory {
    /// `"0.9"` (a share of the free memory: a number up to 1), `"8GiB"` / `"512MiB"` / `"2GB"`
    /// or a byte count (`"8000000000"`).
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim();
        let bad = || {
            Error::invalid(format!(
                "kv_cache_memory={s:?}: give a share of the free memory (0.9), or bytes (8GiB, 512MiB, 8000000000)"
            ))
        };
        let units: [(&str, f64); 8] = [
            ("KiB", 1024.0),
            ("MiB", 1024.0 * 1024.0),
            ("GiB", 1024.0 * 1024.0 * 1024.0),
            ("TiB", 1024.0f64.powi(4)),
            ("KB", 1e3),
            ("MB", 1e6),
            ("GB", 1e9),
            ("TB", 1e12),
        ];
        for (u, m) in units {
            if let Some(n) = t.strip_suffix(u) {
                let x: f64 = n.trim().parse().map_err(|_| bad())?;
                if !(x > 0.0 && x.is_finite()) {
                    return Err(bad());
                }
                return Ok(Self::Bytes((x * m) as u64));
            }
        }
        let x: f64 = t.parse().map_err(|_| bad())?;
        if !(x > 0.0 && x.is_finite()) {
            Err(bad())
        } else if x <= 1.0 {
            Ok(Self::Fraction(x))
        } else {
            Ok(Self::Bytes(x as u64))
        }
    }

    /// The byte limit given `free` bytes of memory after the weights (`None`: unknown).
    pub fn bytes(&self, free: Option<u64>) -> Option<u64> {
        match *self {
            Self::Bytes(b) => Some(b),
            Self::Fraction(f) => free.map(|m| (m as f64 * f) as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_settings_parse() {
        assert_eq!(KvMemory::parse("0.9").unwrap(), KvMemory::Fraction(0.9));
        assert_eq!(KvMemory::parse("1").unwrap(), KvMemory::Fraction(1.0));
        assert_eq!(KvMemory::parse("8GiB").unwrap(), KvMemory::Bytes(8 << 30));
        assert_eq!(
            KvMemory::parse(" 512 MiB").unwrap(),
            KvMemory::Bytes(512 << 20)
        );
        assert_eq!(
            KvMemory::parse("2GB").unwrap(),
            KvMemory::Bytes(2_000_000_000)
        );
        assert_eq!(
            KvMemory::parse("123456789").unwrap(),
            KvMemory::Bytes(123456789)
        );
        for bad in ["", "0", "-1", "nan", "lots", "GiB", "-2GiB", "inf"] {
            let e = KvMemory::parse(bad).unwrap_err().to_string();
            assert!(e.contains("kv_cache_memory"), "{bad:?}: {e}");
        }
        assert_eq!(KvMemory::Fraction(0.5).bytes(Some(1000)), Some(500));
        assert_eq!(KvMemory::Fraction(0.5).bytes(None), None);
        assert_eq!(KvMemory::Bytes(7).bytes(None), Some(7));
    }
}
