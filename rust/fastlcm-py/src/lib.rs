//! Thin PyO3 bindings: convert types, release the GIL, map errors. Logic lives in `fastlcm-data`.

use pyo3::prelude::*;

/// Version of the Rust core (`fastlcm-data`).
#[pyfunction]
fn core_version() -> &'static str {
    fastlcm_data::VERSION
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(core_version, m)?)?;
    Ok(())
}
