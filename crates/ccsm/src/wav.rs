//! WAV output: 16-bit PCM or 32-bit float, written whole to a file (sizes patched at the end) or
//! streamed (a header of unknown length, sizes 0xFFFFFFFF, then samples as they are decoded).

use std::io::{Seek, SeekFrom, Write};

/// How samples are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleFormat {
    /// 16-bit signed PCM (what every player opens).
    #[default]
    S16,
    /// 32-bit IEEE float.
    F32,
}

impl SampleFormat {
    /// Bytes one sample takes in the file (2 or 4).
    pub fn bytes_per_sample(self) -> usize {
        match self {
            SampleFormat::S16 => 2,
            SampleFormat::F32 => 4,
        }
    }
}

/// The stream a WAV describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WavSpec {
    /// Sample frames per second (24000 for Mimi's output).
    pub sample_rate: u32,
    /// Interleaved channels per frame.
    pub channels: u16,
    /// How each sample is stored.
    pub format: SampleFormat,
}

/// RIFF and data sizes of a stream whose length is not known yet.
const UNKNOWN: u32 = u32::MAX;

impl WavSpec {
    /// The header for `data_bytes` of samples (`None`: unknown, streamed). PCM gets the 16-byte fmt
    /// chunk; float gets cbSize and a fact chunk, as the format asks of non-PCM data.
    pub fn header(&self, data_bytes: Option<u64>) -> Vec<u8> {
        let bytes = self.format.bytes_per_sample() as u32;
        let data = data_bytes.map_or(UNKNOWN, |b| u32::try_from(b).unwrap_or(UNKNOWN));
        let float = self.format == SampleFormat::F32;
        let fmt_len: u32 = if float { 18 } else { 16 };
        let fact_len: u32 = if float { 12 } else { 0 };
        let riff = if data == UNKNOWN { UNKNOWN } else { (4 + 8 + fmt_len + fact_len + 8).saturating_add(data) };
        let mut h = Vec::with_capacity(60);
        h.extend_from_slice(b"RIFF");
        h.extend_from_slice(&riff.to_le_bytes());
        h.extend_from_slice(b"WAVEfmt ");
        h.extend_from_slice(&fmt_len.to_le_bytes());
        h.extend_from_slice(&(if float { 3u16 } else { 1u16 }).to_le_bytes());
        h.extend_from_slice(&self.channels.to_le_bytes());
        h.extend_from_slice(&self.sample_rate.to_le_bytes());
        h.extend_from_slice(&(self.sample_rate * self.channels as u32 * bytes).to_le_bytes());
        h.extend_from_slice(&(self.channels * bytes as u16).to_le_bytes());
        h.extend_from_slice(&(bytes as u16 * 8).to_le_bytes());
        if float {
            h.extend_from_slice(&0u16.to_le_bytes());
            let frames = if data == UNKNOWN { UNKNOWN } else { data / (bytes * self.channels as u32) };
            h.extend_from_slice(b"fact");
            h.extend_from_slice(&4u32.to_le_bytes());
            h.extend_from_slice(&frames.to_le_bytes());
        }
        h.extend_from_slice(b"data");
        h.extend_from_slice(&data.to_le_bytes());
        h
    }

    /// Samples in [-1, 1] as stored bytes (16-bit: rounded and clipped).
    pub fn encode(&self, samples: &[f32]) -> Vec<u8> {
        match self.format {
            SampleFormat::S16 => samples.iter().flat_map(|&x| ((x.clamp(-1.0, 1.0) * 32767.0).round() as i16).to_le_bytes()).collect(),
            SampleFormat::F32 => samples.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// Writes a WAV as samples arrive. On a seekable output `finish` patches the sizes into the header;
/// a stream keeps the unknown-length header players accept for live audio.
pub struct WavWriter<W: Write> {
    out: W,
    spec: WavSpec,
    data_bytes: u64,
    seekable: bool,
}

impl<W: Write> WavWriter<W> {
    /// A stream (stdout, a socket): the header says the length is unknown.
    pub fn streaming(mut out: W, spec: WavSpec) -> std::io::Result<Self> {
        out.write_all(&spec.header(None))?;
        Ok(WavWriter { out, spec, data_bytes: 0, seekable: false })
    }

    /// Appends `samples` (in [-1, 1], channels interleaved), encoded as the spec says.
    pub fn write(&mut self, samples: &[f32]) -> std::io::Result<()> {
        let bytes = self.spec.encode(samples);
        self.out.write_all(&bytes)?;
        self.data_bytes += bytes.len() as u64;
        Ok(())
    }

    /// Flushes the output, so a streaming listener hears what was written so far.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    /// Sample frames written so far (samples per channel).
    pub fn frames_written(&self) -> u64 {
        self.data_bytes / (self.spec.format.bytes_per_sample() as u64 * self.spec.channels as u64)
    }
}

impl<W: Write + Seek> WavWriter<W> {
    /// A file: the header is rewritten with the real sizes by `finish`.
    pub fn seekable(mut out: W, spec: WavSpec) -> std::io::Result<Self> {
        out.write_all(&spec.header(Some(0)))?;
        Ok(WavWriter { out, spec, data_bytes: 0, seekable: true })
    }

    /// Writes the final sizes into the header and returns the output.
    pub fn finish(mut self) -> std::io::Result<W> {
        if self.seekable {
            self.out.seek(SeekFrom::Start(0))?;
            self.out.write_all(&self.spec.header(Some(self.data_bytes)))?;
            self.out.seek(SeekFrom::End(0))?;
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn pcm_files_carry_their_sizes_and_streams_say_unknown() {
        let spec = WavSpec { sample_rate: 24000, channels: 1, format: SampleFormat::S16 };
        let mut w = WavWriter::seekable(std::io::Cursor::new(Vec::new()), spec).unwrap();
        w.write(&[0.0, 1.0, -1.0, 2.0, 0.5]).unwrap();
        let bytes = w.finish().unwrap().into_inner();
        assert_eq!(bytes.len(), 44 + 10);
        assert_eq!((&bytes[0..4], u32_at(&bytes, 4), &bytes[8..16]), (&b"RIFF"[..], 36 + 10, &b"WAVEfmt "[..]));
        assert_eq!((u32_at(&bytes, 24), u32_at(&bytes, 28), &bytes[36..40], u32_at(&bytes, 40)), (24000, 48000, &b"data"[..], 10));
        let samples: Vec<i16> = bytes[44..].chunks(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(samples, [0, 32767, -32767, 32767, 16384], "rounded and clipped");

        let mut stream = WavWriter::streaming(Vec::new(), WavSpec { format: SampleFormat::F32, ..spec }).unwrap();
        stream.write(&[0.25]).unwrap();
        let bytes = stream.out;
        assert_eq!((u32_at(&bytes, 4), u32_at(&bytes, 16), u32_at(&bytes, 20) & 0xffff), (u32::MAX, 18, 3));
        assert_eq!(
            (&bytes[38..42], u32_at(&bytes, 46), &bytes[50..54], u32_at(&bytes, 54)),
            (&b"fact"[..], u32::MAX, &b"data"[..], u32::MAX)
        );
        assert_eq!(f32::from_le_bytes(bytes[58..62].try_into().unwrap()), 0.25);
    }
}
