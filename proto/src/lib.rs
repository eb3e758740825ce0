//! Generated code for the `densebert4ret.v1` gRPC protocol, shared by the
//! services and their clients.

pub mod v1 {
    tonic::include_proto!("densebert4ret.v1");

    /// Encoded file descriptor set of the protocol, served through gRPC
    /// reflection so that `grpcurl` can list and call every method.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("densebert4ret_v1_descriptor");
}

/// Converts little-endian `f32` bytes, as carried in `image_features` fields,
/// into floats. Returns `None` when the length is not a multiple of four.
pub fn features_from_bytes(bytes: &[u8]) -> Option<Vec<f32>> {
    if bytes.len() % 4 != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
            .collect(),
    )
}

/// Converts floats into the little-endian byte layout of `image_features`.
pub fn features_to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|value| value.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_round_trip() {
        let values = [0.0f32, -1.5, 3.25, f32::MAX];
        let bytes = features_to_bytes(&values);
        assert_eq!(bytes.len(), 16);
        assert_eq!(features_from_bytes(&bytes).unwrap(), values);
    }

    #[test]
    fn features_reject_partial_float() {
        assert!(features_from_bytes(&[0, 0, 0]).is_none());
    }
}
