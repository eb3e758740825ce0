//! The Rust BERT and tokenizer against Hugging Face transformers on all-MiniLM-L6-v2.
//!
//! The reference comes from scripts/make_references.py: six sentences tokenized by the
//! Hugging Face fast tokenizer as one batch padded to the longest, and the transformers
//! `AutoModel` last hidden state pooled by masked mean and by `[CLS]`.

mod common;

use common::{artifact, init, max_abs_diff, read_tensor, REFERENCE_TOLERANCE};
use densebert4ret_model::{
    pad_batch, Device, Kind, ModelError, Pooling, Tensor, TextTokenizer, TextTower, TokenOverflow,
};

fn reference_sentences() -> Vec<String> {
    let path = artifact("references/minilm_sentences.json");
    let text = std::fs::read_to_string(&path).expect("read sentences");
    serde_json::from_str(&text).expect("parse sentences")
}

fn tokenizer(max_tokens: usize, overflow: TokenOverflow) -> TextTokenizer {
    TextTokenizer::from_file(
        artifact("weights/minilm/tokenizer.json"),
        max_tokens,
        overflow,
    )
    .expect("load tokenizer")
}

fn tower(pooling: Pooling) -> TextTower {
    TextTower::load_dir(&artifact("weights/minilm"), "", pooling, Device::Cpu).expect("load MiniLM")
}

#[test]
fn tokenizer_ids_match_huggingface() {
    init();
    let sentences = reference_sentences();
    let reference = artifact("references/minilm_reference.safetensors");
    let expected_ids = read_tensor(&reference, "input_ids");
    let expected_mask = read_tensor(&reference, "attention_mask");

    let tokenizer = tokenizer(128, TokenOverflow::Reject);
    let sequences: Vec<Vec<i64>> = sentences
        .iter()
        .map(|sentence| tokenizer.encode(sentence).expect("encode"))
        .collect();
    let (ids, mask) = pad_batch(&sequences, tokenizer.pad_id());

    assert_eq!(ids.size(), expected_ids.size(), "padded batch shape");
    let ids_equal = ids
        .eq_tensor(&expected_ids.to_kind(Kind::Int64))
        .all()
        .int64_value(&[]);
    assert_eq!(
        ids_equal, 1,
        "token ids differ from the Hugging Face tokenizer"
    );
    let mask_equal = mask
        .eq_tensor(&expected_mask.to_kind(Kind::Int64))
        .all()
        .int64_value(&[]);
    assert_eq!(
        mask_equal, 1,
        "attention mask differs from the Hugging Face tokenizer"
    );
}

#[test]
fn mean_embeddings_match_transformers() {
    init();
    let reference = artifact("references/minilm_reference.safetensors");
    let ids = read_tensor(&reference, "input_ids");
    let mask = read_tensor(&reference, "attention_mask");
    let expected = read_tensor(&reference, "mean_embeddings");

    let embeddings = tower(Pooling::Mean)
        .f_features(&ids, &mask)
        .expect("text features");
    assert_eq!(embeddings.size(), vec![6, 384]);
    let diff = max_abs_diff(&embeddings, &expected);
    eprintln!("embeddings: max abs diff {diff:e}");
    assert!(
        diff < REFERENCE_TOLERANCE,
        "max abs diff {diff} against transformers"
    );
}

#[test]
fn cls_embeddings_match_transformers() {
    init();
    let reference = artifact("references/minilm_reference.safetensors");
    let ids = read_tensor(&reference, "input_ids");
    let mask = read_tensor(&reference, "attention_mask");
    let expected = read_tensor(&reference, "cls_embeddings");

    let embeddings = tower(Pooling::Cls)
        .f_features(&ids, &mask)
        .expect("text features");
    let diff = max_abs_diff(&embeddings, &expected);
    eprintln!("embeddings: max abs diff {diff:e}");
    assert!(
        diff < REFERENCE_TOLERANCE,
        "max abs diff {diff} against transformers"
    );
}

#[test]
fn padding_does_not_change_embedding() {
    init();
    let tokenizer = tokenizer(64, TokenOverflow::Truncate);
    let tower = tower(Pooling::Mean);
    let short = tokenizer.encode("red dress").expect("encode");
    let long = tokenizer
        .encode("a much longer description of a completely different garment")
        .expect("encode");

    let (alone_ids, alone_mask) = pad_batch(std::slice::from_ref(&short), tokenizer.pad_id());
    let alone = tower.f_features(&alone_ids, &alone_mask).expect("features");
    let (ids, mask) = pad_batch(&[short, long], tokenizer.pad_id());
    let batched = tower.f_features(&ids, &mask).expect("features");

    let diff = max_abs_diff(&batched.narrow(0, 0, 1), &alone);
    assert!(diff < 1e-5, "padding changed the embedding by {diff}");
}

#[test]
fn truncation_keeps_closing_token() {
    init();
    let tokenizer = tokenizer(8, TokenOverflow::Truncate);
    let ids = tokenizer
        .encode("one two three four five six seven eight nine ten eleven twelve")
        .expect("encode");
    assert_eq!(ids.len(), 8);
    assert_eq!(ids.first(), Some(&101), "[CLS] first");
    assert_eq!(ids.last(), Some(&102), "[SEP] last");
}

#[test]
fn reject_mode_names_token_count() {
    init();
    let tokenizer = tokenizer(8, TokenOverflow::Reject);
    let error = tokenizer
        .encode("one two three four five six seven eight nine ten eleven twelve")
        .expect_err("too long");
    assert!(
        matches!(
            error,
            ModelError::TooManyTokens {
                count: 14,
                max_tokens: 8
            }
        ),
        "unexpected error {error:?}"
    );
    assert!(error.to_string().contains("14 tokens"), "{error}");

    let ids = tokenizer.encode("red dress").expect("short text fits");
    assert_eq!(ids, vec![101, 2417, 4377, 102]);
}

#[test]
fn max_tokens_below_special_tokens_rejected() {
    init();
    let path = artifact("weights/minilm/tokenizer.json");
    let error = TextTokenizer::from_file(&path, 2, TokenOverflow::Truncate).expect_err("too small");
    assert!(error.to_string().contains("max_tokens is 2"), "{error}");
}

#[test]
fn wrong_weights_prefix_suggests_fix() {
    init();
    let dir = artifact("weights/minilm");
    let error =
        TextTower::load_dir(&dir, "bert.", Pooling::Mean, Device::Cpu).expect_err("wrong prefix");
    let message = error.to_string();
    assert!(message.contains("bert.embeddings"), "{message}");
    assert!(message.contains("set the weights prefix"), "{message}");
}

#[test]
fn invalid_token_inputs_rejected() {
    init();
    let tower = tower(Pooling::Mean);

    let ids = Tensor::from_slice(&[101i64, 40000, 102]).view([1, 3]);
    let mask = Tensor::ones([1, 3], (Kind::Int64, Device::Cpu));
    let error = tower.f_features(&ids, &mask).expect_err("id out of range");
    assert!(error.to_string().contains("40000"), "{error}");

    let long = Tensor::ones([1, 513], (Kind::Int64, Device::Cpu));
    let error = tower.f_features(&long, &long).expect_err("too long");
    assert!(error.to_string().contains("513 tokens"), "{error}");

    let ids = Tensor::from_slice(&[101i64, 102]).view([1, 2]);
    let mask = Tensor::ones([1, 3], (Kind::Int64, Device::Cpu));
    let error = tower.f_features(&ids, &mask).expect_err("shape mismatch");
    assert!(
        error
            .to_string()
            .contains("attention_mask has shape [1, 3]"),
        "{error}"
    );

    let float_ids = Tensor::ones([1, 2], (Kind::Float, Device::Cpu));
    let error = tower
        .f_features(&float_ids, &mask.narrow(1, 0, 2))
        .expect_err("float ids");
    assert!(
        error.to_string().contains("expected an integer type"),
        "{error}"
    );
}
