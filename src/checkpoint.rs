//! Checkpoints: the parameters, the velocity and the state in one safetensors file,
//! written atomically and read back bit for bit.
//!
//! Tensors are stored as `params/<name>` and `velocity/<name>` in the optimizer's own
//! types (F32, F64, or F16 for an f16 velocity; the tensor's shape); the state goes
//! in the header's metadata, its floats as their exact bits. The gradient is not
//! stored: the next update evaluates the objective again. Saving holds one tensor's
//! bytes on the host at a time; loading parses the header alone and reads the data
//! in 64 MiB pieces.

use crate::error::{Error, Result};
use crate::layout::TensorPlacement;
use crate::solver::PolyakSgd;
use crate::state::State;
use safetensors::tensor::{Dtype, Metadata, View};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The `format` metadata entry of our checkpoints.
const FORMAT: &str = "polyak-gpu checkpoint 1";

/// One tensor's parameters or velocity, downloaded only when the writer asks for its
/// bytes, so that at most one tensor is on the host at a time.
struct Lazy<'a> {
    opt: &'a PolyakSgd,
    tensor: &'a TensorPlacement,
    velocity: bool,
    /// The first download error; the file is then discarded.
    failed: &'a RefCell<Option<Error>>,
}

impl View for Lazy<'_> {
    fn dtype(&self) -> Dtype {
        match self.elem() {
            2 => Dtype::F16,
            8 => Dtype::F64,
            _ => Dtype::F32,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.tensor.spec.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        // The bytes as the optimizer stores them: exact, and on the host once.
        let got = self
            .opt
            .buffers()
            .download_placed_bytes(self.tensor, self.velocity, self.elem());
        match got {
            Ok(bytes) => Cow::Owned(bytes),
            Err(e) => {
                self.failed.borrow_mut().get_or_insert(e);
                Cow::Owned(vec![0; self.data_len()])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.tensor.spec.len() * self.elem() as usize
    }
}

impl Lazy<'_> {
    /// Bytes per element as the optimizer stores this vector.
    fn elem(&self) -> u64 {
        let config = self.opt.config();
        if self.velocity {
            config.velocity_bytes()
        } else {
            config.dtype.bytes()
        }
    }
}

/// Bytes per element of a float dtype the checkpoints hold.
fn dtype_bytes(dtype: Dtype) -> Option<u64> {
    match dtype {
        Dtype::F16 => Some(2),
        Dtype::F32 => Some(4),
        Dtype::F64 => Some(8),
        _ => None,
    }
}

/// The longest header read (the safetensors crate's own limit): a corrupt length
/// is an error, not an allocation of that size.
const MAX_HEADER: u64 = 100_000_000;

/// Reads the header of the safetensors file `file`: its metadata, which the crate
/// checks (each tensor's byte range agrees with its dtype and shape, the ranges
/// follow one another), and where the data starts; the data must be all there.
fn read_header(file: &mut File, path: &Path) -> Result<(u64, Metadata)> {
    let len = file.metadata().map_err(|e| io(path, e))?.len();
    let mut n = [0u8; 8];
    file.read_exact(&mut n)
        .map_err(|e| io(path, format!("no safetensors header: {e}")))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n > len - 8 {
        return Err(io(
            path,
            format!("a header of {n} bytes in a file of {len} (not a safetensors file?)"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(|e| io(path, e))?;
    let meta: Metadata =
        serde_json::from_slice(&header).map_err(|e| io(path, format!("header: {e}")))?;
    let data = len - 8 - n;
    if meta.data_len() as u64 != data {
        return Err(io(
            path,
            format!(
                "{data} bytes of tensor data where the header says {} (truncated?)",
                meta.data_len()
            ),
        ));
    }
    Ok((8 + n, meta))
}

fn bits(x: f64) -> String {
    format!("{:#018x}", x.to_bits())
}

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

impl PolyakSgd {
    /// Writes the parameters, the velocity and `state` (not its `aux`) to `path` as a
    /// safetensors file. Atomic: the file is written beside `path`, flushed to disk
    /// and renamed over it, so `path` holds either the old checkpoint or the new one,
    /// whole. One tensor at a time crosses to the host, in its stored type.
    ///
    /// ```
    /// # use polyak_gpu::{GpuContext, PolyakConfig, PolyakSgd, Loss};
    /// # let ctx = GpuContext::new()?;
    /// # let path = std::env::temp_dir().join(format!("doc-{}.safetensors", std::process::id()));
    /// let mut opt = PolyakSgd::new(&ctx, PolyakConfig::default().momentum(0.9), &[1.0; 8])?;
    /// # let f = |ev: &mut polyak_gpu::Evaluation<'_>| { ev.write_grads(&[1.0; 8])?; Ok((Loss::Host(1.0), ())) };
    /// let state = opt.init_state(f)?;
    /// let state = opt.update(&state, f)?;
    /// opt.save_checkpoint(&state, &path)?;
    /// // later, in an optimizer built the same way:
    /// let mut resumed = PolyakSgd::new(&ctx, PolyakConfig::default().momentum(0.9), &[0.0; 8])?;
    /// let state = resumed.load_checkpoint(&path)?;
    /// assert_eq!(resumed.download_params()?, opt.download_params()?);
    /// let state = resumed.update(&state, f)?; // as if never interrupted
    /// assert_eq!(state.iter_num, 2);
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), polyak_gpu::Error>(())
    /// ```
    pub fn save_checkpoint<A>(&self, state: &State<A>, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let failed = RefCell::new(None);
        let layout = self.buffers().layout();
        let mut tensors = Vec::new();
        for t in layout.tensors() {
            let name = &t.spec.name;
            tensors.push((format!("params/{name}"), self.lazy(t, false, &failed)));
            if self.buffers().has_velocity() {
                tensors.push((format!("velocity/{name}"), self.lazy(t, true, &failed)));
            }
        }
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("iter_num".into(), state.iter_num.to_string()),
            ("num_fun_eval".into(), state.num_fun_eval.to_string()),
            ("num_grad_eval".into(), state.num_grad_eval.to_string()),
            ("num_skipped".into(), state.num_skipped.to_string()),
            ("value".into(), bits(state.value)),
            ("error".into(), bits(state.error)),
            ("stepsize".into(), bits(state.stepsize)),
            ("config".into(), format!("{:?}", self.config())),
        ]);
        // safetensors writes a sibling temporary file and renames it to `partial`;
        // we flush that to disk before renaming it over `path`.
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = Path::new(&partial);
        let written = safetensors::serialize_to_file(tensors, Some(metadata), partial)
            .map_err(|e| io(path, e))
            .and_then(|()| match failed.into_inner() {
                Some(e) => Err(e),
                None => Ok(()),
            })
            .and_then(|()| {
                std::fs::File::open(partial)
                    .and_then(|f| f.sync_all())
                    .and_then(|()| std::fs::rename(partial, path))
                    .map_err(|e| io(path, e))
            });
        if written.is_err() {
            let _ = std::fs::remove_file(partial);
            return written;
        }
        // The rename itself is durable once the directory is flushed (best effort:
        // not every platform opens directories).
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Ok(d) = std::fs::File::open(dir.unwrap_or(Path::new("."))) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn lazy<'a>(
        &'a self,
        tensor: &'a TensorPlacement,
        velocity: bool,
        failed: &'a RefCell<Option<Error>>,
    ) -> Lazy<'a> {
        Lazy {
            opt: self,
            tensor,
            velocity,
            failed,
        }
    }

    /// Reads a checkpoint written by [`PolyakSgd::save_checkpoint`] for an optimizer
    /// with the same tensors (names, shapes, with or without momentum), uploads its
    /// parameters and velocity, and returns its state (with `aux = ()`; see
    /// [`State::with_aux`]). Everything is checked before anything is uploaded: a
    /// file that does not fit leaves the optimizer as it was. The file is read in
    /// pieces of 64 MiB, whatever the model's size; only an error of the disk itself
    /// midway would leave some tensors loaded.
    pub fn load_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<State<()>> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(|e| io(path, e))?;
        let (data_start, header) = read_header(&mut file, path)?;
        let empty = HashMap::new();
        let meta = header.metadata().as_ref().unwrap_or(&empty);
        let entry = |key: &str| {
            meta.get(key)
                .ok_or_else(|| io(path, format!("no {key:?} in the metadata")))
        };
        if entry("format")? != FORMAT {
            return Err(io(path, format!("not a {FORMAT:?} file")));
        }
        let count = |key: &str| {
            entry(key)?
                .parse::<usize>()
                .map_err(|e| io(path, format!("{key}: {e}")))
        };
        let float = |key: &str| {
            let s = entry(key)?;
            u64::from_str_radix(s.trim_start_matches("0x"), 16)
                .map(f64::from_bits)
                .map_err(|e| io(path, format!("{key} {s:?}: {e}")))
        };
        let state = State {
            iter_num: count("iter_num")?,
            value: float("value")?,
            error: float("error")?,
            stepsize: float("stepsize")?,
            aux: (),
            num_fun_eval: count("num_fun_eval")?,
            num_grad_eval: count("num_grad_eval")?,
            num_skipped: count("num_skipped")?,
        };

        // Every tensor of the layout, nothing else, as F32 of the right shape.
        let with_velocity = self.buffers().has_velocity();
        let layout = self.buffers().layout();
        let mut wanted = Vec::new();
        for t in layout.tensors() {
            wanted.push((format!("params/{}", t.spec.name), t, false));
            if with_velocity {
                wanted.push((format!("velocity/{}", t.spec.name), t, true));
            }
        }
        let mut found = Vec::with_capacity(wanted.len());
        for (key, t, velocity) in &wanted {
            let info = header.info(key).ok_or_else(|| {
                io(
                    path,
                    format!(
                        "no tensor {key:?} (a checkpoint of another model{})",
                        if *velocity {
                            ", or one saved without momentum"
                        } else {
                            ""
                        }
                    ),
                )
            })?;
            // Any float dtype converts to the optimizer's (exactly from its own).
            let Some(bytes) = dtype_bytes(info.dtype) else {
                return Err(io(path, format!("tensor {key:?} is {:?}", info.dtype)));
            };
            if info.shape != t.spec.shape {
                return Err(io(
                    path,
                    format!(
                        "tensor {key:?} is {:?} {:?}, the optimizer's is {:?}",
                        info.dtype, info.shape, t.spec.shape
                    ),
                ));
            }
            found.push((
                *t,
                *velocity,
                bytes,
                data_start + info.data_offsets.0 as u64,
            ));
        }
        let names = header.tensors();
        if names.len() != wanted.len() {
            let extra: Vec<_> = names
                .keys()
                .filter(|n| !wanted.iter().any(|(k, _, _)| k == *n))
                .collect();
            return Err(io(
                path,
                format!("tensors the optimizer does not hold: {extra:?}"),
            ));
        }

        for &(t, velocity, _, _) in &found {
            self.buffers().check_writable(t, velocity)?;
        }
        let mut queued = 0;
        for (t, velocity, bytes, start) in found {
            self.buffers()
                .upload_placed_from(t, velocity, bytes, &mut queued, |at, buf| {
                    file.seek(SeekFrom::Start(start + at))
                        .and_then(|_| file.read_exact(buf))
                        .map_err(|e| io(path, e))
                })?;
        }
        Ok(state)
    }
}
