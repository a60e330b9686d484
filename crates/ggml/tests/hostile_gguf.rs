//! Crafted GGUF files, serialized here byte by byte (independently of the engine's writer): each
//! malformation must come back as its own specific error, never a crash or a huge allocation.

use ggml::gguf::{GgufError, GgufFile};

/// A metadata value as (GGUF type id, encoded bytes).
fn string_value(s: &[u8]) -> (u32, Vec<u8>) {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(s);
    (8, b)
}

struct Raw {
    version: u32,
    kvs: Vec<(Vec<u8>, u32, Vec<u8>)>,
    /// (name, dims, type id, relative offset)
    tensors: Vec<(Vec<u8>, Vec<u64>, u32, u64)>,
    data: Vec<u8>,
    /// Overrides the counts written in the header.
    counts: Option<(u64, u64)>,
}

impl Raw {
    fn valid() -> Raw {
        Raw {
            version: 3,
            kvs: vec![(b"general.name".to_vec(), string_value(b"x").0, string_value(b"x").1)],
            tensors: vec![(b"t".to_vec(), vec![8], 0, 0)],
            data: vec![0u8; 32],
            counts: None,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&self.version.to_le_bytes());
        let (nt, nk) = self.counts.unwrap_or((self.tensors.len() as u64, self.kvs.len() as u64));
        b.extend_from_slice(&nt.to_le_bytes());
        b.extend_from_slice(&nk.to_le_bytes());
        for (k, ty, v) in &self.kvs {
            b.extend_from_slice(&(k.len() as u64).to_le_bytes());
            b.extend_from_slice(k);
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(v);
        }
        for (name, dims, ty, offset) in &self.tensors {
            b.extend_from_slice(&(name.len() as u64).to_le_bytes());
            b.extend_from_slice(name);
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| b.extend_from_slice(&d.to_le_bytes()));
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
        }
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        b.extend_from_slice(&self.data);
        b
    }
}

fn open(raw: &Raw) -> Result<GgufFile, GgufError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crafted.gguf");
    std::fs::write(&path, raw.bytes()).unwrap();
    GgufFile::open(&path)
}

fn error_of(raw: Raw) -> String {
    match open(&raw) {
        Ok(_) => panic!("a crafted file was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_valid_baseline_opens() {
    let file = open(&Raw::valid()).unwrap();
    assert_eq!(file.tensors().len(), 1);
    assert_eq!(file.get::<String>("general.name").unwrap(), "x");
}

#[test]
fn every_malformation_gets_its_own_error() {
    let cases: Vec<(&str, Raw, &str)> = vec![
        ("wrong version", Raw { version: 1, ..Raw::valid() }, "version 1"),
        ("absurd tensor count", Raw { counts: Some((u64::MAX / 2, 1)), ..Raw::valid() }, "cannot fit"),
        ("absurd key count", Raw { counts: Some((1, 1 << 40)), ..Raw::valid() }, "cannot fit"),
        (
            "string longer than the file",
            Raw { kvs: vec![(b"k".to_vec(), 8, (1u64 << 40).to_le_bytes().to_vec())], ..Raw::valid() },
            "string length",
        ),
        ("key of unknown type", Raw { kvs: vec![(b"k".to_vec(), 77, vec![0; 8])], ..Raw::valid() }, "unknown value type 77"),
        (
            "array of a billion items",
            Raw {
                kvs: vec![(b"k".to_vec(), 9, [4u32.to_le_bytes().to_vec(), (1u64 << 30).to_le_bytes().to_vec()].concat())],
                ..Raw::valid()
            },
            "cannot fit",
        ),
        ("non-UTF-8 key", Raw { kvs: vec![(vec![0xff, 0xfe], 4, vec![1, 0, 0, 0])], ..Raw::valid() }, "not UTF-8"),
        (
            "non-UTF-8 string value",
            Raw { kvs: vec![(b"k".to_vec(), string_value(&[0xc3, 0x28]).0, string_value(&[0xc3, 0x28]).1)], ..Raw::valid() },
            "not UTF-8",
        ),
        (
            "duplicate key",
            Raw { kvs: vec![(b"k".to_vec(), 4, vec![1, 0, 0, 0]), (b"k".to_vec(), 4, vec![2, 0, 0, 0])], ..Raw::valid() },
            "appears twice",
        ),
        ("bool neither 0 nor 1", Raw { kvs: vec![(b"k".to_vec(), 7, vec![9])], ..Raw::valid() }, "neither 0 nor 1"),
        (
            "alignment of the wrong type",
            Raw { kvs: vec![(b"general.alignment".to_vec(), string_value(b"32").0, string_value(b"32").1)], ..Raw::valid() },
            "general.alignment",
        ),
        (
            "alignment not a power of two",
            Raw { kvs: vec![(b"general.alignment".to_vec(), 4, 24u32.to_le_bytes().to_vec())], ..Raw::valid() },
            "power of two",
        ),
        (
            "duplicate tensor",
            Raw { tensors: vec![(b"t".to_vec(), vec![8], 0, 0), (b"t".to_vec(), vec![8], 0, 0)], ..Raw::valid() },
            "appears twice",
        ),
        ("zero dimension", Raw { tensors: vec![(b"t".to_vec(), vec![0], 0, 0)], ..Raw::valid() }, "dimension 0"),
        ("five dimensions", Raw { tensors: vec![(b"t".to_vec(), vec![1; 5], 0, 0)], ..Raw::valid() }, "5 dimensions"),
        ("overflowing shape", Raw { tensors: vec![(b"t".to_vec(), vec![1 << 32, 1 << 32, 1 << 32], 0, 0)], ..Raw::valid() }, "overflows"),
        ("unknown tensor type", Raw { tensors: vec![(b"t".to_vec(), vec![8], 99, 0)], ..Raw::valid() }, "type id 99"),
        ("partial quantized block", Raw { tensors: vec![(b"t".to_vec(), vec![8], 8, 0)], ..Raw::valid() }, "blocks of 32"),
        (
            "misaligned data offset",
            Raw { tensors: vec![(b"t".to_vec(), vec![8], 0, 4)], ..Raw::valid() },
            "not a multiple of the alignment",
        ),
        ("data past the end", Raw { tensors: vec![(b"t".to_vec(), vec![1024], 0, 0)], ..Raw::valid() }, "past the end of the file"),
        ("offset past the end", Raw { tensors: vec![(b"t".to_vec(), vec![8], 0, 1 << 40)], ..Raw::valid() }, "past the end of the file"),
    ];
    for (what, raw, expected) in cases {
        let err = error_of(raw);
        assert!(err.contains(expected), "{what}: {err}");
        assert!(err.contains("crafted.gguf") || err.contains("tensor") || err.contains("key"), "{what}: the error says where: {err}");
    }
}

#[test]
fn truncation_at_every_byte_is_an_error() {
    let bytes = Raw::valid().bytes();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    for cut in 0..bytes.len() {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = GgufFile::open(&path).err().unwrap_or_else(|| panic!("cut at {cut} accepted"));
        assert!(
            matches!(err, GgufError::Truncated { .. } | GgufError::Malformed { .. } | GgufError::BadMagic { .. }),
            "cut at {cut}: {err}"
        );
    }
}
