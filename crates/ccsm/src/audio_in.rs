//! Audio in: WAV (8/16/24/32-bit PCM and float), FLAC, MP3 and Ogg Vorbis read through `symphonia`,
//! mixed down to mono, bounded in length, and resampled (`rubato`'s FFT resampler) to the rate a codec
//! takes. What cannot be read is one error naming the file and the reason; nothing here panics on bad
//! bytes (the decoders run behind a guard that turns a panic into that error).

use std::io::{Cursor, ErrorKind, Read};
use std::path::Path;

use rubato::{FftFixedIn, Resampler};
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as DecodeError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::{MediaSource, MediaSourceStream};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use crate::error::{Error, Result};

/// Longest audio read by default: ten minutes (a voice needs seconds; a context, a few turns).
pub const MAX_SECONDS: f64 = 600.0;

/// Highest sample rate taken (anything above is a broken or hostile header).
pub const MAX_RATE: u32 = 384_000;

/// Mono samples at their own rate.
#[derive(Clone, Debug, PartialEq)]
pub struct Audio {
    /// Samples in [-1, 1] (float files may hold more), channels averaged.
    pub samples: Vec<f32>,
    /// Samples per second.
    pub sample_rate: u32,
}

impl Audio {
    /// Its length in seconds.
    pub fn seconds(&self) -> f64 {
        self.samples.len() as f64 / self.sample_rate as f64
    }

    /// The same audio at `rate` (see `resample`).
    pub fn resampled(self, rate: u32) -> Result<Audio> {
        let samples = resample(&self.samples, self.sample_rate, rate)?;
        Ok(Audio { samples, sample_rate: rate })
    }
}

/// Reads an audio file (the format is told by its content; the extension only hints), mono, at
/// most `max_seconds` long.
pub fn read_file(path: &Path, max_seconds: f64) -> Result<Audio> {
    let what = path.display().to_string();
    let mut file = std::fs::File::open(path).map_err(|e| audio_error(&what, format!("cannot open it ({e})")))?;
    let mut head = Vec::with_capacity(HEAD_BYTES);
    std::io::Read::by_ref(&mut file)
        .take(HEAD_BYTES as u64)
        .read_to_end(&mut head)
        .map_err(|e| audio_error(&what, format!("cannot read it ({e})")))?;
    check_wav_header(&head).map_err(|why| audio_error(&what, why))?;
    std::io::Seek::rewind(&mut file).map_err(|e| audio_error(&what, format!("cannot read it ({e})")))?;
    let hint = path.extension().and_then(|e| e.to_str()).map(str::to_owned);
    read(Box::new(file), hint.as_deref(), &what, max_seconds)
}

/// Reads audio from bytes (a request's upload); `what` names it in errors.
pub fn read_bytes(bytes: Vec<u8>, what: &str, max_seconds: f64) -> Result<Audio> {
    check_wav_header(&bytes[..bytes.len().min(HEAD_BYTES)]).map_err(|why| audio_error(what, why))?;
    read(Box::new(Cursor::new(bytes)), None, what, max_seconds)
}

/// Bytes read ahead to check a WAV header.
const HEAD_BYTES: usize = 4096;

/// Refuses a WAV header whose format chunk names no channels or an impossible rate, before the
/// decoder sees it (it would divide by the rate).
fn check_wav_header(head: &[u8]) -> std::result::Result<(), String> {
    if head.len() < 12 || &head[0..4] != b"RIFF" || &head[8..12] != b"WAVE" {
        return Ok(());
    }
    let mut at = 12;
    while at + 8 <= head.len() {
        let size = u32::from_le_bytes([head[at + 4], head[at + 5], head[at + 6], head[at + 7]]) as usize;
        if &head[at..at + 4] == b"fmt " && at + 16 <= head.len() {
            let channels = u16::from_le_bytes([head[at + 10], head[at + 11]]);
            let rate = u32::from_le_bytes([head[at + 12], head[at + 13], head[at + 14], head[at + 15]]);
            if channels == 0 {
                return Err("no channels".into());
            }
            if rate == 0 || rate > MAX_RATE {
                return Err(format!("a sample rate of {rate} Hz (1 to {MAX_RATE} Hz are taken)"));
            }
            return Ok(());
        }
        at = at.saturating_add(8).saturating_add(size).saturating_add(size % 2);
    }
    Ok(())
}

fn audio_error(what: &str, why: String) -> Error {
    Error::Audio { what: what.to_owned(), why }
}

fn read(source: Box<dyn MediaSource>, extension: Option<&str>, what: &str, max_seconds: f64) -> Result<Audio> {
    if !(max_seconds.is_finite() && max_seconds > 0.0) {
        return Err(Error::Input(format!("a length limit of {max_seconds} s")));
    }
    // The decoders are third-party code fed untrusted bytes: a panic in them is this file's error.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode(source, extension, what, max_seconds)));
    decoded.unwrap_or_else(|_| Err(audio_error(what, "the decoder failed on its data (corrupt or hostile)".into())))
}

fn decode(source: Box<dyn MediaSource>, extension: Option<&str>, what: &str, max_seconds: f64) -> Result<Audio> {
    let fail = |why: String| audio_error(what, why);
    let mut hint = Hint::new();
    if let Some(e) = extension {
        hint.with_extension(e);
    }
    let stream = MediaSourceStream::new(source, Default::default());
    let probed = symphonia::default::get_probe()
        // Gapless: trim the encoder's delay and padding where the file says them (MP3's LAME tag,
        // Ogg's granule positions), as other readers do.
        .format(&hint, stream, &FormatOptions { enable_gapless: true, ..Default::default() }, &MetadataOptions::default())
        .map_err(|e| fail(format!("not audio this engine reads (WAV, FLAC, MP3, Ogg Vorbis): {e}")))?;
    let mut format = probed.format;
    let track = format.tracks().iter().find(|t| t.codec_params.codec != CODEC_TYPE_NULL).ok_or_else(|| fail("no audio track".into()))?;
    let (track_id, params) = (track.id, track.codec_params.clone());
    let rate = params.sample_rate.ok_or_else(|| fail("no sample rate in its header".into()))?;
    if rate == 0 || rate > MAX_RATE {
        return Err(fail(format!("a sample rate of {rate} Hz (1 to {MAX_RATE} Hz are taken)")));
    }
    if params.channels.is_some_and(|c| c.count() == 0) {
        return Err(fail("no channels".into()));
    }
    let mut decoder =
        symphonia::default::get_codecs().make(&params, &DecoderOptions::default()).map_err(|e| fail(format!("its codec: {e}")))?;
    let limit = (max_seconds * rate as f64) as usize;
    let mut mono = Vec::new();
    let (mut bad_packets, mut good_packets) = (0usize, 0usize);
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(DecodeError::IoError(e)) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(DecodeError::ResetRequired) => break,
            Err(e) => return Err(fail(format!("unreadable: {e}"))),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(d) => d,
            // A damaged packet (or an MP3 frame whose reservoir precedes the stream) is skipped.
            Err(DecodeError::DecodeError(_)) => {
                bad_packets += 1;
                continue;
            }
            Err(DecodeError::IoError(e)) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(fail(format!("undecodable: {e}"))),
        };
        good_packets += 1;
        let spec = *decoded.spec();
        let channels = spec.channels.count();
        if channels == 0 {
            return Err(fail("no channels".into()));
        }
        if spec.rate != rate {
            return Err(fail(format!("its sample rate changes from {rate} to {} Hz", spec.rate)));
        }
        let mut buffer = SampleBuffer::<f32>::new(decoded.capacity() as u64, spec);
        buffer.copy_interleaved_ref(decoded);
        mono.extend(buffer.samples().chunks_exact(channels).map(|frame| frame.iter().sum::<f32>() / channels as f32));
        if mono.len() > limit {
            return Err(fail(format!("longer than {max_seconds} s, the most this engine reads")));
        }
    }
    // A container that knows its length (Ogg's last granule position) may end inside a packet.
    if let Some(frames) = params.n_frames.and_then(|n| usize::try_from(n).ok()).filter(|&n| n > 0) {
        mono.truncate(frames);
    }
    if mono.is_empty() {
        let why = if bad_packets > 0 { format!("none of its {bad_packets} packets decodes") } else { "no samples".to_owned() };
        return Err(fail(why));
    }
    if bad_packets > good_packets {
        return Err(fail(format!("{bad_packets} of its {} packets do not decode", bad_packets + good_packets)));
    }
    if let Some(i) = mono.iter().position(|s| !s.is_finite()) {
        return Err(fail(format!("sample {i} is not a number (NaN or infinite)")));
    }
    Ok(Audio { samples: mono, sample_rate: rate })
}

/// Input frames per resampler call.
const CHUNK: usize = 1024;

/// `samples` at `from` Hz resampled to `to` Hz by rubato's synchronous FFT resampler (band-limited by
/// a Blackman-Harris² window, exact for the rational ratio): round(n · to / from) samples, output
/// sample i at input time i · from / to (the resampler's delay removed).
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>> {
    if from == 0 || to == 0 || from > MAX_RATE || to > MAX_RATE {
        return Err(Error::Input(format!("resampling from {from} Hz to {to} Hz")));
    }
    if from == to || samples.is_empty() {
        return Ok(samples.to_vec());
    }
    let resampling = |e: &dyn std::fmt::Display| Error::Invariant(format!("resampling from {from} Hz to {to} Hz: {e}"));
    let mut resampler = FftFixedIn::<f32>::new(from as usize, to as usize, CHUNK, 2, 1).map_err(|e| resampling(&e))?;
    let delay = resampler.output_delay();
    let wanted = (samples.len() as f64 * to as f64 / from as f64).round() as usize;
    let mut out = Vec::with_capacity(delay + wanted + 2 * CHUNK);
    let mut chunks = samples.chunks_exact(CHUNK);
    for chunk in &mut chunks {
        out.extend_from_slice(&resampler.process(&[chunk], None).map_err(|e| resampling(&e))?[0]);
    }
    out.extend_from_slice(&resampler.process_partial(Some(&[chunks.remainder()]), None).map_err(|e| resampling(&e))?[0]);
    // The resampler holds the last samples back: feed silence until they are out.
    while out.len() < delay + wanted {
        out.extend_from_slice(&resampler.process_partial::<&[f32]>(None, None).map_err(|e| resampling(&e))?[0]);
    }
    Ok(out[delay..delay + wanted].to_vec())
}
