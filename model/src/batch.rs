//! Conversion of preprocessed inputs into batched CPU tensors.

use tch::{Kind, Tensor};

use crate::error::ModelError;

/// Pads token id sequences to the longest one in the batch.
///
/// Returns `input_ids` and `attention_mask`, both int64 `[N, L]` on the CPU, where L is the
/// longest sequence length. The mask is 1 on tokens and 0 on padding. An empty slice gives
/// `[0, 0]` tensors.
pub fn pad_batch(sequences: &[Vec<i64>], pad_id: i64) -> (Tensor, Tensor) {
    let length = sequences.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(sequences.len() * length);
    let mut mask = Vec::with_capacity(sequences.len() * length);
    for sequence in sequences {
        ids.extend_from_slice(sequence);
        ids.extend(std::iter::repeat_n(pad_id, length - sequence.len()));
        mask.extend(std::iter::repeat_n(1i64, sequence.len()));
        mask.extend(std::iter::repeat_n(0i64, length - sequence.len()));
    }
    let shape = [sequences.len() as i64, length as i64];
    (
        Tensor::from_slice(&ids).view(shape),
        Tensor::from_slice(&mask).view(shape),
    )
}

/// Stacks CHW images from [`crate::image_to_chw`] into a float `[N, 3, size, size]` CPU tensor.
///
/// Returns [`ModelError::InvalidInput`] naming the first image whose length is not
/// `3 * size * size`.
pub fn stack_images(images: &[Vec<f32>], size: u32) -> Result<Tensor, ModelError> {
    let side = i64::from(size);
    let expected = 3 * (size as usize) * (size as usize);
    let mut values = Vec::with_capacity(images.len() * expected);
    for (index, image) in images.iter().enumerate() {
        if image.len() != expected {
            return Err(ModelError::InvalidInput(format!(
                "image {index} has {} values, expected {expected} (3x{size}x{size})",
                image.len()
            )));
        }
        values.extend_from_slice(image);
    }
    Ok(Tensor::from_slice(&values)
        .to_kind(Kind::Float)
        .view([images.len() as i64, 3, side, side]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_batch_pads_to_longest() {
        let (ids, mask) = pad_batch(&[vec![101, 7, 102], vec![101, 102]], 0);
        assert_eq!(ids.size(), vec![2, 3]);
        assert_eq!(
            Vec::<i64>::try_from(ids.view([-1])).expect("ids"),
            vec![101, 7, 102, 101, 102, 0]
        );
        assert_eq!(
            Vec::<i64>::try_from(mask.view([-1])).expect("mask"),
            vec![1, 1, 1, 1, 1, 0]
        );
        assert_eq!(mask.kind(), Kind::Int64);
    }

    #[test]
    fn pad_batch_uses_pad_id() {
        let (ids, _) = pad_batch(&[vec![5], vec![5, 6, 7]], 3);
        assert_eq!(
            Vec::<i64>::try_from(ids.view([-1])).expect("ids"),
            vec![5, 3, 3, 5, 6, 7]
        );
    }

    #[test]
    fn pad_batch_empty() {
        let (ids, mask) = pad_batch(&[], 0);
        assert_eq!(ids.size(), vec![0, 0]);
        assert_eq!(mask.size(), vec![0, 0]);
    }

    #[test]
    fn stack_images_checks_lengths() {
        let batch = stack_images(&[vec![0.5; 3 * 4 * 4], vec![1.0; 3 * 4 * 4]], 4).expect("stack");
        assert_eq!(batch.size(), vec![2, 3, 4, 4]);
        assert_eq!(batch.double_value(&[1, 2, 3, 3]), 1.0);

        let error = stack_images(&[vec![0.0; 48], vec![0.0; 47]], 4).expect_err("short image");
        assert!(
            error.to_string().contains("image 1 has 47 values"),
            "{error}"
        );
    }
}
