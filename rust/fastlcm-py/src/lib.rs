//! Thin PyO3 bindings: convert types, release the GIL, map errors. Logic lives in `fastlcm-data`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fastlcm_data::samples::Filters;
use fastlcm_data::source::SourceOptions;
use fastlcm_data::stats::Stats;
use fastlcm_data::{DType, Error, Loader, LoaderConfig, Poll, ResumeState};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

create_exception!(
    fastlcm.data,
    LoaderError,
    PyException,
    "Base class of every data-loader failure."
);
create_exception!(
    fastlcm.data,
    ShardSourceError,
    LoaderError,
    "A shard could not be opened or streamed (file, HTTP, pipe)."
);
create_exception!(
    fastlcm.data,
    TarFormatError,
    LoaderError,
    "A shard is not a well-formed tar or ends early."
);
create_exception!(
    fastlcm.data,
    DecodeError,
    LoaderError,
    "An image member could not be decoded."
);
create_exception!(
    fastlcm.data,
    NoDataError,
    LoaderError,
    "Every source failed or nothing decodes."
);
create_exception!(
    fastlcm.data,
    TooManyRejectionsError,
    LoaderError,
    "Too many consecutive samples were skipped."
);

fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::InvalidArgument(_) => PyValueError::new_err(msg),
        Error::Io { .. } | Error::Source { .. } => ShardSourceError::new_err(msg),
        Error::Tar { .. } => TarFormatError::new_err(msg),
        Error::Decode { .. } => DecodeError::new_err(msg),
        Error::NoData(_) => NoDataError::new_err(msg),
        Error::TooManyRejections { .. } => TooManyRejectionsError::new_err(msg),
        Error::Usage(_) => LoaderError::new_err(msg),
    }
}

/// The Rust loader behind `fastlcm.data.ShardLoader` (use that class; this one takes resolved arguments).
#[pyclass(module = "fastlcm._native", name = "Loader")]
struct PyLoader {
    inner: Mutex<Loader>,
    stats: Arc<Stats>,
    fingerprint: Vec<(&'static str, u64)>,
}

fn lock(m: &Mutex<Loader>) -> MutexGuard<'_, Loader> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The optional json member of each sample as Python bytes (None where absent).
fn json_list<'py>(py: Python<'py>, json: &[Option<Vec<u8>>]) -> PyResult<Bound<'py, PyList>> {
    let items: Vec<Option<Bound<'py, PyBytes>>> = json
        .iter()
        .map(|j| j.as_deref().map(|b| PyBytes::new(py, b)))
        .collect();
    PyList::new(py, items)
}

impl PyLoader {
    /// Calls `poll` (GIL released, loader locked) until a batch is ready or the stream ends, checking for
    /// Ctrl-C between polls so that a long wait stays interruptible.
    fn poll_until_batch(
        &self,
        py: Python<'_>,
        mut poll: impl FnMut(&mut Loader) -> fastlcm_data::Result<Poll> + Send,
    ) -> PyResult<Option<fastlcm_data::batch::BatchMeta>> {
        loop {
            let polled = py.detach(|| poll(&mut lock(&self.inner)));
            match polled.map_err(to_py)? {
                Poll::Ready(m) => return Ok(Some(m)),
                Poll::Finished => return Ok(None),
                Poll::Pending => py.check_signals()?,
            }
        }
    }
}

#[pymethods]
impl PyLoader {
    #[new]
    #[pyo3(signature = (shards, batch_size, resolution, *, seed, shuffle_buffer, threads, rank, world_size, resampled,
                        epochs, crop, random_flip, dtype, on_error, min_original_width, min_original_height,
                        max_pwatermark, max_consecutive_rejections, dct_scaling, prefetch_batches,
                        http_timeout_s, http_retries, raw=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        shards: Vec<String>,
        batch_size: usize,
        resolution: u32,
        seed: u64,
        shuffle_buffer: usize,
        threads: usize,
        rank: usize,
        world_size: usize,
        resampled: bool,
        epochs: Option<u64>,
        crop: &str,
        random_flip: bool,
        dtype: &str,
        on_error: &str,
        min_original_width: u64,
        min_original_height: u64,
        max_pwatermark: Option<f64>,
        max_consecutive_rejections: u64,
        dct_scaling: bool,
        prefetch_batches: usize,
        http_timeout_s: f64,
        http_retries: u32,
        raw: bool,
    ) -> PyResult<Self> {
        let dtype = DType::parse(dtype).ok_or_else(|| {
            PyValueError::new_err(format!(
                "dtype must be float32, bfloat16, float16 or uint8, got {dtype:?}"
            ))
        })?;
        let center_crop = match crop {
            "random" => false,
            "center" => true,
            other => {
                return Err(PyValueError::new_err(format!(
                    "crop must be 'random' or 'center', got {other:?}"
                )))
            }
        };
        let on_error_raise = match on_error {
            "skip" => false,
            "raise" => true,
            other => {
                return Err(PyValueError::new_err(format!(
                    "on_error must be 'skip' or 'raise', got {other:?}"
                )))
            }
        };
        if !(http_timeout_s.is_finite() && http_timeout_s > 0.0) {
            return Err(PyValueError::new_err(format!(
                "http_timeout_s must be > 0, got {http_timeout_s}"
            )));
        }
        let mut cfg = LoaderConfig::new(shards, batch_size, resolution);
        cfg.seed = seed;
        cfg.shuffle_buffer = shuffle_buffer;
        cfg.threads = threads;
        cfg.rank = rank;
        cfg.world_size = world_size;
        cfg.resampled = resampled;
        cfg.epochs = epochs;
        cfg.center_crop = center_crop;
        cfg.random_flip = random_flip;
        cfg.dtype = dtype;
        cfg.on_error_raise = on_error_raise;
        cfg.filters = Filters {
            min_original_width,
            min_original_height,
            max_pwatermark,
        };
        cfg.max_consecutive_rejections = max_consecutive_rejections;
        cfg.dct_scaling = dct_scaling;
        cfg.prefetch_batches = prefetch_batches;
        cfg.source = SourceOptions {
            timeout: Duration::from_secs_f64(http_timeout_s),
            retries: http_retries,
            ..Default::default()
        };
        cfg.raw = raw;
        let loader = Loader::new(cfg).map_err(to_py)?;
        let stats = loader.stats_handle();
        let fingerprint = loader.fingerprint();
        Ok(PyLoader {
            inner: Mutex::new(loader),
            stats,
            fingerprint,
        })
    }

    /// Bytes the destination buffer of one batch must have.
    fn batch_nbytes(&self, py: Python<'_>) -> usize {
        py.detach(|| lock(&self.inner).batch_nbytes())
    }

    /// The expanded shard URLs (all ranks).
    fn urls(&self, py: Python<'_>) -> Vec<String> {
        py.detach(|| lock(&self.inner).urls().to_vec())
    }

    /// Fills the buffer at `ptr` (`nbytes` bytes, C-contiguous `[B, 3, R, R]`) with the next batch and returns
    /// `(keys, captions, json_bytes, original_sizes, crop_coords, flipped, shards)`, or None at the end.
    /// The caller must keep the buffer alive and unaliased for the duration of the call.
    fn next_batch<'py>(
        &self,
        py: Python<'py>,
        ptr: usize,
        nbytes: usize,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        if ptr == 0 {
            return Err(PyValueError::new_err("destination pointer is null"));
        }
        let meta = self.poll_until_batch(py, |l| {
            if nbytes != l.batch_nbytes() {
                return Err(Error::InvalidArgument(format!(
                    "destination has {nbytes} bytes, a batch needs {}",
                    l.batch_nbytes()
                )));
            }
            // SAFETY: the Python wrapper passes `tensor.data_ptr()` of a freshly allocated contiguous tensor of
            // exactly `nbytes` bytes that it keeps referenced (so alive) and does not touch until this call
            // returns; nothing else holds a Rust reference to that memory.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, nbytes) };
            l.poll_batch(dst, Duration::from_millis(200))
        })?;
        let Some(m) = meta else { return Ok(None) };
        let sizes: Vec<(u32, u32)> = m.original_sizes.iter().map(|s| (s[0], s[1])).collect();
        let crops: Vec<(u32, u32)> = m.crop_coords.iter().map(|s| (s[0], s[1])).collect();
        let items: Vec<Bound<'py, PyAny>> = vec![
            PyList::new(py, m.keys)?.into_any(),
            PyList::new(py, m.captions)?.into_any(),
            json_list(py, &m.json)?.into_any(),
            PyList::new(py, sizes)?.into_any(),
            PyList::new(py, crops)?.into_any(),
            PyList::new(py, m.flipped)?.into_any(),
            PyList::new(py, m.shards)?.into_any(),
        ];
        Ok(Some(PyTuple::new(py, items)?))
    }

    /// Raw mode: the next batch as `(keys, captions, json_bytes, members, shards)` where `members` holds one
    /// `{extension: bytes}` dict per sample, or None at the end.
    fn next_raw_batch<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let meta = self.poll_until_batch(py, |l| {
            if !l.config().raw {
                return Err(Error::Usage(
                    "next_raw_batch needs a loader created with raw=True".into(),
                ));
            }
            l.poll_batch(&mut [], Duration::from_millis(200))
        })?;
        let Some(m) = meta else { return Ok(None) };
        let members = PyList::empty(py);
        for sample in &m.members {
            let d = PyDict::new(py);
            for (ext, bytes) in sample {
                d.set_item(ext, PyBytes::new(py, bytes))?;
            }
            members.append(d)?;
        }
        let items: Vec<Bound<'py, PyAny>> = vec![
            PyList::new(py, m.keys)?.into_any(),
            PyList::new(py, m.captions)?.into_any(),
            json_list(py, &m.json)?.into_any(),
            members.into_any(),
            PyList::new(py, m.shards)?.into_any(),
        ];
        Ok(Some(PyTuple::new(py, items)?))
    }

    /// Resume state as a JSON string (position + a fingerprint of the stream-defining options).
    fn state_json(&self, py: Python<'_>) -> String {
        let s = py.detach(|| lock(&self.inner).state().clone());
        let mut obj = serde_json::json!({
            "version": 1,
            "epoch": s.epoch,
            "epoch_start_position": s.epoch_start,
            "position": s.position,
            "batches_yielded": s.batches,
            "finished": s.finished,
            "shard_counts": s.shard_counts,
        });
        let fp: serde_json::Map<String, serde_json::Value> = self
            .fingerprint
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        obj["config"] = fp.into();
        obj.to_string()
    }

    /// Loads a state produced by `state_json` of a loader with the same configuration.
    fn load_state_json(&self, py: Python<'_>, text: &str) -> PyResult<()> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| PyValueError::new_err(format!("state_dict is not valid: {e}")))?;
        if v.get("version").and_then(|x| x.as_u64()) != Some(1) {
            return Err(PyValueError::new_err(
                "state_dict: unknown or missing 'version' (expected 1)",
            ));
        }
        for (k, want) in &self.fingerprint {
            let got = v
                .get("config")
                .and_then(|c| c.get(*k))
                .and_then(|x| x.as_u64());
            if got != Some(*want) {
                return Err(PyValueError::new_err(format!(
                    "state_dict was saved by a loader with a different {k} ({}) than this one ({want}); resume needs the same configuration",
                    got.map(|g| g.to_string()).unwrap_or_else(|| "missing".into())
                )));
            }
        }
        let field = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_u64())
                .ok_or_else(|| PyValueError::new_err(format!("state_dict: missing integer '{k}'")))
        };
        let s = ResumeState {
            epoch: field("epoch")?,
            epoch_start: field("epoch_start_position")?,
            position: field("position")?,
            batches: field("batches_yielded")?,
            finished: v.get("finished").and_then(|x| x.as_bool()).unwrap_or(false),
            shard_counts: match v.get("shard_counts") {
                None | Some(serde_json::Value::Null) => Vec::new(),
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .map(|x| {
                        x.as_u64().ok_or_else(|| {
                            PyValueError::new_err(
                                "state_dict: shard_counts must be a list of non-negative ints",
                            )
                        })
                    })
                    .collect::<PyResult<Vec<u64>>>()?,
                Some(_) => {
                    return Err(PyValueError::new_err(
                        "state_dict: shard_counts must be a list",
                    ))
                }
            },
        };
        py.detach(|| lock(&self.inner).load_state(s)).map_err(to_py)
    }

    /// Start over from the beginning (used when iterating again after the end).
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| lock(&self.inner).reset()).map_err(to_py)
    }

    /// Counters as a JSON string (see the contract's `stats()`).
    fn stats_json(&self) -> String {
        self.stats.snapshot().to_string()
    }
}

/// Version of the Rust core (`fastlcm-data`).
#[pyfunction]
fn core_version() -> &'static str {
    fastlcm_data::VERSION
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_function(wrap_pyfunction!(core_version, m)?)?;
    m.add_class::<PyLoader>()?;
    m.add("LoaderError", py.get_type::<LoaderError>())?;
    m.add("ShardSourceError", py.get_type::<ShardSourceError>())?;
    m.add("TarFormatError", py.get_type::<TarFormatError>())?;
    m.add("DecodeError", py.get_type::<DecodeError>())?;
    m.add("NoDataError", py.get_type::<NoDataError>())?;
    m.add(
        "TooManyRejectionsError",
        py.get_type::<TooManyRejectionsError>(),
    )?;
    Ok(())
}
