//! Adam and AdamW over the variables of a `VarStore`, with state that checkpoints can save.
//!
//! libtorch keeps its optimiser moments out of reach of the tch bindings, so a resumed run
//! would restart them from zero. This implementation keeps the moments as ordinary tensors
//! next to the weights, which makes a resumed run continue exactly where it stopped.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::Tensor;

use crate::error::{Result, TrainerError};

/// First-moment decay of Adam (Kingma and Ba, ICLR 2015, recommended value).
const BETA1: f64 = 0.9;
/// Second-moment decay of Adam.
const BETA2: f64 = 0.999;
/// Term added to the square root of the second moment.
const EPSILON: f64 = 1e-8;

/// Optimiser family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adam with L2 weight decay added to the gradient.
    Adam,
    /// AdamW (Loshchilov and Hutter, ICLR 2019): weight decay applied to the weights
    /// directly, scaled by the learning rate.
    AdamW,
}

impl OptimizerKind {
    /// Name accepted on the command line and written to `metrics.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            OptimizerKind::Adam => "adam",
            OptimizerKind::AdamW => "adamw",
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OptimizerKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "adam" => Ok(OptimizerKind::Adam),
            "adamw" => Ok(OptimizerKind::AdamW),
            other => Err(format!(
                "invalid optimizer {other:?}: expected \"adam\" or \"adamw\""
            )),
        }
    }
}

/// Adam or AdamW over every trainable variable of a store.
#[derive(Debug)]
pub struct Optimizer {
    kind: OptimizerKind,
    weight_decay: f64,
    /// Variables by name, in name order.
    variables: BTreeMap<String, Tensor>,
    first_moments: BTreeMap<String, Tensor>,
    second_moments: BTreeMap<String, Tensor>,
    /// Learning rate multipliers of the variables added by [`Optimizer::add_variables`].
    learning_rate_scales: BTreeMap<String, f64>,
    steps: i64,
}

impl Optimizer {
    /// Creates an optimiser with zero moments over the trainable variables of `store`.
    pub fn new(store: &VarStore, kind: OptimizerKind, weight_decay: f64) -> Self {
        let variables: BTreeMap<String, Tensor> = store
            .variables()
            .into_iter()
            .filter(|(_, variable)| variable.requires_grad())
            .collect();
        let zeros = |variables: &BTreeMap<String, Tensor>| {
            variables
                .iter()
                .map(|(name, variable)| (name.clone(), variable.zeros_like()))
                .collect()
        };
        Self {
            kind,
            weight_decay,
            first_moments: zeros(&variables),
            second_moments: zeros(&variables),
            variables,
            learning_rate_scales: BTreeMap::new(),
            steps: 0,
        }
    }

    /// Adds `variables` with zero moments, updated at `learning_rate_scale` times the rate
    /// that each step is given. Their names must differ from the store's.
    pub fn add_variables(&mut self, variables: &[(String, Tensor)], learning_rate_scale: f64) {
        for (name, variable) in variables {
            self.first_moments
                .insert(name.clone(), variable.detach().zeros_like());
            self.second_moments
                .insert(name.clone(), variable.detach().zeros_like());
            self.learning_rate_scales
                .insert(name.clone(), learning_rate_scale);
            self.variables
                .insert(name.clone(), variable.shallow_clone());
        }
    }

    /// Clears the gradients of every variable.
    pub fn zero_grad(&mut self) {
        for variable in self.variables.values_mut() {
            variable.zero_grad();
        }
    }

    /// Runs `loss.backward()` and one update at `learning_rate`.
    pub fn backward_step(&mut self, loss: &Tensor, learning_rate: f64) {
        self.zero_grad();
        loss.backward();
        self.step(learning_rate);
    }

    /// Applies one update from the current gradients; variables without a gradient are skipped.
    pub fn step(&mut self, learning_rate: f64) {
        self.steps += 1;
        let first_correction = 1.0 - BETA1.powi(self.steps as i32);
        let second_correction = 1.0 - BETA2.powi(self.steps as i32);
        tch::no_grad(|| {
            for (name, variable) in self.variables.iter_mut() {
                let gradient = variable.grad();
                let (Some(first), Some(second)) = (
                    self.first_moments.get_mut(name),
                    self.second_moments.get_mut(name),
                ) else {
                    continue;
                };
                if !gradient.defined() {
                    continue;
                }
                let learning_rate =
                    learning_rate * self.learning_rate_scales.get(name).copied().unwrap_or(1.0);
                let gradient = match self.kind {
                    OptimizerKind::Adam if self.weight_decay > 0.0 => {
                        gradient + &*variable * self.weight_decay
                    }
                    _ => gradient,
                };
                if self.kind == OptimizerKind::AdamW && self.weight_decay > 0.0 {
                    let _ = variable.g_mul_scalar_(1.0 - learning_rate * self.weight_decay);
                }
                let _ = first.g_mul_scalar_(BETA1);
                let _ = first.g_add_(&(&gradient * (1.0 - BETA1)));
                let _ = second.g_mul_scalar_(BETA2);
                let _ = second.g_add_(&(gradient.square() * (1.0 - BETA2)));

                let denominator = (&*second / second_correction).sqrt() + EPSILON;
                let update = (&*first / first_correction) / denominator;
                let _ = variable.g_sub_(&(update * learning_rate));
            }
        });
    }

    /// Number of updates applied so far.
    pub fn steps(&self) -> i64 {
        self.steps
    }

    /// Moments as named tensors (`m.NAME`, `v.NAME`) for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let first = self
            .first_moments
            .iter()
            .map(|(name, moment)| (format!("m.{name}"), moment.shallow_clone()));
        let second = self
            .second_moments
            .iter()
            .map(|(name, moment)| (format!("v.{name}"), moment.shallow_clone()));
        first.chain(second).collect()
    }

    /// Restores the moments and the step count written by [`Optimizer::state_tensors`].
    pub fn load_state(&mut self, tensors: &[(String, Tensor)], steps: i64) -> Result<()> {
        let lookup: BTreeMap<&str, &Tensor> = tensors
            .iter()
            .map(|(name, tensor)| (name.as_str(), tensor))
            .collect();
        for (prefix, moments) in [
            ("m", &mut self.first_moments),
            ("v", &mut self.second_moments),
        ] {
            for (name, moment) in moments.iter_mut() {
                let key = format!("{prefix}.{name}");
                let stored = lookup.get(key.as_str()).ok_or_else(|| {
                    TrainerError::InvalidInput(format!(
                        "the checkpoint has no optimiser tensor {key}; it was written by another head layout"
                    ))
                })?;
                if stored.size() != moment.size() {
                    return Err(TrainerError::InvalidInput(format!(
                        "the checkpoint's optimiser tensor {key} is {:?}, expected {:?}",
                        stored.size(),
                        moment.size()
                    )));
                }
                tch::no_grad(|| moment.copy_(stored));
            }
        }
        self.steps = steps;
        Ok(())
    }
}
