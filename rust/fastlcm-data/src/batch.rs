//! Fixed-shape batches: decoded samples in stream order → one `[B, 3, R, R]` buffer plus per-sample metadata.

use std::sync::Arc;

use crate::config::DType;
use crate::decode::{write_chw, Placement};

/// One decoded sample waiting for its batch slot.
#[derive(Debug)]
pub struct DecodedSample {
    pub key: String,
    pub caption: String,
    pub json: Option<Vec<u8>>,
    pub shard: Arc<str>,
    pub placement: Placement,
    /// R×R×3 packed RGB u8 after resize/crop/flip (empty in raw mode).
    pub pixels: Vec<u8>,
    /// Raw mode: every member as (extension, bytes); empty in image mode.
    pub members: Vec<(String, Vec<u8>)>,
}

/// Everything about a batch except the pixels (which went into the caller's buffer).
#[derive(Debug, Default, Clone)]
pub struct BatchMeta {
    pub keys: Vec<String>,
    pub captions: Vec<String>,
    pub json: Vec<Option<Vec<u8>>>,
    /// (height, width) of the decoded source image.
    pub original_sizes: Vec<[u32; 2]>,
    /// (top, left) of the crop in the resized image.
    pub crop_coords: Vec<[u32; 2]>,
    pub flipped: Vec<bool>,
    pub shards: Vec<String>,
    /// Raw mode: each sample's members as (extension, bytes); empty in image mode.
    pub members: Vec<Vec<(String, Vec<u8>)>>,
}

/// Bytes one batch needs: B × 3 × R × R × element size.
pub fn batch_nbytes(batch_size: usize, resolution: u32, dtype: DType) -> usize {
    batch_size * 3 * (resolution as usize).pow(2) * dtype.size()
}

/// Writes every sample into its slot of `dst` (in parallel over up to `threads` threads) and collects metadata.
/// Raw mode (`dst` empty): no pixels; the samples' members move into the metadata.
pub fn assemble(
    samples: &mut [DecodedSample],
    dtype: DType,
    dst: &mut [u8],
    threads: usize,
) -> BatchMeta {
    assert!(!samples.is_empty());
    let slot = dst.len() / samples.len();
    assert_eq!(slot * samples.len(), dst.len());
    let workers = threads.clamp(1, samples.len());
    let per = samples.len().div_ceil(workers);
    if slot == 0 {
        // Raw mode: nothing to write.
    } else if workers == 1 {
        for (s, d) in samples.iter().zip(dst.chunks_exact_mut(slot)) {
            write_chw(&s.pixels, dtype, d);
        }
    } else {
        std::thread::scope(|scope| {
            for (ss, dd) in samples.chunks(per).zip(dst.chunks_mut(per * slot)) {
                scope.spawn(move || {
                    for (s, d) in ss.iter().zip(dd.chunks_exact_mut(slot)) {
                        write_chw(&s.pixels, dtype, d);
                    }
                });
            }
        });
    }
    let mut m = BatchMeta::default();
    for s in samples.iter_mut() {
        m.keys.push(s.key.clone());
        m.captions.push(s.caption.clone());
        m.json.push(s.json.clone());
        m.original_sizes
            .push([s.placement.orig_h, s.placement.orig_w]);
        m.crop_coords.push([s.placement.top, s.placement.left]);
        m.flipped.push(s.placement.flipped);
        m.shards.push(s.shard.to_string());
        if !s.members.is_empty() {
            m.members.push(std::mem::take(&mut s.members));
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(v: u8) -> DecodedSample {
        DecodedSample {
            key: format!("k{v}"),
            caption: "c".into(),
            json: None,
            shard: Arc::from("s.tar"),
            placement: Placement {
                orig_h: 4,
                orig_w: 5,
                top: 1,
                left: 0,
                flipped: false,
            },
            pixels: vec![v; 2 * 2 * 3],
            members: Vec::new(),
        }
    }

    #[test]
    fn slots_follow_sample_order_for_any_thread_count() {
        let mut samples: Vec<_> = (0..5).map(sample).collect();
        let n = batch_nbytes(5, 2, DType::U8);
        let mut reference = vec![0u8; n];
        assemble(&mut samples, DType::U8, &mut reference, 1);
        for t in [2, 3, 8] {
            let mut d = vec![0u8; n];
            let m = assemble(&mut samples, DType::U8, &mut d, t);
            assert_eq!(d, reference);
            assert_eq!(m.keys, vec!["k0", "k1", "k2", "k3", "k4"]);
            assert_eq!(m.original_sizes[0], [4, 5]);
        }
        assert!(reference[12..24].iter().all(|&b| b == 1));
    }

    #[test]
    fn raw_mode_moves_members_and_writes_nothing() {
        let mut samples: Vec<_> = (0..3).map(sample).collect();
        for (i, s) in samples.iter_mut().enumerate() {
            s.pixels.clear();
            s.members = vec![("latent.safetensors".into(), vec![i as u8; 4])];
        }
        let m = assemble(&mut samples, DType::F32, &mut [], 2);
        assert_eq!(m.members.len(), 3);
        assert_eq!(m.members[2][0].1, vec![2u8; 4]);
        assert!(samples.iter().all(|s| s.members.is_empty()));
    }
}
