//! Audio in: every format decodes to what libsndfile (Python's soundfile) reads from the same file,
//! resampling agrees with scipy's polyphase resampler, and hostile files are one-line errors.
//! Fixtures: tools/reference/make_audio_fixtures.py.

mod common;

use std::f64::consts::PI;
use std::path::PathBuf;

use ccsm::audio_in::{read_bytes, read_file, resample, MAX_SECONDS};

fn fixtures() -> PathBuf {
    common::repo_root().join("tools/reference/fixtures/audio")
}

fn read_f32(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixtures().join(name)).unwrap();
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// The test signal of make_audio_fixtures.py: sines at 220, 1000, 3150 and 5900 Hz, 0.25 s.
fn signal(rate: u32) -> Vec<f32> {
    let sines = [(220.0, 0.3, 0.0), (1000.0, 0.2, 0.5), (3150.0, 0.15, 1.0), (5900.0, 0.1, 1.5)];
    // numpy rounds halves to even (22050 Hz: 5512 samples).
    let n = (rate as f64 * 0.25).round_ties_even() as usize;
    (0..n)
        .map(|i| {
            let t = i as f64 / rate as f64;
            sines.iter().map(|&(f, a, p): &(f64, f64, f64)| a * (2.0 * PI * f * t + p).sin()).sum::<f64>() as f32
        })
        .collect()
}

#[test]
fn every_format_reads_as_libsndfile_reads_it() {
    // Lossless files decode to the same samples (measured 0); Vorbis through another decoder of the
    // same stream (float rounding of the same synthesis: measured 1.5e-7, here and with AVX2 builds).
    let cases = [
        ("tone-u8.wav", 22050, 1e-6),
        ("tone-s16.wav", 22050, 1e-6),
        ("tone-s24.wav", 22050, 1e-6),
        ("tone-s32.wav", 22050, 1e-6),
        ("tone-f32.wav", 22050, 1e-6),
        ("tone-flac.flac", 44100, 1e-6),
        ("tone-vorbis.ogg", 44100, 1e-4),
    ];
    for (name, rate, tolerance) in cases {
        let audio = read_file(&fixtures().join(name), MAX_SECONDS).unwrap_or_else(|e| panic!("{name}: {e}"));
        let stem = name.split('.').next().unwrap();
        let want = read_f32(&format!("{stem}.ref.f32"));
        assert_eq!(audio.sample_rate, rate, "{name}");
        assert_eq!(audio.samples.len(), want.len(), "{name}: sample count");
        let diff = max_diff(&audio.samples, &want);
        eprintln!("{name}: max |diff| {diff:e} against libsndfile");
        assert!(diff <= tolerance, "{name}: differs from libsndfile's reading by {diff}");
    }
}

#[test]
fn mp3_reads_as_libsndfile_reads_it_after_the_decoder_delay() {
    let audio = read_file(&fixtures().join("tone-mp3.mp3"), MAX_SECONDS).unwrap();
    let want = read_f32("tone-mp3.ref.f32");
    assert_eq!(audio.sample_rate, 44100);
    // Decoders differ in how much of the encoder's delay and padding they trim: find the offset
    // where the two readings agree best, and require it small and the agreement close.
    let (mut best, mut best_offset) = (f32::MAX, 0i64);
    for offset in -2400i64..=2400 {
        let (a, b) =
            if offset >= 0 { (&audio.samples[offset as usize..], &want[..]) } else { (&audio.samples[..], &want[(-offset) as usize..]) };
        let n = a.len().min(b.len());
        if n < 8000 {
            continue;
        }
        let d = max_diff(&a[..n], &b[..n]);
        if d < best {
            (best, best_offset) = (d, offset);
        }
    }
    eprintln!("mp3: best offset {best_offset} samples, max |diff| {best}");
    // Measured 4.5e-7 at offset 0 (gapless trimming on); the bound only separates "the same decode,
    // rounded otherwise" from "misaligned" (which differs by the signal's size, ~0.5).
    assert!(best < 1e-3 && best_offset == 0, "mp3 readings: best {best} at offset {best_offset}");
}

#[test]
fn resampling_agrees_with_scipy() {
    for from in [16000u32, 22050, 44100, 48000] {
        let got = resample(&signal(from), from, 24000).unwrap();
        let want = read_f32(&format!("resample-{from}.f32"));
        // scipy rounds the length up (ceil(n · 24000 / from)), we to the nearest.
        assert!(got.len().abs_diff(want.len()) <= 1, "{from} Hz: {} samples, scipy {}", got.len(), want.len());
        let n = got.len().min(want.len());
        let (got, want) = (&got[..n], &want[..n]);
        // Both filters see the signal start and stop abruptly; compare away from the ends (10 ms).
        let edge = 240;
        let (g, w) = (&got[edge..got.len() - edge], &want[edge..want.len() - edge]);
        let err: f64 = g.iter().zip(w).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / g.len() as f64;
        let power: f64 = w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / w.len() as f64;
        let snr = 10.0 * (power / err).log10();
        eprintln!("{from} Hz -> 24 kHz: SNR {snr:.1} dB against scipy's resample_poly");
        // Measured 60.8 to 63.6 dB: two different band-limiting filters (an FFT resampler and scipy's
        // polyphase FIR) agree to about -61 dB; 55 dB leaves room for another CPU's rounding.
        assert!(snr >= 55.0, "{from} Hz: SNR {snr:.1} dB");
    }
    assert_eq!(resample(&[0.5; 100], 24000, 24000).unwrap(), vec![0.5; 100]);
    assert!(resample(&[0.5; 100], 0, 24000).is_err());
}

/// A WAV header for `data_bytes` of data (the header may lie about them).
fn wav(channels: u16, rate: u32, bits: u16, format: u16, data_bytes: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data_bytes).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&format.to_le_bytes());
    b.extend_from_slice(&channels.to_le_bytes());
    b.extend_from_slice(&rate.to_le_bytes());
    let block = channels as u32 * bits as u32 / 8;
    b.extend_from_slice(&(rate.saturating_mul(block)).to_le_bytes());
    b.extend_from_slice(&(block as u16).to_le_bytes());
    b.extend_from_slice(&bits.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data_bytes.to_le_bytes());
    b.extend_from_slice(data);
    b
}

#[test]
fn hostile_audio_is_a_one_line_error() {
    let second: Vec<u8> = (0..24000u32).flat_map(|i| (((i % 100) as i16 - 50) * 100).to_le_bytes()).collect();
    let nan: Vec<u8> = [0.1f32, f32::NAN, 0.2].iter().flat_map(|v| v.to_le_bytes()).collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("not audio", b"hello, this is text and not a sound".to_vec()),
        ("truncated header", wav(1, 24000, 16, 1, 48000, &second)[..20].to_vec()),
        ("zero channels", wav(0, 24000, 16, 1, 48000, &second)),
        ("zero rate", wav(1, 0, 16, 1, 48000, &second)),
        ("absurd rate", wav(1, 4_000_000_000, 16, 1, 48000, &second)),
        ("float NaN", wav(1, 24000, 32, 3, 12, &nan)),
        ("no samples", wav(1, 24000, 16, 1, 0, &[])),
    ];
    for (what, bytes) in cases {
        let err = read_bytes(bytes, what, MAX_SECONDS).expect_err(what).to_string();
        assert!(err.starts_with(&format!("{what}: ")) && !err.contains('\n'), "{what}: {err}");
    }
    // A header claiming hours on a one-second file reads the second it has.
    let liar = wav(1, 24000, 16, 1, u32::MAX - 64, &second);
    let audio = read_bytes(liar, "liar", MAX_SECONDS).unwrap();
    assert_eq!(audio.samples.len(), 24000);
    // Longer than the limit: refused, saying so.
    let err = read_bytes(wav(1, 24000, 16, 1, 48000, &second), "long", 0.5).unwrap_err().to_string();
    assert!(err.contains("longer than 0.5 s"), "{err}");
}
