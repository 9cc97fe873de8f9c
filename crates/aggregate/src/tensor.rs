//! Named f32 tensors in row-major order, and the few matrix operations the rules need.

use serde::{Deserialize, Serialize};

use crate::AggregateError;

/// A dense f32 tensor, row-major. Matrices are `[rows, cols]`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    /// Dimensions; their product is `data.len()`.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f32>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Adapter values are private: never print them.
        write!(f, "Tensor{:?}", self.shape)
    }
}

impl Tensor {
    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }

    /// A tensor from values; the length must match the shape.
    pub fn new(shape: &[usize], data: Vec<f32>) -> Result<Self, AggregateError> {
        let want: usize = shape.iter().product();
        if want != data.len() {
            return Err(AggregateError::Shape(format!(
                "shape {shape:?} needs {want} values, got {}",
                data.len()
            )));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor holds no values.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// `(rows, cols)` of a matrix.
    pub fn dims2(&self) -> Result<(usize, usize), AggregateError> {
        match self.shape.as_slice() {
            [r, c] => Ok((*r, *c)),
            other => Err(AggregateError::Shape(format!(
                "expected a matrix, got shape {other:?}"
            ))),
        }
    }

    /// Squared Frobenius norm, accumulated in f64.
    pub fn norm_sq(&self) -> f64 {
        self.data.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
    }

    /// Element `(i, j)` of a matrix with `cols` columns.
    fn at(&self, cols: usize, i: usize, j: usize) -> f32 {
        self.data[i * cols + j]
    }

    /// The first `rows` rows of a matrix.
    pub fn top_rows(&self, rows: usize) -> Result<Tensor, AggregateError> {
        let (r, c) = self.dims2()?;
        if rows > r {
            return Err(AggregateError::Shape(format!(
                "cannot take {rows} rows of a {r}x{c} matrix"
            )));
        }
        Tensor::new(&[rows, c], self.data[..rows * c].to_vec())
    }

    /// The first `cols` columns of a matrix.
    pub fn left_cols(&self, cols: usize) -> Result<Tensor, AggregateError> {
        let (r, c) = self.dims2()?;
        if cols > c {
            return Err(AggregateError::Shape(format!(
                "cannot take {cols} columns of a {r}x{c} matrix"
            )));
        }
        let mut data = Vec::with_capacity(r * cols);
        for row in self.data.chunks_exact(c) {
            data.extend_from_slice(&row[..cols]);
        }
        Tensor::new(&[r, cols], data)
    }

    /// A `rows x cols` matrix whose top-left block is `self` and the rest zero.
    pub fn zero_padded(&self, rows: usize, cols: usize) -> Result<Tensor, AggregateError> {
        let (r, c) = self.dims2()?;
        if r > rows || c > cols {
            return Err(AggregateError::Shape(format!(
                "cannot pad a {r}x{c} matrix to {rows}x{cols}"
            )));
        }
        let mut out = Tensor::zeros(&[rows, cols]);
        for (i, row) in self.data.chunks_exact(c).enumerate() {
            out.data[i * cols..i * cols + c].copy_from_slice(row);
        }
        Ok(out)
    }

    /// `self - other`, same shapes.
    pub fn sub(&self, other: &Tensor) -> Result<Tensor, AggregateError> {
        same_shape(self, other)?;
        Ok(Tensor {
            shape: self.shape.clone(),
            data: self
                .data
                .iter()
                .zip(&other.data)
                .map(|(a, b)| a - b)
                .collect(),
        })
    }

    /// `self += other`, same shapes.
    pub fn add_assign(&mut self, other: &Tensor) -> Result<(), AggregateError> {
        same_shape(self, other)?;
        self.data
            .iter_mut()
            .zip(&other.data)
            .for_each(|(a, b)| *a += b);
        Ok(())
    }

    /// `scale · self · other` for matrices `(m, r)` and `(r, n)`, accumulated in f64 so the
    /// product of a client's factors is the same on every machine up to f32 rounding.
    pub fn matmul_scaled(&self, other: &Tensor, scale: f64) -> Result<Tensor, AggregateError> {
        let (m, r) = self.dims2()?;
        let (r2, n) = other.dims2()?;
        if r != r2 {
            return Err(AggregateError::Shape(format!(
                "cannot multiply {m}x{r} by {r2}x{n}"
            )));
        }
        let mut out = vec![0f32; m * n];
        let mut acc = vec![0f64; n];
        for i in 0..m {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for k in 0..r {
                let x = f64::from(self.at(r, i, k));
                if x == 0.0 {
                    continue;
                }
                let row = &other.data[k * n..(k + 1) * n];
                for (a, &y) in acc.iter_mut().zip(row) {
                    *a += x * f64::from(y);
                }
            }
            for (o, a) in out[i * n..(i + 1) * n].iter_mut().zip(&acc) {
                *o = (a * scale) as f32;
            }
        }
        Tensor::new(&[m, n], out)
    }

    /// The transpose of a matrix.
    pub fn transpose(&self) -> Result<Tensor, AggregateError> {
        let (r, c) = self.dims2()?;
        let mut data = vec![0f32; r * c];
        for i in 0..r {
            for j in 0..c {
                data[j * r + i] = self.data[i * c + j];
            }
        }
        Tensor::new(&[c, r], data)
    }
}

fn same_shape(a: &Tensor, b: &Tensor) -> Result<(), AggregateError> {
    if a.shape != b.shape {
        return Err(AggregateError::Shape(format!(
            "shapes differ: {:?} vs {:?}",
            a.shape, b.shape
        )));
    }
    Ok(())
}

/// Tensors by name, in a fixed order (the order of the upload manifest and of the encodings).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NamedTensors {
    entries: Vec<(String, Tensor)>,
}

impl NamedTensors {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces `name`; a new name goes last.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        let name = name.into();
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = t,
            None => self.entries.push((name, t)),
        }
    }

    /// The tensor `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The tensor `name`, or a typed error naming it.
    pub fn require(&self, name: &str) -> Result<&Tensor, AggregateError> {
        self.get(name)
            .ok_or_else(|| AggregateError::MissingTensor(name.to_string()))
    }

    /// Mutable access to `name`.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.entries
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
    }

    /// Removes and returns `name`.
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        let i = self.entries.iter().position(|(n, _)| n == name)?;
        Some(self.entries.remove(i).1)
    }

    /// Entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Names in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total number of values.
    pub fn value_count(&self) -> usize {
        self.entries.iter().map(|(_, t)| t.len()).sum()
    }

    /// Whether every value is finite.
    pub fn all_finite(&self) -> bool {
        self.entries
            .iter()
            .all(|(_, t)| t.data.iter().all(|x| x.is_finite()))
    }
}

/// Magic bytes of encoded named tensors.
const NAMED_MAGIC: &[u8; 8] = b"FLTENSOR";

impl NamedTensors {
    /// A self-describing encoding: magic, a little-endian u32 JSON header length, the header
    /// (names and shapes), then the values as f32 little-endian (used for checkpoints).
    pub fn encode(&self) -> Vec<u8> {
        let header: Vec<(&str, &Vec<usize>)> = self
            .entries
            .iter()
            .map(|(n, t)| (n.as_str(), &t.shape))
            .collect();
        // Plain strings and integers always serialize.
        let json = serde_json::to_vec(&header).unwrap_or_default();
        let mut out = Vec::with_capacity(12 + json.len() + 4 * self.value_count());
        out.extend_from_slice(NAMED_MAGIC);
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        self.write_values(&mut out);
        out
    }

    /// Decodes [`NamedTensors::encode`]; malformed input is a typed error.
    pub fn decode(bytes: &[u8]) -> Result<Self, AggregateError> {
        let bad = |m: &str| AggregateError::Encoding(m.to_string());
        if bytes.len() < 12 || &bytes[..8] != NAMED_MAGIC {
            return Err(bad("not encoded tensors (bad magic)"));
        }
        let hlen = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        if 12 + hlen > bytes.len() {
            return Err(bad("header length out of range"));
        }
        let header: Vec<(String, Vec<usize>)> = serde_json::from_slice(&bytes[12..12 + hlen])
            .map_err(|e| AggregateError::Encoding(format!("header: {e}")))?;
        read_values(header, &bytes[12 + hlen..])
    }

    /// Appends every value as f32 little-endian, in order.
    pub(crate) fn write_values(&self, out: &mut Vec<u8>) {
        for (_, t) in &self.entries {
            for v in &t.data {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Reads tensors of the given names and shapes from f32 little-endian `body`, which they must fill
/// exactly; sizes that overflow or exceed the bytes are errors.
pub(crate) fn read_values(
    header: Vec<(String, Vec<usize>)>,
    mut body: &[u8],
) -> Result<NamedTensors, AggregateError> {
    let bad = |m: &str| AggregateError::Encoding(m.to_string());
    let mut out = NamedTensors::new();
    for (name, shape) in header {
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|n| n.checked_mul(4).is_some_and(|b| b <= body.len()))
            .ok_or_else(|| bad("tensor sizes exceed the encoded values"))?;
        let (vals, rest) = body.split_at(4 * n);
        body = rest;
        let data = vals
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, Tensor { shape, data });
    }
    if !body.is_empty() {
        return Err(bad("trailing bytes after the last tensor"));
    }
    Ok(out)
}

impl FromIterator<(String, Tensor)> for NamedTensors {
    fn from_iter<I: IntoIterator<Item = (String, Tensor)>>(iter: I) -> Self {
        let mut out = NamedTensors::new();
        for (n, t) in iter {
            out.insert(n, t);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(r: usize, c: usize, f: impl Fn(usize, usize) -> f32) -> Tensor {
        let mut data = Vec::new();
        for i in 0..r {
            for j in 0..c {
                data.push(f(i, j));
            }
        }
        Tensor::new(&[r, c], data).expect("shape")
    }

    #[test]
    fn matmul_matches_the_definition() {
        let a = m(3, 2, |i, j| (i * 2 + j) as f32);
        let b = m(2, 4, |i, j| (i as f32) - (j as f32));
        let p = a.matmul_scaled(&b, 0.5).expect("matmul");
        for i in 0..3 {
            for j in 0..4 {
                let want: f32 = (0..2).map(|k| a.data[i * 2 + k] * b.data[k * 4 + j]).sum();
                assert!((p.data[i * 4 + j] - 0.5 * want).abs() < 1e-6);
            }
        }
        assert!(a.matmul_scaled(&a, 1.0).is_err());
    }

    #[test]
    fn named_tensors_encode_and_decode() {
        let mut t = NamedTensors::new();
        t.insert("a", m(2, 3, |i, j| (i + j) as f32));
        t.insert("b", Tensor::zeros(&[4]));
        let bytes = t.encode();
        assert_eq!(NamedTensors::decode(&bytes).expect("decode"), t);
        assert!(NamedTensors::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(NamedTensors::decode(b"FLTENSOR\x05\0\0\0[[\"x\"").is_err());
    }

    #[test]
    fn slicing_and_padding_round_trip() {
        let a = m(4, 6, |i, j| (i * 10 + j) as f32);
        let top = a.top_rows(2).expect("rows");
        assert_eq!(top.shape, vec![2, 6]);
        assert_eq!(
            top.zero_padded(4, 6).expect("pad").top_rows(2).expect("r"),
            top
        );
        let left = a.left_cols(3).expect("cols");
        assert_eq!(left.data[3], 10.0);
        assert_eq!(
            left.zero_padded(4, 6)
                .expect("pad")
                .left_cols(3)
                .expect("c"),
            left
        );
        assert!(a.top_rows(5).is_err());
        assert_eq!(a.transpose().expect("t").transpose().expect("t"), a);
    }
}
