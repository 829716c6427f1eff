//! fastlcm-data: the pyo3-free core of fastlcm's data path.
//!
//! Stages (one module each, see DESIGN.md "Data flow"): shards → source → tar → samples → shuffle →
//! decode → batch, driven by `pipeline::Loader` (one `reader` thread, `worker` decode threads, ordered
//! results). Raw mode (cached latents) replaces decode by a safetensors check and yields each sample's member
//! bytes. `config` holds the options (defaults and every rule), `spec` the shard-spec grammar, `resume` the
//! state-dict format.

pub mod batch;
pub mod config;
pub mod decode;
pub mod error;
pub mod pipeline;
pub mod reader;
pub mod resume;
pub mod rng;
pub mod safetensors;
pub mod samples;
pub mod shards;
pub mod shuffle;
pub mod source;
pub mod spec;
pub mod stats;
pub mod tar;
mod worker;

pub use config::{Crop, DType, LoaderConfig, OnError, ResumeState};
pub use error::{Error, Result};
pub use pipeline::{Loader, Poll};

/// Version of the core crate, shown by `fastlcm --version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
mod pipeline_tests;

#[cfg(test)]
mod tests {
    #[test]
    fn version_is_semver() {
        let parts: Vec<&str> = super::VERSION.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| p.parse::<u32>().is_ok()));
    }
}
