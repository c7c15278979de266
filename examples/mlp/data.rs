//! Fisher's iris data (R. A. Fisher, 1936; 150 flowers, 4 measurements in cm, 3
//! species), shipped as `examples/data/iris.csv`.

use polyak_gpu::{Error, Result};

const IRIS: &str = include_str!("../data/iris.csv");

/// Standardised measurements ([150, 4], row-major) and species (0, 1, 2).
pub fn iris() -> Result<(Vec<f32>, Vec<u32>)> {
    let bad = |line: &str| Error::Data(format!("iris.csv: bad line {line:?}"));
    let mut x = Vec::new();
    let mut y = Vec::new();
    for line in IRIS.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != 5 {
            return Err(bad(line));
        }
        for v in &fields[..4] {
            x.push(v.trim().parse::<f32>().map_err(|_| bad(line))?);
        }
        y.push(fields[4].trim().parse::<u32>().map_err(|_| bad(line))?);
    }
    let n = y.len();
    for k in 0..4 {
        let col: Vec<f64> = (0..n).map(|s| f64::from(x[s * 4 + k])).collect();
        let mean = col.iter().sum::<f64>() / n as f64;
        let sd = (col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        for s in 0..n {
            x[s * 4 + k] = ((col[s] - mean) / sd) as f32;
        }
    }
    Ok((x, y))
}

/// Every fifth flower (10 of each species) held out for testing, the rest for
/// training: `(train x, train y, test x, test y)`.
pub fn split(x: &[f32], y: &[u32]) -> (Vec<f32>, Vec<u32>, Vec<f32>, Vec<u32>) {
    let (mut xa, mut ya, mut xb, mut yb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (s, &c) in y.iter().enumerate() {
        let (xs, ys) = if s % 5 == 4 {
            (&mut xb, &mut yb)
        } else {
            (&mut xa, &mut ya)
        };
        xs.extend_from_slice(&x[s * 4..s * 4 + 4]);
        ys.push(c);
    }
    (xa, ya, xb, yb)
}
