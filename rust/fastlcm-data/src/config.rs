//! The loader's configuration and resume state (plain data, shared by the pipeline and the reader).

use crate::decode::DType;
use crate::samples::Filters;
use crate::source::SourceOptions;

/// Everything that defines a loader's stream (see the Python `ShardLoader` for user-facing docs).
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// Shard specs (brace patterns, `::` lists, paths, file://, http(s)://, pipe:CMD).
    pub shards: Vec<String>,
    /// Samples per batch (B).
    pub batch_size: usize,
    /// Output side R.
    pub resolution: u32,
    /// Seed of every random choice (shard order, shuffle, resampling, crops, flips).
    pub seed: u64,
    /// Shuffle buffer size in samples; 0 = shard order then member order.
    pub shuffle_buffer: usize,
    /// Decode threads.
    pub threads: usize,
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Draw shards with replacement from a per-rank seeded stream (infinite).
    pub resampled: bool,
    /// None = forever.
    pub epochs: Option<u64>,
    /// Center crop instead of random.
    pub center_crop: bool,
    /// Horizontal flip with probability 1/2.
    pub random_flip: bool,
    /// Output element type.
    pub dtype: DType,
    /// Raise on the first bad shard/sample instead of skipping and counting it.
    pub on_error_raise: bool,
    /// json metadata filters.
    pub filters: Filters,
    /// Error out after this many skipped samples in a row.
    pub max_consecutive_rejections: u64,
    /// JPEG: decode at 1/2, 1/4 or 1/8 scale when the short side stays >= R.
    pub dct_scaling: bool,
    /// Batches decoded ahead of the caller.
    pub prefetch_batches: usize,
    /// Timeouts and retries of shard sources.
    pub source: SourceOptions,
    /// Raw mode: no image decoding; each sample yields its members' bytes and must have a valid
    /// `latent.safetensors` member (resolution, crop, flip and dtype are then unused).
    pub raw: bool,
}

impl LoaderConfig {
    pub fn new(shards: Vec<String>, batch_size: usize, resolution: u32) -> Self {
        LoaderConfig {
            shards,
            batch_size,
            resolution,
            seed: 0,
            shuffle_buffer: 1000,
            threads: 1,
            rank: 0,
            world_size: 1,
            resampled: false,
            epochs: Some(1),
            center_crop: false,
            random_flip: false,
            dtype: DType::F32,
            on_error_raise: false,
            filters: Filters::default(),
            max_consecutive_rejections: 10_000,
            dct_scaling: false,
            prefetch_batches: 2,
            source: SourceOptions::default(),
            raw: false,
        }
    }
}

/// Where the stream stands after the last returned batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResumeState {
    pub epoch: u64,
    /// Stream position of the first sample of `epoch`.
    pub epoch_start: u64,
    /// Stream position of the first sample not yet consumed.
    pub position: u64,
    pub batches: u64,
    pub finished: bool,
    /// Samples each shard of `epoch` (in reading order) gave before the shard in progress at `position`.
    pub shard_counts: Vec<u64>,
}
