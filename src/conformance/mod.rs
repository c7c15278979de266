//! Replays the recorded `jaxopt.PolyakSGD` trajectories (`jaxopt_polyak_sgd_conformance`
//! schema 1) on the f64 CPU reference and on the f32 GPU path, and compares them with
//! the tolerances of the reference README.

pub mod problems;

pub use problems::{Matrix, Problem, SplitMix64};

use crate::config::{NonFinitePolicy, PolyakConfig};
use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::layout::TensorSpec;
use crate::reference::CpuPolyakSgd;
use crate::solver::PolyakSgd;
use crate::state::{Loss, State};
use serde_json::Value;
use std::ops::Range;

/// A float of the file: a JSON number or `"NaN"`, `"Infinity"`, `"-Infinity"`.
pub fn number(v: &Value) -> Result<f64> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| Error::Data(format!("bad number {n}"))),
        Value::String(s) if s == "NaN" => Ok(f64::NAN),
        Value::String(s) if s == "Infinity" => Ok(f64::INFINITY),
        Value::String(s) if s == "-Infinity" => Ok(f64::NEG_INFINITY),
        other => Err(Error::Data(format!("expected a number, got {other}"))),
    }
}

fn field<'a>(v: &'a Value, key: &str) -> Result<&'a Value> {
    v.get(key)
        .ok_or_else(|| Error::Data(format!("missing field {key:?}")))
}

fn usize_of(v: &Value, key: &str) -> Result<usize> {
    field(v, key)?
        .as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| Error::Data(format!("{key:?} is not a count")))
}

fn floats(v: &Value) -> Result<Vec<f64>> {
    v.as_array()
        .ok_or_else(|| Error::Data("expected an array".into()))?
        .iter()
        .map(number)
        .collect()
}

/// A recorded vector: in full when short, else its head, sum and L2 norm.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    /// Every entry.
    Full(Vec<f64>),
    /// First entries, sum and norm of a long vector.
    Summary {
        /// First 8 entries.
        head: Vec<f64>,
        /// Sum of all entries.
        sum: f64,
        /// L2 norm.
        l2: f64,
    },
}

impl Recorded {
    fn parse(v: &Value) -> Result<Self> {
        if v.is_array() {
            return Ok(Recorded::Full(floats(v)?));
        }
        Ok(Recorded::Summary {
            head: floats(field(v, "head")?)?,
            sum: number(field(v, "sum")?)?,
            l2: number(field(v, "l2")?)?,
        })
    }

    /// Relative L2 difference of `ours` from this record (NaN patterns must agree:
    /// `f64::INFINITY` when they do not, 0 for matching non-finite entries).
    pub fn rel_diff(&self, ours: &[f64]) -> f64 {
        match self {
            Recorded::Full(r) => rel_l2(ours, r),
            Recorded::Summary { head, sum, l2 } => {
                let n = head.len().min(ours.len());
                let h = rel_l2(&ours[..n], &head[..n]);
                let our_l2 = ours.iter().map(|x| x * x).sum::<f64>().sqrt();
                let our_sum: f64 = ours.iter().sum();
                h.max(scalar_rel(our_l2, *l2, 0.0))
                    .max((our_sum - sum).abs() / l2.max(f64::MIN_POSITIVE))
            }
        }
    }
}

/// `||a - b|| / ||b||`, with non-finite entries compared by pattern.
pub fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let mut num = 0.0;
    let mut den = 0.0;
    for (x, y) in a.iter().zip(b) {
        if !y.is_finite() || !x.is_finite() {
            if !(x.is_nan() && y.is_nan() || x == y) {
                return f64::INFINITY;
            }
            continue;
        }
        num += (x - y) * (x - y);
        den += y * y;
    }
    if num == 0.0 { 0.0 } else { (num / den).sqrt() }
}

/// `|a - b| / (|b| + floor)`; 0 for equal non-finite values (NaN == NaN here) and
/// infinite when one side is non-finite and the other is not.
pub fn scalar_rel(a: f64, b: f64, floor: f64) -> f64 {
    if a.is_nan() && b.is_nan() || a == b {
        return 0.0;
    }
    if !a.is_finite() || !b.is_finite() {
        return f64::INFINITY;
    }
    (a - b).abs() / (b.abs() + floor).max(f64::MIN_POSITIVE)
}

/// One recorded state (trajectory entry, checkpoint or run result).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Updates done (`k`; equals `iter_num`).
    pub iter_num: usize,
    /// Parameters.
    pub params: Recorded,
    /// Loss at the point the last update started from.
    pub value: f64,
    /// Step size of the last update.
    pub stepsize: f64,
    /// Gradient norm at that point.
    pub error: f64,
    /// Velocity, when momentum is used.
    pub velocity: Option<Recorded>,
    /// Function evaluations.
    pub num_fun_eval: usize,
    /// Gradient evaluations.
    pub num_grad_eval: usize,
    /// Batch index passed to the update that produced this state (run_iterator).
    pub batch: Option<usize>,
}

impl Entry {
    fn parse(v: &Value) -> Result<Self> {
        Ok(Entry {
            iter_num: usize_of(v, "iter_num")?,
            params: Recorded::parse(field(v, "params")?)?,
            value: number(field(v, "value")?)?,
            stepsize: number(field(v, "stepsize")?)?,
            error: number(field(v, "error")?)?,
            velocity: v
                .get("velocity")
                .filter(|x| !x.is_null())
                .map(Recorded::parse)
                .transpose()?,
            num_fun_eval: usize_of(v, "num_fun_eval")?,
            num_grad_eval: usize_of(v, "num_grad_eval")?,
            batch: v.get("batch").and_then(Value::as_u64).map(|b| b as usize),
        })
    }
}

impl From<&Observed> for Entry {
    /// Records one of our states in the reference's form (for building expected data
    /// from one path to check another).
    fn from(o: &Observed) -> Self {
        Entry {
            iter_num: o.state.iter_num,
            params: Recorded::Full(o.params.clone()),
            value: o.state.value,
            stepsize: o.state.stepsize,
            error: o.state.error,
            velocity: o.velocity.clone().map(Recorded::Full),
            num_fun_eval: o.state.num_fun_eval,
            num_grad_eval: o.state.num_grad_eval,
            batch: None,
        }
    }
}

/// How the case was solved in jaxopt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `solver.run(x0)`.
    Run,
    /// `solver.run_iterator(x0, batches)`.
    RunIterator,
}

/// One case of a reference file.
#[derive(Debug, Clone)]
pub struct Case {
    /// Case name.
    pub name: String,
    /// `run` or `run_iterator`.
    pub method: Method,
    /// Solver options (with [`NonFinitePolicy::Propagate`], as jaxopt).
    pub config: PolyakConfig,
    /// The objective.
    pub problem: Problem,
    /// Pytree leaves in flatten order.
    pub tensors: Vec<TensorSpec>,
    /// Initial parameters, flat.
    pub init_params: Vec<f64>,
    /// States after k = 0, 1, ... updates, then the checkpoints.
    pub entries: Vec<Entry>,
    /// Final state of `run` / `run_iterator`.
    pub run_result: Entry,
    /// Independent f64 implementation vs jaxopt, relative params error per k.
    pub independent_by_k: Vec<f64>,
}

impl Case {
    fn parse(v: &Value) -> Result<Self> {
        let name = field(v, "name")?.as_str().unwrap_or("?").to_string();
        let ctx = |e: Error| Error::Data(format!("case {name}: {e}"));
        let method = match field(v, "method")?.as_str() {
            Some("run") => Method::Run,
            Some("run_iterator") => Method::RunIterator,
            other => return Err(ctx(Error::Data(format!("unknown method {other:?}")))),
        };
        let s = field(v, "solver")?;
        let config = PolyakConfig::default()
            .fun_min(number(field(s, "fun_min")?)?)
            .variant(
                field(s, "variant")?
                    .as_str()
                    .unwrap_or("")
                    .parse()
                    .map_err(ctx)?,
            )
            .max_stepsize(number(field(s, "max_stepsize")?)?)
            .delta(number(field(s, "delta")?)?)
            .momentum(number(field(s, "momentum")?)?)
            .maxiter(usize_of(s, "maxiter")?)
            .tol(number(field(s, "tol")?)?)
            .nonfinite(NonFinitePolicy::Propagate);
        let problem = Problem::from_json(field(v, "problem")?).map_err(ctx)?;
        let tensors = field(v, "param_layout")?
            .as_array()
            .ok_or_else(|| ctx(Error::Data("param_layout is not a list".into())))?
            .iter()
            .map(|leaf| {
                let shape: Vec<usize> = field(leaf, "shape")?
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_u64)
                            .map(|d| d as usize)
                            .collect()
                    })
                    .unwrap_or_default();
                let key = field(leaf, "key")?.as_str().unwrap_or(".").to_string();
                Ok(TensorSpec::new(key, &shape))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut entries = Vec::new();
        for key in ["trajectory", "checkpoints"] {
            if let Some(list) = v.get(key).and_then(Value::as_array) {
                for e in list {
                    entries.push(Entry::parse(e).map_err(ctx)?);
                }
            }
        }
        let independent_by_k = v
            .get("independent_f64_check")
            .and_then(|c| c.get("params_rel_l2_by_k"))
            .map(floats)
            .transpose()?
            .unwrap_or_default();
        Ok(Case {
            method,
            config,
            problem,
            tensors,
            init_params: floats(field(v, "init_params")?)?,
            entries,
            run_result: Entry::parse(field(v, "run_result")?).map_err(ctx)?,
            independent_by_k,
            name,
        })
    }

    /// Whether round-off grows chaotically (Rosenbrock): compared on early steps only.
    pub fn chaotic(&self) -> bool {
        self.problem == Problem::Rosenbrock
    }

    /// Data rows of minibatch `t`: rows `8*(t mod 4) .. 8*(t mod 4)+8`.
    pub fn batch_rows(&self, t: usize) -> Option<Range<usize>> {
        match self.method {
            Method::Run => None,
            Method::RunIterator => {
                let start = 8 * (t % 4);
                Some(start..start + 8)
            }
        }
    }

    /// Batch index used by update `k` (from the record when present, else `k`).
    fn batch_of_update(&self, k: usize) -> usize {
        self.entries
            .iter()
            .find(|e| e.iter_num == k)
            .and_then(|e| e.batch)
            .unwrap_or(k)
    }

    fn last_k(&self) -> usize {
        self.entries.iter().map(|e| e.iter_num).max().unwrap_or(0)
    }
}

/// A parsed reference file.
#[derive(Debug, Clone)]
pub struct ReferenceFile {
    /// Every case, in file order.
    pub cases: Vec<Case>,
}

impl ReferenceFile {
    /// Reads and parses `path`.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// Parses the JSON text of a reference file.
    pub fn parse(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::Data(e.to_string()))?;
        if v.get("format").and_then(Value::as_str) != Some("jaxopt_polyak_sgd_conformance") {
            return Err(Error::Data(
                "not a jaxopt_polyak_sgd_conformance file".into(),
            ));
        }
        let cases = field(&v, "cases")?
            .as_array()
            .ok_or_else(|| Error::Data("cases is not a list".into()))?
            .iter()
            .map(Case::parse)
            .collect::<Result<_>>()?;
        Ok(ReferenceFile { cases })
    }
}

/// A state seen on one of our paths.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// The state's scalars.
    pub state: State<()>,
    /// Parameters (f64, or f32 widened).
    pub params: Vec<f64>,
    /// Velocity, when momentum is used.
    pub velocity: Option<Vec<f64>>,
}

/// What one path produced for one case.
#[derive(Debug, Clone)]
pub struct Replay {
    /// States after k updates, for every recorded k, in the order of `Case::entries`.
    pub entries: Vec<Observed>,
    /// Result of `run` / `run_iterator`.
    pub run: Observed,
}

/// Checks that every minibatch lies inside the problem's data.
fn check_batches(case: &Case) -> Result<()> {
    if case.method == Method::RunIterator
        && case.problem != Problem::Rosenbrock
        && case.problem.rows() < 32
    {
        return Err(Error::Data(format!(
            "case {}: minibatches of 8 rows out of 32 need 32 data rows, the problem has {}",
            case.name,
            case.problem.rows()
        )));
    }
    Ok(())
}

/// Replays `case` on the f64 CPU reference.
pub fn replay_cpu(case: &Case) -> Result<Replay> {
    check_batches(case)?;
    let problem = &case.problem;
    let observe = |opt: &CpuPolyakSgd, s: &State<()>| Observed {
        state: s.clone(),
        params: opt.params().to_vec(),
        velocity: opt.velocity().map(<[f64]>::to_vec),
    };
    let mut opt = CpuPolyakSgd::new(case.config.clone(), case.init_params.clone())?;
    let rows0 = case.batch_rows(0);
    let mut state = opt.init_state(|p, g| Ok((problem.value_grad(p, g, rows0), ())))?;
    let mut seen = vec![observe(&opt, &state)];
    for k in 1..=case.last_k() {
        let rows = case.batch_rows(case.batch_of_update(k));
        state = opt.update(&state, |p, g| Ok((problem.value_grad(p, g, rows), ())))?;
        seen.push(observe(&opt, &state));
    }
    let entries = case
        .entries
        .iter()
        .map(|e| seen[e.iter_num].clone())
        .collect();

    let mut opt = CpuPolyakSgd::new(case.config.clone(), case.init_params.clone())?;
    let state = match case.method {
        Method::Run => opt.run(|p, g| Ok((problem.value_grad(p, g, None), ())))?,
        Method::RunIterator => opt.run_iterator(
            |p, g, t: &usize| Ok((problem.value_grad(p, g, case.batch_rows(*t)), ())),
            0..=case.config.maxiter,
        )?,
    };
    let run = observe(&opt, &state);
    Ok(Replay { entries, run })
}

/// Replays `case` on the GPU in the case config's [`crate::ParamDtype`]: f32 (data and
/// initial parameters rounded to f32, the loss and gradient handed over as an f32
/// pipeline would) or f64 (everything exact). The objective runs on the host (the
/// parameters cross to the CPU every step: fine for these tiny problems, and it
/// tests exactly the optimizer's own kernels).
pub fn replay_gpu(ctx: &GpuContext, case: &Case) -> Result<Replay> {
    check_batches(case)?;
    let f64_path = case.config.dtype == crate::ParamDtype::F64;
    let problem = if f64_path {
        case.problem.clone()
    } else {
        case.problem.rounded_f32()
    };
    let n = case.init_params.len();
    let objective =
        |ev: &mut crate::Evaluation<'_>, rows: Option<Range<usize>>| -> Result<(Loss, ())> {
            let p = ev.read_params_f64()?;
            let mut g = vec![0.0; n];
            let loss = problem.value_grad(&p, &mut g, rows);
            if f64_path {
                ev.write_grads_f64(&g)?;
                return Ok((Loss::Host(loss), ()));
            }
            // Loss and gradient in f64 from the f32 parameters, rounded to f32 as
            // an f32 pipeline would hand them over.
            let g32: Vec<f32> = g.iter().map(|&x| x as f32).collect();
            ev.write_grads(&g32)?;
            Ok((Loss::Host(f64::from(loss as f32)), ()))
        };
    let observe = |opt: &PolyakSgd, s: &State<()>| -> Result<Observed> {
        Ok(Observed {
            state: s.clone(),
            params: opt.buffers().download_params_f64()?,
            velocity: opt.buffers().download_velocity_f64()?,
        })
    };
    let mut opt = PolyakSgd::with_tensors(ctx, case.config.clone(), &case.tensors)?;
    opt.buffers().upload_params_f64(&case.init_params)?;
    let mut state = opt.init_state(|ev| objective(ev, case.batch_rows(0)))?;
    let mut seen = vec![observe(&opt, &state)?];
    for k in 1..=case.last_k() {
        let rows = case.batch_rows(case.batch_of_update(k));
        state = opt.update(&state, |ev| objective(ev, rows))?;
        seen.push(observe(&opt, &state)?);
    }
    let entries = case
        .entries
        .iter()
        .map(|e| seen[e.iter_num].clone())
        .collect();

    opt.buffers().upload_params_f64(&case.init_params)?;
    let state = match case.method {
        Method::Run => opt.run(|ev| objective(ev, None))?,
        Method::RunIterator => opt.run_iterator(
            |ev, t: &usize| objective(ev, case.batch_rows(*t)),
            0..=case.config.maxiter,
        )?,
    };
    let run = observe(&opt, &state)?;
    Ok(Replay { entries, run })
}

/// Worst errors of one path on one case, and what failed.
#[derive(Debug, Clone, Default)]
pub struct Comparison {
    /// `iter_num` of our `run` / `run_iterator`.
    pub iter_num: usize,
    /// Worst relative L2 error of the parameters.
    pub params: f64,
    /// Worst relative error of `value`.
    pub value: f64,
    /// Worst relative error of `stepsize`.
    pub stepsize: f64,
    /// Worst relative error of `error`.
    pub error: f64,
    /// Each check that failed, in words.
    pub failures: Vec<String>,
}

impl Comparison {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Tolerances of one path.
struct Tolerance {
    /// Relative L2 on parameters and velocity.
    params: f64,
    /// Relative part of the scalar bound.
    rel: f64,
    /// Multiple of `|x at k = 1|` added to the scalar bound.
    abs_of_k1: f64,
    /// Compare only states after at most this many updates.
    max_k: usize,
    /// Precision of the path (a capped step must equal max_stepsize rounded to it).
    f32: bool,
}

/// `err <= tol`, false for a NaN error.
fn within(err: f64, tol: f64) -> bool {
    err <= tol
}

fn compare(case: &Case, replay: &Replay, tol: &Tolerance) -> Comparison {
    let mut c = Comparison {
        iter_num: replay.run.state.iter_num,
        ..Default::default()
    };
    let k1 = case.entries.iter().find(|e| e.iter_num == 1);
    let scale = |f: fn(&Entry) -> f64| k1.map_or(0.0, |e| f(e).abs()).min(f64::MAX);
    let floors = [
        tol.abs_of_k1 * scale(|e| e.value) / tol.rel,
        tol.abs_of_k1 * scale(|e| e.stepsize) / tol.rel,
        tol.abs_of_k1 * scale(|e| e.error) / tol.rel,
    ];
    let chaotic = case.chaotic();
    let mut check = |label: String, reference: &Entry, ours: &Observed, params_tol: f64| {
        let s = &ours.state;
        if s.iter_num != reference.iter_num
            || s.num_fun_eval != reference.num_fun_eval
            || s.num_grad_eval != reference.num_grad_eval
        {
            c.failures.push(format!(
                "{label}: counters {}/{}/{} vs {}/{}/{}",
                s.iter_num,
                s.num_fun_eval,
                s.num_grad_eval,
                reference.iter_num,
                reference.num_fun_eval,
                reference.num_grad_eval
            ));
        }
        let p = reference.params.rel_diff(&ours.params);
        c.params = c.params.max(p);
        if !within(p, params_tol) {
            c.failures
                .push(format!("{label}: params rel {p:.2e} > {params_tol:.1e}"));
        }
        if let (Some(rv), Some(ov)) = (&reference.velocity, &ours.velocity) {
            let d = rv.rel_diff(ov);
            if !within(d, params_tol * 10.0) {
                c.failures.push(format!("{label}: velocity rel {d:.2e}"));
            }
        }
        let scalars = [
            ("value", s.value, reference.value, floors[0]),
            ("stepsize", s.stepsize, reference.stepsize, floors[1]),
            ("error", s.error, reference.error, floors[2]),
        ];
        for (name, ours_v, ref_v, floor) in scalars {
            let r = scalar_rel(ours_v, ref_v, floor);
            let slot = match name {
                "value" => &mut c.value,
                "stepsize" => &mut c.stepsize,
                _ => &mut c.error,
            };
            *slot = slot.max(r);
            if !within(r, tol.rel) && !chaotic {
                c.failures
                    .push(format!("{label}: {name} {ours_v:e} vs {ref_v:e}"));
            }
        }
        let capped = case.config.variant == crate::Variant::SpsMax
            && reference.stepsize == case.config.max_stepsize;
        if tol.f32 && capped && s.stepsize != f64::from(case.config.max_stepsize as f32) {
            c.failures.push(format!(
                "{label}: capped stepsize {} is not max_stepsize in f32",
                s.stepsize
            ));
        }
    };
    for (e, o) in case.entries.iter().zip(&replay.entries) {
        if e.iter_num > tol.max_k {
            continue;
        }
        let params_tol = if chaotic {
            // the achievable accuracy there, measured between two f64 implementations
            let indep = case
                .independent_by_k
                .get(e.iter_num)
                .copied()
                .unwrap_or(1e-6);
            if tol.f32 {
                1e-3
            } else {
                (100.0 * indep).max(1e-10)
            }
        } else {
            tol.params
        };
        check(format!("k={}", e.iter_num), e, o, params_tol);
    }
    // run / run_iterator result
    let r = &case.run_result;
    let ours = &replay.run;
    if chaotic {
        // Round-off grows without bound: only the outcome is comparable (both runs
        // end near the same minimum), not the iteration count.
        let d = r.params.rel_diff(&ours.params);
        c.params = c.params.max(d);
        if !within(d, 5e-2) {
            c.failures.push(format!("run: outcome params rel {d:.2e}"));
        }
        return c;
    }
    let near_tol = (r.error - case.config.tol).abs() <= 1e-3 * case.config.tol;
    let diff = ours.state.iter_num.abs_diff(r.iter_num);
    if diff > usize::from(near_tol && tol.f32) {
        c.failures.push(format!(
            "run: iter_num {} vs {}",
            ours.state.iter_num, r.iter_num
        ));
    } else if diff == 0 {
        check("run".into(), r, ours, tol.params);
    }
    c
}

/// Compares a CPU f64 replay with the reference: parameters within 1e-12 relative,
/// value, step size and error within 5e-12 (the README's "~1e-12": on the separable
/// logistic regression the step size `value / sqnorm` of a vanishing gradient
/// reaches 1.1e-12 while the parameters stay at 2e-13).
pub fn compare_f64(case: &Case, replay: &Replay) -> Comparison {
    compare(
        case,
        replay,
        &Tolerance {
            params: 1e-12,
            rel: 5e-12,
            abs_of_k1: 1e-12,
            max_k: usize::MAX,
            f32: false,
        },
    )
}

/// Compares a GPU f32 replay with the f64 reference using the README's float32
/// acceptance: params within 1e-4 relative, scalars within `1e-3 |x| + 1e-6 |x at
/// k=1|`, first 50 updates (10 for chaotic problems), same `run` iteration count.
pub fn compare_f32(case: &Case, replay: &Replay) -> Comparison {
    compare(
        case,
        replay,
        &Tolerance {
            params: 1e-4,
            rel: 1e-3,
            abs_of_k1: 1e-6,
            max_k: if case.chaotic() { 10 } else { 50 },
            f32: true,
        },
    )
}
