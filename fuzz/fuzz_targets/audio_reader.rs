//! Any bytes as an uploaded audio file (ccsm::audio_in::read_bytes): an error or audio, never a panic,
//! an abort or a hang. Seeds: the audio fixtures (every format the reader takes).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Ten seconds at most: a header claiming hours must not make the fuzzer wait.
    if let Ok(audio) = ccsm::audio_in::read_bytes(data.to_vec(), "fuzz input", 10.0) {
        assert!(!audio.samples.is_empty() && audio.samples.iter().all(|s| s.is_finite()));
        assert!(audio.sample_rate > 0 && audio.sample_rate <= ccsm::audio_in::MAX_RATE);
    }
});
