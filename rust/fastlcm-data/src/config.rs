//! The loader's configuration and resume state (plain data, shared by the pipeline and the reader), and the
//! option enums (`DType`, `Crop`, `OnError`) with their names.
//!
//! `LoaderConfig::new` holds the core's default of every option, and `LoaderConfig::validate` every range and
//! consistency rule: the Python `LoaderOptions` declares the same options (with the same defaults, which a test
//! compares against `options_json`) but checks only their types, so each rule is written once, here.

use std::str::FromStr;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::samples::Filters;
use crate::source::SourceOptions;

/// Largest output side R a loader accepts.
pub const MAX_RESOLUTION: u32 = 16384;

/// Output element type of a batch (option `dtype`: `float32`, `bfloat16`, `float16`, `uint8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    F16,
    U8,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::U8 => 1,
        }
    }

    /// The option value naming this type (also torch's name for it, without `torch.`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::U8 => "uint8",
        }
    }
}

impl FromStr for DType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "float32" => DType::F32,
            "bfloat16" => DType::BF16,
            "float16" => DType::F16,
            "uint8" => DType::U8,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "dtype must be 'float32', 'bfloat16', 'float16' or 'uint8', got {s:?}"
                )))
            }
        })
    }
}

/// Where the R×R window is cut from the resized image (option `crop`: `random`, `center`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Crop {
    /// A uniformly random window, drawn from `(seed, stream position)`.
    #[default]
    Random,
    /// The centered window.
    Center,
}

impl Crop {
    /// The option value naming this choice.
    pub fn name(self) -> &'static str {
        match self {
            Crop::Random => "random",
            Crop::Center => "center",
        }
    }
}

impl FromStr for Crop {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "random" => Ok(Crop::Random),
            "center" => Ok(Crop::Center),
            _ => Err(Error::InvalidArgument(format!(
                "crop must be 'random' or 'center', got {s:?}"
            ))),
        }
    }
}

/// What a bad shard or sample does (option `on_error`: `skip`, `raise`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnError {
    /// Skip it and count it in the stats (`skipped` by reason).
    #[default]
    Skip,
    /// Raise on the first one.
    Raise,
}

impl OnError {
    /// The option value naming this choice.
    pub fn name(self) -> &'static str {
        match self {
            OnError::Skip => "skip",
            OnError::Raise => "raise",
        }
    }
}

impl FromStr for OnError {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "skip" => Ok(OnError::Skip),
            "raise" => Ok(OnError::Raise),
            _ => Err(Error::InvalidArgument(format!(
                "on_error must be 'skip' or 'raise', got {s:?}"
            ))),
        }
    }
}

/// Everything that defines a loader's stream (see the Python `LoaderOptions` for user-facing docs).
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
    /// Random or center crop.
    pub crop: Crop,
    /// Horizontal flip with probability 1/2.
    pub random_flip: bool,
    /// Output element type.
    pub dtype: DType,
    /// Skip and count bad shards and samples, or raise on the first one.
    pub on_error: OnError,
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
    /// A configuration with the core's default for every option but the two that have none.
    pub fn new(shards: Vec<String>, batch_size: usize) -> Self {
        LoaderConfig {
            shards,
            batch_size,
            resolution: 512,
            seed: 0,
            shuffle_buffer: 1000,
            threads: 1,
            rank: 0,
            world_size: 1,
            resampled: false,
            epochs: Some(1),
            crop: Crop::Random,
            random_flip: false,
            dtype: DType::F32,
            on_error: OnError::Skip,
            filters: Filters::default(),
            max_consecutive_rejections: 10_000,
            dct_scaling: false,
            prefetch_batches: 2,
            source: SourceOptions::default(),
            raw: false,
        }
    }

    /// Checks every range and consistency rule of the options; the error names the option.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.batch_size == 0 {
            return bad(format!("batch_size must be >= 1, got {}", self.batch_size));
        }
        if self.resolution == 0 || self.resolution > MAX_RESOLUTION {
            return bad(format!(
                "resolution must be in 1..={MAX_RESOLUTION}, got {}",
                self.resolution
            ));
        }
        if self.threads == 0 {
            return bad(format!("threads must be >= 1, got {}", self.threads));
        }
        if self.world_size == 0 {
            return bad(format!("world_size must be >= 1, got {}", self.world_size));
        }
        if self.rank >= self.world_size {
            return bad(format!(
                "rank must be in 0..world_size (rank={}, world_size={})",
                self.rank, self.world_size
            ));
        }
        if self.epochs == Some(0) {
            return bad("epochs must be >= 1 or None (forever), got 0".into());
        }
        if self.max_consecutive_rejections == 0 {
            return bad("max_consecutive_rejections must be >= 1, got 0".into());
        }
        if self.prefetch_batches == 0 {
            return bad("prefetch_batches must be >= 1, got 0".into());
        }
        if self.source.timeout.is_zero() {
            return bad("http_timeout_s must be > 0, got 0".into());
        }
        Ok(())
    }

    /// Every option except `shards` and `batch_size`, as the Python `LoaderOptions` names and spells them
    /// (`loader_defaults()` in the bindings is this map for `LoaderConfig::new`).
    pub fn options_json(&self) -> Map<String, Value> {
        let v = json!({
            "resolution": self.resolution,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "threads": self.threads,
            "rank": self.rank,
            "world_size": self.world_size,
            "resampled": self.resampled,
            "epochs": self.epochs,
            "crop": self.crop.name(),
            "random_flip": self.random_flip,
            "dtype": self.dtype.name(),
            "on_error": self.on_error.name(),
            "min_original_width": self.filters.min_original_width,
            "min_original_height": self.filters.min_original_height,
            "max_pwatermark": self.filters.max_pwatermark,
            "max_consecutive_rejections": self.max_consecutive_rejections,
            "dct_scaling": self.dct_scaling,
            "prefetch_batches": self.prefetch_batches,
            "http_timeout_s": self.source.timeout.as_secs_f64(),
            "http_retries": self.source.retries,
            "raw": self.raw,
        });
        match v {
            Value::Object(m) => m,
            _ => unreachable!("json! of an object literal"),
        }
    }
}

/// `secs` seconds of option `option` as a duration; NaN, infinite and negative values have none.
pub fn seconds(option: &str, secs: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(secs).map_err(|_| {
        Error::InvalidArgument(format!(
            "{option} must be a finite number of seconds > 0, got {secs}"
        ))
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LoaderConfig {
        LoaderConfig::new(vec!["a.tar".into()], 2)
    }

    #[test]
    fn defaults_are_valid() {
        cfg().validate().unwrap();
    }

    #[test]
    fn each_rule_names_its_option() {
        type Edit = fn(&mut LoaderConfig);
        let cases: [(Edit, &str); 9] = [
            (|c| c.batch_size = 0, "batch_size must be >= 1"),
            (|c| c.resolution = 0, "resolution must be in 1..=16384"),
            (|c| c.resolution = 16385, "resolution must be in 1..=16384"),
            (|c| c.threads = 0, "threads must be >= 1"),
            (|c| c.world_size = 0, "world_size must be >= 1"),
            (
                |c| c.rank = 2,
                "rank must be in 0..world_size (rank=2, world_size=1)",
            ),
            (|c| c.epochs = Some(0), "epochs must be >= 1 or None"),
            (
                |c| c.max_consecutive_rejections = 0,
                "max_consecutive_rejections must be >= 1",
            ),
            (|c| c.prefetch_batches = 0, "prefetch_batches must be >= 1"),
        ];
        for (edit, want) in cases {
            let mut c = cfg();
            edit(&mut c);
            let msg = c.validate().unwrap_err().to_string();
            assert!(
                msg.starts_with("invalid argument: ") && msg.contains(want),
                "{msg}"
            );
        }
        let mut c = cfg();
        c.source.timeout = seconds("http_timeout_s", 0.0).unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("http_timeout_s must be > 0"));
    }

    #[test]
    fn seconds_refuse_what_is_no_duration() {
        assert_eq!(seconds("t", 1.5).unwrap(), Duration::from_millis(1500));
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let msg = seconds("http_timeout_s", bad).unwrap_err().to_string();
            assert!(
                msg.contains("http_timeout_s must be a finite number of seconds > 0"),
                "{msg}"
            );
        }
    }

    #[test]
    fn choices_parse_and_name_themselves() {
        for c in [Crop::Random, Crop::Center] {
            assert_eq!(c.name().parse::<Crop>().unwrap(), c);
        }
        for o in [OnError::Skip, OnError::Raise] {
            assert_eq!(o.name().parse::<OnError>().unwrap(), o);
        }
        for d in [DType::F32, DType::BF16, DType::F16, DType::U8] {
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
        }
        let msg = "left".parse::<Crop>().unwrap_err().to_string();
        assert_eq!(
            msg,
            "invalid argument: crop must be 'random' or 'center', got \"left\""
        );
        let msg = "ignore".parse::<OnError>().unwrap_err().to_string();
        assert!(msg.contains("on_error must be 'skip' or 'raise'"), "{msg}");
        let msg = "int8".parse::<DType>().unwrap_err().to_string();
        assert!(
            msg.contains("dtype must be") && msg.contains("\"int8\""),
            "{msg}"
        );
    }

    #[test]
    fn options_json_names_every_option() {
        let m = cfg().options_json();
        assert_eq!(m.len(), 21);
        assert_eq!(m["resolution"], 512);
        assert_eq!(m["crop"], "random");
        assert_eq!(m["dtype"], "float32");
        assert_eq!(m["on_error"], "skip");
        assert_eq!(m["epochs"], 1);
        assert_eq!(m["max_pwatermark"], Value::Null);
        assert_eq!(m["http_timeout_s"], 30.0);
        assert!(!m.contains_key("batch_size") && !m.contains_key("shards"));
    }
}
