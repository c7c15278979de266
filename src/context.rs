//! The headless wgpu device the optimizer runs on.

use crate::error::{Error, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long [`GpuContext::wait`] (and so every step's readback and every download)
/// waits for the GPU by default before it gives up with [`Error::Timeout`]: far
/// beyond any one submission of this crate (a 4e9-parameter step takes 25 ms on an
/// H200), so only a kernel that never ends reaches it.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(60);

/// The default [`ContextOptions::one_pass_limit`]: gradients of up to this many
/// elements get their squared norm and step size from one workgroup in one
/// dispatch (16 vec4 loads per invocation of 256).
pub const DEFAULT_ONE_PASS_LIMIT: usize = 1 << 14;

/// Which adapter [`GpuContext::new`] opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdapterChoice {
    /// The high-performance adapter, honouring `WGPU_BACKEND`, `WGPU_ADAPTER_NAME`
    /// and `WGPU_POWER_PREF`.
    #[default]
    HighPerformance,
    /// A software (CPU) adapter such as Mesa lavapipe, even where a GPU exists.
    Software,
}

/// How [`GpuContext::wait`] (every step's readback, every download) waits for the GPU.
/// By default ([`ContextOptions::wait_mode`] `None`) a GPU spins and a CPU adapter
/// blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitMode {
    /// Sleeps in the driver until the work is done (a blocking fence wait): no CPU
    /// spent while the GPU runs, at the cost of the driver's wake-up latency (30-40
    /// us a step on an H200). The default on a CPU adapter, whose work needs every
    /// core, and on a device opened by the caller ([`GpuContext::from_device`]).
    Block,
    /// Asks the driver in a loop whether the work is done (a zero-timeout fence
    /// wait each time): one CPU core busy while it waits, for the shortest latency,
    /// as CUDA's default synchronization spins. The default on a GPU: on an H200
    /// it took the fixed cost of a waited step from 0.09-0.13 to 0.065-0.094 ms.
    Spin,
}

/// Options for opening a device.
#[derive(Debug, Clone, Default)]
pub struct ContextOptions {
    /// Which adapter to open.
    pub adapter: AdapterChoice,
    /// Upper bound on the workgroups of one norm/update dispatch. `None` picks by
    /// device type: few on a CPU adapter (each workgroup costs a lot there), many on
    /// a GPU. Mostly for benchmarks and tests.
    pub max_workgroups: Option<u32>,
    /// Upper bound on the elements of one segment (one binding and one buffer per
    /// vector). `None` uses the device's limits. Lowering it makes the multi-segment
    /// paths run at small sizes, e.g. in tests on a software adapter.
    pub max_segment_elements: Option<usize>,
    /// Whether each kernel invocation walks one contiguous run of its workgroup's
    /// chunk (good where a workgroup's invocations run one after another, as on
    /// lavapipe) rather than striding by the workgroup size (good on GPUs). `None`
    /// picks by device type.
    pub contiguous_invocations: Option<bool>,
    /// Invocations per workgroup of the norm and update kernels: a power of two from
    /// 32 to the device's limits (1,024 on most GPUs). `None` is 256. For tuning
    /// by measurement (`polyak-bench --workgroup-size`); results are the same up
    /// to the order of the norm's sums.
    pub workgroup_size: Option<u32>,
    /// Elements (vec4s) each invocation of the norm and update kernels loads per
    /// loop iteration before it uses them: 1, 2, 4 or 8. `None` is 1. More loads in
    /// flight may help a GPU near its memory bandwidth; the results are the same
    /// bit for bit (each invocation visits its elements in the same order). For
    /// tuning by measurement (`polyak-bench --unroll`).
    pub unroll: Option<u32>,
    /// The most gradient elements (all segments together) whose squared norm and
    /// step size one workgroup computes in one dispatch, instead of a norm pass of
    /// many workgroups and a final sum: at small sizes a waited step then costs one
    /// dispatch less. `None` is [`DEFAULT_ONE_PASS_LIMIT`]; `Some(0)` never does.
    /// For tuning by measurement (`polyak-bench --one-pass-limit`); the squared norm
    /// differs in its last bits between the two (the order of the sums).
    pub one_pass_limit: Option<usize>,
    /// How long a wait for the GPU may take before it is [`Error::Timeout`] (a hung
    /// kernel, e.g. one of the objective's, is then an error instead of a hang).
    /// `None` is [`DEFAULT_WAIT_TIMEOUT`]; `Some(Duration::MAX)` waits as long as the
    /// work takes.
    pub wait_timeout: Option<Duration>,
    /// How a wait for the GPU waits. `None` picks by device type: spin on a GPU,
    /// block on a CPU adapter (see [`WaitMode`]).
    pub wait_mode: Option<WaitMode>,
}

/// A wgpu device and queue, plus what the kernels need to know about them.
///
/// Cloning is cheap (wgpu handles are reference counted).
#[derive(Debug, Clone)]
pub struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: Option<wgpu::AdapterInfo>,
    limits: wgpu::Limits,
    max_workgroups: u32,
    max_segment_elements: Option<usize>,
    contiguous_invocations: bool,
    workgroup_size: u32,
    unroll: u32,
    one_pass_limit: usize,
    /// The wait timeout in nanoseconds (`u64::MAX`: none), shared by every clone.
    wait_timeout_ns: Arc<AtomicU64>,
    /// Whether waits spin ([`WaitMode::Spin`]), shared by every clone.
    spin: Arc<AtomicBool>,
}

impl GpuContext {
    /// Opens the high-performance adapter with its own limits (not wgpu's defaults).
    ///
    /// ```
    /// let ctx = polyak_gpu::GpuContext::new()?;
    /// println!("{}", ctx.describe());
    /// # Ok::<(), polyak_gpu::Error>(())
    /// ```
    pub fn new() -> Result<Self> {
        Self::with_options(ContextOptions::default())
    }

    /// Opens a software adapter (Mesa lavapipe or wgpu's GL fallback on llvmpipe).
    pub fn software() -> Result<Self> {
        Self::with_options(ContextOptions {
            adapter: AdapterChoice::Software,
            ..Default::default()
        })
    }

    /// Opens an adapter as `options` say.
    pub fn with_options(options: ContextOptions) -> Result<Self> {
        pollster::block_on(Self::open(options))
    }

    async fn open(options: ContextOptions) -> Result<Self> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = Self::pick_adapter(&instance, options.adapter).await?;
        let info = adapter.get_info();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("polyak-gpu"),
                // Timestamps serve the phase timings of benchmarks, f16 an f16
                // velocity, f64 f64 parameters; all are free to ask for where the
                // adapter has them.
                required_features: adapter.features()
                    & (wgpu::Features::TIMESTAMP_QUERY
                        | wgpu::Features::SHADER_F16
                        | wgpu::Features::SHADER_F64),
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::RequestDevice(e.to_string()))?;
        let mut ctx = Self::from_device(device, queue);
        ctx.max_workgroups = options
            .max_workgroups
            .unwrap_or_else(|| default_max_workgroups(info.device_type));
        ctx.max_segment_elements = options.max_segment_elements;
        // A CPU adapter runs a workgroup's invocations one after another, and its
        // work needs every core: contiguous walks, blocking waits.
        let cpu = info.device_type == wgpu::DeviceType::Cpu;
        ctx.contiguous_invocations = options.contiguous_invocations.unwrap_or(cpu);
        ctx.set_wait_timeout(options.wait_timeout.unwrap_or(DEFAULT_WAIT_TIMEOUT));
        let wait = if cpu { WaitMode::Block } else { WaitMode::Spin };
        ctx.set_wait_mode(options.wait_mode.unwrap_or(wait));
        if let Some(wg) = options.workgroup_size {
            ctx.set_workgroup_size(wg)?;
        }
        if let Some(u) = options.unroll {
            ctx.set_unroll(u)?;
        }
        if let Some(n) = options.one_pass_limit {
            ctx.set_one_pass_limit(n);
        }
        ctx.info = Some(info);
        Ok(ctx)
    }

    async fn pick_adapter(
        instance: &wgpu::Instance,
        choice: AdapterChoice,
    ) -> Result<wgpu::Adapter> {
        let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
        let adapters = instance.enumerate_adapters(backends).await;
        let seen: Vec<String> = adapters
            .iter()
            .map(|a| {
                let i = a.get_info();
                format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
            })
            .collect();
        let wanted_name = std::env::var("WGPU_ADAPTER_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .map(|s| s.to_lowercase());
        let power = wgpu::PowerPreference::from_env();
        let score = |a: &wgpu::Adapter| {
            let i = a.get_info();
            let type_rank = match (choice, power, i.device_type) {
                (AdapterChoice::Software, _, wgpu::DeviceType::Cpu) => 0,
                (AdapterChoice::Software, _, _) => return None,
                (_, Some(wgpu::PowerPreference::LowPower), wgpu::DeviceType::IntegratedGpu) => 0,
                (_, _, wgpu::DeviceType::DiscreteGpu) => 0,
                (_, _, wgpu::DeviceType::IntegratedGpu) => 1,
                (_, _, wgpu::DeviceType::VirtualGpu) => 2,
                (_, _, wgpu::DeviceType::Cpu) => 3,
                (_, _, wgpu::DeviceType::Other) => 4,
            };
            if let Some(name) = &wanted_name
                && !i.name.to_lowercase().contains(name)
            {
                return None;
            }
            // Vulkan before the others: wgpu's GL backend has weaker compute support.
            let backend_rank = if i.backend == wgpu::Backend::Vulkan {
                0
            } else {
                1
            };
            Some((type_rank, backend_rank))
        };
        let best = adapters
            .into_iter()
            .filter_map(|a| score(&a).map(|s| (s, a)))
            .min_by_key(|(s, _)| *s)
            .map(|(_, a)| a);
        best.ok_or_else(|| Error::NoAdapter {
            detail: format!(
                "asked for {choice:?}{}; adapters seen: [{}]",
                wanted_name
                    .map(|n| format!(" named like {n:?}"))
                    .unwrap_or_default(),
                seen.join(", ")
            ),
        })
    }

    /// Wraps a device and queue the caller already has, so the optimizer shares it
    /// with the caller's own kernels. Buffers the optimizer makes are sized from
    /// `device.limits()`.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        let limits = device.limits();
        GpuContext {
            device,
            queue,
            info: None,
            limits,
            max_workgroups: default_max_workgroups(wgpu::DeviceType::DiscreteGpu),
            max_segment_elements: None,
            contiguous_invocations: false,
            workgroup_size: DEFAULT_WORKGROUP_SIZE,
            unroll: 1,
            one_pass_limit: DEFAULT_ONE_PASS_LIMIT,
            wait_timeout_ns: Arc::new(AtomicU64::new(nanos(DEFAULT_WAIT_TIMEOUT))),
            spin: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Sets how long a wait for the GPU may take (see
    /// [`ContextOptions::wait_timeout`]; `Duration::MAX`: as long as the work
    /// takes). The setting is shared with every clone of this context, so it also
    /// applies to the optimizers already built from it.
    pub fn set_wait_timeout(&self, timeout: Duration) {
        self.wait_timeout_ns
            .store(nanos(timeout), Ordering::Relaxed);
    }

    /// How long a wait for the GPU may take before it is [`Error::Timeout`]
    /// (`Duration::MAX`: no limit).
    pub fn wait_timeout(&self) -> Duration {
        match self.wait_timeout_ns.load(Ordering::Relaxed) {
            u64::MAX => Duration::MAX,
            ns => Duration::from_nanos(ns),
        }
    }

    /// Sets how waits for the GPU wait (see [`WaitMode`]); shared with every clone
    /// of this context, like the timeout.
    pub fn set_wait_mode(&self, mode: WaitMode) {
        self.spin.store(mode == WaitMode::Spin, Ordering::Relaxed);
    }

    /// How waits for the GPU wait.
    pub fn wait_mode(&self) -> WaitMode {
        if self.spin.load(Ordering::Relaxed) {
            WaitMode::Spin
        } else {
            WaitMode::Block
        }
    }

    /// Overrides the workgroup cap of the norm and update dispatches.
    pub fn set_max_workgroups(&mut self, n: u32) {
        self.max_workgroups = n.max(1);
    }

    /// Sets the invocations per workgroup of the optimizers built from now on (see
    /// [`ContextOptions::workgroup_size`]): [`Error::InvalidOption`] unless a power
    /// of two from 32 that the device's limits allow, with room in workgroup memory
    /// for the norm's three f64 arrays of that length.
    pub fn set_workgroup_size(&mut self, n: u32) -> Result<()> {
        let l = &self.limits;
        let fits = n.is_power_of_two()
            && (32..=l.max_compute_invocations_per_workgroup).contains(&n)
            && n <= l.max_compute_workgroup_size_x
            && 3 * 8 * n <= l.max_compute_workgroup_storage_size;
        if !fits {
            return Err(Error::InvalidOption {
                option: "workgroup_size",
                value: n.to_string(),
                reason: "must be a power of two from 32 that the device's workgroup limits \
                         allow (3 x 8 bytes of workgroup memory per invocation)",
            });
        }
        self.workgroup_size = n;
        Ok(())
    }

    /// Invocations per workgroup of the norm and update kernels.
    pub fn workgroup_size(&self) -> u32 {
        self.workgroup_size
    }

    /// Sets the elements each invocation loads per loop iteration in the optimizers
    /// built from now on (see [`ContextOptions::unroll`]): 1, 2, 4 or 8, else
    /// [`Error::InvalidOption`].
    pub fn set_unroll(&mut self, n: u32) -> Result<()> {
        if ![1, 2, 4, 8].contains(&n) {
            return Err(Error::InvalidOption {
                option: "unroll",
                value: n.to_string(),
                reason: "must be 1, 2, 4 or 8",
            });
        }
        self.unroll = n;
        Ok(())
    }

    /// Elements each invocation of the norm and update kernels loads per loop
    /// iteration.
    pub fn unroll(&self) -> u32 {
        self.unroll
    }

    /// Sets the most gradient elements whose norm and step size one workgroup
    /// computes in one dispatch, in the optimizers built from now on (see
    /// [`ContextOptions::one_pass_limit`]; 0: never).
    pub fn set_one_pass_limit(&mut self, n: usize) {
        self.one_pass_limit = n;
    }

    /// The most gradient elements whose norm and step size one workgroup computes
    /// in one dispatch.
    pub fn one_pass_limit(&self) -> usize {
        self.one_pass_limit
    }

    /// Lowers the elements per segment below the device's limits (see
    /// [`ContextOptions::max_segment_elements`]).
    pub fn set_max_segment_elements(&mut self, n: Option<usize>) {
        self.max_segment_elements = n;
    }

    /// The segment size cap set by the caller, if any.
    pub fn max_segment_elements(&self) -> Option<usize> {
        self.max_segment_elements
    }

    /// Whether kernel invocations walk contiguous runs (see
    /// [`ContextOptions::contiguous_invocations`]).
    pub fn contiguous_invocations(&self) -> bool {
        self.contiguous_invocations
    }

    /// The pipeline-overridable constants the norm, update and copy kernels of this
    /// crate take: the walk and the workgroup size.
    pub fn kernel_constants(&self) -> [(&'static str, f64); 2] {
        let contiguous = if self.contiguous_invocations {
            1.0
        } else {
            0.0
        };
        [
            ("CONTIGUOUS", contiguous),
            ("WG", f64::from(self.workgroup_size)),
        ]
    }

    /// The wgpu device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// The device's limits, as granted.
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// The adapter's description, when this context opened the adapter itself.
    pub fn adapter_info(&self) -> Option<&wgpu::AdapterInfo> {
        self.info.as_ref()
    }

    /// Whether the adapter runs on the CPU (lavapipe), where device memory is host
    /// memory. `false` for a caller-provided device.
    pub fn is_cpu(&self) -> bool {
        self.info
            .as_ref()
            .is_some_and(|i| i.device_type == wgpu::DeviceType::Cpu)
    }

    /// Bytes that new buffers may take, where that is known: on a CPU adapter the
    /// host's available memory (Linux `/proc/meminfo`), since such an adapter
    /// over-commits and a model larger than memory would be killed on first use
    /// rather than fail to allocate. `None` on GPUs, whose free memory wgpu does not
    /// report: there a model too large fails at allocation instead.
    pub fn available_memory(&self) -> Option<u64> {
        if self.is_cpu() {
            proc_kb("/proc/meminfo", "MemAvailable:").map(|kb| kb * 1024)
        } else {
            None
        }
    }

    /// Upper bound on the workgroups of one norm or update dispatch.
    pub fn max_workgroups(&self) -> u32 {
        self.max_workgroups
    }

    /// One line naming the adapter, its backend and driver.
    pub fn describe(&self) -> String {
        match &self.info {
            Some(i) => format!(
                "{} ({:?}, {:?}, driver {} {})",
                i.name, i.backend, i.device_type, i.driver, i.driver_info
            ),
            None => "a caller-provided device".to_string(),
        }
    }

    /// Blocks until all submitted work is done, or returns [`Error::Timeout`] once
    /// [`GpuContext::wait_timeout`] has passed (the work stays queued and may still
    /// complete; waiting again waits for it).
    pub fn wait(&self) -> Result<()> {
        let limit = self.wait_timeout();
        let spin = self.wait_mode() == WaitMode::Spin;
        let start = Instant::now();
        loop {
            let timeout = match (spin, limit) {
                (true, _) => Some(Duration::ZERO),
                (false, Duration::MAX) => None,
                (false, limit) => Some(limit),
            };
            match self.device.poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout,
            }) {
                Ok(_) => return Ok(()),
                Err(wgpu::PollError::Timeout) if spin && start.elapsed() < limit => {
                    std::hint::spin_loop()
                }
                Err(wgpu::PollError::Timeout) => return Err(Error::Timeout(limit)),
                Err(e) => return Err(Error::Device(e.to_string())),
            }
        }
    }

    /// Runs `f`, which records or submits commands, under a wgpu validation error
    /// scope: a command wgpu rejects (one on a user buffer that was destroyed, say)
    /// is [`Error::Validation`] instead of wgpu's panic, and none of it ran.
    pub(crate) fn checked<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        match now(scope.pop()) {
            Some(e) => Err(Error::Validation(e.to_string())),
            None => Ok(out),
        }
    }
}

/// The output of `f`, which native wgpu has ready at once (error scopes): polled
/// once with a no-op waker, so a step allocates no waker; waited for otherwise.
pub(crate) fn now<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => pollster::block_on(f),
    }
}

/// A timeout in nanoseconds, `u64::MAX` standing for none (`Duration::MAX` or
/// anything beyond 584 years).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The kB figure after `key` in a /proc file (Linux; `None` elsewhere).
pub(crate) fn proc_kb(file: &str, key: &str) -> Option<u64> {
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Invocations per workgroup of the kernels unless the context says otherwise.
const DEFAULT_WORKGROUP_SIZE: u32 = 256;

fn default_max_workgroups(kind: wgpu::DeviceType) -> u32 {
    match kind {
        // lavapipe runs a workgroup's SIMD batches one after another and pays per
        // workgroup: with contiguous runs per invocation, 16 chunks per core measured
        // best at 1e6 and 1e7 parameters (polyak-bench --max-workgroups 2..128).
        wgpu::DeviceType::Cpu => {
            let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
            (cores * 16) as u32
        }
        // H200, wgpu 30, Vulkan: 2,048 workgroups gave 98% of the copy-rate floor at 1e8
        // parameters against 81% with 8,192 and 76% with 32,768; equal at 1e9.
        _ => 2048,
    }
}
