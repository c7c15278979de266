//! The conformance problems: the SplitMix64 data generator and each problem's loss
//! and hand-written gradient in f64.

use crate::error::{Error, Result};
use serde_json::Value;
use std::ops::Range;

/// SplitMix64, bit-exact with the generator of the reference file.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn u01(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[-1, 1)`.
    pub fn upm1(&mut self) -> f64 {
        2.0 * self.u01() - 1.0
    }

    /// `n` draws of [`SplitMix64::upm1`].
    pub fn upm1_vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.upm1()).collect()
    }
}

/// `acc = acc + a[j] * b[j]` in order, separately rounded (no FMA).
fn seq_dot(a: impl Iterator<Item = f64>, b: impl Iterator<Item = f64>) -> f64 {
    let mut acc = 0.0;
    for (x, y) in a.zip(b) {
        let prod = x * y;
        acc += prod;
    }
    acc
}

/// A dense row-major matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows * cols` entries, row-major.
    pub data: Vec<f64>,
}

impl Matrix {
    fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    fn rounded_f32(&self) -> Matrix {
        Matrix {
            data: round_f32(&self.data),
            ..self.clone()
        }
    }
}

/// Every entry rounded to the nearest f32 (kept as f64).
pub fn round_f32(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| x as f32 as f64).collect()
}

/// A problem of the reference file, with its materialised data.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    /// `0.5 * sum((A x - b)^2) / m`.
    LeastSquares {
        /// `m x d`.
        a: Matrix,
        /// `m`.
        b: Vec<f64>,
    },
    /// `mean softplus(-y * (X w))`.
    LogisticRegression {
        /// `m x d`.
        x: Matrix,
        /// Labels in {-1, +1}.
        y: Vec<f64>,
    },
    /// Params `{b: d_out, w: d_in x d_out}` (flat: b then w); `0.5 * sum(R^2) / n`,
    /// `R = X w + b - Y`.
    LinearModelPytree {
        /// `n x d_in`.
        x: Matrix,
        /// `n x d_out`.
        y: Matrix,
    },
    /// `0.5 * sum((x - c)^2)`.
    Quadratic {
        /// The minimiser.
        c: Vec<f64>,
    },
    /// `(1 - x0)^2 + 100 (x1 - x0^2)^2`.
    Rosenbrock,
}

fn num(v: &Value) -> Result<f64> {
    super::number(v)
}

fn vector(v: &Value) -> Result<Vec<f64>> {
    v.as_array()
        .ok_or_else(|| Error::Data("expected an array of numbers".into()))?
        .iter()
        .map(num)
        .collect()
}

fn matrix(v: &Value) -> Result<Matrix> {
    let rows = v
        .as_array()
        .ok_or_else(|| Error::Data("expected a matrix (array of rows)".into()))?;
    let data: Vec<Vec<f64>> = rows.iter().map(vector).collect::<Result<_>>()?;
    let cols = data.first().map_or(0, Vec::len);
    if data.iter().any(|r| r.len() != cols) {
        return Err(Error::Data("ragged matrix".into()));
    }
    Ok(Matrix {
        rows: data.len(),
        cols,
        data: data.concat(),
    })
}

fn field<'a>(v: &'a Value, key: &str) -> Result<&'a Value> {
    v.get(key)
        .ok_or_else(|| Error::Data(format!("missing field {key:?}")))
}

fn size(v: &Value, key: &str) -> Result<usize> {
    field(v, key)?
        .as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| Error::Data(format!("{key:?} is not a size")))
}

fn seed(problem: &Value) -> Result<u64> {
    field(field(problem, "generator")?, "seed")?
        .as_u64()
        .ok_or_else(|| Error::Data("generator seed is not an integer".into()))
}

fn draw_matrix(rng: &mut SplitMix64, rows: usize, cols: usize) -> Matrix {
    Matrix {
        rows,
        cols,
        data: rng.upm1_vec(rows * cols),
    }
}

impl Problem {
    /// Builds the problem from a case's `problem` object, from its materialised
    /// `data` when present, else from its generator recipe.
    pub fn from_json(problem: &Value) -> Result<Self> {
        let kind = field(problem, "kind")?
            .as_str()
            .ok_or_else(|| Error::Data("problem kind is not a string".into()))?;
        let data = problem.get("data").filter(|d| d.is_object());
        Ok(match (kind, data) {
            ("least_squares", Some(d)) => Problem::LeastSquares {
                a: matrix(field(d, "A")?)?,
                b: vector(field(d, "b")?)?,
            },
            ("logistic_regression", Some(d)) => Problem::LogisticRegression {
                x: matrix(field(d, "X")?)?,
                y: vector(field(d, "y")?)?,
            },
            ("linear_model_pytree", Some(d)) => Problem::LinearModelPytree {
                x: matrix(field(d, "X")?)?,
                y: matrix(field(d, "Y")?)?,
            },
            ("quadratic", Some(d)) => Problem::Quadratic {
                c: vector(field(d, "c")?)?,
            },
            ("rosenbrock", _) => Problem::Rosenbrock,
            (_, None) => Self::generate(problem)?,
            (other, _) => return Err(Error::Data(format!("unknown problem kind {other:?}"))),
        })
    }

    /// Rebuilds the data from the generator recipe (seed, sizes, draw order).
    pub fn generate(problem: &Value) -> Result<Self> {
        let kind = field(problem, "kind")?.as_str().unwrap_or_default();
        let mut rng = SplitMix64::new(if kind == "rosenbrock" {
            0
        } else {
            seed(problem)?
        });
        Ok(match kind {
            "least_squares" => {
                let (m, d) = (size(problem, "m")?, size(problem, "d")?);
                let a = draw_matrix(&mut rng, m, d);
                let x_true = rng.upm1_vec(d);
                let noise = field(problem, "generator")?
                    .get("noise_scale")
                    .map(num)
                    .transpose()?
                    .unwrap_or(0.0);
                let mut b: Vec<f64> = (0..m)
                    .map(|i| seq_dot(a.row(i).iter().copied(), x_true.iter().copied()))
                    .collect();
                if noise != 0.0 {
                    for bi in &mut b {
                        *bi += noise * rng.upm1();
                    }
                }
                Problem::LeastSquares { a, b }
            }
            "logistic_regression" => {
                let (m, d) = (size(problem, "m")?, size(problem, "d")?);
                let x = draw_matrix(&mut rng, m, d);
                let w = rng.upm1_vec(d);
                let y = (0..m)
                    .map(|i| {
                        if seq_dot(x.row(i).iter().copied(), w.iter().copied()) > 0.0 {
                            1.0
                        } else {
                            -1.0
                        }
                    })
                    .collect();
                Problem::LogisticRegression { x, y }
            }
            "linear_model_pytree" => {
                let (n, di, dout) = (
                    size(problem, "n")?,
                    size(problem, "d_in")?,
                    size(problem, "d_out")?,
                );
                let x = draw_matrix(&mut rng, n, di);
                let w = draw_matrix(&mut rng, di, dout);
                let b = rng.upm1_vec(dout);
                let mut y = Matrix {
                    rows: n,
                    cols: dout,
                    data: vec![0.0; n * dout],
                };
                for i in 0..n {
                    for (k, bk) in b.iter().enumerate() {
                        let col = (0..di).map(|j| w.data[j * dout + k]);
                        y.data[i * dout + k] = seq_dot(x.row(i).iter().copied(), col) + bk;
                    }
                }
                Problem::LinearModelPytree { x, y }
            }
            "quadratic" => Problem::Quadratic {
                c: rng.upm1_vec(size(problem, "d")?),
            },
            "rosenbrock" => Problem::Rosenbrock,
            other => return Err(Error::Data(format!("unknown problem kind {other:?}"))),
        })
    }

    /// The same problem with its data rounded to f32 (what a float32 run sees).
    pub fn rounded_f32(&self) -> Problem {
        match self {
            Problem::LeastSquares { a, b } => Problem::LeastSquares {
                a: a.rounded_f32(),
                b: round_f32(b),
            },
            Problem::LogisticRegression { x, y } => Problem::LogisticRegression {
                x: x.rounded_f32(),
                y: y.clone(),
            },
            Problem::LinearModelPytree { x, y } => Problem::LinearModelPytree {
                x: x.rounded_f32(),
                y: y.rounded_f32(),
            },
            Problem::Quadratic { c } => Problem::Quadratic { c: round_f32(c) },
            Problem::Rosenbrock => Problem::Rosenbrock,
        }
    }

    /// Number of data rows (for minibatches), 0 for problems without data rows
    /// (whose loss ignores the rows asked for).
    pub fn rows(&self) -> usize {
        match self {
            Problem::LeastSquares { a, .. } => a.rows,
            Problem::LogisticRegression { x, .. } | Problem::LinearModelPytree { x, .. } => x.rows,
            _ => 0,
        }
    }

    /// Loss at `p` over data rows `rows` (all rows when `None`; the loss is a mean
    /// over the rows used), with the gradient written into `g`.
    pub fn value_grad(&self, p: &[f64], g: &mut [f64], rows: Option<Range<usize>>) -> f64 {
        let rows = rows.unwrap_or(0..self.rows());
        let m = rows.len() as f64;
        g.fill(0.0);
        match self {
            Problem::LeastSquares { a, b } => {
                let mut loss = 0.0;
                for i in rows {
                    let r = a.row(i).iter().zip(p).map(|(a, x)| a * x).sum::<f64>() - b[i];
                    loss += r * r;
                    for (gj, aij) in g.iter_mut().zip(a.row(i)) {
                        *gj += aij * r / m;
                    }
                }
                0.5 * loss / m
            }
            Problem::LogisticRegression { x, y } => {
                let mut loss = 0.0;
                for i in rows {
                    let z = x.row(i).iter().zip(p).map(|(a, w)| a * w).sum::<f64>();
                    let t = -y[i] * z;
                    loss += t.max(0.0) + (-t.abs()).exp().ln_1p();
                    // d softplus / dt in the form autodiff of the formula above gives:
                    // [t > 0] - sign(t) * e / (1 + e), e = exp(-|t|); at t = 0 jax's
                    // maximum splits the tie (0.5) and sign(0) = 0.
                    let e = (-t.abs()).exp();
                    let sigma = if t > 0.0 {
                        1.0 - e / (1.0 + e)
                    } else if t < 0.0 {
                        e / (1.0 + e)
                    } else {
                        0.5
                    };
                    let ct = -y[i] * ((1.0 / m) * sigma);
                    for (gj, xij) in g.iter_mut().zip(x.row(i)) {
                        *gj += xij * ct;
                    }
                }
                loss / m
            }
            Problem::LinearModelPytree { x, y } => {
                let (di, dout) = (x.cols, y.cols);
                let (b, w) = p.split_at(dout);
                let (gb, gw) = g.split_at_mut(dout);
                let mut loss = 0.0;
                for i in rows {
                    for k in 0..dout {
                        let pred = (0..di)
                            .map(|j| x.data[i * di + j] * w[j * dout + k])
                            .sum::<f64>()
                            + b[k];
                        let r = pred - y.data[i * dout + k];
                        loss += r * r;
                        gb[k] += r / m;
                        for j in 0..di {
                            gw[j * dout + k] += x.data[i * di + j] * r / m;
                        }
                    }
                }
                0.5 * loss / m
            }
            Problem::Quadratic { c } => {
                let mut loss = 0.0;
                for ((gj, x), c) in g.iter_mut().zip(p).zip(c) {
                    *gj = x - c;
                    loss += (x - c) * (x - c);
                }
                0.5 * loss
            }
            Problem::Rosenbrock => {
                let (x0, x1) = (p[0], p[1]);
                let d = x1 - x0 * x0;
                g[0] = -2.0 * (1.0 - x0) - 400.0 * x0 * d;
                g[1] = 200.0 * d;
                (1.0 - x0) * (1.0 - x0) + 100.0 * d * d
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_self_test_from_the_reference_readme() {
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(SplitMix64::new(1).next_u64(), 0x910A_2DEC_8902_5CC1);
        assert_eq!(SplitMix64::new(1).upm1(), 0.1331231503445618);
    }

    fn check_grad(p: &Problem, x: &[f64]) {
        let mut g = vec![0.0; x.len()];
        let f0 = p.value_grad(x, &mut g, None);
        assert!(f0.is_finite());
        let mut scratch = vec![0.0; x.len()];
        for j in 0..x.len() {
            let h = 1e-6;
            let mut xp = x.to_vec();
            xp[j] += h;
            let fp = p.value_grad(&xp, &mut scratch, None);
            xp[j] -= 2.0 * h;
            let fm = p.value_grad(&xp, &mut scratch, None);
            let fd = (fp - fm) / (2.0 * h);
            assert!(
                (fd - g[j]).abs() <= 1e-6 * (1.0 + g[j].abs()),
                "{p:?} j={j}: {fd} vs {}",
                g[j]
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = SplitMix64::new(42);
        let a = draw_matrix(&mut rng, 6, 3);
        let b = rng.upm1_vec(6);
        check_grad(
            &Problem::LeastSquares {
                a: a.clone(),
                b: b.clone(),
            },
            &rng.upm1_vec(3),
        );
        let y = b.iter().map(|v| v.signum()).collect();
        check_grad(
            &Problem::LogisticRegression { x: a.clone(), y },
            &rng.upm1_vec(3),
        );
        let yy = draw_matrix(&mut rng, 6, 2);
        check_grad(
            &Problem::LinearModelPytree { x: a, y: yy },
            &rng.upm1_vec(2 + 3 * 2),
        );
        check_grad(&Problem::Quadratic { c: rng.upm1_vec(4) }, &rng.upm1_vec(4));
        check_grad(&Problem::Rosenbrock, &[-1.2, 1.0]);
    }
}
