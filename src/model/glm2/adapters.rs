//! LoRA adapters beside the weights ([`Glm2Model::add_adapter`]) and the views of the model that
//! run their sequences with one ([`Glm2Model::with_adapter`]): the weights, the KV pool and the
//! other adapters shared. Sequences of different views step together in one batch (the adapter
//! of each is its cache's; see [`crate::model::lora`]).

use super::Glm2Model;
use crate::checkpoint::LoraAdapter;
use crate::error::{Error, Result};
use crate::model::lora::{Target, UnmergedLora};
use std::sync::Arc;

impl Glm2Model {
    /// Load `adapter` beside the weights under `name`, for sequences that ask for it.
    pub fn add_adapter(&mut self, name: &str, adapter: &LoraAdapter) -> Result<()> {
        if name.is_empty() || self.adapters.iter().any(|a| a.name() == name) {
            return Err(Error::invalid(format!(
                "adapter name {name:?} is empty or already taken"
            )));
        }
        let base_bias = |layer: usize, target: Target| {
            let l = &self.layers[layer];
            let linear = match target {
                Target::QueryKeyValue => &l.self_attention.query_key_value,
                Target::Dense => &l.self_attention.dense,
                Target::DenseHTo4h => &l.mlp.dense_h_to_4h,
                Target::Dense4hToH => &l.mlp.dense_4h_to_h,
            };
            linear.bias().cloned()
        };
        let lora = UnmergedLora::new(
            name,
            adapter,
            &self.config,
            self.dtype,
            &self.layer_devices,
            &base_bias,
        )?;
        let mut all = (*self.adapters).clone();
        all.push(Arc::new(lora));
        self.adapters = Arc::new(all);
        Ok(())
    }

    /// The names of the adapters loaded beside the weights, in loading order.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.iter().map(|a| a.name().to_string()).collect()
    }

    /// The adapter this view runs its new sequences with (`None`: the base model).
    pub fn adapter(&self) -> Option<&str> {
        self.adapter.as_deref().map(UnmergedLora::name)
    }

    /// The model whose new caches run with adapter `name` (`None`: the base model), sharing
    /// everything with this one.
    pub fn with_adapter(&self, name: Option<&str>) -> Result<Self> {
        let adapter = match name {
            None => None,
            Some(n) => Some(
                self.adapters
                    .iter()
                    .find(|a| a.name() == n)
                    .cloned()
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "no adapter named {n:?} (loaded: {})",
                            match self.adapter_names().join(", ") {
                                s if s.is_empty() => "none".to_string(),
                                s => s,
                            }
                        ))
                    })?,
            ),
        };
        Ok(Self {
            adapter,
            ..self.clone()
        })
    }

    /// Whether `other` is this model or a view of it (same weights, same KV pool): their
    /// sequences can step together.
    pub fn same_base(&self, other: &Glm2Model) -> bool {
        Arc::ptr_eq(&self.kv, &other.kv) && self.word_embeddings.id() == other.word_embeddings.id()
    }
}
