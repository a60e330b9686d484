//! Block geometry and quantize → dequantize round trips, against the documented block formats.

mod common;

use common::{element_error_bounds, Rng, CACHE_TYPES};
use ggml::DType;

#[test]
fn row_sizes_match_the_documented_block_math() {
    // (type, elements per block, bytes per block) from ggml's block definitions:
    // Q8_0 = f16 scale + 32 i8; Q4_0 = f16 scale + 16 nibble bytes; Q4_1 = f16 scale + f16 min + 16.
    let documented = [
        (DType::F32, 1, 4),
        (DType::F16, 1, 2),
        (DType::BF16, 1, 2),
        (DType::Q8_0, 32, 2 + 32),
        (DType::Q4_0, 32, 2 + 16),
        (DType::Q4_1, 32, 2 + 2 + 16),
        (DType::Q5_0, 32, 2 + 4 + 16),
        (DType::Q5_1, 32, 2 + 2 + 4 + 16),
        (DType::IQ4NL, 32, 2 + 16),
        // MXFP4 = one E8M0 exponent byte + 16 nibble bytes.
        (DType::MXFP4, 32, 1 + 16),
        (DType::I32, 1, 4),
        (DType::I64, 1, 8),
    ];
    for (dtype, block, bytes) in documented {
        assert_eq!(dtype.block_size(), block, "{dtype} block size");
        assert_eq!(dtype.type_size(), bytes, "{dtype} block bytes");
        assert_eq!(dtype.row_size(4096).unwrap(), 4096 / block * bytes, "{dtype} row of 4096");
    }
    // Bytes per element of f32, f16, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl, mxfp4: 4, 2, 34/32, 18/32,
    // 20/32, 22/32, 24/32, 18/32, 17/32.
    let per_element: Vec<f64> = CACHE_TYPES.iter().map(|t| t.row_size(32).unwrap() as f64 / 32.0).collect();
    assert_eq!(per_element, vec![4.0, 2.0, 1.0625, 0.5625, 0.625, 0.6875, 0.75, 0.5625, 0.53125]);
}

#[test]
fn partial_blocks_are_refused() {
    for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
        assert!(dtype.row_size(48).is_err(), "{dtype} accepted a row of 48");
        assert!(dtype.quantize(&[0.5; 48], 48).is_err());
    }
}

fn adversarial_rows(rng: &mut Rng) -> Vec<(&'static str, Vec<f32>)> {
    let n = 256;
    let mut outliers = rng.normals(n);
    outliers[5] = 250.0;
    outliers[100] = -1000.0;
    let mut mixed_sign_extremes: Vec<f32> = (0..n).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
    mixed_sign_extremes[3] = 7.3;
    vec![
        ("random normal", rng.normals(n)),
        ("outliers", outliers),
        ("all zero", vec![0.0; n]),
        ("constant", vec![0.7; n]),
        ("negative constant", vec![-3.25; n]),
        ("tiny", rng.normals(n).iter().map(|x| x * 1e-7).collect()),
        // Large but inside f16 range (65504), which bounds every format here.
        ("huge", rng.normals(n).iter().map(|x| (x * 1e4).clamp(-6e4, 6e4)).collect()),
        ("alternating extremes", mixed_sign_extremes),
        ("ramp", (0..n).map(|i| i as f32 / 7.0 - 10.0).collect()),
    ]
}

#[test]
fn round_trip_error_stays_within_the_format_bound() {
    let mut rng = Rng::new(7);
    for (what, row) in adversarial_rows(&mut rng) {
        for dtype in CACHE_TYPES.into_iter().chain([DType::BF16]) {
            let bytes = dtype.quantize(&row, row.len()).unwrap();
            assert_eq!(bytes.len(), dtype.row_size(row.len()).unwrap());
            let back = dtype.dequantize(&bytes, row.len()).unwrap();
            let bounds = element_error_bounds(dtype, &row);
            for (i, ((x, y), bound)) in row.iter().zip(&back).zip(&bounds).enumerate() {
                let err = (x - y).abs();
                assert!(err <= *bound * 1.0001, "{dtype} on {what}: element {i}: {x} -> {y}, error {err} > bound {bound}");
            }
            if what == "all zero" {
                assert!(back.iter().all(|&v| v == 0.0), "{dtype} does not keep zeros exact");
            }
        }
    }
}

#[test]
fn dequantize_checks_the_byte_count() {
    let bytes = DType::Q8_0.quantize(&[1.0; 64], 64).unwrap();
    assert!(DType::Q8_0.dequantize(&bytes[..30], 64).is_err());
    assert!(DType::Q8_0.dequantize(&bytes, 96).is_err());
}
