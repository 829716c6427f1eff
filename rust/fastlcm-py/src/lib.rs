//! Thin PyO3 bindings: convert types, release the GIL, map errors. Logic lives in `fastlcm-data`.
//!
//! The exception classes are declared once, in Python (`fastlcm.errors`), and bound here with
//! `import_exception!`; `to_py` is the one mapping of the core's `Error` onto them.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fastlcm_data::batch::BatchMeta;
use fastlcm_data::config::seconds;
use fastlcm_data::samples::Filters;
use fastlcm_data::source::SourceOptions;
use fastlcm_data::spec::expand_specs;
use fastlcm_data::stats::Stats;
use fastlcm_data::{DType, Error, Loader, LoaderConfig, Poll};
use pyo3::exceptions::PyValueError;
use pyo3::import_exception;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use serde_json::Value;

import_exception!(fastlcm.errors, LoaderError);
import_exception!(fastlcm.errors, LoaderOptionError);
import_exception!(fastlcm.errors, LoaderStateError);
import_exception!(fastlcm.errors, ShardSourceError);
import_exception!(fastlcm.errors, ShardNotFoundError);
import_exception!(fastlcm.errors, ShardPermissionError);
import_exception!(fastlcm.errors, TarFormatError);
import_exception!(fastlcm.errors, DecodeError);
import_exception!(fastlcm.errors, NoDataError);
import_exception!(fastlcm.errors, TooManyRejectionsError);
import_exception!(fastlcm.errors, LatentFormatError);

/// The Python exception for a core error (the message is the core's, one line).
fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::InvalidArgument(_) => LoaderOptionError::new_err(msg),
        Error::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => ShardNotFoundError::new_err(msg),
            std::io::ErrorKind::PermissionDenied => ShardPermissionError::new_err(msg),
            _ => ShardSourceError::new_err(msg),
        },
        Error::Source { .. } => ShardSourceError::new_err(msg),
        Error::Tar { .. } => TarFormatError::new_err(msg),
        Error::Decode { .. } => DecodeError::new_err(msg),
        Error::NoData(_) => NoDataError::new_err(msg),
        Error::TooManyRejections { .. } => TooManyRejectionsError::new_err(msg),
        Error::State(_) => LoaderStateError::new_err(msg),
        Error::Usage(_) => LoaderError::new_err(msg),
    }
}

// ------------------------------------------------------------------------------------------------------------
// Options: the attributes of a resolved `fastlcm.data.LoaderOptions` → `LoaderConfig`
// ------------------------------------------------------------------------------------------------------------

/// A Python int as an unsigned Rust integer (a negative or too large value has no such representation).
fn unsigned<T: TryFrom<i128>>(ob: &Bound<'_, PyAny>) -> PyResult<T> {
    let v: i128 = ob.extract()?;
    T::try_from(v).map_err(|_| {
        PyValueError::new_err(if v < 0 {
            format!("must be >= 0, got {v}")
        } else {
            format!("is too large: {v}")
        })
    })
}

/// `None` or an unsigned integer.
fn unsigned_or_none<T: TryFrom<i128>>(ob: &Bound<'_, PyAny>) -> PyResult<Option<T>> {
    if ob.is_none() {
        Ok(None)
    } else {
        unsigned(ob).map(Some)
    }
}

/// Any Python int as a seed: its low 64 bits (so negative and large seeds keep working).
fn seed_bits(ob: &Bound<'_, PyAny>) -> PyResult<u64> {
    ob.call_method1("__and__", (u64::MAX,))?.extract()
}

/// The attributes of `LoaderOptions` after its `None` "auto" values were resolved in Python. Types only:
/// every range and consistency rule is `LoaderConfig::validate`'s.
#[derive(FromPyObject)]
struct Options {
    #[pyo3(from_py_with = unsigned)]
    batch_size: usize,
    #[pyo3(from_py_with = unsigned)]
    resolution: u32,
    #[pyo3(from_py_with = seed_bits)]
    seed: u64,
    #[pyo3(from_py_with = unsigned)]
    shuffle_buffer: usize,
    #[pyo3(from_py_with = unsigned)]
    threads: usize,
    #[pyo3(from_py_with = unsigned)]
    rank: usize,
    #[pyo3(from_py_with = unsigned)]
    world_size: usize,
    resampled: bool,
    #[pyo3(from_py_with = unsigned_or_none)]
    epochs: Option<u64>,
    crop: String,
    random_flip: bool,
    dtype: String,
    on_error: String,
    #[pyo3(from_py_with = unsigned)]
    min_original_width: u64,
    #[pyo3(from_py_with = unsigned)]
    min_original_height: u64,
    max_pwatermark: Option<f64>,
    #[pyo3(from_py_with = unsigned)]
    max_consecutive_rejections: u64,
    dct_scaling: bool,
    #[pyo3(from_py_with = unsigned)]
    prefetch_batches: usize,
    http_timeout_s: f64,
    #[pyo3(from_py_with = unsigned)]
    http_retries: u32,
    raw: bool,
}

impl Options {
    /// Reads the options object; a failed conversion becomes a one-line `LoaderOptionError` naming the field.
    fn read(ob: &Bound<'_, PyAny>) -> PyResult<Self> {
        let py = ob.py();
        ob.extract().map_err(|e: PyErr| {
            // pyo3 reports "failed to extract field Options.<name>" with the conversion error as the cause.
            let what = e.value(py).to_string();
            let message = match (
                what.strip_prefix("failed to extract field Options."),
                e.cause(py),
            ) {
                (Some(field), Some(cause)) => format!("{field}: {}", cause.value(py)),
                _ => format!("options: {what}"),
            };
            LoaderOptionError::new_err(format!("invalid argument: {message}"))
        })
    }

    fn into_config(self, shards: Vec<String>) -> fastlcm_data::Result<LoaderConfig> {
        let mut cfg = LoaderConfig::new(shards, self.batch_size);
        cfg.resolution = self.resolution;
        cfg.seed = self.seed;
        cfg.shuffle_buffer = self.shuffle_buffer;
        cfg.threads = self.threads;
        cfg.rank = self.rank;
        cfg.world_size = self.world_size;
        cfg.resampled = self.resampled;
        cfg.epochs = self.epochs;
        cfg.crop = self.crop.parse()?;
        cfg.random_flip = self.random_flip;
        cfg.dtype = self.dtype.parse()?;
        cfg.on_error = self.on_error.parse()?;
        cfg.filters = Filters {
            min_original_width: self.min_original_width,
            min_original_height: self.min_original_height,
            max_pwatermark: self.max_pwatermark,
        };
        cfg.max_consecutive_rejections = self.max_consecutive_rejections;
        cfg.dct_scaling = self.dct_scaling;
        cfg.prefetch_batches = self.prefetch_batches;
        cfg.source = SourceOptions {
            timeout: seconds("http_timeout_s", self.http_timeout_s)?,
            retries: self.http_retries,
            ..Default::default()
        };
        cfg.raw = self.raw;
        Ok(cfg)
    }
}

/// A JSON scalar (as the core's option maps hold them) as a Python object.
fn json_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        Value::Number(n) => match n.as_u64() {
            Some(u) => u.into_pyobject(py)?.into_any(),
            None => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Value::String(s) => s.into_pyobject(py)?.into_any(),
        other => other.to_string().into_pyobject(py)?.into_any(),
    })
}

// ------------------------------------------------------------------------------------------------------------
// The batch buffer: a torch tensor, checked here
// ------------------------------------------------------------------------------------------------------------

/// The address and size of a checked destination tensor.
struct Destination {
    ptr: usize,
    nbytes: usize,
}

/// Reads and checks the destination of one image batch: a `torch.Tensor` on the CPU, contiguous, of the
/// loader's dtype and of exactly `nbytes` bytes. Methods are looked up on the type, not the instance, so that
/// an instance attribute cannot stand in for `data_ptr` and the like.
fn destination(tensor: &Bound<'_, PyAny>, dtype: DType, nbytes: usize) -> PyResult<Destination> {
    let bad = |m: String| {
        Err(LoaderOptionError::new_err(format!(
            "invalid argument: next_batch: {m}"
        )))
    };
    let ty = tensor.get_type();
    let (module, name) = (ty.module()?.to_string(), ty.qualname()?.to_string());
    if module != "torch" || name != "Tensor" {
        return bad(format!(
            "the destination must be a torch.Tensor, got {module}.{name}"
        ));
    }
    let call = |method: &str| ty.getattr(method)?.call1((tensor,));
    let device: String = tensor.getattr("device")?.getattr("type")?.extract()?;
    if device != "cpu" {
        return bad(format!(
            "the tensor is on {device}; a batch is written into CPU memory"
        ));
    }
    let got = tensor.getattr("dtype")?.str()?.to_string();
    if got != format!("torch.{}", dtype.name()) {
        return bad(format!(
            "the tensor has dtype {got}, this loader writes torch.{}",
            dtype.name()
        ));
    }
    if !call("is_contiguous")?.extract::<bool>()? {
        return bad("the tensor is not contiguous".into());
    }
    let (numel, element) = (
        call("numel")?.extract::<usize>()?,
        call("element_size")?.extract::<usize>()?,
    );
    let size = numel.saturating_mul(element);
    if size != nbytes {
        return bad(format!(
            "the tensor has {size} bytes, a batch needs {nbytes}"
        ));
    }
    let ptr: usize = call("data_ptr")?.extract()?;
    if ptr == 0 {
        return bad("the tensor has no storage".into());
    }
    Ok(Destination { ptr, nbytes })
}

// ------------------------------------------------------------------------------------------------------------
// The loader
// ------------------------------------------------------------------------------------------------------------

/// The Rust loader behind `fastlcm.data.ShardLoader` and `LatentShardLoader` (use those classes).
#[pyclass(module = "fastlcm._native", name = "Loader")]
struct PyLoader {
    inner: Mutex<Loader>,
    stats: Arc<Stats>,
    dtype: DType,
    batch_nbytes: usize,
    raw: bool,
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
    ) -> PyResult<Option<BatchMeta>> {
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
    /// A loader of the expanded `shards` with `options` (a resolved `fastlcm.data.LoaderOptions`).
    #[new]
    fn new(shards: Vec<String>, options: &Bound<'_, PyAny>) -> PyResult<Self> {
        let cfg = Options::read(options)?.into_config(shards).map_err(to_py)?;
        let loader = Loader::new(cfg).map_err(to_py)?;
        let c = loader.config();
        let (dtype, raw) = (c.dtype, c.raw);
        Ok(PyLoader {
            stats: loader.stats_handle(),
            batch_nbytes: loader.batch_nbytes(),
            inner: Mutex::new(loader),
            dtype,
            raw,
        })
    }

    /// The expanded shard URLs (all ranks).
    fn urls(&self, py: Python<'_>) -> Vec<String> {
        py.detach(|| lock(&self.inner).urls().to_vec())
    }

    /// Writes the next batch into `tensor` (a CPU `torch.Tensor [B, 3, R, R]`, contiguous, of the loader's
    /// dtype) and returns `(keys, captions, json_bytes, original_sizes, crop_coords, flipped, shards)`, or None
    /// at the end.
    fn next_batch<'py>(
        &self,
        py: Python<'py>,
        tensor: &Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        if self.raw {
            return Err(to_py(Error::Usage(
                "next_batch needs a loader with raw=False; a raw loader yields next_raw_batch()"
                    .into(),
            )));
        }
        let Destination { ptr, nbytes } = destination(tensor, self.dtype, self.batch_nbytes)?;
        let meta = self.poll_until_batch(py, |l| {
            // SAFETY: `destination` checked that `tensor` is a CPU torch.Tensor whose contiguous storage holds
            // exactly `nbytes` bytes from `ptr`. `tensor` is borrowed for this whole call, so that storage stays
            // alive; the caller (ShardLoader) allocated the tensor for this batch and no other code has it yet,
            // so nothing reads, writes or resizes it while the GIL is released. No Rust reference to it exists.
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
        if !self.raw {
            return Err(to_py(Error::Usage(
                "next_raw_batch needs a loader created with raw=True".into(),
            )));
        }
        let meta =
            self.poll_until_batch(py, |l| l.poll_batch(&mut [], Duration::from_millis(200)))?;
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
    fn state_json(&self, py: Python<'_>) -> PyResult<String> {
        py.detach(|| lock(&self.inner).state_json()).map_err(to_py)
    }

    /// Loads a state produced by `state_json` of a loader with the same configuration.
    fn load_state_json(&self, py: Python<'_>, text: &str) -> PyResult<()> {
        let text = text.to_owned();
        py.detach(|| lock(&self.inner).load_state_json(&text))
            .map_err(to_py)
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

// ------------------------------------------------------------------------------------------------------------
// Functions
// ------------------------------------------------------------------------------------------------------------

/// Version of the Rust core (`fastlcm-data`).
#[pyfunction]
fn core_version() -> &'static str {
    fastlcm_data::VERSION
}

/// One spec string or a list of them.
#[derive(FromPyObject)]
enum Specs {
    One(String),
    Many(Vec<String>),
}

/// The shard URLs a spec (or a list of specs) expands to, exactly as a loader expands them.
#[pyfunction]
fn expand_shards(spec: Specs) -> PyResult<Vec<String>> {
    let specs = match spec {
        Specs::One(s) => vec![s],
        Specs::Many(v) => v,
    };
    expand_specs(&specs).map_err(to_py)
}

/// The core's default of every option except `batch_size`, by `LoaderOptions` field name.
#[pyfunction]
fn loader_defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in LoaderConfig::new(Vec::new(), 1).options_json() {
        d.set_item(k, json_to_py(py, &v)?)?;
    }
    Ok(d)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_function(wrap_pyfunction!(core_version, m)?)?;
    m.add_function(wrap_pyfunction!(expand_shards, m)?)?;
    m.add_function(wrap_pyfunction!(loader_defaults, m)?)?;
    m.add_class::<PyLoader>()?;
    m.add("LoaderError", py.get_type::<LoaderError>())?;
    m.add("LoaderOptionError", py.get_type::<LoaderOptionError>())?;
    m.add("LoaderStateError", py.get_type::<LoaderStateError>())?;
    m.add("ShardSourceError", py.get_type::<ShardSourceError>())?;
    m.add("ShardNotFoundError", py.get_type::<ShardNotFoundError>())?;
    m.add(
        "ShardPermissionError",
        py.get_type::<ShardPermissionError>(),
    )?;
    m.add("TarFormatError", py.get_type::<TarFormatError>())?;
    m.add("DecodeError", py.get_type::<DecodeError>())?;
    m.add("NoDataError", py.get_type::<NoDataError>())?;
    m.add(
        "TooManyRejectionsError",
        py.get_type::<TooManyRejectionsError>(),
    )?;
    m.add("LatentFormatError", py.get_type::<LatentFormatError>())?;
    Ok(())
}
