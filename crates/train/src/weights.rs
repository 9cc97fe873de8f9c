//! A bag of named f32 tensors read from safetensors or GGUF, with errors that name what is missing.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::{Result, TrainError};

/// Named tensors, all f32 on one device.
#[derive(Debug, Default)]
pub struct Weights {
    map: HashMap<String, Tensor>,
}

impl Weights {
    /// From a map (converted to f32).
    pub fn from_map(map: HashMap<String, Tensor>) -> Result<Self> {
        let map = map
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Weights { map })
    }

    /// Every `*.safetensors` file in a directory (sharded checkpoints included).
    pub fn from_safetensors_dir(dir: &Path, device: &Device) -> Result<Self> {
        let rd = std::fs::read_dir(dir)
            .map_err(|e| TrainError::io(format!("reading {}", dir.display()), e))?;
        let mut files: Vec<_> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(TrainError::BadModel(format!(
                "no *.safetensors file in {}",
                dir.display()
            )));
        }
        let mut map = HashMap::new();
        for f in files {
            let m = candle_core::safetensors::load(&f, device)
                .map_err(|e| TrainError::BadModel(format!("reading {}: {e}", f.display())))?;
            map.extend(m);
        }
        Weights::from_map(map)
    }

    /// Removes and returns a tensor, or says which one is missing.
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.map
            .remove(name)
            .ok_or_else(|| TrainError::BadModel(format!("tensor `{name}` not found")))
    }

    /// The first of several alternative names that exists.
    pub fn take_any(&mut self, names: &[&str]) -> Result<Tensor> {
        for n in names {
            if let Some(t) = self.map.remove(*n) {
                return Ok(t);
            }
        }
        Err(TrainError::BadModel(format!(
            "none of the tensors {names:?} found"
        )))
    }

    /// Removes a tensor if present.
    pub fn take_opt(&mut self, name: &str) -> Option<Tensor> {
        self.map.remove(name)
    }

    /// Whether a tensor is present.
    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// Inserts a tensor.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.map.insert(name.into(), t);
    }

    /// Checks a tensor's shape.
    pub fn expect_shape(name: &str, t: &Tensor, dims: &[usize]) -> Result<()> {
        if t.dims() != dims {
            return Err(TrainError::BadModel(format!(
                "tensor `{name}` has shape {:?}, expected {dims:?}",
                t.dims()
            )));
        }
        Ok(())
    }
}
