//! fastlcm-data: the pyo3-free core of fastlcm's data path.
//!
//! Stages (one module each, see DESIGN.md "Data flow"): shards → source → tar → samples → shuffle →
//! decode → batch. Only the error type exists so far; the loader lands with its issue.

pub mod error;

pub use error::{Error, Result};

/// Version of the core crate, shown by `fastlcm --version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
mod tests {
    #[test]
    fn version_is_semver() {
        let parts: Vec<&str> = super::VERSION.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| p.parse::<u32>().is_ok()));
    }
}
