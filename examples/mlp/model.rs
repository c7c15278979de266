//! The MLP of `mlp.wgsl` bound to an optimizer's buffers, plus its f64 CPU twin
//! (for the tests and the accuracy figure).

use polyak_gpu::{
    Error, Evaluation, GpuContext, Loss, PolyakConfig, PolyakSgd, Result, StepSizeMode, TensorSpec,
};
use wgpu::util::DeviceExt;

/// Invocations per workgroup in `mlp.wgsl`.
const WG: usize = 64;

/// Sizes of the model and its data.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    /// Samples.
    pub samples: usize,
    /// Input features.
    pub features: usize,
    /// Hidden units.
    pub hidden: usize,
    /// Classes (at most 16).
    pub classes: usize,
}

impl Dims {
    /// The optimizer's tensors, in this order: w1 [f, h], b1 [h], w2 [h, c], b2 [c].
    pub fn tensors(&self) -> Vec<TensorSpec> {
        vec![
            TensorSpec::new("w1", &[self.features, self.hidden]),
            TensorSpec::new("b1", &[self.hidden]),
            TensorSpec::new("w2", &[self.hidden, self.classes]),
            TensorSpec::new("b2", &[self.classes]),
        ]
    }

    fn out_groups(&self) -> usize {
        (self.hidden * self.classes + self.classes).div_ceil(WG)
    }

    fn hidden_groups(&self) -> usize {
        (self.features * self.hidden + self.hidden).div_ceil(WG)
    }

    /// Squared-norm partials the gradient kernels write (`norm_from_objective`).
    pub fn norm_partials(&self) -> usize {
        self.out_groups() + self.hidden_groups()
    }
}

/// How the example trains: SPS_max capped at 10, momentum 0.5, until the gradient
/// norm is 1e-2 (or 2000 steps), the step size on the GPU, 16 steps per wait.
pub fn training_config() -> PolyakConfig {
    PolyakConfig::default()
        .max_stepsize(10.0)
        .momentum(0.5)
        .maxiter(2000)
        .tol(1e-2)
        .stepsize_mode(StepSizeMode::Device)
        .sync_every(16)
}

/// An optimizer holding the model's tensors, whose norm comes from the gradient
/// kernels.
pub fn optimizer(ctx: &GpuContext, dims: Dims, config: PolyakConfig) -> Result<PolyakSgd> {
    dims.tensors()
        .into_iter()
        .fold(PolyakSgd::builder(ctx, config), |b, t| b.tensor(t))
        .norm_from_objective(dims.norm_partials())
        .build()
}

/// The kernels, bound once to the data and to the optimizer's buffers.
pub struct Mlp {
    steps: Vec<(wgpu::ComputePipeline, wgpu::BindGroup, u32)>,
}

impl Mlp {
    /// Uploads `x` ([samples, features], row-major) and `y` (classes) and binds the
    /// kernels to `opt`'s tensors, which must be `dims.tensors()`, each in one
    /// piece, with `norm_from_objective(dims.norm_partials())`.
    pub fn new(opt: &PolyakSgd, dims: Dims, x: &[f32], y: &[u32]) -> Result<Self> {
        let bad = |what: &str| Error::Objective(format!("mlp: {what}"));
        if dims.classes > 16 || x.len() != dims.samples * dims.features || y.len() != dims.samples {
            return Err(bad("data and sizes disagree (or over 16 classes)"));
        }
        if y.iter().any(|&c| c as usize >= dims.classes) {
            return Err(bad("a label is not a class"));
        }
        let device = opt.context().device();
        let buffers = opt.buffers();
        let partials = buffers
            .norm_partials_binding()
            .ok_or_else(|| bad("build the optimizer with norm_from_objective"))?;
        let one = |key: &str, grads: bool| -> Result<wgpu::BufferBinding<'_>> {
            let mut b = if grads {
                buffers.grads_bindings(key)?
            } else {
                buffers.params_bindings(key)?
            };
            if b.len() != 1 {
                return Err(bad("a tensor spans two segments"));
            }
            Ok(b.remove(0))
        };
        let storage = |data: &[u8]| {
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("mlp"),
                contents: data,
                usage: wgpu::BufferUsages::STORAGE,
            })
        };
        let zeros = |n: usize| storage(&vec![0u8; 4 * n.max(1)]);
        let sizes = [
            dims.samples,
            dims.features,
            dims.hidden,
            dims.classes,
            dims.out_groups(),
            0,
            0,
            0,
        ]
        .map(|v| v as u32);
        let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("mlp dims"),
            contents: bytemuck::cast_slice(&sizes),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let x_buf = storage(bytemuck::cast_slice(x));
        let y_buf = storage(bytemuck::cast_slice(y));
        let act = zeros(dims.samples * dims.hidden);
        let dlogits = zeros(dims.samples * dims.classes);
        let losses = zeros(dims.samples);

        use wgpu::BindingResource::Buffer;
        let resource = |binding: u32| -> Result<wgpu::BindingResource<'_>> {
            Ok(match binding {
                0 => uniform.as_entire_binding(),
                1 => x_buf.as_entire_binding(),
                2 => y_buf.as_entire_binding(),
                3 => Buffer(one("w1", false)?),
                4 => Buffer(one("b1", false)?),
                5 => Buffer(one("w2", false)?),
                6 => Buffer(one("b2", false)?),
                7 => Buffer(one("w1", true)?),
                8 => Buffer(one("b1", true)?),
                9 => Buffer(one("w2", true)?),
                10 => Buffer(one("b2", true)?),
                11 => act.as_entire_binding(),
                12 => dlogits.as_entire_binding(),
                13 => losses.as_entire_binding(),
                14 => Buffer(partials.clone()),
                _ => Buffer(buffers.loss_binding()),
            })
        };
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("mlp"),
            source: wgpu::ShaderSource::Wgsl(include_str!("mlp.wgsl").into()),
        });
        // Each entry point with the bindings it uses and its workgroup count.
        let groups = |n: usize| n.div_ceil(WG) as u32;
        let plan: [(&str, &[u32], u32); 6] = [
            (
                "hidden",
                &[0, 1, 3, 4, 11],
                groups(dims.samples * dims.hidden),
            ),
            ("output", &[0, 2, 5, 6, 11, 12, 13], groups(dims.samples)),
            (
                "grad_out",
                &[0, 9, 10, 11, 12, 14],
                dims.out_groups() as u32,
            ),
            (
                "backprop",
                &[0, 5, 11, 12],
                groups(dims.samples * dims.hidden),
            ),
            (
                "grad_hidden",
                &[0, 1, 7, 8, 11, 14],
                dims.hidden_groups() as u32,
            ),
            ("total", &[0, 13, 15], 1),
        ];
        let mut steps = Vec::new();
        for (entry, bindings, count) in plan {
            let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            });
            let mut entries = Vec::new();
            for &binding in bindings {
                entries.push(wgpu::BindGroupEntry {
                    binding,
                    resource: resource(binding)?,
                });
            }
            let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(entry),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
            steps.push((pipeline, group, count));
        }
        Ok(Mlp { steps })
    }

    /// The objective: records forward and backward; the loss lands in the loss slot,
    /// the gradient and its norm partials in the optimizer's buffers.
    pub fn eval(&self, ev: &mut Evaluation<'_>) -> Result<(Loss, ())> {
        let mut pass = ev
            .encoder()
            .begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("mlp"),
                timestamp_writes: None,
            });
        for (pipeline, group, count) in &self.steps {
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, group, &[]);
            pass.dispatch_workgroups(*count, 1, 1);
        }
        Ok((Loss::Device, ()))
    }
}

/// The same model in f64 on the CPU: class scores for each sample, and, with
/// `grad`, the mean cross-entropy's gradient (layout order w1, b1, w2, b2).
pub fn cpu_forward(
    dims: Dims,
    params: &[f32],
    x: &[f32],
    y: &[u32],
    mut grad: Option<&mut Vec<f64>>,
) -> (f64, Vec<Vec<f64>>) {
    let (f, h, c, n) = (dims.features, dims.hidden, dims.classes, dims.samples);
    let p: Vec<f64> = params.iter().map(|&v| f64::from(v)).collect();
    let (w1, rest) = p.split_at(f * h);
    let (b1, rest) = rest.split_at(h);
    let (w2, b2) = rest.split_at(h * c);
    if let Some(g) = grad.as_deref_mut() {
        *g = vec![0.0; p.len()];
    }
    let mut total = 0.0;
    let mut scores = Vec::with_capacity(n);
    for s in 0..n {
        let xs = &x[s * f..(s + 1) * f];
        let act: Vec<f64> = (0..h)
            .map(|j| {
                let z = b1[j]
                    + (0..f)
                        .map(|k| f64::from(xs[k]) * w1[k * h + j])
                        .sum::<f64>();
                z.max(0.0)
            })
            .collect();
        let logits: Vec<f64> = (0..c)
            .map(|k| b2[k] + (0..h).map(|j| act[j] * w2[j * c + k]).sum::<f64>())
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + logits.iter().map(|z| (z - m).exp()).sum::<f64>().ln();
        total += lse - logits[y[s] as usize];
        if let Some(g) = grad.as_deref_mut() {
            let d: Vec<f64> = (0..c)
                .map(|k| {
                    ((logits[k] - lse).exp() - f64::from(u8::from(k == y[s] as usize))) / n as f64
                })
                .collect();
            let (gw1, rest) = g.split_at_mut(f * h);
            let (gb1, rest) = rest.split_at_mut(h);
            let (gw2, gb2) = rest.split_at_mut(h * c);
            for k in 0..c {
                gb2[k] += d[k];
                for j in 0..h {
                    gw2[j * c + k] += act[j] * d[k];
                }
            }
            for j in 0..h {
                if act[j] > 0.0 {
                    let back: f64 = (0..c).map(|k| d[k] * w2[j * c + k]).sum();
                    gb1[j] += back;
                    for k in 0..f {
                        gw1[k * h + j] += f64::from(xs[k]) * back;
                    }
                }
            }
        }
        scores.push(logits);
    }
    (total / n as f64, scores)
}

/// Share of samples whose highest score is their class.
pub fn accuracy(scores: &[Vec<f64>], y: &[u32]) -> f64 {
    let right = scores
        .iter()
        .zip(y)
        .filter(|&(s, &c)| {
            let best = (0..s.len()).fold(0, |b, k| if s[k] > s[b] { k } else { b });
            best == c as usize
        })
        .count();
    right as f64 / y.len() as f64
}
