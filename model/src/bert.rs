//! BERT encoder (Devlin et al., 2019) built from a Hugging Face `config.json`, with the tensor
//! names of Hugging Face `BertModel` (`embeddings.*`, `encoder.layer.N.*`), so checkpoints such
//! as all-MiniLM-L6-v2 load unchanged. The pooler is not built because neither pooling mode
//! uses it.

use std::path::Path;

use serde::Deserialize;
use tch::nn;
use tch::{Kind, Tensor};

use crate::config::Pooling;
use crate::error::ModelError;

/// Fields of a Hugging Face BERT `config.json` that the encoder uses. Other fields are ignored.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct BertConfig {
    /// Number of rows of the word embedding table.
    pub vocab_size: i64,
    /// Width of token states.
    pub hidden_size: i64,
    /// Number of encoder layers.
    pub num_hidden_layers: i64,
    /// Number of attention heads per layer.
    pub num_attention_heads: i64,
    /// Width of the feed-forward layer.
    pub intermediate_size: i64,
    /// Feed-forward activation: `gelu`, `gelu_new`, `gelu_pytorch_tanh` or `relu`.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Maximum sequence length the position embeddings cover.
    pub max_position_embeddings: i64,
    /// Number of token type (segment) embeddings.
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: i64,
    /// LayerNorm epsilon.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Dropout after embeddings and sublayers during training.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities during training.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Position embedding type; only `absolute` is supported.
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
}

fn default_hidden_act() -> String {
    "gelu".to_owned()
}
fn default_type_vocab_size() -> i64 {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f64 {
    0.1
}
fn default_position_embedding_type() -> String {
    "absolute".to_owned()
}

/// Feed-forward activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Activation {
    /// Exact GELU, `x * Φ(x)`, Hugging Face `gelu`.
    Gelu,
    /// Tanh approximation of GELU, Hugging Face `gelu_new` and `gelu_pytorch_tanh`.
    GeluTanh,
    Relu,
}

impl BertConfig {
    /// Reads and validates a Hugging Face BERT `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| ModelError::io("failed to read", path, error))?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|error| ModelError::config(path, error.to_string()))?;
        config
            .validate()
            .map_err(|reason| ModelError::config(path, reason))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        for (field, value) in positive {
            if value < 1 {
                return Err(format!("{field} is {value}, expected at least 1"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type is {:?}, only \"absolute\" is supported",
                self.position_embedding_type
            ));
        }
        self.activation()?;
        Ok(())
    }

    fn activation(&self) -> Result<Activation, String> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(format!(
                "hidden_act is {other:?}, expected \"gelu\", \"gelu_new\", \"gelu_pytorch_tanh\" or \"relu\""
            )),
        }
    }
}

fn layer_norm(path: nn::Path, width: i64, eps: f64) -> nn::LayerNorm {
    let config = nn::LayerNormConfig {
        eps,
        ..Default::default()
    };
    nn::layer_norm(path, vec![width], config)
}

#[derive(Debug)]
struct Embeddings {
    word: nn::Embedding,
    position: nn::Embedding,
    token_type: nn::Embedding,
    layer_norm: nn::LayerNorm,
    dropout: f64,
}

impl Embeddings {
    fn new(path: &nn::Path, config: &BertConfig) -> Self {
        let embedding = |name: &str, rows: i64| {
            nn::embedding(path / name, rows, config.hidden_size, Default::default())
        };
        Self {
            word: embedding("word_embeddings", config.vocab_size),
            position: embedding("position_embeddings", config.max_position_embeddings),
            token_type: embedding("token_type_embeddings", config.type_vocab_size),
            layer_norm: layer_norm(
                path / "LayerNorm",
                config.hidden_size,
                config.layer_norm_eps,
            ),
            dropout: config.hidden_dropout_prob,
        }
    }

    fn forward_t(&self, input_ids: &Tensor, token_type_ids: &Tensor, train: bool) -> Tensor {
        let length = input_ids.size()[1];
        let positions = Tensor::arange(length, (Kind::Int64, input_ids.device())).unsqueeze(0);
        let summed = input_ids.apply(&self.word)
            + positions.apply(&self.position)
            + token_type_ids.apply(&self.token_type);
        summed.apply(&self.layer_norm).dropout(self.dropout, train)
    }
}

#[derive(Debug)]
struct Layer {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    attention_output: nn::Linear,
    attention_norm: nn::LayerNorm,
    intermediate: nn::Linear,
    output: nn::Linear,
    output_norm: nn::LayerNorm,
    num_heads: i64,
    activation: Activation,
    hidden_dropout: f64,
    attention_dropout: f64,
}

impl Layer {
    fn new(path: &nn::Path, config: &BertConfig, activation: Activation) -> Self {
        let hidden = config.hidden_size;
        let linear = |path: nn::Path, inputs: i64, outputs: i64| {
            nn::linear(path, inputs, outputs, Default::default())
        };
        let attention = path / "attention";
        let self_attention = &attention / "self";
        let attention_output = &attention / "output";
        Self {
            query: linear(&self_attention / "query", hidden, hidden),
            key: linear(&self_attention / "key", hidden, hidden),
            value: linear(&self_attention / "value", hidden, hidden),
            attention_output: linear(&attention_output / "dense", hidden, hidden),
            attention_norm: layer_norm(
                &attention_output / "LayerNorm",
                hidden,
                config.layer_norm_eps,
            ),
            intermediate: linear(
                path / "intermediate" / "dense",
                hidden,
                config.intermediate_size,
            ),
            output: linear(path / "output" / "dense", config.intermediate_size, hidden),
            output_norm: layer_norm(path / "output" / "LayerNorm", hidden, config.layer_norm_eps),
            num_heads: config.num_attention_heads,
            activation,
            hidden_dropout: config.hidden_dropout_prob,
            attention_dropout: config.attention_probs_dropout_prob,
        }
    }

    /// `attention_mask` is boolean `[N, 1, 1, L]`, true for tokens that may be attended to.
    fn forward_t(&self, xs: &Tensor, attention_mask: &Tensor, train: bool) -> Tensor {
        let size = xs.size();
        let (batch, length, hidden) = (size[0], size[1], size[2]);
        let head_dim = hidden / self.num_heads;
        let split_heads = |projected: Tensor| {
            projected
                .view([batch, length, self.num_heads, head_dim])
                .transpose(1, 2)
        };

        let query = split_heads(xs.apply(&self.query));
        let key = split_heads(xs.apply(&self.key));
        let value = split_heads(xs.apply(&self.value));
        let dropout = if train { self.attention_dropout } else { 0.0 };
        let context = Tensor::scaled_dot_product_attention(
            &query,
            &key,
            &value,
            Some(attention_mask),
            dropout,
            false,
            None::<f64>,
            false,
        )
        .transpose(1, 2)
        .contiguous()
        .view([batch, length, hidden]);

        let attended = (context
            .apply(&self.attention_output)
            .dropout(self.hidden_dropout, train)
            + xs)
            .apply(&self.attention_norm);
        let intermediate = attended.apply(&self.intermediate);
        let activated = match self.activation {
            Activation::Gelu => intermediate.gelu("none"),
            Activation::GeluTanh => intermediate.gelu("tanh"),
            Activation::Relu => intermediate.relu(),
        };
        (activated
            .apply(&self.output)
            .dropout(self.hidden_dropout, train)
            + attended)
            .apply(&self.output_norm)
    }
}

/// BERT encoder returning the last hidden states.
#[derive(Debug)]
pub struct BertModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    config: BertConfig,
}

impl BertModel {
    /// Creates the encoder under `path` with variables `embeddings.*` and `encoder.layer.N.*`.
    pub fn new(path: &nn::Path, config: &BertConfig) -> Result<Self, ModelError> {
        let activation = config.activation().map_err(|reason| {
            ModelError::InvalidInput(format!("unsupported BERT configuration: {reason}"))
        })?;
        let layers_path = path / "encoder" / "layer";
        let layers = (0..config.num_hidden_layers)
            .map(|index| Layer::new(&(&layers_path / index), config, activation))
            .collect();
        Ok(Self {
            embeddings: Embeddings::new(&(path / "embeddings"), config),
            layers,
            config: config.clone(),
        })
    }

    /// Returns the configuration the encoder was built from.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Computes last hidden states `[N, L, hidden_size]`.
    ///
    /// `input_ids` and `attention_mask` are `[N, L]` integer tensors on the encoder's device,
    /// with mask 1 for real tokens and 0 for padding. `token_type_ids` defaults to zeros.
    /// Callers validate ids and lengths; out-of-range ids make libtorch raise an error.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let zeros;
        let token_type_ids = match token_type_ids {
            Some(ids) => ids,
            None => {
                zeros = input_ids.zeros_like();
                &zeros
            }
        };
        let embeddings = self.embeddings.forward_t(input_ids, token_type_ids, train);
        self.layers_t(&embeddings, attention_mask, 0..self.layers.len(), train)
    }

    /// Computes the hidden states `[N, L, hidden_size]` that layer `end` reads: the
    /// embeddings (with zero token types) through layers `..end`.
    ///
    /// Inputs are as for [`BertModel::forward_t`]; `end` above the layer count runs them all.
    pub fn forward_until_t(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        end: usize,
        train: bool,
    ) -> Tensor {
        let embeddings = self
            .embeddings
            .forward_t(input_ids, &input_ids.zeros_like(), train);
        let end = end.min(self.layers.len());
        self.layers_t(&embeddings, attention_mask, 0..end, train)
    }

    /// Runs layers `first..` on the hidden states `[N, L, hidden_size]` that layer `first`
    /// reads and returns the last hidden states, so that
    /// `forward_from_t(forward_until_t(ids, mask, k), mask, k)` equals `forward_t`.
    pub fn forward_from_t(
        &self,
        hidden: &Tensor,
        attention_mask: &Tensor,
        first: usize,
        train: bool,
    ) -> Tensor {
        let first = first.min(self.layers.len());
        self.layers_t(hidden, attention_mask, first..self.layers.len(), train)
    }

    fn layers_t(
        &self,
        hidden: &Tensor,
        attention_mask: &Tensor,
        range: std::ops::Range<usize>,
        train: bool,
    ) -> Tensor {
        let mask = attention_mask.ne(0).unsqueeze(1).unsqueeze(1);
        let mut xs = hidden.shallow_clone();
        for layer in &self.layers[range] {
            xs = layer.forward_t(&xs, &mask, train);
        }
        xs
    }

    /// Returns the prefix of the variables of layer `index`, `encoder.layer.{index}.`.
    pub fn layer_prefix(index: usize) -> String {
        format!("encoder.layer.{index}.")
    }
}

/// Reduces hidden states `[N, L, H]` to `[N, H]`.
///
/// Mean pooling averages the states where `attention_mask` is non-zero, with the token count
/// clamped to at least 1e-9 as sentence-transformers does, so an all-zero mask gives zeros.
pub fn pool(hidden: &Tensor, attention_mask: &Tensor, pooling: Pooling) -> Tensor {
    match pooling {
        Pooling::Cls => hidden.select(1, 0),
        Pooling::Mean => {
            let mask = attention_mask.to_kind(hidden.kind()).unsqueeze(-1);
            let summed = (hidden * &mask).sum_dim_intlist(1, false, hidden.kind());
            let counts = mask
                .sum_dim_intlist(1, false, hidden.kind())
                .clamp_min(1e-9);
            summed / counts
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_forward_equals_whole_forward() {
        let config: BertConfig = serde_json::from_str(
            r#"{"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 3,
                "num_attention_heads": 2, "intermediate_size": 32,
                "max_position_embeddings": 12}"#,
        )
        .unwrap();
        tch::manual_seed(3);
        let store = nn::VarStore::new(tch::Device::Cpu);
        let model = BertModel::new(&store.root(), &config).unwrap();
        let ids = Tensor::from_slice(&[1i64, 5, 7, 2, 1, 9, 0, 0]).view([2, 4]);
        let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 0, 0]).view([2, 4]);
        let whole = model.forward_t(&ids, &mask, None, false);
        for cut in 0..=3 {
            let hidden = model.forward_until_t(&ids, &mask, cut, false);
            let split = model.forward_from_t(&hidden, &mask, cut, false);
            let difference = (&split - &whole).abs().max().double_value(&[]);
            assert!(difference < 1e-5, "cut {cut}: max difference {difference}");
        }
    }
}
