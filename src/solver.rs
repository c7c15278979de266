//! `PolyakSgd`: jaxopt's `PolyakSGD` with parameters, gradients and velocity on the GPU.

use crate::buffers::{
    ExternalTensor, ParamBuffers, check_disjoint, device_segment_capacity, external_runs,
    vector_bytes,
};
use crate::config::{NonFinitePolicy, PolyakConfig, StepSizeMode};
use crate::context::{GpuContext, now};
use crate::error::{Error, Result};
use crate::evaluation::Evaluation;
use crate::kernels::Kernels;
use crate::layout::{Layout, TensorSpec};
use crate::scalars::{Scalars, Verdict};
use crate::state::{Loss, State};
use crate::stepsize::polyak_stepsize;

/// What a `pre_update` hook sees: the parameters on the GPU and the state so far.
#[derive(Debug)]
#[non_exhaustive]
pub struct PreUpdate<'a> {
    /// The device context, for dispatching the hook's own kernels.
    pub context: &'a GpuContext,
    /// The parameter buffers, which the hook may change.
    pub buffers: &'a ParamBuffers,
    /// Updates done so far.
    pub iter_num: usize,
    /// The state's `value`.
    pub value: f64,
    /// The state's `error`.
    pub error: f64,
    /// The state's `stepsize`.
    pub stepsize: f64,
}

/// Median device times of the phases of a step ([`PolyakSgd::time_phases`]).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct PhaseTimes {
    /// The norm passes (only the final sum when the objective computes the norm; one
    /// pass for a small gradient), in milliseconds.
    pub norm_ms: f64,
    /// The fused update, in milliseconds.
    pub update_ms: f64,
    /// Whether these come from GPU timestamps (else from the wall clock).
    pub gpu_timestamps: bool,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

type PreUpdateHook = dyn FnMut(&PreUpdate<'_>) -> Result<()> + Send;

/// Collects the tensors of a [`PolyakSgd`]. Layout order: the owned tensors in the
/// order given, then the external ones in the order given.
#[derive(Debug)]
pub struct PolyakSgdBuilder {
    ctx: GpuContext,
    config: PolyakConfig,
    owned: Vec<TensorSpec>,
    external: Vec<ExternalTensor>,
    norm_partials: Option<usize>,
}

/// The most squared-norm partials an objective may write
/// ([`PolyakSgdBuilder::norm_from_objective`]): one workgroup sums them, 4,096 per
/// invocation (lavapipe stops any loop after 65,535 iterations).
pub const MAX_OBJECTIVE_PARTIALS: usize = 1 << 20;

impl PolyakSgdBuilder {
    /// Lets the objective compute the squared gradient norm while it writes the
    /// gradient, as `partials` f32 partial sums into
    /// [`ParamBuffers::norm_partials_binding`]; the optimizer then skips its own norm
    /// pass over the gradient (20 bytes per parameter with momentum instead of 24,
    /// 12 instead of 16 without). Every evaluation must write all of them (an
    /// unwritten one makes the norm NaN and the step refused); the result is as
    /// deterministic as the objective's partials are. At most
    /// [`MAX_OBJECTIVE_PARTIALS`]; a few thousand is plenty (one per workgroup of
    /// a grid-stride gradient kernel).
    pub fn norm_from_objective(mut self, partials: usize) -> Self {
        self.norm_partials = Some(partials);
        self
    }

    /// Adds a tensor whose buffers the optimizer allocates (zero-initialised).
    pub fn tensor(mut self, spec: TensorSpec) -> Self {
        self.owned.push(spec);
        self
    }

    /// Registers a tensor whose parameter and gradient buffers the user owns.
    pub fn external(mut self, tensor: ExternalTensor) -> Self {
        self.external.push(tensor);
        self
    }

    /// Validates everything and allocates the optimizer's own buffers.
    pub fn build(self) -> Result<PolyakSgd> {
        let PolyakSgdBuilder {
            ctx,
            config,
            owned,
            external,
            norm_partials,
        } = self;
        config.validate()?;
        let features = ctx.device().features();
        if config.velocity_bytes() == 2 && !features.contains(wgpu::Features::SHADER_F16) {
            return Err(Error::InvalidOption {
                option: "velocity_dtype",
                value: "F16".into(),
                reason: "the device lacks the SHADER_F16 feature",
            });
        }
        let real = config.dtype.bytes();
        if real == 8 && !features.contains(wgpu::Features::SHADER_F64) {
            return Err(Error::InvalidOption {
                option: "dtype",
                value: "F64".into(),
                reason: "the device lacks the SHADER_F64 feature",
            });
        }
        let most = (ctx.limits().max_storage_buffer_binding_size / real) as usize;
        if let Some(n) = norm_partials.filter(|&n| n == 0 || n > most.min(MAX_OBJECTIVE_PARTIALS)) {
            return Err(Error::InvalidOption {
                option: "norm_from_objective",
                value: n.to_string(),
                reason: "needs 1 to 1,048,576 partials (one workgroup sums them; a few \
                         thousand is plenty) that fit one binding",
            });
        }
        if config.check_overflow && norm_partials.is_some() {
            return Err(Error::InvalidOption {
                option: "check_overflow",
                value: "true".into(),
                reason: "reads the parameters in the optimizer's own norm pass: not with \
                         norm_from_objective",
            });
        }
        let limits = ctx.limits();
        for e in &external {
            e.validate(real)?;
        }
        check_disjoint(&external, real)?;
        let runs = external_runs(&external, limits, real)?;
        let align = (limits.min_storage_buffer_offset_alignment as usize / real as usize).max(4);
        let capacity = ctx
            .max_segment_elements()
            .unwrap_or(usize::MAX)
            .min(device_segment_capacity(limits, real));
        let mut layout = Layout::empty(align, capacity)?;
        for t in &owned {
            layout.place(t)?;
        }
        for run in runs {
            layout.place_external(external[run].iter().map(|e| &e.spec))?;
        }
        let layout = layout.finish()?;
        let needed = vector_bytes(&layout, real, config.velocity_bytes());
        if let Some(available) = ctx.available_memory() {
            if needed > available {
                return Err(Error::OutOfMemory(format!(
                    "{needed} bytes of vectors, {available} bytes of host memory available \
                     to this CPU adapter"
                )));
            }
        }
        // A buffer of another device shows up as a validation error when bound; a
        // model too large for the device as an out-of-memory error.
        let oom = ctx
            .device()
            .push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let scope = ctx.device().push_error_scope(wgpu::ErrorFilter::Validation);
        let buffers = ParamBuffers::new(
            &ctx,
            layout,
            &config,
            &external,
            norm_partials.map(|n| n as u32),
        );
        let kernels = Kernels::new(&ctx, &buffers, &config);
        let invalid = pollster::block_on(scope.pop());
        if let Some(e) = pollster::block_on(oom.pop()) {
            return Err(Error::OutOfMemory(format!(
                "{} bytes of vectors: {e}",
                buffers.device_bytes()
            )));
        }
        if let Some(e) = invalid {
            if external.is_empty() {
                return Err(Error::Device(format!(
                    "creating the optimizer's buffers failed: {e}"
                )));
            }
            return Err(Error::Registration {
                tensor: external
                    .iter()
                    .map(|e| e.spec.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                reason: format!("binding the buffers failed (another device?): {e}"),
            });
        }
        Ok(PolyakSgd {
            ctx,
            config,
            buffers,
            kernels,
            pre_update: None,
            deferred: false,
        })
    }
}

/// SGD with the Polyak step size on the GPU, with the semantics of jaxopt 0.8.5's
/// `PolyakSGD`.
///
/// Under [`StepSizeMode::Host`] (the default) each update is one submission (the
/// objective's own kernels, then the norm passes, then a 16-byte copy of loss and
/// squared norm), one wait for those bytes, the step size on the CPU, and one
/// submission of the fused update. Under [`StepSizeMode::Device`] the step size is
/// computed on the GPU and the update goes in the first submission: one submission
/// and one wait per step (and one dispatch for a gradient of at most
/// [`GpuContext::one_pass_limit`] elements). A step creates no pipeline, bind group
/// or buffer.
///
/// ```
/// use polyak_gpu::{GpuContext, Loss, PolyakConfig, PolyakSgd};
/// let ctx = GpuContext::new()?;
/// // minimise 0.5 * ||x - c||^2 through the host path (small problems only)
/// let c = [1.0f32, -2.0, 3.0];
/// let mut opt = PolyakSgd::new(&ctx, PolyakConfig::default(), &[0.0; 3])?;
/// let state = opt.run(|ev| {
///     let x = ev.read_params()?;
///     let g: Vec<f32> = x.iter().zip(&c).map(|(x, c)| x - c).collect();
///     ev.write_grads(&g)?;
///     let loss = 0.5 * g.iter().map(|d| (d * d) as f64).sum::<f64>();
///     Ok((Loss::Host(loss), ()))
/// })?;
/// assert!(state.error <= 1e-3);
/// # Ok::<(), polyak_gpu::Error>(())
/// ```
pub struct PolyakSgd {
    ctx: GpuContext,
    pub(crate) config: PolyakConfig,
    pub(crate) buffers: ParamBuffers,
    kernels: Kernels,
    pub(crate) pre_update: Option<Box<PreUpdateHook>>,
    deferred: bool,
}

impl std::fmt::Debug for PolyakSgd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolyakSgd")
            .field("config", &self.config)
            .field("num_params", &self.buffers.num_params())
            .finish_non_exhaustive()
    }
}

impl PolyakSgd {
    /// One parameter vector, named `"params"`, initialised to `init_params`.
    pub fn new(ctx: &GpuContext, config: PolyakConfig, init_params: &[f32]) -> Result<Self> {
        let opt = Self::with_tensors(
            ctx,
            config,
            &[TensorSpec::new("params", &[init_params.len()])],
        )?;
        opt.buffers.upload_params(init_params)?;
        Ok(opt)
    }

    /// One parameter vector `"params"` of `n` zeros, made without any host copy (for
    /// parameters initialised on the device).
    pub fn new_zeroed(ctx: &GpuContext, config: PolyakConfig, n: usize) -> Result<Self> {
        Self::with_tensors(ctx, config, &[TensorSpec::new("params", &[n])])
    }

    /// Several named tensors of any shapes sharing one global norm and one update
    /// (a pytree), all initialised to zero; upload with [`ParamBuffers::upload_tensor`].
    pub fn with_tensors(
        ctx: &GpuContext,
        config: PolyakConfig,
        tensors: &[TensorSpec],
    ) -> Result<Self> {
        tensors
            .iter()
            .fold(Self::builder(ctx, config), |b, t| b.tensor(t.clone()))
            .build()
    }

    /// Starts a solver made of optimizer-owned tensors and tensors whose buffers the
    /// user owns ([`ExternalTensor`]).
    pub fn builder(ctx: &GpuContext, config: PolyakConfig) -> PolyakSgdBuilder {
        PolyakSgdBuilder {
            ctx: ctx.clone(),
            config,
            owned: Vec::new(),
            external: Vec::new(),
            norm_partials: None,
        }
    }

    /// The options.
    pub fn config(&self) -> &PolyakConfig {
        &self.config
    }

    /// Replaces the options between updates, for schedules: a `max_stepsize` that
    /// warms up or decays, a `fun_min` that follows the loss, another `momentum`,
    /// `variant`, `delta`, `tol`, `maxiter`, non-finite policy, step-size mode or
    /// a smaller `sync_every`. Cheap (a few bytes queued for the GPU, no kernel
    /// built), so it may run every step; the next update uses the new options, and
    /// a deferred update still runs with the old ones. What the buffers and kernels
    /// were built for cannot change: `dtype`, momentum zero or not, `velocity_dtype`,
    /// `check_overflow`, and `sync_every` above its value at build are
    /// [`Error::InvalidOption`], and then nothing changes. Checkpoints do not store
    /// options: after [`PolyakSgd::load_checkpoint`], set them again.
    ///
    /// ```
    /// # use polyak_gpu::{GpuContext, Loss, PolyakConfig, PolyakSgd};
    /// # let ctx = GpuContext::new()?;
    /// let mut opt = PolyakSgd::new(&ctx, PolyakConfig::default().momentum(0.9), &[1.0; 8])?;
    /// let mut state = opt.init_state(|_| Ok((Loss::Host(1.0), ())))?;
    /// for step in 0..10 {
    ///     // max_stepsize warms up from 0.1 to 1 over the first ten steps
    ///     let cap = 0.1 + 0.09 * step as f64;
    ///     opt.set_config(opt.config().clone().max_stepsize(cap))?;
    ///     state = opt.update(&state, |ev| {
    ///         let x = ev.read_params()?;
    ///         ev.write_grads(&x)?; // the gradient of 0.5 * |x|^2
    ///         Ok((Loss::Host(0.5 * x.iter().map(|v| f64::from(v * v)).sum::<f64>()), ()))
    ///     })?;
    ///     assert!(state.stepsize as f32 <= cap as f32); // (the step is an f32)
    /// }
    /// assert!(opt.set_config(opt.config().clone().momentum(0.0)).is_err());
    /// # Ok::<(), polyak_gpu::Error>(())
    /// ```
    pub fn set_config(&mut self, config: PolyakConfig) -> Result<()> {
        config.validate()?;
        config.fits(&self.config, self.buffers.scalars.slots)?;
        // A deferred update reads the momentum of the options it was recorded with.
        self.buffers.flush()?;
        self.kernels.set_options(&self.ctx, &self.buffers, &config);
        self.config = config;
        Ok(())
    }

    /// The device context.
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// Parameters, gradients and velocity on the GPU.
    pub fn buffers(&self) -> &ParamBuffers {
        &self.buffers
    }

    /// Device memory the optimizer itself allocated: its parameter and gradient
    /// buffers (not the user's), the velocity, and the norm scratch plus the scalars
    /// slot and its readback copies.
    pub fn device_bytes(&self) -> u64 {
        self.buffers.device_bytes() + self.scratch_bytes()
    }

    /// Bytes of the above that are scratch, not vectors (a few KiB at most).
    pub fn scratch_bytes(&self) -> u64 {
        self.kernels.scratch_bytes() + self.buffers.scalar_bytes()
    }

    /// Compute dispatches the optimizer records per step (its own, not the
    /// objective's): a norm and an update per segment or batch of small segments
    /// (the norm's batches hold more of them), plus the final sum; no norm when the
    /// objective computes it. It does not grow with the number of tensors. A
    /// gradient of at most [`GpuContext::one_pass_limit`] elements needs no final
    /// sum, and with the step size from the GPU is one dispatch in all (see
    /// [`crate::ContextOptions::one_pass_limit`]).
    pub fn dispatches_per_step(&self) -> usize {
        let device_rule = self.config.stepsize_mode == StepSizeMode::Device;
        self.kernels.dispatches_per_step(device_rule)
    }

    /// For benchmarks: times the two phases of a step on the device, `reps` times
    /// each, and returns their medians in milliseconds. Uses GPU timestamps where the
    /// adapter has them, else the wall clock of each phase submitted alone and waited
    /// for. Runs `reps` norms of the current gradient and `reps` updates with the
    /// step size the norm pass computes from the last step's loss, never refused,
    /// so it changes the parameters (and velocity) like `reps` steps.
    pub fn time_phases(&mut self, reps: usize) -> Result<PhaseTimes> {
        self.buffers.flush()?;
        let reps = reps.max(1);
        let device = self.ctx.device();
        let mut norm = Vec::with_capacity(reps.min(1024));
        let mut update = Vec::with_capacity(reps.min(1024));
        if device.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
            let set = device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("polyak phases"),
                ty: wgpu::QueryType::Timestamp,
                count: 4,
            });
            let resolve = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("polyak phases resolve"),
                size: 32,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let period = f64::from(self.ctx.queue().get_timestamp_period()) * 1e-6; // ns -> ms
            for _ in 0..reps {
                let mut encoder = self.encoder();
                let writes = |b, e| wgpu::ComputePassTimestampWrites {
                    query_set: &set,
                    beginning_of_pass_write_index: Some(b),
                    end_of_pass_write_index: Some(e),
                };
                self.buffers.scalars.encode_reused_loss(&mut encoder);
                self.kernels.encode_norm(&mut encoder, Some(writes(0, 1)));
                self.buffers.scalars.clear_refusal(&mut encoder);
                self.kernels.encode_update(&mut encoder, Some(writes(2, 3)));
                encoder.resolve_query_set(&set, 0..4, &resolve, 0);
                self.ctx.queue().submit([encoder.finish()]);
                let raw = crate::buffers::read_bytes(&self.ctx, &resolve, 0, 32)?;
                let t: &[u64] = bytemuck::cast_slice(&raw);
                norm.push(t[1].wrapping_sub(t[0]) as f64 * period);
                update.push(t[3].wrapping_sub(t[2]) as f64 * period);
            }
        } else {
            self.ctx.wait()?;
            for _ in 0..reps {
                let t0 = std::time::Instant::now();
                let mut encoder = self.encoder();
                self.buffers.scalars.encode_reused_loss(&mut encoder);
                self.kernels.encode_norm(&mut encoder, None);
                self.buffers.scalars.clear_refusal(&mut encoder);
                self.ctx.queue().submit([encoder.finish()]);
                self.ctx.wait()?;
                let t1 = std::time::Instant::now();
                let mut encoder = self.encoder();
                self.kernels.encode_update(&mut encoder, None);
                self.ctx.queue().submit([encoder.finish()]);
                self.ctx.wait()?;
                norm.push((t1 - t0).as_secs_f64() * 1e3);
                update.push(t1.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(PhaseTimes {
            norm_ms: median(&mut norm),
            update_ms: median(&mut update),
            gpu_timestamps: device.features().contains(wgpu::Features::TIMESTAMP_QUERY),
        })
    }

    /// Defers each update's submission to the next step's submission (or to
    /// [`PolyakSgd::flush`]), so that a step is one submission and one wait instead
    /// of two submissions: less fixed cost per step where N is small. Every method of
    /// the optimizer and of its [`ParamBuffers`] sees the updated parameters; only
    /// work you submit yourself outside the objective does not until you `flush`.
    /// Off by default. Has no effect under [`StepSizeMode::Device`], whose update
    /// is already in the step's only submission. Turning it off submits a deferred
    /// update (see [`PolyakSgd::flush`]).
    pub fn set_deferred_updates(&mut self, on: bool) -> Result<()> {
        if !on {
            self.buffers.flush()?;
        }
        self.deferred = on;
        Ok(())
    }

    /// Submits a deferred update now (see [`PolyakSgd::set_deferred_updates`]);
    /// [`Error::Validation`] if wgpu rejects it (a user buffer destroyed since).
    pub fn flush(&self) -> Result<()> {
        self.buffers.flush()
    }

    /// Sets jaxopt's `pre_update`: called at the start of every `update`, before the
    /// objective, with the parameters and the state so far.
    pub fn set_pre_update(
        &mut self,
        hook: impl FnMut(&PreUpdate<'_>) -> Result<()> + Send + 'static,
    ) {
        self.pre_update = Some(Box::new(hook));
    }

    /// Uploads all parameters (tensors concatenated in layout order).
    pub fn upload_params(&self, params: &[f32]) -> Result<()> {
        self.buffers.upload_params(params)
    }

    /// Downloads all parameters (allocates; not part of a step).
    pub fn download_params(&self) -> Result<Vec<f32>> {
        self.buffers.download_params()
    }

    /// Downloads the velocity (`None` when momentum is 0).
    pub fn download_velocity(&self) -> Result<Option<Vec<f32>>> {
        self.buffers.download_velocity()
    }

    fn encoder(&self) -> wgpu::CommandEncoder {
        self.ctx
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("polyak"),
            })
    }

    /// jaxopt's `init_state`: evaluates the objective once (for `aux`), zeroes the
    /// velocity, and returns `iter_num = 0, value = error = inf, stepsize = 1`.
    pub fn init_state<A>(
        &mut self,
        f: impl FnOnce(&mut Evaluation<'_>) -> Result<(Loss, A)>,
    ) -> Result<State<A>> {
        let scope = self.validation_scope();
        let mut encoder = self.encoder();
        let (_, aux) = f(&mut Evaluation {
            ctx: &self.ctx,
            buffers: &self.buffers,
            encoder: &mut encoder,
        })?;
        self.buffers.encode_unwritten(&mut encoder);
        self.buffers.clear_velocity(&mut encoder);
        self.submit_checked(encoder, scope)?;
        Ok(State::initial(aux))
    }

    /// Records and submits the objective, the norm passes, the update too if
    /// `with_update` (the step size then comes from the GPU), and the copy of the
    /// scalars into readback slot `slot`, in one submission; returns what the
    /// objective returned. A deferred update of the previous step goes first.
    pub(crate) fn submit_step<A>(
        &mut self,
        f: impl FnOnce(&mut Evaluation<'_>) -> Result<(Loss, A)>,
        with_update: bool,
        slot: usize,
    ) -> Result<(Loss, A)> {
        let scope = self.validation_scope();
        let mut encoder = self.encoder();
        self.buffers.encode_unwritten_partials(&mut encoder);
        let (loss, aux) = f(&mut Evaluation {
            ctx: &self.ctx,
            buffers: &self.buffers,
            encoder: &mut encoder,
        })?;
        // Only the GPU's rule reads a host loss there (the host rule has it). A
        // queue write, applied before this submission: no copy in the step.
        if let (Loss::Host(v), true) = (loss, with_update) {
            self.buffers.scalars.write_loss(v);
        }
        if with_update {
            self.kernels.encode_step(&mut encoder);
        } else {
            self.kernels.encode_norm(&mut encoder, None);
        }
        self.buffers.scalars.encode_readback(&mut encoder, slot);
        if let Err(e) = self.submit_checked(encoder, scope) {
            // Nothing of the step ran: a host loss queued for it must not be the
            // loss of the next evaluation, which may leave the slot unwritten.
            self.buffers.scalars.write_loss(f64::NAN);
            return Err(e);
        }
        Ok((loss, aux))
    }

    /// Starts catching wgpu's validation errors on this thread, for
    /// [`PolyakSgd::submit_checked`]: without it wgpu panics on a bad command.
    fn validation_scope(&self) -> wgpu::ErrorScopeGuard {
        self.ctx
            .device()
            .push_error_scope(wgpu::ErrorFilter::Validation)
    }

    /// Finishes `encoder` (recorded under `scope`) and submits it after any deferred
    /// update, unless wgpu rejected one of its commands, most likely one the
    /// objective recorded: then nothing of it runs (a deferred update stays
    /// pending for the next submission) and the error is [`Error::Validation`].
    fn submit_checked(
        &self,
        encoder: wgpu::CommandEncoder,
        scope: wgpu::ErrorScopeGuard,
    ) -> Result<()> {
        let commands = encoder.finish();
        if self.buffers.has_pending() {
            // The deferred update rides with this submission: check the commands
            // first, so that a bad one does not take the update down with it.
            if let Some(e) = now(scope.pop()) {
                return Err(Error::Validation(e.to_string()));
            }
            return self.ctx.checked(|| self.buffers.submit(commands));
        }
        // wgpu rejects an invalid command buffer whole at submission: one scope.
        self.buffers.submit(commands);
        match now(scope.pop()) {
            Some(e) => Err(Error::Validation(e.to_string())),
            None => Ok(()),
        }
    }

    /// [`PolyakSgd::submit_step`] into slot 0, then waits for the scalars; returns
    /// `(value, scalars, aux)`.
    fn evaluate<A>(
        &mut self,
        f: impl FnOnce(&mut Evaluation<'_>) -> Result<(Loss, A)>,
        with_update: bool,
    ) -> Result<(f64, Scalars, A)> {
        let (loss, aux) = self.submit_step(f, with_update, 0)?;
        let scalars = self.buffers.scalars.read()?;
        Ok((loss.value(&scalars), scalars, aux))
    }

    /// The state after an update that ran: `value` and the scalars of its step.
    pub(crate) fn advance<A>(
        &self,
        state: &State<A>,
        value: f64,
        stepsize: f64,
        scalars: &Scalars,
        aux: A,
    ) -> State<A> {
        // jaxopt's error: the norm in the gradient's precision.
        let next = state.updated(value, scalars.error(), stepsize, aux);
        self.log(&next, "");
        next
    }

    /// What a step that was not applied gives: [`Error::NonFinite`] (or
    /// [`Error::NonFiniteUpdate`] where only the overflow check refused it) under
    /// `Refuse`, the skipped state under `Skip`.
    pub(crate) fn refusal<A>(
        &self,
        state: &State<A>,
        value: f64,
        stepsize: f64,
        scalars: &Scalars,
        aux: A,
    ) -> Result<State<A>> {
        if self.config.nonfinite == NonFinitePolicy::Skip {
            let next = state.skipped(value, scalars.error(), stepsize, aux);
            self.log(&next, " skipped:");
            return Ok(next);
        }
        let finite = value.is_finite() && scalars.sqnorm.is_finite() && stepsize.is_finite();
        match scalars.bounds {
            Some((lowest, highest)) if finite && !scalars.allows(stepsize) => {
                Err(Error::NonFiniteUpdate {
                    iter_num: state.iter_num,
                    stepsize,
                    lowest,
                    highest,
                })
            }
            _ => Err(Error::NonFinite {
                iter_num: state.iter_num,
                value,
                sqnorm: scalars.sqnorm,
                stepsize,
            }),
        }
    }

    /// jaxopt's `verbose`: one line per step.
    fn log<A>(&self, s: &State<A>, what: &str) {
        if self.config.verbose {
            log::info!(
                "iter {}{what} value {:e} error {:e} stepsize {:e}",
                s.iter_num,
                s.value,
                s.error,
                s.stepsize
            );
        }
    }

    /// jaxopt's `update`: one Polyak step from the current parameters.
    ///
    /// Under [`NonFinitePolicy::Refuse`] (the default) a NaN or infinite loss, norm or
    /// step size returns [`Error::NonFinite`] and the parameters and velocity stay
    /// as they were (under [`StepSizeMode::Device`] the GPU makes that check and
    /// skips the update); under [`NonFinitePolicy::Skip`] such a step returns the
    /// skipped state instead.
    pub fn update<A>(
        &mut self,
        state: &State<A>,
        f: impl FnOnce(&mut Evaluation<'_>) -> Result<(Loss, A)>,
    ) -> Result<State<A>> {
        if let Some(hook) = self.pre_update.as_mut() {
            self.buffers.flush()?;
            hook(&PreUpdate {
                context: &self.ctx,
                buffers: &self.buffers,
                iter_num: state.iter_num,
                value: state.value,
                error: state.error,
                stepsize: state.stepsize,
            })?;
        }
        let on_device = self.config.stepsize_mode == StepSizeMode::Device;
        let (value, scalars, aux) = self.evaluate(f, on_device)?;
        let sqnorm = scalars.sqnorm;
        let stepsize = if on_device {
            scalars.step
        } else {
            polyak_stepsize(value, sqnorm, &self.config, self.config.dtype.precision())
        };
        let refused = if on_device {
            scalars.verdict != Verdict::Applied
        } else {
            let finite = value.is_finite() && sqnorm.is_finite() && stepsize.is_finite();
            let safe = finite && scalars.allows(stepsize);
            !safe && self.config.nonfinite != NonFinitePolicy::Propagate
        };
        if refused {
            return self.refusal(state, value, stepsize, &scalars, aux);
        }
        if !on_device {
            self.buffers.scalars.write_step(stepsize);
            let mut encoder = self.encoder();
            self.kernels.encode_update(&mut encoder, None);
            if self.deferred {
                self.buffers.defer(encoder.finish())?;
            } else {
                // (a user buffer destroyed since the step began fails here)
                self.ctx.checked(|| self.buffers.submit(encoder.finish()))?;
            }
        }
        Ok(self.advance(state, value, stepsize, &scalars, aux))
    }

    /// jaxopt's `run`: `init_state`, then updates until `error <= tol` (checked after
    /// each update, so at least one is done) or `maxiter` updates. `maxiter = 0`
    /// returns the initial state. Under [`StepSizeMode::Device`] with
    /// [`PolyakConfig::sync_every`] above 1 the updates are submitted that many per
    /// wait, with the same result (see there).
    pub fn run<A>(
        &mut self,
        mut f: impl FnMut(&mut Evaluation<'_>) -> Result<(Loss, A)>,
    ) -> Result<State<A>> {
        let mut state = self.init_state(&mut f)?;
        if self.pipelined() {
            let steps = std::iter::repeat_n((), self.config.maxiter);
            return self.run_pipelined(state, steps, Some(self.config.tol), |ev, _| f(ev));
        }
        for _ in 0..self.config.maxiter {
            state = self.update(&state, &mut f)?;
            if !state.should_continue(self.config.tol) {
                break;
            }
        }
        Ok(state)
    }

    /// jaxopt's `run_iterator`: the first batch goes to `init_state` only, then one
    /// update per batch for up to `maxiter` batches; no tolerance check. Pipelined
    /// like [`PolyakSgd::run`] under `sync_every` above 1.
    pub fn run_iterator<A, B>(
        &mut self,
        mut f: impl FnMut(&mut Evaluation<'_>, &B) -> Result<(Loss, A)>,
        batches: impl IntoIterator<Item = B>,
    ) -> Result<State<A>> {
        let mut it = batches.into_iter();
        let first = it.next().ok_or(Error::EmptyIterator)?;
        let mut state = self.init_state(|ev| f(ev, &first))?;
        if self.pipelined() {
            return self.run_pipelined(state, it.take(self.config.maxiter), None, f);
        }
        for batch in it.take(self.config.maxiter) {
            state = self.update(&state, |ev| f(ev, &batch))?;
        }
        Ok(state)
    }

    /// One [`PolyakSgd::update`] per batch, in order, from `state`: an epoch of a
    /// training loop that evaluates or checkpoints between epochs. Unlike
    /// `run_iterator`, no batch goes to `init_state` and `maxiter` does not apply,
    /// so consecutive calls continue one run. Pipelined like `run` under
    /// `sync_every` above 1 (with the result of single updates); stops at the
    /// first error.
    ///
    /// ```
    /// # use polyak_gpu::{GpuContext, Loss, PolyakConfig, PolyakSgd, StepSizeMode, Evaluation};
    /// # let ctx = GpuContext::new()?;
    /// let config = PolyakConfig::default().momentum(0.9)
    ///     .stepsize_mode(StepSizeMode::Device).sync_every(8);
    /// let mut opt = PolyakSgd::new(&ctx, config, &[0.0; 4])?;
    /// // batch b: 0.5 * ||x - c_b||^2 on the host (small problems only)
    /// let mut f = |ev: &mut Evaluation<'_>, b: &usize| {
    ///     let x = ev.read_params()?;
    ///     let g: Vec<f32> = x.iter().map(|x| x - (1 + b % 3) as f32).collect();
    ///     ev.write_grads(&g)?;
    ///     Ok((Loss::Host(0.5 * g.iter().map(|d| f64::from(d * d)).sum::<f64>()), ()))
    /// };
    /// let mut state = opt.init_state(|ev| f(ev, &0))?;
    /// for epoch in 0..3 {
    ///     state = opt.update_batches(state, &mut f, 0..30)?;
    ///     // evaluate, log or save a checkpoint here
    /// }
    /// assert_eq!(state.iter_num, 90);
    /// # Ok::<(), polyak_gpu::Error>(())
    /// ```
    pub fn update_batches<A, B>(
        &mut self,
        state: State<A>,
        mut f: impl FnMut(&mut Evaluation<'_>, &B) -> Result<(Loss, A)>,
        batches: impl IntoIterator<Item = B>,
    ) -> Result<State<A>> {
        if self.pipelined() {
            return self.run_pipelined(state, batches.into_iter(), None, f);
        }
        let mut state = state;
        for batch in batches {
            state = self.update(&state, |ev| f(ev, &batch))?;
        }
        Ok(state)
    }

    /// jaxopt's `l2_optimality_error`: the gradient norm at the current parameters.
    pub fn l2_optimality_error<A>(
        &mut self,
        f: impl FnOnce(&mut Evaluation<'_>) -> Result<(Loss, A)>,
    ) -> Result<f64> {
        let (_, scalars, _) = self.evaluate(f, false)?;
        Ok(scalars.sqnorm.sqrt())
    }
}
